"""Regenerate the README/user-guide screenshots under docs/screenshots/.

Each shot runs ``workbench MODEL --screenshot PATH`` in a fresh process with a throw-away
settings file, so the user's saved layout never leaks into the pictures. Headless machines
render offscreen. Usage: ``.venv/bin/python scripts/make_screenshots.py``.

The ResNet-50 shots open the tests' 107-layer ResNet-50-shaped model (generated as TorchScript
into a temporary folder) at 1366x768 and 1920x1080. The scripted shots (`SCRIPTED`) drive the
window in their own fresh process (``make_screenshots.py --sensitivity|--runs PATH --settings
INI``): demo:mlp, Scan, then a target-ratio step with the Sensitivity dock and the Target tab
raised, or four compress runs at different target ratios with the Runs dock (Pareto front and
predicted frontier) raised, at 1366x768.
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


#: (file name, extra arguments) on a generated 107-layer ResNet-50-shaped model (TorchScript
#: file written into the temporary folder as ``RESNET50``), at the two usual screen sizes.
RESNET_SHOTS = (
    ("resnet50-1366.png", ["--select", "layer3.0.conv2", "--size", "1366x768"]),
    ("resnet50-1920.png", ["--select", "layer3.0.conv2", "--size", "1920x1080"]),
)

#: (file name, script option) of the shots this script drives itself.
SCRIPTED = (("sensitivity.png", "--sensitivity"), ("runs.png", "--runs"))
#: Window size of the scripted shots (the smallest screen the layout is made for).
SCRIPTED_SIZE = (1366, 768)


def _drive(path: str, settings_path: str, after_scan) -> int:
    """Open demo:mlp in a fresh window (`SCRIPTED_SIZE`, throw-away settings), scan it, then
    hand over to ``after_scan(window, save, on_evaluated)``: it stages the shot and calls
    ``save()``, or starts runs and sets ``on_evaluated[0]`` to what follows each evaluation."""
    sys.path.insert(0, str(ROOT))
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication

    from app.__main__ import make_settings
    from app.main_window import MainWindow

    app = QApplication.instance() or QApplication([])
    window = MainWindow(make_settings(settings_path))
    window.resize(*SCRIPTED_SIZE)
    window.show()
    c, ui = window.controller, window.sensitivity_ui
    state = {"code": 1}
    on_evaluated = [None]

    def finish(code: int) -> None:
        state["code"] = code
        c.shutdown()
        app.quit()

    def save() -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        ok = window.grab().save(path, "PNG")
        print(f"saved {path}" if ok else f"could not write {path}")
        finish(0 if ok else 1)

    def on_finished(kind: str, outcome: str) -> None:
        if outcome == "failed":
            finish(1)
        elif kind == "analyze" and outcome == "done" and c.sensitivity is None:
            ui.scan()
        elif kind == "scan" and outcome == "done":
            after_scan(window, lambda: QTimer.singleShot(500, save), on_evaluated)
        elif (
            kind == "evaluate"
            and outcome == "done"
            and c.result is not None  # not the evaluation of the original at open
            and on_evaluated[0] is not None
        ):
            QTimer.singleShot(0, on_evaluated[0])

    c.jobFinished.connect(on_finished)
    QTimer.singleShot(600_000, lambda: finish(1))
    window.open_model("demo:mlp")
    app.exec()
    return state["code"]


def sensitivity_shot(path: str, settings_path: str, ratio: float = 12.0) -> int:
    """Scan demo:mlp, plan for ``ratio`` with the Target slider, select fc1 and fc2 and save
    the window with the Sensitivity dock and the Target tab in front."""

    def after_scan(window, save, _on_evaluated) -> None:
        ui = window.sensitivity_ui
        ui.panel.set_ratio(ratio)
        window._end_drag()
        window.controller.set_selection(("fc1", "fc2"))
        window.control_tabs.setCurrentWidget(ui.panel)
        ui.dock.raise_()
        save()

    return _drive(path, settings_path, after_scan)


def runs_shot(
    path: str, settings_path: str, ratios: tuple[float, ...] = (4.0, 8.0, 16.0, 30.0)
) -> int:
    """Scan demo:mlp, then compress (one shot, no fine-tuning) at each target ratio of
    ``ratios`` from the Target slider; save the window with the Runs dock (size vs damage of
    every run, the Pareto front and the solver's predicted frontier) in front."""
    left = list(ratios)

    def after_scan(window, save, on_evaluated) -> None:
        def next_run() -> None:
            if window.controller.result is not None and not left:
                window.runs_dock.raise_()
                save()
                return
            window.sensitivity_ui.panel.set_ratio(left.pop(0))
            window._end_drag()
            window.controller.compress()

        on_evaluated[0] = next_run
        next_run()

    return _drive(path, settings_path, after_scan)


def _resnet50(folder: Path) -> Path:
    """The tests' 107-layer ResNet-50-shaped model, saved as TorchScript into ``folder``."""
    path = folder / "resnet50_shaped.ts.pt"
    code = (
        "import sys; sys.path.insert(0, sys.argv[2]); "
        "from tests.app.test_real_models import save_resnet50_shaped; "
        "save_resnet50_shaped(sys.argv[1])"
    )
    subprocess.run([sys.executable, "-c", code, str(path), str(ROOT)], check=True, timeout=600)
    return path


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--sensitivity" and sys.argv[3] == "--settings":
        return sensitivity_shot(sys.argv[2], sys.argv[4])
    if len(sys.argv) == 5 and sys.argv[1] == "--runs" and sys.argv[3] == "--settings":
        return runs_shot(sys.argv[2], sys.argv[4])
    OUT.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if not env.get("DISPLAY") and not env.get("WAYLAND_DISPLAY"):
        env["QT_QPA_PLATFORM"] = "offscreen"
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        resnet = str(_resnet50(Path(tmp)))
        shots = list(SHOTS) + [(name, [resnet, *args]) for name, args in RESNET_SHOTS]
        for name, args in shots:
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
        for name, option in SCRIPTED:
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                option,
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
