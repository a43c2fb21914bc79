"""The layers grouped by module path (``layer2`` > ``layer2.0`` > ``conv1``), collapsible.

`LayerTreeModel` is a view of the flat `LayerTableModel`: leaves show the same cells as the
table (read from it, so the live preview's numbers are computed once) with the short name in
the first column; group rows sum parameters and packed bytes of the layers under them.

The cells are held in Qt's own item model (a `QStandardItemModel`), so painting the tree
never calls into Python. Per slider step the flat model signals one change per run of changed
rows (a whole-model drag on a ResNet: ~50 runs, prunable rows between the norms').
`LayerTable.set_preview` wraps that in `LayerTreeModel.batched`, so the tree copies the
changed cells once into its leaves, and for the groups above them re-adds only the summed
Packed column (their name, count and parameters do not follow the plan); only cells whose
value differs are written, and each write repaints that cell alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from PySide6.QtCore import QModelIndex, Qt
from PySide6.QtGui import QStandardItem

from app.style import human_bytes, human_count
from app.widgets.layer_table import (  # PACKED_COLUMN: a group row's one plan column
    COLUMNS,
    ITEM_FLAGS,
    PACKED_COLUMN,
    CellCopies,
    LayerTableModel,
    copy_row,
)

_DISPLAY = Qt.ItemDataRole.DisplayRole
_TOOLTIP = Qt.ItemDataRole.ToolTipRole
_ALIGNMENT = Qt.ItemDataRole.TextAlignmentRole
_RIGHT = int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)


class _Node:
    __slots__ = ("children", "index_in_parent", "name", "parent", "path", "row")

    def __init__(self, name: str, path: str, parent: _Node | None, row: int = -1):
        self.name = name  # last path component shown in the tree
        self.path = path  # full module path
        self.parent = parent
        self.row = row  # source row of a leaf; -1 for a group
        self.children: list[_Node] = []
        self.index_in_parent = 0


def group_paths(names: Sequence[str]) -> dict[str, list[str]]:
    """``{group path: child paths}`` of the module tree over ``names`` (``""`` = the root);
    a group with a single child is folded into it so the tree has no one-child chains."""
    children: dict[str, list[str]] = {"": []}
    for name in names:
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            path = ".".join(parts[:depth])
            parent = ".".join(parts[: depth - 1])
            siblings = children.setdefault(parent, [])
            if path not in siblings:
                siblings.append(path)
            if depth < len(parts):
                children.setdefault(path, [])
    return children


class LayerTreeModel(CellCopies):
    """Tree over ``source`` (a `LayerTableModel`), leaves filtered by ``accept(row)``.

    The tree's cells live in Qt's own item model: a repaint (index, parent, each cell's
    roles) never calls into Python, which for a Python model cost more than painting the
    text (~0.7k calls per slider step on a ResNet-50). The numbers are pushed instead: each
    change the table signals is copied into the leaves' cells, and the Packed sums into the
    groups above them (`_rows_changed`), only where the text differs.
    """

    def __init__(self, source: LayerTableModel, parent=None):
        super().__init__(source, parent, live=False)
        self._root = _Node("", "", None)
        self._leaves: dict[str, _Node] = {}
        self._by_row: dict[int, _Node] = {}
        self._leaves_of: dict[int, list[_Node]] = {}
        #: Per node: its row of items, and the values last written to them by role.
        self._items: dict[int, list[QStandardItem]] = {}
        self._written: dict[tuple[int, int, int], object] = {}
        self._accept: Callable[[int], bool] = lambda _row: True
        #: Inside `batched`: the source rows changed so far and the span of their columns.
        self._batch: dict[int, tuple[int, int]] | None = None
        #: ``shown()``: the ids of the nodes whose rows the view shows now (None: all; set by
        #: `app.widgets.layer_table.LayerTable`). Cells of rows out of view are not written
        #: per step: they wait in ``_pending`` until their row is painted
        #: (`flush_pending`), so a whole-model step writes the dozen rows in view, not all.
        self.shown: Callable[[], set[int] | None] = lambda: None
        self._pending: dict[int, tuple[_Node, int, int]] = {}
        self._follow()

    # ------------------------------------------------------------------ structure
    def set_filter(self, accept: Callable[[int], bool]) -> None:
        self._accept = accept
        self.rebuild()

    def rebuild(self) -> None:
        self.beginResetModel()
        self.blockSignals(True)  # one reset, not a signal per item
        try:
            self.removeRows(0, self.rowCount())
            self._build()
        finally:
            self.blockSignals(False)
        self.endResetModel()

    def _build(self) -> None:
        rows = [r for r in range(self.source.rowCount()) if self._accept(r)]
        names = [self.source.layer(r).name for r in rows]
        row_of = dict(zip(names, rows, strict=True))
        tree = group_paths(names)
        self._root = _Node("", "", None)
        self._leaves = {}
        self._items = {}
        self._written = {}
        self._leaves_of = {}
        self._stale = False
        self._pending = {}

        def build(node: _Node, path: str, parent_item: QStandardItem) -> None:
            for child_path in tree.get(path, []):
                # Fold a group that has one child: "layer4.2" > "conv3" stays two levels,
                # but "encoder" > "layer" > "0" with one child each becomes "encoder.layer.0".
                grand = tree.get(child_path, [])
                while child_path not in row_of and len(grand) == 1:
                    child_path = grand[0]
                    grand = tree.get(child_path, [])
                start = len(node.path) + 1 if node.path else 0
                child = _Node(child_path[start:], child_path, node, row_of.get(child_path, -1))
                child.index_in_parent = len(node.children)
                node.children.append(child)
                if child.row >= 0:
                    self._leaves[child_path] = child
                items = [QStandardItem() for _ in COLUMNS]
                for item in items:
                    item.setFlags(ITEM_FLAGS)
                self._items[id(child)] = items
                parent_item.appendRow(items)
                # A layer that is also a parent (a module with its own weight and children)
                # keeps its children beside it.
                build(child, child_path, items[0])

        build(self._root, "", self.invisibleRootItem())
        self._by_row = {leaf.row: leaf for leaf in self._leaves.values()}
        self._fill(self._root)

    def _fill(self, node: _Node) -> None:
        """Write every cell of ``node``'s descendants (a new tree, or a stale one shown)."""
        for child in node.children:
            if child.row >= 0:
                self._write_leaf(child, 0, len(COLUMNS) - 1, static=True)
            else:
                self._write_group(child, static=True)
            self._fill(child)

    def _refresh_all(self) -> None:
        self._stale = False
        self._pending = {}
        self._fill(self._root)

    def _set(self, node: _Node, col: int, role: int, value: object) -> None:
        key = (id(node), col, role)
        if key in self._written and self._written[key] == value:
            return
        self._written[key] = value
        self._items[id(node)][col].setData(value, role)

    def _write_leaf(self, leaf: _Node, first: int, last: int, *, static: bool = False) -> None:
        """Copy the leaf's cells ``first..last`` from the table (``static``: also the roles
        that never change for a layer: alignment, colour, name)."""
        text = self.source.cell(leaf.row, 0)
        # Keep the override mark, show the short name (the full one is in the tooltip).
        mark = text[: len(text) - len(leaf.path)] if text.endswith(leaf.path) else ""

        def put(col: int, role: int, value: object) -> None:
            self._set(leaf, col, role, value)

        copy_row(self.source, leaf.row, first, last, put, static=static, name=mark + leaf.name)

    def _write_group(self, node: _Node, *, static: bool = False) -> None:
        """A group's summed Packed cell (``static``: its name, count, parameters too)."""
        leaves = self._group_leaves(node)
        # The layers the plan compresses (norms have no preview row, as in the table).
        packed = [lp for lp in map(self.source.preview_of, (n.path for n in leaves)) if lp]
        self._set(
            node,
            PACKED_COLUMN,
            _DISPLAY,
            human_bytes(sum(lp.packed_bytes for lp in packed)) if packed else None,
        )
        if not static:
            return
        self._set(node, 0, _DISPLAY, f"{node.name}  ({len(leaves)})")
        params = sum(self.source.layer(n.row).params for n in leaves)
        self._set(node, 2, _DISPLAY, human_count(params))
        tip = f"{node.path}: {len(leaves)} layer(s)"
        for col in range(len(COLUMNS)):
            self._set(node, col, _TOOLTIP, tip)
            if col >= 2:
                self._set(node, col, _ALIGNMENT, _RIGHT)

    def node_at(self, index: QModelIndex) -> _Node | None:
        """The tree node (layer or group) of a cell of this model (None: not a cell)."""
        rows = []
        while index.isValid():
            rows.append(index.row())
            index = index.parent()
        node = self._root
        for row in reversed(rows):
            if not 0 <= row < len(node.children):
                return None
            node = node.children[row]
        return node if rows else None

    def index_of(self, name: str) -> QModelIndex:
        node = self._leaves.get(name)
        if node is None:
            return QModelIndex()
        return self._items[id(node)][0].index()

    def leaf_names(self) -> list[str]:
        return list(self._leaves)

    def _group_leaves(self, node: _Node) -> list[_Node]:
        """The leaves under a group (built once per tree)."""
        leaves = self._leaves_of.get(id(node))
        if leaves is None:
            leaves = self._leaves_of[id(node)] = list(self._leaves_under(node))
        return leaves

    def _leaves_under(self, node: _Node):
        for child in node.children:
            if child.row >= 0:
                yield child
            yield from self._leaves_under(child)

    # ------------------------------------------------------------------ changes
    @contextmanager
    def batched(self) -> Iterator[None]:
        """Collect the source's change signals inside the block and copy them at its end
        (each group's Packed sum once, however many of its leaves changed)."""
        if self._batch is not None:  # nested: the outer block passes them on
            yield
            return
        self._batch = {}
        try:
            yield
        finally:
            rows, self._batch = self._batch, None
            if rows:
                self._rows_changed(rows)

    def _on_source_dataChanged(self, top_left=None, bottom_right=None, *_args) -> None:
        if not self._live:
            self._stale = True
            return
        if top_left is None or bottom_right is None or not top_left.isValid():
            if self._batch is not None:
                self._batch.clear()
            self._refresh_all()
            return
        span = (top_left.column(), bottom_right.column())
        rows = dict.fromkeys(range(top_left.row(), bottom_right.row() + 1), span)
        if self._batch is None:
            self._rows_changed(rows)
            return
        for row in rows:
            old = self._batch.get(row)
            self._batch[row] = span if old is None else (min(old[0], span[0]), max(old[1], span[1]))

    def _rows_changed(self, rows: dict[int, tuple[int, int]]) -> None:
        """Source ``rows`` changed (``{row: (first column, last column)}``): copy those cells
        into the leaves in view and re-add the Packed sum of every group in view above a
        leaf whose Packed cell changed; the others wait in ``_pending``. Only cells whose
        value differs are written; each write repaints its cell alone (`_TreeView` in
        `app.widgets.layer_table` paints the dirty region rectangle by rectangle)."""
        shown = self.shown()
        groups: dict[int, _Node] = {}
        for row, (first, last) in rows.items():
            leaf = self._by_row.get(row)
            if leaf is None:
                continue
            self._change(leaf, first, last, shown)
            if first <= PACKED_COLUMN <= last:
                node = leaf.parent
                while node is not None and node is not self._root and id(node) not in groups:
                    groups[id(node)] = node
                    node = node.parent
        for node in groups.values():
            self._change(node, PACKED_COLUMN, PACKED_COLUMN, shown)

    def _change(self, node: _Node, first: int, last: int, shown: set[int] | None) -> None:
        """Write ``node``'s changed cells now if its row is in view, else later."""
        old = self._pending.pop(id(node), None)
        if old is not None:
            first, last = min(first, old[1]), max(last, old[2])
        if shown is None or id(node) in shown:
            self._write_node(node, first, last)
        else:
            self._pending[id(node)] = (node, first, last)

    def _write_node(self, node: _Node, first: int, last: int) -> None:
        if node.row >= 0:
            self._write_leaf(node, first, last)
        else:
            self._write_group(node)

    def flush_pending(self, shown: set[int] | None = None) -> None:
        """Write the waiting cells of the rows in ``shown`` (None: all of them), with their
        change signals (a view painting them now asks for them again)."""
        if not self._pending:
            return
        ready = [pending for key, pending in self._pending.items() if shown is None or key in shown]
        for node, first, last in ready:
            del self._pending[id(node)]
            self._write_node(node, first, last)
