"""The desktop app launched the way users launch it: a fresh interpreter, offscreen.

In-process GUI tests cannot see start-up races (pytest has imported torch's lazily loaded modules
long before a window exists) nor whether the process really exits, so these tests run
``python -m app.launcher`` (or `app.__main__.gui_main` behind a tiny driver that closes the
window at a chosen moment) in a subprocess and look at its exit code, its output and its timing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

#: Seconds a launch may take on a busy 2-core machine (imports alone take several).
LAUNCH_TIMEOUT_S = 180
#: After the window is closed with a job stuck in a call that ignores cancellation, the process
#: must be gone within this many seconds.
EXIT_DEADLINE_S = 5.0


def _env(settings: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "QT_QPA_PLATFORM": "offscreen",
        "WORKBENCH_SETTINGS": str(settings),
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("DISPLAY", None)
    env.pop("WAYLAND_DISPLAY", None)
    return env


@pytest.fixture(scope="module")
def tiny_pt2(tmp_path_factory) -> Path:
    """A small MLP saved with torch.export.save, as a user would bring it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(12, 24), torch.nn.ReLU(), torch.nn.Linear(24, 5)
    ).eval()
    program = torch.export.export(model, (torch.randn(3, 12),))
    path = tmp_path_factory.mktemp("launch") / "tiny_mlp.pt2"
    torch.export.save(program, str(path))
    return path


#: Runs the real `gui_main` and reports the first load's outcome; with ``--stuck`` it then
#: starts a job that ignores cancellation for 30 s and closes the window, printing the time.
DRIVER = textwrap.dedent(
    """
    import sys, time
    from PySide6.QtCore import QTimer
    import app.main_window as mw
    from app.__main__ import gui_main

    stuck = "--stuck" in sys.argv
    argv = [a for a in sys.argv[1:] if a != "--stuck"]
    original = mw.MainWindow.open_model

    def open_model(self, *args, **kwargs):
        original(self, *args, **kwargs)
        c = self.controller
        c.errorRaised.connect(lambda t, m, d: print("ERROR", t, "|", m, flush=True))

        def finished(kind, outcome):
            if kind != "load":
                return
            c.jobFinished.disconnect(finished)
            print("LOAD", outcome, c.model.source if c.model else None, flush=True)
            if not stuck:
                QTimer.singleShot(0, self.close)
                return

            def body(progress, cancel):
                print("STUCK", flush=True)
                time.sleep(30)  # a non-cancellable call: never looks at `cancel`
                print("UNSTUCK", flush=True)

            c._start("export", "Stuck export", body, lambda result: None)

            def close():
                print("CLOSING", repr(time.time()), flush=True)
                self.close()

            QTimer.singleShot(500, close)

        c.jobFinished.connect(finished)

    mw.MainWindow.open_model = open_model
    sys.exit(gui_main(argv))
    """
)


def _drive(tmp_path: Path, *args: str, settings: Path) -> subprocess.CompletedProcess:
    driver = tmp_path / "drive_app.py"
    driver.write_text(DRIVER)
    return subprocess.run(
        [sys.executable, str(driver), *args],
        cwd=ROOT,
        env={**_env(settings), "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT_S,
    )


def test_pt2_on_the_command_line_opens_at_start_up(tmp_path, tiny_pt2):
    """``workbench model.pt2``: the load races the start-up warm-up of torch's lazy modules."""
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [sys.executable, "-m", "app.launcher", str(tiny_pt2), "--screenshot", str(shot)],
        cwd=ROOT,
        env=_env(tmp_path / "settings.ini"),
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT_S,
    )
    assert "Open model failed" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stderr
    assert shot.is_file() and shot.stat().st_size > 0
    assert "Traceback" not in proc.stderr, proc.stderr


def test_pt2_restored_from_the_last_session_opens(tmp_path, tiny_pt2):
    """``workbench`` with no argument reopens the last session's ``.pt2`` at start-up."""
    settings = tmp_path / "settings.ini"
    settings.write_text(f"[session]\nmodel={tiny_pt2.as_posix()}\n")
    proc = _drive(tmp_path, settings=settings)
    assert "ERROR" not in proc.stdout, proc.stdout + proc.stderr
    assert f"LOAD done {tiny_pt2}" in proc.stdout, proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stderr


def test_closing_during_a_stuck_job_exits_promptly(tmp_path):
    """A job blocked in a call that ignores cancel must not keep the process alive."""
    settings = tmp_path / "settings.ini"
    proc = _drive(tmp_path, "demo:mlp", "--stuck", settings=settings)
    ended = time.time()
    out = proc.stdout
    assert "LOAD done demo:mlp" in out, out + proc.stderr
    assert "STUCK" in out, out + proc.stderr
    closing = [line for line in out.splitlines() if line.startswith("CLOSING ")]
    assert closing, out + proc.stderr
    took = ended - float(closing[0].split()[1])
    assert took < EXIT_DEADLINE_S, f"exited {took:.1f} s after the window closed"
    assert "UNSTUCK" not in out
    assert proc.returncode == 0, proc.stderr
    # The session was saved before the hard exit.
    assert "demo:mlp" in settings.read_text()
