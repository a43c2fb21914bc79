"""The layers grouped by module path (``layer2`` > ``layer2.0`` > ``conv1``), collapsible.

`LayerTreeModel` is a view of the flat `LayerTableModel`: leaves show the same cells as the
table (read from it, so the live preview's numbers are computed once) with the short name in
the first column; group rows sum parameters and packed bytes of the layers under them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from PySide6.QtCore import QAbstractItemModel, QModelIndex, QPersistentModelIndex, Qt

from app.style import human_bytes, human_count
from app.widgets.layer_table import COLUMNS, NAME_ROLE, LayerTableModel


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
        #: Whether a view shows the tree: a hidden tree skips the per-step change signals
        #: (a view asks for fresh cells when it is shown again).
        self.live = False
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
            if col == 0 and role == Qt.ItemDataRole.DisplayRole:
                text = self.source.index(node.row, 0).data()
                # Keep the override mark, show the short name (the full one is in the tooltip).
                mark = text[: len(text) - len(node.path)] if text.endswith(node.path) else ""
                return mark + node.name
            return self.source.index(node.row, col).data(role)
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

    def _on_source_dataChanged(self, top_left=None, bottom_right=None, *_args) -> None:
        self._packed_text.clear()
        if not self.live:
            return
        if top_left is None or bottom_right is None or not top_left.isValid():
            self._changed(self._root)
            return
        # The source's rows top..bottom changed: those leaves and the groups above them (whose
        # packed sums follow), one dataChanged per run of siblings.
        lo, hi = top_left.row(), bottom_right.row()
        first_col, last_col = top_left.column(), bottom_right.column()
        runs: dict[int, tuple[_Node, list[int]]] = {}
        groups: dict[int, tuple[_Node, list[int]]] = {}
        for row in range(lo, hi + 1):
            leaf = self._by_row.get(row)
            if leaf is None:
                continue
            parent = leaf.parent
            runs.setdefault(id(parent), (parent, []))[1].append(leaf.index_in_parent)
            node = parent
            while node is not None and node is not self._root:
                up = node.parent
                groups.setdefault(id(up), (up, []))[1].append(node.index_in_parent)
                node = up
        for table, cols in ((runs, (first_col, last_col)), (groups, (0, len(COLUMNS) - 1))):
            for parent, rows in table.values():
                index = (
                    QModelIndex()
                    if parent is self._root
                    else self.createIndex(parent.index_in_parent, 0, parent)
                )
                self.dataChanged.emit(
                    self.index(min(rows), cols[0], index), self.index(max(rows), cols[1], index)
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
