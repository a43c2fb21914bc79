"""One layer's weight histogram with draggable threshold lines, plus its gradient histograms.

All bins come from core (`TensorStats.hist`, `.hist_log`, `GradientStats.hist_mean/std`) or
from the compress job (the after-compression overlay); this widget only moves existing
pyqtgraph items: every item is created once in ``__init__`` and updated with ``setData``.

Two x-axes are offered: signed ``w`` (threshold lines at ±t, pruned band between them) and
``log10|w|`` (one line at ``log10 t``, pruned band to its left), which shows the small weights
that magnitude pruning removes far better on wide-range layers.
"""

from __future__ import annotations

import math

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QEvent, Qt, Signal
from PySide6.QtGui import QFont, QFontMetrics, QPen
from PySide6.QtWidgets import (
    QCheckBox,
    QHBoxLayout,
    QLabel,
    QSizePolicy,
    QSplitter,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)
from superqt.utils import signals_blocked

from app import style
from app.widgets.quiet_slot import QuietSlot, settle_text

TITLE_SIZE = "10pt"
#: Pixels of a plot's width its title does not get besides the axes (the plot item's
#: margins and some air).
TITLE_MARGIN = 8

#: Fewest pixels between two drawn grid lines: a denser grid is drawn every k-th level.
MIN_LEVEL_PX = 6


def level_stride(n_levels: int, level_span: float, view_span: float, pixels: float) -> int:
    """Draw every ``k``-th of ``n_levels`` grid lines spread over ``level_span`` (axis units)
    so that neighbours are at least `MIN_LEVEL_PX` apart on a ``view_span``-wide axis drawn
    ``pixels`` wide (1: every level fits)."""
    if n_levels < 2 or level_span <= 0 or view_span <= 0 or pixels <= 0:
        return 1
    spacing_px = level_span / (n_levels - 1) * pixels / view_span
    return max(1, math.ceil(MIN_LEVEL_PX / spacing_px))


def _ordinal(k: int) -> str:
    if 10 <= k % 100 <= 20:
        return f"{k}th"
    suffix = {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


def no_si_prefix(plot) -> None:
    """Axes print the numbers as they are: pyqtgraph's SI auto-scaling would write
    "(x0.001)" into the label while the caption and the sliders show the plain value."""
    for side in ("left", "bottom"):
        plot.getAxis(side).enableAutoSIPrefix(False)


def legend_title(title: str, entries) -> str:
    """``title`` plus colour-coded ``(name, QColor)`` entries: a legend that never sits on
    the data (a legend box inside the plot covers the peak and the pruned band)."""
    keys = " ".join(
        f"<span style='color:{color.name()}'>■ {name}</span>" for name, color in entries
    )
    if not title:
        return keys
    return f"{title} &nbsp; {keys}" if keys else title


GRADIENT_HINT = (
    "No gradients yet.\n\nOpen data (File ▸ Open data…) to see each weight's gradient mean "
    "and spread, which the gradient criteria use."
)
WEIGHTS_ONLY_HINT = (
    "This model is weights-only (no forward pass), so there are no gradients.\n\n"
    "Open a TorchScript/.pt2 file, a demo, or give the architecture to see them."
)


def quant_levels(lo: float, hi: float, bits: int, symmetric: bool) -> np.ndarray:
    """Dequantized values of the uniform grid `core.ops.quantization` uses for range ``[lo, hi]``.

    Symmetric: ``scale * [-(2**(b-1)-1) .. 2**(b-1)-1]`` with ``scale = max|w| / (2**(b-1)-1)``.
    Asymmetric: ``(q - zp) * scale`` for ``q`` in ``0..2**b-1`` over ``[min(lo,0), max(hi,0)]``.
    """
    if symmetric:
        half = 2 ** (bits - 1) - 1
        absmax = max(abs(lo), abs(hi))
        if absmax == 0 or half == 0:
            return np.zeros(1)
        return np.arange(-half, half + 1, dtype=np.float64) * (absmax / half)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    qmax = 2**bits - 1
    if hi == lo:
        return np.zeros(1)
    scale = (hi - lo) / qmax
    zp = round(-lo / scale)
    return (np.arange(0, qmax + 1, dtype=np.float64) - zp) * scale


def _step_xy(
    edges: np.ndarray, counts: np.ndarray, log_counts: bool
) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(counts, dtype=np.float64)
    if log_counts:
        y = np.log10(y + 1.0)
    return np.asarray(edges, dtype=np.float64), y


class HistogramView(QWidget):
    """Weight histogram (left) and gradient histograms (right) of the selected layer."""

    thresholdDragged = Signal(float)  # new threshold in |w| units while a line is dragged
    thresholdReleased = Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self._stats = None
        self._after = None
        self._threshold: float | None = None
        self._method = "none"
        self._bits: int | None = None
        self._symmetric = True
        self._per_channel = False
        self._layer_preview = None
        self._weights_only = False
        #: Per plot, its title variants for a width in pixels (`_fit_title`).
        self._titles: dict = {}

        self.log_counts = QCheckBox("Log counts", self)
        self.log_counts.setChecked(True)
        self.log_counts.setToolTip(
            "Plot log10(count + 1): the tails and the small weights near zero stay visible"
        )
        self.abs_axis = QCheckBox("|w| (log axis)", self)
        self.abs_axis.setToolTip(
            "Show log10|w| instead of signed w: magnitude pruning removes everything left of "
            "the red line"
        )
        self.log_counts.toggled.connect(self._on_logCounts_toggled)
        self.abs_axis.toggled.connect(self._on_absAxis_toggled)
        self.caption = QLabel(self)
        self.caption.setWordWrap(True)
        # Fixed height: the caption changes on every slider step, and a label whose size hint
        # changes makes the whole window lay out and repaint.
        self.caption.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
        self.caption.setFixedHeight(2 * self.caption.fontMetrics().lineSpacing() + 6)
        self.caption.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop)
        self.caption.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        self.plot = pg.PlotWidget(self)
        self.plot.setObjectName("weightPlot")
        self.plot.setMenuEnabled(False)
        self.plot.showGrid(x=True, y=True, alpha=0.15)
        self.plot.setLabel("bottom", "weight w")
        self.plot.setLabel("left", "log10(count + 1)")
        self.plot.setTitle("Weights", size=TITLE_SIZE)
        pi = self.plot.getPlotItem()
        no_si_prefix(self.plot)
        self._level_stride = 1
        self._levels_xy: tuple[np.ndarray, np.ndarray] | None = None  # what `levels` shows
        #: The inputs `levels` was last drawn for (settings; the stats and curve arrays).
        self._levels_for: tuple | None = None
        self.band = pg.LinearRegionItem(
            values=(0, 0),
            movable=False,
            brush=pg.mkBrush(style.with_alpha(style.PRUNED_COLOR, 45)),
            pen=pg.mkPen(None),
        )
        self.band.setZValue(-10)
        self.band.setToolTip("Pruned band: weights in here become exactly zero")
        self.curve = pg.PlotDataItem(
            stepMode="center",
            fillLevel=0,
            brush=pg.mkBrush(style.with_alpha(style.WEIGHT_COLOR, 110)),
            pen=pg.mkPen(style.WEIGHT_COLOR, width=1),
            name="original",
        )
        self.after_curve = pg.PlotDataItem(
            stepMode="center", pen=pg.mkPen(style.AFTER_COLOR, width=2), name="after compression"
        )
        level_pen = QPen(style.with_alpha(style.LEVEL_COLOR, 90))
        level_pen.setCosmetic(True)
        level_pen.setWidthF(1.0)
        self.levels = pg.PlotDataItem(connect="pairs", pen=level_pen)
        self.levels.setZValue(-5)
        line_pen = pg.mkPen(style.THRESHOLD_COLOR, width=2)
        hover_pen = pg.mkPen(style.THRESHOLD_COLOR, width=4)
        self.lines = (
            pg.InfiniteLine(angle=90, movable=True, pen=line_pen, hoverPen=hover_pen),
            pg.InfiniteLine(angle=90, movable=True, pen=line_pen, hoverPen=hover_pen),
        )
        for item in (self.band, self.levels, self.curve, self.after_curve, *self.lines):
            # The band and the threshold lines move on every slider step: left out of the
            # auto range, they do not make the view re-fit every item's bounds per step.
            pi.addItem(item, ignoreBounds=item is self.band or item in self.lines)
        for sign, line in zip((1.0, -1.0), self.lines, strict=True):
            line.setToolTip("Drag to set the pruning threshold (synced with the slider)")
            line.sigPositionChanged.connect(
                lambda ln, s=sign: self._on_line_sigPositionChanged(ln, s)
            )
            line.sigPositionChangeFinished.connect(self._on_line_sigPositionChangeFinished)
            line.setVisible(False)

        self.grad_plot = pg.PlotWidget(self)
        self.grad_plot.setObjectName("gradientPlot")
        self.grad_plot.setMenuEnabled(False)
        self.grad_plot.showGrid(x=True, y=True, alpha=0.15)
        self.grad_plot.setTitle("Gradients", size=TITLE_SIZE)
        self.grad_plot.setLabel("bottom", "gradient")
        self.grad_plot.setLabel("left", "log10(count + 1)")
        gpi = self.grad_plot.getPlotItem()
        no_si_prefix(self.grad_plot)
        self.grad_mean = pg.PlotDataItem(
            stepMode="center",
            fillLevel=0,
            brush=pg.mkBrush(style.with_alpha(style.GRAD_MEAN_COLOR, 80)),
            pen=pg.mkPen(style.GRAD_MEAN_COLOR, width=1),
            name="mean g",
        )
        self.grad_std = pg.PlotDataItem(
            stepMode="center", pen=pg.mkPen(style.GRAD_STD_COLOR, width=2), name="std g"
        )
        gpi.addItem(self.grad_mean)
        gpi.addItem(self.grad_std)
        self.grad_hint = QLabel(GRADIENT_HINT, self)
        self.grad_hint.setObjectName("gradientHint")
        self.grad_hint.setWordWrap(True)
        self.grad_hint.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.grad_hint.setMargin(24)
        self.grad_stack = QStackedWidget(self)
        self.grad_stack.addWidget(self.grad_hint)
        self.grad_stack.addWidget(self.grad_plot)

        splitter = QSplitter(Qt.Orientation.Horizontal, self)
        splitter.setObjectName("histogramSplitter")
        splitter.addWidget(self.plot)
        splitter.addWidget(self.grad_stack)
        splitter.setStretchFactor(0, 3)
        splitter.setStretchFactor(1, 2)
        self.splitter = splitter

        bar = QHBoxLayout()
        bar.addWidget(self.log_counts)
        bar.addWidget(self.abs_axis)
        bar.addStretch(1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(bar)
        layout.addWidget(splitter, 1)
        # (in a slot: a new caption per slider step must not lay out the window again)
        layout.addWidget(QuietSlot(self.caption, height=self.caption.height()))
        for plot in (self.plot, self.grad_plot):
            plot.installEventFilter(self)
        self.apply_theme()
        self._redraw_all()

    # ------------------------------------------------------------------ public API
    def apply_theme(self) -> None:
        style.apply_plot_theme(self.plot)
        style.apply_plot_theme(self.grad_plot)

    def set_weights_only(self, weights_only: bool) -> None:
        self._weights_only = weights_only
        self.grad_hint.setText(WEIGHTS_ONLY_HINT if weights_only else GRADIENT_HINT)

    def set_layer(self, tensor_stats) -> None:
        """Show ``tensor_stats`` (a `TensorStats`, or None for nothing)."""
        self._stats = tensor_stats
        self._redraw_all()

    def set_after(self, after) -> None:
        """Overlay of the compressed weights (an `AfterHistograms`) or None to hide it."""
        self._after = after
        self._redraw_curves()

    def set_plan_state(
        self,
        *,
        method: str,
        threshold: float | None,
        bits: int | None,
        symmetric: bool,
        per_channel: bool,
        layer_preview=None,
    ) -> None:
        """The plan as it applies to the shown layer (cheap: moves lines, band and levels)."""
        self._method = method
        self._threshold = threshold
        self._bits = bits
        self._symmetric = symmetric
        self._per_channel = per_channel
        self._layer_preview = layer_preview
        self._redraw_overlays()
        self._update_caption()

    @property
    def threshold_lines_active(self) -> bool:
        """Lines show |w| thresholds: for magnitude pruning, and at 0 before any pruning so
        they can be grabbed to start (dragging one switches the plan to magnitude)."""
        return self._stats is not None and self._method in ("none", "magnitude")

    # ------------------------------------------------------------------ drawing
    def _redraw_all(self) -> None:
        self._redraw_curves()
        self._redraw_gradients()
        self._redraw_overlays()
        self._update_caption()

    def _redraw_curves(self) -> None:
        ts = self._stats
        log_counts = self.log_counts.isChecked()
        abs_axis = self.abs_axis.isChecked()
        self.plot.setLabel("left", "log10(count + 1)" if log_counts else "count")
        self.plot.setLabel("bottom", "log10 |w|" if abs_axis else "weight w")
        if ts is None:
            self.curve.setData([], [])
            self.after_curve.setData([], [])
            self._set_title(self.plot, lambda _room: ["Weights — select a layer", "Weights"])
            return
        hist = ts.hist_log if abs_axis else ts.hist
        x, y = _step_xy(hist.edges, hist.counts, log_counts)
        self.curve.setData(x, y)
        entries = [("original", style.WEIGHT_COLOR)]
        after = self._after
        if after is not None:
            counts = after.log_abs if abs_axis else after.signed
            ax, ay = _step_xy(hist.edges, counts, log_counts)
            self.after_curve.setData(ax, ay)
            entries.append(("compressed", style.AFTER_COLOR))
        else:
            self.after_curve.setData([], [])
        name = ts.layer.name
        self._set_title(
            self.plot,
            lambda room: [
                legend_title(f"Weights of {name}", entries),
                legend_title(name, entries),
                f"Weights of {name}",
                self._elided(name, room),
            ],
        )
        self.plot.enableAutoRange()

    def _redraw_gradients(self) -> None:
        ts = self._stats
        grad = None if ts is None else ts.grad
        if grad is None:
            self.grad_stack.setCurrentWidget(self.grad_hint)
            self.grad_mean.setData([], [])
            self.grad_std.setData([], [])
            return
        log_counts = self.log_counts.isChecked()
        self.grad_stack.setCurrentWidget(self.grad_plot)
        self.grad_plot.setLabel("left", "log10(count + 1)" if log_counts else "count")
        self.grad_mean.setData(*_step_xy(grad.hist_mean.edges, grad.hist_mean.counts, log_counts))
        self.grad_std.setData(*_step_xy(grad.hist_std.edges, grad.hist_std.counts, log_counts))
        # The layer is named in the weights plot beside it and in the tooltip; the legend
        # goes before the title does when the plot is narrow.
        keys = [("mean", style.GRAD_MEAN_COLOR), ("std", style.GRAD_STD_COLOR)]
        self._set_title(
            self.grad_plot,
            lambda _room: [legend_title("Gradients", keys), legend_title("", keys), "Gradients"],
        )
        self.grad_plot.setToolTip(
            f"Per-weight gradient mean and standard deviation of {ts.layer.name} over "
            f"{grad.batches} recorded batches"
        )
        self.grad_plot.enableAutoRange()

    # ------------------------------------------------------------------ titles
    def _set_title(self, plot, variants) -> None:
        """Title ``plot`` with the first of ``variants(room)`` (most to least detailed) that
        fits its width of ``room`` pixels; re-fitted when the plot is resized. A title
        wider than its plot is clipped, and widens the plot item past its view (which then
        clips the axis on the right as well)."""
        self._titles[plot] = variants
        self._fit_title(plot)

    def _fit_title(self, plot) -> None:
        variants = self._titles.get(plot)
        if variants is None:
            return
        item = plot.getPlotItem()
        label = item.titleLabel
        # The title sits over the data column only (the axes' columns are beside it).
        axes = sum(
            item.getAxis(side).geometry().width()
            for side in ("left", "right")
            if item.getAxis(side).isVisible()
        )
        room = max(int(plot.width() - axes) - TITLE_MARGIN, 0)
        texts = variants(room)
        for text in texts:
            if label.text != text:
                plot.setTitle(text, size=TITLE_SIZE)
            if label.item.boundingRect().width() <= room:
                return
        # None fits: the last (shortest) stays.

    def _elided(self, text: str, room: int) -> str:
        """``text`` shortened in the middle to fit ``room`` pixels at the title's size."""
        font = QFont(self.font())
        font.setPointSizeF(float(TITLE_SIZE.removesuffix("pt")))
        # the title item's own margins (a text document's: 4 px each side)
        return QFontMetrics(font).elidedText(text, Qt.TextElideMode.ElideMiddle, room - 10)

    def eventFilter(self, watched, event) -> bool:  # noqa: N802 - Qt signature
        if event.type() == QEvent.Type.Resize and watched in self._titles:
            self._fit_title(watched)
        return super().eventFilter(watched, event)

    def _x_of(self, t: float) -> float | None:
        """x position of threshold ``t`` on the current axis (None: not drawable)."""
        if self.abs_axis.isChecked():
            return math.log10(t) if t > 0 else None
        return t

    def _redraw_overlays(self) -> None:
        ts = self._stats
        abs_axis = self.abs_axis.isChecked()
        t = self._threshold
        if t is None and self._method == "none":
            t = 0.0
        active = self.threshold_lines_active and t is not None
        pos = self._x_of(t) if active else None
        with signals_blocked(self.lines[0]), signals_blocked(self.lines[1]):
            if pos is None:
                for line in self.lines:
                    line.setVisible(False)
            else:
                self.lines[0].setValue(pos)
                self.lines[0].setVisible(True)
                self.lines[1].setVisible(not abs_axis)
                if not abs_axis:
                    self.lines[1].setValue(-pos)
        if pos is not None and t and t > 0:
            if abs_axis:
                left = float(np.asarray(ts.hist_log.edges)[0])
                self.band.setRegion((min(left, pos), pos))
            else:
                self.band.setRegion((-pos, pos))
            self.band.setVisible(True)
        else:
            self.band.setVisible(False)
        self._redraw_levels()

    def _redraw_levels(self) -> None:
        ts = self._stats
        if (
            ts is None
            or self._bits is None
            or not math.isfinite(ts.min)
            or not math.isfinite(ts.max)
        ):
            self._levels_for = None
            self._set_levels(np.zeros(0), np.zeros(0))
            return
        x, y = self.curve.getData()
        # A sparsity drag moves the threshold, not the grid: the same inputs, the same lines.
        key = (
            self._bits,
            self._symmetric,
            self.abs_axis.isChecked(),
            self.plot.getPlotItem().vb.width(),
        )
        last = self._levels_for
        if (
            last is not None
            and last[0] == key
            and all(a is b for a, b in zip(last[1], (ts, x, y), strict=True))
        ):
            return
        self._levels_for = (key, (ts, x, y))
        levels = quant_levels(float(ts.min), float(ts.max), self._bits, self._symmetric)
        if self.abs_axis.isChecked():
            mags = np.unique(np.abs(levels[levels != 0]))
            levels = np.log10(mags) if mags.size else mags
        if levels.size == 0:
            self._set_levels(np.zeros(0), np.zeros(0))
            return
        # Denser than the pixels: every k-th level, so the histogram stays visible.
        view_span = float(np.ptp(x)) if x is not None and len(x) > 1 else 0.0
        levels = np.sort(levels)
        self._level_stride = level_stride(
            levels.size,
            float(levels[-1] - levels[0]),
            view_span or float(levels[-1] - levels[0]),
            float(self.plot.getPlotItem().vb.width()) or 400.0,
        )
        levels = levels[:: self._level_stride]
        top = float(np.max(y)) if y is not None and len(y) else 1.0
        xs = np.repeat(levels, 2)
        ys = np.tile([0.0, top], levels.size)
        self._set_levels(xs, ys)

    def _set_levels(self, xs: np.ndarray, ys: np.ndarray) -> None:
        """Draw the grid lines, unless they are already drawn (a sparsity drag moves the
        threshold, not the grid: re-setting equal data costs a re-layout and a repaint)."""
        last = self._levels_xy
        if last is not None and np.array_equal(last[0], xs) and np.array_equal(last[1], ys):
            return
        self._levels_xy = (xs, ys)
        self.levels.setData(xs, ys)

    def _update_caption(self) -> None:
        ts = self._stats
        if ts is None:
            self.caption.setText("Select a layer in the table to see its weights.")
            return
        parts = [
            f"<b>{ts.layer.name}</b> · {ts.numel:,} weights in [{ts.min:.4g}, {ts.max:.4g}]"
            f" · std {ts.std:.3g}"
        ]
        if ts.nonfinite:
            parts.append(f"<span style='color:#d33'>{ts.nonfinite} non-finite values</span>")
        lp = self._layer_preview
        if lp is not None and lp.skip:
            parts.append("skipped by the plan (stays fp32)")
        elif lp is not None:
            if self._method == "magnitude" and lp.threshold is not None:
                parts.append(
                    f"<span style='color:{style.PRUNED_COLOR.name()}'>pruned "
                    f"{100 * lp.sparsity:.1f}%: |w| &lt; {lp.threshold:.4g}</span>"
                )
            elif self._method not in ("none",) and lp.sparsity > 0:
                score = "channel norm" if self._method.startswith("channel") else self._method
                parts.append(f"pruned {100 * lp.sparsity:.1f}% by {score} score (not |w|)")
            if self._bits is not None:
                n = 2**self._bits - (1 if self._symmetric else 0)
                k = self._level_stride
                drawn = "green" if k == 1 else f"green: every {_ordinal(k)} level drawn"
                if self._per_channel:
                    drawn += "; widest row"
                grid = f"{self._bits}-bit grid, {n} levels ({drawn})"
                parts.append(grid)
        # (The "after compression" overlay is named in the plot's title.)
        settle_text(self.caption, " · ".join(parts))
        self.caption.setToolTip(
            f"{ts.layer.name}: mean {ts.mean:.4g}, std {ts.std:.4g}, min {ts.min:.4g}, "
            f"max {ts.max:.4g}"
        )

    # ------------------------------------------------------------------ slots
    def _on_line_sigPositionChanged(self, line: pg.InfiniteLine, sign: float) -> None:
        value = float(line.value())
        if self.abs_axis.isChecked():
            t = 10.0**value
        else:
            t = abs(value)
            other = self.lines[1] if line is self.lines[0] else self.lines[0]
            with signals_blocked(other):
                other.setValue(-value)
        self._threshold = t
        self.thresholdDragged.emit(t)

    def _on_line_sigPositionChangeFinished(self, _line) -> None:
        self.thresholdReleased.emit()

    def _on_logCounts_toggled(self, _checked: bool) -> None:
        self._redraw_curves()
        self._redraw_gradients()
        self._redraw_levels()

    def _on_absAxis_toggled(self, _checked: bool) -> None:
        self._redraw_curves()
        self._redraw_overlays()
