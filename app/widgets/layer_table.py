"""The layer inventory as a sortable, filterable table with the live preview's numbers."""

from __future__ import annotations

import math
from collections.abc import Sequence

from PySide6.QtCore import (
    QAbstractTableModel,
    QEvent,
    QItemSelection,
    QItemSelectionModel,
    QModelIndex,
    QPersistentModelIndex,
    QPoint,
    QRegularExpression,
    QSortFilterProxyModel,
    Qt,
    Signal,
)
from PySide6.QtGui import QPaintEvent, QStandardItem, QStandardItemModel
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QSizePolicy,
    QStackedWidget,
    QTableView,
    QTreeView,
    QVBoxLayout,
    QWidget,
)
from superqt.utils import signals_blocked

from app.style import bits_text, decibels, human_bytes, human_count, percent

COLUMNS = ("Layer", "Type", "Params", "Sparsity", "Bits", "Packed", "SQNR")
TOOLTIPS = (
    "Layer name (module path; LSTM/attention weights get one row per matrix)",
    "Module type",
    "Number of parameters of the layer (all its tensors)",
    "Fraction of the compressible weight that the current plan prunes (exact)",
    "Quantization width of the current plan (fp32 = not quantized)",
    "Bytes of this tensor in the packed archive (hover a cell for the dense fp32 size)",
    "Estimated signal-to-quantization-and-pruning-noise ratio of this tensor (higher is "
    "better; ∞ dB = untouched, lossless)",
)
#: Widest the Type column is sized to (pixels); longer type names are elided.
TYPE_MAX_WIDTH = 110
#: Layers above which a model of nested modules opens grouped by module path.
AUTO_GROUP = 30
#: Longest layer name (characters) the flat table shows whole in the default dock; a nested
#: model with a longer one opens grouped too (``model.layers.0.mlp.gate_proj`` would be
#: elided to ``mod…roj`` in every row).
NAME_FIT = 18
#: The Type column gives up width down to this before layer names are elided.
TYPE_MIN_WIDTH = 56
#: The widest text each number column shows (sizes the column once per model).
WIDEST_VALUES = {3: "100.0 %", 4: "16 bit", 5: "1023.99 KiB", 6: "-99.9 dB"}
#: Pixels beside a column title (the header's padding and a little air).
HEADER_MARGIN = 12
#: Role under which each cell exposes a number for sorting.
SORT_ROLE = Qt.ItemDataRole.UserRole + 1
NAME_ROLE = Qt.ItemDataRole.UserRole + 2
#: True for layers that have their own settings (a plan override).
OVERRIDE_ROLE = Qt.ItemDataRole.UserRole + 3
#: Drawn before the name of a layer with its own settings.
OVERRIDE_MARK = "◆"
#: Drawn before the name of a layer the target solver keeps as it is (pinned).
PIN_MARK = "⚑"
_DISPLAY = Qt.ItemDataRole.DisplayRole
_ALIGNMENT = Qt.ItemDataRole.TextAlignmentRole
_FOREGROUND = Qt.ItemDataRole.ForegroundRole
_FONT = Qt.ItemDataRole.FontRole
_RIGHT = int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
_ROLES = frozenset(
    (
        SORT_ROLE,
        NAME_ROLE,
        OVERRIDE_ROLE,
        Qt.ItemDataRole.FontRole,
        Qt.ItemDataRole.TextAlignmentRole,
        Qt.ItemDataRole.ToolTipRole,
        Qt.ItemDataRole.ForegroundRole,
    )
)
#: Columns before this one (name, type, parameters) do not depend on the preview.
_FIRST_NUMBER_COLUMN = 3
_TOOLTIP = Qt.ItemDataRole.ToolTipRole
#: The Packed column: its tooltip has the layer's sizes; every other cell's is the layer's.
PACKED_COLUMN = COLUMNS.index("Packed")
#: A cell's roles that do not follow the plan (copied when an item model is built).
STATIC_ROLES = (NAME_ROLE, _ALIGNMENT, _FOREGROUND)
#: Cells are selectable, not editable or draggable (a QAbstractItemModel's default).
ITEM_FLAGS = Qt.ItemFlag.ItemIsSelectable | Qt.ItemFlag.ItemIsEnabled


def copy_row(source, row: int, first: int, last: int, put, *, static=False, name=None) -> None:
    """Copy the cells ``first..last`` of ``source``'s (a `LayerTableModel`) ``row`` into an
    item model through ``put(column, role, value)``: the text, tooltip, and for the name
    the bold override font and mark; ``static``: also the roles that never change for a
    layer (`STATIC_ROLES`); ``name``: the text of column 0 (default the table's)."""
    tip = source.cell(row, 0, _TOOLTIP)
    for col in range(first, last + 1):
        if col == 0:
            put(0, _DISPLAY, source.cell(row, 0) if name is None else name)
            put(0, _FONT, source.cell(row, 0, _FONT))
            put(0, OVERRIDE_ROLE, source.cell(row, 0, OVERRIDE_ROLE))
        else:
            put(col, _DISPLAY, source.cell(row, col))
        put(col, _TOOLTIP, source.cell(row, col, _TOOLTIP) if col == PACKED_COLUMN else tip)
        if static:
            for role in STATIC_ROLES:
                value = source.cell(row, col, role)
                if value is not None:
                    put(col, role, value)


class LayerTableModel(QAbstractTableModel):
    """Rows are `LayerInfo` records; preview columns come from the current `PlanPreview`."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self._layers: tuple = ()
        self._preview: dict[str, object] = {}
        self._overrides: frozenset[str] = frozenset()
        self._pins: frozenset[str] = frozenset()
        # Display strings per row, rebuilt once per preview: the view asks for every visible
        # cell and role on each repaint, which during a slider drag is every step.
        self._cells: list[tuple[str, ...]] = []
        self._row_index: dict[str, int] = {}
        self._muted_color = None

    def set_layers(self, layers: Sequence) -> None:
        self.beginResetModel()
        self._layers = tuple(layers)
        self._row_index = {layer.name: i for i, layer in enumerate(self._layers)}
        self._preview = {}
        self._rebuild_cells()
        self.endResetModel()

    def _row_cells(self, layer) -> tuple[str, ...]:
        """The display strings of ``layer``'s row."""
        lp = self._preview.get(layer.name)
        cells = tuple(self._display(layer, lp, col, self._overrides) for col in range(len(COLUMNS)))
        if layer.name in self._pins:
            return (f"{PIN_MARK} {cells[0]}", *cells[1:])
        return cells

    def _rebuild_cells(self) -> None:
        self._muted_color = None  # the palette may have changed since the last preview
        self._cells = [self._row_cells(layer) for layer in self._layers]

    def _update_rows(self, rows: Sequence[int], *, numbers_only: bool = False) -> None:
        """Rebuild the cells of ``rows`` (ascending) and signal the ones whose text changed
        (one dataChanged per run of rows with the same changed columns). ``numbers_only``:
        only the preview changed, so the name, type and size cells are kept as they are."""
        old = [self._cells[r] for r in rows]
        if numbers_only:
            first = _FIRST_NUMBER_COLUMN
            for r, cells in zip(rows, old, strict=True):
                layer = self._layers[r]
                lp = self._preview.get(layer.name)
                self._cells[r] = cells[:first] + tuple(
                    self._display(layer, lp, col) for col in range(first, len(COLUMNS))
                )
        else:
            for r in rows:
                self._cells[r] = self._row_cells(self._layers[r])
        new = [self._cells[r] for r in rows]
        for top, bottom, first, last in changed_runs(old, new, rows):
            self.dataChanged.emit(self.index(top, first), self.index(bottom, last))

    def _rows_named(self, names) -> list[int]:
        return sorted(self._row_index[n] for n in names if n in self._row_index)

    def set_pins(self, names) -> None:
        """Mark (⚑) the layers the target solver keeps as they are (no-op when unchanged)."""
        names = frozenset(names)
        if names == self._pins:
            return
        changed = names ^ self._pins
        self._pins = names
        self._update_rows(self._rows_named(changed))

    def set_overrides(self, names) -> None:
        """Mark the layers ``names`` as having their own settings (no-op when unchanged).
        Only the rows that gain or lose the mark are rebuilt and signalled (a target step
        re-plans every layer, but few of them change between override and default)."""
        names = frozenset(names)
        if names == self._overrides:
            return
        changed = names ^ self._overrides
        self._overrides = names
        self._update_rows(self._rows_named(changed))

    def set_preview(self, preview, *, changed_only: bool = False) -> None:
        """Show ``preview``'s numbers. ``changed_only``: rebuild only the rows whose
        `LayerPreview` is a new object (`core.analysis.estimate.PreviewCache` hands back the
        same object for a layer a step did not change) and signal only the cells whose text
        changed (one dataChanged per run of rows), so a view repaints just those; a
        whole-model drag changes the prunable rows' numbers, not the norms' rows or Bits."""
        old = self._preview
        self._preview = {} if preview is None else {lp.name: lp for lp in preview.layers}
        if not self._layers:
            self._cells = []
            return
        if not changed_only or not old or not self._preview:
            self._rebuild_cells()
            self.dataChanged.emit(
                self.index(0, _FIRST_NUMBER_COLUMN),
                self.index(len(self._layers) - 1, len(COLUMNS) - 1),
            )
            return
        self._muted_color = None  # the palette may have changed since the last preview
        new = self._preview
        rows = [
            i
            for i, layer in enumerate(self._layers)
            if new.get(layer.name) is not old.get(layer.name)
        ]
        self._update_rows(rows, numbers_only=True)

    def layer(self, row: int):
        return self._layers[row]

    def preview_of(self, name: str):
        """The current `LayerPreview` of ``name`` (None before the first preview)."""
        return self._preview.get(name)

    def row_of(self, name: str) -> int:
        return self._row_index.get(name, -1)

    def rowCount(self, parent=QModelIndex()) -> int:  # noqa: B008 - Qt signature
        return 0 if parent.isValid() else len(self._layers)

    def columnCount(self, parent=QModelIndex()) -> int:  # noqa: B008 - Qt signature
        return 0 if parent.isValid() else len(COLUMNS)

    def headerData(self, section, orientation, role=Qt.ItemDataRole.DisplayRole):
        if orientation == Qt.Orientation.Horizontal:
            if role == Qt.ItemDataRole.DisplayRole:
                return COLUMNS[section]
            if role == Qt.ItemDataRole.ToolTipRole:
                return TOOLTIPS[section]
        return None

    def data(self, index: QModelIndex | QPersistentModelIndex, role=Qt.ItemDataRole.DisplayRole):
        if role == _DISPLAY:
            return self._cells[index.row()][index.column()]
        if role not in _ROLES or not index.isValid():
            return None
        return self.cell(index.row(), index.column(), role)

    def cell(self, row: int, col: int, role=Qt.ItemDataRole.DisplayRole):
        """`data` of the cell at ``row``, ``col`` without a model index (what the views'
        item-model copies, `CellCopies`, are filled from)."""
        if role == _DISPLAY:
            return self._cells[row][col]
        if role not in _ROLES:
            return None
        # The roles a repaint asks of every visible cell first, without the lookups below.
        if role == _ALIGNMENT:
            return _RIGHT if col >= 2 else None
        if role == _FOREGROUND:
            return None if self._layers[row].prunable else self._muted()
        if role == _FONT and col != 0:
            return None
        layer = self._layers[row]
        lp = self._preview.get(layer.name)
        if role == NAME_ROLE:
            return layer.name
        if role == OVERRIDE_ROLE:
            return layer.name in self._overrides
        if role == Qt.ItemDataRole.FontRole:
            if col == 0 and layer.name in self._overrides:
                from PySide6.QtGui import QFont

                font = QFont()
                font.setBold(True)
                return font
            return None
        if role == SORT_ROLE:
            return self._sort_key(layer, lp, col)
        if role == Qt.ItemDataRole.TextAlignmentRole and col >= 2:
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        if role == Qt.ItemDataRole.ToolTipRole and col == 5 and lp is not None:
            return (
                f"dense fp32 {human_bytes(lp.dense_bytes)} → packed {human_bytes(lp.packed_bytes)}"
                f" (entropy bound {human_bytes(lp.entropy_bytes)})"
            )
        if role == Qt.ItemDataRole.ToolTipRole:
            shape = "×".join(str(s) for s in layer.shape)
            tip = f"{layer.name} ({layer.type}, weight {shape})"
            if not layer.prunable:
                tip += " — not compressed by default (norms, biases-only layers)"
            if layer.name in self._overrides:
                tip += f" — {OVERRIDE_MARK} has its own settings (not the model default)"
            if layer.name in self._pins:
                tip += f" — {PIN_MARK} pinned: the target solver keeps its settings"
            if lp is not None and lp.skip:
                tip += " — skipped by the plan"
            return tip
        if role == Qt.ItemDataRole.ForegroundRole and not layer.prunable:
            return self._muted()
        return None

    def _muted(self):
        """The disabled-text colour of the application palette (looked up once per preview:
        every painted cell of a norm's row asks for it)."""
        if self._muted_color is None:
            from PySide6.QtGui import QPalette
            from PySide6.QtWidgets import QApplication

            self._muted_color = QApplication.palette().color(
                QPalette.ColorGroup.Disabled, QPalette.ColorRole.Text
            )
        return self._muted_color

    @staticmethod
    def _display(layer, lp, col: int, overrides: frozenset[str] = frozenset()) -> str:
        if col == 0:
            return f"{OVERRIDE_MARK} {layer.name}" if layer.name in overrides else layer.name
        if col == 1:
            return layer.type
        if col == 2:
            return human_count(layer.params)
        if lp is None:
            return "" if not layer.prunable else "…"
        if col == 3:
            return percent(lp.sparsity)
        if col == 4:
            return bits_text(lp.bits)
        if col == 5:
            return human_bytes(lp.packed_bytes)
        if col == 6:
            # The table is narrow: "∞ dB" there, the summary spells out "lossless".
            return decibels(lp.sqnr_db, short=True)
        return ""

    @staticmethod
    def _sort_key(layer, lp, col: int):
        if col == 0:
            return layer.name
        if col == 1:
            return layer.type
        if col == 2:
            return layer.params
        if lp is None:
            return -1.0
        if col == 3:
            return float(lp.sparsity)
        if col == 4:
            return 32 if lp.bits is None else lp.bits
        if col == 5:
            return float(lp.packed_bytes)
        if col == 6:
            v = float(lp.sqnr_db)
            return 1e9 if math.isinf(v) and v > 0 else v
        return 0


def changed_runs(
    old: Sequence[tuple[str, ...]],
    new: Sequence[tuple[str, ...]],
    rows: Sequence[int] | None = None,
) -> list[tuple[int, int, int, int]]:
    """``(top, bottom, first column, last column)`` per run of consecutive rows whose cells
    differ between ``old`` and ``new`` (same row count) over the same span of columns.
    ``rows``: the row number of each entry (ascending; default ``0, 1, ...``)."""
    spans: dict[int, tuple[int, int]] = {}
    for i, (a, b) in enumerate(zip(old, new, strict=True)):
        if a == b:
            continue
        cols = [c for c, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
        spans[i if rows is None else rows[i]] = (cols[0], cols[-1])
    return row_runs(spans)


def row_runs(spans: dict[int, tuple[int, int]]) -> list[tuple[int, int, int, int]]:
    """``(first row, last row, first column, last column)`` per run of consecutive rows of
    ``{row: (first column, last column)}`` with the same columns."""
    runs: list[tuple[int, int, int, int]] = []
    for row in sorted(spans):
        first, last = spans[row]
        if runs and runs[-1][1] == row - 1 and runs[-1][2:] == (first, last):
            runs[-1] = (runs[-1][0], row, first, last)
        else:
            runs.append((row, row, first, last))
    return runs


class CellCopies(QStandardItemModel):
    """A Qt item model holding copies of a `LayerTableModel`'s cells, for a view to paint
    without calling into Python (`LayerTableItems`, `app.widgets.layer_tree.LayerTreeModel`).

    Subclasses write the copies (`rebuild` on a reset, `_on_source_dataChanged` per change,
    `_refresh_all`). While ``live`` is off (its view hidden) changes only mark it stale; it
    is refreshed when ``live`` is turned on again.
    """

    def __init__(self, source: LayerTableModel, parent=None, *, live: bool = True):
        super().__init__(parent)
        self.source = source
        self.setColumnCount(len(COLUMNS))
        self._live = live
        self._stale = False

    def _follow(self) -> None:
        """Build the copies and follow the source's resets and changes (end of __init__)."""
        self.source.modelReset.connect(self.rebuild)
        self.source.dataChanged.connect(self._on_source_dataChanged)
        self.rebuild()

    @property
    def live(self) -> bool:
        return self._live

    @live.setter
    def live(self, on: bool) -> None:
        self._live = on
        if on and self._stale:
            self._refresh_all()

    def headerData(self, section, orientation, role=Qt.ItemDataRole.DisplayRole):
        return self.source.headerData(section, orientation, role)

    def rebuild(self) -> None:
        raise NotImplementedError

    def _refresh_all(self) -> None:
        raise NotImplementedError

    def _on_source_dataChanged(self, *args) -> None:  # noqa: N802 - Qt's naming
        raise NotImplementedError


class LayerTableItems(CellCopies):
    """The flat table's cells in Qt's own item model, copied from a `LayerTableModel`.

    The view (through the filtering and sorting proxy) paints from here without calling
    into Python: a Python model was asked ~0.8k times per slider step (each index checked
    against its row and column counts, each painted cell's roles). The table's change
    signals are copied in as they come, only the cells whose value differs. The sort keys
    are written only when a sort needs them (`refresh_sort_keys`; rows do not move during a
    drag). A hidden table (the module tree shown) is brought up to date when shown again.
    """

    def __init__(self, source: LayerTableModel, parent=None):
        super().__init__(source, parent)
        self._written: dict[tuple[int, int, int], object] = {}
        self._sort_stale = True
        self._follow()

    def layer(self, row: int):
        return self.source.layer(row)

    def rebuild(self) -> None:
        self.beginResetModel()
        blocked = self.blockSignals(True)  # one reset, not a signal per item
        try:
            self.removeRows(0, self.rowCount())
            self._written = {}
            for _ in range(self.source.rowCount()):
                items = [QStandardItem() for _ in COLUMNS]
                for item in items:
                    item.setFlags(ITEM_FLAGS)
                self.appendRow(items)
            self._stale = False
            self._fill()
        finally:
            self.blockSignals(blocked)
        self.endResetModel()

    def _fill(self) -> None:
        for row in range(self.rowCount()):
            self._write(row, 0, len(COLUMNS) - 1, static=True)

    def _refresh_all(self) -> None:
        self._stale = False
        self._fill()

    def _write(self, row: int, first: int, last: int, *, static: bool = False) -> None:
        def put(col: int, role: int, value: object) -> None:
            key = (row, col, role)
            if key in self._written and self._written[key] == value:
                return
            self._written[key] = value
            self.item(row, col).setData(value, role)

        copy_row(self.source, row, first, last, put, static=static)
        self._sort_stale = True

    def refresh_sort_keys(self) -> None:
        """Write every cell's sort key (before a sort; no change signals: nothing is shown
        from them)."""
        if not self._sort_stale:
            return
        blocked = self.blockSignals(True)
        try:
            for row in range(self.rowCount()):
                for col in range(len(COLUMNS)):
                    self.item(row, col).setData(self.source.cell(row, col, SORT_ROLE), SORT_ROLE)
        finally:
            self.blockSignals(blocked)
        self._sort_stale = False

    def _on_source_dataChanged(self, top_left=None, bottom_right=None, *_args) -> None:
        if not self._live:
            self._stale = True
            self._sort_stale = True
            return
        if top_left is None or bottom_right is None or not top_left.isValid():
            self._refresh_all()
            return
        for row in range(top_left.row(), bottom_right.row() + 1):
            self._write(row, top_left.column(), bottom_right.column())


class _Proxy(QSortFilterProxyModel):
    """Filters on name and type at once (one line edit), sorts by the numeric sort role;
    ``prunable_only`` hides the layers the plan does not compress (norms...)."""

    prunable_only = False

    def sort(self, column: int, order=Qt.SortOrder.AscendingOrder) -> None:
        """Sort on fresh keys (`LayerTableItems` writes its sort keys only when asked)."""
        source = self.sourceModel()
        if isinstance(source, LayerTableItems):
            source.refresh_sort_keys()
        super().sort(column, order)

    def filterAcceptsRow(self, source_row: int, source_parent: QModelIndex) -> bool:
        model = self.sourceModel()
        if self.prunable_only and not model.layer(source_row).prunable:
            return False
        rx = self.filterRegularExpression()
        if not rx.pattern():
            return True
        for col in (0, 1):
            text = model.index(source_row, col, source_parent).data()
            if text and rx.match(text).hasMatch():
                return True
        return False


class _TreeView(QTreeView):
    """The module tree's view, painting each rectangle of the dirty region on its own.

    For a dirty region of several rectangles (a drag changes the number columns of rows
    spread over several groups) `QTreeView.drawTree` paints the *whole width* of every row it
    touches, the indented, elided names included; for a single rectangle it paints only the
    rows and columns under it. Painting rectangle by rectangle thus paints the cells that
    changed, not every visible cell (the rectangles of a region do not overlap)."""

    def paintEvent(self, event: QPaintEvent) -> None:  # noqa: N802 - Qt signature
        model = self.model()
        if getattr(model, "_pending", None):
            # Rows scrolled or unfolded into view get the numbers that waited for them.
            model.flush_pending(model.shown())
        region = event.region()
        if region.rectCount() <= 1:
            super().paintEvent(event)
            return
        for rect in region:
            super().paintEvent(QPaintEvent(rect))


class LayerTable(QWidget):
    """Filter line edit over the layer table; emits the selected layer names."""

    layersSelected = Signal(tuple)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.model = LayerTableModel(self)
        self.items = LayerTableItems(self.model, self)
        self.proxy = _Proxy(self)
        self.proxy.setSourceModel(self.items)
        self.proxy.setSortRole(SORT_ROLE)
        # Rows must not jump under the mouse while a slider is dragged (and re-sorting on every
        # step costs more than the preview): the order is refreshed by `resort`.
        self.proxy.setDynamicSortFilter(False)
        self.proxy.setFilterCaseSensitivity(Qt.CaseSensitivity.CaseInsensitive)
        self.filter_edit = QLineEdit(self)
        self.filter_edit.setPlaceholderText("Filter layers by name or type (e.g. conv, fc2)")
        self.filter_edit.setClearButtonEnabled(True)
        self.filter_edit.setToolTip("Show only layers whose name or type contains this text")
        self.filter_edit.textChanged.connect(self._on_filter_textChanged)
        self.view = QTableView(self)
        self.view.setObjectName("layerTable")
        self.view.setModel(self.proxy)
        self.view.setSortingEnabled(True)
        self.view.sortByColumn(-1, Qt.SortOrder.AscendingOrder)
        self.view.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.view.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.view.setAlternatingRowColors(True)
        self.view.verticalHeader().setVisible(False)
        self.view.verticalHeader().setDefaultSectionSize(22)
        # Long module paths are shortened in the middle (the tooltip has the full name) so the
        # numbers (sparsity, bits, bytes, SQNR) stay visible in a narrow dock.
        self.view.setTextElideMode(Qt.TextElideMode.ElideMiddle)
        self._type_width: int | None = None  # the Type column's width before balancing
        self.view.installEventFilter(self)
        header = self.view.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        header.setStretchLastSection(False)
        header.setMinimumSectionSize(36)
        self.view.selectionModel().selectionChanged.connect(self._on_view_selectionChanged)

        from app.widgets.layer_tree import LayerTreeModel

        self.tree_model = LayerTreeModel(self.model, self)
        self.tree = _TreeView(self)
        self.tree.setObjectName("layerTree")
        self.tree.setModel(self.tree_model)
        self.tree.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.tree.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.tree.setAlternatingRowColors(True)
        self.tree.setUniformRowHeights(True)
        self.tree.header().setStretchLastSection(False)
        self.tree.header().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.tree.selectionModel().selectionChanged.connect(self._on_tree_selectionChanged)
        self.tree_model.modelReset.connect(self._on_treeModel_modelReset)
        self.tree_model.shown = self._tree_rows_shown
        self.views = QStackedWidget(self)
        self.views.addWidget(self.view)
        self.views.addWidget(self.tree)

        self.prunable_only = QCheckBox("Prunable only", self)
        self.prunable_only.setObjectName("prunableOnly")
        self.prunable_only.setToolTip(
            "Hide the layers the plan does not compress (BatchNorm/LayerNorm, bias-only)"
        )
        self.prunable_only.toggled.connect(self._on_prunableOnly_toggled)
        self.grouped = QCheckBox("Group by module", self)
        self.grouped.setObjectName("groupByModule")
        self.grouped.setToolTip(
            "Show the layers as a tree of their module path (layer2 ▸ layer2.0 ▸ conv1); "
            "click the arrows to fold blocks away"
        )
        self.grouped.toggled.connect(self._on_grouped_toggled)
        # Until the user clicks it, grouping follows the model: on for models of nested
        # modules with more than `AUTO_GROUP` layers or names longer than `NAME_FIT` (flat
        # names like layer3.0.conv2 would be elided in a narrow dock), off otherwise.
        self._grouping_chosen = False
        self.grouped.clicked.connect(self._on_grouped_clicked)
        self.details = QLabel(self)
        self.details.setObjectName("layerDetails")
        self.details.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        # Fixed size: the line changes with the selection and must not re-lay out the dock.
        self.details.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
        self.details.setToolTip("Full name, type and weight shape of the selected layer")
        bar = QHBoxLayout()
        bar.addWidget(self.filter_edit, 1)
        bar.addWidget(self.prunable_only)
        bar.addWidget(self.grouped)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(bar)
        layout.addWidget(self.views, 1)
        layout.addWidget(self.details)

    def set_layers(self, layers: Sequence) -> None:
        with signals_blocked(self.view.selectionModel()):
            self.model.set_layers(layers)
        self._fit_columns()
        if not self._grouping_chosen:
            names = [str(layer.name) for layer in layers]
            nested = sum("." in name for name in names)
            long = max(map(len, names), default=0) > NAME_FIT
            self.grouped.setChecked((len(names) > AUTO_GROUP or long) and nested > len(names) // 2)

    def _on_grouped_clicked(self, _checked: bool) -> None:
        self._grouping_chosen = True

    def _fit_columns(self) -> None:
        """Size the columns to their contents, the layer name taking what is left."""
        header = self.view.horizontalHeader()
        metrics = header.fontMetrics()
        for col in range(1, len(COLUMNS)):
            # Qt's own header hint reserves room for a sort arrow on every column, which
            # pushes SQNR out of a 400 px dock; the title plus a margin is enough.
            title = metrics.horizontalAdvance(COLUMNS[col]) + HEADER_MARGIN
            # Room for the widest value the column takes while sliders move, not just the
            # values shown now (before any plan SQNR reads "∞ dB", later "19.7 dB").
            widest = self.view.fontMetrics().horizontalAdvance(WIDEST_VALUES.get(col, ""))
            width = max(self.view.sizeHintForColumn(col), title, widest + HEADER_MARGIN)
            if col == 1:
                # Type names can be long (e.g. MultiheadAttention): the tooltip has them.
                width = min(width, TYPE_MAX_WIDTH)
                self._type_width = width
            header.resizeSection(col, width)
        self._balance_type_column()

    def _balance_type_column(self) -> None:
        """Narrow the Type column (down to `TYPE_MIN_WIDTH`) before layer names get elided."""
        if self._type_width is None:
            return
        header = self.view.horizontalHeader()
        names = max(
            self.view.sizeHintForColumn(0),
            header.fontMetrics().horizontalAdvance(COLUMNS[0]) + HEADER_MARGIN,
        )
        others = sum(header.sectionSize(c) for c in range(2, header.count()))
        spare = self.view.viewport().width() - names - others
        width = max(TYPE_MIN_WIDTH, min(self._type_width, spare))
        if width != header.sectionSize(1):
            header.resizeSection(1, width)

    def eventFilter(self, watched, event) -> bool:
        if watched is self.view and event.type() == QEvent.Type.Resize:
            self._balance_type_column()
        return super().eventFilter(watched, event)

    def preferred_width(self) -> int:
        """Width that shows every column with the layer names unelided (for the dock)."""
        header = self.view.horizontalHeader()
        names = max(
            self.view.sizeHintForColumn(0),
            header.fontMetrics().horizontalAdvance(COLUMNS[0]) + HEADER_MARGIN,
        )
        rest = sum(header.sectionSize(c) for c in range(1, header.count()))
        return (
            names
            + rest
            + self.view.verticalScrollBar().sizeHint().width()
            + 2 * self.view.frameWidth()
            + 4
        )

    def resort(self) -> None:
        """Re-apply the current sort to the latest numbers (after a drag ends)."""
        column = self.proxy.sortColumn()
        if column >= 0:
            self.proxy.sort(column, self.proxy.sortOrder())

    def set_preview(self, preview) -> None:
        first = preview is not None and not self.model._preview
        # Only the cells whose text changed are signalled; the grouped tree maps those rows
        # to its leaves and the groups above them.
        with self.tree_model.batched():
            self.model.set_preview(preview, changed_only=True)
        if first:
            # Once per model, not per slider step: sizing columns measures every cell.
            self._fit_columns()

    def set_overrides(self, names) -> None:
        """Mark (◆, bold) the layers that have their own settings."""
        with self.tree_model.batched():
            self.model.set_overrides(names)

    def set_pins(self, names) -> None:
        """Mark (⚑) the layers pinned for the target solver."""
        with self.tree_model.batched():
            self.model.set_pins(names)

    def selected_names(self) -> tuple[str, ...]:
        rows = self.view.selectionModel().selectedRows()
        names = [self.proxy.data(idx, NAME_ROLE) for idx in rows]
        order = {layer.name: i for i, layer in enumerate(self.model._layers)}
        return tuple(sorted(names, key=lambda n: order.get(n, 0)))

    def select_names(self, names: Sequence[str]) -> None:
        """Model -> widget: select ``names`` without echoing a selection signal."""
        self._select_in_tree(names)
        self._show_details(names)
        selection = QItemSelection()
        for name in names:
            row = self.model.row_of(name)
            if row < 0:
                continue
            idx = self.proxy.mapFromSource(self.items.index(row, 0))
            if idx.isValid():
                selection.select(idx, idx)
        sm = self.view.selectionModel()
        with signals_blocked(sm):
            sm.select(
                selection,
                QItemSelectionModel.SelectionFlag.ClearAndSelect
                | QItemSelectionModel.SelectionFlag.Rows,
            )
            if names:
                row = self.model.row_of(names[0])
                if row >= 0:
                    idx = self.proxy.mapFromSource(self.items.index(row, 0))
                    sm.setCurrentIndex(idx, QItemSelectionModel.SelectionFlag.NoUpdate)
                    self.view.scrollTo(idx)
        self.view.viewport().update()

    def _on_filter_textChanged(self, text: str) -> None:
        self.proxy.setFilterRegularExpression(
            QRegularExpression(
                QRegularExpression.escape(text.strip()),
                QRegularExpression.PatternOption.CaseInsensitiveOption,
            )
        )
        self._refilter_tree()

    def _on_view_selectionChanged(self, *_):
        names = self.selected_names()
        self._show_details(names)
        self.layersSelected.emit(names)

    # ------------------------------------------------------------------ tree, details
    def _refilter_tree(self) -> None:
        proxy = self.proxy
        self.tree_model.set_filter(lambda row: proxy.filterAcceptsRow(row, QModelIndex()))

    def _on_prunableOnly_toggled(self, on: bool) -> None:
        if hasattr(self.proxy, "beginFilterChange"):  # Qt >= 6.10; invalidateFilter before
            self.proxy.beginFilterChange()
            self.proxy.prunable_only = on
            self.proxy.endFilterChange(QSortFilterProxyModel.Direction.Rows)
        else:
            self.proxy.prunable_only = on
            self.proxy.invalidateFilter()
        self._refilter_tree()

    def _on_grouped_toggled(self, on: bool) -> None:
        self.tree_model.live = on
        self.items.live = not on
        self.views.setCurrentWidget(self.tree if on else self.view)
        if on:
            self._fit_tree_columns()
            self._select_in_tree(self.selected_names())

    def _on_treeModel_modelReset(self) -> None:
        self.tree.expandAll()
        self._select_in_tree(self.selected_names())
        self._fit_tree_columns()

    def _fit_tree_columns(self) -> None:
        """The tree's value columns as wide as the table's (fitted to their contents); the
        name column (indented by depth) takes the rest."""
        if self._type_width is not None:
            for col in range(1, len(COLUMNS)):
                self.tree.header().resizeSection(col, self.view.horizontalHeader().sectionSize(col))
        # The tree's names are short (conv1 under layer3.0) but indented by depth: the type
        # column gives them its room (the type is in the details line and the tooltip).
        self.tree.setIndentation(12)
        self.tree.setColumnHidden(1, True)

    def _tree_rows_shown(self) -> set[int] | None:
        """The ids of the tree nodes whose rows the tree view shows now (a slider step writes
        only those: `LayerTreeModel.shown`); None when the view is not laid out yet."""
        view = self.tree
        model = self.tree_model
        index = view.indexAt(QPoint(0, 0))
        if not view.isVisible() or not index.isValid():
            return None
        rows = view.viewport().height() // max(1, view.rowHeight(index)) + 2
        shown = set()
        for _ in range(rows):
            if not index.isValid():
                break
            node = model.node_at(index)
            if node is not None:
                shown.add(id(node))
            index = view.indexBelow(index)
        return shown

    def tree_selected_names(self) -> tuple[str, ...]:
        rows = self.tree.selectionModel().selectedRows()
        names = {idx.data(NAME_ROLE) for idx in rows} - {None}
        order = {layer.name: i for i, layer in enumerate(self.model._layers)}
        return tuple(sorted(names, key=lambda n: order.get(n, 0)))

    def _on_tree_selectionChanged(self, *_):
        names = self.tree_selected_names()
        if names:
            # Mirror into the table (the selection the window reads), then tell the window.
            with signals_blocked(self.tree.selectionModel()):
                self.select_names(names)
            self.layersSelected.emit(names)

    def _select_in_tree(self, names: Sequence[str]) -> None:
        selection = QItemSelection()
        for name in names:
            idx = self.tree_model.index_of(name)
            if idx.isValid():
                selection.select(idx, idx)
        sm = self.tree.selectionModel()
        with signals_blocked(sm):
            sm.select(
                selection,
                QItemSelectionModel.SelectionFlag.ClearAndSelect
                | QItemSelectionModel.SelectionFlag.Rows,
            )
            first = self.tree_model.index_of(names[0]) if names else QModelIndex()
            if first.isValid():
                sm.setCurrentIndex(first, QItemSelectionModel.SelectionFlag.NoUpdate)
                self.tree.scrollTo(first)
        self.tree.viewport().update()

    def _show_details(self, names: Sequence[str]) -> None:
        if not names:
            self.details.setText("")
            return
        row = self.model.row_of(names[0])
        if row < 0:
            self.details.setText("")
            return
        layer = self.model.layer(row)
        shape = "×".join(str(s) for s in layer.shape)
        more = f"  (+{len(names) - 1} more)" if len(names) > 1 else ""
        self.details.setText(f"{layer.name} · {layer.type} · {shape}{more}")
        self.details.setToolTip(layer.name)
