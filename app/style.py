"""Look and number formatting shared by the widgets: palette-following plot colours, human units."""

from __future__ import annotations

import math

import pyqtgraph as pg
from PySide6.QtGui import QColor, QPalette
from PySide6.QtWidgets import QApplication, QGraphicsItem

from app._compat import ensure_signal_refcounts

ensure_signal_refcounts()

#: Series colours chosen to stay readable on both light and dark backgrounds.
WEIGHT_COLOR = QColor(66, 133, 244)
AFTER_COLOR = QColor(244, 140, 30)
PRUNED_COLOR = QColor(220, 60, 60)
THRESHOLD_COLOR = QColor(220, 60, 60)
LEVEL_COLOR = QColor(40, 170, 90)
GRAD_MEAN_COLOR = QColor(150, 90, 210)
GRAD_STD_COLOR = QColor(20, 170, 170)
DENSE_COLOR = QColor(150, 150, 150)
PACKED_COLOR = QColor(66, 133, 244)


def palette_colors() -> tuple[QColor, QColor]:
    """(background, foreground) of the current application palette, for plots."""
    pal = QApplication.palette()
    return pal.color(QPalette.ColorRole.Base), pal.color(QPalette.ColorRole.Text)


def is_dark() -> bool:
    bg, _ = palette_colors()
    return bg.lightnessF() < 0.5


def apply_plot_theme(plot: pg.PlotWidget) -> None:
    """Give ``plot`` the palette's background and text colours (called again on palette change)."""
    bg, fg = palette_colors()
    plot.setBackground(bg)
    item = plot.getPlotItem()
    for name in ("left", "bottom", "right", "top"):
        axis = item.getAxis(name)
        axis.setPen(fg)
        axis.setTextPen(fg)
        # An axis with a grid covers the whole plot, so every moving line or bar repainted
        # it, tick labels included (~2 ms per axis per slider step). Cached as a pixmap it is
        # re-rendered only when its range, size or pens change (those call update()).
        axis.setCacheMode(QGraphicsItem.CacheMode.DeviceCoordinateCache)
    item.titleLabel.setAttr("color", fg.name())
    item.titleLabel.setText(item.titleLabel.text)
    legend = item.legend
    if legend is not None:
        legend.setLabelTextColor(fg)
        # setLabelTextColor only styles labels added later; restyle the existing ones.
        for _sample, label in legend.items:
            label.setText(label.text, color=fg)
        legend.setBrush(pg.mkBrush(with_alpha(bg, 210)))
        legend.setPen(pg.mkPen(with_alpha(fg, 60)))


def with_alpha(color: QColor, alpha: int) -> QColor:
    c = QColor(color)
    c.setAlpha(alpha)
    return c


def human_bytes(n: float | None) -> str:
    """``1536`` -> ``"1.50 KiB"``; binary units like the file managers users compare against."""
    if n is None:
        return "—"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_count(n: int | None) -> str:
    if n is None:
        return "—"
    if n >= 1_000_000:
        return f"{n / 1e6:.2f} M"
    if n >= 10_000:
        return f"{n / 1e3:.1f} k"
    return str(n)


def percent(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{100.0 * x:.{digits}f} %"


def ratio(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "—"
    return f"{x:.1f}×" if x < 100 else f"{x:.0f}×"


def decibels(x: float | None, *, short: bool = False) -> str:
    if x is None:
        return "—"
    if math.isinf(x):
        if x < 0:
            return "-∞ dB"
        return "∞ dB" if short else "∞ dB (lossless)"
    return f"{x:.1f} dB"


def bits_text(bits: int | None) -> str:
    return "fp32" if bits is None else f"{bits} bit"
