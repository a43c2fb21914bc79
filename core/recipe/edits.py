"""Plan edits as data: small frozen objects applied to a `CompressionPlan` by one pure function.

Every change a front end makes to a plan (a slider step, a menu choice, a recipe loaded, a
layer reset) is one of these objects. Because they are values they can be undone, merged
(consecutive steps of one drag share a ``merge_key``), recorded in a history, written to JSON
and replayed on another session or model::

    plan = apply_edit(plan, SetPruneTarget(layers=("fc1",), mode="sparsity", value=0.8))

``layers == ()`` means *the whole model*: the default and every per-layer override get the
change (so moving the bit-width slider sets every layer's width while their other differences
remain), and the output-layer protection is kept in step. A non-empty ``layers`` gives each
named layer an override derived from its own effective config.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

from core.base.errors import RecipeError
from core.base.methods import prune_method
from core.recipe.plan import (
    CompressionPlan,
    LayerConfig,
    PruneConfig,
    QuantConfig,
    RecoveryConfig,
)

#: Sentinel for "leave this field as it is" (``None`` is a real value: bits=None means off).
KEEP: Any = "__keep__"


@dataclass(frozen=True)
class Edit:
    """Base class: ``layers`` names the layers the edit applies to (``()`` = whole model)."""

    layers: tuple[str, ...] = ()
    kind: ClassVar[str] = "edit"

    def change(self, cfg: LayerConfig) -> LayerConfig:  # pragma: no cover - abstract
        raise NotImplementedError

    def merge_key(self) -> str | None:
        """Edits with equal non-None keys that follow each other collapse into one undo step."""
        return None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"edit": self.kind}
        for f in fields(self):
            value = getattr(self, f.name)
            if value == KEEP:
                continue
            if isinstance(value, tuple):
                value = list(value)
            elif hasattr(value, "to_dict"):
                value = value.to_dict()
            elif isinstance(value, RecoveryConfig):
                value = {g.name: getattr(value, g.name) for g in fields(value)}
            out[f.name] = value
        return out


def _set(obj: Any, **values: Any) -> Any:
    changed = {k: v for k, v in values.items() if v != KEEP}
    return replace(obj, **changed) if changed else obj


@dataclass(frozen=True)
class SetPruneTarget(Edit):
    """Set the sparsity (``mode="sparsity"``) or threshold (``mode="threshold"``) of the
    targeted layers; starts magnitude pruning where no method is chosen yet. One drag of the
    sparsity slider or the threshold line is a run of these with the same merge key."""

    mode: str = "sparsity"
    value: float = 0.0
    kind: ClassVar[str] = "set_prune_target"

    def __post_init__(self) -> None:
        if self.mode not in ("sparsity", "threshold"):
            raise RecipeError(f"mode: must be 'sparsity' or 'threshold', not {self.mode!r}")

    def change(self, cfg: LayerConfig) -> LayerConfig:
        method = cfg.prune.method if cfg.prune.method != "none" else "magnitude"
        field = "sparsity" if self.mode == "sparsity" else "threshold"
        return replace(
            cfg, prune=replace(cfg.prune, method=method, mode=self.mode, **{field: self.value})
        )

    def merge_key(self) -> str | None:
        return f"target:{self.mode}:{','.join(self.layers)}"


@dataclass(frozen=True)
class SetPrune(Edit):
    """Set any of the pruning fields (method, mode, sparsity, threshold, scope, n, m)."""

    method: Any = KEEP
    mode: Any = KEEP
    sparsity: Any = KEEP
    threshold: Any = KEEP
    scope: Any = KEEP
    n: Any = KEEP
    m: Any = KEEP
    kind: ClassVar[str] = "set_prune"

    def change(self, cfg: LayerConfig) -> LayerConfig:
        scope = self.scope
        if self.method != KEEP and prune_method(self.method).layer_scope_only:
            # Channel and N:M methods cannot pool layers: switching to one drops "global".
            scope = "layer"
        p = _set(
            cfg.prune,
            method=self.method,
            mode=self.mode,
            sparsity=self.sparsity,
            threshold=self.threshold,
            scope=scope,
            n=self.n,
            m=self.m,
        )
        return replace(cfg, prune=p)


@dataclass(frozen=True)
class SetQuant(Edit):
    """Set any of the quantization fields (``bits=None`` turns quantization off).

    Group-wise scales refine per-channel ones: choosing a group size turns per-channel on, and
    turning per-channel off drops the group size (so the result is always a valid config).
    """

    bits: Any = KEEP
    symmetric: Any = KEEP
    per_channel: Any = KEEP
    bias_bits: Any = KEEP
    method: Any = KEEP
    group_size: Any = KEEP
    bias_correction: Any = KEEP
    kind: ClassVar[str] = "set_quant"

    def change(self, cfg: LayerConfig) -> LayerConfig:
        per_channel, group_size = self.per_channel, self.group_size
        if group_size not in (KEEP, None):
            per_channel = True
        elif per_channel is False:
            group_size = None
        q = _set(
            cfg.quant,
            bits=self.bits,
            symmetric=self.symmetric,
            per_channel=per_channel,
            bias_bits=self.bias_bits,
            method=self.method,
            group_size=group_size,
            bias_correction=self.bias_correction,
        )
        return replace(cfg, quant=q)

    def merge_key(self) -> str | None:
        # Dragging the bit-width slider is one step, like the sparsity slider.
        others = (
            "symmetric",
            "per_channel",
            "bias_bits",
            "method",
            "group_size",
            "bias_correction",
        )
        only_bits = all(getattr(self, f) == KEEP for f in others)
        return f"bits:{','.join(self.layers)}" if only_bits and self.bits != KEEP else None


@dataclass(frozen=True)
class SetSkip(Edit):
    """Leave the targeted layers untouched (dense float32) or compress them again."""

    skip: bool = True
    kind: ClassVar[str] = "set_skip"

    def change(self, cfg: LayerConfig) -> LayerConfig:
        return replace(cfg, skip=bool(self.skip))


@dataclass(frozen=True)
class ResetLayers(Edit):
    """Drop the named layers' own settings so they follow the model-wide default again."""

    kind: ClassVar[str] = "reset_layers"

    def change(self, cfg: LayerConfig) -> LayerConfig:
        return cfg


@dataclass(frozen=True)
class SetRecovery(Edit):
    """Replace the plan's recovery (fine-tuning/distillation) settings."""

    recovery: RecoveryConfig = RecoveryConfig()
    kind: ClassVar[str] = "set_recovery"

    def change(self, cfg: LayerConfig) -> LayerConfig:
        return cfg


@dataclass(frozen=True)
class ReplacePlan(Edit):
    """Make ``plan`` the plan (a recipe loaded, a run restored)."""

    plan: CompressionPlan = CompressionPlan()
    kind: ClassVar[str] = "replace_plan"

    def change(self, cfg: LayerConfig) -> LayerConfig:
        return cfg


@dataclass(frozen=True)
class SolvedPlan(ReplacePlan):
    """Make the budget solver's ``plan`` the plan (`core.session.Session.plan_to_target`).

    Records what was asked (``target``: `core.planning.solver.Target.to_dict` items as pairs) and the
    layers kept fixed (``pinned``). The steps of one target-slider drag share a merge key, so
    a drag is one undo step like any other slider's.
    """

    target: tuple[tuple[str, Any], ...] = ()
    pinned: tuple[str, ...] = ()
    kind: ClassVar[str] = "solved_plan"

    def merge_key(self) -> str | None:
        return "solve"


EDIT_TYPES: dict[str, type[Edit]] = {
    cls.kind: cls
    for cls in (
        SetPruneTarget,
        SetPrune,
        SetQuant,
        SetSkip,
        ResetLayers,
        SetRecovery,
        ReplacePlan,
        SolvedPlan,
    )
}


def edit_from_dict(data: Any) -> Edit:
    """Rebuild an edit written by `Edit.to_dict` (raises `RecipeError` naming the field)."""
    if not isinstance(data, dict) or data.get("edit") not in EDIT_TYPES:
        raise RecipeError(f"edit: expected an object with 'edit' in {sorted(EDIT_TYPES)}")
    cls = EDIT_TYPES[data["edit"]]
    allowed = {f.name for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key == "edit":
            continue
        if key not in allowed:
            raise RecipeError(f"edit.{key}: unknown field of {cls.kind}")
        if key == "layers":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise RecipeError("edit.layers: expected a list of layer names")
            value = tuple(value)
        elif key == "plan":
            value = CompressionPlan.from_dict(value)
        elif key in ("target", "pinned"):
            if not isinstance(value, list):
                raise RecipeError(f"edit.{key}: expected a list")
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        elif key == "recovery":
            value = CompressionPlan.from_dict({"recovery": value}).recovery
        kwargs[key] = value
    return cls(**kwargs)


# --------------------------------------------------------------------------- the one rule set


def protected(default: LayerConfig) -> LayerConfig:
    """The output layer's exemption: the default's settings without pruning."""
    return replace(default, prune=PruneConfig())


def _channel_pruning(cfg: LayerConfig) -> bool:
    return not cfg.skip and prune_method(cfg.prune.method).structured and cfg.prune.active


def protect_output(plan: CompressionPlan, output_layer: str | None) -> CompressionPlan:
    """``plan`` with the logits layer exempt from a model-wide channel method.

    Pruning whole rows of the layer that produces the logits deletes classes (a zero row can
    never win), which nobody asks for with a model-wide channel setting. The exemption is an
    explicit override (quantization kept) so the preview, the recipe and the result agree. A
    layer the plan already configures is left as it is.
    """
    if (
        output_layer is None
        or not _channel_pruning(plan.default)
        or output_layer in plan.layer_overrides
    ):
        return plan
    return plan.with_layer(output_layer, protected(plan.default))


def _layer_scoped(cfg: LayerConfig) -> LayerConfig:
    """Per-layer overrides cannot use the global pool: they prune within their own layer."""
    if cfg.prune.scope == "global":
        return replace(cfg, prune=replace(cfg.prune, scope="layer"))
    return cfg


def apply_edit(
    plan: CompressionPlan, edit: Edit, *, output_layer: str | None = None
) -> CompressionPlan:
    """The plan after ``edit`` (pure: ``plan`` is not changed).

    Parameters
    ----------
    plan
        The current plan.
    edit
        What to change and on which layers (``edit.layers == ()``: the whole model).
    output_layer
        The model's logits layer, kept out of model-wide channel pruning.
    """
    if isinstance(edit, ReplacePlan):
        return protect_output(edit.plan, output_layer)
    if isinstance(edit, SetRecovery):
        return plan.with_recovery(edit.recovery)
    if isinstance(edit, ResetLayers):
        for name in edit.layers:
            plan = plan.without_layer(name)
        return protect_output(plan, output_layer)
    if edit.layers:
        for name in edit.layers:
            plan = plan.with_layer(name, _layer_scoped(edit.change(plan.config_for(name))))
        return plan
    head = output_layer
    # The output layer's override is the automatic protection (not the user's own setting)
    # when it is exactly what `protect_output` would have made.
    auto = (
        head is not None
        and plan.layer_overrides.get(head) == protected(plan.default)
        and _channel_pruning(plan.default)
    )
    default = edit.change(plan.default)
    method = prune_method(default.prune.method)
    if method.layer_scope_only:
        default = replace(default, prune=replace(default.prune, scope="layer"))
    plan = plan.with_default(default)
    if auto:
        plan = plan.without_layer(head)
    for name, cfg in plan.overrides:
        plan = plan.with_layer(name, _layer_scoped(edit.change(cfg)))
    return protect_output(plan, head)


def replay(
    plan: CompressionPlan, edits: list[Edit] | tuple[Edit, ...], *, output_layer: str | None = None
) -> CompressionPlan:
    """``plan`` after every edit in order (a recorded history re-applied)."""
    for edit in edits:
        plan = apply_edit(plan, edit, output_layer=output_layer)
    return plan


# Quiet "imported but unused" for names that belong to this module's public vocabulary.
__all__ = [
    "KEEP",
    "Edit",
    "SetPruneTarget",
    "SetPrune",
    "SetQuant",
    "SetSkip",
    "ResetLayers",
    "SetRecovery",
    "ReplacePlan",
    "SolvedPlan",
    "EDIT_TYPES",
    "edit_from_dict",
    "apply_edit",
    "replay",
    "protect_output",
    "protected",
    "QuantConfig",
]
