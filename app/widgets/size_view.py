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
        self.plot.setLabel("bottom", "KiB")
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
        self._dense: np.ndarray = np.zeros(0)
        self.plot.scene().sigMouseClicked.connect(self._on_scene_sigMouseClicked)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.plot)
        self.apply_theme()

    def apply_theme(self) -> None:
        style.apply_plot_theme(self.plot)

    def set_preview(self, preview, selection: tuple[str, ...] = ()) -> None:
        if preview is None:
            self._names = []
            self.dense.setOpts(x0=[], y=[], width=[])
            self.packed.setOpts(x0=[], y=[], width=[])
            self.selected.setOpts(x0=[], y=[], width=[])
            self.plot.getAxis("left").setTicks([[]])
            return
        layers = list(preview.layers)
        names = [lp.name for lp in layers]
        n = len(layers)
        y = np.arange(n, dtype=np.float64)
        dense = np.array([lp.dense_bytes for lp in layers], dtype=np.float64) / 1024.0
        packed = np.array([lp.packed_bytes for lp in layers], dtype=np.float64) / 1024.0
        self.dense.setOpts(x0=np.zeros(n), y=y - 0.2, width=dense, height=0.38)
        self.packed.setOpts(x0=np.zeros(n), y=y + 0.2, width=packed, height=0.38)
        if names != self._names:
            step = max(1, int(np.ceil(n / MAX_LABELLED)))
            self.plot.getAxis("left").setTicks([[(i, names[i]) for i in range(0, n, step)]])
            self.plot.setYRange(-0.6, n - 0.4, padding=0)
            self._names = names
        if dense.size and (self._dense.shape != dense.shape or not np.allclose(self._dense, dense)):
            self.plot.setXRange(0, float(dense.max()) * 1.05, padding=0)
        self._dense = dense
        self.set_selection(selection)

    def set_selection(self, selection: tuple[str, ...]) -> None:
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
        if 0 <= row < len(self._names):
            self.layerClicked.emit(self._names[row])
