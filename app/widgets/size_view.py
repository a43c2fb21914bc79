"""Whole-model view: bytes per layer as dense fp32 vs the packed archive under the plan."""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Signal
from PySide6.QtWidgets import QVBoxLayout, QWidget

from app import style

#: Horizontal bars: at most this many layers get a name on the axis (the rest stay readable
#: by hovering); a 200-layer transformer would otherwise print an unreadable wall of text.
MAX_LABELLED = 60
#: Pixels of height per named bar (a label line plus spacing).
LABEL_PX = 15
#: At most this many layers get a bar of their own (the largest, plus the selected ones);
#: the rest are summed into one "others" bar, so 100-500 layers stay readable.
TOP_N = 24
OTHERS = "others"


def shown_rows(dense: np.ndarray, selected: set[int], top_n: int = TOP_N) -> list[int]:
    """Indices (in model order) of the layers that get a bar: the ``top_n`` largest by dense
    size plus the ``selected`` ones; every layer when there are no more than ``top_n + 1``."""
    n = len(dense)
    if n <= top_n + 1:
        return list(range(n))
    largest = np.argsort(-dense, kind="stable")[:top_n]
    return sorted(set(int(i) for i in largest) | {i for i in selected if 0 <= i < n})


def size_unit(max_bytes: float) -> tuple[str, float]:
    """Axis unit and divisor for bars up to ``max_bytes``: KiB, or MiB from 10 MiB on."""
    return ("MiB", 1024.0**2) if max_bytes >= 10 * 1024**2 else ("KiB", 1024.0)


class SizeView(QWidget):
    """Horizontal bar per prunable layer: grey = dense fp32 bytes, blue = packed bytes."""

    layerClicked = Signal(str)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.plot = pg.PlotWidget(self)
        self.plot.setObjectName("sizePlot")
        self.plot.setMenuEnabled(False)
        # Colour-coded title instead of a legend: a legend box would sit on the bars.
        self.plot.setTitle(
            f"Size per layer: <span style='color:{style.DENSE_COLOR.name()}'>■ dense fp32</span>"
            f" vs <span style='color:{style.PACKED_COLOR.name()}'>■ packed (plan)</span>",
            size="10pt",
        )
        self.plot.setLabel("bottom", "size (KiB)")
        # Plain numbers in the unit the label names (no "(x1e+03)" SI surprise).
        for side in ("left", "bottom"):
            self.plot.getAxis(side).enableAutoSIPrefix(False)
        self.plot.showGrid(x=True, y=False, alpha=0.15)
        self.plot.getPlotItem().invertY(True)
        self.dense = pg.BarGraphItem(
            x0=[], y=[], width=[], height=0.38, brush=pg.mkBrush(style.DENSE_COLOR), pen=None
        )
        self.packed = pg.BarGraphItem(
            x0=[], y=[], width=[], height=0.38, brush=pg.mkBrush(style.PACKED_COLOR), pen=None
        )
        self.plot.addItem(self.dense)
        self.plot.addItem(self.packed)
        self.selected = pg.BarGraphItem(
            x0=[],
            y=[],
            width=[],
            height=0.9,
            brush=pg.mkBrush(None),
            pen=pg.mkPen(style.THRESHOLD_COLOR, width=1.5),
        )
        self.plot.addItem(self.selected)
        self._names: list[str] = []
        self._ticks: list[tuple[int, str]] = []
        self._dense: np.ndarray = np.zeros(0)
        self._preview = None
        self._unit = "KiB"
        self.plot.scene().sigMouseClicked.connect(self._on_scene_sigMouseClicked)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.plot)
        self.apply_theme()

    def apply_theme(self) -> None:
        style.apply_plot_theme(self.plot)

    def set_preview(self, preview, selection: tuple[str, ...] = ()) -> None:
        self._preview = preview
        if preview is None:
            self._names = []
            self._ticks = []
            self.dense.setOpts(x0=[], y=[], width=[])
            self.packed.setOpts(x0=[], y=[], width=[])
            self.selected.setOpts(x0=[], y=[], width=[])
            self.plot.getAxis("left").setTicks([[]])
            return
        layers = list(preview.layers)
        all_dense = np.array([lp.dense_bytes for lp in layers], dtype=np.float64)
        all_packed = np.array([lp.packed_bytes for lp in layers], dtype=np.float64)
        index = {lp.name: i for i, lp in enumerate(layers)}
        rows = shown_rows(all_dense, {index[s] for s in selection if s in index})
        names = [layers[i].name for i in rows]
        dense, packed = all_dense[rows], all_packed[rows]
        if len(rows) < len(layers):
            rest = np.ones(len(layers), dtype=bool)
            rest[rows] = False
            names.append(f"{OTHERS} ({int(rest.sum())} layers)")
            dense = np.append(dense, all_dense[rest].sum())
            packed = np.append(packed, all_packed[rest].sum())
        unit, scale = size_unit(float(dense.max()) if dense.size else 0.0)
        if unit != self._unit:
            self._unit = unit
            self.plot.setLabel("bottom", f"size ({unit})")
        dense, packed = dense / scale, packed / scale
        n = len(names)
        y = np.arange(n, dtype=np.float64)
        same_rows = names == self._names
        same_dense = (
            same_rows and self._dense.shape == dense.shape and np.array_equal(self._dense, dense)
        )
        # The dense bars do not follow the plan: a slider step redraws only the packed ones
        # (each redraw rebuilds the bars' picture and bounds in Python).
        if not same_dense:
            self.dense.setOpts(x0=np.zeros(n), y=y - 0.2, width=dense, height=0.38)
        self.packed.setOpts(x0=np.zeros(n), y=y + 0.2, width=packed, height=0.38)
        if not same_rows:
            self._names = names
            self._label_rows()
            self.plot.setYRange(-0.6, n - 0.4, padding=0)
        if dense.size and (self._dense.shape != dense.shape or not np.allclose(self._dense, dense)):
            self.plot.setXRange(0, float(dense.max()) * 1.05, padding=0)
        self._dense = dense
        self.set_selection(selection)

    def _label_rows(self) -> None:
        """Name every k-th bar so labels never overlap: at most one per `LABEL_PX` pixels of
        the plot's height (and never more than `MAX_LABELLED`)."""
        n = len(self._names)
        if not n:
            return
        height = self.plot.getViewBox().height() or self.plot.height()
        fit = max(2, min(MAX_LABELLED, int(height // LABEL_PX)))
        step = max(1, int(np.ceil(n / fit)))
        # from the last bar (the "others" bar, always named) down
        rows = list(range(n - 1, -1, -step))[::-1]
        ticks = [(i, self._names[i]) for i in rows]
        if ticks != self._ticks:
            self._ticks = ticks
            self.plot.getAxis("left").setTicks([ticks])

    def resizeEvent(self, event) -> None:
        super().resizeEvent(event)
        self._label_rows()

    def set_selection(self, selection: tuple[str, ...]) -> None:
        if self._preview is not None and any(s not in self._names for s in selection):
            # A selected layer outside the top N gets a bar of its own.
            known = {lp.name for lp in self._preview.layers}
            if any(s in known for s in selection if s not in self._names):
                self.set_preview(self._preview, selection)
                return
        rows = [self._names.index(s) for s in selection if s in self._names]
        if not rows:
            self.selected.setOpts(x0=[], y=[], width=[])
            return
        width = float(self._dense.max()) * 1.04 if self._dense.size else 1.0
        self.selected.setOpts(
            x0=np.full(len(rows), -width * 0.01),
            y=np.asarray(rows, dtype=np.float64),
            width=np.full(len(rows), width),
            height=0.9,
        )

    def _on_scene_sigMouseClicked(self, event) -> None:
        if not self._names:
            return
        pos = self.plot.getPlotItem().vb.mapSceneToView(event.scenePos())
        row = int(round(pos.y()))
        if 0 <= row < len(self._names) and not self._names[row].startswith(OTHERS + " ("):
            self.layerClicked.emit(self._names[row])
