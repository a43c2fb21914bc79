"""Target-device chooser: "none" or a profile of the device catalogue (resources/devices.json or
a file the user loads). The live estimate says whether the plan fits the chosen device."""

from __future__ import annotations

from collections.abc import Sequence

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QComboBox, QHBoxLayout, QToolButton, QWidget
from superqt.utils import signals_blocked

#: Text of the combo entry that chooses no device.
NO_DEVICE = "none"


class DevicePicker(QWidget):
    """A combo box of device profiles plus a "Load…" button (`loadRequested`)."""

    deviceChosen = Signal(object)  # profile name, or None for no device
    loadRequested = Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self.combo = QComboBox(self)
        self.combo.setObjectName("deviceCombo")
        self.combo.setToolTip(
            "Target device: the live estimate says whether the plan's packed weights plus the "
            "peak activations fit its memory and storage; Export adds a device block to the "
            "report"
        )
        self.combo.addItem(NO_DEVICE, None)
        self.load = QToolButton(self)
        self.load.setObjectName("loadDevices")
        self.load.setText("Load…")
        self.load.setToolTip(
            "Load a device catalogue (devices.json, same shape as the shipped one)"
        )
        self.load.clicked.connect(self.loadRequested)
        self.combo.currentIndexChanged.connect(self._on_combo_currentIndexChanged)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.combo, 1)
        row.addWidget(self.load)

    def set_devices(self, names: Sequence[str], descriptions: Sequence[str] = ()) -> None:
        """Offer ``names`` (after "none"); keeps the current choice when it is still there."""
        current = self.current()
        with signals_blocked(self.combo):
            self.combo.clear()
            self.combo.addItem(NO_DEVICE, None)
            for i, name in enumerate(names):
                self.combo.addItem(name, name)
                if i < len(descriptions) and descriptions[i]:
                    self.combo.setItemData(i + 1, descriptions[i], Qt.ItemDataRole.ToolTipRole)
            idx = self.combo.findData(current) if current else 0
            self.combo.setCurrentIndex(max(idx, 0))

    def set_current(self, name: str | None) -> None:
        """Show ``name`` as chosen without emitting `deviceChosen`."""
        idx = self.combo.findData(name) if name else 0
        with signals_blocked(self.combo):
            self.combo.setCurrentIndex(max(idx, 0))

    def current(self) -> str | None:
        return self.combo.currentData()

    def choose(self, name: str | None) -> None:
        """Choose ``name`` as a user would (emits `deviceChosen`)."""
        idx = self.combo.findData(name) if name else 0
        if idx < 0:
            raise ValueError(f"no device {name!r} in the list")
        if idx == self.combo.currentIndex():
            self.deviceChosen.emit(name)
        else:
            self.combo.setCurrentIndex(idx)

    def _on_combo_currentIndexChanged(self, _index: int) -> None:
        self.deviceChosen.emit(self.current())
