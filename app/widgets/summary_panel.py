"""Live summary of the plan: sparsity, sizes, compression ratio, estimated SQNR."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtGui import QFont
from PySide6.QtWidgets import QGridLayout, QGroupBox, QLabel, QSizePolicy

from app.style import decibels, human_bytes, human_count, percent, ratio
from app.widgets.quiet_slot import QuietSlot, settle_text

ROWS = (
    (
        "dense",
        "Before",
        "Size before: the same archive with nothing compressed (every state tensor as stored, "
        "header included), so an empty plan shows After = Before",
    ),
    (
        "packed",
        "After",
        "Size after: the packed archive on disk: codes, sparsity pattern, scales, header",
    ),
    ("ratio", "Ratio", "Compression ratio: size before / size after"),
    (
        "sqnr",
        "SQNR (est.)",
        "Estimated signal-to-noise ratio of pruning + quantization, all layers: the "
        "round-to-nearest bound (magnitude masks, nearest codes). With OBS pruning or GPTQ "
        "rounding the weights are updated from calibration data, so the measured error after "
        "Compress is what counts (sparsity and sizes shown here hold for every method)",
    ),
    ("sparsity", "Sparsity", "Fraction of zeros over all weights the plan compresses (exact)"),
    ("nonzeros", "Kept", "Nonzero weights left / weights covered by the plan"),
    ("entropy", "Entropy", "Entropy-coded size: lower bound if the codes were entropy-coded"),
)


def summary_texts(preview, before_bytes: int | None = None) -> dict[str, str]:
    """The strings the panel shows for ``preview`` (also used by tests to check the panel).

    ``before_bytes``: the size of the uncompressed archive (`core.analysis.estimate.preview` of an
    empty plan). Without it "Before" is the preview's fp32 parameter bytes, which leave out
    buffers (BatchNorm statistics) and the header that "After" counts.
    """
    if preview is None:
        return {key: "—" for key, _, _ in ROWS}
    before = preview.dense_bytes if before_bytes is None else before_bytes
    packed = preview.packed_bytes
    return {
        "sparsity": percent(preview.sparsity, 2),
        "nonzeros": f"{human_count(preview.total_nnz)} / {human_count(preview.total_numel)}",
        "dense": human_bytes(before),
        "packed": human_bytes(packed),
        "entropy": human_bytes(preview.entropy_bytes),
        "ratio": ratio(before / packed if packed else None),
        "sqnr": decibels(preview.sqnr_db),
    }


KEPT_INDEX = [key for key, _, _ in ROWS].index("nonzeros")


def device_fit_text(fit) -> tuple[str, str]:
    """``(text, tooltip)`` of the device line for `core.export.devices.estimate_fit`'s verdict (None:
    no device chosen -> empty text)."""
    if fit is None:
        return "", ""
    acts = fit["activation_bytes"]
    acts_txt = "activations not measured" if acts is None else f"{human_bytes(acts)} activations"
    head = "fits" if fit["fits"] else "does not fit"
    weights, memory = human_bytes(fit["weights_bytes"]), human_bytes(fit["memory_bytes"])
    if fit.get("weight_memory_bytes") is None:
        text = (
            f"{fit['device']}: {head} ({weights} weights + {acts_txt}; needs "
            f"{human_bytes(fit['memory_needed_bytes'])} of {memory} memory)"
        )
    else:
        # Weights read in place from their own store (a microcontroller's flash).
        text = (
            f"{fit['device']}: {head} ({weights} weights of "
            f"{human_bytes(fit['weight_memory_bytes'])} weight memory; {acts_txt} of "
            f"{memory} memory)"
        )
    tip = (
        "Weights: the packed size of this plan; activations: peak input+output bytes of one "
        "layer at batch 1, measured once on the example input. Checked against the device's "
        "memory (weight memory where it has one) and storage."
    )
    if fit["reasons"]:
        tip = "Does not fit: " + "; ".join(fit["reasons"]) + "\n\n" + tip
    return text, tip


class SummaryPanel(QGroupBox):
    def __init__(self, parent=None):
        super().__init__("Live estimate", parent)
        self.labels: dict[str, QLabel] = {}
        # Two columns of (name, value) pairs: compact enough that the pruning and quantization
        # controls below stay in view without scrolling.
        grid = QGridLayout(self)
        grid.setHorizontalSpacing(10)
        grid.setVerticalSpacing(3)
        big = QFont(self.font())
        big.setPointSizeF(big.pointSizeF() * 1.25)
        big.setBold(True)
        for i, (key, title, tip) in enumerate(ROWS):
            label = QLabel("—", self)
            label.setObjectName(f"summary_{key}")
            label.setToolTip(tip)
            label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            # Numbers change on every slider step; a fixed-size label does not re-lay out
            # (and repaint) the dock each time.
            label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
            if key in ("ratio", "packed"):
                label.setFont(big)
            name = QLabel(title, self)
            name.setToolTip(tip)
            if key == "nonzeros":
                # "2.62 M / 25.50 M" does not fit a half-width cell: a row of its own.
                sample = "999.99 M / 999.99 M"
                row, col, span = len(ROWS) // 2, 0, 3
            else:
                sample = "999.99 KiB"
                row, col = divmod(i if i < KEPT_INDEX else i - 1, 2)
                span = 1
            width = label.fontMetrics().horizontalAdvance(sample) + 4
            grid.addWidget(name, row, 2 * col)
            # In a slot: a new number must not lay out the dock (and window) again.
            grid.addWidget(QuietSlot(label, min_width=width), row, 2 * col + 1, 1, span)
            self.labels[key] = label
        grid.setColumnStretch(1, 1)
        grid.setColumnStretch(3, 1)
        self.note = QLabel(self)
        self.note.setWordWrap(True)
        self.note.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop)
        self.note.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
        # In a slot of two lines: the note follows the plan (a target step changes its count
        # of overrides), and must not lay out the dock again each time (`QuietSlot`).
        lines = 2 * self.note.fontMetrics().lineSpacing() + 2
        grid.addWidget(QuietSlot(self.note, height=lines), len(ROWS) // 2 + 1, 0, 1, 4)
        # "fits / does not fit" on the chosen device (empty and hidden without one).
        self.device = QLabel(self)
        self.device.setObjectName("summary_device")
        self.device.setWordWrap(True)
        self.device.setVisible(False)
        grid.addWidget(self.device, len(ROWS) // 2 + 2, 0, 1, 4)
        self.set_preview(None)

    def set_device_fit(self, fit) -> None:
        """Show `core.export.devices.estimate_fit`'s verdict (None: no device chosen)."""
        text, tip = device_fit_text(fit)
        self.device.setText(text)
        self.device.setToolTip(tip)
        color = "" if fit is None else ("#2e7d32" if fit["fits"] else "#c62828")
        self.device.setStyleSheet(f"color: {color}; font-weight: bold;" if color else "")
        self.device.setVisible(bool(text))

    def set_preview(self, preview, note: str = "", before_bytes: int | None = None) -> None:
        for key, text in summary_texts(preview, before_bytes).items():
            settle_text(self.labels[key], text)
        if preview is None and not note:
            note = "Numbers appear once the model is analysed."
        self.note.setText(note)
        self.note.setToolTip(note)  # (two lines shown: a narrow dock may cut a long note)

    def texts(self) -> dict[str, str]:
        return {key: label.text() for key, label in self.labels.items()}
