"""Pruning controls: method, target sparsity or threshold, N:M shape, global pool, skip."""

from __future__ import annotations

import math

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QRadioButton,
    QSlider,
    QSpinBox,
    QWidget,
)
from superqt.utils import signals_blocked

from core.base.methods import prune_method, prune_methods

#: Menu order, labels and help all come from the method registry (`core.base.methods`).
PRUNE_METHODS = tuple(m.name for m in prune_methods())
METHOD_LABELS = {m.name: m.label for m in prune_methods()}
METHOD_HELP = {m.name: m.help for m in prune_methods()}

#: Slider resolution. Sparsity: per-mille steps up to 99.9 % (a recipe needs < 1).
SPARSITY_STEPS = 999
THRESHOLD_STEPS = 1000


def threshold_to_position(t: float, tmax: float) -> int:
    """Quadratic mapping: fine steps near zero, where most weights of a trained layer sit."""
    if tmax <= 0 or t <= 0:
        return 0
    return int(round(THRESHOLD_STEPS * math.sqrt(min(t / tmax, 1.0))))


def position_to_threshold(pos: int, tmax: float) -> float:
    return tmax * (pos / THRESHOLD_STEPS) ** 2


class PrunePanel(QGroupBox):
    """Emits edits; `set_config` writes the model's state back without echoing signals."""

    methodChosen = Signal(str)
    modeChosen = Signal(str)
    sparsityMoved = Signal(float)
    thresholdMoved = Signal(float)
    nmChosen = Signal(int, int)
    globalToggled = Signal(bool)
    skipToggled = Signal(bool)
    editFinished = Signal()
    resetRequested = Signal()

    def __init__(self, parent=None):
        super().__init__("Pruning", parent)
        self._tmax = 1.0
        self._items_with_gradients: bool | None = None
        self.method = QComboBox(self)
        self.method.setObjectName("pruneMethod")
        for i, m in enumerate(PRUNE_METHODS):
            self.method.addItem(METHOD_LABELS.get(m, m), m)
            self.method.setItemData(i, METHOD_HELP[m], Qt.ItemDataRole.ToolTipRole)
        self.method.currentIndexChanged.connect(self._on_method_currentIndexChanged)

        self.by_sparsity = QRadioButton("Target sparsity", self)
        self.by_threshold = QRadioButton("Threshold", self)
        self.by_sparsity.setToolTip("Prune this fraction of the weights (or channels)")
        self.by_threshold.setToolTip("Prune every weight whose score is below the threshold")
        self.mode_group = QButtonGroup(self)
        self.mode_group.addButton(self.by_sparsity)
        self.mode_group.addButton(self.by_threshold)
        self.by_sparsity.setChecked(True)
        self.by_sparsity.toggled.connect(self._on_bySparsity_toggled)

        self.sparsity = QSlider(Qt.Orientation.Horizontal, self)
        self.sparsity.setObjectName("sparsitySlider")
        self.sparsity.setRange(0, SPARSITY_STEPS)
        self.sparsity.setPageStep(50)
        self.sparsity.setToolTip("Target fraction of zeros (drag; the summary updates live)")
        self.sparsity_label = QLabel("0.0 %", self)
        # Fixed in both directions: a new value (every slider step) then does not ask the
        # panel, the tabs and the dock to lay out again (and repaint).
        self.sparsity_label.setFixedSize(64, self.sparsity_label.sizeHint().height())
        self.sparsity.valueChanged.connect(self._on_sparsity_valueChanged)
        self.sparsity.sliderReleased.connect(self.editFinished)

        self.threshold = QSlider(Qt.Orientation.Horizontal, self)
        self.threshold.setObjectName("thresholdSlider")
        self.threshold.setRange(0, THRESHOLD_STEPS)
        self.threshold.setPageStep(50)
        self.threshold.setToolTip(
            "Score threshold: weights (or channels) scoring below it are pruned. Also draggable "
            "as the red line on the histogram."
        )
        self.threshold_label = QLabel("0", self)
        self.threshold_label.setFixedSize(64, self.threshold_label.sizeHint().height())
        self.threshold.valueChanged.connect(self._on_threshold_valueChanged)
        self.threshold.sliderReleased.connect(self.editFinished)

        self.n = QSpinBox(self)
        self.m = QSpinBox(self)
        self.n.setRange(1, 15)
        self.m.setRange(2, 16)
        self.n.setToolTip("N: weights pruned in every group")
        self.m.setToolTip("M: group size along the input axis")
        self.n.valueChanged.connect(self._on_nm_valueChanged)
        self.m.valueChanged.connect(self._on_nm_valueChanged)

        self.global_pool = QCheckBox("One global threshold across layers", self)
        self.global_pool.setToolTip(
            "Whole model only: rank all layers' weights together so layers with many small "
            "weights are pruned harder (Deep Compression style); otherwise every layer gets "
            "the same target sparsity."
        )
        self.global_pool.toggled.connect(self.globalToggled)
        self.skip = QCheckBox("Skip (leave uncompressed)", self)
        self.skip.setToolTip("Keep this layer dense fp32: neither pruned nor quantized")
        self.skip.toggled.connect(self.skipToggled)
        self.reset = QPushButton("Follow model default", self)
        self.reset.setToolTip("Drop the selected layers' own settings so the default applies")
        self.reset.clicked.connect(self.resetRequested)
        self.hint = QLabel(self)
        self.hint.setWordWrap(True)
        self.hint.setObjectName("pruneHint")

        form = QFormLayout(self)
        form.addRow("Method", self.method)
        modes = QHBoxLayout()
        modes.addWidget(self.by_sparsity)
        modes.addWidget(self.by_threshold)
        modes.addStretch(1)
        form.addRow(modes)
        row = QHBoxLayout()
        row.addWidget(self.sparsity, 1)
        row.addWidget(self.sparsity_label)
        self._sparsity_row = QWidget(self)
        self._sparsity_row.setLayout(row)
        form.addRow("Sparsity", self._sparsity_row)
        row = QHBoxLayout()
        row.addWidget(self.threshold, 1)
        row.addWidget(self.threshold_label)
        self._threshold_row = QWidget(self)
        self._threshold_row.setLayout(row)
        form.addRow("Threshold", self._threshold_row)
        nm = QHBoxLayout()
        nm.addWidget(QLabel("prune", self))
        nm.addWidget(self.n)
        nm.addWidget(QLabel("of every", self))
        nm.addWidget(self.m)
        nm.addStretch(1)
        self._nm_row = QWidget(self)
        self._nm_row.setLayout(nm)
        form.addRow("N:M", self._nm_row)
        form.addRow(self.global_pool)
        form.addRow(self.skip)
        form.addRow(self.reset)
        form.addRow(self.hint)
        self._form = form
        self._gradients = False
        self._scope_model = True
        self._update_visibility()

    # ------------------------------------------------------------------ model -> widget
    def set_config(
        self,
        prune,
        *,
        skip: bool,
        threshold_max: float,
        shown_threshold: float | None,
        shown_sparsity: float | None = None,
        has_gradients: bool,
        whole_model: bool,
        has_override: bool,
    ) -> None:
        """Show ``prune`` (a `PruneConfig`); ``shown_threshold`` is the preview's threshold
        of the displayed layer (what the slider shows in sparsity mode); ``shown_sparsity``
        the preview's sparsity there (what the sparsity slider shows in threshold mode)."""
        self._tmax = max(float(threshold_max), 1e-12)
        self._gradients = has_gradients
        self._scope_model = whole_model
        widgets = (self.method, self.by_sparsity, self.by_threshold, self.sparsity, self.threshold)
        with (
            signals_blocked(widgets[0]),
            signals_blocked(widgets[1]),
            signals_blocked(widgets[2]),
            signals_blocked(widgets[3]),
            signals_blocked(widgets[4]),
            signals_blocked(self.n),
            signals_blocked(self.m),
            signals_blocked(self.global_pool),
            signals_blocked(self.skip),
        ):
            self.method.setCurrentIndex(max(0, self.method.findData(prune.method)))
            if has_gradients != self._items_with_gradients:
                # Only when it changes: touching the combo's items repaints it, and this
                # runs on every slider step.
                self._items_with_gradients = has_gradients
                for i, m in enumerate(PRUNE_METHODS):
                    enabled = has_gradients or not prune_method(m).needs_gradients
                    self.method.model().item(i).setEnabled(enabled)
                    needs = "" if enabled else " (needs data: open data and Analyze)"
                    self.method.setItemData(i, METHOD_HELP[m] + needs, Qt.ItemDataRole.ToolTipRole)
            self.method.setToolTip(METHOD_HELP[prune.method])
            self.by_sparsity.setChecked(prune.mode == "sparsity")
            self.by_threshold.setChecked(prune.mode == "threshold")
            # Threshold mode: the sparsity slider shows what the threshold implies, not the
            # stale target from before the switch.
            implied = prune.mode == "threshold" and shown_sparsity is not None
            sparsity = float(shown_sparsity) if implied else prune.sparsity
            self.sparsity.setValue(int(round(sparsity * 1000)))
            t = prune.threshold if prune.mode == "threshold" else (shown_threshold or 0.0)
            self.threshold.setValue(threshold_to_position(t, self._tmax))
            self.n.setValue(prune.n)
            self.m.setValue(prune.m)
            self.global_pool.setChecked(prune.scope == "global")
            self.skip.setChecked(skip)
        self._show_sparsity(sparsity)
        shown = prune.threshold if prune.mode == "threshold" else shown_threshold
        self.threshold_label.setText("—" if shown is None else f"{shown:.4g}")
        # Per-layer only: hidden (not just disabled) for the whole model to save room.
        self.reset.setEnabled(has_override)
        self.reset.setVisible(not whole_model)
        self.skip.setVisible(not whole_model)
        self._update_visibility()

    def current_method(self) -> str:
        return self.method.currentData()

    def set_threshold_value(self, t: float) -> None:
        """Move the threshold slider to ``t`` without emitting (a line drag is the source)."""
        with signals_blocked(self.threshold):
            self.threshold.setValue(threshold_to_position(t, self._tmax))
        self.threshold_label.setText(f"{t:.4g}")

    # ------------------------------------------------------------------ helpers
    def _show_sparsity(self, s: float) -> None:
        self.sparsity_label.setText(f"{100 * s:.1f} %")

    def _update_visibility(self) -> None:
        method = self.current_method()
        entry = prune_method(method)
        pruning = entry.prunes
        nm = entry.semi_structured
        self.by_sparsity.setEnabled(pruning and not nm)
        self.by_threshold.setEnabled(pruning and not nm)
        self._sparsity_row.setEnabled(not nm)
        self._threshold_row.setEnabled(not nm)
        self._nm_row.setVisible(nm)
        self._form.labelForField(self._nm_row).setVisible(nm)
        self.global_pool.setEnabled(self._scope_model and pruning and not entry.layer_scope_only)
        if entry.needs_gradients and not self._gradients:
            hint = "This criterion needs gradient statistics: open data and Analyze."
        elif not pruning:
            hint = "Move the sparsity slider to start pruning by magnitude."
        elif nm:
            hint = "N:M keeps a fixed pattern; sparsity is N/M in every layer it applies to."
        elif entry.structured:
            hint = "Structured: whole output channels are removed; the slider counts channels."
        else:
            hint = ""
        self.hint.setText(hint)

    # ------------------------------------------------------------------ slots
    def _on_method_currentIndexChanged(self, _index: int) -> None:
        self.method.setToolTip(METHOD_HELP[self.current_method()])
        self._update_visibility()
        self.methodChosen.emit(self.current_method())

    def _on_bySparsity_toggled(self, checked: bool) -> None:
        self.modeChosen.emit("sparsity" if checked else "threshold")

    def _on_sparsity_valueChanged(self, value: int) -> None:
        s = value / 1000.0
        self._show_sparsity(s)
        self.sparsityMoved.emit(s)

    def _on_threshold_valueChanged(self, value: int) -> None:
        t = position_to_threshold(value, self._tmax)
        self.threshold_label.setText(f"{t:.4g}")
        self.thresholdMoved.emit(t)

    def _on_nm_valueChanged(self, _value: int) -> None:
        n, m = self.n.value(), self.m.value()
        if n >= m:
            return
        self.nmChosen.emit(n, m)
