"""Background job status (progress, cancel), recovery settings, and measured results."""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

from PySide6.QtCore import Qt, QUrl, Signal
from PySide6.QtGui import QBrush, QColor, QDesktopServices
from PySide6.QtWidgets import (
    QCheckBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QToolButton,
    QVBoxLayout,
    QWidget,
)
from superqt.utils import signals_blocked

from app.style import decibels, human_bytes, percent, ratio
from core.recipe.plan import RecoveryConfig


class JobStatus(QWidget):
    """Progress bar, status message and Cancel button of the running job."""

    cancelRequested = Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self._since = time.monotonic()  # when the shown job started (`started`)
        self.bar = QProgressBar(self)
        self.bar.setObjectName("jobProgress")
        self.bar.setRange(0, 1000)
        self.bar.setTextVisible(True)
        self.bar.setFormat("idle")
        self.message = QLabel("Ready.", self)
        self.message.setObjectName("jobMessage")
        self.cancel = QPushButton("Cancel", self)
        self.cancel.setObjectName("cancelJob")
        self.cancel.setToolTip("Stop the running job (Esc); nothing half-done is kept")
        self.cancel.setEnabled(False)
        self.cancel.clicked.connect(self.cancelRequested)
        self.message.setWordWrap(True)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        row = QHBoxLayout()
        row.addWidget(self.bar, 1)
        row.addWidget(self.cancel)
        layout.addLayout(row)
        layout.addWidget(self.message)

    def started(self, title: str, description: str) -> None:
        self._since = time.monotonic()
        self.bar.setValue(0)
        self.bar.setFormat(f"{title}: %p%")
        self.message.setText(description + "…")
        self.cancel.setEnabled(True)

    def progressed(self, title: str, fraction: float, message: str) -> None:
        fraction = min(max(fraction, 0.0), 1.0)
        self.bar.setValue(int(round(1000 * fraction)))
        self.bar.setFormat(f"{title}: %p%{self._eta(fraction)}")
        if message:
            self.message.setText(message)

    def _eta(self, fraction: float) -> str:
        """`` · about N s left`` from the time so far and the fraction done (a job reports
        its fraction in proportion to its work), once there is enough to go on: 2 s and 2%
        in, and not at the end."""
        elapsed = time.monotonic() - self._since
        if elapsed < 2.0 or not 0.02 <= fraction < 1.0:
            return ""
        left = elapsed * (1.0 - fraction) / fraction
        if left >= 90:
            return f" · about {left / 60:.0f} min left"
        return f" · about {max(left, 1):.0f} s left"

    def finished(self, title: str, outcome: str, still_running: bool) -> None:
        if not still_running:
            self.cancel.setEnabled(False)
            self.bar.setValue(1000 if outcome == "done" else 0)
            self.bar.setFormat("idle" if outcome != "done" else f"{title}: done")
        self.message.setText(
            {
                "done": f"{title} finished.",
                "cancelled": f"{title} cancelled.",
                "failed": f"{title} failed.",
            }[outcome]
        )


class RecoveryPanel(QGroupBox):
    """Fine-tuning / distillation settings (the plan's `RecoveryConfig`)."""

    recoveryEdited = Signal(object)

    def __init__(self, parent=None):
        super().__init__("Recovery (fine-tune / distill)", parent)
        self._cfg = RecoveryConfig()
        self.epochs = QSpinBox(self)
        self.epochs.setRange(0, 1000)
        self.epochs.setToolTip("Epochs of fine-tuning after Compress (0 = none); masks stay fixed")
        self.prune_steps = QSpinBox(self)
        self.prune_steps.setObjectName("pruneStepsSpin")
        self.prune_steps.setRange(1, 100)
        self.prune_steps.setToolTip(
            "Iterative pruning (Deep Compression): 1 = prune and quantize at once; N > 1 = "
            "prune in N-1 growing steps, then quantize, with the epochs above after every step "
            "(slower, recovers more accuracy at high sparsity)"
        )
        self.batch_size = QSpinBox(self)
        self.batch_size.setRange(1, 4096)
        self.batch_size.setToolTip("Samples per optimizer step while fine-tuning")
        self.lr = QDoubleSpinBox(self)
        self.lr.setDecimals(5)
        self.lr.setRange(1e-5, 1.0)
        self.lr.setSingleStep(1e-4)
        self.lr.setToolTip("Learning rate of the fine-tuning optimizer")
        self.distill = QCheckBox("Distill from the original", self)
        self.distill.setToolTip(
            "Knowledge distillation: the uncompressed model is the teacher (soft targets)"
        )
        self.temperature = QDoubleSpinBox(self)
        self.temperature.setRange(0.5, 100.0)
        self.temperature.setSingleStep(0.5)
        self.temperature.setToolTip("Softmax temperature of the teacher's soft targets")
        self.alpha = QDoubleSpinBox(self)
        self.alpha.setRange(0.0, 1.0)
        self.alpha.setSingleStep(0.05)
        self.alpha.setToolTip("Weight of the distillation loss (1 - alpha for the labels)")
        for w in (
            self.epochs,
            self.prune_steps,
            self.lr,
            self.batch_size,
            self.temperature,
            self.alpha,
        ):
            w.valueChanged.connect(self._on_field_edited)
            w.setKeyboardTracking(False)
        self.distill.toggled.connect(self._on_field_edited)
        form = QFormLayout(self)
        form.addRow("Epochs", self.epochs)
        form.addRow("Prune steps", self.prune_steps)
        form.addRow("Learning rate", self.lr)
        form.addRow("Batch size", self.batch_size)
        form.addRow(self.distill)
        form.addRow("Temperature", self.temperature)
        form.addRow("Alpha", self.alpha)

    def set_config(self, cfg: RecoveryConfig) -> None:
        self._cfg = cfg
        widgets = (
            self.epochs,
            self.prune_steps,
            self.lr,
            self.batch_size,
            self.distill,
            self.temperature,
            self.alpha,
        )
        with ExitStack() as stack:
            for w in widgets:
                stack.enter_context(signals_blocked(w))
            self.epochs.setValue(cfg.epochs)
            self.prune_steps.setValue(cfg.prune_steps)
            self.lr.setValue(cfg.lr)
            self.batch_size.setValue(cfg.batch_size)
            self.distill.setChecked(cfg.distill)
            self.temperature.setValue(cfg.temperature)
            self.alpha.setValue(cfg.alpha)
        self.temperature.setEnabled(cfg.distill)
        self.alpha.setEnabled(cfg.distill)
        # Steps only mean something when there is fine-tuning between them.
        self.prune_steps.setEnabled(cfg.epochs > 0)

    def _on_field_edited(self, *_):
        cfg = replace(
            self._cfg,
            epochs=self.epochs.value(),
            prune_steps=self.prune_steps.value(),
            lr=self.lr.value(),
            batch_size=self.batch_size.value(),
            distill=self.distill.isChecked(),
            temperature=self.temperature.value(),
            alpha=self.alpha.value(),
        )
        self.recoveryEdited.emit(cfg)


#: Columns of the exported-files table: (title, tooltip).
EXPORT_COLUMNS = (
    ("Format", "Export format"),
    ("On disk", "Bytes of the file on disk"),
    (
        "Deployed acc.",
        "Accuracy of the exported file itself on the held-out data (agreement with the "
        "in-app model when the data has no labels)",
    ),
    (
        "Latency median (p10-p90)",
        "Time of one forward pass of the file at batch 1 (onnxruntime for ONNX, PyTorch "
        "otherwise): median and 10th-90th percentile over repeats",
    ),
    (
        "Check",
        "ok: the file behaves like the in-app simulation; MISMATCH: its accuracy differs by "
        "more than the margin or its outputs drift (hover for the numbers)",
    ),
    ("File", "Where the file was written"),
)
#: Start of the check column's text for a flagged file.
MISMATCH = "MISMATCH"


def _ms(stats) -> str:
    return f"{stats['median']:.3g} ms ({stats['p10']:.3g}-{stats['p90']:.3g})"


def export_row(rec) -> dict[str, str]:
    """The texts of ``rec``'s row in the exported-files table (also used by tests)."""
    dep = rec.deployed or {}
    lat = dep.get("latency_ms") or {}
    sizes = sorted(lat, key=lambda k: int(k.split("_")[1]))
    if sizes:
        first = lat[sizes[0]]
        latency = _ms(first) + ("" if sizes[0] == "batch_1" else f" @{sizes[0][6:]}")
        latency_tip = "\n".join(f"batch {k[6:]}: {_ms(lat[k])}" for k in sizes)
    elif rec.latency_ms is not None:
        latency, latency_tip = f"{rec.latency_ms:.3g} ms", "export-time median (no spread)"
    else:
        latency, latency_tip = "n/a", "the file was not run here"
    acc, sim = dep.get("accuracy"), dep.get("simulated_accuracy")
    if acc is not None:
        quality = percent(acc, 2)
        quality_tip = f"in-app simulation: {percent(sim, 2)} on {dep.get('samples')} samples"
    elif dep.get("agreement") is not None:
        quality = f"{percent(dep['agreement'], 2)} agr."
        quality_tip = "top-1 agreement with the in-app model (no labels)"
    elif dep:
        quality, quality_tip = f"rel. L2 {dep['rel_l2']:.2g}", "output error vs the in-app model"
    else:
        quality, quality_tip = "n/a", "no deployed check for this format"
    if not dep:
        check, check_tip = "—", "not checked (format not runnable here, or no data)"
    elif dep.get("deployed_mismatch"):
        diff = "" if acc is None or sim is None else f" {100 * (acc - sim):+.2f} pp"
        check, check_tip = f"{MISMATCH}{diff}", dep.get("warning") or ""
    else:
        check = "ok"
        check_tip = (
            f"within {100 * dep['margin']:g} pp of the simulation; rel. L2 error "
            f"{dep['rel_l2']:.2g}, max |diff| {dep['max_abs_diff']:.2g}"
        )
    return {
        "format": rec.format,
        "bytes": human_bytes(rec.bytes_on_disk),
        "quality": quality,
        "quality_tip": quality_tip,
        "latency": latency,
        "latency_tip": latency_tip,
        "check": check,
        "check_tip": check_tip,
    }


def targets_text(targets) -> str:
    """One line per block: the device verdict and the cost per million inferences."""
    lines = []
    device = targets.get("device")
    if device:
        from core.export.devices import fits_line

        lines.append(fits_line(device))
    cost = targets.get("cost")
    if cost:
        price = cost["instance_price_per_hour_usd"]
        before, after = cost.get("before"), cost.get("after")

        def usd(entry) -> str:
            return "n/a" if not entry else f"${entry['usd_per_million']:.4g}"

        line = f"cost per million inferences at ${price:g}/h: {usd(before)} before -> {usd(after)}"
        if after:
            line += f" after ({after['measured']})"
        if not before:
            line += "; Evaluate first for the before figure"
        lines.append(line)
    return "\n".join(lines)


def _bold(font):
    font.setBold(True)
    return font


def _cell(text: str, tip: str = "") -> QTableWidgetItem:
    item = QTableWidgetItem(text)
    item.setFlags(Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable)
    if tip:
        item.setToolTip(tip)
    return item


class ResultsPanel(QGroupBox):
    """Measured numbers after Compress / Evaluate / Export."""

    EVAL_ROWS = (
        ("accuracy", "Accuracy", "Top-1 accuracy on the held-out data"),
        (
            "agreement",
            "Agreement",
            "Fraction of samples where the top-1 class equals the original's",
        ),
        ("rel_l2", "Rel. L2 error", "||y - y_orig|| / ||y_orig|| over the outputs"),
        ("cosine", "Cosine", "Mean cosine similarity of outputs to the original's"),
        ("latency", "Latency", "Median CPU time of one forward pass on a batch"),
        (
            "size",
            "Layer bytes",
            "Compressed tensors only: dense fp32 vs their packed payload, measured on the result "
            "(the file on disk adds biases and the header: see the exported files)",
        ),
        ("sparsity", "Sparsity", "Measured fraction of zeros in the compressed weights"),
    )

    #: A causal language model's rows in place of accuracy and agreement (no classes).
    LM_ROWS = {
        "accuracy": (
            "Perplexity",
            "exp of the mean next-token cross-entropy on the held-out text (lower is better)",
        ),
        "agreement": (
            "Next-token agr.",
            "Fraction of real tokens whose most likely next token is the original's",
        ),
    }

    def __init__(self, parent=None):
        super().__init__("Results", parent)
        self.table = QTableWidget(len(self.EVAL_ROWS), 2, self)
        self.table.setObjectName("resultsTable")
        self.table.setHorizontalHeaderLabels(["Original", "Compressed"])
        self.table.setVerticalHeaderLabels([title for _, title, _ in self.EVAL_ROWS])
        for row, (_, _, tip) in enumerate(self.EVAL_ROWS):
            self.table.verticalHeaderItem(row).setToolTip(tip)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.table.verticalHeader().setDefaultSectionSize(20)
        # Tall enough for every row: a scrollbar would hide latency and size.
        self.table.setMinimumHeight(
            20 * len(self.EVAL_ROWS) + self.table.horizontalHeader().sizeHint().height() + 4
        )
        self.exports = QTableWidget(0, len(EXPORT_COLUMNS), self)
        self.exports.setObjectName("exportsTable")
        self.exports.setHorizontalHeaderLabels([title for title, _ in EXPORT_COLUMNS])
        tips = [tip for _, tip in EXPORT_COLUMNS]
        for col, tip in enumerate(tips):
            self.exports.horizontalHeaderItem(col).setToolTip(tip)
        self.exports.setToolTip("Double-click a file to open its folder")
        self.exports.cellDoubleClicked.connect(self._on_exports_cellDoubleClicked)
        self._export_paths: list[str] = []
        self.exports.horizontalHeader().setStretchLastSection(True)
        self.exports.verticalHeader().setVisible(False)
        self.exports.verticalHeader().setDefaultSectionSize(20)
        self.note = QLabel("Compress the model to see measured results.", self)
        self.note.setWordWrap(True)
        layout = QVBoxLayout(self)
        layout.addWidget(self.note)
        tables = QHBoxLayout()
        tables.addWidget(self.table, 1)
        exports = QVBoxLayout()
        exports.addWidget(self.exports, 1)
        self.targets = QLabel(self)
        self.targets.setObjectName("exportTargets")
        self.targets.setWordWrap(True)
        self.targets.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.targets.setVisible(False)
        exports.addWidget(self.targets)
        tables.addLayout(exports, 1)
        layout.addLayout(tables, 1)
        self.stale = QLabel(
            "The plan has changed since this compression: press Compress to update.", self
        )
        self.stale.setObjectName("resultsStale")
        self.stale.setStyleSheet("color: #c77c00;")
        # Keeps its room while hidden: the banner coming and going must not move the tables.
        keep = self.stale.sizePolicy()
        keep.setRetainSizeWhenHidden(True)
        self.stale.setSizePolicy(keep)
        self.stale.setVisible(False)
        layout.insertWidget(0, self.stale)
        self._clear_table()

    def _clear_table(self) -> None:
        for row in range(len(self.EVAL_ROWS)):
            for col in range(2):
                self.table.setItem(row, col, _cell("—"))

    def _set(self, key: str, original: str, compressed: str) -> None:
        row = [k for k, _, _ in self.EVAL_ROWS].index(key)
        self.table.setItem(row, 0, _cell(original))
        self.table.setItem(row, 1, _cell(compressed))

    def set_result(self, result, preview_dense_bytes: int | None = None) -> None:
        self._clear_table()
        if result is None:
            self.note.setText("Compress the model to see measured results.")
            return
        packed = sum(r.packed_bytes for r in result.layers)
        dense = sum(r.dense_bytes for r in result.layers)
        self._set("size", human_bytes(dense), human_bytes(packed))
        self._set("sparsity", "—", percent(result.sparsity, 2))
        sqnrs = [r.sqnr_db for r in result.layers if not r.skipped and r.sqnr_db == r.sqnr_db]
        worst = min(sqnrs) if sqnrs else None
        self.note.setText(
            f"Compressed {len(result.layers)} tensors: {ratio(dense / packed if packed else None)} "
            f"smaller on the compressed layers; worst layer SQNR {decibels(worst)}. "
            "Accuracy appears after Evaluate (automatic when data is loaded)."
        )

    def set_stale(self, stale: bool) -> None:
        """Say when the numbers shown belong to an older plan than the current one."""
        self.stale.setVisible(stale)

    def _label_rows(self, language_model: bool) -> None:
        """Accuracy and agreement rows, or a causal LM's perplexity and next-token rows."""
        for row, (key, title, tip) in enumerate(self.EVAL_ROWS):
            if language_model and key in self.LM_ROWS:
                title, tip = self.LM_ROWS[key]
            item = self.table.verticalHeaderItem(row)
            item.setText(title)
            item.setToolTip(tip)

    def set_evaluation(self, evaluation) -> None:
        if evaluation is None:
            self._label_rows(False)
            for key in ("accuracy", "agreement", "rel_l2", "cosine", "latency"):
                self._set(key, "—", "—")
            return
        b, a = evaluation.before, evaluation.after

        def pct(x):
            return "n/a" if x is None else percent(x, 2)

        def num(x, fmt):
            return "n/a" if x is None else format(x, fmt)

        language_model = a.perplexity is not None
        self._label_rows(language_model)
        if language_model:
            self._set("accuracy", num(b.perplexity, ".3f"), num(a.perplexity, ".3f"))
            self._set("agreement", "100.00 %", pct(a.next_token_agreement))
        else:
            self._set("accuracy", pct(b.accuracy), pct(a.accuracy))
            self._set("agreement", "100.00 %", pct(a.agreement))
        self._set("rel_l2", "0", num(a.rel_l2, ".4f"))
        self._set("cosine", "1", num(a.cosine, ".5f"))
        self._set(
            "latency",
            num(b.latency_ms_per_batch, ".2f") + " ms",
            num(a.latency_ms_per_batch, ".2f") + " ms",
        )
        self.note.setText(
            f"Evaluated on {a.samples} held-out samples of {evaluation.data_name} "
            f"(latency per batch of {a.latency_batch})."
        )

    def _on_exports_cellDoubleClicked(self, row: int, _column: int) -> None:
        if 0 <= row < len(self._export_paths):
            folder = Path(self._export_paths[row]).parent
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(folder)))

    def set_exports(self, records) -> None:
        """One row per exported file: bytes on disk and the deployed check of the file itself
        (accuracy or fidelity, latency median with p10-p90, the mismatch flag)."""
        self._export_paths = [str(rec.path) for rec in records]
        self.exports.setRowCount(len(records))
        for row, rec in enumerate(records):
            texts = export_row(rec)
            self.exports.setItem(row, 0, _cell(texts["format"], rec.note))
            self.exports.setItem(row, 1, _cell(texts["bytes"], f"{rec.bytes_on_disk:,} bytes"))
            self.exports.setItem(row, 2, _cell(texts["quality"], texts["quality_tip"]))
            self.exports.setItem(row, 3, _cell(texts["latency"], texts["latency_tip"]))
            flag = _cell(texts["check"], texts["check_tip"])
            if texts["check"].startswith(MISMATCH):
                flag.setForeground(QBrush(QColor("#c62828")))
                flag.setFont(_bold(flag.font()))
            self.exports.setItem(row, 4, flag)
            self.exports.setItem(row, 5, _cell(str(rec.path), str(rec.path)))
        self.exports.resizeColumnsToContents()
        if not records:
            self.set_targets({})

    def set_targets(self, targets) -> None:
        """The last export's device and cost blocks (`core.session.Session.export`)."""
        text = targets_text(targets or {})
        self.targets.setText(text)
        self.targets.setVisible(bool(text))


def action_button(action, parent=None) -> QToolButton:
    button = QToolButton(parent)
    button.setDefaultAction(action)
    button.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextOnly)
    return button
