"""Widget-level behaviour that needs no engine job: levels, sliders, line drag, dialogs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.widgets.export_dialog import ExportDialog, existing_outputs
from app.widgets.histogram_view import HistogramView, quant_levels
from app.widgets.prune_panel import (
    THRESHOLD_STEPS,
    PrunePanel,
    position_to_threshold,
    threshold_to_position,
)
from app.widgets.quant_panel import QuantPanel
from core.ops.quantization import quantize
from core.recipe.plan import PruneConfig, QuantConfig


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
@pytest.mark.parametrize("symmetric", [True, False])
def test_drawn_levels_are_the_engines_grid(bits, symmetric):
    """Every value the engine's quantizer produces is one of the levels the plot draws."""
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(64, 32, generator=g) * 0.1 + 0.02
    q = quantize(w, bits, symmetric=symmetric, per_channel=False)
    produced = np.unique(q.dequantize().numpy())
    levels = quant_levels(float(w.min()), float(w.max()), bits, symmetric)
    assert levels.size == (2**bits - 1 if symmetric else 2**bits)
    nearest = np.abs(produced[:, None] - levels[None, :]).min(axis=1)
    assert nearest.max() < 1e-6


def test_threshold_slider_mapping_round_trips():
    tmax = 0.73
    for pos in (0, 1, 17, 500, THRESHOLD_STEPS):
        assert threshold_to_position(position_to_threshold(pos, tmax), tmax) == pos
    assert threshold_to_position(10.0, tmax) == THRESHOLD_STEPS


def test_prune_panel_writes_without_echo_and_emits_on_user_moves(qtbot):
    panel = PrunePanel()
    qtbot.addWidget(panel)
    moved = []
    panel.sparsityMoved.connect(moved.append)
    panel.set_config(
        PruneConfig(method="magnitude", sparsity=0.5),
        skip=False,
        threshold_max=1.0,
        shown_threshold=0.1,
        has_gradients=False,
        whole_model=True,
        has_override=False,
    )
    assert moved == []
    assert panel.sparsity.value() == 500
    assert panel.sparsity_label.text() == "50.0 %"
    # Gradient criteria are offered but disabled until gradients exist.
    model = panel.method.model()
    idx = panel.method.findData("taylor")
    assert not model.item(idx).isEnabled()
    panel.sparsity.setValue(731)
    assert moved == [pytest.approx(0.731)]


def test_quant_panel_off_position_means_no_quantization(qtbot):
    panel = QuantPanel()
    qtbot.addWidget(panel)
    seen = []
    panel.bitsMoved.connect(seen.append)
    panel.set_config(QuantConfig(bits=6))
    assert panel.bits_label.text() == "6 bit"
    panel.bits.setValue(panel.bits.minimum())
    panel.bits.setValue(4)
    assert seen == [None, 4]
    assert panel.symmetric.isEnabled()


def test_histogram_without_gradients_shows_the_hint(qtbot):
    view = HistogramView()
    qtbot.addWidget(view)
    view.set_layer(None)
    assert view.grad_stack.currentWidget() is view.grad_hint
    assert "Open data" in view.grad_hint.text()


def test_export_dialog_asks_before_overwriting(qtbot, tmp_path, monkeypatch):
    (tmp_path / "model.packed.safetensors").write_bytes(b"old")
    dialog = ExportDialog(("packed", "onnx"), directory=str(tmp_path), checked=("packed",))
    qtbot.addWidget(dialog)
    assert existing_outputs(tmp_path, ["packed"]) == [tmp_path / "model.packed.safetensors"]
    assert existing_outputs(tmp_path, ["onnx"]) == []
    asked = []
    monkeypatch.setattr(dialog, "confirm_overwrite", lambda files: asked.append(files) or False)
    dialog._on_buttons_accepted()
    assert asked and dialog.result() != ExportDialog.DialogCode.Accepted and not dialog.force
    monkeypatch.setattr(dialog, "confirm_overwrite", lambda files: True)
    dialog._on_buttons_accepted()
    assert dialog.result() == ExportDialog.DialogCode.Accepted and dialog.force


def test_job_status_shows_the_time_left_once_it_can_tell(qtbot, monkeypatch):
    import app.widgets.jobs_panel as jobs_panel

    clock = [100.0]
    monkeypatch.setattr(jobs_panel.time, "monotonic", lambda: clock[0])
    status = jobs_panel.JobStatus()
    qtbot.addWidget(status)
    status.started("Analyze", "analysing")
    clock[0] += 1.0
    status.progressed("Analyze", 0.5, "statistics of fc1")
    assert "left" not in status.bar.format()  # under 2 s in: no guess yet
    clock[0] += 9.0  # 10 s for a quarter of the work: 30 s to go
    status.progressed("Analyze", 0.25, "statistics of fc2")
    assert status.bar.format() == "Analyze: %p% · about 30 s left"
    clock[0] += 590.0  # 600 s for 40%: 15 min to go
    status.progressed("Analyze", 0.4, "")
    assert status.bar.format().endswith("about 15 min left")
    status.progressed("Analyze", 1.0, "")
    assert "left" not in status.bar.format()
    status.finished("Analyze", "done", still_running=False)
    assert status.bar.format() == "Analyze: done"
