"""Sensitivity on screen: per-layer curves, a layers x levels heat map, the target controls.

- `SensitivityView` (the "Sensitivity" dock): for the selected layers, damage vs sparsity (at
  the layer's planned width) and damage vs bits (at its planned sparsity), and a heat map of
  every scanned layer x level, each with the current plan's point marked; data-free (proxy)
  scans say so in a banner, the plot titles and dashed curves.
- `TargetPanel` (the "Target" plan tab): Scan button, a target-ratio slider and a max-damage
  slider that re-solve the plan live from the cached scan (`core.session.Session.
  plan_to_target`), the prediction, and the pinned layers.
- `SensitivityUI` wires both into the main window: the Scan action (Run menu, Ctrl+Shift+S),
  the dock, the tab, throttled drags (one undo step per drag, like the other sliders), pin /
  unpin from the layer table's context menu, and the predicted frontier on the runs plot.

Widgets only render snapshots (`core.planning.sensitivity.SensitivityScan`, plans, previews); every
solve goes through the controller.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QEvent, QObject, QPoint, Qt, Signal
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (
    QDockWidget,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QMenu,
    QPushButton,
    QSizePolicy,
    QSlider,
    QSplitter,
    QVBoxLayout,
    QWidget,
)
from superqt.utils import qthrottled, signals_blocked

from app import style
from app.style import human_bytes
from app.widgets.layer_table import PIN_MARK
from app.widgets.quiet_slot import QuietSlot

#: Slider steps of the target-ratio control (log scale between 1x and the reachable maximum).
RATIO_STEPS = 1000
#: Largest accuracy drop (points) the max-damage slider offers; 0.1-point steps.
MAX_DROP_POINTS = 20.0
#: Largest output error (1 - cosine) the max-damage slider offers on unlabelled scans.
MAX_COS_LOSS = 0.2
#: Most layers drawn as curves at once (the rest of a large selection is listed, not drawn).
MAX_CURVES = 6
#: Curve colours (cycled).
CURVE_COLORS = (
    style.WEIGHT_COLOR,
    style.AFTER_COLOR,
    style.LEVEL_COLOR,
    style.GRAD_MEAN_COLOR,
    style.GRAD_STD_COLOR,
    style.PRUNED_COLOR,
)
#: What a scan's damage means, per metric (axis labels).
DAMAGE_UNITS = {
    "loss": "loss increase",
    "lm_loss": "next-token loss increase (nats/token)",
    "fidelity": "output error energy (rel. L2²)",
    "proxy": "1/SQNR (data-free estimate)",
}
#: x position of float32 ("no quantization") on the damage-vs-bits axis.
F32_X = 32


def ratio_to_position(ratio: float, max_ratio: float) -> int:
    if max_ratio <= 1.0:
        return 0
    t = math.log(max(1.0, min(ratio, max_ratio))) / math.log(max_ratio)
    return round(t * RATIO_STEPS)


def position_to_ratio(pos: int, max_ratio: float) -> float:
    if max_ratio <= 1.0:
        return 1.0
    return float(max_ratio ** (pos / RATIO_STEPS))


def plan_level(cfg: Any, lp: Any = None) -> tuple[float, int | None, bool]:
    """``(sparsity, bits, per_channel)`` the plan gives a layer: the live preview's numbers
    where there is one (threshold mode, global pools), else the config's."""
    if cfg.skip:
        return 0.0, None, False
    sparsity = (
        float(lp.sparsity)
        if lp is not None
        else (float(cfg.prune.sparsity) if cfg.prune.active else 0.0)
    )
    bits = cfg.quant.bits if cfg.quant.active else None
    return sparsity, bits, bool(cfg.quant.per_channel and bits is not None)


def _curve_at(curve: Any, *, bits=..., sparsity=..., per_channel: bool) -> list[Any]:
    """The curve's points with the given width (or sparsity), sorted along the other axis."""
    pts = [
        p
        for p in curve.points
        if (bits is ... or p.level.bits == bits)
        and (sparsity is ... or p.level.sparsity == sparsity)
        and (p.level.per_channel == per_channel or p.level.bits is None)
    ]
    if not pts and per_channel:
        # Widths scanned with one scale only (16 bit): their per-tensor points.
        return _curve_at(curve, bits=bits, sparsity=sparsity, per_channel=False)
    if sparsity is ...:
        return sorted(pts, key=lambda p: p.level.sparsity)
    return sorted(pts, key=lambda p: F32_X if p.level.bits is None else p.level.bits)


def _nearest_width(curve: Any, bits: int | None) -> int | None:
    widths = {p.level.bits for p in curve.points}
    if bits in widths:
        return bits
    finite = sorted(b for b in widths if b is not None)
    if bits is None or not finite:
        return None
    return min(finite, key=lambda b: (abs(b - bits), -b))


def _nearest_sparsity(curve: Any, sparsity: float) -> float:
    values = sorted({p.level.sparsity for p in curve.points})
    return min(values, key=lambda s: abs(s - sparsity)) if values else 0.0


def _interp_damage(points: Sequence[Any], x: float, key) -> float | None:
    if not points:
        return None
    xs = np.array([key(p) for p in points], dtype=float)
    ys = np.array([p.damage for p in points], dtype=float)
    return float(np.interp(x, xs, ys))


def _level_index(levels: Sequence[Any], sparsity: float, bits: int | None, pc: bool) -> int:
    """The scanned level closest to a plan setting (same width and scales where scanned)."""

    def distance(lv) -> tuple[float, float]:
        width = 0 if lv.bits == bits else abs((lv.bits or F32_X) - (bits or F32_X))
        scales = 0 if (lv.per_channel == pc or lv.bits is None) else 1
        return (width + scales, abs(lv.sparsity - sparsity))

    return min(range(len(levels)), key=lambda j: distance(levels[j]))


class SensitivityView(QWidget):
    """Curves for the selected layers and the whole-model heat map (see module docstring)."""

    layerClicked = Signal(str)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.scan: Any = None
        self._names: tuple[str, ...] = ()
        self._plan: Any = None
        self._preview: dict[str, Any] = {}
        self._pins: frozenset[str] = frozenset()
        self._order: list[int] = []  # heat-map column -> scan level index
        self._drawn: Any = None  # what the curves show (skip identical redraws)
        self._holding = False  # a drag holds the curve plots' ranges (`hold_ranges`)
        self._stale = False  # plan changed while hidden

        self.scan_button = QPushButton("Scan sensitivity", self)
        self.scan_button.setObjectName("scanButton")
        self.info = QLabel("No scan yet: press Scan to measure each layer's sensitivity.", self)
        self.info.setObjectName("scanInfo")
        self.info.setWordWrap(True)
        self.banner = QLabel(self)
        self.banner.setObjectName("proxyBanner")
        self.banner.setWordWrap(True)
        self.banner.setStyleSheet(
            "QLabel { background: rgba(244, 140, 30, 60); border: 1px solid rgb(244, 140, 30);"
            " padding: 2px 6px; }"
        )
        self.banner.hide()

        self.by_sparsity = self._plot("sparsityCurves", "sparsity (%)")
        self.by_bits = self._plot("bitsCurves", "bits (32 = float32)")
        self.heat = self._plot("heatMap", "level")
        self.heat.invertY(True)
        self.image = pg.ImageItem(axisOrder="row-major")
        self.image.setColorMap(pg.colormap.get("viridis"))
        self.heat.addItem(self.image)
        self.marks = pg.ScatterPlotItem(
            size=9, symbol="o", pen=pg.mkPen("w", width=2), brush=pg.mkBrush(None)
        )
        self.pin_marks = pg.ScatterPlotItem(
            size=11, symbol="s", pen=pg.mkPen(style.AFTER_COLOR, width=2), brush=pg.mkBrush(None)
        )
        self.heat.addItem(self.marks)
        self.heat.addItem(self.pin_marks)
        #: What ``marks`` / ``pin_marks`` show (a target step moves few of them: equal points
        #: are not set again, which would re-lay out and repaint the heat map).
        self._marks_shown: dict[Any, list] = {}
        self.heat.scene().sigMouseClicked.connect(self._on_heat_clicked)
        self.heat.scene().sigMouseMoved.connect(self._on_heat_moved)
        self.curve_items: list[Any] = []  # the curves drawn now
        self._lines: dict[Any, list[Any]] = {}
        self._stars: dict[Any, Any] = {}
        for plot in (self.by_sparsity, self.by_bits):
            self._lines[plot] = [
                plot.plot([], [], symbol="o", symbolSize=5) for _ in range(MAX_CURVES)
            ]
            star = pg.ScatterPlotItem(size=14, symbol="star", pen=pg.mkPen("k"))
            star.setZValue(10)
            plot.addItem(star)
            self._stars[plot] = star

        top = QHBoxLayout()
        top.addWidget(self.scan_button)
        top.addWidget(self.info, 1)
        self.splitter = QSplitter(Qt.Orientation.Horizontal, self)
        for plot in (self.by_sparsity, self.by_bits, self.heat):
            self.splitter.addWidget(plot)
        self.splitter.setSizes([300, 300, 380])
        # Which colour is which layer: a line above the plots (a legend would cover curves).
        # In a slot of one line: a new legend (a target step that moves a selected layer)
        # must not lay out the dock and the window again (`QuietSlot`).
        self.legend = QLabel(self)
        self.legend.setObjectName("curveLegend")
        self.legend.setTextFormat(Qt.TextFormat.RichText)
        self.legend.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(2, 2, 2, 2)
        layout.addLayout(top)
        layout.addWidget(self.banner)
        layout.addWidget(QuietSlot(self.legend))
        layout.addWidget(self.splitter, 1)
        self._titles()

    def _plot(self, name: str, xlabel: str) -> pg.PlotWidget:
        plot = pg.PlotWidget(self)
        plot.setObjectName(name)
        plot.setMenuEnabled(False)
        plot.showGrid(x=True, y=True, alpha=0.15)
        for side in ("left", "bottom"):
            plot.getAxis(side).enableAutoSIPrefix(False)
        plot.setLabel("bottom", xlabel)
        plot.setMinimumSize(160, 120)
        style.apply_plot_theme(plot)
        return plot

    def apply_theme(self) -> None:
        for plot in (self.by_sparsity, self.by_bits, self.heat):
            style.apply_plot_theme(plot)

    def changeEvent(self, event) -> None:
        # Light/dark switch: the plots follow the palette like the window's others.
        if event.type() in (QEvent.Type.PaletteChange, QEvent.Type.ApplicationPaletteChange):
            self.apply_theme()
        super().changeEvent(event)

    def _titles(self) -> None:
        est = self.scan is not None and self.scan.estimate
        suffix = " — ESTIMATE" if est else ""
        self.by_sparsity.setTitle(f"Damage vs sparsity{suffix}", size="9pt")
        self.by_bits.setTitle(f"Damage vs bits{suffix}", size="9pt")
        self.heat.setTitle(
            f"All layers × levels: log10 damage, ○ plan, □ pinned{suffix}", size="9pt"
        )
        unit = DAMAGE_UNITS.get(self.scan.metric, "damage") if self.scan is not None else "damage"
        for plot in (self.by_sparsity, self.by_bits):
            plot.setLabel("left", unit)

    # ------------------------------------------------------------------ model -> widget
    def set_scan(self, scan: Any) -> None:
        """Show ``scan`` (`SensitivityScan`, or None to clear)."""
        self.scan = scan
        if scan is None:
            self.info.setText("No scan yet: press Scan to measure each layer's sensitivity.")
            self.banner.hide()
            self.image.clear()
        else:
            what = {
                "loss": "loss increase on held-out labelled data",
                "lm_loss": "next-token loss increase on held-out text",
                "fidelity": "output error energy on held-out data",
                "proxy": "data-free estimate",
            }.get(scan.metric, scan.metric)
            self.info.setText(
                f"{len(scan.layers)} layers × {len(scan.levels)} levels ({scan.method}); "
                f"damage = {what}; {scan.samples} samples; {scan.seconds:.2f} s, "
                f"{scan.cached_layers}/{len(scan.layers)} layers from the cache."
            )
            self.banner.setText(
                "⚠ Data-free estimates: no data to run the model on, so each layer's damage is "
                "its weight error energy (1/SQNR), not a measured effect on the outputs. Open "
                "data (Ctrl+D) and scan again to measure."
            )
            self.banner.setVisible(scan.estimate)
            self._draw_heat_image()
            self._heat_ticks()
        self._titles()
        self._redraw()

    def set_layers(self, names: Sequence[str]) -> None:
        """The selected layers (their curves are drawn)."""
        self._names = tuple(names)
        self._draw_curves()

    def set_plan(self, plan: Any, preview: Any = None) -> None:
        """The current plan (and its live preview): where the markers go. Hidden (a dock
        tab behind another), the view only keeps them and draws when shown."""
        self._plan = plan
        self._preview = {} if preview is None else {lp.name: lp for lp in preview.layers}
        if self.isVisible():
            self._redraw()
        else:
            self._stale = True

    def hold_ranges(self, hold: bool) -> None:
        """While a drag is in progress (``hold``) the curve plots keep their ranges: a step
        moves the stars and the curves, not the axes (re-ranging them re-lays out and
        repaints both plots, ~15 ms). Released, they fit their data again, once."""
        if hold == self._holding:
            return
        self._holding = hold
        for plot in (self.by_sparsity, self.by_bits):
            if hold:
                plot.getViewBox().disableAutoRange()
            else:
                plot.getViewBox().enableAutoRange()

    def showEvent(self, event) -> None:
        super().showEvent(event)
        if self._stale:
            self._stale = False
            self._redraw()

    def set_pins(self, names) -> None:
        self._pins = frozenset(names)
        self._draw_marks()
        self._heat_ticks()

    def _redraw(self) -> None:
        self._draw_curves()
        self._draw_marks()

    # ------------------------------------------------------------------ drawing
    def _setting(self, name: str) -> tuple[float, int | None, bool] | None:
        if self._plan is None:
            return None
        return plan_level(self._plan.config_for(name), self._preview.get(name))

    def _draw_curves(self) -> None:
        # Redrawn only when what it shows changed (a target step moves few layers); the
        # plot items are kept and given new data.
        key = (
            id(self.scan),
            self._names,
            tuple(self._setting(n) for n in self._names[:MAX_CURVES]),
        )
        if key == self._drawn:
            return
        self._drawn = key
        self.curve_items = []
        stars: dict[Any, list[tuple[float, float, Any]]] = {self.by_sparsity: [], self.by_bits: []}
        if self.scan is None:
            names: list[str] = []
            by_name: dict[str, Any] = {}
        else:
            by_name = {c.name: c for c in self.scan.layers}
            names = [n for n in self._names if n in by_name][:MAX_CURVES]
        dashed = self.scan is not None and self.scan.estimate
        legend = []
        for k in range(MAX_CURVES):
            s_item, b_item = self._lines[self.by_sparsity][k], self._lines[self.by_bits][k]
            if k >= len(names):
                s_item.setData([], [])
                b_item.setData([], [])
                continue
            name = names[k]
            curve = by_name[name]
            color = CURVE_COLORS[k % len(CURVE_COLORS)]
            pen = pg.mkPen(
                color, width=2, style=Qt.PenStyle.DashLine if dashed else Qt.PenStyle.SolidLine
            )
            s, bits, pc = self._setting(name) or (0.0, None, False)
            width = _nearest_width(curve, bits)
            along_s = _curve_at(curve, bits=width, per_channel=pc)
            s_item.setData(
                [100 * p.level.sparsity for p in along_s],
                [p.damage for p in along_s],
                pen=pen,
                symbolBrush=color,
            )
            label = f"{name} @ {'fp32' if width is None else f'{width} bit'}"
            y = _interp_damage(along_s, s, lambda p: p.level.sparsity)
            if y is not None and self._plan is not None:
                stars[self.by_sparsity].append((100 * s, y, color))
            s_near = _nearest_sparsity(curve, s)
            along_b = _curve_at(curve, sparsity=s_near, per_channel=pc)
            b_item.setData(
                [F32_X if p.level.bits is None else p.level.bits for p in along_b],
                [p.damage for p in along_b],
                pen=pen,
                symbolBrush=color,
            )
            legend.append(
                f"<span style='color:{color.name()}'>■</span> {label} / {100 * s_near:g} % "
                "(bits plot)"
            )
            if self._plan is not None:
                x = F32_X if bits is None else bits
                y = _interp_damage(
                    along_b, x, lambda p: F32_X if p.level.bits is None else p.level.bits
                )
                if y is not None:
                    stars[self.by_bits].append((x, y, color))
            self.curve_items.extend((s_item, b_item))
        for plot, pts in stars.items():
            self._stars[plot].setData(
                x=[p[0] for p in pts],
                y=[p[1] for p in pts],
                brush=[pg.mkBrush(p[2]) for p in pts],
            )
        more = len([n for n in self._names if n in by_name]) - len(names)
        if more > 0:
            legend.append(f"(+{more} more selected, not drawn)")
        self.legend.setText(
            "Curves of the selected layers at their planned width / sparsity, ★ = the plan: "
            + "&nbsp;&nbsp;".join(legend)
            if legend
            else "Select a scanned layer to see its curves."
        )

    def heat_values(self) -> np.ndarray:
        """The heat map's matrix: log10(damage + 1e-6), rows = scan layers, columns = levels
        ordered by sparsity, then width, then scales."""
        scan = self.scan
        levels = scan.levels
        self._order = sorted(
            range(len(levels)),
            key=lambda j: (levels[j].sparsity, -(levels[j].bits or F32_X), levels[j].per_channel),
        )
        grid = np.full((len(scan.layers), len(levels)), np.nan)
        for i, curve in enumerate(scan.layers):
            col = {lv: c for c, lv in enumerate(levels[j] for j in self._order)}
            for p in curve.points:
                grid[i, col[p.level]] = math.log10(max(p.damage, 0.0) + 1e-6)
        return grid

    def _draw_heat_image(self) -> None:
        grid = self.heat_values()
        finite = grid[np.isfinite(grid)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        shown = np.where(np.isfinite(grid), grid, lo)
        self.image.setImage(shown, levels=(lo, max(hi, lo + 1e-9)), autoLevels=False)
        self.image.setRect(0, 0, grid.shape[1], grid.shape[0])
        self.heat.setLimits(xMin=0, xMax=grid.shape[1], yMin=0, yMax=grid.shape[0])
        self.heat.autoRange()

    def plan_cells(self) -> dict[str, tuple[int, int]]:
        """Per scanned layer, the heat-map cell ``(row, column)`` of the plan's setting."""
        if self.scan is None or self._plan is None or not self._order:
            return {}
        levels = [self.scan.levels[j] for j in self._order]
        exact = {(lv.sparsity, lv.bits, lv.per_channel): c for c, lv in enumerate(levels)}
        out = {}
        for i, curve in enumerate(self.scan.layers):
            setting = self._setting(curve.name)
            if setting is not None:
                col = exact.get((round(setting[0], 4), setting[1], setting[2]))
                if col is None:  # between grid levels (threshold mode, own sliders)
                    col = _level_index(levels, *setting)
                out[curve.name] = (i, col)
        return out

    def _draw_marks(self) -> None:
        cells = self.plan_cells()
        plain = [(c + 0.5, r + 0.5) for n, (r, c) in cells.items() if n not in self._pins]
        pinned = [(c + 0.5, r + 0.5) for n, (r, c) in cells.items() if n in self._pins]
        for item, pts in ((self.marks, plain), (self.pin_marks, pinned)):
            if self._marks_shown.get(item) == pts:
                continue
            self._marks_shown[item] = pts
            if pts:
                xy = np.asarray(pts)
                item.setData(x=xy[:, 0], y=xy[:, 1])
            else:
                item.setData([], [])

    def _heat_ticks(self) -> None:
        if self.scan is None or not self._order:
            return
        n = len(self.scan.layers)
        step = max(1, math.ceil(n / 40))
        left = [
            (i + 0.5, (f"{PIN_MARK} " if c.name in self._pins else "") + c.name)
            for i, c in enumerate(self.scan.layers)
            if i % step == 0 or c.name in self._pins
        ]
        self.heat.getAxis("left").setTicks([left])
        levels = [self.scan.levels[j] for j in self._order]
        bottom, last = [], None
        for col, lv in enumerate(levels):
            if lv.sparsity != last:
                bottom.append((col, f"{100 * lv.sparsity:g}%"))
                last = lv.sparsity
        self.heat.getAxis("bottom").setTicks([bottom])
        self.heat.setLabel("bottom", "level: sparsity, then bits 32→2 (hover for details)")

    # ------------------------------------------------------------------ mouse
    def _cell_at(self, scene_pos) -> tuple[int, int] | None:
        if self.scan is None or not self._order:
            return None
        vb = self.heat.getPlotItem().vb
        if not vb.sceneBoundingRect().contains(scene_pos):
            return None
        p = vb.mapSceneToView(scene_pos)
        r, c = int(math.floor(p.y())), int(math.floor(p.x()))
        if 0 <= r < len(self.scan.layers) and 0 <= c < len(self._order):
            return r, c
        return None

    def _on_heat_moved(self, pos) -> None:
        cell = self._cell_at(pos)
        if cell is None:
            self.heat.setToolTip("")
            return
        r, c = cell
        curve = self.scan.layers[r]
        level = self.scan.levels[self._order[c]]
        point = curve.point(level)
        bits = "fp32" if level.bits is None else f"{level.bits} bit"
        scales = ", per-channel" if level.per_channel else ""
        value = "not scanned" if point is None else f"damage {point.damage:.4g}"
        extra = ""
        if point is not None and point.acc_delta is not None:
            extra = f", accuracy {100 * point.acc_delta:+.2f} pp"
        self.heat.setToolTip(
            f"{curve.name}: {100 * level.sparsity:g} % sparsity, {bits}{scales}: {value}{extra}"
            + (" (estimate)" if self.scan.estimate else "")
        )

    def _on_heat_clicked(self, event) -> None:
        cell = self._cell_at(event.scenePos())
        if cell is not None:
            self.layerClicked.emit(self.scan.layers[cell[0]].name)


class TargetPanel(QGroupBox):
    """Scan, target ratio, max damage, prediction and pins (the "Target" plan tab)."""

    ratioMoved = Signal(float)
    damageMoved = Signal(float)  # accuracy points (labelled scans) or 1 - cosine
    editFinished = Signal()
    pinRequested = Signal(bool)  # True: pin the selected layers, False: unpin them
    pinsCleared = Signal()

    def __init__(self, parent=None):
        super().__init__("Target", parent)
        self.max_ratio = 1.0
        self.dense_bytes = 0
        self.scan_metric = "loss"
        self._scan: Any = None
        self.scan_button = QPushButton("Scan sensitivity", self)
        self.scan_button.setObjectName("targetScanButton")
        self.state = QLabel("Scan the model to plan for a target.", self)
        self.state.setObjectName("targetState")
        self.state.setWordWrap(True)
        self.ratio = QSlider(Qt.Orientation.Horizontal, self)
        self.ratio.setObjectName("targetRatioSlider")
        self.ratio.setRange(0, RATIO_STEPS)
        self.ratio.setToolTip(
            "Target compression ratio (fp32 bytes / archive bytes): moving it re-solves every "
            "layer's sparsity and bits from the scan, least predicted damage first"
        )
        self.ratio_label = QLabel("—", self)
        # Fixed in both directions: a new value (every slider step) then does not ask the
        # panel, the tabs and the dock to lay out again (and repaint).
        widest = self.ratio_label.fontMetrics().horizontalAdvance("999.9× (999.9 KiB)") + 6
        self.ratio_label.setFixedSize(max(120, widest), self.ratio_label.sizeHint().height())
        self.damage = QSlider(Qt.Orientation.Horizontal, self)
        self.damage.setObjectName("maxDamageSlider")
        self.damage.setRange(0, 200)
        self.damage.setToolTip(
            "Largest predicted damage: re-solves for the smallest archive that stays within it "
            "(accuracy points with labelled data, else 1 - output cosine)"
        )
        self.damage_label = QLabel("—", self)
        self.damage_title = QLabel("Max accuracy drop", self)
        self.prediction = QLabel("", self)
        self.prediction.setObjectName("targetPrediction")
        self.prediction.setWordWrap(True)
        self.prediction.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop)
        self.prediction.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
        self.pins = QListWidget(self)
        self.pins.setObjectName("pinsList")
        self.pins.setMaximumHeight(70)
        self.pins.setToolTip("Layers the solver keeps as they are (⚑ in the layer table)")
        self.pin = QPushButton("Pin selected", self)
        self.pin.setObjectName("pinButton")
        self.pin.setToolTip("Keep the selected layers' settings; the solver plans the rest")
        self.unpin = QPushButton("Unpin", self)
        self.unpin.setToolTip("Let the solver choose the selected layers' settings again")
        self.clear = QPushButton("Clear", self)
        self.clear.setToolTip("Unpin every layer")
        for w in (self.ratio, self.damage, self.pin, self.unpin, self.clear):
            w.setEnabled(False)

        form = QFormLayout()
        row = QHBoxLayout()
        row.addWidget(self.ratio, 1)
        row.addWidget(self.ratio_label)
        form.addRow("Target ratio", row)
        row = QHBoxLayout()
        row.addWidget(self.damage, 1)
        row.addWidget(self.damage_label)
        form.addRow(self.damage_title, row)
        pins = QHBoxLayout()
        for b in (self.pin, self.unpin, self.clear):
            pins.addWidget(b)
        v = QVBoxLayout(self)
        top = QHBoxLayout()
        top.addWidget(self.scan_button)
        top.addStretch(1)
        v.addLayout(top)
        v.addWidget(self.state)
        v.addLayout(form)
        # In a slot of three lines: a new prediction per slider step must not lay out the
        # tabs and the dock again (`QuietSlot`).
        lines = 3 * self.prediction.fontMetrics().lineSpacing() + 4
        v.addWidget(QuietSlot(self.prediction, height=lines))
        v.addWidget(QLabel(f"Pinned layers ({PIN_MARK}):", self))
        v.addWidget(self.pins)
        v.addLayout(pins)

        self.ratio.valueChanged.connect(self._on_ratio_valueChanged)
        self.ratio.sliderReleased.connect(self.editFinished)
        self.damage.valueChanged.connect(self._on_damage_valueChanged)
        self.damage.sliderReleased.connect(self.editFinished)
        self.pin.clicked.connect(lambda: self.pinRequested.emit(True))
        self.unpin.clicked.connect(lambda: self.pinRequested.emit(False))
        self.clear.clicked.connect(self.pinsCleared)

    # ------------------------------------------------------------------ values
    def ratio_value(self) -> float:
        return position_to_ratio(self.ratio.value(), self.max_ratio)

    def damage_value(self) -> float:
        top = MAX_DROP_POINTS if self.scan_metric == "loss" else MAX_COS_LOSS
        return top * self.damage.value() / self.damage.maximum()

    def set_ratio(self, ratio: float) -> None:
        """Move the ratio slider (emits `ratioMoved`, as a user step would)."""
        self.ratio.setValue(ratio_to_position(ratio, self.max_ratio))

    def _on_ratio_valueChanged(self, _pos: int) -> None:
        r = self.ratio_value()
        self._ratio_text(r)
        self.ratioMoved.emit(r)
        if not self.ratio.isSliderDown():  # a key or click step: a drag of one step
            self.editFinished.emit()

    def _ratio_text(self, r: float) -> None:
        size = f" ({human_bytes(self.dense_bytes / r)})" if self.dense_bytes else ""
        self.ratio_label.setText(f"{r:.1f}×{size}")

    def _on_damage_valueChanged(self, _pos: int) -> None:
        d = self.damage_value()
        self._damage_text(d)
        self.damageMoved.emit(d)
        if not self.damage.isSliderDown():
            self.editFinished.emit()

    def _damage_text(self, d: float) -> None:
        self.damage_label.setText(f"{d:.1f} pp" if self.scan_metric == "loss" else f"{d:.3f}")

    # ------------------------------------------------------------------ model -> widget
    def set_scan(self, scan: Any, target_range: tuple[int, int] | None) -> None:
        on = scan is not None and target_range is not None
        for w in (self.ratio, self.damage, self.pin, self.unpin, self.clear):
            w.setEnabled(on)
        if not on:
            self.state.setText("Scan the model to plan for a target.")
            self.prediction.setText("")
            return
        dense, small = target_range
        same = scan is self._scan
        kept = self.ratio_value()
        self._scan = scan
        self.dense_bytes = dense
        self.max_ratio = max(1.0, dense / small) if small else 1.0
        self.scan_metric = scan.metric
        self.damage_title.setText(
            "Max accuracy drop" if scan.metric == "loss" else "Max output error (1 − cos)"
        )
        self.state.setText(
            f"Curves: {len(scan.layers)} layers ({scan.metric}"
            + (", DATA-FREE ESTIMATE" if scan.estimate else "")
            + f"). Reachable: 1× – {self.max_ratio:.1f}×."
        )
        if same:
            # Same curves, new reach (pins changed): the slider keeps its ratio.
            with signals_blocked(self.ratio):
                self.ratio.setValue(ratio_to_position(kept, self.max_ratio))
            self._ratio_text(self.ratio_value())
            return
        with signals_blocked(self.ratio), signals_blocked(self.damage):
            self.ratio.setValue(0)
            self.damage.setValue(0)
        self._ratio_text(1.0)
        self._damage_text(0.0)

    def set_solution(self, sol: Any, estimate: bool) -> None:
        if sol is None:
            self.prediction.setText("")
            return
        p = sol.predicted
        parts = [f"Predicted archive {human_bytes(p['bytes'])} ({p['ratio']:.1f}×)"]
        if p.get("accuracy_drop") is not None:
            parts.append(f"accuracy drop {p['accuracy_drop']:.2f} pp")
        parts.append(f"cosine {p['cosine']:.4f}")
        text = ", ".join(parts) + " before fine-tuning"
        if estimate:
            text += " — data-free estimate"
        self.prediction.setText(text + ".")

    def set_pins(self, names: Sequence[str]) -> None:
        self.pins.clear()
        for name in sorted(names):
            self.pins.addItem(f"{PIN_MARK} {name}")

    def show_rebuilding(self, pinned: int) -> None:
        """The solver's tables for new pins are being rebuilt (a worker): the sliders stay
        live, their steps are solved when the tables are in (`set_scan` then)."""
        self.state.setText(
            f"Re-planning around {pinned} pinned layer(s)… the target follows when ready."
            if pinned
            else "Re-planning without pins… the target follows when ready."
        )


class SensitivityUI(QObject):
    """Installs the scan action, the Sensitivity dock and the Target tab in ``window`` and
    connects them to its controller (see module docstring)."""

    def __init__(self, window: Any):
        super().__init__(window)
        from app.main_window import EDIT_THROTTLE_MS

        self.window = window
        c = self.controller = window.controller
        #: Keyword arguments of every scan the Scan action starts (`Session.scan`: method,
        #: levels, max_samples); empty = the CLI's defaults.
        self.scan_options: dict[str, Any] = {}
        self._last_target: Any = None
        self.view = SensitivityView(window)
        self.panel = TargetPanel(window)
        self.panel.setTitle("")
        self.panel.setFlat(True)
        index = window.control_tabs.addTab(self.panel, "Target")
        window.control_tabs.setTabToolTip(
            index, "Target size / max damage: plan every layer from the sensitivity scan"
        )
        self.act_scan = QAction("&Scan sensitivity", window)
        self.act_scan.setObjectName("actScan")
        self.act_scan.setShortcut(QKeySequence("Ctrl+Shift+S"))
        self.act_scan.setShortcutContext(Qt.ShortcutContext.WindowShortcut)
        self.act_scan.setToolTip(
            "Measure how much each layer can be pruned / quantized alone (cached; Ctrl+Shift+S)"
        )
        self.act_scan.triggered.connect(self.scan)
        window.addAction(self.act_scan)
        run_menu = getattr(window, "run_menu", None)
        if run_menu is not None:
            # After Evaluate, with the other steps (before the separator and Cancel).
            acts = run_menu.actions()
            after = acts.index(window.act_evaluate) + 1 if window.act_evaluate in acts else 0
            before = acts[after] if after < len(acts) else None
            if before is None:
                run_menu.addAction(self.act_scan)
            else:
                run_menu.insertAction(before, self.act_scan)
        self.view.scan_button.clicked.connect(self.act_scan.trigger)
        self.panel.scan_button.clicked.connect(self.act_scan.trigger)

        self.dock = QDockWidget("Sensitivity", window)
        self.dock.setObjectName("sensitivityDock")
        self.dock.setWidget(self.view)
        window.addDockWidget(Qt.DockWidgetArea.BottomDockWidgetArea, self.dock)
        window.tabifyDockWidget(window.runs_dock, self.dock)
        window.jobs_dock.raise_()
        # With the other docks' toggles (before the separator above Reset layout).
        view_acts = window.view_menu.actions()
        at = (
            view_acts.index(window.act_reset_layout) if window.act_reset_layout in view_acts else -1
        )
        if at > 0 and view_acts[at - 1].isSeparator():
            at -= 1
        window.view_menu.insertAction(
            view_acts[at] if at >= 0 else None, self.dock.toggleViewAction()
        )
        window.act_reset_layout.triggered.connect(self._on_resetLayout)

        # One throttle like the other sliders' (registered with the window's, so undo and
        # other edits flush it first).
        self._solve = qthrottled(self._send_target, timeout=EDIT_THROTTLE_MS, parent=window)
        window._drags["solve"] = self._solve

        c.scanReady.connect(self._on_scanReady)
        c.pinsChanged.connect(self._on_pinsChanged)
        c.solverReady.connect(self._on_solverReady)
        c.frontierReady.connect(self._on_frontierReady)
        c.solved.connect(self._on_solved)
        c.previewUpdated.connect(self._on_previewUpdated)
        c.dragFinished.connect(lambda: self.view.hold_ranges(False))
        c.selectionChanged.connect(self.view.set_layers)
        c.statsReady.connect(lambda _s: self._update_action())
        c.jobStarted.connect(lambda *_: self._update_action())
        c.jobFinished.connect(lambda *_: self._update_action())
        c.jobFinished.connect(self._on_jobFinished)
        c.runRecorded.connect(lambda _r: self._refresh_frontier())
        self.view.layerClicked.connect(lambda name: c.set_selection((name,)))
        self.panel.ratioMoved.connect(self._on_ratioMoved)
        self.panel.damageMoved.connect(self._on_damageMoved)
        self.panel.editFinished.connect(self._on_editFinished)
        self.panel.pinRequested.connect(self._on_pinRequested)
        self.panel.pinsCleared.connect(lambda: c.set_pins(()))
        for view in (window.layer_table.view, window.layer_table.tree):
            view.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
            view.customContextMenuRequested.connect(
                lambda pos, v=view: self._on_layer_contextMenu(v, pos)
            )
        self._update_action()

    # ------------------------------------------------------------------ actions
    def scan(self) -> int | None:
        self.dock.show()
        self.dock.raise_()
        return self.controller.scan(**self.scan_options)

    def _update_action(self) -> None:
        c = self.controller
        ok = c.stats is not None and not c.busy("load") and not c.busy("analyze")
        self.act_scan.setEnabled(ok)
        for b in (self.view.scan_button, self.panel.scan_button):
            b.setEnabled(ok)

    def _on_resetLayout(self) -> None:
        w = self.window
        self.dock.setFloating(False)
        self.dock.show()
        w.tabifyDockWidget(w.runs_dock, self.dock)
        w.jobs_dock.raise_()

    # ------------------------------------------------------------------ target steps
    def _send_target(self, target: Any) -> None:
        # A drag step: the archive size is predicted, not re-measured (the release checks).
        self.controller.plan_to_target(target, merge=True, verify=False)

    def _target(self, target: Any) -> None:
        self._last_target = target
        self._solve(target)

    def _on_ratioMoved(self, ratio: float) -> None:
        from core.planning.solver import Target

        self._target(Target(ratio=max(1.0, ratio)))

    def _on_damageMoved(self, value: float) -> None:
        from core.planning.solver import Target

        if self.panel.scan_metric == "loss":
            self._target(Target(max_drop=value))
        else:
            self._target(Target(min_cosine=1.0 - value))

    def _on_editFinished(self) -> None:
        """Release: the last step again with the archive size checked (same undo step)."""
        self._solve.flush()
        target, self._last_target = self._last_target, None
        if target is not None and self.controller.sensitivity is not None:
            self.controller.plan_to_target(target, merge=True, verify=True)
        self.window._end_drag()

    def _on_solved(self, sol: Any) -> None:
        scan = self.controller.sensitivity
        self.panel.set_solution(sol, bool(scan is not None and scan.estimate))

    # ------------------------------------------------------------------ pins
    def _on_pinRequested(self, pin: bool) -> None:
        self._pin(self.controller.selection, pin)

    def _pin(self, names: Sequence[str], pin: bool) -> None:
        c = self.controller
        scanned = (
            {curve.name for curve in c.sensitivity.layers} if c.sensitivity is not None else None
        )
        names = [n for n in names if scanned is None or n in scanned]
        if not names:
            self.window.statusBar().showMessage(
                "Select scanned (prunable) layers to pin them.", 5000
            )
            return
        pins = set(c.pins)
        pins = pins | set(names) if pin else pins - set(names)
        c.set_pins(sorted(pins))

    def _on_layer_contextMenu(self, view: Any, pos: QPoint) -> None:
        names = self.controller.selection
        menu = QMenu(view)
        pin = menu.addAction(f"{PIN_MARK} Pin for the target solver")
        unpin = menu.addAction("Unpin")
        pin.setEnabled(bool(names))
        unpin.setEnabled(any(n in self.controller.pins for n in names))
        chosen = menu.exec(view.viewport().mapToGlobal(pos))
        if chosen is pin:
            self._pin(names, True)
        elif chosen is unpin:
            self._pin(names, False)

    def _on_pinsChanged(self, pins) -> None:
        self.window.layer_table.set_pins(pins)
        self.view.set_pins(pins)
        self.panel.set_pins(pins)
        if self.controller.rebuilding_pins:
            # The reach and the frontier follow when the worker is done (`_on_solverReady`).
            self.panel.show_rebuilding(len(pins))
        else:
            self._refresh_range()

    def _on_solverReady(self, _reach: Any) -> None:
        self._refresh_range()
        self._refresh_frontier()  # for the new pins: a job of its own, the steps go on

    def _on_jobFinished(self, kind: str, outcome: str) -> None:
        # A cancelled or failed rebuild leaves no tables for the pins: the reach is derived
        # here (`Session.target_range`) instead of "Re-planning…" staying on.
        if kind == "pins" and outcome != "done":
            self._refresh_range()

    # ------------------------------------------------------------------ scan / plan
    def _on_scanReady(self, scan: Any) -> None:
        c = self.controller
        self.view.set_scan(scan)
        self.view.set_layers(c.selection)
        self.view.set_plan(c.plan, c.preview)
        self._refresh_range()
        self._refresh_frontier()
        if scan is not None:
            self.window.statusBar().showMessage(
                f"Sensitivity: {len(scan.layers)} layers in {scan.seconds:.2f} s "
                f"({scan.cached_layers} from the cache)"
                + ("; data-free estimate" if scan.estimate else ""),
                8000,
            )

    def _refresh_range(self) -> None:
        c = self.controller
        if c.rebuilding_pins:  # the tables for the new pins are not in yet
            return
        scan = c.sensitivity
        self.panel.set_scan(scan, c.target_range() if scan is not None else None)

    def _refresh_frontier(self) -> None:
        """The predicted frontier on the runs plot: at once when known (a scan computes it),
        else when its job is done (`_on_frontierReady`)."""
        c = self.controller
        if c.rebuilding_pins:  # `_on_solverReady` asks for the frontier of the new pins
            return
        points = c.predict_frontier() if c.sensitivity is not None else []
        if points is not None:
            self.window.runs_view.set_frontier(points)

    def _on_frontierReady(self, points: Any) -> None:
        # None: the prediction failed; `frontier_points` says why in the status bar.
        self.window.runs_view.set_frontier(
            points if points is not None else self.controller.frontier_points()
        )

    def _on_previewUpdated(self, preview: Any) -> None:
        c = self.controller
        if c.sensitivity is not None:
            self.view.hold_ranges(c.dragging)
            self.view.set_plan(c.plan, preview)
