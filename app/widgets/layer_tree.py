"""The layers grouped by module path (``layer2`` > ``layer2.0`` > ``conv1``), collapsible.

`LayerTreeModel` is a view of the flat `LayerTableModel`: leaves show the same cells as the
table (read from it, so the live preview's numbers are computed once) with the short name in
the first column; group rows sum parameters and packed bytes of the layers under them.

Per slider step the flat model signals one change per run of changed rows (a whole-model
drag on a ResNet: ~50 runs, prunable rows between the norms'). `LayerTable.set_preview`
wraps that in `LayerTreeModel.batched`, so the tree maps the rows once and tells its view one
change per run of changed siblings: the leaves' changed columns, and for the groups above
them only the summed Packed column (their name, count and parameters do not follow the plan).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from PySide6.QtCore import QAbstractItemModel, QModelIndex, QPersistentModelIndex, Qt

from app.style import human_bytes, human_count
from app.widgets.layer_table import (
    CELL_ROLES,
    COLUMNS,
    NAME_ROLE,
    LayerTableModel,
    row_runs,
)

#: The one column of a group row that follows the plan (its leaves' summed packed bytes).
PACKED_COLUMN = COLUMNS.index("Packed")
#: The roles a leaf answers (the table's cell roles).
_LEAF_ROLES = CELL_ROLES
#: The roles a group row answers.
_GROUP_ROLES = frozenset(
    (Qt.ItemDataRole.DisplayRole, Qt.ItemDataRole.ToolTipRole, Qt.ItemDataRole.TextAlignmentRole)
)


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


class LayerTreeModel(QAbstractItemModel):
    """Tree over ``source`` (a `LayerTableModel`), leaves filtered by ``accept(row)``."""

    def __init__(self, source: LayerTableModel, parent=None):
        super().__init__(parent)
        self.source = source
        self._root = _Node("", "", None)
        self._leaves: dict[str, _Node] = {}
        self._by_row: dict[int, _Node] = {}
        self._leaves_of: dict[int, list[_Node]] = {}
        self._packed_text: dict[int, str | None] = {}
        self._accept: Callable[[int], bool] = lambda _row: True
        #: Inside `batched`: the source rows changed so far and the span of their columns.
        self._batch: tuple[set[int], list[int]] | None = None
        #: Whether a view shows the tree: a hidden tree skips the per-step change signals
        #: (a view asks for fresh cells when it is shown again).
        self.live = False
        #: ``shown()``: the ids of the nodes whose rows the view shows now (None: all). Rows
        #: scrolled out of view or folded away are not signalled: a view reads their cells
        #: when it paints them, and signalling them costs the view a walk over them.
        self.shown: Callable[[], set[int] | None] = lambda: None
        source.modelReset.connect(self.rebuild)
        source.dataChanged.connect(self._on_source_dataChanged)
        self.rebuild()

    # ------------------------------------------------------------------ structure
    def set_filter(self, accept: Callable[[int], bool]) -> None:
        self._accept = accept
        self.rebuild()

    def rebuild(self) -> None:
        self.beginResetModel()
        rows = [r for r in range(self.source.rowCount()) if self._accept(r)]
        names = [self.source.layer(r).name for r in rows]
        row_of = dict(zip(names, rows, strict=True))
        tree = group_paths(names)
        self._root = _Node("", "", None)
        self._leaves = {}

        def build(node: _Node, path: str) -> None:
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
                # A layer that is also a parent (a module with its own weight and children)
                # keeps its children beside it.
                build(child, child_path)

        build(self._root, "")
        self._by_row = {leaf.row: leaf for leaf in self._leaves.values()}
        self._leaves_of = {}
        self._packed_text = {}
        self.endResetModel()

    def _node(self, index: QModelIndex | QPersistentModelIndex) -> _Node:
        return index.internalPointer() if index.isValid() else self._root

    def index(self, row, column, parent=QModelIndex()):  # noqa: B008 - Qt signature
        node = self._node(parent)
        if not (0 <= row < len(node.children)) or not (0 <= column < len(COLUMNS)):
            return QModelIndex()
        return self.createIndex(row, column, node.children[row])

    def parent(self, index=QModelIndex()):  # noqa: B008 - Qt signature
        if not index.isValid():
            return QModelIndex()
        node = index.internalPointer().parent
        if node is None or node is self._root:
            return QModelIndex()
        return self.createIndex(node.index_in_parent, 0, node)

    def sibling(self, row, column, index):
        """`index` (the default goes through `parent` and `index`: the view asks for the
        column-0 sibling of every cell it locates)."""
        if index.isValid() and row == index.row() and 0 <= column < len(COLUMNS):
            return self.createIndex(row, column, index.internalPointer())
        return super().sibling(row, column, index)

    def rowCount(self, parent=QModelIndex()) -> int:  # noqa: B008 - Qt signature
        if parent.isValid() and parent.column() != 0:
            return 0
        return len(self._node(parent).children)

    def columnCount(self, parent=QModelIndex()) -> int:  # noqa: B008 - Qt signature
        return len(COLUMNS)

    def headerData(self, section, orientation, role=Qt.ItemDataRole.DisplayRole):
        return self.source.headerData(section, orientation, role)

    def index_of(self, name: str) -> QModelIndex:
        node = self._leaves.get(name)
        if node is None:
            return QModelIndex()
        return self.createIndex(node.index_in_parent, 0, node)

    def leaf_names(self) -> list[str]:
        return list(self._leaves)

    # ------------------------------------------------------------------ data
    def data(self, index, role=Qt.ItemDataRole.DisplayRole):
        if not index.isValid():
            return None
        node: _Node = index.internalPointer()
        col = index.column()
        if node.row >= 0:
            # A repaint asks every visible cell for a dozen roles: most are answered None
            # here, without a call into the table.
            if role not in _LEAF_ROLES:
                return None
            if col == 0 and role == Qt.ItemDataRole.DisplayRole:
                text = self.source.cell(node.row, 0)
                # Keep the override mark, show the short name (the full one is in the tooltip).
                mark = text[: len(text) - len(node.path)] if text.endswith(node.path) else ""
                return mark + node.name
            return self.source.cell(node.row, col, role)
        if role == NAME_ROLE:
            return None
        if role == Qt.ItemDataRole.DisplayRole and col not in (0, 2, 5):
            return None
        leaves = self._group_leaves(node)
        if role == Qt.ItemDataRole.DisplayRole:
            if col == 0:
                return f"{node.name}  ({len(leaves)})"
            if col == 2:
                return human_count(sum(self.source.layer(n.row).params for n in leaves))
            # the group's packed size: cached until the source's numbers change (a repaint
            # during a drag would otherwise re-add every leaf of every visible group)
            key = id(node)
            if key not in self._packed_text:
                packed = [self.source.preview_of(n.path) for n in leaves]
                self._packed_text[key] = (
                    human_bytes(sum(lp.packed_bytes for lp in packed))
                    if packed and all(lp is not None for lp in packed)
                    else None
                )
            return self._packed_text[key]
        if role == Qt.ItemDataRole.ToolTipRole:
            return f"{node.path}: {len(leaves)} layer(s)"
        if role == Qt.ItemDataRole.TextAlignmentRole and col >= 2:
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        return None

    def multiData(self, index, span) -> None:  # noqa: N802 - Qt signature
        """`data` for every role of ``span`` at once: a repaint asks each visible cell for
        seven roles in one call (the item delegate), one Python call here instead of seven."""
        if not index.isValid():
            return
        node: _Node = index.internalPointer()
        col = index.column()
        if node.row >= 0:
            name = self.data(index) if col == 0 else None
            self.source.fill(node.row, col, span, display=name)
            return
        for k in range(len(span)):
            slot = span[k]
            value = self.data(index, slot.role()) if slot.role() in _GROUP_ROLES else None
            # Unanswered roles are cleared: the span can hold the previous cell's values.
            if value is None:
                slot.clearData()
            else:
                slot.setData(value)

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

    @contextmanager
    def batched(self) -> Iterator[None]:
        """Collect the source's change signals inside the block and pass them on at its end,
        grouped by the tree's siblings (see module docstring)."""
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
        self._packed_text.clear()
        if not self.live:
            return
        if top_left is None or bottom_right is None or not top_left.isValid():
            if self._batch is not None:
                self._batch.clear()
            self._changed(self._root)
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
        """Source ``rows`` changed (``{row: (first column, last column)}``): one dataChanged
        per run of consecutive siblings with the same changed columns (the leaves), and for
        the groups above a leaf whose Packed cell changed, one per run of their Packed
        cells. Precise spans, not one per parent: the view (`_TreeView` in
        `app.widgets.layer_table`) paints each rectangle of the dirty region on its own, so
        the cells that did not change (the norms' rows between a block's convolutions, the
        names) are not painted again. Only the rows `shown` says are in view are signalled.
        """
        leaves: dict[int, tuple[_Node, dict[int, tuple[int, int]]]] = {}
        groups: dict[int, tuple[_Node, dict[int, tuple[int, int]]]] = {}
        seen: set[int] = set()  # the groups already added (each once)
        shown = self.shown()
        for row, (first, last) in rows.items():
            leaf = self._by_row.get(row)
            if leaf is None:
                continue
            if shown is None or id(leaf) in shown:
                siblings = leaves.setdefault(id(leaf.parent), (leaf.parent, {}))[1]
                siblings[leaf.index_in_parent] = (first, last)
            # (a leaf out of view can have its groups' Packed cells in view)
            if first <= PACKED_COLUMN <= last:
                _groups_changed(leaf, self._root, groups, seen, shown)
        for table in (leaves, groups):
            for parent, changed in table.values():
                for lo, hi, first, last in row_runs(changed):
                    self.dataChanged.emit(
                        self.createIndex(lo, first, parent.children[lo]),
                        self.createIndex(hi, last, parent.children[hi]),
                    )

    def _changed(self, node: _Node) -> None:
        """Every visible cell may have new numbers: one dataChanged per group of siblings."""
        if not node.children:
            return
        parent = (
            QModelIndex() if node is self._root else self.createIndex(node.index_in_parent, 0, node)
        )
        last = len(node.children) - 1
        self.dataChanged.emit(self.index(0, 0, parent), self.index(last, len(COLUMNS) - 1, parent))
        for child in node.children:
            self._changed(child)


def _groups_changed(
    leaf: _Node,
    root: _Node,
    groups: dict[int, tuple[_Node, dict[int, tuple[int, int]]]],
    seen: set[int],
    shown: set[int] | None,
) -> None:
    """Add the groups above ``leaf`` that ``shown`` holds (None: all) to ``groups`` (their
    Packed cell, by parent), each once: ``seen`` holds the groups already walked."""
    node = leaf.parent
    while node is not root and id(node) not in seen:
        seen.add(id(node))
        if shown is None or id(node) in shown:
            siblings = groups.setdefault(id(node.parent), (node.parent, {}))[1]
            siblings[node.index_in_parent] = (PACKED_COLUMN, PACKED_COLUMN)
        node = node.parent
