"""Live summary of the plan: sparsity, sizes, compression ratio, estimated SQNR."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtGui import QFont
from PySide6.QtWidgets import QFormLayout, QGroupBox, QLabel, QSizePolicy

from app.style import decibels, human_bytes, human_count, percent, ratio

ROWS = (
    ("sparsity", "Sparsity", "Fraction of zeros over all weights the plan compresses (exact)"),
    ("nonzeros", "Kept weights", "Nonzero weights left / weights covered by the plan"),
    ("dense", "Size before", "All floating-point parameters stored as dense fp32"),
    ("packed", "Size after", "The packed archive on disk: codes, sparsity pattern, scales, header"),
    ("entropy", "Entropy bound", "Lower bound if the codes were entropy-coded"),
    ("ratio", "Compression", "Size before / size after"),
    ("sqnr", "Est. SQNR", "Estimated signal-to-noise ratio of pruning + quantization, all layers"),
)


def summary_texts(preview) -> dict[str, str]:
    """The strings the panel shows for ``preview`` (also used by tests to check the panel)."""
    if preview is None:
        return {key: "—" for key, _, _ in ROWS}
    return {
        "sparsity": percent(preview.sparsity, 2),
        "nonzeros": f"{human_count(preview.total_nnz)} / {human_count(preview.total_numel)}",
        "dense": human_bytes(preview.dense_bytes),
        "packed": human_bytes(preview.packed_bytes),
        "entropy": human_bytes(preview.entropy_bytes),
        "ratio": ratio(preview.compression_ratio),
        "sqnr": decibels(preview.sqnr_db),
    }


class SummaryPanel(QGroupBox):
    def __init__(self, parent=None):
        super().__init__("Live estimate", parent)
        self.labels: dict[str, QLabel] = {}
        form = QFormLayout(self)
        big = QFont(self.font())
        big.setPointSizeF(big.pointSizeF() * 1.25)
        big.setBold(True)
        for key, title, tip in ROWS:
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
            form.addRow(name, label)
            self.labels[key] = label
        self.note = QLabel(self)
        self.note.setWordWrap(True)
        form.addRow(self.note)
        self.set_preview(None)

    def set_preview(self, preview, note: str = "") -> None:
        for key, text in summary_texts(preview).items():
            self.labels[key].setText(text)
        if preview is None and not note:
            note = "Numbers appear once the model is analysed."
        self.note.setText(note)

    def texts(self) -> dict[str, str]:
        return {key: label.text() for key, label in self.labels.items()}
