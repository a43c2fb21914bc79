"""The window's Qt adapter over `core.session.Session`: signals, workers, dialogs.

The session (Qt-free) owns the state and the rules: the model, data, statistics, the plan with
undo/redo, the edit target, output-layer protection, the run history and the pipeline steps.
This controller only runs the session's jobs on the `JobRunner` (worker threads), turns the
session's events into Qt signals, keeps the live preview (`core.analysis.estimate.preview`, O(layers log
n), on the UI thread) and reports failures as dialogs. Widgets never call the engine or touch a
torch module; they render the snapshot objects these signals carry.

Jobs are versioned: each kind remembers the id of its newest job, starting a job cancels the
jobs it makes stale (`core.session.SUPERSEDES`), and a result whose id is no longer current is
dropped unseen.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Sequence
from typing import Any

from PySide6.QtCore import QObject, QTimer, Signal

from app.failures import log_unexpected, unexpected_message
from app.workers import JobRunner
from core.base.errors import Cancelled, UntrustedPickleError, WorkbenchError
from core.base.memory import settle_heap
from core.base.progress import CancelToken, ProgressFn
from core.recipe.edits import Edit, ReplacePlan
from core.recipe.plan import CompressionPlan, LayerConfig, RecoveryConfig, starting_plan
from core.session import EDIT_TARGETS, JOB_KINDS, SUPERSEDES, Evaluation, Job, Session

JOB_TITLES = {
    "load": "Open model",
    "data": "Open data",
    "analyze": "Analyze",
    "compress": "Compress",
    "finetune": "Fine-tune",
    "evaluate": "Evaluate",
    "export": "Export",
    "ensemble": "Ensemble",
    "scan": "Scan sensitivity",
    "pins": "Re-plan around pins",
    "frontier": "Predict frontier",
}

__all__ = ["JOB_KINDS", "JOB_TITLES", "SUPERSEDES", "Controller", "Evaluation"]


class Controller(QObject):
    """Session state plus the only door to the engine. See the module docstring."""

    modelLoaded = Signal(object)  # LoadedModel
    layersChanged = Signal(object)  # tuple[LayerInfo, ...]
    dataLoaded = Signal(str)  # human description of the data set, "" when none
    statsReady = Signal(object)  # ModelStats | None
    planChanged = Signal(object)  # CompressionPlan
    previewUpdated = Signal(object)  # PlanPreview | None
    selectionChanged = Signal(tuple)  # layer names
    targetChanged = Signal(str)  # "model" | "selection": where edits go
    resultReady = Signal(object)  # CompressionResult | None
    evaluated = Signal(object)  # Evaluation | None
    exported = Signal(object)  # list of ExportRecord
    historyChanged = Signal(bool, bool)  # can undo, can redo
    dragFinished = Signal()
    jobStarted = Signal(str, str)  # kind, description
    jobProgressed = Signal(str, float, str)  # kind, fraction, message
    jobFinished = Signal(str, str)  # kind, outcome: "done" | "cancelled" | "failed"
    errorRaised = Signal(str, str, str)  # title, message, details
    statusMessaged = Signal(str)
    trustRequested = Signal(str)  # a model source that needs the user's trust to unpickle
    runRecorded = Signal(object)  # core.session.RunRecord
    scanReady = Signal(object)  # core.planning.sensitivity.SensitivityScan | None
    pinsChanged = Signal(object)  # frozenset of layer names the solver keeps as they are
    solved = Signal(object)  # core.planning.solver.Solution of the last target step
    solverReady = Signal(object)  # (dense bytes, smallest bytes): the tables for new pins are in
    frontierReady = Signal(object)  # predicted frontier points (`frontier_points`), None: failed
    devicesLoaded = Signal(tuple)  # names of the device catalogue's profiles
    deviceChanged = Signal(object)  # core.export.devices.DeviceProfile | None
    exportTargets = Signal(object)  # {"device": ..., "cost": ...} blocks of the last export

    def __init__(self, parent: QObject | None = None, *, runner: JobRunner | None = None):
        super().__init__(parent)
        self.runner = runner or JobRunner(self)
        self.runner.jobProgressed.connect(self._on_runner_jobProgressed)
        self.runner.jobSucceeded.connect(self._on_runner_jobSucceeded)
        self.runner.jobFailed.connect(self._on_runner_jobFailed)
        self._current: dict[str, int] = {}
        self._callbacks: dict[int, Callable[[Any], None]] = {}
        self._subjects: dict[int, str] = {}
        #: Runner job id -> the session job it runs (so a failure can be forgotten there too).
        self._session_jobs: dict[int, Job] = {}
        #: Set by `shutdown`: results that arrive afterwards are dropped.
        self._closing = False
        #: The last target step asked for while the solver's tables for new pins were being
        #: rebuilt: ``(target, merge, exact, verify)``, solved when they are in (`set_pins`).
        self._pending_target: tuple[Any, bool, bool, bool] | None = None

        self.session = Session()
        self.session.subscribe(self._on_session_event)
        self.preview = None
        self.preview_error = ""
        #: Archive bytes with nothing compressed ("Before" in the live estimate), per stats.
        self.baseline_bytes: int | None = None
        self._baseline_of: object = None
        self._previews: Any = None  # core.analysis.estimate.PreviewCache of `stats`
        #: The level settings still to warm the preview cache with, in idle time
        #: (`_warm_previews`), and the cache they are for.
        self._warm: list[LayerConfig] = []
        self._warm_for: Any = None
        self._warm_timer = QTimer(self)
        self._warm_timer.setSingleShot(True)
        self._warm_timer.timeout.connect(self._warm_step)
        #: Whether to settle the heap (`core.base.memory.settle_heap`) once each analysis is
        #: in: set by the application (`app.__main__`), which owns the process; off where the
        #: window is one guest of a larger process (tests).
        self.settle_heap = False

    # ------------------------------------------------------------------ jobs
    def busy(self, kind: str | None = None) -> bool:
        """Whether a current (not superseded, not yet reported) job of ``kind`` runs."""
        return bool(self._current) if kind is None else kind in self._current

    def _start(
        self,
        kind: str,
        description: str,
        fn: Callable[[ProgressFn, CancelToken], Any],
        on_done: Callable[[Any], None],
        *,
        subject: str | None = None,
        token: CancelToken | None = None,
        session_job: Job | None = None,
    ) -> int:
        for handle in self.runner.running():
            if handle.kind in SUPERSEDES[kind]:
                if handle.kind == "pins" and kind != "pins":
                    self._pending_target = None  # new model, data or scan: the step is stale
                handle.cancel()
                if self._current.get(handle.kind) == handle.job_id:
                    del self._current[handle.kind]
                    self.jobFinished.emit(handle.kind, "cancelled")
        handle = self.runner.submit(kind, description, fn, token=token)
        if session_job is not None:
            self._session_jobs[handle.job_id] = session_job
        self._current[kind] = handle.job_id
        self._callbacks[handle.job_id] = on_done
        # What an unexpected failure's dialog names: the job's file, else the open model.
        model = self.model
        self._subjects[handle.job_id] = subject or (model.source if model is not None else "")
        self.jobStarted.emit(kind, description)
        return handle.job_id

    def cancel_jobs(self) -> None:
        """Cancel every running job (Esc / the Cancel button); each reports "cancelled"."""
        for handle in self.runner.running():
            handle.cancel()

    def wait_for_jobs(self, msecs: int = -1) -> bool:
        return self.runner.wait(msecs)

    def _accept(self, job_id: int) -> str | None:
        handle = self.runner.handle(job_id)
        if handle is None or self._current.get(handle.kind) != job_id or self._closing:
            self._callbacks.pop(job_id, None)
            return None
        del self._current[handle.kind]
        return handle.kind

    def _on_runner_jobProgressed(self, job_id: int, fraction: float, message: str) -> None:
        handle = self.runner.handle(job_id)
        if handle is not None and self._current.get(handle.kind) == job_id:
            self.jobProgressed.emit(handle.kind, fraction, message)

    def _on_runner_jobSucceeded(self, job_id: int, result: Any) -> None:
        job = self._session_jobs.pop(job_id, None)
        kind = self._accept(job_id)
        if kind is None and job is not None:
            self.session.fail(job)  # superseded or closing: the session drops it too
        callback = self._callbacks.pop(job_id, None)
        subject = self._subjects.pop(job_id, "")
        if kind is None or callback is None:
            return
        try:
            callback(result)
        except WorkbenchError as exc:
            self.errorRaised.emit(JOB_TITLES[kind], str(exc), "")
            self.jobFinished.emit(kind, "failed")
            return
        except Exception as exc:  # noqa: BLE001 - a bug in a callback: report, keep the app alive
            self.jobFinished.emit(kind, "failed")
            self._report_unexpected(kind, subject, exc, traceback.format_exc())
            return
        self.jobFinished.emit(kind, "done")

    def _report_unexpected(self, kind: str, subject: str, exc: BaseException, tb: str) -> None:
        """Dialog (file, what failed, what to do) plus the traceback on stderr and in details."""
        title = JOB_TITLES.get(kind, kind.capitalize())
        log_unexpected(f"{title} failed", tb)
        self.errorRaised.emit(f"{title} failed", unexpected_message(kind, subject, exc, title), tb)

    def _on_runner_jobFailed(self, job_id: int, exc: BaseException, tb: str) -> None:
        job = self._session_jobs.pop(job_id, None)
        if job is not None:
            self.session.fail(job)
        kind = self._accept(job_id)
        self._callbacks.pop(job_id, None)
        subject = self._subjects.pop(job_id, "")
        if kind is None:
            return
        if kind == "pins":
            self._pending_target = None  # no tables for the new pins: drop the waiting step
        if isinstance(exc, Cancelled):
            self.statusMessaged.emit(f"{JOB_TITLES[kind]} cancelled; nothing was changed.")
            self.jobFinished.emit(kind, "cancelled")
            return
        self.jobFinished.emit(kind, "failed")
        if isinstance(exc, UntrustedPickleError) and exc.path:
            self.trustRequested.emit(exc.path)
        elif isinstance(exc, WorkbenchError):
            self.errorRaised.emit(f"{JOB_TITLES[kind]} failed", str(exc), "")
        else:
            self._report_unexpected(kind, subject, exc, tb)

    # ------------------------------------------------------------------ session state
    # Read-only views of the session (the one owner of this state).
    model = property(lambda self: self.session.model)
    layers = property(lambda self: self.session.layers)
    output_layer = property(lambda self: self.session.output_layer)
    train = property(lambda self: self.session.train)
    test = property(lambda self: self.session.test)
    data_name = property(lambda self: self.session.data_name)
    stats = property(lambda self: self.session.stats)
    plan = property(lambda self: self.session.plan)
    selection = property(lambda self: self.session.selection)
    target = property(lambda self: self.session.target)
    result = property(lambda self: self.session.result)
    result_plan = property(lambda self: self.session.result_plan)
    after_hists = property(lambda self: self.session.after_hists)
    evaluation = property(lambda self: self.session.evaluation)
    exports = property(lambda self: self.session.exports)
    runs = property(lambda self: self.session.runs)
    sensitivity = property(lambda self: self.session.sensitivity)
    pins = property(lambda self: self.session.pins)
    device = property(lambda self: self.session.device)
    devices = property(lambda self: self.session.devices)
    export_targets = property(lambda self: self.session.export_targets)
    result_stale = property(lambda self: self.session.result_stale)
    can_undo = property(lambda self: self.session.history.can_undo)
    can_redo = property(lambda self: self.session.history.can_redo)
    dragging = property(lambda self: self.session.dragging)

    def data_description(self) -> str:
        return self.session.data_description()

    def _on_session_event(self, event: str, payload: Any) -> None:
        """Session events -> Qt signals (the session calls this on the UI thread)."""
        if event == "model_loaded":
            self.preview = None
            self.modelLoaded.emit(payload)
            self.layersChanged.emit(self.layers)
            self.statsReady.emit(None)
            self.resultReady.emit(None)
            self.evaluated.emit(None)
            self.exported.emit([])
        elif event == "plan_changed":
            self.planChanged.emit(payload)
            self._update_preview()
        elif event == "stats_ready":
            self.statsReady.emit(payload)
            self._update_preview()
        else:
            signal = {
                "data_loaded": self.dataLoaded,
                "selection_changed": self.selectionChanged,
                "target_changed": self.targetChanged,
                "result_ready": self.resultReady,
                "evaluated": self.evaluated,
                "exported": self.exported,
                "notice": self.statusMessaged,
                "run_recorded": self.runRecorded,
                "scan_ready": self.scanReady,
                "pins_changed": self.pinsChanged,
                "solved": self.solved,
                "solver_ready": self.solverReady,
                "frontier_ready": self.frontierReady,
                "devices_loaded": self.devicesLoaded,
                "device_changed": self.deviceChanged,
                "export_targets": self.exportTargets,
            }.get(event)
            if event == "history_changed":
                self.historyChanged.emit(*payload)
            elif event == "drag_finished":
                self.dragFinished.emit()
            elif signal is not None:
                signal.emit(payload)
            if event in ("scan_ready", "solver_ready"):
                self._warm_previews()

    def _run(
        self,
        make: Callable[[], Job],
        title: str,
        *,
        subject: str | None = None,
        after: Callable[[], None] | None = None,
    ) -> int | None:
        """Start the session job ``make()`` on the runner, then ``after()`` once its result is
        in; a step the session refuses (nothing to compress yet...) becomes a dialog."""
        try:
            job = make()
        except WorkbenchError as exc:
            self.errorRaised.emit(title, str(exc), "")
            return None

        def done(payload: Any) -> None:
            if self.session.finish(job, payload) and after is not None:
                after()

        return self._start(
            job.kind,
            job.description,
            job.fn,
            done,
            subject=subject,
            token=job.cancel,
            session_job=job,
        )

    # ------------------------------------------------------------------ model & data
    def open_model(
        self, source: str, *, trust: bool = False, plan: CompressionPlan | None = None
    ) -> int:
        """Load ``source`` (a path or ``demo:NAME``) in a worker, then analyze it.

        ``plan`` (e.g. the recipe given on the command line or the last session's plan) becomes
        the plan once the model is in (settings for layers it lacks are dropped with a notice);
        otherwise the plan starts empty.
        """
        source = str(source)
        job_id = self._run(
            lambda: self.session.open_model(source, trust=trust, plan=plan),
            "Open model",
            subject=source,
            after=self.analyze,
        )
        assert job_id is not None  # opening never needs anything first
        return job_id

    def open_data(self, path: str) -> int | None:
        """Load a ``.npz``/``.pt`` data file, label it with the model if it has no labels,
        split off a held-out part, then re-analyze with gradients."""
        if self.model is None:
            self.errorRaised.emit("Open data", "Open a model first, then its data.", "")
            return None
        return self._run(
            lambda: self.session.open_data(path), "Open data", subject=str(path), after=self.analyze
        )

    def analyze(self) -> int | None:
        """Compute `ModelStats` (with gradient statistics when data and a forward pass exist)."""
        if self.model is None:
            return None
        return self._run(self.session.analyze, "Analyze", after=self._settle_heap)

    def _settle_heap(self) -> None:
        """Right after an analysis (the user is waiting for it anyway), collect and freeze
        the heap so the collector's full passes stay out of the slider drags that follow.

        On the UI thread, before the event loop paints the new results (0.1-0.25 s with a
        25M-weight model open): a pass in the worker would run the finalizers of collected
        Qt objects there, and Qt objects must be destroyed on their own thread."""
        if self.settle_heap:
            settle_heap()

    # ------------------------------------------------------------------ plan editing
    def set_plan(self, plan: CompressionPlan, *, merge_key: str | None = None) -> None:
        """Make ``plan`` current (one undo step; the output layer stays protected)."""
        del merge_key  # a whole plan is never part of a drag
        self.session.edit(ReplacePlan(plan=plan), merge=False)

    def edit(self, edit: Edit, *, merge: bool = True) -> bool:
        """Apply a plan edit (`core.recipe.edits`); refusals go to the status bar."""
        try:
            return self.session.edit(edit, merge=merge)
        except WorkbenchError as exc:
            self.statusMessaged.emit(str(exc))
            return False

    def end_merge(self) -> None:
        """Close the current drag's undo step; listeners refresh what they skip mid-drag."""
        self.session.end_merge()

    def undo(self) -> None:
        self.session.undo()

    def redo(self) -> None:
        self.session.redo()

    def _update_preview(self) -> None:
        from core.analysis.estimate import PreviewCache

        if self.stats is None:
            self.preview = None
            self.previewUpdated.emit(None)
            return
        try:
            if self._baseline_of is not self.stats:
                # Once per analysis: the same archive with an empty plan, so "Before" counts
                # what "After" counts (buffers, header), not just the fp32 parameters.
                # A slider step re-estimates only what it changed (equal to `preview`).
                self._previews = PreviewCache(self.stats)
                self.baseline_bytes = self._previews.preview(starting_plan()).packed_bytes
                self._baseline_of = self.stats
                if self.sensitivity is not None:
                    self._warm_previews()
            self.preview = self._previews.preview(self.plan)
            self.preview_error = ""
        except WorkbenchError as exc:
            # Mid-drag a dialog per mouse move would be unusable: keep the last numbers and
            # say what is wrong in the status bar.
            self.preview_error = str(exc)
            self.statusMessaged.emit(f"Preview unavailable: {exc}")
        self.previewUpdated.emit(self.preview)

    # ------------------------------------------------------------------ idle warm-up
    #: While a drag is in progress the warm-up waits this long between checks (its steps
    #: come first).
    WARM_RETRY_MS = 100
    #: At most this many layer x setting entries are warmed (~3 KB each: 200 layers x 30
    #: levels is ~17 MB); a model with more layers warms its first levels only.
    WARM_MAX_ENTRIES = 20_000

    @property
    def warming(self) -> bool:
        """Whether the idle-time warm-up of the preview cache has settings left to do."""
        return bool(self._warm) and self._warm_for is self._previews

    def _warm_previews(self) -> None:
        """Warm the live preview's cache, in idle time, with every setting a target plan
        can give the layers (`Session.target_configs`: one per scanned level), one setting
        per event-loop pass: the first step of a target drag sets every layer anew, and
        without this it costs a full preview (`PreviewCache.warm`; the numbers are the
        same either way). Waits while a drag is in progress."""
        configs = self.session.target_configs() if self._previews is not None else []
        self._warm = configs[: self.WARM_MAX_ENTRIES // max(1, len(self.layers))]
        self._warm_for = self._previews
        if self._warm:
            self._warm_timer.start(0)

    def _warm_step(self) -> None:
        if not self.warming:
            self._warm = []
            return
        if self.dragging:
            self._warm_timer.start(self.WARM_RETRY_MS)
            return
        cfg = self._warm.pop(0)
        try:
            self._previews.warm(CompressionPlan(default=cfg))
        except WorkbenchError:
            self._warm = []  # (the live preview says why, if the plan needs it)
            return
        if self._warm:
            self._warm_timer.start(0)

    def set_selection(self, names: Sequence[str]) -> None:
        self.session.set_selection(names)

    def set_target(self, target: str) -> None:
        if target not in EDIT_TARGETS:
            raise ValueError(target)
        self.session.set_target(target)

    def targets(self) -> tuple[str, ...]:
        """Layer names an edit applies to (empty tuple = the model-wide default)."""
        return self.session.targets()

    def shown_config(self) -> LayerConfig:
        """The config the control panels display: the first target's, or the default."""
        return self.session.shown_config()

    def reset_selection_to_default(self) -> None:
        """Drop the selected layers' overrides so they follow the model-wide default again."""
        self.session.reset_selection()

    def set_recovery(self, recovery: RecoveryConfig) -> None:
        self.session.set_recovery(recovery)

    def load_recipe(self, path: str) -> None:
        """Read a recipe file (errors surface as a dialog) and make it the plan."""
        try:
            self.session.load_recipe(path)
        except WorkbenchError as exc:
            self.errorRaised.emit("Load recipe", str(exc), "")
        except Exception as exc:  # noqa: BLE001 - an input the loader did not foresee
            tb = log_unexpected("Load recipe", exc)
            self.errorRaised.emit("Load recipe", unexpected_message("recipe", path, exc), tb)

    def save_recipe(self, path: str) -> bool:
        try:
            self.session.save_recipe(path)
        except (OSError, WorkbenchError) as exc:
            self.errorRaised.emit("Save recipe", f"{path}: could not write the recipe ({exc})", "")
            return False
        self.statusMessaged.emit(f"Recipe saved to {path}")
        return True

    # ------------------------------------------------------------------ compress & after
    def compress(self) -> int | None:
        """Apply the plan in a worker with the recovery it asks for (the same
        `compress_and_finetune` call as ``workbench compress``), then evaluate."""
        return self._run(
            lambda: self.session.compress(after_histograms=True), "Compress", after=self._on_result
        )

    def _on_result(self) -> None:
        if self.test is not None and self.model is not None and self.model.can_run:
            self.evaluate()

    def finetune(self) -> int | None:
        """Fine-tune (or distill, per the plan's recovery settings) the current result."""
        return self._run(
            lambda: self.session.finetune(after_histograms=True), "Fine-tune", after=self._on_result
        )

    def evaluate(self) -> int | None:
        """Accuracy and fidelity of the original and the compressed model on held-out data."""
        return self._run(self.session.evaluate, "Evaluate")

    def export(
        self,
        formats: Sequence[str],
        out_dir: str,
        *,
        force: bool = False,
        report: bool = True,
        price: float | None = None,
        concurrency: int = 1,
    ) -> int | None:
        """Write the compressed model in ``formats`` plus recipe and report into ``out_dir``
        (the folder's other files are kept; the new ones appear together or not at all),
        run the deployed check of every written file, and, with a device chosen or an
        instance ``price`` (USD/h), compute the report's device and cost blocks."""
        return self._run(
            lambda: self.session.export(
                formats,
                out_dir,
                force=force,
                merge_existing=True,
                report=report,
                price=price,
                concurrency=concurrency,
            ),
            "Export",
            subject=str(out_dir),
        )

    # ------------------------------------------------------------------ sensitivity
    def scan(self, **kw: Any) -> int | None:
        """Scan per-layer sensitivity in a worker (`core.session.Session.scan`; a repeated
        scan of the same model and data comes from the disk cache)."""
        return self._run(lambda: self.session.scan(**kw), "Scan sensitivity")

    def plan_to_target(
        self, target: Any, *, merge: bool = False, exact: bool = False, verify: bool = True
    ) -> Any:
        """Re-solve the plan for ``target`` from the cached scan (one undoable edit; drag
        steps ``merge`` and skip the size check, ``verify=False``); an unreachable target
        goes to the status bar. Returns the `core.planning.solver.Solution` or None.

        While the solver's tables for new pins are rebuilt (`set_pins`) the step waits: it
        is kept (a later step replaces it) and solved when the tables are in, so no step is
        planned with a pinned layer still free; None is returned meanwhile and the result
        arrives through `solved`."""
        if self.rebuilding_pins:
            self._pending_target = (target, merge, exact, verify)
            return None
        try:
            return self.session.plan_to_target(target, merge=merge, exact=exact, verify=verify)
        except WorkbenchError as exc:
            self.statusMessaged.emit(str(exc))
            return None

    @property
    def rebuilding_pins(self) -> bool:
        """Whether the solver's tables for a pin change are being rebuilt (a worker, or a
        job the session made and the controller is about to start)."""
        return self.busy("pins") or self.session.busy("pins")

    def set_pins(self, names: Sequence[str]) -> int | None:
        """Layers whose settings the solver keeps (it plans the others around them).

        The marks follow at once (`pinsChanged`); the solver's tables for the new pins are
        rebuilt in a worker (`core.session.Session.set_pins`), superseding an older rebuild,
        and `solverReady` says when they are in; a target step asked for meanwhile is solved
        then (see `plan_to_target`). Returns the job id, or None when nothing is rebuilt."""
        try:
            job = self.session.set_pins(names)
        except WorkbenchError as exc:
            self.statusMessaged.emit(str(exc))
            return None
        if job is None:
            return None
        return self._run(lambda: job, JOB_TITLES["pins"], after=self._solve_pending)

    def _solve_pending(self) -> None:
        """The tables for the new pins are in: solve the step that waited for them. A drag
        step (unverified) still belongs to its drag; a release that came meanwhile (verified;
        the drag has ended) becomes its own undo step."""
        pending, self._pending_target = self._pending_target, None
        if pending is None or self.sensitivity is None:
            return
        target, merge, exact, verify = pending
        merge = merge and (not verify or self.session.dragging)
        self.plan_to_target(target, merge=merge, exact=exact, verify=verify)

    def frontier_points(self) -> list[dict[str, Any]]:
        """The predicted frontier in the run history's units
        (`core.session.Session.frontier_points`; [] without a scan)."""
        try:
            return self.session.frontier_points()
        except WorkbenchError as exc:
            self.statusMessaged.emit(f"Predicted frontier unavailable: {exc}")
            return []

    def predict_frontier(self) -> list[dict[str, Any]] | None:
        """The predicted frontier when it is known (after a scan it is); otherwise its job
        starts in a worker (`core.session.Session.frontier_job`), `frontierReady` brings
        the points and None is returned."""
        if self.busy("frontier"):
            return None
        try:
            job = self.session.frontier_job()
        except WorkbenchError as exc:
            self.statusMessaged.emit(f"Predicted frontier unavailable: {exc}")
            return []
        if job is None:
            return self.frontier_points()
        self._run(lambda: job, JOB_TITLES["frontier"])
        return None

    def target_range(self) -> tuple[int, int] | None:
        """(dense bytes, smallest reachable archive bytes) for the target control."""
        try:
            return self.session.target_range()
        except WorkbenchError as exc:
            self.statusMessaged.emit(str(exc))
            return None

    # ------------------------------------------------------------------ deployment target
    def load_devices(self, path: str | None = None) -> bool:
        """Offer the profiles of a device catalogue (default: the shipped one); a bad file
        becomes a dialog naming it."""
        try:
            self.session.load_devices(path)
        except WorkbenchError as exc:
            self.errorRaised.emit("Device profiles", str(exc), "")
            return False
        if path:
            self.statusMessaged.emit(f"Device profiles loaded from {path}")
        return True

    def set_device(self, name: str | None) -> None:
        """Judge the live estimate against the device profile ``name`` (None: no device)."""
        try:
            self.session.set_device(name or None)
        except WorkbenchError as exc:
            self.errorRaised.emit("Device profiles", str(exc), "")

    def device_fit(self) -> dict[str, Any] | None:
        """The chosen device's verdict on the current live estimate (packed bytes + peak
        activations, measured once per model), or None without a device or an estimate."""
        if self.preview is None:
            return None
        return self.session.device_fit(self.preview.packed_bytes)

    def recheck_exports(self) -> int | None:
        """Run the deployed check again on the exported files as they are on disk now."""
        return self._run(self.session.recheck_exports, "Check exported files")

    def build_ensemble(self, run_ids: Sequence[int]) -> int | None:
        """Build an ensemble of the chosen runs' plans in a worker; it joins the run history
        as a run of kind "ensemble"."""
        return self._run(lambda: self.session.ensemble(list(run_ids)), "Ensemble")

    @property
    def closing(self) -> bool:
        """Whether `shutdown` was called (the session is ending)."""
        return self._closing

    def shutdown(self, msecs: int = 10_000) -> bool:
        """Cancel everything and wait up to ``msecs`` for the workers (window closing).

        Returns whether every worker has returned. A job stuck in a call that never looks at
        its cancel token (a long torch call) can outlive the wait; the caller decides what then.
        """
        # Results still on their way describe a session that is ending: drop them, so no
        # callback starts a follow-up job (or opens a dialog) while the window closes.
        self._closing = True
        self._warm_timer.stop()
        self._warm = []
        self.cancel_jobs()
        return self.runner.wait(msecs)
