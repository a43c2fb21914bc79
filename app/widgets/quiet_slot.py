"""A slot for a label whose text changes on every slider step, without re-laying out the window.

A `QLabel` inside a layout tells that layout to recompute whenever its text changes
(``QWidget::updateGeometry``); the layout then asks its parents, and during a slider drag the
whole window is laid out again on every step (about 1-1.5 ms per such label on the 2-core
bench machine, `bench/bench_gui.py`), although nothing moves. `QuietSlot` takes the label's
place in the layout and holds it as its only child, without a layout of its own: the slot's
size hint never changes, so a new text only repaints the label.
"""

from __future__ import annotations

from PySide6.QtCore import QSize
from PySide6.QtWidgets import QLabel, QWidget


class QuietSlot(QWidget):
    """Holds ``label`` at the slot's full size; put the slot in the layout, not the label.

    The slot takes the label's size policy; ``min_width`` is its minimum (and hinted) width and
    ``height`` its fixed height (default: the label's single-line size hint).
    """

    def __init__(
        self, label: QLabel, *, min_width: int = 0, height: int | None = None, parent=None
    ):
        super().__init__(parent)
        self.label = label
        label.setParent(self)
        self.setSizePolicy(label.sizePolicy())
        self.setMinimumWidth(min_width)
        self.setFixedHeight(label.sizeHint().height() if height is None else height)
        label.setGeometry(self.rect())

    def sizeHint(self) -> QSize:
        return QSize(self.minimumWidth(), self.height())

    def minimumSizeHint(self) -> QSize:
        return self.sizeHint()

    def resizeEvent(self, event) -> None:
        self.label.setGeometry(self.rect())
        super().resizeEvent(event)
