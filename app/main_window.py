"""The main window: layer table, histograms, controls, live summary, jobs and results.

Layout: layers dock on the left, plots in the centre (selected layer's weight and gradient
histograms over the whole-model size chart), controls dock on the right (scope, pruning,
quantization, live estimate), jobs dock at the bottom (progress, actions, recovery, results).
Docks, splitters, geometry, recent files and the last session live in `QSettings`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PySide6.QtCore import QByteArray, QEvent, QSettings, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QGuiApplication, QKeySequence
from PySide6.QtWidgets import (
    QComboBox,
    QDockWidget,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QMainWindow,
    QMenu,
    QMessageBox,
    QScrollArea,
    QSplitter,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)
from superqt.utils import qthrottled

from app.controller import JOB_TITLES, Controller
from app.failures import log_unexpected, unexpected_message
from app.widgets.device_panel import DevicePicker
from app.widgets.export_dialog import ExportDialog
from app.widgets.histogram_view import HistogramView
from app.widgets.jobs_panel import JobStatus, RecoveryPanel, ResultsPanel, action_button
from app.widgets.layer_table import OVERRIDE_MARK, LayerTable
from app.widgets.prune_panel import PrunePanel
from app.widgets.quant_panel import QuantPanel
from app.widgets.runs_view import RunsView, ensemble_members
from app.widgets.sensitivity_view import SensitivityUI
from app.widgets.size_view import SizeView
from app.widgets.summary_panel import SummaryPanel
from app.workers import warm_up_engine
from core import RESOURCES
from core.base.errors import WorkbenchError
from core.base.methods import prune_method
from core.recipe.edits import Edit, SetPrune, SetPruneTarget, SetQuant, SetSkip
from core.recipe.plan import CompressionPlan, RecoveryConfig, simple_plan, starting_plan

DEMOS = (("demo:mlp", "Digits MLP (LeNet-300-100)"), ("demo:cnn", "Digits CNN (LeNet-5)"))


def demo_recipes() -> list[tuple[Path, str]]:
    """``(path, demo source)`` of the shipped ``resources/recipes/demo_NAME.json`` files."""
    folder = RESOURCES / "recipes"
    demos = {source for source, _ in DEMOS}
    out = []
    for path in sorted(folder.glob("demo_*.json")):
        source = "demo:" + path.stem.removeprefix("demo_")
        if source in demos:
            out.append((path, source))
    return out


MODEL_FILTER = (
    "PyTorch models (*.pt *.pth *.pt2 *.ts *.jit *.safetensors *.bin *.ckpt);;All files (*)"
)
DATA_FILTER = "Data (*.npz *.pt *.pth);;All files (*)"
RECIPE_FILTER = "Recipes (*.json);;All files (*)"
DATA_SUFFIXES = {".npz"}
RECIPE_SUFFIXES = {".json"}
MAX_RECENT = 8
#: What `--screenshot` applies when no recipe is given: 70% global magnitude pruning, 6-bit
#: per-channel codes, 10 epochs of fine-tuning (recovers the demos' accuracy).
#: Slider/threshold-line edits go through at most once per this many ms (about one frame).
EDIT_THROTTLE_MS = 16

SAMPLE_PLAN = simple_plan(0.7, 6, "magnitude").with_recovery(RecoveryConfig(epochs=10))
#: How long closing the window waits for cancelled jobs to return (the window is hidden by then).
CLOSE_WAIT_MS = 2_000
#: Bump when the dock/toolbar layout changes so an old saved state is not restored onto it.
STATE_VERSION = 4
#: Most runs kept in the saved session (the oldest are dropped first).
MAX_SAVED_RUNS = 200


class MainWindow(QMainWindow):
    """See the module docstring. ``settings`` is injected so tests never touch the user's."""

    screenshotSaved = Signal(str)

    def __init__(self, settings: QSettings, controller: Controller | None = None, *, trust=False):
        super().__init__()
        self.settings = settings
        self.controller = controller or Controller(self)
        self.trust = trust
        self._error_boxes: list[QMessageBox] = []
        # Slider and threshold-line steps arrive faster than a model with hundreds of layers
        # can re-plan and repaint: the first step goes through at once, then at most one per
        # EDIT_THROTTLE_MS, and the last one always lands (flushed on release / other edits).
        # One throttle per control, so moving another slider is never delayed by this one.
        self._drags: dict[str, Any] = {}
        self.setObjectName("mainWindow")
        self.setWindowTitle("Compression Workbench")
        self.setAcceptDrops(True)
        self.setDockOptions(
            QMainWindow.DockOption.AnimatedDocks | QMainWindow.DockOption.AllowTabbedDocks
        )
        self._build_widgets()
        self._build_actions()
        self._build_menus()
        self._build_docks()
        self._connect()
        # Sensitivity dock, Target tab and Scan action (app/widgets/sensitivity_view.py).
        self.sensitivity_ui = SensitivityUI(self)
        self._restore_layout()
        self._update_actions()
        warm_up_engine()

    # ------------------------------------------------------------------ construction
    def _build_widgets(self) -> None:
        self.layer_table = LayerTable(self)
        self.histograms = HistogramView(self)
        self.histograms.log_counts.setChecked(self.settings.value("view/logCounts", True, bool))
        self.histograms.abs_axis.setChecked(self.settings.value("view/absAxis", False, bool))
        self.size_view = SizeView(self)
        self.center = QSplitter(Qt.Orientation.Vertical, self)
        self.center.setObjectName("centerSplitter")
        self.center.addWidget(self.histograms)
        self.center.addWidget(self.size_view)
        self.center.setStretchFactor(0, 3)
        self.center.setStretchFactor(1, 2)
        self.center.setChildrenCollapsible(False)
        self.setCentralWidget(self.center)

        self.scope = QComboBox(self)
        self.scope.setObjectName("scopeCombo")
        self.scope.addItem("Whole model", "model")
        self.scope.addItem("Selected layers", "selection")
        self.scope.setToolTip(
            "Whole model: edits change the default (and every layer's own settings). "
            "Selected layers: edits give the selected layers their own settings."
        )
        self.scope_note = QLabel(self)
        self.scope_note.setWordWrap(True)
        self.prune_panel = PrunePanel(self)
        self.quant_panel = QuantPanel(self)
        self.summary = SummaryPanel(self)
        self.recovery = RecoveryPanel(self)
        controls = QWidget(self)
        v = QVBoxLayout(controls)
        v.addWidget(self.summary)
        scope_form = QFormLayout()
        scope_form.addRow("Apply edits to", self.scope)
        self.device_picker = DevicePicker(self)
        scope_form.addRow("Target device", self.device_picker)
        v.addLayout(scope_form)
        v.addWidget(self.scope_note)
        # One tab per control group: every group is reachable without scrolling at 1366x768
        # (stacked, the quantization and recovery groups fell below the fold).
        self.control_tabs = QTabWidget(self)
        self.control_tabs.setObjectName("controlTabs")
        self.control_tabs.setDocumentMode(True)
        for panel, title, tip in (
            (self.prune_panel, "Pruning", "Method, target sparsity or threshold, N:M, skip"),
            (self.quant_panel, "Quantization", "Bit width, symmetric, per-channel, bias bits"),
            (self.recovery, "Recovery", "Fine-tuning / distillation after Compress"),
        ):
            panel.setTitle("")
            panel.setFlat(True)
            index = self.control_tabs.addTab(panel, title)
            self.control_tabs.setTabToolTip(index, tip)
        v.addWidget(self.control_tabs)
        v.addStretch(1)
        self.controls_scroll = QScrollArea(self)
        self.controls_scroll.setWidgetResizable(True)
        self.controls_scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.controls_scroll.setWidget(controls)
        # Never narrower than the controls: with no horizontal scrollbar they would be clipped.
        self.controls_scroll.setMinimumWidth(
            controls.minimumSizeHint().width()
            + self.controls_scroll.verticalScrollBar().sizeHint().width()
            + 2 * self.controls_scroll.frameWidth()
        )

        self.job_status = JobStatus(self)
        self.results = ResultsPanel(self)
        self.runs_view = RunsView(self)
        self.data_label = QLabel("No data", self)
        self.data_label.setObjectName("dataLabel")
        self.data_label.setWordWrap(True)

    def _action(self, text, slot, shortcut=None, tip="", name=None) -> QAction:
        action = QAction(text, self)
        if shortcut is not None:
            action.setShortcut(QKeySequence(shortcut))
            action.setShortcutContext(Qt.ShortcutContext.WindowShortcut)
        tip_text = tip or text.replace("…", "")
        if shortcut is not None:
            tip_text += (
                f" ({QKeySequence(shortcut).toString(QKeySequence.SequenceFormat.NativeText)})"
            )
        action.setToolTip(tip_text)
        action.setStatusTip(tip or text)
        action.triggered.connect(slot)
        if name:
            action.setObjectName(name)
        self.addAction(action)
        return action

    def _build_actions(self) -> None:
        K = QKeySequence.StandardKey
        self.act_open = self._action(
            "&Open model…", self._on_actOpen_triggered, K.Open, "Open a PyTorch model file"
        )
        self.act_open_data = self._action(
            "Open &data…",
            self._on_actOpenData_triggered,
            "Ctrl+D",
            "Open a .npz/.pt data file with x (and optional y) for gradients and accuracy",
        )
        self.act_load_recipe = self._action(
            "&Load recipe…", self._on_actLoadRecipe_triggered, "Ctrl+L", "Load a JSON recipe"
        )
        self.act_save_recipe = self._action(
            "&Save recipe…", self._on_actSaveRecipe_triggered, K.Save, "Save the plan as a recipe"
        )
        self.act_export = self._action(
            "&Export…", self._on_actExport_triggered, "Ctrl+E", "Export the compressed model"
        )
        self.act_quit = self._action("&Quit", self.close, K.Quit)
        self.act_undo = self._action("&Undo", self._undo, K.Undo, "Undo the last plan edit")
        self.act_redo = self._action("&Redo", self._redo, "Ctrl+Shift+Z", "Redo the plan edit")
        # Ctrl+Y is the other common redo key (Windows convention); both work.
        self.act_redo.setShortcuts([QKeySequence("Ctrl+Shift+Z"), QKeySequence("Ctrl+Y")])
        self.act_reset_plan = self._action(
            "Reset &plan", self._on_actResetPlan_triggered, None, "Start again from no compression"
        )
        self.act_analyze = self._action(
            "&Analyze",
            self._on_actAnalyze_triggered,
            "Ctrl+Shift+A",
            "Recompute histograms, scores and gradient statistics",
        )
        self.act_compress = self._action(
            "&Compress",
            self._on_actCompress_triggered,
            "Ctrl+R",
            "Apply the plan to a copy of the model (fine-tunes when Recovery epochs > 0)",
            name="actCompress",
        )
        self.act_finetune = self._action(
            "&Fine-tune",
            self._on_actFinetune_triggered,
            "Ctrl+Shift+R",
            "Fine-tune / distill the compressed model with its masks fixed",
        )
        self.act_evaluate = self._action(
            "E&valuate",
            self._on_actEvaluate_triggered,
            "Ctrl+T",
            "Accuracy, agreement and latency of original vs compressed",
        )
        self.act_cancel = self._action(
            "Ca&ncel job", self.controller.cancel_jobs, "Esc", "Cancel the running job"
        )
        self.act_reset_layout = self._action(
            "Reset &layout", self._on_actResetLayout_triggered, None, "Default dock sizes"
        )

    def _build_menus(self) -> None:
        bar = self.menuBar()
        file_menu = bar.addMenu("&File")
        file_menu.addAction(self.act_open)
        demos = file_menu.addMenu("Open &built-in demo")
        for source, title in DEMOS:
            act = demos.addAction(title)
            act.setToolTip(f"{source}: trained on scikit-learn's 8x8 digits, data included")
            act.triggered.connect(lambda _=False, s=source: self.open_model(s))
        self.recent_menu = QMenu("Open &recent", self)
        file_menu.addMenu(self.recent_menu)
        file_menu.addAction(self.act_open_data)
        file_menu.addSeparator()
        file_menu.addAction(self.act_load_recipe)
        self.demo_recipes_menu = file_menu.addMenu("Demo &recipes")
        self.demo_recipes_menu.setToolTipsVisible(True)
        for path, source in demo_recipes():
            act = self.demo_recipes_menu.addAction(f"{source}: Deep Compression ({path.name})")
            act.setToolTip(
                f"Open {source} with the shipped recipe {path.name} (the one the benchmark "
                "table uses); Compress reproduces its numbers"
            )
            act.triggered.connect(lambda _=False, p=path, s=source: self.open_demo_recipe(p, s))
        self.demo_recipes_menu.setEnabled(bool(self.demo_recipes_menu.actions()))
        file_menu.addAction(self.act_save_recipe)
        file_menu.addSeparator()
        file_menu.addAction(self.act_export)
        self.act_recheck = file_menu.addAction(
            "C&heck exported files again", self._on_actRecheck_triggered
        )
        self.act_recheck.setObjectName("actRecheckExports")
        self.act_load_devices = file_menu.addAction(
            "Load &device profiles…", self._on_actLoadDevices_triggered
        )
        self.act_load_devices.setObjectName("actLoadDevices")
        file_menu.addSeparator()
        file_menu.addAction(self.act_quit)
        edit = bar.addMenu("&Edit")
        edit.addAction(self.act_undo)
        edit.addAction(self.act_redo)
        edit.addSeparator()
        edit.addAction(self.act_reset_plan)
        run = self.run_menu = bar.addMenu("&Run")
        for act in (self.act_analyze, self.act_compress, self.act_finetune, self.act_evaluate):
            run.addAction(act)
        self.act_ensemble = run.addAction(
            "Build &ensemble from selected runs…", self._on_actEnsemble_triggered
        )
        self.act_ensemble.setObjectName("actEnsemble")
        run.addSeparator()
        run.addAction(self.act_cancel)
        self.view_menu = bar.addMenu("&View")
        help_menu = bar.addMenu("&Help")
        help_menu.addAction("Pruning &methods", self._on_actMethods_triggered)
        help_menu.addAction("&About", self._on_actAbout_triggered)
        self._rebuild_recent_menu()

        tools = self.addToolBar("Main")
        tools.setObjectName("mainToolbar")
        tools.setMovable(False)
        for act in (self.act_open, self.act_open_data):
            tools.addAction(act)
        tools.addSeparator()
        for act in (self.act_undo, self.act_redo):
            tools.addAction(act)
        tools.addSeparator()
        for act in (self.act_analyze, self.act_compress, self.act_finetune, self.act_evaluate):
            tools.addAction(act)
        tools.addAction(self.act_export)

    def _build_docks(self) -> None:
        self.layers_dock = QDockWidget("Layers", self)
        self.layers_dock.setObjectName("layersDock")
        self.layers_dock.setWidget(self.layer_table)
        self.addDockWidget(Qt.DockWidgetArea.LeftDockWidgetArea, self.layers_dock)

        self.controls_dock = QDockWidget("Compression plan", self)
        self.controls_dock.setObjectName("controlsDock")
        self.controls_dock.setWidget(self.controls_scroll)
        self.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, self.controls_dock)
        # The plan controls take the full height (the jobs dock stops at them): at 1366x768
        # the jobs dock below them would push the control groups out of view.
        self.setCorner(Qt.Corner.BottomRightCorner, Qt.DockWidgetArea.RightDockWidgetArea)

        jobs = QWidget(self)
        h = QHBoxLayout(jobs)
        left = QVBoxLayout()
        left.addWidget(self.job_status)
        buttons = QHBoxLayout()
        for act in (
            self.act_analyze,
            self.act_compress,
            self.act_finetune,
            self.act_evaluate,
            self.act_export,
        ):
            buttons.addWidget(action_button(act, jobs))
        buttons.addStretch(1)
        left.addLayout(buttons)
        left.addWidget(self.data_label)
        left.addStretch(1)
        h.addLayout(left, 2)
        h.addWidget(self.results, 6)
        self.jobs_dock = QDockWidget("Jobs and results", self)
        self.jobs_dock.setObjectName("jobsDock")
        self.jobs_dock.setWidget(jobs)
        self.addDockWidget(Qt.DockWidgetArea.BottomDockWidgetArea, self.jobs_dock)
        self.runs_dock = QDockWidget("Runs", self)
        self.runs_dock.setObjectName("runsDock")
        self.runs_dock.setWidget(self.runs_view)
        self.addDockWidget(Qt.DockWidgetArea.BottomDockWidgetArea, self.runs_dock)
        self.tabifyDockWidget(self.jobs_dock, self.runs_dock)
        self.jobs_dock.raise_()
        for dock in (self.layers_dock, self.controls_dock, self.jobs_dock, self.runs_dock):
            self.view_menu.addAction(dock.toggleViewAction())
        self.view_menu.addSeparator()
        self.view_menu.addAction(self.act_reset_layout)

    def _connect(self) -> None:
        c = self.controller
        c.modelLoaded.connect(self._on_controller_modelLoaded)
        c.layersChanged.connect(self.layer_table.set_layers)
        c.dataLoaded.connect(self._on_controller_dataLoaded)
        c.statsReady.connect(self._on_controller_statsReady)
        c.planChanged.connect(self._on_controller_planChanged)
        c.previewUpdated.connect(self._on_controller_previewUpdated)
        c.selectionChanged.connect(self._on_controller_selectionChanged)
        c.targetChanged.connect(self._on_controller_targetChanged)
        c.resultReady.connect(self._on_controller_resultReady)
        c.evaluated.connect(self.results.set_evaluation)
        c.exported.connect(self.results.set_exports)
        c.historyChanged.connect(self._on_controller_historyChanged)
        c.runRecorded.connect(self._on_controller_runRecorded)
        c.layersChanged.connect(self._on_controller_layersChanged)
        self.runs_view.planRequested.connect(self._on_runsView_planRequested)
        # Deployment target: device chooser, deployed-check results, cost, ensembles.
        c.devicesLoaded.connect(self._on_controller_devicesLoaded)
        c.deviceChanged.connect(self._on_controller_deviceChanged)
        c.previewUpdated.connect(self._refresh_device_fit)
        c.exportTargets.connect(self.results.set_targets)
        self.device_picker.deviceChosen.connect(self._on_devicePicker_deviceChosen)
        self.device_picker.loadRequested.connect(self._on_actLoadDevices_triggered)
        self.runs_view.ensembleRequested.connect(self._on_runsView_ensembleRequested)
        saved_device = self.settings.value("device/name", "")
        catalogue = str(self.settings.value("device/catalogue", "") or "")
        if not (catalogue and Path(catalogue).is_file() and c.load_devices(catalogue)):
            c.load_devices()
        if saved_device and saved_device in c.devices:
            c.set_device(saved_device)
        c.dragFinished.connect(self.layer_table.resort)
        c.jobStarted.connect(self._on_controller_jobStarted)
        c.jobProgressed.connect(self._on_controller_jobProgressed)
        c.jobFinished.connect(self._on_controller_jobFinished)
        c.errorRaised.connect(self.show_error)
        c.statusMessaged.connect(self._on_controller_statusMessaged)
        c.trustRequested.connect(self._on_controller_trustRequested)

        self.layer_table.layersSelected.connect(c.set_selection)
        self.size_view.layerClicked.connect(self._on_sizeView_layerClicked)
        self.scope.currentIndexChanged.connect(self._on_scope_currentIndexChanged)
        p = self.prune_panel
        p.methodChosen.connect(self._on_prune_methodChosen)
        p.modeChosen.connect(self._on_prune_modeChosen)
        p.sparsityMoved.connect(self._on_prune_sparsityMoved)
        p.thresholdMoved.connect(self._on_prune_thresholdMoved)
        p.nmChosen.connect(self._on_prune_nmChosen)
        p.globalToggled.connect(self._on_prune_globalToggled)
        p.skipToggled.connect(self._on_prune_skipToggled)
        p.editFinished.connect(self._end_drag)
        p.resetRequested.connect(c.reset_selection_to_default)
        q = self.quant_panel
        q.bitsMoved.connect(self._on_quant_bitsMoved)
        q.symmetricToggled.connect(self._on_quant_symmetricToggled)
        q.perChannelToggled.connect(self._on_quant_perChannelToggled)
        q.biasBitsChosen.connect(self._on_quant_biasBitsChosen)
        q.groupSizeChosen.connect(self._on_quant_groupSizeChosen)
        q.methodChosen.connect(self._on_quant_methodChosen)
        q.biasCorrectionToggled.connect(self._on_quant_biasCorrectionToggled)
        q.editFinished.connect(self._end_drag)
        self.recovery.recoveryEdited.connect(c.set_recovery)
        self.histograms.thresholdDragged.connect(self._on_histograms_thresholdDragged)
        self.histograms.thresholdReleased.connect(self._end_drag)
        self.job_status.cancelRequested.connect(c.cancel_jobs)

    # ------------------------------------------------------------------ layout & settings
    def _default_layout(self) -> None:
        self.resize(1440, 900)
        self.resizeDocks(
            [self.layers_dock, self.controls_dock], [440, 380], Qt.Orientation.Horizontal
        )
        self.resizeDocks([self.jobs_dock], [215], Qt.Orientation.Vertical)
        self.center.setSizes([450, 250])
        self.histograms.splitter.setSizes([400, 270])

    def _restore_layout(self) -> None:
        self._default_layout()
        geometry = self.settings.value("window/geometry")
        state = self.settings.value("window/state")
        self.restored_geometry = isinstance(geometry, QByteArray | bytes) and self.restoreGeometry(
            QByteArray(geometry)
        )
        if isinstance(state, QByteArray | bytes):
            self.restoreState(QByteArray(state), STATE_VERSION)
        for key, splitter in (
            ("window/center", self.center),
            ("window/histograms", self.histograms.splitter),
        ):
            value = self.settings.value(key)
            if isinstance(value, QByteArray | bytes):
                splitter.restoreState(QByteArray(value))

    def save_session(self) -> None:
        s = self.settings
        s.setValue("window/geometry", self.saveGeometry())
        s.setValue("window/state", self.saveState(STATE_VERSION))
        s.setValue("window/center", self.center.saveState())
        s.setValue("window/histograms", self.histograms.splitter.saveState())
        s.setValue("view/logCounts", self.histograms.log_counts.isChecked())
        s.setValue("view/absAxis", self.histograms.abs_axis.isChecked())
        model = self.controller.model
        if model is not None:
            s.setValue("session/model", model.source)
            s.setValue("session/plan", self.controller.plan.to_json())
            runs = [r.to_dict() for r in self.controller.runs[-MAX_SAVED_RUNS:]]
            s.setValue("session/runs", json.dumps({"model": model.source, "runs": runs}))
        s.sync()

    def _restore_runs(self, source: str) -> None:
        """Bring back the runs saved with the last session of ``source`` (once per model)."""
        from core.session import RunRecord

        text = self.settings.value("session/runs", "")
        if not text or self.controller.runs:
            return
        try:
            saved = json.loads(str(text))
            if saved.get("model") != source:
                return
            records = [RunRecord.from_dict(d) for d in saved.get("runs", [])]
        except (ValueError, AttributeError, WorkbenchError) as exc:
            # A damaged settings entry must not stop the model from opening.
            self.statusBar().showMessage(f"Saved runs not restored: {exc}", 8000)
            return
        self.controller.session.restore_runs(records)
        self.runs_view.set_runs(self.controller.runs)

    def recent_files(self) -> list[str]:
        value = self.settings.value("recent/files", [])
        if isinstance(value, str):
            value = [value]
        return [str(v) for v in (value or [])]

    def _add_recent(self, source: str) -> None:
        if source.startswith("demo:"):
            return
        files = [source] + [f for f in self.recent_files() if f != source]
        self.settings.setValue("recent/files", files[:MAX_RECENT])
        self._rebuild_recent_menu()

    def _rebuild_recent_menu(self) -> None:
        self.recent_menu.clear()
        files = self.recent_files()
        for path in files:
            act = self.recent_menu.addAction(Path(path).name)
            act.setToolTip(path)
            act.setStatusTip(path)
            act.triggered.connect(lambda _=False, p=path: self.open_model(p))
        self.recent_menu.setEnabled(bool(files))

    def _on_actResetLayout_triggered(self) -> None:
        for dock in (self.layers_dock, self.controls_dock, self.jobs_dock, self.runs_dock):
            dock.setFloating(False)
            dock.show()
        self.addDockWidget(Qt.DockWidgetArea.LeftDockWidgetArea, self.layers_dock)
        self.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, self.controls_dock)
        self.addDockWidget(Qt.DockWidgetArea.BottomDockWidgetArea, self.jobs_dock)
        self.tabifyDockWidget(self.jobs_dock, self.runs_dock)
        self.jobs_dock.raise_()
        self._default_layout()

    # ------------------------------------------------------------------ public
    def open_model(self, source: str, *, trust: bool | None = None, plan=None) -> None:
        self.controller.open_model(source, trust=self.trust if trust is None else trust, plan=plan)

    def open_demo_recipe(self, path: Path, source: str) -> None:
        """Load a shipped recipe, opening its demo model first unless it is already open."""
        model = self.controller.model
        if model is not None and model.source == source:
            self.controller.load_recipe(str(path))
            return
        try:
            plan = CompressionPlan.load(path)
        except WorkbenchError as exc:
            self.show_error("Load recipe", str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - an input the loader did not foresee
            details = log_unexpected("Load recipe", exc)
            self.show_error("Load recipe", unexpected_message("recipe", str(path), exc), details)
            return
        self.open_model(source, plan=plan)

    def show_error(self, title: str, message: str, details: str = "") -> QMessageBox:
        """Non-blocking error dialog with the engine's message; the app stays usable."""
        box = QMessageBox(
            QMessageBox.Icon.Critical, title, message, QMessageBox.StandardButton.Ok, self
        )
        box.setObjectName("errorDialog")
        if details:
            box.setDetailedText(details)
        box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        box.finished.connect(
            lambda _=0, b=box: self._error_boxes.remove(b) if b in self._error_boxes else None
        )
        self._error_boxes.append(box)
        box.open()
        self.statusBar().showMessage(f"{title}: {message}", 10_000)
        return box

    # ------------------------------------------------------------------ refresh helpers
    def _shown_layer(self) -> str | None:
        sel = self.controller.selection
        return sel[0] if sel else None

    def _threshold_max(self) -> float:
        """Range of the threshold slider: the largest score of the method in scope."""
        c = self.controller
        stats = c.stats
        if stats is None:
            return 1.0
        method = c.shown_config().prune.method
        # Methods without a score of their own (none, N:M) show the magnitude range.
        key = method if prune_method(method).has_score else "magnitude"
        names = c.targets() or tuple(stats.tensors)
        # Fixed for these stats, method and layers: a slider step does not recompute it.
        memo = getattr(self, "_threshold_max_of", None)
        if memo is not None and memo[0] is stats and memo[1:3] == (key, names):
            return memo[3]
        best = 0.0
        for name in names:
            ts = stats.tensors.get(name)
            if ts is None:
                continue
            index = ts.scores.get(key)
            if index is not None and index.n:
                # The smallest threshold that prunes every score is the top of the range.
                best = max(best, float(index.threshold_for_count(index.n)))
        self._threshold_max_of = (stats, key, names, best or 1.0)
        return best or 1.0

    def _refresh_controls(self) -> None:
        c = self.controller
        cfg = c.shown_config()
        name = self._shown_layer()
        shown_threshold = shown_sparsity = None
        whole = c.target == "model"
        # Under "whole model" a shown layer with its own settings is displayed with those
        # settings, as its histogram is. A whole-model edit sets the moved field on the
        # default and on every layer with its own settings, so the slider stays in step.
        own = whole and name is not None and name in c.plan.layer_overrides
        if own:
            cfg = c.plan.config_for(name)
        if c.preview is not None:
            target = c.targets()[0] if c.targets() else (name if own else _following_layer(c, name))
            lp = _layer_preview(c.preview, target)
            if lp is not None:
                shown_threshold = lp.threshold
                shown_sparsity = lp.sparsity
        self.prune_panel.set_config(
            cfg.prune,
            skip=cfg.skip,
            threshold_max=self._threshold_max(),
            shown_threshold=shown_threshold,
            shown_sparsity=shown_sparsity,
            has_gradients=bool(c.stats is not None and c.stats.has_gradients),
            whole_model=whole,
            has_override=any(n in c.plan.layer_overrides for n in c.selection),
        )
        self.quant_panel.set_config(cfg.quant)
        self.recovery.set_config(c.plan.recovery)
        overrides = len(c.plan.overrides)
        if whole:
            note = "Edits change the model default."
            if own:
                note = (
                    f"{OVERRIDE_MARK} {name} has its own settings (shown). A change here sets "
                    "that field on every layer; its other own settings stay."
                )
            elif overrides:
                note += (
                    f" {overrides} layer(s) with their own settings ({OVERRIDE_MARK} in the "
                    "table) keep them."
                )
        elif c.selection:
            shown = ", ".join(c.selection[:3]) + (" …" if len(c.selection) > 3 else "")
            note = f"Edits apply to: {shown}"
        else:
            note = "Select layers in the table to edit them."
        self.scope_note.setText(note)
        self._refresh_histogram_state()

    def _refresh_histogram_state(self) -> None:
        c = self.controller
        name = self._shown_layer()
        if name is None:
            return
        cfg = c.plan.config_for(name)
        lp = _layer_preview(c.preview, name) if c.preview is not None else None
        method = cfg.prune.method
        if cfg.skip:
            method = "none"
        self.histograms.set_plan_state(
            method=method,
            threshold=None if lp is None else lp.threshold,
            bits=None if (lp is None or cfg.skip) else lp.bits,
            symmetric=cfg.quant.symmetric,
            per_channel=cfg.quant.per_channel,
            layer_preview=lp,
        )

    def _refresh_histogram_layer(self) -> None:
        c = self.controller
        name = self._shown_layer()
        ts = None if (c.stats is None or name is None) else c.stats.tensors.get(name)
        self.histograms.set_layer(ts)
        self.histograms.set_after(c.after_hists.get(name) if name else None)
        self._refresh_histogram_state()

    def _update_actions(self) -> None:
        c = self.controller
        model = c.model
        can_run = model is not None and model.can_run
        loading = c.busy("load")
        self.act_open_data.setEnabled(model is not None and not loading)
        self.act_analyze.setEnabled(model is not None and not loading)
        self.act_compress.setEnabled(c.stats is not None and not loading)
        # While a compression or fine-tune runs, the result these act on is about to be
        # replaced: acting on it then would evaluate or export the old one.
        settled = c.result is not None and not (c.busy("compress") or c.busy("finetune"))
        self.act_finetune.setEnabled(settled and can_run and c.train is not None)
        self.act_evaluate.setEnabled(settled and can_run and c.test is not None)
        self.act_export.setEnabled(settled)
        self.act_recheck.setEnabled(settled and bool(c.exports) and not c.busy("export"))
        self.act_save_recipe.setEnabled(model is not None)
        self.act_load_recipe.setEnabled(model is not None)
        self.act_cancel.setEnabled(c.busy())
        self.act_undo.setEnabled(c.can_undo)
        self.act_redo.setEnabled(c.can_redo)

    # ------------------------------------------------------------------ controller slots
    def _on_controller_modelLoaded(self, model) -> None:
        name = model.source if model.source.startswith("demo:") else Path(model.source).name
        flags = []
        if model.weights_only:
            flags.append("weights only")
        self.setWindowTitle(
            f"{name} [{model.format}{', ' + ', '.join(flags) if flags else ''}] — Compression Workbench"
        )
        self.histograms.set_weights_only(model.weights_only)
        self._add_recent(model.source)
        self._restore_runs(model.source)
        self.settings.setValue("session/model", model.source)
        self.statusBar().showMessage(f"Opened {model.source} ({model.format})", 5000)
        self._update_actions()

    def _on_controller_dataLoaded(self, description: str) -> None:
        self.data_label.setText(
            f"Data: {description}"
            if description
            else "No data: open a .npz/.pt file for gradients and accuracy"
        )
        self._update_actions()

    def _on_controller_statsReady(self, _stats) -> None:
        self._refresh_histogram_layer()
        self._refresh_controls()
        self._update_actions()

    def _on_controller_planChanged(self, plan) -> None:
        self.layer_table.set_overrides(plan.layer_overrides)
        # With stats, previewUpdated follows at once and refreshes everything; refreshing
        # here too would do the work twice per slider step.
        if self.controller.stats is None:
            self._refresh_controls()

    def _on_controller_previewUpdated(self, preview) -> None:
        c = self.controller
        self.summary.set_preview(
            preview, "" if preview is None else _plan_note(c.plan), c.baseline_bytes
        )
        self.layer_table.set_preview(preview)
        if not c.dragging:
            self.layer_table.resort()
        self.size_view.set_preview(preview, c.selection)
        self.results.set_stale(c.result_stale)
        self._refresh_controls()

    def _on_controller_selectionChanged(self, names: tuple) -> None:
        self.layer_table.select_names(names)
        self.size_view.set_selection(names)
        self._refresh_histogram_layer()
        self._refresh_controls()

    def _on_controller_targetChanged(self, target: str) -> None:
        idx = self.scope.findData(target)
        if idx != self.scope.currentIndex():
            self.scope.blockSignals(True)
            self.scope.setCurrentIndex(idx)
            self.scope.blockSignals(False)
        self._refresh_controls()

    def _on_controller_resultReady(self, result) -> None:
        self.results.set_result(result)
        self.results.set_stale(self.controller.result_stale)
        name = self._shown_layer()
        self.histograms.set_after(self.controller.after_hists.get(name) if name else None)
        self._update_actions()

    def _on_controller_runRecorded(self, _record) -> None:
        self.runs_view.set_runs(self.controller.runs)

    def _on_controller_layersChanged(self, layers) -> None:
        self.runs_view.set_layer_names([layer.name for layer in layers])

    def _on_runsView_planRequested(self, record) -> None:
        self._flush_drags()
        self.controller.set_plan(record.plan)
        self.statusBar().showMessage(
            f"Restored the plan of run {record.id} ({record.kind}); Undo (Ctrl+Z) goes back.",
            8000,
        )

    def _on_controller_historyChanged(self, can_undo: bool, can_redo: bool) -> None:
        self.act_undo.setEnabled(can_undo)
        self.act_redo.setEnabled(can_redo)

    def _on_controller_jobStarted(self, kind: str, description: str) -> None:
        self.job_status.started(JOB_TITLES[kind], description)
        self._update_actions()

    def _on_controller_jobProgressed(self, kind: str, fraction: float, message: str) -> None:
        self.job_status.progressed(JOB_TITLES[kind], fraction, message)

    def _on_controller_jobFinished(self, kind: str, outcome: str) -> None:
        self.job_status.finished(JOB_TITLES[kind], outcome, self.controller.busy())
        self._update_actions()

    def _on_controller_statusMessaged(self, message: str) -> None:
        self.statusBar().showMessage(message, 8000)

    def _on_controller_trustRequested(self, source: str) -> None:
        answer = QMessageBox.warning(
            self,
            "Trust this file?",
            f"{source} is a pickled Python object. Unpickling runs code stored in the file, "
            "which can do anything your user account can.\n\nOpen it only if you made it or "
            "trust where it came from. Open and run it?",
            QMessageBox.StandardButton.Open | QMessageBox.StandardButton.Cancel,
            QMessageBox.StandardButton.Cancel,
        )
        if answer == QMessageBox.StandardButton.Open:
            self.open_model(source, trust=True)

    # ------------------------------------------------------------------ widget slots
    def _on_sizeView_layerClicked(self, name: str) -> None:
        self.controller.set_selection((name,))

    def _on_scope_currentIndexChanged(self, _index: int) -> None:
        self.controller.set_target(self.scope.currentData())

    def _edit(self, make: Callable[..., Edit], *, drag: bool = False, **fields: Any) -> None:
        """Send ``make(layers=<the edit target>, **fields)`` to the session; ``drag``: one
        step of a slider/line drag (throttled, merged into one undo step)."""
        c = self.controller
        if c.target == "selection" and not c.selection:
            self.statusBar().showMessage("Select layers in the table first.", 5000)
            return
        edit = make(layers=c.targets(), **fields)
        if drag:
            key = edit.merge_key() or edit.kind
            if key not in self._drags:
                self._drags[key] = qthrottled(
                    self._send_edit, timeout=EDIT_THROTTLE_MS, parent=self
                )
            self._drags[key](edit)
        else:
            self._flush_drags()
            c.edit(edit)

    def _send_edit(self, edit: Edit) -> None:
        self.controller.edit(edit)

    def _flush_drags(self) -> None:
        for throttled in self._drags.values():
            throttled.flush()

    def _end_drag(self) -> None:
        self._flush_drags()
        self.controller.end_merge()

    def _undo(self) -> None:
        self._flush_drags()
        self.controller.undo()

    def _redo(self) -> None:
        self._flush_drags()
        self.controller.redo()

    def _on_prune_methodChosen(self, method: str) -> None:
        self._edit(SetPrune, method=method)

    def _on_prune_modeChosen(self, mode: str) -> None:
        # Switch without a jump: the new mode starts from what the old one produced.
        c = self.controller
        target = c.targets()[0] if c.targets() else self._shown_layer()
        lp = _layer_preview(c.preview, target) if (c.preview is not None and target) else None
        if lp is not None and mode == "threshold" and lp.threshold is not None:
            self._edit(SetPrune, mode=mode, threshold=float(lp.threshold))
        elif lp is not None and mode == "sparsity":
            self._edit(SetPrune, mode=mode, sparsity=min(float(lp.sparsity), 0.999))
        else:
            self._edit(SetPrune, mode=mode)

    def _on_prune_sparsityMoved(self, sparsity: float) -> None:
        self._edit(SetPruneTarget, drag=True, mode="sparsity", value=sparsity)

    def _set_threshold(self, t: float) -> None:
        self._edit(SetPruneTarget, drag=True, mode="threshold", value=t)

    def _on_prune_thresholdMoved(self, t: float) -> None:
        self._set_threshold(t)

    def _on_histograms_thresholdDragged(self, t: float) -> None:
        self.prune_panel.set_threshold_value(t)
        self._set_threshold(t)

    def _on_prune_nmChosen(self, n: int, m: int) -> None:
        self._edit(SetPrune, n=n, m=m)

    def _on_prune_globalToggled(self, on: bool) -> None:
        self._edit(SetPrune, scope="global" if on else "layer")

    def _on_prune_skipToggled(self, skip: bool) -> None:
        self._edit(SetSkip, skip=skip)

    def _on_quant_bitsMoved(self, bits) -> None:
        self._edit(SetQuant, drag=True, bits=bits)

    def _on_quant_symmetricToggled(self, on: bool) -> None:
        self._edit(SetQuant, symmetric=on)

    def _on_quant_perChannelToggled(self, on: bool) -> None:
        self._edit(SetQuant, per_channel=on)

    def _on_quant_biasBitsChosen(self, bits) -> None:
        self._edit(SetQuant, bias_bits=bits)

    def _on_quant_groupSizeChosen(self, size) -> None:
        self._edit(SetQuant, group_size=size)

    def _on_quant_methodChosen(self, method: str) -> None:
        self._edit(SetQuant, method=method)

    def _on_quant_biasCorrectionToggled(self, on: bool) -> None:
        self._edit(SetQuant, bias_correction=on)

    # ------------------------------------------------------------------ actions
    def _last_dir(self, key: str) -> str:
        return str(self.settings.value(f"dirs/{key}", str(Path.home())))

    def _remember_dir(self, key: str, path: str) -> None:
        self.settings.setValue(f"dirs/{key}", str(Path(path).parent))

    def _on_actOpen_triggered(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Open model", self._last_dir("model"), MODEL_FILTER
        )
        if path:
            self._remember_dir("model", path)
            self.open_model(path)

    def _on_actOpenData_triggered(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Open data", self._last_dir("data"), DATA_FILTER
        )
        if path:
            self._remember_dir("data", path)
            self.controller.open_data(path)

    def _on_actLoadRecipe_triggered(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Load recipe", self._last_dir("recipe"), RECIPE_FILTER
        )
        if path:
            self._remember_dir("recipe", path)
            self.controller.load_recipe(path)
            self.settings.setValue("session/recipe", path)

    def _on_actSaveRecipe_triggered(self) -> None:
        start = str(Path(self._last_dir("recipe")) / "recipe.json")
        path, _ = QFileDialog.getSaveFileName(self, "Save recipe", start, RECIPE_FILTER)
        if path:
            self._remember_dir("recipe", path)
            if self.controller.save_recipe(path):
                self.settings.setValue("session/recipe", path)

    def _on_actExport_triggered(self) -> None:
        from core.export.formats import EXPORT_FORMATS

        c = self.controller
        if c.result is None:
            self.show_error("Export", "Compress the model first (Ctrl+R).")
            return
        checked = self.settings.value("export/formats", ["packed"])
        if isinstance(checked, str):
            checked = [checked]
        default_dir = str(Path(self._last_dir("export")) / "compressed")
        # The hf folder export only applies to models opened from a Hugging Face folder.
        is_hf = isinstance(c.result.original.metadata.get("hf"), dict)
        dialog = ExportDialog(
            [f for f in EXPORT_FORMATS if f != "hf" or is_hf],
            directory=str(self.settings.value("export/folder", default_dir)),
            checked=checked,
            can_run=c.result.original.can_run,
            price=float(self.settings.value("export/price", 0.0) or 0.0),
            concurrency=int(self.settings.value("export/concurrency", 1) or 1),
            parent=self,
        )
        if dialog.exec() != ExportDialog.DialogCode.Accepted:
            return
        self.settings.setValue("export/formats", dialog.formats())
        self.settings.setValue("export/folder", dialog.directory())
        self.settings.setValue("export/price", dialog.price.value())
        self.settings.setValue("export/concurrency", dialog.instance_concurrency())
        c.export(
            dialog.formats(),
            dialog.directory(),
            force=dialog.force,
            report=dialog.report.isChecked(),
            price=dialog.instance_price(),
            concurrency=dialog.instance_concurrency(),
        )

    # ------------------------------------------------------------------ deployment target
    def _on_controller_devicesLoaded(self, names: tuple) -> None:
        devices = self.controller.devices
        self.device_picker.set_devices(names, [devices[n].description for n in names])

    def _on_controller_deviceChanged(self, device) -> None:
        self.device_picker.set_current(device.name if device is not None else None)
        self.settings.setValue("device/name", device.name if device is not None else "")
        self._refresh_device_fit()

    def _on_devicePicker_deviceChosen(self, name) -> None:
        self.controller.set_device(name)

    def _refresh_device_fit(self, *_args) -> None:
        self.summary.set_device_fit(self.controller.device_fit())

    def _on_actLoadDevices_triggered(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Load device profiles", self._last_dir("devices"), "Device catalogue (*.json)"
        )
        if path:
            self._remember_dir("devices", path)
            if self.controller.load_devices(path):
                self.settings.setValue("device/catalogue", path)

    def _on_actRecheck_triggered(self) -> None:
        self.controller.recheck_exports()

    def _on_actEnsemble_triggered(self) -> None:
        self._on_runsView_ensembleRequested(ensemble_members(self.runs_view.selected_runs()))

    def _on_runsView_ensembleRequested(self, runs: list) -> None:
        if len(runs) < 2:
            self.show_error(
                "Ensemble",
                "Select two or more runs with different plans in the Runs tab, then build "
                "an ensemble of them.",
            )
            return
        self.runs_dock.raise_()
        self.controller.build_ensemble([r.id for r in runs])

    def _on_actAnalyze_triggered(self) -> None:
        self.controller.analyze()

    def _on_actCompress_triggered(self) -> None:
        self.controller.compress()

    def _on_actFinetune_triggered(self) -> None:
        self.controller.finetune()

    def _on_actEvaluate_triggered(self) -> None:
        self.controller.evaluate()

    def _on_actResetPlan_triggered(self) -> None:
        plan = starting_plan().with_recovery(self.controller.plan.recovery)
        self.controller.set_plan(plan)

    def _on_actMethods_triggered(self) -> None:
        from app.widgets.prune_panel import METHOD_LABELS
        from core.recipe.plan import METHOD_HELP

        text = "".join(
            f"<p><b>{METHOD_LABELS.get(m, m)}</b> — {h}</p>" for m, h in METHOD_HELP.items()
        )
        QMessageBox.information(self, "Pruning methods", text)

    def _on_actAbout_triggered(self) -> None:
        QMessageBox.about(
            self,
            "Compression Workbench",
            "Prune and quantize PyTorch models by eye, check accuracy, export smaller files.\n"
            "The same engine runs headless: `workbench compress MODEL --recipe R.json`.",
        )

    # ------------------------------------------------------------------ Qt events
    def dragEnterEvent(self, event) -> None:
        if event.mimeData().hasUrls() and any(u.isLocalFile() for u in event.mimeData().urls()):
            event.acceptProposedAction()

    def dropEvent(self, event) -> None:
        for url in event.mimeData().urls():
            if url.isLocalFile():
                self.open_path(url.toLocalFile())
                event.acceptProposedAction()
                return

    def open_path(self, path: str) -> None:
        """Open a dropped file by kind: data (.npz), recipe (.json) or a model."""
        suffix = Path(path).suffix.lower()
        if suffix in DATA_SUFFIXES:
            self.controller.open_data(path)
        elif suffix in RECIPE_SUFFIXES:
            self.controller.load_recipe(path)
        else:
            self.open_model(path)

    def changeEvent(self, event) -> None:
        if event.type() in (QEvent.Type.PaletteChange, QEvent.Type.ApplicationPaletteChange):
            self.histograms.apply_theme()
            self.size_view.apply_theme()
        super().changeEvent(event)

    def closeEvent(self, event) -> None:
        self.save_session()
        # Vanish at once: waiting for the workers below must not look like a frozen window.
        self.hide()
        for box in list(self._error_boxes):
            box.close()
        # Cancel and stop taking results (no wait yet), then let the window system see the
        # hide before waiting: sync() runs the event loop once, and a result delivered then
        # must not start a follow-up job or open a dialog.
        self.controller.shutdown(0)
        QGuiApplication.sync()
        # Bounded: a job stuck in a call that ignores cancellation must not hold the close up;
        # the launcher ends the process if a worker is still running once the loop is over.
        self.controller.shutdown(CLOSE_WAIT_MS)
        super().closeEvent(event)

    # ------------------------------------------------------------------ screenshot mode
    def take_screenshot_when_ready(
        self,
        path: str,
        *,
        plan=None,
        select: str | None = None,
        compress: bool = True,
        timeout_s: float = 300.0,
    ) -> None:
        """Wait for load + analyze, apply ``plan`` (or a sample), optionally compress and
        evaluate, select a layer, then save the window as a PNG and emit `screenshotSaved`."""
        c = self.controller
        state = {"phase": "analyze"}

        def fail(title: str, message: str, _details: str = "") -> None:
            # Once the shot is taken (or has failed), the time-out and later errors are not
            # this screenshot's: the window may live on (tests, an embedding application).
            if state["phase"] in ("done", "failed"):
                return
            state["phase"] = "failed"
            self.screenshotSaved.emit("")

        def grab() -> None:
            QTimer.singleShot(300, lambda: self._save_grab(path))

        def on_finished(kind: str, outcome: str) -> None:
            if state["phase"] == "failed":
                return
            if outcome == "cancelled":
                return  # superseded (e.g. analyze restarted with data); the newer job reports
            if outcome != "done":
                fail(kind, outcome)
                return
            if kind == "analyze" and state["phase"] == "analyze":
                wanted = None if plan is None else c.session.checked_plan(plan)
                if wanted is not None and wanted != c.plan:
                    c.set_plan(wanted)
                elif not any(cfg.prune.active or cfg.quant.active for cfg in _configs(c.plan)):
                    c.set_plan(SAMPLE_PLAN)
                name = select or _largest_layer(c)
                if name:
                    c.set_selection((name,))
                if compress:
                    state["phase"] = "compress"
                    c.compress()
                else:
                    state["phase"] = "done"
                    grab()
            elif state["phase"] == "compress" and kind in ("compress", "evaluate"):
                if not c.busy():
                    state["phase"] = "done"
                    grab()

        c.jobFinished.connect(on_finished)
        c.errorRaised.connect(fail)
        QTimer.singleShot(int(timeout_s * 1000), lambda: fail("timeout", "timed out"))

    def _save_grab(self, path: str) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        ok = self.grab().save(str(target), "PNG")
        self.screenshotSaved.emit(str(target) if ok else "")


def _configs(plan):
    yield plan.default
    for _, cfg in plan.overrides:
        yield cfg


def _largest_layer(c: Controller) -> str | None:
    layers = [layer for layer in c.layers if layer.prunable]
    return max(layers, key=lambda layer: layer.params).name if layers else None


def _following_layer(c: Controller, name: str | None) -> str | None:
    """``name`` when it follows the model default, else the first prunable layer that does
    (where the default's implied threshold/sparsity can be read off the preview)."""
    overrides = c.plan.layer_overrides
    if name is not None and name not in overrides:
        return name
    for layer in c.layers:
        if layer.prunable and layer.name not in overrides:
            return layer.name
    return name


def _layer_preview(preview, name: str | None):
    if preview is None or name is None:
        return None
    for lp in preview.layers:
        if lp.name == name:
            return lp
    return None


def _plan_note(plan) -> str:
    d = plan.default
    if d.prune.method == "none" and d.quant.bits is None and not plan.overrides:
        return "No compression planned yet: move the sliders."
    parts = []
    if d.prune.active:
        where = "global pool" if d.prune.scope == "global" else "per layer"
        parts.append(f"default: {d.prune.method} ({where})")
    if d.quant.bits is not None:
        parts.append(f"{d.quant.bits}-bit {'sym' if d.quant.symmetric else 'asym'}")
    if d.quant.bias_bits is not None:
        parts.append(f"{d.quant.bias_bits}-bit biases")
    if plan.overrides:
        parts.append(f"{len(plan.overrides)} layer override(s)")
    return "; ".join(parts)
