"""Regenerate the README/user-guide screenshots under docs/screenshots/.

Each shot runs ``workbench MODEL --screenshot PATH`` in a fresh process with a throw-away
settings file, so the user's saved layout never leaks into the pictures. Headless machines
render offscreen. Usage: ``.venv/bin/python scripts/make_screenshots.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "screenshots"

#: (file name, extra arguments)
SHOTS = (
    ("main.png", ["demo:mlp"]),
    ("cnn-layer.png", ["demo:cnn", "--select", "conv2"]),
)


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if not env.get("DISPLAY") and not env.get("WAYLAND_DISPLAY"):
        env["QT_QPA_PLATFORM"] = "offscreen"
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, args in SHOTS:
            cmd = [
                sys.executable,
                "-m",
                "app.launcher",
                *args,
                "--screenshot",
                str(OUT / name),
                "--settings",
                str(Path(tmp) / f"{name}.ini"),
            ]
            print("$", " ".join(cmd[1:]))
            proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=600)
            failed += proc.returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
