"""The window's brain: owns the session state, edits the plan, runs engine jobs in workers.

Widgets never call the engine or touch a torch module; they render the snapshot objects the
controller hands out through its signals (`LoadedModel`, `ModelStats`, `CompressionPlan`,
`PlanPreview`, `CompressionResult`, evaluation and export records) and ask for changes through
its methods. Everything the user drags goes through `preview` on the UI thread (it is
O(layers log n)); everything slower is a job on the `JobRunner`.

Jobs are versioned: each kind (load, data, analyze, compress, finetune, evaluate, export)
remembers the id of its newest job, starting a job cancels the jobs it makes stale
(`SUPERSEDES`), and a result whose id is no longer current is dropped unseen.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PySide6.QtCore import QObject, Signal

from app.failures import log_unexpected, unexpected_message
from app.workers import JobRunner
from core.errors import Cancelled, UntrustedPickleError, WorkbenchError
from core.plan import (
    STRUCTURED_METHODS,
    CompressionPlan,
    LayerConfig,
    PruneConfig,
    RecoveryConfig,
)
from core.progress import CancelToken, ProgressFn, scaled

#: Job kinds, in pipeline order.
JOB_KINDS = ("load", "data", "analyze", "compress", "finetune", "evaluate", "export")

#: Starting a job of the key's kind cancels and drops in-flight jobs of these kinds, because
#: their results would describe a model, data set or compression that is no longer current.
SUPERSEDES: dict[str, tuple[str, ...]] = {
    "load": JOB_KINDS,
    "data": ("data", "analyze", "finetune", "evaluate"),
    "analyze": ("analyze",),
    "compress": ("compress", "finetune", "evaluate", "export"),
    "finetune": ("finetune", "evaluate", "export"),
    "evaluate": ("evaluate",),
    "export": ("export",),
}

JOB_TITLES = {
    "load": "Open model",
    "data": "Open data",
    "analyze": "Analyze",
    "compress": "Compress",
    "finetune": "Fine-tune",
    "evaluate": "Evaluate",
    "export": "Export",
}

#: Where plan edits go: the selected layers (per-layer overrides) or the whole model.
SCOPES = ("selection", "model")


@dataclass(frozen=True)
class AfterHistograms:
    """Histograms of one compressed tensor on the original's bin edges (for the overlay)."""

    signed: np.ndarray
    log_abs: np.ndarray


@dataclass(frozen=True)
class Evaluation:
    """Accuracy/fidelity of the original and the compressed model on the held-out data."""

    before: Any
    after: Any
    data_name: str


class Controller(QObject):
    """Session state plus the only door to the engine. See the module docstring."""

    modelLoaded = Signal(object)  # LoadedModel
    layersChanged = Signal(object)  # tuple[LayerInfo, ...]
    dataLoaded = Signal(str)  # human description of the data set, "" when none
    statsReady = Signal(object)  # ModelStats | None
    planChanged = Signal(object)  # CompressionPlan
    previewUpdated = Signal(object)  # PlanPreview | None
    selectionChanged = Signal(tuple)  # layer names
    scopeChanged = Signal(str)
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

    def __init__(self, parent: QObject | None = None, *, runner: JobRunner | None = None):
        super().__init__(parent)
        self.runner = runner or JobRunner(self)
        self.runner.jobProgressed.connect(self._on_runner_jobProgressed)
        self.runner.jobSucceeded.connect(self._on_runner_jobSucceeded)
        self.runner.jobFailed.connect(self._on_runner_jobFailed)
        self._current: dict[str, int] = {}
        self._callbacks: dict[int, Callable[[Any], None]] = {}
        self._subjects: dict[int, str] = {}
        #: Set by `shutdown`: results that arrive afterwards are dropped.
        self._closing = False

        self.model = None
        self.layers: tuple = ()
        #: The layer producing the model's output (logits), kept out of model-wide channel
        #: pruning; found once per model in the load job.
        self.output_layer: str | None = None
        self.train = None
        self.test = None
        self.data_name = ""
        self.stats = None
        self.plan = CompressionPlan()
        self.preview = None
        self.preview_error = ""
        self.result = None
        #: The plan the user had when the current result was requested; the result's own
        #: ``plan`` can differ (recovery dropped for a model that cannot be fine-tuned).
        self.result_plan: CompressionPlan | None = None
        self.after_hists: dict[str, AfterHistograms] = {}
        self.evaluation: Evaluation | None = None
        self.exports: list = []
        self.selection: tuple[str, ...] = ()
        self.scope = "model"
        self.pending_plan: CompressionPlan | None = None

        self._history: list[CompressionPlan] = [self.plan]
        self._index = 0
        self._merge_key: str | None = None

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
    ) -> int:
        for handle in self.runner.running():
            if handle.kind in SUPERSEDES[kind]:
                handle.cancel()
                if self._current.get(handle.kind) == handle.job_id:
                    del self._current[handle.kind]
                    self.jobFinished.emit(handle.kind, "cancelled")
        handle = self.runner.submit(kind, description, fn)
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
        kind = self._accept(job_id)
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
        kind = self._accept(job_id)
        self._callbacks.pop(job_id, None)
        subject = self._subjects.pop(job_id, "")
        if kind is None:
            return
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

    # ------------------------------------------------------------------ model & data
    def open_model(
        self, source: str, *, trust: bool = False, plan: CompressionPlan | None = None
    ) -> int:
        """Load ``source`` (a path or ``demo:NAME``) in a worker, then analyze it.

        ``plan`` (e.g. the recipe given on the command line or the last session's plan) becomes
        the plan once the model is in; otherwise the plan starts empty.
        """
        self.pending_plan = plan
        source = str(source)

        def job(progress: ProgressFn, cancel: CancelToken):
            # Imported here, on the worker (after the start-up warm-up's imports): importing
            # the engine on the UI thread while the warm-up imports it could race.
            from core.data import demo_data_for
            from core.engine import output_layer
            from core.inventory import inventory
            from core.model_io import load_model

            loaded = load_model(
                source, trust=trust, progress=scaled(progress, 0, 0.9), cancel=cancel
            )
            layers = inventory(loaded)
            cancel.check()
            data = demo_data_for(loaded)
            cancel.check()
            head = output_layer(loaded, layers)
            progress(1.0, "model opened")
            return loaded, layers, data, head

        name = Path(source).name if not source.startswith("demo:") else source
        return self._start("load", f"Opening {name}", job, self._on_load_done, subject=source)

    def _on_load_done(self, payload: Any) -> None:
        loaded, layers, data, head = payload
        self.model = loaded
        self.layers = tuple(layers)
        self.output_layer = head
        self.stats = None
        self.preview = None
        self.result = None
        self.after_hists = {}
        self.evaluation = None
        self.exports = []
        if data is not None:
            self.train, self.test = data
            self.data_name = "built-in digits"
        else:
            self.train = self.test = None
            self.data_name = ""
        names = {layer.name for layer in self.layers}
        plan = self.pending_plan or CompressionPlan()
        unknown = [n for n, _ in plan.overrides if n not in names]
        if unknown:
            plan = CompressionPlan(
                default=plan.default,
                overrides=tuple((n, c) for n, c in plan.overrides if n in names),
                recovery=plan.recovery,
                remove_channels=plan.remove_channels,
            )
            self.statusMessaged.emit(
                f"Recipe settings for layers this model lacks were dropped: {', '.join(unknown)}"
            )
        self.pending_plan = None
        plan = self.protect_output(plan)
        self.plan = plan
        self._history, self._index, self._merge_key = [plan], 0, None
        prunable = [layer.name for layer in self.layers if layer.prunable]
        self.selection = (prunable[0],) if prunable else ()
        self.modelLoaded.emit(loaded)
        self.layersChanged.emit(self.layers)
        self.dataLoaded.emit(self.data_description())
        self.statsReady.emit(None)
        self.planChanged.emit(self.plan)
        self.previewUpdated.emit(None)
        self.resultReady.emit(None)
        self.evaluated.emit(None)
        self.exported.emit([])
        self.selectionChanged.emit(self.selection)
        self.historyChanged.emit(False, False)
        self.analyze()

    def data_description(self) -> str:
        if self.train is None:
            return ""
        n = len(self.train) + (len(self.test) if self.test is not None else 0)
        return f"{self.data_name}: {n} samples ({len(self.train)} train / {len(self.test)} test)"

    def open_data(self, path: str) -> int | None:
        """Load a ``.npz``/``.pt`` data file, label it with the model if it has no labels,
        split off a held-out part, then re-analyze with gradients."""
        from core.data import check_data, load_data, split_dataset, with_model_labels

        model = self.model
        if model is None:
            self.errorRaised.emit("Open data", "Open a model first, then its data.", "")
            return None

        def job(progress: ProgressFn, cancel: CancelToken):
            progress(0.0, "reading data")
            data = load_data(path)
            cancel.check()
            progress(0.2, "checking the data against the model")
            checked = check_data(model, data)
            cancel.check()
            # Only class scores can label data; other models (taggers, encoders) keep
            # unlabelled data and are judged by fidelity to the original.
            out_shape = checked.output_shape
            if data.y is None and model.can_run and out_shape is not None and len(out_shape) == 2:
                progress(0.4, "labelling with the model's own predictions")
                data = with_model_labels(model, data)
            cancel.check()
            train, test = split_dataset(data, holdout=0.2, seed=0)
            progress(1.0, "data ready")
            return train, test, Path(path).name

        return self._start(
            "data", f"Opening {Path(path).name}", job, self._on_data_done, subject=str(path)
        )

    def _on_data_done(self, payload: Any) -> None:
        self.train, self.test, self.data_name = payload
        self.evaluation = None
        self.evaluated.emit(None)
        self.dataLoaded.emit(self.data_description())
        self.analyze()

    def analyze(self) -> int | None:
        """Compute `ModelStats` (with gradient statistics when data and a forward pass exist)."""
        from core.stats import analyze

        model = self.model
        if model is None:
            return None
        data = self.train if (self.train is not None and model.can_run) else None
        if data is not None and data.y is None:
            # Unlabelled data is only kept unlabelled for non-classifiers (see open_data):
            # gradient criteria need class scores, so analyse the weights alone.
            data = None
            self.statusMessaged.emit(
                "Gradient criteria need labels or a classifier: analysing weights only."
            )
        layers = self.layers

        def job(progress: ProgressFn, cancel: CancelToken):
            return analyze(model, data, layers=layers, progress=progress, cancel=cancel)

        what = "Analyzing weights and gradients" if data is not None else "Analyzing weights"
        return self._start("analyze", what, job, self._on_analyze_done)

    def _on_analyze_done(self, stats: Any) -> None:
        self.stats = stats
        self.statsReady.emit(stats)
        self._update_preview()

    # ------------------------------------------------------------------ plan editing
    @property
    def can_undo(self) -> bool:
        return self._index > 0

    @property
    def can_redo(self) -> bool:
        return self._index < len(self._history) - 1

    def set_plan(self, plan: CompressionPlan, *, merge_key: str | None = None) -> None:
        """Make ``plan`` current and record it for undo.

        Consecutive edits with the same ``merge_key`` (one slider drag) collapse into one undo
        step; `end_merge` (slider released) closes the step.
        """
        if plan == self.plan:
            return
        del self._history[self._index + 1 :]
        if merge_key is not None and merge_key == self._merge_key and self._index > 0:
            self._history[self._index] = plan
        else:
            self._history.append(plan)
            self._index += 1
        self._merge_key = merge_key
        self._apply_plan(plan)

    def end_merge(self) -> None:
        """Close the current drag's undo step; listeners refresh what they skip mid-drag."""
        was_dragging = self._merge_key is not None
        self._merge_key = None
        if was_dragging:
            self.dragFinished.emit()

    @property
    def dragging(self) -> bool:
        """True between the first and the last edit of one slider/line drag."""
        return self._merge_key is not None

    def undo(self) -> None:
        if self.can_undo:
            self._index -= 1
            self._merge_key = None
            self._apply_plan(self._history[self._index])

    def redo(self) -> None:
        if self.can_redo:
            self._index += 1
            self._merge_key = None
            self._apply_plan(self._history[self._index])

    def _apply_plan(self, plan: CompressionPlan) -> None:
        self.plan = plan
        self.planChanged.emit(plan)
        self.historyChanged.emit(self.can_undo, self.can_redo)
        self._update_preview()

    def _update_preview(self) -> None:
        from core.estimate import preview

        if self.stats is None:
            self.preview = None
            self.previewUpdated.emit(None)
            return
        try:
            self.preview = preview(self.stats, self.plan)
            self.preview_error = ""
        except WorkbenchError as exc:
            # Mid-drag a dialog per mouse move would be unusable: keep the last numbers and
            # say what is wrong in the status bar.
            self.preview_error = str(exc)
            self.statusMessaged.emit(f"Preview unavailable: {exc}")
        self.previewUpdated.emit(self.preview)

    def set_selection(self, names: Sequence[str]) -> None:
        names = tuple(names)
        if names != self.selection:
            self.selection = names
            self.selectionChanged.emit(names)

    def set_scope(self, scope: str) -> None:
        if scope not in SCOPES:
            raise ValueError(scope)
        if scope != self.scope:
            self.scope = scope
            self.scopeChanged.emit(scope)

    def targets(self) -> tuple[str, ...]:
        """Layer names an edit applies to (empty tuple = the model-wide default)."""
        return self.selection if self.scope == "selection" else ()

    def shown_config(self) -> LayerConfig:
        """The config the control panels display: the first target's, or the default."""
        targets = self.targets()
        return self.plan.config_for(targets[0]) if targets else self.plan.default

    def edit(self, change: Callable[[LayerConfig], LayerConfig], *, merge_key: str | None = None):
        """Apply ``change`` to the scope's configs and make the result the current plan.

        Whole model: the default and every per-layer override get the change, so e.g. moving
        the bit-width slider sets every layer's width while their other differences remain.
        Selection: each selected layer gets an override derived from its effective config.
        """
        plan = self.plan
        targets = self.targets()
        if targets:
            for name in targets:
                cfg = _layer_scoped(change(plan.config_for(name)))
                plan = plan.with_layer(name, cfg)
        else:
            head = self.output_layer
            # The output layer's override is the automatic protection (not the user's own
            # setting) when it is exactly what `protect_output_layer` would have made.
            auto = (
                head is not None
                and plan.layer_overrides.get(head) == _protected(plan.default)
                and _channel_pruning(plan.default)
            )
            default = change(plan.default)
            if default.prune.method in STRUCTURED_METHODS + ("nm",):
                default = replace(default, prune=replace(default.prune, scope="layer"))
            plan = plan.with_default(default)
            if auto:
                plan = plan.without_layer(head)
            for name, cfg in plan.overrides:
                plan = plan.with_layer(name, _layer_scoped(change(cfg)))
            plan = self.protect_output(plan)
        self.set_plan(plan, merge_key=merge_key)

    def protect_output(self, plan: CompressionPlan) -> CompressionPlan:
        """``plan`` with the logits layer exempt from a model-wide channel method.

        The same rule as `core.engine.protect_output_layer` (which ``workbench compress``
        applies), on the output layer found once when the model was opened: that search runs
        the model, too slow to repeat on every slider step of a large one.
        """
        head = self.output_layer
        if head is None or not _channel_pruning(plan.default) or head in plan.layer_overrides:
            return plan
        return plan.with_layer(head, _protected(plan.default))

    def reset_selection_to_default(self) -> None:
        """Drop the selected layers' overrides so they follow the model-wide default again."""
        plan = self.plan
        for name in self.selection:
            plan = plan.without_layer(name)
        self.set_plan(plan)

    def set_recovery(self, recovery: RecoveryConfig) -> None:
        self.set_plan(self.plan.with_recovery(recovery))

    def load_recipe(self, path: str) -> None:
        """Read a recipe file (errors surface as a dialog) and make it the plan."""
        try:
            plan = CompressionPlan.load(path)
        except WorkbenchError as exc:
            self.errorRaised.emit("Load recipe", str(exc), "")
            return
        except Exception as exc:  # noqa: BLE001 - an input the loader did not foresee
            tb = log_unexpected("Load recipe", exc)
            self.errorRaised.emit("Load recipe", unexpected_message("recipe", path, exc), tb)
            return
        names = {layer.name for layer in self.layers}
        unknown = [n for n, _ in plan.overrides if names and n not in names]
        if unknown:
            self.errorRaised.emit(
                "Load recipe",
                f"{path}: the recipe configures layers this model does not have: "
                f"{', '.join(unknown)} (was it written for another model?)",
                "",
            )
            return
        self.set_plan(self.protect_output(plan))
        self.statusMessaged.emit(f"Recipe loaded from {path}")

    def save_recipe(self, path: str) -> bool:
        try:
            self.plan.save(path)
        except (OSError, WorkbenchError) as exc:
            self.errorRaised.emit("Save recipe", f"{path}: could not write the recipe ({exc})", "")
            return False
        self.statusMessaged.emit(f"Recipe saved to {path}")
        return True

    # ------------------------------------------------------------------ compress & after
    def compress(self) -> int | None:
        """Apply the plan in a worker, with the recovery the plan asks for.

        Runs `core.training.compress_and_finetune` on the `recovery_split` of the training data,
        exactly as ``workbench compress`` and the benchmark do, so a recipe gives the same
        packed size and accuracy here as on the command line (iterative pruning included).
        """
        from core.training import compress_and_finetune, recovery_split

        if self.model is None or self.stats is None:
            self.errorRaised.emit("Compress", "Wait until the model is analysed.", "")
            return None
        model, plan, stats = self.model, self.plan, self.stats
        requested = plan
        train = self.train if model.can_run else None
        if train is None and plan.recovery.epochs > 0:
            # Weights-only model or no data: compress without recovery rather than fail.
            plan = plan.with_recovery(replace(plan.recovery, epochs=0))
            self.statusMessaged.emit(
                "Fine-tuning skipped: it needs data and a model with a forward pass."
            )
        recovery = plan.recovery
        do_finetune = recovery.epochs > 0

        def job(progress: ProgressFn, cancel: CancelToken):
            fit, val = recovery_split(train) if do_finetune else (None, None)
            result = compress_and_finetune(
                model,
                plan,
                fit,
                val,
                stats=stats,
                progress=scaled(progress, 0, 0.95),
                cancel=cancel,
            )
            hists = after_histograms(result, stats, cancel)
            progress(1.0, "compressed")
            return result, hists, requested

        if not do_finetune:
            what = "Compressing"
        elif recovery.prune_steps > 1:
            what = f"Compressing and fine-tuning in {recovery.prune_steps} steps"
        else:
            what = "Compressing and fine-tuning"
        return self._start("compress", what, job, self._on_compress_done)

    @property
    def result_stale(self) -> bool:
        """Whether the plan changed since the current result was requested."""
        return self.result is not None and self.result_plan != self.plan

    def _on_compress_done(self, payload: Any) -> None:
        self.result, self.after_hists, self.result_plan = payload
        self.exports = []
        self.resultReady.emit(self.result)
        self.exported.emit([])
        self.evaluation = None
        self.evaluated.emit(None)
        if self.test is not None and self.model is not None and self.model.can_run:
            self.evaluate()

    def finetune(self) -> int | None:
        """Fine-tune (or distill, per the plan's recovery settings) the current result."""
        result, train = self.result, self.train
        if result is None:
            self.errorRaised.emit("Fine-tune", "Compress the model first.", "")
            return None
        if train is None or not result.original.can_run:
            self.errorRaised.emit(
                "Fine-tune", "Fine-tuning needs data and a model with a forward pass.", ""
            )
            return None
        recovery = self.plan.recovery
        if recovery.epochs == 0:
            recovery = replace(recovery, epochs=1)
        stats = self.stats
        requested = self.plan

        def job(progress: ProgressFn, cancel: CancelToken):
            tuned = _finetune(result, train, recovery, scaled(progress, 0, 0.95), cancel)
            hists = after_histograms(tuned, stats, cancel)
            return tuned, hists, requested

        what = "Distilling" if recovery.distill else "Fine-tuning"
        return self._start("finetune", what, job, self._on_compress_done)

    def evaluate(self) -> int | None:
        """Accuracy and fidelity of the original and the compressed model on held-out data."""
        from core.evaluate import evaluate

        result, test = self.result, self.test
        if result is None or test is None:
            self.errorRaised.emit("Evaluate", "Evaluation needs a compressed model and data.", "")
            return None
        if not result.original.can_run:
            self.errorRaised.emit(
                "Evaluate", "This is a weights-only model: it has no forward pass to run.", ""
            )
            return None
        data_name = self.data_name

        def job(progress: ProgressFn, cancel: CancelToken):
            before = evaluate(
                result.original, test, progress=scaled(progress, 0, 0.5), cancel=cancel
            )
            after = evaluate(
                result.compressed,
                test,
                reference=result.original,
                progress=scaled(progress, 0.5, 1.0),
                cancel=cancel,
            )
            return Evaluation(before, after, data_name)

        return self._start("evaluate", "Evaluating", job, self._on_evaluate_done)

    def _on_evaluate_done(self, evaluation: Evaluation) -> None:
        self.evaluation = evaluation
        self.evaluated.emit(evaluation)

    def export(
        self, formats: Sequence[str], out_dir: str, *, force: bool = False, report: bool = True
    ) -> int | None:
        """Write the compressed model in ``formats`` (plus recipe and report) under ``out_dir``."""
        from core.export import export_all
        from core.outdir import output_dir
        from core.report import write_report

        result = self.result
        if result is None:
            self.errorRaised.emit("Export", "Compress the model first.", "")
            return None
        data = self.test
        evaluation = self.evaluation

        def job(progress: ProgressFn, cancel: CancelToken):
            out = Path(out_dir)
            # The folder's other files are kept; the new ones appear together or not at all.
            with output_dir(out, force=force, merge_existing=True) as stage:
                records = export_all(
                    result,
                    list(formats),
                    stage,
                    force=force,
                    data=data,
                    progress=scaled(progress, 0, 0.9),
                    cancel=cancel,
                )
                records = [replace(r, path=out / r.path.name) for r in records]
                result.plan.save(stage / "recipe.json")
                if report:
                    evals = (
                        {}
                        if evaluation is None
                        else {
                            "before": evaluation.before,
                            "after": evaluation.after,
                        }
                    )
                    write_report(result, stage, evals=evals, exports=records)
            progress(1.0, "exported")
            return records

        return self._start(
            "export", f"Exporting to {out_dir}", job, self._on_export_done, subject=str(out_dir)
        )

    def _on_export_done(self, records: list) -> None:
        self.exports = list(records)
        self.exported.emit(self.exports)
        self.statusMessaged.emit(f"Exported {len(self.exports)} file(s).")

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
        self.cancel_jobs()
        return self.runner.wait(msecs)


def _channel_pruning(cfg: LayerConfig) -> bool:
    return not cfg.skip and cfg.prune.method in STRUCTURED_METHODS and cfg.prune.active


def _protected(default: LayerConfig) -> LayerConfig:
    """The output layer's exemption: the default's settings without pruning."""
    return replace(default, prune=PruneConfig())


def _layer_scoped(cfg: LayerConfig) -> LayerConfig:
    """Per-layer overrides cannot use the global pool: they prune within their own layer."""
    if cfg.prune.scope == "global":
        return replace(cfg, prune=replace(cfg.prune, scope="layer"))
    return cfg


def _finetune(result, train, recovery: RecoveryConfig, progress: ProgressFn, cancel: CancelToken):
    from core.training import finetune, recovery_split

    # Best-checkpoint selection must not see the test split the results panel reports on;
    # the same split as Compress's recovery (and the CLI's).
    fit, val = recovery_split(train)
    return finetune(result, fit, val, recovery, progress=progress, cancel=cancel)


def after_histograms(
    result, stats, cancel: CancelToken | None = None
) -> dict[str, AfterHistograms]:
    """Histograms of the compressed weights on the original histograms' bin edges.

    Runs in the worker after compression, so the overlay is ready-made data for the plots.
    Pruned weights are exact zeros; the log|w| histogram counts only the kept ones.
    """
    from core.model_io import get_tensor

    out: dict[str, AfterHistograms] = {}
    if stats is None:
        return out
    module = result.compressed.module
    for name, ts in stats.tensors.items():
        if cancel is not None:
            cancel.check()
        tensor_name = ts.layer.tensor
        if tensor_name is None:
            continue
        try:
            w = get_tensor(module, tensor_name)
        except (KeyError, AttributeError, WorkbenchError):
            # Channels physically removed: the tensor changed shape or name; no overlay then.
            continue
        values = w.detach().to("cpu").float().reshape(-1).numpy()
        values = values[np.isfinite(values)]
        signed, _ = np.histogram(values, bins=np.asarray(ts.hist.edges))
        nz = np.abs(values[values != 0])
        log_abs, _ = np.histogram(np.log10(nz), bins=np.asarray(ts.hist_log.edges))
        out[name] = AfterHistograms(signed.astype(np.int64), log_abs.astype(np.int64))
    return out
