"""A slider step repaints only what changed: the table signals the cells whose text changed,
the histogram keeps its quantization grid when the grid did not change, and the window's
cached live preview equals `core.analysis.estimate.preview`."""

from __future__ import annotations

import pytest

from app.widgets.histogram_view import HistogramView
from app.widgets.layer_table import COLUMNS, LayerTable, LayerTableModel, changed_runs
from core.analysis.estimate import preview
from core.analysis.stats import analyze
from core.base.model import LoadedModel
from core.recipe.plan import simple_plan
from tests.models import ResNet50


@pytest.fixture(scope="module")
def stats():
    """The ResNet-50 layout at a small width: conv rows change in a drag, BatchNorm rows not."""
    import torch

    torch.manual_seed(0)
    model = ResNet50(base=8, classes=10).eval()
    return analyze(LoadedModel(module=model, format="eager", source="test:r50", name="r50"))


def test_changed_runs_groups_rows_with_the_same_changed_columns():
    old = [("a", "1", "x"), ("b", "2", "y"), ("c", "3", "z"), ("d", "4", "w"), ("e", "5", "v")]
    new = [("a", "1", "X"), ("b", "2", "Y"), ("c", "3", "z"), ("d", "9", "W"), ("e", "5", "v")]
    assert changed_runs(old, new) == [(0, 1, 2, 2), (3, 3, 1, 2)]
    assert changed_runs(old, old) == []


def _cells(model: LayerTableModel) -> list[tuple[str, ...]]:
    return [
        tuple(model.index(r, c).data() for c in range(len(COLUMNS)))
        for r in range(model.rowCount())
    ]


def test_table_signals_exactly_the_cells_whose_text_changed(qtbot, stats):
    model = LayerTableModel()
    model.set_layers(stats.layers)
    model.set_preview(preview(stats, simple_plan(0.3, 6)))
    before = _cells(model)
    ranges = []
    model.dataChanged.connect(
        lambda tl, br, *_: ranges.append((tl.row(), br.row(), tl.column(), br.column()))
    )
    after_preview = preview(stats, simple_plan(0.5, 6))
    model.set_preview(after_preview, changed_only=True)
    after = _cells(model)
    fresh = LayerTableModel()
    fresh.set_layers(stats.layers)
    fresh.set_preview(after_preview)
    assert after == _cells(fresh)  # the same text as a full rebuild
    signalled = {
        (r, c)
        for top, bottom, first, last in ranges
        for r in range(top, bottom + 1)
        for c in range(first, last + 1)
    }
    changed = {
        (r, c)
        for r, (a, b) in enumerate(zip(before, after, strict=True))
        for c in range(len(COLUMNS))
        if a[c] != b[c]
    }
    assert changed and changed <= signalled
    # nothing outside each changed row's span of changed columns: the BatchNorm rows (and
    # the names, types and sizes) are not repainted
    span = {}
    for r, c in changed:
        lo, hi = span.get(r, (c, c))
        span[r] = (min(lo, c), max(hi, c))
    assert all(r in span and span[r][0] <= c <= span[r][1] for r, c in signalled)
    unchanged_rows = set(range(len(before))) - set(span)
    assert {layer.type for i, layer in enumerate(stats.layers) if i in unchanged_rows} >= {
        "BatchNorm2d"
    }
    # a full update (the grouped tree listens) still signals every number column
    ranges.clear()
    model.set_preview(preview(stats, simple_plan(0.6, 6)))
    assert ranges == [(0, len(stats.layers) - 1, 3, len(COLUMNS) - 1)]


def test_table_and_tree_signal_only_changed_rows(qtbot, stats):
    table = LayerTable()
    qtbot.addWidget(table)
    table.set_layers(stats.layers)
    table.grouped.setChecked(False)  # 107 nested layers open grouped; the flat table first
    table.set_preview(preview(stats, simple_plan(0.3, 6)))
    ranges = []
    table.model.dataChanged.connect(lambda tl, br, *_: ranges.append((tl.row(), br.row())))
    table.set_preview(preview(stats, simple_plan(0.35, 6)))
    assert len(ranges) > 1  # per run of changed rows
    table.grouped.setChecked(True)
    ranges.clear()
    tree_ranges = []
    table.tree_model.dataChanged.connect(
        lambda tl, br, *_: tree_ranges.append((tl.parent().internalId(), tl.row(), br.row()))
    )
    table.set_preview(preview(stats, simple_plan(0.4, 6)))
    # grouped too: only the changed rows, mapped to the tree's leaves and the groups above
    assert len(ranges) > 1 and all(top == bottom or top < bottom for top, bottom in ranges)
    assert tree_ranges
    changed = sum(b - t + 1 for t, b in ranges)
    assert changed < len(stats.layers)  # the BatchNorm rows (no plan numbers) are not signalled


def test_histogram_keeps_the_grid_while_only_the_threshold_moves(qtbot, stats, monkeypatch):
    view = HistogramView()
    qtbot.addWidget(view)
    name = "layer3.0.conv2"
    view.set_layer(stats.tensors[name])
    calls = []
    set_data = view.levels.setData
    monkeypatch.setattr(view.levels, "setData", lambda *a, **k: (calls.append(a), set_data(*a)))

    def state(threshold, bits):
        view.set_plan_state(
            method="magnitude", threshold=threshold, bits=bits, symmetric=False, per_channel=True
        )

    state(0.01, 6)
    assert len(calls) == 1
    for t in (0.011, 0.012, 0.013):
        state(t, 6)
    assert len(calls) == 1  # threshold drag: grid untouched
    assert view.lines[0].value() == pytest.approx(0.013)
    state(0.013, 4)
    assert len(calls) == 2  # new bit width: new grid
    state(0.013, None)
    assert len(calls) == 3 and len(view.levels.getData()[0] or []) == 0
