"""One session, many front ends: the Qt-free owner of everything a user works on.

A `Session` holds the loaded model, its data, the statistics, the current plan with undo/redo,
the *edit target* (the selected layers or the whole model), the output-layer protection, the
run history and the pipeline steps. Front ends only drive it:

- ``workbench compress`` builds a strict session and runs each step synchronously
  (`Session.run`);
- the window's controller (``app/controller.py``) runs the same steps in worker threads and
  turns the session's events into Qt signals.

Every pipeline step is a `Job`: a body ``fn(progress, cancel) -> payload`` that may run on any
thread and touches no session state, and a ``done(payload)`` that applies the payload on the
owner's thread. Starting a job supersedes the running jobs whose results it makes stale
(`SUPERSEDES`): their cancel tokens are set and their late results are dropped.

Plan edits are data (`core.edits`): `Session.edit` applies one with `core.edits.apply_edit`,
merges consecutive edits with the same merge key into one undo step and records them, so a
history can be shown, saved and replayed.

Strict vs lenient (the one place the two front ends differ on purpose): a strict session (the
CLI) refuses a recipe that names layers the model lacks and refuses fine-tuning without data; a
lenient one (the window) drops those settings and says so in a notice, because the user is
looking and can fix it.

Why one module of this size: it is the one owner of the state and the rules both front ends
share (plan history, edit target, supersede table, run history and each pipeline step); the
steps are short and read best beside the state they change.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from core.edits import Edit, ReplacePlan, ResetLayers, SetRecovery, apply_edit, protect_output
from core.errors import CompressionError, RecipeError, WorkbenchError
from core.methods import prune_method
from core.plan import CompressionPlan, LayerConfig, RecoveryConfig, starting_plan
from core.progress import CancelToken, ProgressFn, no_progress, scaled

#: What an edit applies to: the selected layers, or the whole model (default + overrides).
EDIT_TARGETS = ("model", "selection")

#: Starting a job of kind K cancels and drops the running jobs of these kinds: their results
#: would describe a model, data set or plan that is no longer current.
JOB_KINDS = ("load", "data", "analyze", "compress", "finetune", "evaluate", "export")
SUPERSEDES: dict[str, tuple[str, ...]] = {
    "load": JOB_KINDS,
    "data": ("data", "analyze", "finetune", "evaluate"),
    "analyze": ("analyze",),
    "compress": ("compress", "finetune", "evaluate", "export"),
    "finetune": ("finetune", "evaluate", "export"),
    "evaluate": ("evaluate",),
    "export": ("export",),
}

Listener = Callable[[str, Any], None]


@dataclass(frozen=True)
class Evaluation:
    """Accuracy/fidelity of the original and the compressed model on one data set."""

    before: Any
    after: Any
    data_name: str


@dataclass(frozen=True)
class RunRecord:
    """One compress / fine-tune / evaluate run, with the plan it ran."""

    id: int
    kind: str
    plan: CompressionPlan
    seconds: float
    sparsity: float | None = None
    payload_bytes: int | None = None
    dense_bytes: int | None = None
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    fidelity: dict[str, float] = field(default_factory=dict)
    data_name: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "plan": self.plan.to_dict(),
            "seconds": self.seconds,
            "sparsity": self.sparsity,
            "payload_bytes": self.payload_bytes,
            "dense_bytes": self.dense_bytes,
            "accuracy_before": self.accuracy_before,
            "accuracy_after": self.accuracy_after,
            "fidelity": dict(self.fidelity),
            "data_name": self.data_name,
        }

    @classmethod
    def from_dict(cls, data: Any) -> RunRecord:
        if not isinstance(data, dict):
            raise RecipeError("run: expected an object")
        try:
            return cls(
                id=int(data["id"]),
                kind=str(data["kind"]),
                plan=CompressionPlan.from_dict(data["plan"]),
                seconds=float(data["seconds"]),
                sparsity=data.get("sparsity"),
                payload_bytes=data.get("payload_bytes"),
                dense_bytes=data.get("dense_bytes"),
                accuracy_before=data.get("accuracy_before"),
                accuracy_after=data.get("accuracy_after"),
                fidelity=dict(data.get("fidelity") or {}),
                data_name=str(data.get("data_name", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RecipeError(f"run: missing or malformed field ({exc})") from None


class PlanHistory:
    """Undo/redo over plans; consecutive edits with one merge key form one step."""

    def __init__(self, plan: CompressionPlan):
        self._plans: list[CompressionPlan] = [plan]
        self._edits: list[Edit | None] = [None]
        self._index = 0
        self._merge_key: str | None = None

    @property
    def plan(self) -> CompressionPlan:
        return self._plans[self._index]

    @property
    def can_undo(self) -> bool:
        return self._index > 0

    @property
    def can_redo(self) -> bool:
        return self._index < len(self._plans) - 1

    @property
    def merging(self) -> bool:
        """True between the first and the last edit of one drag."""
        return self._merge_key is not None

    def edits(self) -> tuple[Edit, ...]:
        """The edits that lead from the first plan to the current one (merged steps: last)."""
        return tuple(e for e in self._edits[1 : self._index + 1] if e is not None)

    def push(self, plan: CompressionPlan, edit: Edit | None, merge_key: str | None) -> bool:
        """Record ``plan``; returns False when it equals the current plan (nothing recorded)."""
        if plan == self.plan:
            return False
        del self._plans[self._index + 1 :]
        del self._edits[self._index + 1 :]
        if merge_key is not None and merge_key == self._merge_key and self._index > 0:
            self._plans[self._index] = plan
            self._edits[self._index] = edit
        else:
            self._plans.append(plan)
            self._edits.append(edit)
            self._index += 1
        self._merge_key = merge_key
        return True

    def end_merge(self) -> bool:
        """Close the current drag's step; True when one was open."""
        was = self._merge_key is not None
        self._merge_key = None
        return was

    def undo(self) -> bool:
        if not self.can_undo:
            return False
        self._index -= 1
        self._merge_key = None
        return True

    def redo(self) -> bool:
        if not self.can_redo:
            return False
        self._index += 1
        self._merge_key = None
        return True


@dataclass
class Job:
    """One pipeline step: ``fn`` runs anywhere, ``done`` applies its payload to the session."""

    id: int
    kind: str
    description: str
    fn: Callable[[ProgressFn, CancelToken], Any]
    done: Callable[[Any], None]
    cancel: CancelToken = field(default_factory=CancelToken)


class Session:
    """The state of one workbench session and the steps that change it (see module docstring).

    Parameters
    ----------
    strict
        CLI semantics: refuse (raise) where a lenient session drops settings with a notice.
    """

    def __init__(self, *, strict: bool = False):
        self.strict = strict
        self._listeners: list[Listener] = []
        self._ids = itertools.count(1)
        self._current: dict[str, int] = {}
        self._running: dict[int, Job] = {}
        self.model: Any = None
        self.layers: tuple[Any, ...] = ()
        self.output_layer: str | None = None
        self.train: Any = None
        self.test: Any = None
        self.data_name = ""
        self.stats: Any = None
        self.history = PlanHistory(starting_plan())
        self.selection: tuple[str, ...] = ()
        self.target = "model"
        self.result: Any = None
        self.result_plan: CompressionPlan | None = None
        self.after_hists: dict[str, Any] = {}
        self.evaluation: Evaluation | None = None
        self.exports: list[Any] = []
        self.runs: list[RunRecord] = []
        self._run_ids = itertools.count(1)

    # ------------------------------------------------------------------ events
    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(event, payload)`` after every state change (on the owner thread)."""
        self._listeners.append(listener)

    def _emit(self, event: str, payload: Any = None) -> None:
        for listener in list(self._listeners):
            listener(event, payload)

    def notice(self, message: str) -> None:
        """A message for the user (status bar / stderr), not an error."""
        self._emit("notice", message)

    # ------------------------------------------------------------------ plan
    @property
    def plan(self) -> CompressionPlan:
        return self.history.plan

    @property
    def layer_names(self) -> set[str]:
        return {layer.name for layer in self.layers}

    def targets(self) -> tuple[str, ...]:
        """Layer names an edit made now applies to (``()`` = the whole model)."""
        return self.selection if self.target == "selection" else ()

    def shown_config(self) -> LayerConfig:
        """The config the controls display: the first target's own, else the default."""
        targets = self.targets()
        return self.plan.config_for(targets[0]) if targets else self.plan.default

    def set_selection(self, names: Sequence[str]) -> None:
        names = tuple(names)
        if names != self.selection:
            self.selection = names
            self._emit("selection_changed", names)

    def set_target(self, target: str) -> None:
        if target not in EDIT_TARGETS:
            raise ValueError(f"edit target must be one of {EDIT_TARGETS}, not {target!r}")
        if target != self.target:
            self.target = target
            self._emit("target_changed", target)

    def edit(self, edit: Edit, *, merge: bool = True) -> bool:
        """Apply ``edit`` and record it for undo; returns False when nothing changed.

        ``merge``: let consecutive edits with the same `Edit.merge_key` (one drag) collapse
        into one undo step; `end_merge` closes the step.
        """
        unknown = [n for n in edit.layers if self.layers and n not in self.layer_names]
        if unknown:
            raise RecipeError(
                f"layers: the model has no layer {unknown[0]!r}",
                hint="`workbench inspect MODEL` lists the layer names",
            )
        plan = apply_edit(self.plan, edit, output_layer=self.output_layer)
        if not self.history.push(plan, edit, edit.merge_key() if merge else None):
            return False
        self._plan_changed()
        return True

    def edit_targets(self, make: Callable[[tuple[str, ...]], Edit], **kw: Any) -> bool:
        """``edit(make(targets()))``: an edit aimed at whatever the edit target says."""
        return self.edit(make(self.targets()), **kw)

    def end_merge(self) -> bool:
        """Close the current drag's undo step (slider released)."""
        closed = self.history.end_merge()
        if closed:
            self._emit("drag_finished")
        return closed

    @property
    def dragging(self) -> bool:
        return self.history.merging

    def undo(self) -> bool:
        if self.history.undo():
            self._plan_changed()
            return True
        return False

    def redo(self) -> bool:
        if self.history.redo():
            self._plan_changed()
            return True
        return False

    def _plan_changed(self) -> None:
        self._emit("plan_changed", self.plan)
        self._emit("history_changed", (self.history.can_undo, self.history.can_redo))

    def reset_selection(self) -> bool:
        """Drop the selected layers' own settings (they follow the default again)."""
        return self.edit(ResetLayers(layers=self.selection))

    def set_recovery(self, recovery: RecoveryConfig) -> bool:
        return self.edit(SetRecovery(recovery=recovery))

    def checked_plan(
        self, plan: CompressionPlan, *, source: str | None = None, lenient: bool | None = None
    ) -> CompressionPlan:
        """``plan`` made valid for this model, with the output layer protected.

        Layers the model lacks are refused with a `RecipeError` naming them, or (``lenient``,
        default: a non-strict session) dropped with a notice: a plan restored with the last
        session may come from an edited model, a recipe the user picks should fit.
        """
        lenient = (not self.strict) if lenient is None else lenient
        names = self.layer_names
        unknown = sorted(n for n, _ in plan.overrides if names and n not in names)
        if unknown:
            if not lenient:
                raise RecipeError(
                    f"layers.{unknown[0]}: the recipe configures layers this model does not "
                    f"have: {', '.join(unknown[:5])}",
                    path=source,
                    hint="was it written for another model? `workbench inspect MODEL` lists "
                    "the layer names",
                )
            plan = replace(plan, overrides=tuple((n, c) for n, c in plan.overrides if n in names))
            self.notice(
                f"Recipe settings for layers this model lacks were dropped: {', '.join(unknown)}"
            )
        return protect_output(plan, self.output_layer)

    def load_recipe(self, path: str | Path) -> bool:
        """Read a recipe file and make it the plan (one undo step); it must fit the model."""
        plan = self.checked_plan(CompressionPlan.load(path), source=str(path), lenient=False)
        changed = self.edit(ReplacePlan(plan=plan), merge=False)
        self.notice(f"Recipe loaded from {path}")
        return changed

    def save_recipe(self, path: str | Path) -> None:
        self.plan.save(path)

    def needs_gradients(self, plan: CompressionPlan | None = None) -> bool:
        plan = plan or self.plan
        configs = [plan.default, *(cfg for _, cfg in plan.overrides)]
        return any(
            c.prune.active and not c.skip and prune_method(c.prune.method).needs_gradients
            for c in configs
        )

    @property
    def result_stale(self) -> bool:
        """Whether the plan changed since the current result was requested."""
        return self.result is not None and self.result_plan != self.plan

    # ------------------------------------------------------------------ jobs
    def _job(self, kind: str, description: str, fn: Any, done: Any) -> Job:
        job = Job(next(self._ids), kind, description, fn, done)
        for other in SUPERSEDES[kind]:
            previous = self._current.pop(other, None)
            if previous is not None and previous in self._running:
                self._running.pop(previous).cancel.cancel()
        self._current[kind] = job.id
        self._running[job.id] = job
        return job

    def is_current(self, job: Job) -> bool:
        """False once a newer job superseded ``job``: its result must be dropped."""
        return self._current.get(job.kind) == job.id

    def finish(self, job: Job, payload: Any) -> bool:
        """Apply a finished job's payload (owner thread); returns False if it was superseded."""
        self._running.pop(job.id, None)
        if not self.is_current(job):
            return False
        del self._current[job.kind]
        job.done(payload)
        return True

    def fail(self, job: Job) -> None:
        """Forget a job that raised or was cancelled."""
        self._running.pop(job.id, None)
        if self.is_current(job):
            del self._current[job.kind]

    def busy(self, kind: str | None = None) -> bool:
        if kind is None:
            return bool(self._current)
        return kind in self._current

    def cancel_all(self) -> None:
        for job in list(self._running.values()):
            job.cancel.cancel()

    def run(self, job: Job, progress: ProgressFn = no_progress) -> Any:
        """Run ``job`` here and now (the CLI's runner); errors propagate."""
        try:
            payload = job.fn(progress, job.cancel)
        except BaseException:
            self.fail(job)
            raise
        self.finish(job, payload)
        return payload

    # ------------------------------------------------------------------ steps
    def open_model(
        self,
        source: str,
        *,
        trust: bool = False,
        architecture: str | None = None,
        plan: CompressionPlan | None = None,
        recipe_path: str | None = None,
    ) -> Job:
        """Load ``source``, list its layers, find the output layer, attach demo data."""
        from core.data import demo_data_for
        from core.engine import output_layer
        from core.inventory import inventory
        from core.model_io import load_model

        source = str(source)

        def fn(progress: ProgressFn, cancel: CancelToken):
            loaded = load_model(
                source,
                trust=trust,
                architecture=architecture,
                progress=scaled(progress, 0, 0.9),
                cancel=cancel,
            )
            layers = inventory(loaded)
            cancel.check()
            data = demo_data_for(loaded)
            cancel.check()
            head = output_layer(loaded, layers)
            progress(1.0, "model opened")
            return loaded, tuple(layers), data, head

        def done(payload: Any) -> None:
            loaded, layers, data, head = payload
            self.model, self.layers, self.output_layer = loaded, layers, head
            self.stats = None
            self.result = self.result_plan = self.evaluation = None
            self.after_hists, self.exports = {}, []
            self.train, self.test = data if data is not None else (None, None)
            self.data_name = "built-in digits" if data is not None else ""
            self._fill_example_input()
            start = self.checked_plan(plan or starting_plan(), source=recipe_path)
            self.history = PlanHistory(start)
            prunable = [layer.name for layer in layers if layer.prunable]
            self.selection = (prunable[0],) if prunable else ()
            self._emit("model_loaded", loaded)
            # What the loader decided on the user's behalf (e.g. a TorchScript file opened
            # weights-only because its code was not vetted-safe) is said in every front end.
            reason = loaded.metadata.get("opened_weights_only_reason")
            if reason:
                self.notice(str(reason))
            for note in loaded.metadata.get("notes", ()):
                self.notice(f"warning: {note}")
            self._emit("data_loaded", self.data_description())
            self._plan_changed()
            self._emit("selection_changed", self.selection)

        name = source if source.startswith("demo:") else Path(source).name
        return self._job("load", f"Opening {name}", fn, done)

    def _fill_example_input(self) -> None:
        # Tracing (channel removal, exports) needs an input; the data provides one.
        if self.model is not None and self.model.example_input is None and self.train is not None:
            self.model = replace(self.model, example_input=self.train.x[:4].clone())

    def data_description(self) -> str:
        if self.train is None:
            return ""
        n = len(self.train) + (len(self.test) if self.test is not None else 0)
        return f"{self.data_name}: {n} samples ({len(self.train)} train / {len(self.test)} test)"

    def open_data(self, path: str | Path, *, label_with_model: bool = True) -> Job:
        """Read a data file, check it against the model, split 80/20 into train and held-out
        test; ``label_with_model``: give unlabelled data the model's own predictions as labels
        (class-score models only), so the gradient criteria and agreement-as-accuracy work."""
        from core.data import check_data, load_data, split_dataset, with_model_labels

        model = self.model
        if model is None:
            raise WorkbenchError("open a model first, then its data")
        path = str(path)

        def fn(progress: ProgressFn, cancel: CancelToken):
            progress(0.0, "reading data")
            data = load_data(path, model)
            cancel.check()
            progress(0.2, "checking the data against the model")
            checked = check_data(model, data)
            cancel.check()
            out_shape = checked.output_shape
            # Only class scores can label data; other models (taggers, encoders) keep
            # unlabelled data and are judged by fidelity to the original.
            if (
                label_with_model
                and data.y is None
                and model.can_run
                and out_shape is not None
                and len(out_shape) == 2
                and model.task != "embedding"
            ):
                progress(0.4, "labelling with the model's own predictions")
                data = with_model_labels(model, data)
            cancel.check()
            train, test = split_dataset(data, holdout=0.2, seed=0)
            progress(1.0, "data ready")
            return train, test, Path(path).name

        def done(payload: Any) -> None:
            self.train, self.test, self.data_name = payload
            self.evaluation = None
            self._fill_example_input()
            self._emit("data_loaded", self.data_description())
            self._emit("evaluated", None)

        return self._job("data", f"Opening {Path(path).name}", fn, done)

    def analyze(self, *, gradients: bool | None = None) -> Job:
        """Weight statistics, plus gradient statistics from the training data.

        ``gradients=None``: a lenient session records them whenever labelled data and a
        forward pass exist (the gradient criteria become available); a strict one only when
        the plan's criteria need them (they cost forward/backward passes).
        """
        from core.stats import analyze

        model = self.model
        if model is None:
            raise WorkbenchError("open a model first")
        data = self.train if (self.train is not None and model.can_run) else None
        if data is not None and data.y is None:
            data = None
            self.notice("Gradient criteria need labels or a classifier: analysing weights only.")
        want = gradients if gradients is not None else (not self.strict or self.needs_gradients())
        if not want:
            data = None
        layers = self.layers

        def fn(progress: ProgressFn, cancel: CancelToken):
            return analyze(model, data, layers=layers, progress=progress, cancel=cancel)

        def done(stats: Any) -> None:
            self.stats = stats
            self._emit("stats_ready", stats)

        what = "Analyzing weights and gradients" if data is not None else "Analyzing weights"
        return self._job("analyze", what, fn, done)

    def _recovery_plan(self) -> CompressionPlan:
        """The plan to run: recovery dropped (lenient) or refused (strict) without data."""
        plan = self.plan
        if plan.recovery.epochs == 0:
            return plan
        if self.model is not None and not self.model.can_run:
            if self.strict:
                from core.evaluate import require_forward

                require_forward(self.model, "fine-tuning")
        elif self.train is not None:
            return plan
        if self.strict:
            raise CompressionError(
                "fine-tuning needs training data",
                path=self.model.source if self.model is not None else None,
                hint="pass --data FILE (x and y arrays) or drop --finetune-epochs",
            )
        self.notice("Fine-tuning skipped: it needs data and a model with a forward pass.")
        return plan.with_recovery(replace(plan.recovery, epochs=0))

    def check_runnable(self) -> None:
        """Refuse, before any work, a plan this model cannot run: no weights at all; gradient
        criteria on a weights-only checkpoint; fine-tuning without a forward pass (strict)."""
        if self.model is None:
            raise WorkbenchError("open a model first")
        if not any(p.numel() and p.is_floating_point() for p in self.model.module.parameters()):
            raise CompressionError(
                "the model has no weights to compress",
                path=self.model.source,
                hint="it has 0 floating-point parameters; check that this is the right file",
            )
        if self.needs_gradients() and not self.model.can_run:
            raise CompressionError(
                "gradient criteria (taylor, gradient_stability) need a forward pass; this is a "
                "weights-only checkpoint",
                path=self.model.source,
                hint="use magnitude/channel/nm pruning, or give a TorchScript/.pt2 file",
            )
        if self.strict and self.plan.recovery.epochs > 0:
            from core.evaluate import require_forward

            require_forward(self.model, "fine-tuning")

    def compress(self, *, after_histograms: bool = False) -> Job:
        """Apply the plan to a copy, with the recovery it asks for (`compress_and_finetune`
        on the `recovery_split` of the training data: the same numbers in every front end)."""
        from core.training import compress_and_finetune, recovery_split

        if self.model is None or self.stats is None:
            raise WorkbenchError("wait until the model is analysed")
        self.check_runnable()
        model, stats, requested = self.model, self.stats, self.plan
        plan = self._recovery_plan()
        train = self.train if model.can_run else None
        recovery = plan.recovery
        tune = recovery.epochs > 0

        def fn(progress: ProgressFn, cancel: CancelToken):
            start = time.perf_counter()
            fit, val = recovery_split(train) if tune else (None, None)
            result = compress_and_finetune(
                model,
                plan,
                fit,
                val,
                stats=stats,
                progress=scaled(progress, 0, 0.95),
                cancel=cancel,
                calibration=train,
            )
            hists = _after_histograms(result, stats, cancel) if after_histograms else {}
            progress(1.0, "compressed")
            return result, hists, requested, time.perf_counter() - start

        if not tune:
            what = "Compressing"
        elif recovery.prune_steps > 1:
            what = f"Compressing and fine-tuning in {recovery.prune_steps} steps"
        else:
            what = "Compressing and fine-tuning"
        return self._job("compress", what, fn, lambda p: self._result_done("compress", p))

    def _result_done(self, kind: str, payload: Any) -> None:
        self.result, self.after_hists, self.result_plan, seconds = payload
        self.exports, self.evaluation = [], None
        self._record(kind, self.result_plan, seconds)
        self._emit("result_ready", self.result)
        self._emit("exported", [])
        self._emit("evaluated", None)

    def finetune(self, *, after_histograms: bool = False) -> Job:
        """Fine-tune (or distill, per the plan's recovery) the current result once more."""
        from core.training import finetune, recovery_split

        result, train, stats = self.result, self.train, self.stats
        if result is None:
            raise WorkbenchError("compress the model first")
        if train is None or not result.original.can_run:
            raise CompressionError("fine-tuning needs data and a model with a forward pass")
        recovery = self.plan.recovery
        if recovery.epochs == 0:
            recovery = replace(recovery, epochs=1)
        requested = self.plan

        def fn(progress: ProgressFn, cancel: CancelToken):
            start = time.perf_counter()
            # Best-checkpoint selection must not see the test split the results are reported on.
            fit, val = recovery_split(train)
            tuned = finetune(
                result, fit, val, recovery, progress=scaled(progress, 0, 0.95), cancel=cancel
            )
            hists = _after_histograms(tuned, stats, cancel) if after_histograms else {}
            return tuned, hists, requested, time.perf_counter() - start

        what = "Distilling" if recovery.distill else "Fine-tuning"
        return self._job("finetune", what, fn, lambda p: self._result_done("finetune", p))

    def evaluate(self, data: Any = None) -> Job:
        """Accuracy/fidelity of the original and the compressed model on held-out data
        (``data``, else the test split)."""
        from core.evaluate import evaluate

        result = self.result
        test = data if data is not None else self.test
        if result is None or test is None:
            raise WorkbenchError("evaluation needs a compressed model and data")
        if not result.original.can_run:
            raise CompressionError("this is a weights-only model: it has no forward pass to run")
        name = getattr(test, "name", "") if data is not None else self.data_name

        def fn(progress: ProgressFn, cancel: CancelToken):
            start = time.perf_counter()
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
            return Evaluation(before, after, name), time.perf_counter() - start

        def done(payload: Any) -> None:
            self.evaluation, seconds = payload
            self._record("evaluate", self.result_plan or self.plan, seconds)
            self._emit("evaluated", self.evaluation)

        return self._job("evaluate", "Evaluating", fn, done)

    def restore_runs(self, records: Sequence[RunRecord]) -> None:
        """Put saved runs (e.g. a restored window session) back into the history; runs made
        from now on are numbered after them."""
        self.runs.extend(records)
        self._run_ids = itertools.count(max((r.id for r in self.runs), default=0) + 1)

    def _record(self, kind: str, plan: CompressionPlan, seconds: float) -> None:
        result, ev = self.result, self.evaluation
        fidelity: dict[str, float] = {}
        acc_b = acc_a = None
        if ev is not None:
            acc_b = getattr(ev.before, "accuracy", None)
            acc_a = getattr(ev.after, "accuracy", None)
            for key in ("agreement", "rel_l2", "cosine", "max_abs_diff"):
                value = getattr(ev.after, key, None)
                if isinstance(value, (int, float)):
                    fidelity[key] = float(value)
        record = RunRecord(
            id=next(self._run_ids),
            kind=kind,
            plan=plan,
            seconds=float(seconds),
            sparsity=result.sparsity if result is not None else None,
            payload_bytes=_layer_sum(result, "packed_bytes"),
            dense_bytes=_layer_sum(result, "dense_bytes"),
            accuracy_before=acc_b,
            accuracy_after=acc_a,
            fidelity=fidelity,
            data_name=ev.data_name if ev is not None else "",
        )
        self.runs.append(record)
        self._emit("run_recorded", record)

    def export(
        self,
        formats: Sequence[str],
        out_dir: str | Path,
        *,
        force: bool = False,
        merge_existing: bool = True,
        report: bool = True,
        entropy: bool = False,
    ) -> Job:
        """Write the result in ``formats`` plus recipe and report, as one complete directory
        (`core.outputs.write_outputs`)."""
        from core.outputs import write_outputs

        result = self.result
        if result is None:
            raise WorkbenchError("compress the model first")
        data, evaluation, plan = self.test, self.evaluation, self.result_plan or result.plan
        evals = (
            {}
            if evaluation is None
            else {
                "before": evaluation.before,
                "after": evaluation.after,
                "data": evaluation.data_name,
            }
        )
        formats = list(formats)

        def fn(progress: ProgressFn, cancel: CancelToken):
            records, _ = write_outputs(
                result,
                formats,
                Path(out_dir),
                plan=plan,
                evals=evals,
                data=data,
                force=force,
                merge_existing=merge_existing,
                report=report,
                entropy=entropy,
                progress=progress,
                cancel=cancel,
            )
            progress(1.0, "exported")
            return records

        def done(records: Any) -> None:
            self.exports = list(records)
            self._emit("exported", self.exports)
            self.notice(f"Exported {len(self.exports)} file(s).")

        return self._job("export", f"Exporting to {out_dir}", fn, done)


def _layer_sum(result: Any, key: str) -> int | None:
    """Sum of a per-layer byte count over the compressed layers (payload, not the archive)."""
    if result is None:
        return None
    return int(sum(getattr(r, key) for r in result.layers))


def _after_histograms(result: Any, stats: Any, cancel: CancelToken | None) -> dict[str, Any]:
    from core.overlay import after_histograms

    return after_histograms(result, stats, cancel)
