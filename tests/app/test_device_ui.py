"""The window's deployment side: device fit in the live estimate, the deployed check in the
export table (accuracy, latency median/p10-p90, mismatch flag), cost, and ensembles of runs."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from PySide6.QtCore import QItemSelectionModel
from PySide6.QtWidgets import QMessageBox

from app.main_window import MainWindow
from app.style import percent
from app.widgets.jobs_panel import EXPORT_COLUMNS, MISMATCH
from core.recipe.plan import simple_plan

TIMEOUT = 120_000
COL = {title: i for i, (title, _) in enumerate(EXPORT_COLUMNS)}


@pytest.fixture
def window(qtbot, settings):
    w = MainWindow(settings)
    qtbot.addWidget(w)
    w.resize(1280, 800)
    w.show()
    yield w
    w.controller.shutdown()


def wait_idle(qtbot, w: MainWindow) -> None:
    c = w.controller
    qtbot.waitUntil(lambda: c.stats is not None and not c.busy(), timeout=TIMEOUT)


def open_mlp(qtbot, w: MainWindow) -> None:
    w.open_model("demo:mlp")
    wait_idle(qtbot, w)


def compress(qtbot, w: MainWindow, plan) -> None:
    c = w.controller
    c.set_plan(plan)
    with qtbot.waitSignal(c.runRecorded, timeout=TIMEOUT):
        c.compress()
    wait_idle(qtbot, w)  # the evaluation that follows a compress with data
    assert c.evaluation is not None


def write_catalogue(path, devices) -> str:
    base = {"formats": ["packed", "onnx", "onnx-int8"], "dtypes": ["fp32", "int8"]}
    entries = [{"relative_compute": 0.01, **base, **d} for d in devices]
    path.write_text(json.dumps({"format": "workbench.devices", "version": 1, "devices": entries}))
    return str(path)


def cell(w: MainWindow, row: int, title: str):
    return w.results.exports.item(row, COL[title])


def test_device_fit_flips_with_profile_and_measures_activations_once(
    qtbot, window, tmp_path, monkeypatch
):
    import core.session

    calls = []
    real = core.session.peak_activation_bytes

    def counting(module, x):
        calls.append(tuple(x.shape))
        return real(module, x)

    monkeypatch.setattr(core.session, "peak_activation_bytes", counting)
    open_mlp(qtbot, window)
    c = window.controller
    # The shipped catalogue is offered at start, after "none".
    combo = window.device_picker.combo
    assert combo.itemText(0) == "none"
    assert {"mcu", "rpi4", "x86-server"} <= {combo.itemText(i) for i in range(combo.count())}
    assert not window.summary.device.isVisible() and c.device_fit() is None

    path = write_catalogue(
        tmp_path / "devices.json",
        [
            {"name": "tiny-mcu", "memory": "8 KiB", "weight_memory": "32 KiB", "storage": 32768},
            {"name": "big-box", "memory": "1 GiB", "storage": "10 GiB"},
        ],
    )
    assert c.load_devices(path)
    assert [combo.itemText(i) for i in range(combo.count())] == ["none", "tiny-mcu", "big-box"]

    window.device_picker.choose("tiny-mcu")
    fit = c.device_fit()
    text = window.summary.device.text()
    assert window.summary.device.isVisible()
    assert text.startswith("tiny-mcu: does not fit"), text
    # The dense demo MLP's weights (the live estimate's packed bytes) exceed 32 KiB.
    assert fit["weights_bytes"] == c.preview.packed_bytes > 32 * 1024
    assert "weight memory" in window.summary.device.toolTip()
    # Peak activations of one sample, measured once on the example input at batch 1.
    assert fit["activation_bytes"] == real(c.model.module, c.model.example_input[:1]) > 0

    window.device_picker.choose("big-box")
    assert window.summary.device.text().startswith("big-box: fits"), window.summary.device.text()
    assert c.device_fit()["fits"]

    # Back to the tiny device, then compress the plan hard enough: the verdict follows the plan.
    window.device_picker.choose("tiny-mcu")
    c.set_plan(simple_plan(0.9, 2))
    assert c.preview.packed_bytes <= 32 * 1024
    assert window.summary.device.text().startswith("tiny-mcu: fits"), window.summary.device.text()
    # Slider steps re-judge the fit without measuring the activations again.
    for s in (0.5, 0.6, 0.7):
        window.prune_panel.sparsityMoved.emit(s)
    window._flush_drags()
    assert len(calls) == 1 and calls[0][0] == 1

    window.device_picker.choose(None)
    assert not window.summary.device.isVisible() and c.device_fit() is None
    assert window.settings.value("device/name") == ""


def test_loaded_catalogue_and_device_are_remembered(qtbot, window, settings, tmp_path, monkeypatch):
    import app.main_window

    path = write_catalogue(
        tmp_path / "mine.json", [{"name": "tiny-mcu", "memory": "8 KiB", "storage": "8 KiB"}]
    )
    monkeypatch.setattr(app.main_window.QFileDialog, "getOpenFileName", lambda *a, **k: (path, ""))
    window.act_load_devices.trigger()
    window.device_picker.choose("tiny-mcu")
    assert window.controller.device.name == "tiny-mcu"
    again = MainWindow(settings)
    qtbot.addWidget(again)
    try:
        assert again.controller.device is not None and again.controller.device.name == "tiny-mcu"
        assert again.device_picker.current() == "tiny-mcu"
        assert again.device_picker.combo.count() == 2  # "none" + the user's one profile
    finally:
        again.controller.shutdown()


def test_bad_device_catalogue_is_a_dialog(qtbot, window, tmp_path):
    bad = tmp_path / "devices.json"
    bad.write_text('{"format": "workbench.devices", "version": 1, "devices": [{"name": "x"}]}')
    assert not window.controller.load_devices(str(bad))
    boxes = [b for b in window.findChildren(QMessageBox) if b.objectName() == "errorDialog"]
    assert any("missing field" in b.text() and "devices.json" in b.text() for b in boxes)
    assert window.device_picker.combo.count() > 1  # the shipped profiles stay offered


def test_export_table_shows_deployed_check_latency_and_cost(qtbot, window, tmp_path):
    open_mlp(qtbot, window)
    c = window.controller
    window.device_picker.choose("x86-server")
    compress(qtbot, window, simple_plan(0.5, 8))
    out = tmp_path / "out"
    with qtbot.waitSignal(c.exported, timeout=TIMEOUT, check_params_cb=bool):
        c.export(["packed", "onnx"], str(out), price=0.5)
    assert window.results.exports.rowCount() == 2
    for row, rec in enumerate(c.exports):
        dep = rec.deployed
        assert cell(window, row, "Format").text() == rec.format
        assert cell(window, row, "On disk").toolTip() == f"{rec.path.stat().st_size:,} bytes"
        # Deployed accuracy of the file itself, on the held-out split.
        assert dep["samples"] == len(c.test)
        assert cell(window, row, "Deployed acc.").text() == percent(dep["accuracy"], 2)
        assert dep["accuracy"] > 0.9
        # Latency: median (p10-p90) at batch 1, ordered, every measured batch in the tooltip.
        lat = cell(window, row, "Latency median (p10-p90)")
        m = re.fullmatch(r"([\d.e+-]+) ms \(([\d.e+-]+)-([\d.e+-]+)\)", lat.text())
        assert m, lat.text()
        med, p10, p90 = (float(g) for g in m.groups())
        assert 0 < p10 <= med <= p90
        b1 = dep["latency_ms"]["batch_1"]
        assert med == pytest.approx(b1["median"], rel=0.01)
        assert "batch 1:" in lat.toolTip() and "batch 64:" in lat.toolTip()
        assert cell(window, row, "Check").text() == "ok"
    # The report carries the device and cost blocks, and the panel shows them.
    report = json.loads((out / "report.json").read_text())
    assert report["device"]["fits"] and report["device"]["profile"]["name"] == "x86-server"
    cost = report["cost"]
    assert cost["instance_price_per_hour_usd"] == 0.5
    assert cost["before"]["usd_per_million"] > 0 and cost["after"]["usd_per_million"] > 0
    targets = window.results.targets
    assert targets.isVisible()
    assert "device x86-server: fits" in targets.text()
    assert f"${cost['before']['usd_per_million']:.4g} before" in targets.text()
    assert f"${cost['after']['usd_per_million']:.4g} after" in targets.text()
    # A new compression clears the table and the cost line.
    compress(qtbot, window, simple_plan(0.6, 8))
    assert window.results.exports.rowCount() == 0 and not targets.isVisible()


def test_deployed_check_reports_progress_and_cancels(qtbot, window, tmp_path, monkeypatch):
    import threading

    from core.export import deploy

    open_mlp(qtbot, window)
    c = window.controller
    compress(qtbot, window, simple_plan(0.5, 8))
    messages = []
    cancelled = threading.Event()
    check_file = deploy.check_file

    def held_check(*args, **kwargs):
        # The worker waits (at most 30 s) until the window has asked to cancel, so the cancel
        # lands during the checks however fast the machine is.
        cancelled.wait(30)
        return check_file(*args, **kwargs)

    monkeypatch.setattr(deploy, "check_file", held_check)

    def on_progress(kind, _fraction, message):
        messages.append(message)
        if kind == "export" and "checking the deployed" in message and not cancelled.is_set():
            c.cancel_jobs()  # Esc while the exported files are being checked
            cancelled.set()

    c.jobProgressed.connect(on_progress)
    out = tmp_path / "out"
    with qtbot.waitSignal(
        c.jobFinished, timeout=TIMEOUT, check_params_cb=lambda kind, _o: kind == "export"
    ) as blocker:
        c.export(["packed", "onnx", "onnx-int8", "torchscript"], str(out), report=False)
    assert blocker.args == ["export", "cancelled"]
    # (Updates closer than 50 ms are coalesced, so which file is named first may vary.)
    assert any(m.startswith("checking the deployed") for m in messages), messages
    # Cancelled: the folder is untouched (here: never created) and the table stays empty.
    assert not out.exists() and not c.exports
    assert window.results.exports.rowCount() == 0


def _break_onnx(path, factor: float) -> None:
    """Scale the largest weight initializer by ``factor`` (a wrong scale in the file)."""
    model = onnx.load(str(path))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    arr = numpy_helper.to_array(init).copy() * factor
    init.CopyFrom(numpy_helper.from_array(arr.astype(arr.dtype), init.name))
    onnx.save(model, str(path))


def test_broken_export_is_flagged_in_the_table(qtbot, window, tmp_path):
    open_mlp(qtbot, window)
    c = window.controller
    compress(qtbot, window, simple_plan(0.5, 8))
    with qtbot.waitSignal(c.exported, timeout=TIMEOUT, check_params_cb=bool):
        c.export(["onnx"], str(tmp_path / "out"), report=False)
    assert cell(window, 0, "Check").text() == "ok"
    _break_onnx(c.exports[0].path, factor=-10.0)
    with qtbot.waitSignal(c.exported, timeout=TIMEOUT, check_params_cb=bool):
        window.act_recheck.trigger()
    dep = c.exports[0].deployed
    assert dep["deployed_mismatch"] and dep["accuracy"] < dep["simulated_accuracy"] - 0.01
    flag = cell(window, 0, "Check")
    assert flag.text().startswith(MISMATCH)
    assert f"{100 * (dep['accuracy'] - dep['simulated_accuracy']):+.2f} pp" in flag.text()
    assert "model.onnx" in flag.toolTip() and flag.font().bold()
    assert cell(window, 0, "Deployed acc.").text() == percent(dep["accuracy"], 2)


def test_ensemble_of_selected_runs_joins_the_history(qtbot, window):
    open_mlp(qtbot, window)
    c = window.controller
    compress(qtbot, window, simple_plan(0.5, 8))
    compress(qtbot, window, simple_plan(0.8, 4))
    view = window.runs_view
    evaluated = [r for r in c.runs if r.kind == "evaluate"]
    assert len(evaluated) == 2
    sel = view.table.selectionModel()
    flags = QItemSelectionModel.SelectionFlag.Select | QItemSelectionModel.SelectionFlag.Rows
    for run in evaluated:
        sel.select(view.table.model().index(c.runs.index(run), 0), flags)
    assert view.ensemble.isEnabled()
    with qtbot.waitSignal(c.runRecorded, timeout=TIMEOUT) as blocker:
        window.act_ensemble.trigger()
    record = blocker.args[0]
    assert record.kind == "ensemble" and record.members == tuple(r.id for r in evaluated)
    assert record.payload_bytes == sum(r.payload_bytes for r in evaluated)
    assert record.accuracy_after is not None and record.accuracy_after > 0.5
    assert record.accuracy_before == pytest.approx(evaluated[0].accuracy_before)
    row = c.runs.index(record)
    assert view.table.item(row, 1).text() == f"ensemble ({evaluated[0].id}+{evaluated[1].id})"
    # A star on the size-vs-damage scatter at the members' total payload.
    xs, ys = view.ensemble_points.getData()
    assert len(xs) == 1 and xs[0] == pytest.approx(record.payload_bytes / 1024.0)
    assert ys[0] == pytest.approx(100 * (record.accuracy_before - record.accuracy_after))
    # An ensemble has no single plan to restore; saved sessions keep its members.
    view.table.selectRow(row)
    assert not view.restore.isEnabled()
    from core.session import RunRecord

    assert RunRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record
