"""Run history: every compress / fine-tune / evaluate run as a table row and a point on a
size-vs-damage scatter with its Pareto front; restore a run's plan; compare two runs per layer.

The records are `core.session.RunRecord` objects (the session keeps them); this widget only
shows them and asks for a plan to be restored (`planRequested`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QDialog,
    QDialogButtonBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)
from superqt.utils import signals_blocked

from app import style
from app.style import human_bytes, percent

COLUMNS = ("#", "Kind", "Payload", "Sparsity", "Acc. after", "Damage", "Time")
TOOLTIPS = (
    "Run number in this session",
    "compress, fine-tune, evaluate, or ensemble (of the runs in brackets: its payload is "
    "their total, its accuracy the averaged prediction's; a ★ on the plot)",
    "Bytes of the compressed layers' payload (codes, masks, scales)",
    "Fraction of zeros over the compressed weights",
    "Accuracy of the compressed model on the held-out data (after Evaluate)",
    "Damage: accuracy lost in percentage points when measured, else 1 - agreement, else the "
    "relative L2 error of the outputs (lower is better)",
    "Seconds the run took",
)
#: Colour of the Pareto front line and of the points on it.
FRONT_COLOR = style.THRESHOLD_COLOR
#: Colour of the solver's predicted frontier (from the sensitivity scan).
PREDICTED_COLOR = style.LEVEL_COLOR


def predicted_value(point: dict, kind: str) -> float | None:
    """A predicted frontier point's damage in the runs' unit ``kind`` (`damage`), or None
    where the scan predicts nothing comparable (``1 - agreement``)."""
    if kind == "accuracy lost (pp)":
        return point.get("accuracy_drop")
    if kind == "relative L2 error":
        return point.get("rel_l2")
    return None


def damage(record) -> tuple[float, str] | None:
    """``(value, what)`` for a run: accuracy lost (percentage points) when both accuracies
    were measured, else ``1 - agreement``, else the outputs' relative L2 error; None if the
    run measured nothing (a compress before any Evaluate)."""
    before, after = record.accuracy_before, record.accuracy_after
    if before is not None and after is not None:
        return 100.0 * (float(before) - float(after)), "accuracy lost (pp)"
    if "agreement" in record.fidelity:
        return 1.0 - float(record.fidelity["agreement"]), "1 - agreement"
    if "rel_l2" in record.fidelity:
        return float(record.fidelity["rel_l2"]), "relative L2 error"
    return None


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both size and damage (both lower is
    better), ordered by size; ties keep the first."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1], i))
    front: list[int] = []
    best = float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def ensemble_members(runs: Sequence) -> list:
    """The runs an ensemble of ``runs`` is built from: ensembles left out, and one run per
    plan (an evaluate run repeats its compress run's plan), first kept."""
    out, plans = [], []
    for run in runs:
        if run.kind != "ensemble" and run.plan not in plans:
            out.append(run)
            plans.append(run.plan)
    return out


def describe_config(cfg) -> str:
    """One line for a `LayerConfig`: pruning, quantization, skip."""
    if cfg.skip:
        return "skipped (fp32)"
    p, q = cfg.prune, cfg.quant
    if p.method == "none":
        prune = "no pruning"
    elif p.method == "nm":
        prune = f"nm {p.n}:{p.m}"
    elif p.mode == "threshold":
        prune = f"{p.method} < {p.threshold:.4g}"
    else:
        prune = f"{p.method} {100 * p.sparsity:.1f} %" + (" global" if p.scope == "global" else "")
    if q.bits is None:
        quant = "fp32"
    else:
        quant = f"{q.bits}-bit {'sym' if q.symmetric else 'asym'}"
        quant += " per-channel" if q.per_channel else " per-tensor"
    return f"{prune}, {quant}"


def compare_plans(a, b, layer_names: Sequence[str]) -> list[tuple[str, str, str]]:
    """``(what, in a, in b)`` for every layer (and the recovery settings) where the two plans
    differ; empty when they compress every layer alike."""
    rows = []
    for name in layer_names:
        ca, cb = a.config_for(name), b.config_for(name)
        if ca != cb:
            rows.append((name, describe_config(ca), describe_config(cb)))
    if a.recovery != b.recovery:
        ra, rb = asdict(a.recovery), asdict(b.recovery)
        keys = [k for k in ra if ra[k] != rb[k]]
        rows.append(
            (
                "recovery",
                ", ".join(f"{k}={ra[k]}" for k in keys),
                ", ".join(f"{k}={rb[k]}" for k in keys),
            )
        )
    return rows


class CompareDialog(QDialog):
    """Per-layer settings of two runs, only where they differ."""

    def __init__(self, a, b, layer_names: Sequence[str], parent=None):
        super().__init__(parent)
        self.setObjectName("compareRunsDialog")
        self.setWindowTitle(f"Run {a.id} vs run {b.id}")
        self.rows = compare_plans(a.plan, b.plan, layer_names)
        self.table = QTableWidget(len(self.rows), 3, self)
        self.table.setObjectName("compareTable")
        self.table.setHorizontalHeaderLabels(["Layer", f"Run {a.id}", f"Run {b.id}"])
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        for r, row in enumerate(self.rows):
            for c, text in enumerate(row):
                item = QTableWidgetItem(text)
                item.setToolTip(text)
                self.table.setItem(r, c, item)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        same = len(layer_names) - sum(1 for row in self.rows if row[0] != "recovery")
        note = QLabel(
            f"{len(self.rows)} difference(s); {same} layer(s) compressed alike are not listed."
            if self.rows
            else "The two runs used the same settings on every layer.",
            self,
        )
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close, self)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addWidget(note)
        layout.addWidget(self.table, 1)
        layout.addWidget(buttons)
        self.resize(640, 360)


class RunsView(QWidget):
    """Table + scatter of the session's runs. Click a point (or double-click a row, or press
    "Restore plan") to ask for that run's plan; select two rows and press "Compare"."""

    planRequested = Signal(object)  # RunRecord whose plan should become current
    ensembleRequested = Signal(list)  # RunRecords to build an ensemble of

    def __init__(self, parent=None):
        super().__init__(parent)
        self._runs: list = []
        self._layer_names: tuple[str, ...] = ()
        self._plotted: list[int] = []  # row index of each scatter point
        self.table = QTableWidget(0, len(COLUMNS), self)
        self.table.setObjectName("runsTable")
        self.table.setHorizontalHeaderLabels(list(COLUMNS))
        for col, tip in enumerate(TOOLTIPS):
            self.table.horizontalHeaderItem(col).setToolTip(tip)
        self.table.verticalHeader().setVisible(False)
        self.table.verticalHeader().setDefaultSectionSize(20)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.horizontalHeader().setStretchLastSection(False)
        self.table.itemSelectionChanged.connect(self._on_table_itemSelectionChanged)
        self.table.cellDoubleClicked.connect(self._on_table_cellDoubleClicked)

        self.restore = QPushButton("Restore plan", self)
        self.restore.setObjectName("restoreRun")
        self.restore.setToolTip("Make the selected run's plan the current plan (undoable)")
        self.restore.clicked.connect(self._on_restore_clicked)
        self.compare = QPushButton("Compare…", self)
        self.compare.setObjectName("compareRuns")
        self.compare.setToolTip("Select two runs: list the layers whose settings differ")
        self.compare.clicked.connect(self._on_compare_clicked)
        self.ensemble = QPushButton("Ensemble…", self)
        self.ensemble.setObjectName("ensembleRuns")
        self.ensemble.setToolTip(
            "Select two or more runs: build an ensemble of their plans (averaged predictions) "
            "and add it to the history"
        )
        self.ensemble.clicked.connect(self._on_ensemble_clicked)
        self.note = QLabel("Compress and Evaluate to fill the history.", self)
        self.note.setWordWrap(True)

        self.plot = pg.PlotWidget(self)
        self.plot.setObjectName("paretoPlot")
        self.plot.setMenuEnabled(False)
        self.plot.showGrid(x=True, y=True, alpha=0.15)
        for side in ("left", "bottom"):
            self.plot.getAxis(side).enableAutoSIPrefix(False)
        self.plot.setLabel("bottom", "payload (KiB)")
        self.plot.setLabel("left", "damage")
        self.plot.setTitle(
            f"Size vs damage: ● runs, <span style='color:{FRONT_COLOR.name()}'>— Pareto "
            "front</span> (click a point to restore its plan)",
            size="9pt",
        )
        self.points = pg.ScatterPlotItem(
            size=10, pen=pg.mkPen(None), brush=pg.mkBrush(style.PACKED_COLOR), hoverable=True
        )
        self.points.sigClicked.connect(self._on_points_sigClicked)
        self.front = pg.PlotDataItem(
            pen=pg.mkPen(FRONT_COLOR, width=2),
            symbol="o",
            symbolSize=12,
            symbolBrush=pg.mkBrush(None),
            symbolPen=pg.mkPen(FRONT_COLOR, width=2),
        )
        self.highlight = pg.ScatterPlotItem(
            size=16, pen=pg.mkPen(style.AFTER_COLOR, width=2), brush=pg.mkBrush(None)
        )
        # Ensemble runs: a star over their point (size = the members' total payload).
        self.ensemble_points = pg.ScatterPlotItem(
            size=18,
            symbol="star",
            pen=pg.mkPen(style.AFTER_COLOR, width=1),
            brush=pg.mkBrush(style.AFTER_COLOR),
        )
        for item in (self.front, self.points, self.ensemble_points, self.highlight):
            self.plot.addItem(item)
        # The solver's predicted frontier (`set_frontier`), dashed, under the measured runs.
        self.predicted = pg.PlotDataItem(
            pen=pg.mkPen(PREDICTED_COLOR, width=2, style=Qt.PenStyle.DashLine),
            symbol="x",
            symbolSize=8,
            symbolPen=pg.mkPen(PREDICTED_COLOR),
            symbolBrush=pg.mkBrush(PREDICTED_COLOR),
        )
        self.predicted.setZValue(-1)
        self.plot.addItem(self.predicted)
        self._frontier: list[dict] = []

        left = QWidget(self)
        v = QVBoxLayout(left)
        v.setContentsMargins(0, 0, 0, 0)
        v.addWidget(self.note)
        v.addWidget(self.table, 1)
        buttons = QHBoxLayout()
        buttons.addWidget(self.restore)
        buttons.addWidget(self.compare)
        buttons.addWidget(self.ensemble)
        buttons.addStretch(1)
        v.addLayout(buttons)
        self.splitter = QSplitter(Qt.Orientation.Horizontal, self)
        self.splitter.addWidget(left)
        self.splitter.addWidget(self.plot)
        self.splitter.setStretchFactor(0, 1)
        self.splitter.setStretchFactor(1, 1)
        # Narrow docks (1366x768): the table scrolls and the note wraps, so the plot is never
        # pushed out of the dock.
        self.note.setWordWrap(True)
        self.table.setMinimumWidth(160)
        self.plot.setMinimumWidth(220)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.splitter)
        style.apply_plot_theme(self.plot)
        self._update_buttons()

    # ------------------------------------------------------------------ model -> widget
    def set_layer_names(self, names: Sequence[str]) -> None:
        """Layers the per-layer comparison goes over (the open model's)."""
        self._layer_names = tuple(names)

    def set_runs(self, runs: Sequence) -> None:
        """Show ``runs`` (`RunRecord` objects, oldest first)."""
        self._runs = list(runs)
        with signals_blocked(self.table):
            self.table.setRowCount(len(self._runs))
            for row, run in enumerate(self._runs):
                dmg = damage(run)
                acc = run.accuracy_after
                members = getattr(run, "members", ())
                texts = (
                    str(run.id),
                    f"{run.kind} ({'+'.join(map(str, members))})" if members else run.kind,
                    human_bytes(run.payload_bytes),
                    percent(run.sparsity, 2),
                    percent(acc) if acc is not None else "—",
                    "—" if dmg is None else f"{dmg[0]:.4g}",
                    f"{run.seconds:.1f} s",
                )
                for col, text in enumerate(texts):
                    item = QTableWidgetItem(text)
                    if col != 1:
                        item.setTextAlignment(
                            Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter
                        )
                    if col == 5 and dmg is not None:
                        item.setToolTip(dmg[1])
                    self.table.setItem(row, col, item)
        self._redraw()
        self._update_buttons()

    def add_run(self, run) -> None:
        self.set_runs([*self._runs, run])

    def runs(self) -> list:
        return list(self._runs)

    def selected_runs(self) -> list:
        rows = sorted({idx.row() for idx in self.table.selectionModel().selectedRows()})
        return [self._runs[r] for r in rows if r < len(self._runs)]

    def front_ids(self) -> list[int]:
        """Ids of the runs on the Pareto front (size, damage), smallest first."""
        pts, rows = self._points()
        return [self._runs[rows[i]].id for i in pareto_front(pts)]

    # ------------------------------------------------------------------ drawing
    def _points(self) -> tuple[list[tuple[float, float]], list[int]]:
        """Plottable ``(KiB, damage)`` of the runs measured with the most common damage kind
        (two kinds on one axis would not compare), with their row indices."""
        measured = [(r, run, damage(run)) for r, run in enumerate(self._runs)]
        measured = [(r, run, d) for r, run, d in measured if d is not None and run.payload_bytes]
        if not measured:
            return [], []
        kinds = [d[1] for _, _, d in measured]
        kind = max(set(kinds), key=kinds.count)
        self.plot.setLabel("left", f"damage: {kind}")
        chosen = [(r, run, d) for r, run, d in measured if d[1] == kind]
        return [(run.payload_bytes / 1024.0, d[0]) for _, run, d in chosen], [
            r for r, _, _ in chosen
        ]

    def set_frontier(self, points: Sequence[dict]) -> None:
        """The solver's predicted size/damage trade-off from the sensitivity scan (dicts of
        `app.controller.Controller.frontier_points`), drawn dashed beside the runs in their
        damage unit; [] hides it."""
        self._frontier = list(points)
        self._redraw()

    def frontier_xy(self) -> tuple[np.ndarray, np.ndarray]:
        """The predicted frontier as drawn: (payload KiB, damage) arrays (empty when hidden)."""
        x, y = self.predicted.getData()
        if x is None:
            return np.zeros(0), np.zeros(0)
        return np.asarray(x), np.asarray(y)

    def _draw_frontier(self, rows: Sequence[int]) -> None:
        """Draw the predicted frontier in the damage unit of the plotted runs (with no run
        plotted: accuracy lost for labelled scans, else the relative L2 error)."""
        measured = damage(self._runs[rows[0]]) if rows else None
        if measured is not None:
            kind = measured[1]
        elif self._frontier and self._frontier[0].get("accuracy_drop") is not None:
            kind = "accuracy lost (pp)"
        else:
            kind = "relative L2 error"
        pts = sorted(
            (p["payload_bytes"] / 1024.0, predicted_value(p, kind))
            for p in self._frontier
            if p.get("payload_bytes") and predicted_value(p, kind) is not None
        )
        title = (
            f"Size vs damage: ● runs, <span style='color:{FRONT_COLOR.name()}'>— Pareto "
            "front</span> (click a point to restore its plan)"
        )
        tip = ""
        if pts:
            xy = np.asarray(pts, dtype=np.float64)
            self.predicted.setData(xy[:, 0], xy[:, 1])
            estimate = any(p.get("estimate") for p in self._frontier)
            # Short: the plot is narrow beside the table; the tooltip says the rest.
            title = (
                f"● runs <span style='color:{FRONT_COLOR.name()}'>— front</span> "
                f"<span style='color:{PREDICTED_COLOR.name()}'>- - predicted"
                + (" (estimate)" if estimate else "")
                + "</span>"
            )
            tip = (
                "Dots: measured runs (click one to restore its plan); red: their Pareto front; "
                "green dashed: the plans the target solver predicts from the sensitivity scan, "
                "before fine-tuning" + (" (data-free estimate)" if estimate else "")
            )
            if not rows:
                self.plot.setLabel("left", f"damage: {kind}")
        else:
            self.predicted.setData([], [])
        self.plot.setTitle(title, size="9pt")
        self.plot.setToolTip(tip)

    def _redraw(self) -> None:
        pts, rows = self._points()
        self._plotted = rows
        self._draw_frontier(rows)
        stars = [p for p, r in zip(pts, rows, strict=True) if self._runs[r].kind == "ensemble"]
        if stars:
            xy_stars = np.asarray(stars, dtype=np.float64)
            self.ensemble_points.setData(x=xy_stars[:, 0], y=xy_stars[:, 1])
        else:
            self.ensemble_points.setData([], [])
        if not pts:
            self.points.setData([], [])
            self.front.setData([], [])
            self.highlight.setData([], [])
            self.note.setText(
                "Compress and Evaluate to fill the history."
                if not self._runs
                else "Evaluate a run (needs data) to place it on the size-vs-damage plot."
            )
            return
        xy = np.asarray(pts, dtype=np.float64)
        self.points.setData(x=xy[:, 0], y=xy[:, 1], data=rows)
        front = pareto_front(pts)
        self.front.setData(xy[front, 0], xy[front, 1])
        self.note.setText(
            f"{len(self._runs)} run(s); {len(front)} on the Pareto front (no other run is both "
            "smaller and less damaged)."
        )
        self._highlight()

    def _highlight(self) -> None:
        chosen = {id(run) for run in self.selected_runs()}
        pts, rows = self._points()
        sel = [p for p, r in zip(pts, rows, strict=True) if id(self._runs[r]) in chosen]
        if sel:
            xy = np.asarray(sel, dtype=np.float64)
            self.highlight.setData(x=xy[:, 0], y=xy[:, 1])
        else:
            self.highlight.setData([], [])

    def _update_buttons(self) -> None:
        chosen = self.selected_runs()
        n = len(chosen)
        # An ensemble has several plans: nothing single to restore.
        self.restore.setEnabled(n == 1 and chosen[0].kind != "ensemble")
        self.compare.setEnabled(n == 2)
        self.ensemble.setEnabled(len(ensemble_members(chosen)) >= 2)

    # ------------------------------------------------------------------ slots
    def _on_table_itemSelectionChanged(self) -> None:
        self._highlight()
        self._update_buttons()

    def _on_table_cellDoubleClicked(self, row: int, _col: int) -> None:
        if 0 <= row < len(self._runs) and self._runs[row].kind != "ensemble":
            self.planRequested.emit(self._runs[row])

    def _on_ensemble_clicked(self) -> None:
        chosen = ensemble_members(self.selected_runs())
        if len(chosen) >= 2:
            self.ensembleRequested.emit(chosen)

    def _on_restore_clicked(self) -> None:
        chosen = self.selected_runs()
        if len(chosen) == 1:
            self.planRequested.emit(chosen[0])

    def click_point(self, row: int) -> None:
        """Act as a click on the scatter point of table row ``row``: select it, restore it."""
        if 0 <= row < len(self._runs):
            self.table.selectRow(row)
            if self._runs[row].kind != "ensemble":
                self.planRequested.emit(self._runs[row])

    def _on_points_sigClicked(self, _item, spots, _event=None) -> None:
        if len(spots):
            self.click_point(int(spots[0].data()))

    def _on_compare_clicked(self) -> None:
        self.compare_selected()

    def compare_selected(self) -> CompareDialog | None:
        """Open the per-layer comparison of the two selected runs (non-modal)."""
        chosen = self.selected_runs()
        if len(chosen) != 2:
            return None
        dialog = CompareDialog(chosen[0], chosen[1], self._layer_names, self)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.open()
        return dialog
