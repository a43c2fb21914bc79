"""A slider step repaints only what changed: the table signals the cells whose text changed,
the histogram keeps its quantization grid when the grid did not change, and the window's
cached live preview equals `core.analysis.estimate.preview`."""

from __future__ import annotations

import pytest
from PySide6.QtCore import QEvent, QModelIndex, QModelRoleData, QModelRoleDataSpan, QObject, Qt
from PySide6.QtWidgets import (
    QApplication,
    QLabel,
    QStyledItemDelegate,
    QStyleOptionViewItem,
    QVBoxLayout,
    QWidget,
)
from superqt.utils import signals_blocked

from app.widgets.histogram_view import HistogramView
from app.widgets.layer_table import COLUMNS, LayerTable, LayerTableModel, changed_runs
from app.widgets.layer_tree import PACKED_COLUMN
from app.widgets.quiet_slot import QuietSlot, settle_text
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


def _tree_cells(model) -> dict[tuple[str, int], tuple[object, object]]:
    """Every cell of the tree: ``(path, column) -> (text, tooltip)``."""
    out = {}

    def walk(parent):
        for row in range(model.rowCount(parent)):
            for col in range(len(COLUMNS)):
                idx = model.index(row, col, parent)
                node = model.node_at(idx)
                out[(node.path, col)] = (idx.data(), idx.data(Qt.ItemDataRole.ToolTipRole))
            walk(model.index(row, 0, parent))

    walk(QModelIndex())
    return out


def _shown_table(qtbot, stats, *, grouped: bool) -> LayerTable:
    """A 500x400 layer table of ``stats``' layers, shown (grouped: the module tree)."""
    table = LayerTable()
    qtbot.addWidget(table)
    table.resize(500, 400)
    table.set_layers(stats.layers)
    table.grouped.setChecked(grouped)
    table.show()
    qtbot.waitExposed(table)
    return table


def test_tree_writes_exactly_the_changed_cells(qtbot, stats):
    """A step in the grouped tree writes (and so signals, and repaints) every changed cell
    of the rows in view and no other: not the BatchNorm rows between the convolutions, not
    the names; a group only its summed Packed cell. The rows out of view get theirs when
    they are painted (`flush_pending`); what the tree then holds equals the table's cells
    (leaves) and the sums of its leaves (groups)."""
    table = _shown_table(qtbot, stats, grouped=True)
    tree = table.tree_model
    table.tree.scrollTo(tree.index_of("layer2.0.conv2"))
    table.set_preview(preview(stats, simple_plan(0.3, 6)))
    tree.flush_pending()
    before = _tree_cells(tree)
    signalled = set()

    def on_changed(tl, br, *_):
        for row in range(tl.row(), br.row() + 1):
            for col in range(tl.column(), br.column() + 1):
                node = tree.node_at(tree.index(row, col, tl.parent()))
                signalled.add((node.path, col))

    tree.dataChanged.connect(on_changed)
    table.set_preview(preview(stats, simple_plan(0.5, 6)))
    shown = table._tree_rows_shown()
    in_view = {
        tree_node(tree, path).path for path, _ in before if id(tree_node(tree, path)) in shown
    }
    assert 10 < len(in_view) < len({path for path, _ in before})
    written_now = set(signalled)
    tree.flush_pending()  # what painting the other rows does
    after = _tree_cells(tree)
    changed = {key for key in after if after[key] != before[key]}
    assert len({path for path, _ in changed}) > 40  # a whole-model step: most layers
    assert written_now == {key for key in changed if key[0] in in_view}
    assert signalled == changed
    for path, col in changed:
        if path not in tree._leaves:
            assert col == PACKED_COLUMN  # a group: its summed Packed cell only
    # Leaves show the table's cells (the short name in column 0).
    for path in tree._leaves:
        row = table.model.row_of(path)
        for col in range(1, len(COLUMNS)):
            assert after[(path, col)][0] == table.model.cell(row, col)
    # Groups show the summed packed bytes of their compressed layers (norms have none).
    from app.style import human_bytes

    layer1 = tree_node(tree, "layer1")
    leaves = tree._group_leaves(layer1)
    packed = [table.model.preview_of(n.path) for n in leaves]
    assert any(lp is None for lp in packed)  # the block's BatchNorm layers
    total = sum(lp.packed_bytes for lp in packed if lp is not None)
    assert after[("layer1", PACKED_COLUMN)][0] == human_bytes(total)
    # A hidden tree is not written per step, and is up to date when shown again.
    table.grouped.setChecked(False)
    signalled.clear()
    table.set_preview(preview(stats, simple_plan(0.7, 4)))
    assert not signalled
    table.grouped.setChecked(True)
    for path in tree._leaves:
        row = table.model.row_of(path)
        assert tree.index_of(path).siblingAtColumn(5).data() == table.model.cell(row, 5)


def tree_node(tree, path: str):
    """The tree node of ``path`` (a layer or a group)."""
    leaf = tree._leaves.get(path)
    if leaf is not None:
        return leaf

    def find(node):
        for child in node.children:
            if child.path == path:
                return child
            hit = find(child)
            if hit is not None:
                return hit
        return None

    return find(tree._root)


@pytest.mark.parametrize("grouped", [True, False])
def test_the_incremental_repaint_shows_what_a_full_repaint_shows(qtbot, stats, grouped):
    """After slider steps (only the changed cells in view repainted, rectangle by
    rectangle) the window's pixels equal a full repaint of the same numbers, also after
    scrolling to rows that were out of view during the steps and after marks changed."""
    from PySide6.QtGui import QGuiApplication

    from core.analysis.estimate import PreviewCache

    cache = PreviewCache(stats)
    table = _shown_table(qtbot, stats, grouped=grouped)
    table.set_preview(cache.preview(simple_plan(0.3, 6)))
    view = table.tree if grouped else table.view

    def shown_pixels():
        QGuiApplication.processEvents()
        return QGuiApplication.primaryScreen().grabWindow(table.winId()).toImage()

    def painted():
        return table.grab().toImage().convertToFormat(shown_pixels().format())

    shown_pixels()
    for step, sparsity in enumerate((0.35, 0.5, 0.62, 0.7)):
        table.set_preview(cache.preview(simple_plan(sparsity, 6 if step < 2 else 4)))
        if step == 1:
            table.set_overrides({"layer1.0.conv2", "layer4.2.conv3"})
            table.set_pins({"layer1.0.conv2"})
        assert shown_pixels() == painted(), (grouped, sparsity)
    view.scrollToBottom()
    assert shown_pixels() == painted()
    # The check can fail: cells changed behind the view's back stay stale on screen.
    # (the views paint Qt item models holding copies of the cells: theirs are the signals
    # to block; first every waiting cell written and repainted)
    table.tree_model.flush_pending()
    shown_pixels()
    with signals_blocked(table.tree_model if grouped else table.items):
        table.set_preview(cache.preview(simple_plan(0.9, 8)))
    assert shown_pixels() != painted()


def test_tree_and_table_answer_all_roles_of_a_cell_at_once(qtbot, stats):
    """`multiData` (one call per painted cell) answers what `data` answers, role by role."""
    table = LayerTable()
    qtbot.addWidget(table)
    table.set_layers(stats.layers)
    table.set_overrides({stats.layers[1].name})
    table.set_preview(preview(stats, simple_plan(0.5, 6)))
    roles = [
        Qt.ItemDataRole.DisplayRole,
        Qt.ItemDataRole.DecorationRole,
        Qt.ItemDataRole.FontRole,
        Qt.ItemDataRole.TextAlignmentRole,
        Qt.ItemDataRole.BackgroundRole,
        Qt.ItemDataRole.ForegroundRole,
        Qt.ItemDataRole.CheckStateRole,
        Qt.ItemDataRole.ToolTipRole,
    ]
    cells = [table.model.index(r, c) for r in range(3) for c in range(len(COLUMNS))]
    # the flat view's sorted proxy (answers all roles in one call to the table)
    table.proxy.sort(COLUMNS.index("Packed"), Qt.SortOrder.DescendingOrder)
    cells += [table.proxy.index(r, c) for r in range(3) for c in range(len(COLUMNS))]
    assert table.proxy.mapToSource(table.proxy.index(0, 0)).row() != 0
    tree = table.tree_model
    group = tree.index(0, 0)
    while group.isValid() and not tree.rowCount(group):
        group = tree.index(group.row() + 1, 0)
    leaf = tree.index(0, 0, group)
    cells += [tree.index(0, c, group) for c in range(len(COLUMNS))]
    cells += [tree.index(leaf.row(), c, group) for c in range(len(COLUMNS))]
    cells += [tree.index(group.row(), c) for c in range(len(COLUMNS))]
    checked = 0
    for idx in cells:
        for role in roles:
            slot = QModelRoleData(role)
            slot.setData("stale")  # Qt reuses slots: an unanswered role must be cleared
            idx.model().multiData(idx, QModelRoleDataSpan(slot))
            assert slot.data() == idx.data(role), (idx.row(), idx.column(), role)
            checked += slot.data() is not None
    assert checked > len(cells)  # not all None
    # What a repaint does: the delegate asks for its roles in one span.
    delegate = QStyledItemDelegate()
    for idx in (tree.index(leaf.row(), 0, group), table.model.index(1, 0)):
        option = QStyleOptionViewItem()
        delegate.initStyleOption(option, idx)
        assert option.text == idx.data() and option.text
        assert option.font.bold() == bool(idx.data(Qt.ItemDataRole.FontRole))


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
    state(0.013, 4)  # the same grid as before the switch-off is drawn again
    assert len(calls) == 4 and len(view.levels.getData()[0]) > 0
    view.set_layer(stats.tensors["layer1.0.conv1"])  # another layer: its own grid
    assert len(calls) == 5
    view.abs_axis.setChecked(True)  # |w| on a log axis: the grid moves with the axis
    assert len(calls) == 6


def test_a_selectable_label_is_painted_once_per_new_text(qtbot):
    """`settle_text`: a mouse-selectable label (the live summary's numbers, the histogram
    caption) shows each new text after one paint, not two; the same text paints nothing."""
    host = QWidget()
    qtbot.addWidget(host)
    layout = QVBoxLayout(host)
    labels = []
    for rich in (False, True):
        label = QLabel("start", host)
        label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        label.setWordWrap(rich)
        layout.addWidget(QuietSlot(label, min_width=200))
        labels.append(label)
    host.show()
    qtbot.waitExposed(host)
    paints = {id(label): 0 for label in labels}

    class Count(QObject):
        def eventFilter(self, watched, event):
            if event.type() == QEvent.Type.Paint:
                paints[id(watched)] += 1
            return False

    counter = Count()
    for label in labels:
        label.installEventFilter(counter)
    for step in range(5):
        for label in labels:
            settle_text(label, f"<b>{step}</b> · {step / 7:.4f}" if label.wordWrap() else f"{step}")
        for _ in range(3):
            QApplication.processEvents()
    assert all(n == 5 for n in paints.values()), paints
    assert labels[0].text() == "4"
    settle_text(labels[0], "4")
    for _ in range(3):
        QApplication.processEvents()
    assert paints[id(labels[0])] == 5
