"""Quantization controls: bit-width slider (off, 2..16), symmetric/per-channel toggles, group
size, rounding rule (from the quantizer registry), bias correction, biases."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QSlider,
)
from superqt.utils import signals_blocked

from core.base.methods import quantizers
from core.recipe.plan import MAX_BITS, MIN_BITS

#: Slider position meaning "quantization off" (one below the smallest width).
OFF = MIN_BITS - 1

#: Widths offered for biases; ``None`` keeps them float32.
BIAS_CHOICES: tuple[int | None, ...] = (None, 16, 8, 6, 4)
#: Group sizes offered; ``None`` is one scale per channel (or per tensor).
GROUP_CHOICES: tuple[int | None, ...] = (None, 32, 64, 128)


def bits_from_position(pos: int) -> int | None:
    return None if pos <= OFF else int(pos)


class QuantPanel(QGroupBox):
    bitsMoved = Signal(object)  # int | None
    symmetricToggled = Signal(bool)
    perChannelToggled = Signal(bool)
    biasBitsChosen = Signal(object)  # int | None
    groupSizeChosen = Signal(object)  # int | None
    methodChosen = Signal(str)
    biasCorrectionToggled = Signal(bool)
    editFinished = Signal()

    def __init__(self, parent=None):
        super().__init__("Quantization", parent)
        self.bits = QSlider(Qt.Orientation.Horizontal, self)
        self.bits.setObjectName("bitsSlider")
        self.bits.setRange(OFF, MAX_BITS)
        self.bits.setPageStep(1)
        self.bits.setTickPosition(QSlider.TickPosition.TicksBelow)
        self.bits.setTickInterval(2)
        self.bits.setToolTip(
            "Bits per kept weight: leftmost = off (fp32); 8 is usually lossless in accuracy, "
            "4-5 with fine-tuning"
        )
        self.bits_label = QLabel("off", self)
        self.bits_label.setFixedWidth(72)
        self.bits.valueChanged.connect(self._on_bits_valueChanged)
        self.bits.sliderReleased.connect(self.editFinished)
        self.symmetric = QCheckBox("Symmetric (zero point fixed at 0)", self)
        self.symmetric.setToolTip(
            "Symmetric: grid centred on zero, one level fewer. Asymmetric: the grid spans "
            "[min, max] of the weights, finer when they are lopsided."
        )
        self.symmetric.toggled.connect(self.symmetricToggled)
        self.per_channel = QCheckBox("Per channel (one scale per output row)", self)
        self.per_channel.setToolTip(
            "One scale and zero point per output channel instead of one per tensor: a few "
            "bytes more, much lower error when channels have different ranges"
        )
        self.per_channel.toggled.connect(self.perChannelToggled)
        self.bias_bits = QComboBox(self)
        self.bias_bits.setObjectName("biasBitsCombo")
        for bits in BIAS_CHOICES:
            self.bias_bits.addItem("off (fp32)" if bits is None else f"{bits} bit", bits)
        self.bias_bits.setToolTip(
            "Also quantize each layer's bias (one scale per tensor): biases are few, but in a "
            "small, heavily pruned model their fp32 bytes can be a third of the file; 8 bit "
            "costs almost no accuracy"
        )
        self.bias_bits.currentIndexChanged.connect(self._on_biasBits_currentIndexChanged)
        self.group_size = QComboBox(self)
        self.group_size.setObjectName("groupSizeCombo")
        for size in GROUP_CHOICES:
            self.group_size.addItem("per channel / tensor" if size is None else str(size), size)
        self.group_size.setToolTip(
            "One scale per run of this many inputs of each output channel (needs per channel): "
            "finer grids at 4 bits and below, 2-4 bytes more per group"
        )
        self.group_size.currentIndexChanged.connect(self._on_groupSize_currentIndexChanged)
        self.method = QComboBox(self)
        self.method.setObjectName("quantMethodCombo")
        for q in quantizers():
            self.method.addItem(q.label, q.name)
            self.method.setItemData(self.method.count() - 1, q.help, Qt.ItemDataRole.ToolTipRole)
        self.method.setToolTip(
            "Rounding rule onto the grid: round to nearest, or GPTQ (column by column with "
            "second-order error feedback from calibration data; needs data)"
        )
        self.method.currentIndexChanged.connect(self._on_method_currentIndexChanged)
        self.bias_correction = QCheckBox("Bias correction (needs data)", self)
        self.bias_correction.setObjectName("biasCorrectionCheck")
        self.bias_correction.setToolTip(
            "Shift each layer's bias by the mean output change its quantization error causes "
            "on calibration inputs"
        )
        self.bias_correction.toggled.connect(self.biasCorrectionToggled)
        form = QFormLayout(self)
        row = QHBoxLayout()
        row.addWidget(self.bits, 1)
        row.addWidget(self.bits_label)
        form.addRow("Bit width", row)
        form.addRow(self.symmetric)
        form.addRow(self.per_channel)
        form.addRow("Groups", self.group_size)
        form.addRow("Rounding", self.method)
        form.addRow(self.bias_correction)
        form.addRow("Biases", self.bias_bits)

    def set_config(self, quant) -> None:
        """Show ``quant`` (a `QuantConfig`) without emitting."""
        with (
            signals_blocked(self.bits),
            signals_blocked(self.symmetric),
            signals_blocked(self.per_channel),
            signals_blocked(self.bias_bits),
            signals_blocked(self.group_size),
            signals_blocked(self.method),
            signals_blocked(self.bias_correction),
        ):
            self.bits.setValue(OFF if quant.bits is None else quant.bits)
            self.symmetric.setChecked(quant.symmetric)
            self.per_channel.setChecked(quant.per_channel)
            index = self.bias_bits.findData(quant.bias_bits)
            if index < 0:
                # A recipe's width not in the list: show it as it is.
                self.bias_bits.addItem(f"{quant.bias_bits} bit", quant.bias_bits)
                index = self.bias_bits.count() - 1
            self.bias_bits.setCurrentIndex(index)
            index = self.group_size.findData(quant.group_size)
            if index < 0:
                self.group_size.addItem(str(quant.group_size), quant.group_size)
                index = self.group_size.count() - 1
            self.group_size.setCurrentIndex(index)
            self.method.setCurrentIndex(max(self.method.findData(quant.method), 0))
            self.bias_correction.setChecked(bool(quant.bias_correction))
        self._show(quant.bits)

    def _show(self, bits: int | None) -> None:
        self.bits_label.setText("off (fp32)" if bits is None else f"{bits} bit")
        for w in (self.symmetric, self.per_channel, self.group_size, self.method):
            w.setEnabled(bits is not None)
        self.bias_correction.setEnabled(bits is not None)

    def _on_bits_valueChanged(self, pos: int) -> None:
        bits = bits_from_position(pos)
        self._show(bits)
        self.bitsMoved.emit(bits)

    def _on_biasBits_currentIndexChanged(self, index: int) -> None:
        self.biasBitsChosen.emit(self.bias_bits.itemData(index))

    def _on_groupSize_currentIndexChanged(self, index: int) -> None:
        self.groupSizeChosen.emit(self.group_size.itemData(index))

    def _on_method_currentIndexChanged(self, index: int) -> None:
        self.methodChosen.emit(str(self.method.itemData(index)))
