"""A slot for a label whose text changes on every slider step, without re-laying out the window.

A `QLabel` inside a layout tells that layout to recompute whenever its text changes
(``QWidget::updateGeometry``); the layout then asks its parents, and during a slider drag the
whole window is laid out again on every step (about 1-1.5 ms per such label on the 2-core
bench machine, `bench/bench_gui.py`), although nothing moves. `QuietSlot` takes the label's
place in the layout and holds it as its only child, without a layout of its own: the slot's
size hint never changes, so a new text only repaints the label.

`settle_text` is for the labels whose text can be selected with the mouse: such a label lays
its new text out in its next paint event, and that asks for one more paint (Qt posts it, the
label is painted twice per new text); laid out at once, it is painted once.
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


def settle_text(label: QLabel, text: str) -> None:
    """``label.setText(text)``, with the text laid out now rather than in the next paint
    (for a selectable label; see the module docstring). No-op when the text is the same."""
    if label.text() == text:
        return
    label.setText(text)
    label.heightForWidth(label.width())  # lays the text document out
