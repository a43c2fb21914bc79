"""Export dialog: pick formats and a folder; asks before overwriting existing files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PySide6.QtWidgets import (
    QCheckBox,
    QDialog,
    QDialogButtonBox,
    QDoubleSpinBox,
    QFileDialog,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMessageBox,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
)

FORMAT_HELP = {
    "packed": "Packed archive (.packed.safetensors): bit-packed codes + sparsity pattern; "
    "the smallest file, restored by the workbench loader",
    "onnx": "ONNX (fp32, pruned zeros and dequantized values), checked in onnxruntime",
    "onnx-int8": "ONNX with int8 weights (QDQ), smaller and faster in onnxruntime",
    "torchscript": "TorchScript (torch.jit.save), runs without the Python source",
    "state_dict": "PyTorch state_dict (.pt) with pruned zeros and dequantized values",
    "safetensors": "safetensors state_dict (no pickle)",
    "pt2": "torch.export program (.pt2)",
}

#: Files an export writes into its folder besides ``model.<ext>`` (checked for overwriting).
SIDE_FILES = ("recipe.json", "report.json", "report.html")


def existing_outputs(out_dir: Path, formats: Sequence[str]) -> list[Path]:
    """Files an export of ``formats`` into ``out_dir`` would replace (models and side files)."""
    from core.export.formats import file_name

    if not out_dir.is_dir():
        return []
    names = [file_name(fmt) for fmt in formats] + list(SIDE_FILES)
    return [out_dir / n for n in names if (out_dir / n).is_file()]


class ExportDialog(QDialog):
    def __init__(
        self,
        formats: Sequence[str],
        *,
        directory: str,
        checked: Sequence[str] = ("packed",),
        can_run: bool = True,
        price: float | None = None,
        concurrency: int = 1,
        parent=None,
    ):
        super().__init__(parent)
        self.setWindowTitle("Export compressed model")
        self.setObjectName("exportDialog")
        self.force = False
        self.boxes: dict[str, QCheckBox] = {}
        group = QGroupBox("Formats", self)
        grid = QGridLayout(group)
        runnable_only = {"onnx", "onnx-int8", "torchscript", "pt2"}
        for i, fmt in enumerate(formats):
            box = QCheckBox(fmt, group)
            box.setToolTip(FORMAT_HELP.get(fmt, fmt))
            box.setChecked(fmt in checked)
            if fmt in runnable_only and not can_run:
                box.setChecked(False)
                box.setEnabled(False)
                box.setToolTip(box.toolTip() + " (needs a model with a forward pass)")
            grid.addWidget(box, i // 2, i % 2)
            self.boxes[fmt] = box
        self.folder = QLineEdit(directory, self)
        self.folder.setObjectName("exportFolder")
        browse = QPushButton("Browse…", self)
        browse.clicked.connect(self._on_browse_clicked)
        row = QHBoxLayout()
        row.addWidget(QLabel("Folder", self))
        row.addWidget(self.folder, 1)
        row.addWidget(browse)
        self.report = QCheckBox("Also write report.json and report.html", self)
        self.report.setChecked(True)
        # Cloud cost: from the deployed files' measured latency (core.export.deploy.cost_block).
        self.price = QDoubleSpinBox(self)
        self.price.setObjectName("instancePrice")
        self.price.setRange(0.0, 1000.0)
        self.price.setDecimals(3)
        self.price.setSingleStep(0.1)
        self.price.setPrefix("$")
        self.price.setSuffix(" / h")
        self.price.setSpecialValueText("no cost estimate")
        self.price.setValue(price or 0.0)
        self.price.setToolTip(
            "Instance price in USD per hour: the results show the cost per million "
            "inferences before (original, PyTorch) and after (cheapest deployed file)"
        )
        self.concurrency = QSpinBox(self)
        self.concurrency.setObjectName("concurrency")
        self.concurrency.setRange(1, 1024)
        self.concurrency.setValue(max(1, concurrency))
        self.concurrency.setToolTip(
            "Batches served at once on the instance (1: the latency was measured with all "
            "threads, so the machine is already busy)"
        )
        cost_row = QHBoxLayout()
        cost_row.addWidget(QLabel("Instance price", self))
        cost_row.addWidget(self.price, 1)
        cost_row.addWidget(QLabel("Concurrency", self))
        cost_row.addWidget(self.concurrency)
        self.deploy_note = QLabel(
            "Every written file that runs here is checked on the held-out data: accuracy, "
            "latency (median, p10-p90) and a flag when it differs from the in-app model.",
            self,
        )
        self.deploy_note.setWordWrap(True)
        self.buttons = QDialogButtonBox(
            QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel, self
        )
        self.buttons.button(QDialogButtonBox.StandardButton.Ok).setText("Export")
        self.buttons.accepted.connect(self._on_buttons_accepted)
        self.buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addWidget(group)
        layout.addLayout(row)
        layout.addWidget(self.report)
        layout.addLayout(cost_row)
        layout.addWidget(self.deploy_note)
        layout.addWidget(self.buttons)

    def formats(self) -> list[str]:
        return [fmt for fmt, box in self.boxes.items() if box.isChecked()]

    def directory(self) -> str:
        return self.folder.text().strip()

    def instance_price(self) -> float | None:
        """USD per hour, or None when no cost estimate is wanted (the spin box at 0)."""
        value = self.price.value()
        return value if value > 0 else None

    def instance_concurrency(self) -> int:
        return self.concurrency.value()

    def confirm_overwrite(self, existing: list[Path]) -> bool:
        """Ask the user; a separate method so tests can answer it."""
        names = "\n".join(f"  {p.name}" for p in existing[:12])
        more = f"\n  … and {len(existing) - 12} more" if len(existing) > 12 else ""
        answer = QMessageBox.question(
            self,
            "Overwrite files?",
            f"{self.directory()} already contains:\n{names}{more}\n\nReplace them?",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
            QMessageBox.StandardButton.No,
        )
        return answer == QMessageBox.StandardButton.Yes

    def _on_browse_clicked(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Export folder", self.directory())
        if path:
            self.folder.setText(path)

    def _on_buttons_accepted(self) -> None:
        if not self.formats():
            QMessageBox.information(self, "Export", "Choose at least one format.")
            return
        if not self.directory():
            QMessageBox.information(self, "Export", "Choose a folder to export into.")
            return
        existing = existing_outputs(Path(self.directory()), self.formats())
        if existing:
            if not self.confirm_overwrite(existing):
                return
            self.force = True
        self.accept()
