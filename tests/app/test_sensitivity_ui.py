"""Sensitivity on screen (issue #12, parts 2-4), driven offscreen in the real window: a scan
as a job with a cache hit, the target slider re-planning live, pinning, the proxy banner and
the solver's predicted frontier on the runs plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PySide6.QtCore import QPointF

from app.main_window import MainWindow
from app.widgets.layer_table import PIN_MARK
from app.widgets.sensitivity_view import position_to_ratio, ratio_to_position
from core.analysis.estimate import preview
from core.planning.sensitivity import default_levels
from core.planning.solver import Target
from core.recipe.edits import SolvedPlan, edit_from_dict
from tests.core._fixtures import count_layer_rows
from tests.models import make

TIMEOUT = 120_000
#: A small grid (5 sparsities x 4 widths, per-channel variants): 35 levels, a few seconds.
LEVELS = default_levels("magnitude", sparsities=(0.0, 0.5, 0.8, 0.9, 0.95), bits=(2, 4, 8, None))


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "scan-cache"))


@pytest.fixture
def window(qtbot, settings):
    w = MainWindow(settings)
    qtbot.addWidget(w)
    w.resize(1366, 768)
    w.show()
    w.sensitivity_ui.scan_options = {"levels": LEVELS}
    yield w
    w.controller.shutdown()


def open_ready(qtbot, w: MainWindow, source: str) -> None:
    w.open_model(source)
    c = w.controller
    qtbot.waitUntil(lambda: c.stats is not None and not c.busy(), timeout=TIMEOUT)


def shown_view_after_scan(qtbot, w: MainWindow):
    """demo:mlp opened and scanned, the Sensitivity dock shown: its view."""
    open_ready(qtbot, w, "demo:mlp")
    scan_done(qtbot, w)
    ui = w.sensitivity_ui
    ui.dock.show()
    ui.dock.raise_()
    qtbot.waitUntil(ui.view.isVisible)
    return ui.view


def scan_done(qtbot, w: MainWindow, *, click: bool = True):
    """Press Scan (the dock's button) and wait for the job; returns (scan, progress msgs)."""
    c = w.controller
    finished, progress = [], []
    c.jobFinished.connect(lambda kind, outcome: finished.append((kind, outcome)))
    c.jobProgressed.connect(lambda kind, f, msg: progress.append((kind, msg)))
    before = c.sensitivity
    if click:
        w.sensitivity_ui.view.scan_button.click()
    else:
        w.sensitivity_ui.act_scan.trigger()
    qtbot.waitUntil(lambda: ("scan", "done") in finished, timeout=TIMEOUT)
    assert c.sensitivity is not None and c.sensitivity is not before
    return c.sensitivity, [m for k, m in progress if k == "scan"]


def drag_ratio(qtbot, w: MainWindow, ratios) -> None:
    """A mouse drag of the target-ratio slider through ``ratios``, then the release."""
    panel = w.sensitivity_ui.panel
    panel.ratio.setSliderDown(True)
    for r in ratios:
        panel.ratio.setValue(ratio_to_position(r, panel.max_ratio))
        qtbot.wait(5)
    panel.ratio.setSliderDown(False)
    panel.ratio.sliderReleased.emit()


def test_scan_is_a_job_and_a_second_scan_is_a_cache_hit(qtbot, window):
    open_ready(qtbot, window, "demo:mlp")
    c = window.controller
    assert window.sensitivity_ui.act_scan.isEnabled()
    first, progress = scan_done(qtbot, window)
    assert not first.estimate and first.metric == "loss"
    assert first.cached_layers == 0
    assert any("ETA" in m for m in progress)  # progress with ETA, like the other jobs
    names = [curve.name for curve in first.layers]
    assert names == ["fc1", "fc2", "fc3"]
    view = window.sensitivity_ui.view
    assert view.heat_values().shape == (3, len(LEVELS))
    assert not view.banner.isVisible()

    second, _ = scan_done(qtbot, window, click=False)
    # every layer read back from the cache, none measured again (speed lives in bench/)
    assert second.cached_layers == len(names)
    for a, b in zip(first.layers, second.layers, strict=True):
        assert a.points == b.points
    # The selected layer's curves and the plan's point are drawn.
    c.set_selection(("fc2",))
    assert view.curve_items and set(view.plan_cells()) == set(names)
    # Hover a heat-map cell for its numbers; click a row to select that layer.
    c.set_selection(("fc1",))
    qtbot.wait(50)
    pos = view.heat.getPlotItem().vb.mapViewToScene(QPointF(3.5, 2.5))
    view._on_heat_moved(pos)
    assert view.heat.toolTip().startswith("fc3: ")

    class Click:
        def scenePos(self):
            return pos

    view._on_heat_clicked(Click())
    assert c.selection == ("fc3",)


def test_scan_can_be_cancelled(qtbot, window):
    open_ready(qtbot, window, "demo:mlp")
    c = window.controller
    window.sensitivity_ui.scan_options = {}  # the full grid: long enough to cancel
    finished = []
    c.jobFinished.connect(lambda kind, outcome: finished.append((kind, outcome)))
    window.sensitivity_ui.act_scan.trigger()
    qtbot.waitUntil(lambda: window.job_status.bar.value() > 0, timeout=TIMEOUT)
    c.cancel_jobs()
    qtbot.waitUntil(lambda: ("scan", "cancelled") in finished, timeout=TIMEOUT)
    assert c.sensitivity is None


def test_target_slider_drag_replans_toward_the_target(qtbot, window):
    open_ready(qtbot, window, "demo:mlp")
    c = window.controller
    scan_done(qtbot, window)
    panel = window.sensitivity_ui.panel
    assert panel.ratio.isEnabled() and panel.max_ratio > 20
    start = c.plan
    solves = []
    c.solved.connect(solves.append)
    drag_ratio(qtbot, window, np.linspace(2.0, 12.0, 30))
    target = position_to_ratio(panel.ratio.value(), panel.max_ratio)
    assert target == pytest.approx(12.0, rel=0.01)
    assert 1 <= len(solves) < 30  # throttled like the other drags; the last step landed
    assert solves[-1].target == Target(ratio=target)
    assert c.plan != start
    got = preview(c.stats, c.plan)
    # The live estimate follows and sits just under the target size.
    assert c.preview == got
    assert target <= got.compression_ratio <= 1.25 * target
    assert "×" in panel.prediction.text()
    # The table shows the solved per-layer plan.
    table = window.layer_table.model
    bits = {table.layer(r).name: table.index(r, 4).data() for r in range(table.rowCount())}
    for lp in got.layers:
        assert bits[lp.name] == ("fp32" if lp.bits is None else f"{lp.bits} bit")
    # A harder target moves the ratio up again; the whole drag is one undo step.
    drag_ratio(qtbot, window, [16.0, 20.0])
    assert preview(c.stats, c.plan).compression_ratio >= 20.0
    window.act_undo.trigger()
    assert preview(c.stats, c.plan).compression_ratio == pytest.approx(got.compression_ratio)
    window.act_undo.trigger()
    assert c.plan == start
    # The recorded edit is a value: it round-trips through JSON.
    window.act_redo.trigger()
    edit = c.session.history.edits()[-1]
    assert isinstance(edit, SolvedPlan) and dict(edit.target)["ratio"] == pytest.approx(target)
    assert edit_from_dict(edit.to_dict()) == edit


def test_max_damage_slider_plans_the_smallest_plan_within_it(qtbot, window):
    open_ready(qtbot, window, "demo:mlp")
    c = window.controller
    scan_done(qtbot, window)
    panel = window.sensitivity_ui.panel
    sizes = {}
    for pos in (10, 100):  # 1 and 10 accuracy points
        panel.damage.setValue(pos)
        window._end_drag()
        sol = c.session.solution
        assert sol.predicted["accuracy_drop"] <= panel.damage_value() + 1e-9
        sizes[pos] = preview(c.stats, c.plan).packed_bytes
    assert sizes[100] < sizes[10]  # more damage allowed: a smaller archive


def test_pinning_keeps_a_layers_settings(qtbot, window):
    open_ready(qtbot, window, "demo:mlp")
    c = window.controller
    scan_done(qtbot, window)
    ui = window.sensitivity_ui
    c.set_selection(("fc1",))
    c.set_target("selection")
    window.quant_panel.bits.setValue(8)
    window._end_drag()
    mine = c.plan.config_for("fc1")
    assert mine.quant.bits == 8
    ui.panel.pin.click()
    assert c.pins == frozenset({"fc1"})
    # The solver's tables for the new pins come from a worker (see the test below).
    qtbot.waitUntil(lambda: not c.rebuilding_pins, timeout=TIMEOUT)
    row = window.layer_table.model.row_of("fc1")
    assert window.layer_table.model.index(row, 0).data().startswith(PIN_MARK)
    assert ui.panel.pins.count() == 1
    assert len(ui.view.pin_marks.getData()[0]) == 1
    # fc1 (most of the weights) kept at 8 bits caps what the others can reach.
    reach = ui.panel.max_ratio
    assert 4.0 < reach < 10.0 and f"{reach:.1f}×" in ui.panel.state.text()
    for ratio in (3.0, 0.95 * reach):
        drag_ratio(qtbot, window, [ratio])
        assert c.plan.config_for("fc1") == mine
        assert c.plan.config_for("fc2") != mine  # the others were planned around it
        assert preview(c.stats, c.plan).compression_ratio >= ratio
    messages = []
    c.statusMessaged.connect(messages.append)
    assert c.plan_to_target(Target(ratio=2 * reach)) is None
    assert messages and "not reachable" in messages[-1]
    # Unpinned, the solver is free to change fc1 again.
    ui.panel.unpin.click()
    assert c.pins == frozenset()
    qtbot.waitUntil(lambda: not c.rebuilding_pins, timeout=TIMEOUT)
    assert not window.layer_table.model.index(row, 0).data().startswith(PIN_MARK)
    drag_ratio(qtbot, window, [25.0])
    assert c.plan.config_for("fc1") != mine


def test_pinning_rebuilds_in_a_worker_and_a_step_meanwhile_lands_after(qtbot, window):
    """A pin change does not block the event loop: the click returns with the solver's
    tables still being rebuilt (a job), a target step asked for meanwhile waits and arrives
    through `solved` once they are in, planned around the pin; pinning again supersedes
    the older rebuild."""
    open_ready(qtbot, window, "demo:mlp")
    c = window.controller
    scan_done(qtbot, window)
    ui = window.sensitivity_ui
    drag_ratio(qtbot, window, [3.0])
    window._end_drag()
    reach_before = ui.panel.max_ratio
    c.set_selection(("fc1",))
    c.set_target("selection")
    window.quant_panel.bits.setValue(8)
    window._end_drag()
    mine = c.plan.config_for("fc1")
    events = []
    c.jobStarted.connect(lambda kind, _what: events.append((kind, "started")))
    c.jobFinished.connect(lambda kind, outcome: events.append((kind, outcome)))
    progress = []
    c.jobProgressed.connect(lambda kind, f, _msg: progress.append((kind, f)))
    solves = []
    c.solved.connect(solves.append)
    ui.panel.pin.click()
    # Back from the click before the rebuild is done (no event has been processed since,
    # so no worker result can have been applied): the marks are there, the reach is not.
    assert ("pins", "started") in events and c.rebuilding_pins
    assert c.pins == frozenset({"fc1"}) and ui.panel.pins.count() == 1
    assert "Re-planning" in ui.panel.state.text()
    start = c.plan
    # A target step meanwhile waits for the new tables (it would plan fc1 away otherwise).
    assert c.plan_to_target(Target(ratio=5.0), merge=True, verify=False) is None
    assert c.plan == start and not solves
    with qtbot.waitSignal(c.solved, timeout=TIMEOUT) as solved:
        pass
    sol = solved.args[0]
    assert sol.target == Target(ratio=5.0) and ("pins", "done") in events
    assert any(kind == "pins" for kind, _ in progress)  # with progress
    assert c.plan == sol.plan and c.plan.config_for("fc1") == mine
    assert c.plan.config_for("fc2") != mine  # the others were planned around fc1
    window._end_drag()
    # The predicted frontier for the new pins follows as a job of its own.
    qtbot.waitUntil(lambda: ("frontier", "done") in events, timeout=TIMEOUT)
    assert window.runs_view.frontier_xy()[0].size >= 2
    assert c.session.frontier_job() is None  # known for these pins
    # The reach follows the pin (fc1 kept at 8 bits caps it).
    assert ui.panel.max_ratio < reach_before and f"{ui.panel.max_ratio:.1f}×" in (
        ui.panel.state.text()
    )
    # Two pin changes in a row: the first rebuild is superseded, the second lands.
    events.clear()
    ui._pin(["fc2"], True)
    ui._pin(["fc3"], True)
    assert ("pins", "cancelled") in events and c.rebuilding_pins
    qtbot.waitUntil(lambda: not c.rebuilding_pins, timeout=TIMEOUT)
    assert events.count(("pins", "done")) == 1
    assert c.pins == frozenset({"fc1", "fc2", "fc3"})
    problem, _ = c.session._solver_problem({n: c.plan.config_for(n) for n in sorted(c.pins)})
    assert set(problem.pinned) == {"fc1", "fc2", "fc3"}
    # Esc during a rebuild: whether it was cancelled or had just finished, the panel shows
    # the reach for the pins again, not "Re-planning…".
    ui._pin(["fc3"], False)
    assert "Re-planning" in ui.panel.state.text()
    c.cancel_jobs()
    qtbot.waitUntil(lambda: not c.rebuilding_pins, timeout=TIMEOUT)
    assert "Re-planning" not in ui.panel.state.text()
    assert f"{ui.panel.max_ratio:.1f}×" in ui.panel.state.text()


def test_predicted_frontier_drawn_beside_the_runs(qtbot, window):
    open_ready(qtbot, window, "demo:mlp")
    c = window.controller
    runs = window.runs_view
    assert runs.frontier_xy()[0].size == 0  # no scan: nothing predicted
    scan_done(qtbot, window)
    x, y = runs.frontier_xy()
    assert x.size >= 5
    assert np.all(np.diff(x) > 0)
    # Predicted accuracy loss does not grow with the size (small tolerance for the grid).
    assert y[0] >= y[-1]
    assert "predicted" in runs.plot.getPlotItem().titleLabel.text
    # A measured run joins the plot in the same unit; the prediction stays.
    drag_ratio(qtbot, window, [10.0])
    c.compress()
    qtbot.waitUntil(lambda: c.evaluation is not None and not c.busy(), timeout=TIMEOUT)
    assert runs.points.getData()[0].size >= 1
    assert runs.frontier_xy()[0].size == x.size
    measured_kib = runs.points.getData()[0][-1]
    assert x.min() <= measured_kib <= x.max()


def test_without_data_the_scan_is_a_marked_estimate(qtbot, window, tmp_path):
    model, _ = make("resnet")
    path = Path(tmp_path) / "resnet.ts.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    open_ready(qtbot, window, str(path))
    scan, _ = scan_done(qtbot, window)
    assert scan.estimate and scan.metric == "proxy"
    view = window.sensitivity_ui.view
    assert view.banner.isVisible() and "Data-free" in view.banner.text()
    assert "ESTIMATE" in view.heat.getPlotItem().titleLabel.text
    panel = window.sensitivity_ui.panel
    assert panel.damage_title.text().startswith("Max output error")
    drag_ratio(qtbot, window, [4.0])
    assert "estimate" in panel.prediction.text()
    assert preview(window.controller.stats, window.controller.plan).compression_ratio >= 4.0


def test_target_tab_and_sensitivity_dock_fit_at_1366x768(qtbot, window):
    open_ready(qtbot, window, "demo:mlp")
    scan_done(qtbot, window)
    ui = window.sensitivity_ui
    tabs = window.control_tabs
    tabs.setCurrentWidget(ui.panel)
    qtbot.wait(50)
    scroll = window.controls_scroll.viewport()
    for w in (ui.panel.ratio, ui.panel.damage, ui.panel.pin, ui.panel.prediction):
        top_left = w.mapTo(scroll, w.rect().topLeft())
        bottom = w.mapTo(scroll, w.rect().bottomRight())
        assert w.isVisible()
        assert 0 <= top_left.y() and bottom.y() <= scroll.height(), w.objectName()
    assert ui.dock.isVisible()  # the scan raised its dock
    assert ui.view.heat.height() > 80


def test_session_plan_to_target_without_a_window(tmp_path):
    """The engine side alone (Qt-free): the verified live path meets the byte budget it is
    given, as `workbench plan` would, and pins survive every re-solve."""
    from core.base.errors import WorkbenchError
    from core.session import Session

    s = Session()
    with pytest.raises(WorkbenchError, match="scan the model first"):
        s.plan_to_target(Target(ratio=4.0))
    s.run(s.open_model("demo:mlp"))
    s.run(s.analyze())
    s.run(s.scan(levels=LEVELS, cache_dir=tmp_path / "cache"))
    for ratio in (3.0, 8.0, 20.0):
        sol = s.plan_to_target(Target(ratio=ratio))
        got = preview(s.stats, s.plan).packed_bytes
        assert got == sol.predicted["bytes"] and got <= sol.budget
    s.set_pins(["fc3"])
    kept = s.plan.config_for("fc3")
    s.plan_to_target(Target(ratio=6.0))
    assert s.plan.config_for("fc3") == kept
    assert s.history.edits()[-1].pinned == ("fc3",)
    s.undo()  # each solve outside a drag is its own undo step
    assert preview(s.stats, s.plan).compression_ratio >= 20.0


def test_heat_map_marks_follow_target_steps(qtbot, window):
    """The plan's marks on the heat map (set only when they moved) sit on the plan's cells
    after every step of a target drag, also when a step leaves them where they were."""
    view = shown_view_after_scan(qtbot, window)

    def shown():
        xs, ys = view.marks.getData()
        return sorted((float(x) - 0.5, float(y) - 0.5) for x, y in zip(xs, ys, strict=True))

    seen = set()
    top = window.sensitivity_ui.panel.max_ratio
    for ratios in ([1.2, top / 2], [top / 2], [0.95 * top, 1.1], [1.1]):
        drag_ratio(qtbot, window, ratios)
        expected = sorted((float(c), float(r)) for r, c in view.plan_cells().values())
        assert shown() == expected and len(expected) == 3
        seen.add(tuple(expected))
    assert len(seen) > 1  # the marks moved between drags


def test_idle_warm_up_makes_the_first_target_step_a_lookup(qtbot, window, monkeypatch):
    """After a scan the window warms its preview cache with every scanned level in idle
    time; the first step of a target drag (every layer set anew) then computes no layer row,
    and shows the same numbers as `preview`."""
    open_ready(qtbot, window, "demo:mlp")
    c = window.controller
    scan_done(qtbot, window)
    qtbot.waitUntil(lambda: not c.warming, timeout=TIMEOUT)
    computed = count_layer_rows(monkeypatch)
    panel = window.sensitivity_ui.panel
    start = c.plan
    panel.ratio.setSliderDown(True)
    panel.set_ratio(0.5 * panel.max_ratio)
    window._flush_drags()
    assert c.plan != start and computed == []
    computed.clear()
    assert c.preview == preview(c.stats, c.plan)
    panel.ratio.setSliderDown(False)


def test_curve_plots_hold_their_ranges_during_a_drag_and_fit_after_it(qtbot, window):
    """During a drag the damage curves' axes stay put (no re-range per step) while the plan's
    stars follow every step; released, the plots fit their curves again."""
    from app.widgets.sensitivity_view import plan_level

    open_ready(qtbot, window, "demo:mlp")
    c = window.controller
    scan_done(qtbot, window)
    ui = window.sensitivity_ui
    ui.dock.show()
    ui.dock.raise_()
    view = ui.view
    c.set_selection(("fc1",))
    qtbot.waitUntil(view.isVisible)
    qtbot.wait(50)
    plots = (view.by_sparsity, view.by_bits)
    ranges = [p.getViewBox().viewRange() for p in plots]
    panel = ui.panel
    panel.ratio.setSliderDown(True)
    seen = set()
    for r in np.geomspace(1.5, 0.95 * panel.max_ratio, 8):
        panel.set_ratio(float(r))
        window._flush_drags()
        qtbot.wait(5)
        assert [p.getViewBox().viewRange() for p in plots] == ranges
        s, bits, _pc = plan_level(c.plan.config_for("fc1"), c.preview.layer("fc1"))
        xs, _ = view._stars[view.by_sparsity].getData()
        assert [float(x) for x in xs] == [pytest.approx(100 * s)]
        xs, _ = view._stars[view.by_bits].getData()
        assert [float(x) for x in xs] == [32 if bits is None else bits]
        seen.add((s, bits))
    assert len(seen) > 1  # the stars moved
    panel.ratio.setSliderDown(False)
    panel.ratio.sliderReleased.emit()
    qtbot.wait(50)
    for plot in plots:
        vb = plot.getViewBox()
        assert vb.autoRangeEnabled() == (True, True) or vb.autoRangeEnabled() == [True, True]
        (x0, x1), (y0, y1) = vb.viewRange()
        for item in view._lines[plot]:
            xd, yd = item.getData()
            if xd is not None and len(xd):
                assert x0 <= min(xd) and max(xd) <= x1
                assert y0 <= min(yd) and max(yd) <= y1


def test_cached_axes_are_redrawn_when_their_range_changes(qtbot, window):
    """The curve plots' axes are cached as pixmaps (`app.style.apply_plot_theme`: a marker
    move does not redraw them); a new range, as when the plots fit their curves again after
    a drag, must still draw new ticks."""
    from PySide6.QtWidgets import QGraphicsItem

    view = shown_view_after_scan(qtbot, window)
    plot = view.by_sparsity
    axis = plot.getAxis("bottom")
    assert axis.cacheMode() == QGraphicsItem.CacheMode.DeviceCoordinateCache
    plot.setXRange(0, 100, padding=0)
    qtbot.wait(20)
    rect = axis.mapRectToScene(axis.boundingRect())
    area = plot.mapFromScene(rect).boundingRect()
    before = plot.grab(area).toImage()
    assert plot.grab(area).toImage() == before  # (the grab itself is stable)
    plot.setXRange(0, 7, padding=0)
    qtbot.wait(20)
    assert plot.grab(area).toImage() != before
