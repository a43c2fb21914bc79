"""GUI entry point: ``workbench [MODEL] [--data FILE] [--recipe R] [--trust] [--screenshot PATH]``.

Without MODEL the last session's model (and plan) is reopened, else the built-in ``demo:mlp``.
Settings go to the platform's usual place, or to the INI file named by ``--settings`` or the
``WORKBENCH_SETTINGS`` environment variable (tests and screenshots use a throw-away one).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

SETTINGS_ENV = "WORKBENCH_SETTINGS"
DEFAULT_MODEL = "demo:mlp"
#: After the event loop ends, how long to wait for jobs the closing window cancelled before
#: ending the process anyway (the window has already waited; this covers the screenshot mode).
EXIT_WAIT_MS = 1_000


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="workbench",
        description=(
            "Compression Workbench: prune and quantize a PyTorch model by eye. Subcommands "
            "(inspect, compress, export) run the same engine headless; see `workbench inspect -h`."
        ),
    )
    parser.add_argument(
        "model",
        nargs="?",
        help="model file (TorchScript, .pt2, state_dict, safetensors) or demo:mlp / demo:cnn; "
        "default: the last session's model, else demo:mlp",
    )
    parser.add_argument(
        "--data", help=".npz/.pt file with x (and optional y) for gradients and accuracy"
    )
    parser.add_argument("--recipe", help="JSON recipe to start from")
    parser.add_argument(
        "--trust",
        action="store_true",
        help="allow opening pickled models (unpickling runs code from the file)",
    )
    parser.add_argument(
        "--screenshot",
        metavar="PATH",
        help="render the window (analysed, sample plan applied, compressed) to a PNG and exit",
    )
    parser.add_argument("--select", metavar="LAYER", help="layer to select (default: the largest)")
    parser.add_argument(
        "--size",
        default="1440x900",
        metavar="WxH",
        help="window size for --screenshot (at least 1280x800; default 1440x900)",
    )
    parser.add_argument(
        "--settings",
        metavar="FILE",
        help=f"INI file for window state and recent files (also ${SETTINGS_ENV})",
    )
    return parser


def make_settings(path: str | None = None):
    """`QSettings` at ``path`` / ``$WORKBENCH_SETTINGS`` (INI), else the platform default."""
    from PySide6.QtCore import QSettings

    path = path or os.environ.get(SETTINGS_ENV)
    if path:
        return QSettings(str(path), QSettings.Format.IniFormat)
    return QSettings("compression-workbench", "workbench")


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(
            f"workbench: error: --size must look like 1440x900, got {text!r}"
        ) from None
    return max(w, 1280), max(h, 800)


def _quiet_offscreen(mode, context, message: str) -> None:
    """Drop the offscreen platform's harmless "does not support propagateSizeHints" notes."""
    if "propagateSizeHints" not in message:
        print(message, file=sys.stderr)


def gui_main(argv: list[str] | None = None) -> int:
    """Run the desktop workbench; returns the process exit code."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.screenshot and not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        # Rendering to a file needs no screen; this lets the screenshot script run headless.
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

    from core.base.errors import WorkbenchError
    from core.recipe.plan import CompressionPlan

    plan = None
    if args.recipe:
        try:
            plan = CompressionPlan.load(args.recipe)
        except WorkbenchError as exc:
            print(f"workbench: error: {exc}", file=sys.stderr)
            return 2
        except Exception as exc:  # noqa: BLE001 - an input the loader did not foresee
            from app.failures import log_unexpected, unexpected_message

            log_unexpected("Load recipe", exc)
            print(
                f"workbench: error: {unexpected_message('recipe', args.recipe, exc)}",
                file=sys.stderr,
            )
            return 2

    from PySide6.QtCore import qInstallMessageHandler
    from PySide6.QtWidgets import QApplication

    offscreen = os.environ.get("QT_QPA_PLATFORM") == "offscreen"
    previous_handler = qInstallMessageHandler(_quiet_offscreen) if offscreen else None

    app = QApplication.instance() or QApplication([sys.argv[0]])
    app.setApplicationName("Compression Workbench")
    app.setOrganizationName("compression-workbench")
    app.setStyle("Fusion")

    from app.main_window import MainWindow

    settings = make_settings(args.settings)
    source = args.model
    if source is None and not args.screenshot:
        last = settings.value("session/model", "")
        if last and (str(last).startswith("demo:") or Path(str(last)).is_file()):
            source = str(last)
            if plan is None:
                try:
                    plan = CompressionPlan.from_json(str(settings.value("session/plan", "")))
                except Exception:  # noqa: BLE001 - a damaged saved plan must not stop start-up
                    plan = None
    source = source or DEFAULT_MODEL

    window = MainWindow(settings, trust=args.trust)
    window.controller.settle_heap = True  # this process is the application's own
    exit_code = {"code": 0}
    if args.screenshot:
        w, h = _parse_size(args.size)
        window.resize(w, h)

        def on_saved(path: str) -> None:
            if path:
                print(f"workbench: screenshot saved to {path}")
            else:
                print("workbench: screenshot failed (see the messages above)", file=sys.stderr)
                exit_code["code"] = 1
            window.controller.cancel_jobs()
            app.exit(exit_code["code"])

        def on_error(title: str, message: str, details: str) -> None:
            print(f"workbench: {title}: {message}", file=sys.stderr)
            if details:
                print(details, file=sys.stderr)

        window.controller.errorRaised.connect(on_error)
        window.screenshotSaved.connect(on_saved)
        window.take_screenshot_when_ready(args.screenshot, plan=plan, select=args.select)
    window.show()
    window.open_model(source, plan=plan)
    if args.data:
        # Queued behind the load: open_data needs the model, so wait for it.
        def load_data_once(kind: str, outcome: str) -> None:
            if kind == "load":
                window.controller.jobFinished.disconnect(load_data_once)
                if outcome == "done":
                    window.controller.open_data(args.data)

        window.controller.jobFinished.connect(load_data_once)
    if args.select and not args.screenshot:

        def select_once(kind: str, outcome: str) -> None:
            if kind == "load":
                window.controller.jobFinished.disconnect(select_once)
                window.controller.set_selection((args.select,))

        window.controller.jobFinished.connect(select_once)
    code = app.exec()
    if offscreen:
        qInstallMessageHandler(previous_handler)
    result = exit_code["code"] if args.screenshot else int(code)
    # A closed window has saved the session and already waited (bounded) for its cancelled
    # jobs; otherwise (screenshot mode) cancel them and wait a little here.
    wait_ms = 0 if window.controller.closing else EXIT_WAIT_MS
    if not window.controller.shutdown(wait_ms):
        _exit_now(result)
    return result


def _exit_now(code: int) -> None:
    """End the process although a worker thread is still inside a non-cancellable call.

    Python cannot interrupt a thread in a long torch call, and Qt's thread pool would wait
    for it forever when it is destroyed on the way out; the session is already saved, so
    leave without the usual clean-up.
    """
    print(
        "workbench: a background job did not stop when cancelled; exiting without waiting",
        file=sys.stderr,
    )
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(gui_main())
