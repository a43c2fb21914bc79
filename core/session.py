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

Plan edits are data (`core.recipe.edits`): `Session.edit` applies one with `core.recipe.edits.apply_edit`,
merges consecutive edits with the same merge key into one undo step and records them, so a
history can be shown, saved and replayed.

Strict vs lenient (the one place the two front ends differ on purpose): a strict session (the
CLI) refuses a recipe that names layers the model lacks and refuses fine-tuning without data; a
lenient one (the window) drops those settings and says so in a notice, because the user is
looking and can fix it.

Why one module of this size: it is the one owner of the state and the rules both front ends
share (plan history, edit target, supersede table, run history and each pipeline step); the
steps are short and read best beside the state they change.

Why one module of this size: the session is the single owner of plan, history and jobs for every
front end; its job bodies (open, analyse, compress, scan, export, ensemble) are short and each
needs the session's private state, so splitting them would only move that state into globals or
back-references.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from core.analysis.estimate import preview
from core.analysis.inventory import inventory
from core.analysis.overlay import after_histograms
from core.analysis.stats import analyze
from core.base.errors import (
    CompressionError,
    DataError,
    ExportError,
    RecipeError,
    WorkbenchError,
)
from core.base.methods import prune_method
from core.base.progress import CancelToken, ProgressFn, no_progress, scaled
from core.compress.engine import output_layer
from core.evaluate import evaluate, require_forward
from core.export.deploy import check_records, cost_block
from core.export.devices import (
    DeviceProfileError,
    device_block,
    estimate_fit,
    load_devices,
    peak_activation_bytes,
)
from core.export.outputs import write_outputs
from core.io.data import check_data, demo_data_for, load_data, split_dataset, with_model_labels
from core.io.hf import language_model
from core.io.model_io import load_model
from core.planning.sensitivity import MAX_SAMPLES, scan
from core.planning.solver import (
    Target,
    build_problem,
    level_configs,
    plan_for_target,
    quick_frontier,
    quick_plan,
    smallest_plan,
)
from core.recipe.edits import (
    Edit,
    ReplacePlan,
    ResetLayers,
    SetRecovery,
    SolvedPlan,
    apply_edit,
    protect_output,
)
from core.recipe.plan import CompressionPlan, LayerConfig, RecoveryConfig, starting_plan
from core.recovery.ensemble import ensemble_of_plans
from core.recovery.training import compress_and_finetune, finetune, recovery_split

#: What an edit applies to: the selected layers, or the whole model (default + overrides).
EDIT_TARGETS = ("model", "selection")

#: Starting a job of kind K cancels and drops the running jobs of these kinds: their results
#: would describe a model, data set or plan that is no longer current.
JOB_KINDS = (
    "load",
    "data",
    "analyze",
    "compress",
    "finetune",
    "evaluate",
    "export",
    "ensemble",
    "scan",
    "pins",
    "frontier",
)
SUPERSEDES: dict[str, tuple[str, ...]] = {
    "load": JOB_KINDS,
    "data": ("data", "analyze", "finetune", "evaluate", "ensemble", "scan", "pins", "frontier"),
    "analyze": ("analyze", "scan", "pins", "frontier"),
    "compress": ("compress", "finetune", "evaluate", "export"),
    "finetune": ("finetune", "evaluate", "export"),
    "evaluate": ("evaluate",),
    "export": ("export",),
    "ensemble": ("ensemble",),
    "scan": ("scan", "pins", "frontier"),
    # The solver's tables for a new set of pinned layers (`Session.set_pins`) and the
    # predicted frontier for them (`Session.frontier_job`): a newer pin change makes both
    # stale.
    "pins": ("pins", "frontier"),
    "frontier": ("frontier",),
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
    #: kind "ensemble": the ids of the runs whose plans are its members (payload: their sum).
    members: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            **({"members": list(self.members)} if self.members else {}),
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
                members=tuple(int(i) for i in data.get("members") or ()),
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
        """Record ``plan``; returns False when it equals the current plan (nothing recorded).

        Within a merged step the last edit is kept even when it leaves the plan as it was (a
        target drag past a point where the solved plan does not change), so the step's recorded
        edit is always the drag's last position."""
        merging = merge_key is not None and merge_key == self._merge_key and self._index > 0
        if plan == self.plan:
            if merging and edit is not None:
                self._edits[self._index] = edit
            return False
        del self._plans[self._index + 1 :]
        del self._edits[self._index + 1 :]
        if merging:
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
        #: Whether the model gives class scores on the open data (unlabelled data then still
        #: gives gradients: the model's own predictions are the labels).
        self.data_scores = False
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
        # Deployment target (`set_device`): the chosen profile, its catalogue, the peak
        # activation bytes measured once per model (`peak_activations`), and the device /
        # cost blocks of the last export.
        self.device: Any = None
        self.devices: dict[str, Any] = {}
        self.devices_path: str | None = None
        self._activations: tuple[Any, int | None] | None = None
        self.export_targets: dict[str, Any] = {}
        # Sensitivity (`scan`, `plan_to_target`): the last scan of this model and data, the
        # layers the solver must leave as they are, every scanned layer's option table
        # (`_tables`: built once per scan and statistics, the previews), the solver's
        # problem for the current pins (those rows minus the pinned ones; re-solved per
        # target step) and the last solution.
        self.sensitivity: Any = None
        self.pins: frozenset[str] = frozenset()
        self._tables: tuple[Any, Any] | None = None
        self._problem: tuple[Any, Any] | None = None
        self.solution: Any = None

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

    # ------------------------------------------------------------------ deployment target
    def load_devices(self, path: str | Path | None = None) -> dict[str, Any]:
        """Read a device catalogue (default: the shipped one) and offer its profiles; the
        chosen device is kept when the new catalogue has a profile of that name."""

        self.devices = load_devices(path)
        self.devices_path = None if path is None else str(path)
        name = self.device.name if self.device is not None else None
        device = self.devices.get(name) if name else None
        self._emit("devices_loaded", tuple(self.devices))
        if device != self.device:
            self.device = device
            self._emit("device_changed", device)
        return self.devices

    def set_device(self, name: str | None) -> None:
        """Judge plans against the profile ``name`` of the catalogue (None: no device)."""
        if name and not self.devices:
            self.load_devices()
        if name and name not in self.devices:
            raise DeviceProfileError(
                f"no device {name!r} in the catalogue",
                path=self.devices_path,
                hint=f"choose from {', '.join(self.devices)}",
            )
        device = self.devices[name] if name else None
        if device != self.device:
            self.device = device
            self._emit("device_changed", device)

    def peak_activations(self) -> int | None:
        """Peak activation bytes of one forward pass at batch 1 (`core.export.devices.
        peak_activation_bytes`) on the model's example input, else a held-out sample; measured
        once per model and cached. None for a model without a forward pass or input."""
        model = self.model
        if model is None:
            return None
        if self._activations is not None and self._activations[0] is model:
            return self._activations[1]
        x = model.example_input
        if x is None and self.test is not None:
            x = self.test.x
        value = None
        import torch

        if model.can_run and isinstance(x, torch.Tensor) and x.shape[0] > 0:
            try:
                value = peak_activation_bytes(model.module, x[:1])
            except Exception as exc:  # noqa: BLE001 - a model that cannot run batch 1
                self.notice(f"Peak activations not measured ({type(exc).__name__}: {exc})")
        self._activations = (model, value)
        return value

    def device_fit(self, weights_bytes: int | None) -> dict[str, Any] | None:
        """Does a plan of ``weights_bytes`` (the live estimate's packed size) plus the peak
        activations fit the chosen device? (`core.export.devices.estimate_fit`; None: no device.)"""
        if self.device is None or weights_bytes is None:
            return None

        return estimate_fit(self.device, int(weights_bytes), self.peak_activations())

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
            self.data_scores = data is not None  # the demos are digit classifiers
            self._fill_example_input()
            start = self.checked_plan(plan or starting_plan(), source=recipe_path)
            self.history = PlanHistory(start)
            self._forget_scan()
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
            scores = (
                model.can_run
                and out_shape is not None
                and len(out_shape) == 2
                and model.task != "embedding"
            )
            if label_with_model and data.y is None and scores:
                progress(0.4, "labelling with the model's own predictions")
                data = with_model_labels(model, data)
            cancel.check()
            train, test = split_dataset(data, holdout=0.2, seed=0)
            progress(1.0, "data ready")
            return train, test, Path(path).name, scores

        def done(payload: Any) -> None:
            self.train, self.test, self.data_name, self.data_scores = payload
            self.evaluation = None
            self._fill_example_input()
            self._forget_scan()
            self._emit("data_loaded", self.data_description())
            self._emit("evaluated", None)

        return self._job("data", f"Opening {Path(path).name}", fn, done)

    def analyze(self, *, gradients: bool | None = None) -> Job:
        """Weight statistics, plus gradient statistics from the training data.

        ``gradients=None``: a lenient session records them whenever labelled data and a
        forward pass exist (the gradient criteria become available); a strict one only when
        the plan's criteria need them (they cost forward/backward passes).
        """

        model = self.model
        if model is None:
            raise WorkbenchError("open a model first")
        data = self.train if (self.train is not None and model.can_run) else None
        # Unlabelled data still gives gradients to a model of class scores (its own top-1
        # predictions are the labels, `gradient_stats`) and to a causal LM (its text).
        self_labelled = self.data_scores or language_model(model)
        if data is not None and data.y is None and not self_labelled:
            if self.strict and self.needs_gradients():
                # A batch run that asked for them: say why there are none, before the plan
                # fails on "needs gradient statistics" with data that was given.
                raise DataError(
                    "the data has no labels ('y') and the model's outputs are not class "
                    "scores, so the gradient criteria have no loss to differentiate",
                    path=self.data_name or None,
                    hint="add integer labels 'y' to the data (a classifier), or prune by "
                    "magnitude or channel norm",
                )
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

    # ------------------------------------------------------------------ sensitivity
    def _forget_scan(self) -> None:
        """A new model or data set: the scan, the pins and the solver tables are stale."""
        had = self.sensitivity is not None or bool(self.pins)
        self.sensitivity, self.solution, self._problem = None, None, None
        self._tables = None
        self.pins = frozenset()
        if had:
            self._emit("scan_ready", None)
            self._emit("pins_changed", self.pins)

    def scan(
        self,
        *,
        method: str = "magnitude",
        levels: Sequence[Any] | None = None,
        max_samples: int | None = None,
        cache: bool = True,
        cache_dir: str | Path | None = None,
    ) -> Job:
        """Per-layer sensitivity (`core.planning.sensitivity.scan`) on the held-out split, as
        ``workbench scan`` measures it; a data-free estimate (`proxy_scan`) without data or a
        forward pass. A repeated scan of the same model, data and grid reads the disk cache."""

        model, stats = self.model, self.stats
        if model is None or stats is None:
            raise WorkbenchError("wait until the model is analysed, then scan it")
        data = self.test if model.can_run else None
        samples = MAX_SAMPLES if max_samples is None else int(max_samples)
        plan, pins = self.plan, self.pins

        def fn(progress: ProgressFn, cancel: CancelToken):

            result = scan(
                model,
                stats,
                data,
                method=method,
                levels=levels,
                max_samples=samples,
                cache=cache,
                cache_dir=cache_dir,
                progress=scaled(progress, 0, 0.8),
                cancel=cancel,
            )
            # The solver's tables and the predicted frontier, here rather than on the first
            # target step (a second or two for hundreds of layers).
            progress(0.8, "building the solver's option tables")
            scanned = {c.name for c in result.layers}
            pinned = {n: plan.config_for(n) for n in sorted(pins) if n in scanned}
            tables = build_problem(stats, result)
            cancel.check()
            prepared = _prepare_problem(
                stats, result, tables, pinned, plan, scaled(progress, 0.9, 1.0), cancel
            )
            return result, ((result, stats), tables), prepared

        def done(payload: Any) -> None:
            result, tables, prepared = payload
            self.sensitivity, self.solution, self._problem = result, None, prepared
            self._tables = tables
            # Pins of layers the scan does not cover (not prunable) mean nothing to the solver
            # (the tables for the pins left are derived on the next use).
            scanned = {c.name for c in result.layers}
            if not self.pins <= scanned:
                self._change_pins(self.pins & scanned)
            self._emit("scan_ready", result)

        what = "Scanning layer sensitivity" if data is not None else "Estimating sensitivity"
        return self._job("scan", what, fn, done)

    def set_pins(self, names: Sequence[str]) -> Job | None:
        """Layers whose current settings the solver keeps (`plan_to_target` plans around
        them). Unknown names are refused.

        With a scan, a change returns the job (kind ``"pins"``) that prepares the solver for
        the new pins off the owner's thread: the problem is the per-layer option tables
        (`_tables`, built once per scan) without the pinned layers' rows, then the smallest
        plan (the target control's reach) and the live path's sizes (`quick_plan`'s memo);
        the predicted frontier for the new pins is a job of its own (`frontier_job`), so a
        target step need not wait for it. A newer pin change supersedes both. The window runs it in a worker; a caller that does not run it loses
        nothing: the next target step derives the same problem itself. None when the pins
        did not change or there is no scan.
        """
        pins = frozenset(names)
        unknown = sorted(n for n in pins if self.layers and n not in self.layer_names)
        if unknown:
            raise RecipeError(
                f"pin: the model has no layer {unknown[0]!r}",
                hint="`workbench inspect MODEL` lists the layer names",
            )
        if pins == self.pins:
            return None
        # The job first, so that `busy("pins")` holds while "pins_changed" is handled.
        job = self._pins_job(pins)
        self._change_pins(pins)
        return job

    def _change_pins(self, pins: frozenset[str]) -> None:
        self.pins = pins
        self._emit("pins_changed", pins)

    def _pins_job(self, pins: frozenset[str]) -> Job | None:
        """The job that prepares the solver's problem for ``pins`` (see `set_pins`)."""
        scan, stats, plan = self.sensitivity, self.stats, self.plan
        if scan is None or stats is None:
            return None
        pinned = {n: plan.config_for(n) for n in sorted(pins)}
        tables = self._tables if self._tables_current() else None

        def fn(progress: ProgressFn, cancel: CancelToken):
            full = tables
            if full is None:  # a new analysis since the scan: the previews once more
                progress(0.0, "building the solver's option tables")
                full = ((scan, stats), build_problem(stats, scan))
                cancel.check()
            prepared = _prepare_problem(
                stats, scan, full[1], pinned, plan, progress, cancel, frontier=False
            )
            return full, prepared

        def done(payload: Any) -> None:
            full, prepared = payload
            if full[0][0] is self.sensitivity and full[0][1] is self.stats:
                self._tables, self._problem = full, prepared
            # else a scan came in meanwhile: its tables stand, the next use derives the
            # problem for these pins from them
            self._emit("solver_ready", self.target_range())

        what = f"Re-planning around {len(pins)} pinned layer(s)" if pins else "Unpinning layers"
        return self._job("pins", what, fn, done)

    def _tables_current(self) -> bool:
        """Whether `_tables` were built from the current scan and statistics (identity)."""
        key = self._tables[0] if self._tables is not None else None
        return key is not None and key[0] is self.sensitivity and key[1] is self.stats

    def _solver_problem(self, pinned: dict[str, LayerConfig]) -> Any:
        """The solver's option tables for the current scan, statistics and pins, and their
        memo: the `_tables` rows of the layers not pinned (`_pinned_problem`; the per-layer
        tables are built once per scan and statistics, one `core.analysis.estimate.preview`
        per level; a pin change only drops or restores rows). Prepared by the scan and pins
        jobs; derived here (on the caller's thread) when those did not run."""

        pins = tuple(sorted(pinned.items()))
        old = self._problem[0] if self._problem is not None else None
        # The same scan and statistics objects (identity: a new analysis is a new object).
        if (
            old is None
            or old[0] is not self.sensitivity
            or old[1] is not self.stats
            or old[2] != pins
        ):
            if not self._tables_current():
                self._tables = (
                    (self.sensitivity, self.stats),
                    build_problem(self.stats, self.sensitivity),
                )
            problem = _pinned_problem(self.stats, self._tables[1], pinned)
            # memo: what `core.planning.solver.quick_plan` learns about this problem (configs,
            # sizes), the reach (`target_range`) and the predicted frontier.
            self._problem = ((self.sensitivity, self.stats, pins), (problem, {}))
        return self._problem[1]

    def plan_to_target(
        self,
        target: Any,
        pins: Sequence[str] | None = None,
        *,
        merge: bool = False,
        exact: bool = False,
        verify: bool = True,
    ) -> Any:
        """Re-solve the per-layer plan for ``target`` (`core.planning.solver.Target`) from the cached
        scan and make it the plan as one `SolvedPlan` edit (undoable); returns the
        `core.planning.solver.Solution`.

        ``pins`` (default: `pins`) are layers whose current settings stay as they are.
        ``merge``: one step of a drag (consecutive steps form one undo step). The default is
        the live path (`core.planning.solver.quick_plan`: grid levels, the archive size checked with a
        preview); ``verify=False`` skips that check (a drag step: the size is predicted from
        the last checked plan; the release verifies); ``exact`` runs
        `core.planning.solver.plan_for_target` with its continuous sparsity fill.
        Raises `WorkbenchError` without a scan and `CompressionError` when the target is out
        of reach (the message names the smallest reachable size).
        """

        if self.sensitivity is None or self.stats is None:
            raise WorkbenchError("scan the model first (Scan sensitivity)")
        if pins is not None:
            job = self.set_pins(pins)
            if job is not None:
                self.run(job)
        pinned = {n: self.plan.config_for(n) for n in sorted(self.pins)}
        problem, memo = self._solver_problem(pinned)
        if exact:
            sol = plan_for_target(
                self.stats, self.sensitivity, target, base=self.plan, problem=problem
            )
        else:
            sol = quick_plan(
                self.stats,
                self.sensitivity,
                target,
                problem=problem,
                base=self.plan,
                memo=memo,
                verify=verify,
            )
        edit = SolvedPlan(
            plan=sol.plan,
            target=tuple(target.to_dict().items()),
            pinned=tuple(sorted(self.pins)),
        )
        self.solution = sol
        self.edit(edit, merge=merge)
        self._emit("solved", sol)
        return sol

    def target_configs(self) -> list[LayerConfig]:
        """The settings a target plan gives the layers (one per scanned level) for the
        current scan and pins, once the solver's tables for them are built (else ``[]``:
        nothing is built here). The window warms its preview cache with them."""
        key = None if self._problem is None else self._problem[0]
        if key is None or key[0] is not self.sensitivity or key[1] is not self.stats:
            return []
        problem, memo = self._problem[1]
        return level_configs(problem, memo)

    def frontier(self, points: int = 12) -> list[Any]:
        """The solver's predicted size/damage trade-off for the current scan and pins
        (`core.planning.solver.frontier`, grid levels only as in `plan_to_target`)."""

        if self.sensitivity is None or self.stats is None:
            return []
        pinned = {n: self.plan.config_for(n) for n in sorted(self.pins)}
        problem, memo = self._solver_problem(pinned)
        return quick_frontier(
            self.stats, self.sensitivity, problem, points=points, base=self.plan, memo=memo
        )

    def frontier_points(self) -> list[dict[str, Any]]:
        """The predicted frontier in the run history's units (`_frontier_points`; computed
        once per scan and pins, by the scan job for the pins it started with)."""
        if self.sensitivity is None or self.stats is None:
            return []
        pinned = {n: self.plan.config_for(n) for n in sorted(self.pins)}
        problem, memo = self._solver_problem(pinned)
        if "frontier_error" in memo:
            raise memo["frontier_error"]
        return _frontier_points(self.stats, self.sensitivity, problem, memo, self.plan)

    def frontier_job(self) -> Job | None:
        """`frontier_points` for the current scan and pins as a job (kind ``"frontier"``;
        on its own copy of the live path's memo, so target steps go on meanwhile); its
        ``done`` keeps the points for `frontier_points` and emits ``"frontier_ready"`` (the
        points, None when the prediction failed). None when they are known already or there
        is no scan."""
        if self.sensitivity is None or self.stats is None:
            return None
        pinned = {n: self.plan.config_for(n) for n in sorted(self.pins)}
        problem, memo = self._solver_problem(pinned)
        if "frontier_points" in memo or "frontier_error" in memo:
            return None
        stats, scan, plan, scratch = self.stats, self.sensitivity, self.plan, dict(memo)

        def fn(progress: ProgressFn, cancel: CancelToken):
            progress(0.0, "predicting the size/damage frontier")
            try:
                return _frontier_points(stats, scan, problem, scratch, plan), None
            except CompressionError as exc:
                return None, exc

        def done(payload: Any) -> None:
            points, error = payload
            if self._problem is None or self._problem[1][0] is not problem:
                return  # the pins or the scan changed meanwhile: a newer job predicts
            key = "frontier_points" if error is None else "frontier_error"
            self._problem[1][1][key] = points if error is None else error
            self._emit("frontier_ready", points)

        return self._job("frontier", "Predicting the size/damage frontier", fn, done)

    def target_range(self) -> tuple[int, int] | None:
        """``(dense fp32 bytes, smallest archive bytes the scanned levels allow)`` for the
        current scan and pins (the span of the target-size control); None without a scan."""

        if self.sensitivity is None or self.stats is None:
            return None
        pinned = {n: self.plan.config_for(n) for n in sorted(self.pins)}
        problem, memo = self._solver_problem(pinned)
        if "range" not in memo:
            memo["range"] = (problem.dense_bytes, smallest_plan(self.stats, problem)[1])
        return memo["range"]

    def _recovery_plan(self) -> CompressionPlan:
        """The plan to run: recovery dropped (lenient) or refused (strict) without data."""
        plan = self.plan
        if plan.recovery.epochs == 0:
            return plan
        if self.model is not None and not self.model.can_run:
            if self.strict:
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
            require_forward(self.model, "fine-tuning")

    def compress(self, *, after_histograms: bool = False) -> Job:
        """Apply the plan to a copy, with the recovery it asks for (`compress_and_finetune`
        on the `recovery_split` of the training data: the same numbers in every front end)."""

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
        price: float | None = None,
        concurrency: int = 1,
    ) -> Job:
        """Write the result in ``formats`` plus recipe and report, as one complete directory
        (`core.export.outputs.write_outputs`, which runs the deployed check of every written file).

        With a chosen device (`set_device`) and/or an instance ``price`` (USD per hour,
        ``concurrency`` batches in flight) the report gains the ``device`` / ``cost`` blocks
        the CLI writes for ``--device`` / ``--instance-price``; they are also kept in
        `export_targets` for the window, report or not.
        """

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
        profile = self.device
        sample = data.x if data is not None else result.original.example_input
        if price is not None and not (price >= 0 and concurrency >= 1):
            raise RecipeError(
                f"instance price {price} / concurrency {concurrency}: need a price >= 0 (USD "
                "per hour) and a concurrency >= 1"
            )
        targets: dict[str, Any] = {}

        def blocks(records: list[Any]) -> dict[str, Any]:
            # The same blocks as `workbench compress --device/--instance-price`.
            if not targets:
                if profile is not None:
                    targets["device"] = device_block(profile, result, records, sample)
                if price is not None:
                    targets["cost"] = cost_block(price, evals, records, concurrency=concurrency)
            return dict(targets)

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
                report_extra=blocks,
                progress=progress,
                cancel=cancel,
            )
            blocks(records)  # computed once: in the report, or here without one
            progress(1.0, "exported")
            return records

        def done(records: Any) -> None:
            self.export_targets = dict(targets)
            self.exports = list(records)
            self._emit("export_targets", self.export_targets)
            self._emit("exported", self.exports)
            self.notice(f"Exported {len(self.exports)} file(s).")
            for rec in self.exports:
                warning = (rec.deployed or {}).get("warning")
                if warning:
                    self.notice(f"warning: {warning}")

        return self._job("export", f"Exporting to {out_dir}", fn, done)

    def recheck_exports(self) -> Job:
        """Run the deployed check (`core.export.deploy.check_records`) again on the files of the last
        export as they are on disk now (e.g. after a file was converted or edited by hand)."""

        result, records, data = self.result, list(self.exports), self.test
        if result is None or not records:
            raise WorkbenchError("export the model first, then check the exported files")
        gone = [r.path for r in records if not Path(r.path).is_file()]
        if gone:
            raise ExportError(
                "the exported file is no longer there", path=gone[0], hint="export again"
            )

        def fn(progress: ProgressFn, cancel: CancelToken):
            checked, _ = check_records(records, result, data, progress=progress, cancel=cancel)
            progress(1.0, "checked")
            return checked

        def done(checked: Any) -> None:
            self.exports = list(checked)
            self._emit("exported", self.exports)
            flagged = [r for r in self.exports if (r.deployed or {}).get("deployed_mismatch")]
            self.notice(
                f"Checked {len(self.exports)} exported file(s): {len(flagged)} flagged."
                if flagged
                else f"Checked {len(self.exports)} exported file(s): all match the simulation."
            )

        return self._job("export", "Checking the exported files", fn, done)

    def ensemble(self, run_ids: Sequence[int]) -> Job:
        """Build an ensemble of the plans of the runs ``run_ids`` (`core.recovery.ensemble.
        ensemble_of_plans`) and record it as a run of kind ``"ensemble"`` whose payload is the
        members' total and whose accuracy is the averaged prediction's."""

        by_id = {r.id: r for r in self.runs}
        missing = [i for i in run_ids if i not in by_id]
        if missing:
            raise WorkbenchError(f"no run {missing[0]} in the history")
        if self.model is None or self.stats is None:
            raise WorkbenchError("wait until the model is analysed")
        chosen = [by_id[i] for i in run_ids]
        plans = [self.checked_plan(r.plan, lenient=False) for r in chosen]
        ids = tuple(r.id for r in chosen)
        model, stats, train, test = self.model, self.stats, self.train, self.test
        if len(plans) < 2:
            raise RecipeError("an ensemble needs at least 2 runs", hint="select two or more runs")
        if test is None or not model.can_run:
            raise CompressionError(
                "an ensemble is scored on held-out data with a model that runs",
                path=model.source,
                hint="open data first",
            )

        def fn(progress: ProgressFn, cancel: CancelToken):
            start = time.perf_counter()
            out = ensemble_of_plans(
                model, plans, stats, train, test, progress=progress, cancel=cancel
            )
            return out, time.perf_counter() - start

        def done(payload: Any) -> None:
            out, seconds = payload
            ens, orig = out["ensemble"], out["original"]
            sparsities = [m["sparsity"] for m in out["members"]]
            record = RunRecord(
                id=next(self._run_ids),
                kind="ensemble",
                plan=plans[0],
                seconds=float(seconds),
                sparsity=sum(sparsities) / len(sparsities),
                payload_bytes=int(ens["payload_bytes"]),
                accuracy_before=orig["accuracy"],
                accuracy_after=ens["accuracy"],
                fidelity={} if ens["agreement"] is None else {"agreement": ens["agreement"]},
                data_name=self.data_name,
                members=ids,
            )
            self.runs.append(record)
            self._emit("run_recorded", record)
            self.notice(
                f"Ensemble of runs {' + '.join(map(str, ids))}: "
                f"{ens['payload_bytes']:,} B payload in total"
                + (
                    f", accuracy {100 * ens['accuracy']:.2f}%"
                    if ens["accuracy"] is not None
                    else ""
                )
            )

        what = f"Ensemble of runs {', '.join(map(str, ids))}"
        return self._job("ensemble", what, fn, done)


def _frontier_points(
    stats: Any, scan: Any, problem: Any, memo: dict[str, Any], base: CompressionPlan
) -> list[dict[str, Any]]:
    """`core.planning.solver.quick_frontier` (12 points) in the run history's units, cached in
    ``memo``: per point the compressed layers' payload bytes (as `RunRecord.payload_bytes`
    counts them), the archive bytes, the predicted accuracy drop (points; labelled scans),
    relative L2 error of the outputs (unlabelled scans: the square root of the summed error
    energy), cosine, and whether the curves are a data-free estimate."""

    if "frontier_points" not in memo:
        out = []
        for sol in quick_frontier(stats, scan, problem, points=12, base=base, memo=memo):
            p = sol.predicted
            payload = sum(lp.packed_bytes for lp in preview(stats, sol.plan).layers)
            out.append(
                {
                    "payload_bytes": int(payload),
                    "archive_bytes": p["bytes"],
                    "accuracy_drop": p["accuracy_drop"],
                    "rel_l2": (
                        None if scan.metric in ("loss", "lm_loss") else float(p["damage"]) ** 0.5
                    ),
                    "cosine": p["cosine"],
                    "estimate": scan.estimate,
                }
            )
        memo["frontier_points"] = out
    return list(memo["frontier_points"])


def _pinned_problem(stats: Any, full: Any, pinned: dict[str, LayerConfig]) -> Any:
    """``full`` (`core.planning.solver.build_problem` with nothing pinned) without the rows
    of the ``pinned`` layers: equal to ``build_problem(stats, scan, pinned=pinned)`` (a
    layer's row depends on that layer alone), without its one preview per level."""
    known = {layer.name for layer in stats.layers}
    for name in pinned:
        if name not in known:
            raise RecipeError(
                f"pinned layer {name!r}: the model has no layer of that name",
                hint="`workbench inspect MODEL` lists the layer names",
            )
    keep = [i for i, name in enumerate(full.names) if name not in pinned]
    return replace(
        full,
        names=tuple(full.names[i] for i in keep),
        cost=full.cost[keep],
        damage=full.damage[keep],
        acc_drop=full.acc_drop[keep],
        cos_loss=full.cos_loss[keep],
        pinned=dict(pinned),
    )


def _prepare_problem(
    stats: Any,
    scan: Any,
    full: Any,
    pinned: dict[str, LayerConfig],
    plan: CompressionPlan,
    progress: ProgressFn,
    cancel: CancelToken,
    *,
    frontier: bool = True,
) -> tuple[Any, tuple[Any, dict[str, Any]]]:
    """``(key, (problem, memo))`` for `Session._problem`: the problem for ``pinned``
    (`_pinned_problem`), its reach (``memo["range"]``, as `Session.target_range`), what the
    live path learns on its first step (`quick_plan` at the dense size: the smallest plan's
    archive, one preview) and, with ``frontier``, the predicted frontier
    (`_frontier_points`); for a worker (touches no session state)."""
    progress(0.1, "fitting the solver's tables to the pinned layers")
    problem = _pinned_problem(stats, full, pinned)
    memo: dict[str, Any] = {}
    progress(0.2, "sizing the smallest plan")
    memo["range"] = (problem.dense_bytes, smallest_plan(stats, problem)[1])
    cancel.check()
    # The first target step's preview, here instead of on the owner's thread.
    try:
        quick_plan(
            stats,
            scan,
            Target(bytes=problem.dense_bytes),
            problem=problem,
            base=plan,
            memo=memo,
            verify=False,
        )
    except CompressionError:
        pass  # not even the dense size is reachable (pins): the target steps will say so
    cancel.check()
    key = (scan, stats, tuple(sorted(pinned.items())))
    if not frontier:
        return key, (problem, memo)
    progress(0.4, "predicting the size/damage frontier")
    try:
        _frontier_points(stats, scan, problem, memo, plan)
    except CompressionError as exc:
        # (e.g. every scanned layer pinned: nothing left to trade) the tables stand;
        # `Session.frontier_points` reports it where the frontier is asked for.
        memo["frontier_error"] = exc
    cancel.check()
    return key, (problem, memo)


def _layer_sum(result: Any, key: str) -> int | None:
    """Sum of a per-layer byte count over the compressed layers (payload, not the archive)."""
    if result is None:
        return None
    return int(sum(getattr(r, key) for r in result.layers))


def _after_histograms(result: Any, stats: Any, cancel: CancelToken | None) -> dict[str, Any]:

    return after_histograms(result, stats, cancel)
