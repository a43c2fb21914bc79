"""Bad files, start-up imports and closing: the window stays truthful and the app stays usable.

Every bad file is generated here. Opening one must end in a one-line dialog that names the file,
says what is wrong and what to do (the engine's `WorkbenchError` text), never a bare
"Unexpected error"; a genuine bug still gets a dialog, plus its traceback on stderr.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PySide6.QtWidgets import QMessageBox

import app.workers as workers
from app.controller import Controller
from app.main_window import CLOSE_WAIT_MS, MainWindow
from app.workers import JobRunner
from core.base.errors import Cancelled

TIMEOUT = 60_000


# ---------------------------------------------------------------------- generated bad files
def _tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


def _pt2_bytes(tmp: Path) -> bytes:
    path = tmp / "src.pt2"
    torch.export.save(torch.export.export(_tiny(), (torch.randn(2, 6),)), str(path))
    return path.read_bytes()


def _corrupt_member(raw: bytes, member_suffix: str) -> bytes:
    """Flip bytes inside one stored member: the zip directory stays intact, the CRC fails."""
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(member_suffix))
    # The member's data starts after its local header (30 bytes + name + extra field).
    name_len, extra_len = struct.unpack(
        "<HH", raw[info.header_offset + 26 : info.header_offset + 30]
    )
    start = info.header_offset + 30 + name_len + extra_len
    assert info.compress_size >= 4
    out = bytearray(raw)
    for k in range(start, start + min(16, info.compress_size)):
        out[k] ^= 0x5A
    return bytes(out)


def _state_dict_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save(_tiny().state_dict(), buf)
    return buf.getvalue()


def _torchscript_bytes() -> bytes:
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(_tiny()), buf)
    return buf.getvalue()


def _safetensors_bad_header() -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}})
    # Declares a header longer than the file.
    return struct.pack("<Q", len(header) + 500) + header.encode()


def _safetensors_truncated() -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}})
    return struct.pack("<Q", len(header)) + header.encode() + bytes(10)


BAD_MODELS = {
    "random.pt": lambda tmp: np.random.default_rng(0).bytes(4096),
    "empty.pt": lambda tmp: b"",
    "truncated.pt2": lambda tmp: _pt2_bytes(tmp)[: len(_pt2_bytes(tmp)) // 2],
    "crc.pt2": lambda tmp: _corrupt_member(_pt2_bytes(tmp), "model.json"),
    "crc_state_dict.pt": lambda tmp: _corrupt_member(_state_dict_bytes(), "data.pkl"),
    "truncated_state_dict.pt": lambda tmp: _state_dict_bytes()[:-40],
    "plain_pickle.pkl": lambda tmp: pickle.dumps({"weights": [1.0, 2.0], "name": "x"}),
    "header.safetensors": lambda tmp: _safetensors_bad_header(),
    "truncated.safetensors": lambda tmp: _safetensors_truncated(),
    "plain.zip": lambda tmp: _zip_with({"readme.txt": b"hello"}),
    "crc_pickle.ts": lambda tmp: _corrupt_member(_torchscript_bytes(), "data.pkl"),
    "inflate_code.ts": lambda tmp: _corrupt_member(_torchscript_bytes(), "modules/container.py"),
}


def _zip_with(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _npz_compressed_corrupt() -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(1)
    np.savez_compressed(buf, x=rng.random((40, 64), dtype=np.float32), y=np.arange(40) % 10)
    return _corrupt_member(buf.getvalue(), "x.npy")


BAD_DATA = {
    "garbage.npz": lambda: np.random.default_rng(2).bytes(2048),
    "empty.npz": lambda: b"",
    "truncated.npz": lambda: _npz(x=np.zeros((10, 64), np.float32))[:120],
    "wrong_shape.npz": lambda: _npz(x=np.zeros((10, 3), np.float32)),
    "no_x.npz": lambda: _npz(inputs=np.zeros((10, 64), np.float32)),
    "label_count.npz": lambda: _npz(x=np.zeros((10, 64), np.float32), y=np.zeros(7, np.int64)),
    "label_range.npz": lambda: _npz(x=np.zeros((10, 64), np.float32), y=np.full(10, 99)),
    "nan.npz": lambda: _npz(x=np.full((10, 64), np.nan, np.float32)),
    "strings.npz": lambda: _npz(x=np.array(["a", "b"])),
    "crc.npz": lambda: _corrupt_member(_npz(x=np.ones((10, 64), np.float32)), "x.npy"),
    "inflate.npz": _npz_compressed_corrupt,
}

BAD_RECIPES = {
    "syntax.json": b"{not json",
    "empty.json": b"",
    "unknown_key.json": json.dumps({"bogus": 1}).encode(),
    "unknown_nested.json": json.dumps({"default": {"prune": {"amount": 0.5}}}).encode(),
    "wrong_type.json": json.dumps({"default": {"quant": {"bits": "eight"}}}).encode(),
    "list.json": b"[1, 2]",
    "binary.json": np.random.default_rng(3).bytes(200),
    "deep.json": b"[" * 50_000 + b"]" * 50_000,
    "huge_int.json": b'{"default": {"quant": {"bits": 1' + b"0" * 5000 + b"}}}",
}


# ---------------------------------------------------------------------- helpers
@pytest.fixture
def window(qtbot, settings):
    w = MainWindow(settings)
    qtbot.addWidget(w)
    w.resize(1280, 800)
    w.show()
    yield w
    w.controller.shutdown()


def _boxes(w: MainWindow) -> list[QMessageBox]:
    return [
        b for b in w.findChildren(QMessageBox) if b.objectName() == "errorDialog" and b.isVisible()
    ]


def _dialog_after(qtbot, w: MainWindow, action) -> QMessageBox:
    for box in _boxes(w):
        box.close()
    qtbot.waitUntil(lambda: not _boxes(w), timeout=5000)
    action()
    qtbot.waitUntil(lambda: bool(_boxes(w)) and not w.controller.busy(), timeout=TIMEOUT)
    boxes = _boxes(w)
    assert len(boxes) == 1, [b.text() for b in boxes]
    return boxes[0]


def _assert_truthful(box: QMessageBox, path: Path) -> None:
    text = box.text()
    assert str(path) in text, text
    assert "\n" not in text, text
    # An expected bad input is the engine's own one-line error, not the bug path.
    assert "unexpected" not in text.lower(), text
    assert box.detailedText() == "", box.detailedText()[-2000:]
    # What is wrong follows the file, what to do is in the parentheses at the end.
    assert len(text) > len(str(path)) + 10


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------- bad files
#: Bad inputs a core loader still lets through as a non-WorkbenchError (reported to the owners of
#: those modules); the GUI shows its bug-path dialog for them meanwhile.
KNOWN_CORE_GAPS: dict[str, str] = {}


def _cases(names):
    return [
        pytest.param(n, marks=pytest.mark.xfail(reason=KNOWN_CORE_GAPS[n], strict=False))
        if n in KNOWN_CORE_GAPS
        else n
        for n in sorted(names)
    ]


@pytest.mark.parametrize("name", _cases(BAD_MODELS))
def test_bad_model_file_gets_a_truthful_dialog(qtbot, window, tmp_path, name):
    path = _write(tmp_path, name, BAD_MODELS[name](tmp_path))
    box = _dialog_after(qtbot, window, lambda: window.open_model(str(path)))
    assert box.windowTitle() == "Open model failed"
    _assert_truthful(box, path)
    assert window.controller.model is None


def test_directory_as_model_gets_a_truthful_dialog(qtbot, window, tmp_path):
    folder = tmp_path / "weights.pt"
    folder.mkdir()
    box = _dialog_after(qtbot, window, lambda: window.open_model(str(folder)))
    _assert_truthful(box, folder)
    assert "directory" in box.text()


def test_pickled_module_asks_for_trust_instead_of_failing(qtbot, tmp_path):
    path = _write(tmp_path, "module.pt", pickle.dumps(_tiny()))
    c = Controller()
    errors: list[str] = []
    c.errorRaised.connect(lambda title, message, details: errors.append(message))
    with qtbot.waitSignal(c.trustRequested, timeout=TIMEOUT) as asked:
        c.open_model(str(path))
    assert asked.args == [str(path)]
    qtbot.waitUntil(lambda: not c.busy(), timeout=TIMEOUT)
    assert errors == []
    c.shutdown()


@pytest.fixture
def demo_window(qtbot, window):
    window.open_model("demo:mlp")
    c = window.controller
    qtbot.waitUntil(lambda: c.stats is not None and not c.busy(), timeout=TIMEOUT)
    return window


@pytest.mark.parametrize("name", _cases(BAD_DATA))
def test_bad_data_file_gets_a_truthful_dialog(qtbot, demo_window, tmp_path, name):
    path = _write(tmp_path, name, BAD_DATA[name]())
    w = demo_window
    box = _dialog_after(qtbot, w, lambda: w.controller.open_data(str(path)))
    assert box.windowTitle() == "Open data failed"
    _assert_truthful(box, path)
    # The session is intact: the demo model and its built-in data are still there.
    assert w.controller.model is not None and w.controller.train is not None


@pytest.mark.parametrize("name", sorted(BAD_RECIPES))
def test_bad_recipe_gets_a_dialog_and_keeps_the_plan(qtbot, demo_window, tmp_path, name):
    path = _write(tmp_path, name, BAD_RECIPES[name])
    w = demo_window
    before = w.controller.plan
    box = _dialog_after(qtbot, w, lambda: w.controller.load_recipe(str(path)))
    assert box.windowTitle() == "Load recipe"
    assert str(path) in box.text() and "\n" not in box.text()
    assert w.controller.plan == before


def test_unknown_layers_in_recipe_are_refused(qtbot, demo_window, tmp_path):
    from core.recipe.plan import CompressionPlan, LayerConfig

    path = tmp_path / "other_model.json"
    CompressionPlan().with_layer("no.such.layer", LayerConfig()).save(path)
    box = _dialog_after(qtbot, demo_window, lambda: demo_window.controller.load_recipe(str(path)))
    assert str(path) in box.text() and "no.such.layer" in box.text()


# ---------------------------------------------------------------------- genuine bugs
def test_unexpected_exception_in_a_job_still_gets_a_short_dialog(
    qtbot, window, tmp_path, monkeypatch, capfd
):
    import core.session

    path = _write(tmp_path, "fine.safetensors", b"irrelevant")

    def broken(*args, **kwargs):
        raise RuntimeError("simulated engine bug\nwith a second line that stays out")

    monkeypatch.setattr(core.session, "load_model", broken)
    box = _dialog_after(qtbot, window, lambda: window.open_model(str(path)))
    text = box.text()
    assert box.windowTitle() == "Open model failed"
    assert text.startswith(f"{path}: ")
    assert "unexpected RuntimeError: simulated engine bug" in text
    assert "second line" not in text and "\n" not in text
    assert "report" in text  # what to do
    assert "Traceback" in box.detailedText() and "broken" in box.detailedText()
    err = capfd.readouterr().err
    assert "Traceback" in err and "simulated engine bug" in err


def test_unexpected_exception_in_a_result_callback_is_reported(qtbot, window, capfd):
    c = window.controller

    def on_done(result):
        raise KeyError("missing piece")

    finished: list[tuple[str, str]] = []
    c.jobFinished.connect(lambda kind, outcome: finished.append((kind, outcome)))
    box = _dialog_after(
        qtbot, window, lambda: c._start("evaluate", "Evaluating", lambda p, t: 1, on_done)
    )
    assert ("evaluate", "failed") in finished
    assert "unexpected KeyError" in box.text() and "bug" in box.text()
    assert "Traceback" in capfd.readouterr().err


# ---------------------------------------------------------------------- start-up imports
def _make_package(root: Path, name: str) -> None:
    """A package whose second submodule fails on the first import only (a transient failure)."""
    pkg = root / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text(f"import {name}.good\nimport {name}.flaky\n")
    (pkg / "good.py").write_text("VALUE = 42\n")
    flag = root / f"{name}.failed_once"
    (pkg / "flaky.py").write_text(
        "import pathlib\n"
        f"flag = pathlib.Path({str(flag)!r})\n"
        "if not flag.exists():\n"
        "    flag.write_text('x')\n"
        "    raise KeyError('transient failure during import')\n"
    )


def test_failed_import_leaves_no_half_built_modules(tmp_path, monkeypatch, capfd):
    name = f"wb_poison_{time.monotonic_ns()}"
    _make_package(tmp_path, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert workers._import_fresh(name)
        module = sys.modules[name]
        # The retry re-imported `good` too, so the package has it as an attribute again.
        assert module.good.VALUE == 42
    finally:
        for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[mod]


def test_failed_import_is_reported_and_cleaned_up(tmp_path, monkeypatch, capfd):
    name = f"wb_broken_{time.monotonic_ns()}"
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text(f"import {name}.ok\nraise RuntimeError('always broken')\n")
    (pkg / "ok.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert not workers._import_fresh(name)
    assert not [m for m in sys.modules if m == name or m.startswith(name + ".")]
    assert "always broken" in capfd.readouterr().err
    # A module that simply is not installed is no error (optional parts of torch).
    assert not workers._import_fresh(f"{name}_absent")
    assert "absent" not in capfd.readouterr().err


@pytest.fixture
def imports_pending(monkeypatch):
    """Pretend the engine imports have not run yet (nothing to import, so they are instant)."""
    monkeypatch.setattr(workers, "_imported", False)
    monkeypatch.setattr(workers, "WARM_MODULES", ())
    yield


def test_jobs_wait_for_the_start_up_imports(qtbot, imports_pending):
    runner = JobRunner()
    started = threading.Event()
    workers._IMPORT_LOCK.acquire()  # the warm-up is importing
    try:
        runner.submit("load", "waits", lambda p, c: started.set())
        assert not started.wait(0.5), "a job ran while torch's lazy modules were being imported"
    finally:
        workers._IMPORT_LOCK.release()
    assert started.wait(5)
    assert runner.wait(5000)


def test_a_job_waiting_for_the_imports_can_be_cancelled(qtbot, imports_pending):
    runner = JobRunner()
    ran = threading.Event()
    workers._IMPORT_LOCK.acquire()
    try:
        with qtbot.waitSignal(runner.jobFailed, timeout=5000) as failed:
            handle = runner.submit("load", "waits", lambda p, c: ran.set())
            time.sleep(0.2)
            handle.cancel()
        assert isinstance(failed.args[1], Cancelled)
    finally:
        workers._IMPORT_LOCK.release()
    assert runner.wait(5000)
    assert not ran.is_set()


# ---------------------------------------------------------------------- closing
def test_closing_with_a_stuck_job_returns_promptly(qtbot, settings):
    w = MainWindow(settings)
    qtbot.addWidget(w)
    w.show()
    c = w.controller
    release = threading.Event()
    entered = threading.Event()
    results: list[object] = []

    def stuck(progress, cancel):
        entered.set()
        release.wait(30)  # a non-cancellable call: never looks at `cancel`
        return "late"

    c._start("export", "Stuck export", stuck, results.append)
    assert entered.wait(10)
    handle = c.runner.running()[0]
    try:
        t0 = time.perf_counter()
        w.close()
        took = time.perf_counter() - t0
        assert w.isHidden()
        assert took < CLOSE_WAIT_MS / 1000 + 1.5, took
        assert handle.token.cancelled
        assert c.closing and not c.shutdown(0)
        assert settings.value("window/geometry") is not None  # the session was saved first
    finally:
        release.set()
    assert c.runner.wait(10_000)
    qtbot.wait(50)
    # The late result of a closed session is dropped, not applied.
    assert results == []


def test_the_application_settles_the_heap_after_each_analysis(qtbot, settings):
    """With ``settle_heap`` on (as `app.__main__` sets it), each analysis ends with a frozen
    heap (no long full collections during the drags that follow), and a model replaced by
    the next one is still freed: the next analysis thaws and collects first."""
    import gc
    import weakref

    w = MainWindow(settings)
    qtbot.addWidget(w)
    c = w.controller
    c.settle_heap = True
    try:
        gc.unfreeze()
        w.open_model("demo:mlp")
        qtbot.waitUntil(lambda: c.stats is not None and not c.busy(), timeout=TIMEOUT)
        assert gc.get_freeze_count() > 0
        module = c.model.module
        module.__dict__["_cycle"] = module  # a cycle: only a full pass frees it
        first = weakref.ref(module)
        del module
        w.open_model("demo:cnn")
        qtbot.waitUntil(
            lambda: c.stats is not None and c.stats.source == "demo:cnn" and not c.busy(),
            timeout=TIMEOUT,
        )
        assert first() is None
        assert gc.get_freeze_count() > 0
    finally:
        c.shutdown()
        gc.unfreeze()
