"""The real main window, driven offscreen: open, drag, compress, cancel, fail, restore."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PySide6.QtCore import QTimer
from PySide6.QtGui import QImage
from PySide6.QtWidgets import QMessageBox

from app.main_window import MainWindow
from app.style import percent
from app.widgets.layer_table import COLUMNS
from app.widgets.prune_panel import threshold_to_position
from app.widgets.summary_panel import summary_texts
from core import RESOURCES
from core.analysis.estimate import preview
from core.analysis.inventory import inventory
from core.io.model_io import load_model
from core.recipe.plan import CompressionPlan, RecoveryConfig, simple_plan
from tests.models import make

TIMEOUT = 60_000


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory) -> Path:
    """A generated (non-demo) model saved as TorchScript, as a user would bring it."""
    model, _ = make("resnet")
    path = tmp_path_factory.mktemp("models") / "resnet.ts.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    return path


@pytest.fixture
def window(qtbot, settings):
    w = MainWindow(settings)
    qtbot.addWidget(w)
    w.resize(1280, 800)
    w.show()
    yield w
    w.controller.shutdown()


def wait_ready(qtbot, w: MainWindow, timeout: int = TIMEOUT) -> None:
    c = w.controller
    qtbot.waitUntil(lambda: c.stats is not None and not c.busy(), timeout=timeout)


def open_ready(qtbot, w: MainWindow, source) -> None:
    w.open_model(str(source))
    wait_ready(qtbot, w)


def error_boxes(w: MainWindow) -> list[QMessageBox]:
    return [
        b for b in w.findChildren(QMessageBox) if b.objectName() == "errorDialog" and b.isVisible()
    ]


def assert_summary_matches_engine(w: MainWindow):
    """The panel shows exactly the engine's numbers for the controller's current plan."""
    c = w.controller
    expected = preview(c.stats, c.plan)
    assert w.summary.texts() == summary_texts(expected, c.baseline_bytes)
    assert c.preview == expected
    table = w.layer_table.model
    for row in range(table.rowCount()):
        layer = table.layer(row)
        lp = next((p for p in expected.layers if p.name == layer.name), None)
        if lp is not None:
            assert table.index(row, 3).data() == percent(lp.sparsity)
    return expected


def test_opens_a_generated_torchscript_model(qtbot, window, resnet_file):
    open_ready(qtbot, window, resnet_file)
    layers = inventory(load_model(resnet_file))
    table = window.layer_table.model
    assert [table.layer(r).name for r in range(table.rowCount())] == [x.name for x in layers]
    assert "resnet.ts.pt" in window.windowTitle()
    assert [a.toolTip() for a in window.recent_menu.actions()] == [str(resnet_file)]
    shown = window.controller.selection[0]
    assert window.histograms._stats.layer.name == shown
    # No data for a user model: the gradient plot explains how to get one.
    assert window.histograms.grad_stack.currentWidget() is window.histograms.grad_hint
    window.layer_table.filter_edit.setText("bn")
    visible = {
        window.layer_table.proxy.index(r, 0).data()
        for r in range(window.layer_table.proxy.rowCount())
    }
    assert visible and all("bn" in name for name in visible)


def test_sparsity_slider_updates_summary_with_engine_numbers(qtbot, window, resnet_file):
    open_ready(qtbot, window, resnet_file)
    c = window.controller
    assert c.target == "model"
    window.prune_panel.sparsity.setValue(600)
    assert c.plan.default.prune.method == "magnitude"
    assert c.plan.default.prune.sparsity == pytest.approx(0.6)
    expected = assert_summary_matches_engine(window)
    assert expected.sparsity == pytest.approx(0.6, abs=1e-3)
    window.quant_panel.bits.setValue(5)
    expected = assert_summary_matches_engine(window)
    assert all(lp.bits == 5 for lp in expected.layers if not lp.skip)
    # Per-channel scales (the shared default) cost a visible share of this tiny model's bytes.
    assert all(lp.per_channel and not lp.symmetric for lp in expected.layers if not lp.skip)
    assert expected.compression_ratio > 4


def test_threshold_line_and_slider_stay_in_sync(qtbot, window, resnet_file):
    open_ready(qtbot, window, resnet_file)
    c = window.controller
    c.set_selection(("block.conv1",))
    view = window.histograms
    assert view.lines[0].isVisible()
    # What a mouse drag does: move the line, which emits sigPositionChanged.
    view.lines[0].setValue(0.05)
    prune = c.plan.default.prune
    assert (prune.method, prune.mode, prune.threshold) == ("magnitude", "threshold", 0.05)
    assert view.lines[1].value() == pytest.approx(-0.05)
    tmax = window._threshold_max()
    assert window.prune_panel.threshold.value() == threshold_to_position(0.05, tmax)
    expected = assert_summary_matches_engine(window)
    lp = expected.layer("block.conv1")
    stats = c.stats.tensors["block.conv1"]
    assert lp.nnz == lp.numel - stats.scores["magnitude"].count_below(0.05)
    lo, hi = view.band.getRegion()
    assert (lo, hi) == (pytest.approx(-lp.threshold), pytest.approx(lp.threshold))

    # And the other way: the slider moves the lines to the threshold the engine applies.
    window.prune_panel.threshold.setValue(400)
    expected = assert_summary_matches_engine(window)
    applied = expected.layer("block.conv1").threshold
    assert view.lines[0].value() == pytest.approx(applied)
    assert view.lines[1].value() == pytest.approx(-applied)


def test_a_drag_is_one_undo_step(qtbot, window, resnet_file):
    open_ready(qtbot, window, resnet_file)
    c = window.controller
    empty = c.plan
    for value in (100, 200, 300):
        window.prune_panel.sparsity.setValue(value)
    window.prune_panel.editFinished.emit()
    dragged = c.plan
    window.quant_panel.bits.setValue(4)
    assert c.plan.default.quant.bits == 4
    window.act_undo.trigger()
    assert c.plan == dragged
    window.act_undo.trigger()
    assert c.plan == empty
    assert not window.act_undo.isEnabled()
    window.act_redo.trigger()
    assert c.plan.default.prune.sparsity == pytest.approx(0.3)
    assert window.prune_panel.sparsity.value() == 300
    assert_summary_matches_engine(window)


def test_selected_layer_scope_makes_overrides(qtbot, window, resnet_file):
    open_ready(qtbot, window, resnet_file)
    c = window.controller
    window.layer_table.select_names(("fc",))
    window.layer_table._on_view_selectionChanged()
    assert c.selection == ("fc",)
    window.scope.setCurrentIndex(window.scope.findData("selection"))
    window.prune_panel.sparsity.setValue(500)
    assert c.plan.default.prune.method == "none"
    assert c.plan.config_for("fc").prune.sparsity == pytest.approx(0.5)
    expected = assert_summary_matches_engine(window)
    assert expected.layer("fc").sparsity == pytest.approx(0.5, abs=0.02)
    assert expected.layer("stem").sparsity == 0.0
    window.prune_panel.skip.setChecked(True)
    assert assert_summary_matches_engine(window).layer("fc").skip
    window.prune_panel.reset.click()
    assert "fc" not in c.plan.layer_overrides


def test_log_axis_line_drag_sets_the_magnitude_threshold(qtbot, window, resnet_file):
    import math

    open_ready(qtbot, window, resnet_file)
    c = window.controller
    c.set_selection(("pw",))
    view = window.histograms
    window.prune_panel.sparsity.setValue(200)
    view.abs_axis.setChecked(True)
    assert view.lines[0].isVisible() and not view.lines[1].isVisible()
    view.lines[0].setValue(math.log10(0.02))
    prune = c.plan.default.prune
    assert prune.mode == "threshold" and prune.threshold == pytest.approx(0.02)
    lp = assert_summary_matches_engine(window).layer("pw")
    assert view.band.getRegion()[1] == pytest.approx(math.log10(lp.threshold))


def test_compress_runs_in_a_worker_and_reports(qtbot, window):
    open_ready(qtbot, window, "demo:mlp")
    c = window.controller
    c.set_plan(simple_plan(0.5, 8, "magnitude"))
    with qtbot.waitSignal(
        c.jobFinished, timeout=TIMEOUT, check_params_cb=lambda kind, outcome: kind == "compress"
    ) as blocker:
        window.act_compress.trigger()
        assert c.busy("compress")
    assert blocker.args == ["compress", "done"]
    assert c.result is not None and c.result.sparsity == pytest.approx(0.5, abs=1e-3)
    assert window.histograms._after is not None
    # Demo data is loaded, so evaluation follows on its own.
    qtbot.waitUntil(lambda: c.evaluation is not None, timeout=TIMEOUT)
    after = c.evaluation.after
    assert after.accuracy is not None and after.accuracy > 0.9
    row = [k for k, _, _ in window.results.EVAL_ROWS].index("accuracy")
    assert window.results.table.item(row, 1).text() == percent(after.accuracy, 2)
    assert window.act_export.isEnabled()
    assert window.results.stale.isHidden()
    window.quant_panel.bits.setValue(4)
    assert not window.results.stale.isHidden()


def _start_long_finetune(qtbot, window):
    open_ready(qtbot, window, "demo:mlp")
    c = window.controller
    c.set_plan(simple_plan(0.8, 6).with_recovery(RecoveryConfig(epochs=500)))
    window.act_compress.trigger()
    qtbot.waitUntil(lambda: window.job_status.bar.value() > 0, timeout=TIMEOUT)
    return c


def test_event_loop_keeps_running_during_a_long_job(qtbot, window):
    c = _start_long_finetune(qtbot, window)
    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    qtbot.wait(1000)
    timer.stop()
    assert c.busy("compress"), "the job should still be running"
    assert len(ticks) >= 30
    gaps = [b - a for a, b in zip(ticks, ticks[1:], strict=False)]
    assert max(gaps) < 0.5
    c.cancel_jobs()


def test_cancel_a_running_job(qtbot, window):
    c = _start_long_finetune(qtbot, window)
    assert window.job_status.cancel.isEnabled()
    with qtbot.waitSignal(c.jobFinished, timeout=TIMEOUT) as blocker:
        window.job_status.cancel.click()
    assert blocker.args == ["compress", "cancelled"]
    assert c.result is None
    assert not c.busy()
    assert not window.job_status.cancel.isEnabled()
    # Still usable: a new edit previews at once.
    window.prune_panel.sparsity.setValue(300)
    assert_summary_matches_engine(window)


def test_a_new_compress_supersedes_the_running_one(qtbot, window):
    c = _start_long_finetune(qtbot, window)
    c.set_plan(simple_plan(0.3, None))
    finished = []
    c.jobFinished.connect(lambda kind, outcome: finished.append((kind, outcome)))
    c.compress()
    qtbot.waitUntil(lambda: ("compress", "done") in finished, timeout=TIMEOUT)
    assert finished[0] == ("compress", "cancelled")
    assert c.result.plan == c.plan


def test_bad_file_shows_the_engines_message(qtbot, window, tmp_path):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"\x00not a model" * 10)
    window.open_model(str(bad))
    qtbot.waitUntil(lambda: bool(error_boxes(window)), timeout=TIMEOUT)
    box = error_boxes(window)[0]
    assert "broken.pt" in box.text()
    box.accept()
    # The app stays usable.
    open_ready(qtbot, window, "demo:cnn")
    assert window.controller.model.source == "demo:cnn"


def test_recipe_round_trip_and_bad_recipe(qtbot, window, tmp_path):
    open_ready(qtbot, window, "demo:mlp")
    c = window.controller
    c.set_plan(simple_plan(0.75, 5, "magnitude"))
    path = tmp_path / "r.json"
    assert c.save_recipe(str(path))
    c.set_plan(CompressionPlan())
    c.load_recipe(str(path))
    assert c.plan == CompressionPlan.load(path)
    assert window.prune_panel.sparsity.value() == 750
    bad = tmp_path / "bad.json"
    bad.write_text('{"default": {"quant": {"bits": 40}}}')
    c.load_recipe(str(bad))
    qtbot.waitUntil(lambda: bool(error_boxes(window)), timeout=5000)
    assert "default.quant.bits" in error_boxes(window)[0].text()


def test_export_writes_files_and_refuses_silent_overwrite(qtbot, window, tmp_path):
    open_ready(qtbot, window, "demo:mlp")
    c = window.controller
    c.set_plan(simple_plan(0.9, 4))
    with qtbot.waitSignal(c.resultReady, timeout=TIMEOUT):
        c.compress()
    out = tmp_path / "out"
    with qtbot.waitSignal(c.exported, timeout=TIMEOUT, check_params_cb=bool):
        c.export(["packed"], str(out), report=False)
    record = c.exports[0]
    assert record.path.is_file() and record.bytes_on_disk == record.path.stat().st_size
    assert window.results.exports.rowCount() == 1
    c.export(["packed"], str(out), report=False)
    qtbot.waitUntil(lambda: bool(error_boxes(window)), timeout=TIMEOUT)
    assert "already exists" in error_boxes(window)[0].text()


def test_layout_and_session_are_restored(qtbot, settings):
    first = MainWindow(settings)
    qtbot.addWidget(first)
    first.show()
    open_ready(qtbot, first, "demo:cnn")
    first.controller.set_plan(simple_plan(0.5, 6))
    first.histograms.log_counts.setChecked(False)
    first.jobs_dock.hide()
    first.close()
    assert settings.value("session/model") == "demo:cnn"
    assert CompressionPlan.from_json(settings.value("session/plan")) == simple_plan(0.5, 6)
    second = MainWindow(settings)
    qtbot.addWidget(second)
    assert second.restored_geometry
    assert second.jobs_dock.isHidden() and not second.layers_dock.isHidden()
    assert not second.histograms.log_counts.isChecked()
    second.controller.shutdown()


def test_screenshot_command_writes_a_png(qtbot, tmp_path):
    from app.__main__ import gui_main

    recipe = tmp_path / "quick.json"
    simple_plan(0.6, 6).save(recipe)
    png = tmp_path / "shot.png"
    code = gui_main(
        [
            "demo:cnn",
            "--screenshot",
            str(png),
            "--recipe",
            str(recipe),
            "--select",
            "conv2",
            "--settings",
            str(tmp_path / "s.ini"),
        ]
    )
    assert code == 0
    image = QImage(str(png))
    assert image.width() >= 1280 and image.height() >= 800


def test_a_taken_screenshot_is_not_reported_failed_by_its_time_out(qtbot, window, tmp_path):
    """The screenshot's time-out was armed for good: minutes after a successful shot it
    reported a failure (in `gui_main`: "screenshot failed" and the application asked to exit
    with code 1), into whatever ran then."""
    saved: list[str] = []
    window.screenshotSaved.connect(saved.append)
    png = tmp_path / "shot.png"
    t0 = time.perf_counter()
    window.take_screenshot_when_ready(str(png), compress=False, timeout_s=6.0)
    window.open_model("demo:mlp")
    qtbot.waitUntil(lambda: bool(saved), timeout=60_000)
    assert saved == [str(png)] and png.is_file()
    qtbot.waitUntil(lambda: time.perf_counter() - t0 > 6.5, timeout=10_000)  # past the time-out
    qtbot.wait(200)
    assert saved == [str(png)]


def test_open_data_records_gradients_and_shows_their_histogram(qtbot, window, tmp_path):
    from core.io.data import digits_split

    open_ready(qtbot, window, "demo:mlp")
    c = window.controller
    train, _ = digits_split("flat")
    data = tmp_path / "unlabelled.npz"
    import numpy as np

    np.savez(data, x=train.x[:300].numpy())  # no y: the model's own predictions label it
    # Dropped on the window as a file manager would.
    from PySide6.QtCore import QMimeData, QPointF, Qt, QUrl
    from PySide6.QtGui import QDropEvent

    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(data))])
    drop = QDropEvent(
        QPointF(20, 20),
        Qt.DropAction.CopyAction,
        mime,
        Qt.MouseButton.NoButton,
        Qt.KeyboardModifier.NoModifier,
    )
    window.dropEvent(drop)
    qtbot.waitUntil(
        lambda: c.data_name == "unlabelled.npz" and c.stats is not None and not c.busy(),
        timeout=TIMEOUT,
    )
    assert c.stats.has_gradients
    assert len(c.train) + len(c.test) == 300
    assert window.histograms.grad_stack.currentWidget() is window.histograms.grad_plot
    assert "unlabelled.npz" in window.data_label.text()
    idx = window.prune_panel.method.findData("taylor")
    assert window.prune_panel.method.model().item(idx).isEnabled()


def test_weights_only_checkpoint_compresses_but_cannot_run(qtbot, window, tmp_path):
    from safetensors.torch import save_file

    model, _ = make("encoder")
    path = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    open_ready(qtbot, window, path)
    c = window.controller
    assert c.model.weights_only and c.train is None
    assert "weights only" in window.windowTitle()
    window.prune_panel.sparsity.setValue(500)
    with qtbot.waitSignal(c.resultReady, timeout=TIMEOUT):
        window.act_compress.trigger()
    assert not window.act_evaluate.isEnabled() and not window.act_finetune.isEnabled()
    assert window.act_export.isEnabled()


def test_shortcuts_drive_the_plan(qtbot, window, resnet_file):
    from PySide6.QtCore import Qt

    open_ready(qtbot, window, resnet_file)
    c = window.controller
    window.quant_panel.bits.setValue(6)
    window.activateWindow()
    qtbot.keyClick(window, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier)
    assert c.plan.default.quant.bits is None
    qtbot.keyClick(
        window,
        Qt.Key.Key_Z,
        Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.ShiftModifier,
    )
    assert c.plan.default.quant.bits == 6
    assert window.act_compress.shortcut().toString() == "Ctrl+R"
    assert window.act_export.shortcut().toString() == "Ctrl+E"


def test_plots_follow_a_dark_palette(qtbot, window):
    from PySide6.QtGui import QColor, QPalette
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance()
    old = app.palette()
    dark = QPalette(old)
    dark.setColor(QPalette.ColorRole.Base, QColor(30, 30, 30))
    dark.setColor(QPalette.ColorRole.Text, QColor(230, 230, 230))
    try:
        app.setPalette(dark)
        qtbot.waitUntil(
            lambda: window.histograms.plot.backgroundBrush().color() == QColor(30, 30, 30),
            timeout=5000,
        )
        assert window.size_view.plot.backgroundBrush().color() == QColor(30, 30, 30)
    finally:
        app.setPalette(old)


def test_pickle_asks_for_trust_before_running_it(qtbot, window, tmp_path, monkeypatch):
    model, _ = make("encoder")
    path = tmp_path / "pickled.pt"
    torch.save(model, str(path))
    asked = []

    def answer(parent, title, text, *args):
        asked.append(text)
        return QMessageBox.StandardButton.Open

    monkeypatch.setattr(QMessageBox, "warning", answer)
    window.open_model(str(path))
    qtbot.waitUntil(lambda: bool(asked), timeout=TIMEOUT)
    assert "pickled.pt" in asked[0] and "runs code" in asked[0]
    wait_ready(qtbot, window)
    assert window.controller.model.source == str(path)


def test_bad_recipe_on_the_command_line_exits_2(tmp_path, capsys):
    from app.__main__ import gui_main

    recipe = tmp_path / "bad.json"
    recipe.write_text('{"default": {"prune": {"sparsity": 1.5}}}')
    assert gui_main(["demo:mlp", "--recipe", str(recipe)]) == 2
    assert "default.prune.sparsity" in capsys.readouterr().err


def test_data_that_does_not_fit_the_model_is_refused_in_a_dialog(qtbot, window, tmp_path):
    import numpy as np

    open_ready(qtbot, window, "demo:mlp")
    c = window.controller
    bad = tmp_path / "wrong_shape.npz"
    np.savez(bad, x=np.zeros((20, 5), dtype=np.float32))
    window.controller.open_data(str(bad))
    qtbot.waitUntil(lambda: bool(error_boxes(window)), timeout=TIMEOUT)
    box = error_boxes(window)[0]
    assert "wrong_shape.npz" in box.text() and "cannot run" in box.text()
    box.accept()
    assert c.train is None or c.data_name != "wrong_shape.npz"
    labels = tmp_path / "labels_high.npz"
    np.savez(labels, x=np.zeros((20, 64), dtype=np.float32), y=np.full(20, 12))
    window.controller.open_data(str(labels))
    qtbot.waitUntil(lambda: bool(error_boxes(window)), timeout=TIMEOUT)
    box = error_boxes(window)[0]
    assert "12" in box.text() and "labels_high.npz" in box.text()
    box.accept()
    assert c.data_name != "labels_high.npz"


def test_unlabelled_data_for_a_non_classifier_is_accepted(qtbot, window, tmp_path):
    import numpy as np

    model, x = make("gru")
    path = tmp_path / "tagger.ts.pt"
    torch.jit.save(torch.jit.trace(model, x), str(path))
    open_ready(qtbot, window, path)
    data = tmp_path / "tagger_x.npz"
    np.savez(data, x=torch.randn(40, 12, 6).numpy())
    c = window.controller
    c.open_data(str(data))
    qtbot.waitUntil(lambda: c.data_name == "tagger_x.npz" and not c.busy(), timeout=TIMEOUT)
    assert c.train is not None and c.train.y is None
    qtbot.waitUntil(lambda: c.stats is not None and not c.busy(), timeout=TIMEOUT)
    assert not error_boxes(window)
    assert not c.stats.has_gradients


def test_compress_reproduces_the_cli_for_the_same_recipe(qtbot, window, tmp_path):
    """Iterative compression + distillation from a recipe: same packed bytes and accuracy
    as ``workbench compress`` (the shipped demo recipe, shortened to stay fast)."""
    from core.cli.main import main as cli_main

    shipped = CompressionPlan.load(RESOURCES / "recipes" / "demo_mlp.json")
    plan = shipped.with_recovery(replace(shipped.recovery, epochs=1, prune_steps=3))
    recipe = tmp_path / "short.json"
    plan.save(recipe)
    cli_out = tmp_path / "cli"
    args = ["compress", "demo:mlp", "--recipe", str(recipe), "--out", str(cli_out), "--quiet"]
    assert cli_main(args) == 0
    report = json.loads((cli_out / "report.json").read_text())

    open_ready(qtbot, window, "demo:mlp")
    c = window.controller
    c.load_recipe(str(recipe))
    assert window.recovery.prune_steps.value() == 3
    assert window.recovery.batch_size.value() == plan.recovery.batch_size
    assert window.quant_panel.bias_bits.currentData() == 8
    with qtbot.waitSignal(c.resultReady, timeout=TIMEOUT, check_params_cb=bool):
        c.compress()
    qtbot.waitUntil(lambda: c.evaluation is not None, timeout=TIMEOUT)
    assert c.evaluation.after.accuracy == pytest.approx(report["accuracy_after"], abs=1e-9)
    gui_out = tmp_path / "gui"
    with qtbot.waitSignal(c.exported, timeout=TIMEOUT, check_params_cb=bool):
        c.export(["packed"], str(gui_out), report=False)
    assert c.exports[0].bytes_on_disk == report["compressed_bytes"]
    assert c.result.sparsity == pytest.approx(report["sparsity"], abs=1e-12)


def test_prune_steps_and_bias_bits_controls_edit_the_plan(qtbot, window):
    open_ready(qtbot, window, "demo:mlp")
    c = window.controller
    window.recovery.epochs.setValue(2)
    assert window.recovery.prune_steps.isEnabled()
    window.recovery.prune_steps.setValue(4)
    assert c.plan.recovery == RecoveryConfig(epochs=2, prune_steps=4)
    combo = window.quant_panel.bias_bits
    combo.setCurrentIndex(combo.findData(8))
    assert c.plan.default.quant.bias_bits == 8
    assert c.preview is not None
    c.undo()
    assert c.plan.default.quant.bias_bits is None
    assert combo.currentData() is None


def test_group_size_rounding_and_bias_correction_controls_edit_the_plan(qtbot, window):
    """The quantizer registry's rounding rules, group sizes and bias correction are plan edits
    from the window (undoable), and the panel shows a loaded config."""
    from core.base.methods import quantizers

    open_ready(qtbot, window, "demo:mlp")
    c = window.controller
    q = window.quant_panel
    q.bits.setValue(4)
    q.per_channel.setChecked(False)
    assert [q.method.itemData(i) for i in range(q.method.count())] == [m.name for m in quantizers()]
    q.group_size.setCurrentIndex(q.group_size.findData(64))
    assert c.plan.default.quant.group_size == 64
    assert c.plan.default.quant.per_channel  # groups refine per-channel scales
    assert q.per_channel.isChecked()
    q.per_channel.setChecked(False)  # dropping per-channel drops the groups
    assert c.plan.default.quant.group_size is None
    assert q.group_size.currentData() is None
    q.method.setCurrentIndex(q.method.findData("gptq"))
    assert c.plan.default.quant.method == "gptq"
    q.bias_correction.setChecked(True)
    assert c.plan.default.quant.bias_correction
    c.undo()
    assert not c.plan.default.quant.bias_correction
    assert not q.bias_correction.isChecked()
    c.undo()
    assert c.plan.default.quant.method == "rtn"
    assert q.method.currentData() == "rtn"


def test_model_wide_channel_pruning_keeps_the_logits_layer(qtbot, window):
    from core.compress.engine import protect_output_layer

    open_ready(qtbot, window, "demo:mlp")
    c = window.controller
    assert c.output_layer == "fc3"
    method = window.prune_panel.method
    method.setCurrentIndex(method.findData("channel_l2"))
    window.prune_panel.sparsity.setValue(500)
    window.prune_panel.editFinished.emit()
    plan = c.plan
    # The same plan the CLI compresses (it applies the engine's rule to the recipe).
    bare = CompressionPlan(default=plan.default, recovery=plan.recovery)
    assert plan == protect_output_layer(bare, c.model, c.layers)
    assert plan.config_for("fc3").prune.method == "none"
    by_name = {lp.name: lp for lp in c.preview.layers}
    assert by_name["fc3"].sparsity == 0.0 and by_name["fc1"].sparsity > 0.4
    table = window.layer_table.model
    col = COLUMNS.index("Sparsity")
    shown = {n: table.index(table.row_of(n), col).data() for n in ("fc1", "fc3")}
    assert shown["fc3"] == percent(0.0) != shown["fc1"]
    # Back to unstructured: the exemption goes, the output layer follows the default again.
    method.setCurrentIndex(method.findData("magnitude"))
    assert "fc3" not in c.plan.layer_overrides


def test_demo_recipes_menu_opens_the_demo_with_its_recipe(qtbot, window):
    titles = [a.text() for a in window.demo_recipes_menu.actions()]
    assert any("demo:cnn" in t for t in titles) and any("demo:mlp" in t for t in titles)
    act = next(a for a in window.demo_recipes_menu.actions() if "demo:cnn" in a.text())
    act.trigger()
    wait_ready(qtbot, window)
    assert window.controller.model.source == "demo:cnn"
    assert window.controller.plan == CompressionPlan.load(RESOURCES / "recipes" / "demo_cnn.json")


def test_compress_without_data_skips_recovery_and_is_not_stale(qtbot, window, resnet_file):
    open_ready(qtbot, window, resnet_file)
    c = window.controller
    c.set_plan(simple_plan(0.5, 8).with_recovery(RecoveryConfig(epochs=3, prune_steps=2)))
    with qtbot.waitSignal(c.resultReady, timeout=TIMEOUT, check_params_cb=bool):
        c.compress()
    assert c.result.plan.recovery.epochs == 0
    assert not c.result_stale and window.results.stale.isHidden()
    assert "Fine-tuning skipped" in window.statusBar().currentMessage()


def test_drag_edits_are_throttled_and_the_last_step_lands(qtbot, window):
    """A fast slider drag: the first step applies at once, the rest are coalesced, the final
    value always lands and the whole drag is one undo step; Ctrl+Y redoes."""
    from core.recipe.edits import SetPruneTarget

    open_ready(qtbot, window, "demo:mlp")
    c = window.controller
    seen = []
    c.planChanged.connect(lambda plan: seen.append(plan.default.prune.sparsity))
    for i in range(1, 41):
        window._edit(SetPruneTarget, drag=True, mode="sparsity", value=i / 50)
    assert len(seen) < 40  # coalesced, not one re-plan per mouse move
    window._end_drag()
    assert c.plan.default.prune.sparsity == pytest.approx(0.8)
    window._undo()
    assert c.plan.default.prune.sparsity == 0.0
    assert any(k.toString() == "Ctrl+Y" for k in window.act_redo.shortcuts())
    window.act_redo.trigger()
    assert c.plan.default.prune.sparsity == pytest.approx(0.8)


def test_window_and_cli_start_from_the_same_defaults(qtbot, window):
    """The first slider moves in the window mean what --sparsity/--bits mean on the CLI."""
    from core.recipe.plan import simple_plan

    open_ready(qtbot, window, "demo:mlp")
    window.prune_panel.sparsity.setValue(700)
    window.quant_panel.bits.setValue(5)
    window._flush_drags()
    assert window.controller.plan.default == simple_plan(0.7, 5).default
