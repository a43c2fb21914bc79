"""Compression plans: frozen per-layer settings over a model-wide default, JSON recipe round-trip.

A recipe file looks like::

    {"version": 1,
     "default": {"prune": {"method": "magnitude", "mode": "sparsity", "sparsity": 0.9,
                           "scope": "layer"},
                 "quant": {"bits": 5, "symmetric": false, "per_channel": true},
                 "skip": false},
     "layers": {"fc3": {"prune": {"method": "magnitude", "sparsity": 0.7}, "quant": {"bits": 6}}},
     "recovery": {"epochs": 5, "distill": true, "temperature": 4.0, "alpha": 0.7}}

Missing keys take their defaults; unknown keys, wrong types and out-of-range values raise
`RecipeError` with the dotted path of the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from core.base.errors import RecipeError
from core.base.limits import MAX_RECIPE_BYTES, load_json
from core.base.methods import prune_method, prune_method_names, prune_methods, quantizers
from core.base.outdir import atomic_write

RECIPE_VERSION = 1

#: Pruning criteria, from the method registry (`core.base.methods`): the recipe spellings.
PRUNE_METHODS = tuple(m.name for m in prune_methods())
STRUCTURED_METHODS = prune_method_names(structured=True)
GRADIENT_METHODS = prune_method_names(needs_gradients=True)
#: Method -> the method whose score index it shares in `core.analysis.stats`.
SCORE_ALIASES = {m.name: m.score_alias for m in prune_methods() if m.score_alias}
PRUNE_MODES = ("sparsity", "threshold")
#: How a model-wide default's sparsity target is met: per layer, or one threshold pooled over
#: every layer that follows the default ("global"). Not to be confused with the *edit target*
#: of a session (selected layers vs whole model, `core.session`).
SCOPES = ("layer", "global")
MIN_BITS, MAX_BITS = 2, 16
#: Quantizers (rounding rules), from the method registry: the recipe spellings.
QUANT_METHODS = tuple(q.name for q in quantizers())
#: Allowed group sizes of group-wise scales (inputs per scale).
MIN_GROUP, MAX_GROUP = 4, 65536

#: One sentence per method, shown as tooltips and in `workbench compress --help`.
METHOD_HELP = {m.name: m.help for m in prune_methods()}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require(ok: bool, field_name: str, message: str, *, hint: str | None = None) -> None:
    """Raise `RecipeError` as ``"<field>: <message>"``; parsers prefix the rest of the path."""
    if not ok:
        raise RecipeError(f"{field_name}: {message}", hint=hint)


def _built(cls: type, where: str, **kw: Any) -> Any:
    """``cls(**kw)`` with a validation error re-raised under the field path ``where``."""
    try:
        return cls(**kw)
    except RecipeError as exc:
        raise RecipeError(f"{where}.{exc.reason}", hint=exc.hint) from None


@dataclass(frozen=True)
class PruneConfig:
    """How to prune one tensor.

    ``mode == "sparsity"``: prune the fraction ``sparsity`` of the tensor's scores (for channel
    methods: of its output channels). ``mode == "threshold"``: prune every weight whose score is
    strictly below ``threshold``. ``scope == "global"`` (default config only): one threshold is
    shared by every layer that uses the default, chosen so the pooled sparsity hits the target.
    ``n``/``m`` apply to ``method == "nm"`` (prune ``n`` of every ``m``).
    """

    method: str = "none"
    mode: str = "sparsity"
    sparsity: float = 0.0
    threshold: float = 0.0
    scope: str = "layer"
    n: int = 2
    m: int = 4

    def __post_init__(self) -> None:
        method = prune_method(self.method)
        _require(self.mode in PRUNE_MODES, "mode", f"{self.mode!r} is not one of {PRUNE_MODES}")
        _require(self.scope in SCOPES, "scope", f"{self.scope!r} is not one of {SCOPES}")
        _require(
            _is_real(self.sparsity) and 0.0 <= self.sparsity < 1.0,
            "sparsity",
            f"{self.sparsity!r} is out of range [0, 1)",
        )
        _require(
            _is_real(self.threshold) and 0.0 <= self.threshold,
            "threshold",
            f"{self.threshold!r} must be a finite number >= 0 (scores are non-negative)",
        )
        _require(
            _is_int(self.n) and _is_int(self.m) and 1 <= self.n < self.m <= 16,
            "n/m",
            f"need 1 <= n < m <= 16, got n={self.n!r}, m={self.m!r}",
        )
        _require(
            not (self.scope == "global" and method.layer_scope_only),
            "scope",
            f"'global' is not supported for method {self.method!r}",
        )

    @property
    def active(self) -> bool:
        if self.method == "none":
            return False
        if prune_method(self.method).semi_structured:
            return True
        if self.mode == "sparsity":
            return self.sparsity > 0.0
        return self.threshold > 0.0


@dataclass(frozen=True)
class QuantConfig:
    """Uniform affine quantization; ``bits=None`` means off (weights stay float32).

    ``bias_bits``: also quantize the layer's bias (per-tensor, same symmetry) to this width;
    ``None`` keeps it float32. Biases are few but in a tiny, heavily pruned model their raw
    float32 bytes can be a third of the archive.
    ``method``: the rounding rule from the quantizer registry (`core.base.methods`): ``"rtn"``
    (round to nearest) or ``"gptq"`` (column-wise with second-order error feedback, needs
    calibration data). ``group_size``: one scale/zero point per run of that many inputs of
    each output channel (`core.ops.quantization`); ``None`` for per-channel/per-tensor.
    ``bias_correction``: shift the layer's bias by the mean output change its weight error
    causes on calibration inputs (needs calibration data).
    """

    bits: int | None = None
    symmetric: bool = True
    per_channel: bool = False
    bias_bits: int | None = None
    method: str = "rtn"
    group_size: int | None = None
    bias_correction: bool = False

    def __post_init__(self) -> None:
        _require(
            isinstance(self.method, str) and self.method in QUANT_METHODS,
            "method",
            f"{self.method!r} is not one of {', '.join(QUANT_METHODS)}",
        )
        _require(
            self.group_size is None
            or (_is_int(self.group_size) and MIN_GROUP <= self.group_size <= MAX_GROUP),
            "group_size",
            f"{self.group_size!r} is out of range {MIN_GROUP}..{MAX_GROUP}",
            hint="typical values are 32, 64 or 128; use null for per-channel/per-tensor scales",
        )
        _require(
            self.group_size is None or self.per_channel is True,
            "group_size",
            "group-wise scales refine per-channel ones and need per_channel true",
            hint="set per_channel to true or group_size to null",
        )
        _require(
            isinstance(self.bias_correction, bool), "bias_correction", "expected true or false"
        )
        for name in ("bits", "bias_bits"):
            value = getattr(self, name)
            _require(
                value is None or (_is_int(value) and MIN_BITS <= value <= MAX_BITS),
                name,
                f"{value!r} is out of range {MIN_BITS}..{MAX_BITS}",
                hint="use null to switch it off",
            )
        for name in ("symmetric", "per_channel"):
            _require(isinstance(getattr(self, name), bool), name, "expected true or false")

    @property
    def active(self) -> bool:
        return self.bits is not None


@dataclass(frozen=True)
class LayerConfig:
    """Everything decided for one layer. ``skip`` leaves it untouched (dense float32)."""

    prune: PruneConfig = field(default_factory=PruneConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    skip: bool = False


@dataclass(frozen=True)
class RecoveryConfig:
    """Fine-tuning / distillation after compression (``epochs == 0`` means none).

    ``prune_steps > 1``: iterative compression (Han et al. 2015/2016): ``prune_steps - 1``
    pruning steps reach each layer's target sparsity (density shrinking geometrically), then
    a last step quantizes; ``epochs`` of fine-tuning follow every step.
    """

    epochs: int = 0
    # Measured on the digits demos: after one-shot 90% pruning, 10 epochs at 1e-3 (batch 64)
    # recover only to ~75-90% accuracy; 5e-3 with batch 32 (cosine decay) recovers to ~97%.
    lr: float = 5e-3
    batch_size: int = 32
    distill: bool = False
    temperature: float = 4.0
    alpha: float = 0.5
    prune_steps: int = 1

    def __post_init__(self) -> None:
        checks = (
            ("epochs", _is_int(self.epochs) and 0 <= self.epochs <= 10_000, "0..10000"),
            (
                "batch_size",
                _is_int(self.batch_size) and 1 <= self.batch_size <= 1_000_000,
                "1..1000000",
            ),
            ("lr", _is_real(self.lr) and 0.0 < self.lr <= 10.0, "(0, 10]"),
            (
                "temperature",
                _is_real(self.temperature) and 0.0 < self.temperature <= 100.0,
                "(0, 100]",
            ),
            ("alpha", _is_real(self.alpha) and 0.0 <= self.alpha <= 1.0, "[0, 1]"),
            ("prune_steps", _is_int(self.prune_steps) and 1 <= self.prune_steps <= 100, "1..100"),
        )
        for name, ok, allowed in checks:
            _require(ok, name, f"{getattr(self, name)!r} is out of range {allowed}")
        _require(isinstance(self.distill, bool), "distill", "expected true or false")


@dataclass(frozen=True)
class CompressionPlan:
    """A model-wide default plus per-layer overrides (each a whole `LayerConfig`).

    ``overrides`` is a sorted tuple of ``(layer_name, LayerConfig)`` pairs so the plan stays
    hashable and comparable; use `config_for`, `with_layer`, `without_layer`, `with_default`.
    ``remove_channels``: for channel methods on eager models, physically remove the pruned
    channels (and what depends on them) instead of only masking them.
    """

    default: LayerConfig = field(default_factory=LayerConfig)
    overrides: tuple[tuple[str, LayerConfig], ...] = ()
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    remove_channels: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "overrides", tuple(sorted(self.overrides, key=lambda kv: kv[0])))
        # lookups by name in O(1) (a planned model may override 10**5 layers); not a field,
        # so equality, hashing and `dataclasses.replace` ignore it
        object.__setattr__(self, "_by_name", dict(self.overrides))

    # -- queries -------------------------------------------------------------------------
    @property
    def layer_overrides(self) -> dict[str, LayerConfig]:
        return dict(self._by_name)

    def config_for(self, layer: str) -> LayerConfig:
        """Effective config of ``layer`` (its override, else the default)."""
        return self._by_name.get(layer, self.default)

    def is_global_member(self, layer: str) -> bool:
        """True when ``layer`` takes part in the default's global-scope pruning pool."""
        if layer in self._by_name:
            return False
        d = self.default
        return (not d.skip) and d.prune.active and d.prune.scope == "global"

    # -- edits (pure) --------------------------------------------------------------------
    def with_layer(self, layer: str, cfg: LayerConfig) -> CompressionPlan:
        rest = tuple((n, c) for n, c in self.overrides if n != layer)
        return replace(self, overrides=rest + ((layer, cfg),))

    def without_layer(self, layer: str) -> CompressionPlan:
        return replace(self, overrides=tuple((n, c) for n, c in self.overrides if n != layer))

    def with_default(self, cfg: LayerConfig) -> CompressionPlan:
        return replace(self, default=cfg)

    def with_recovery(self, recovery: RecoveryConfig) -> CompressionPlan:
        return replace(self, recovery=recovery)

    # -- JSON ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": RECIPE_VERSION,
            "default": asdict(self.default),
            "layers": {name: asdict(cfg) for name, cfg in self.overrides},
            "recovery": asdict(self.recovery),
            "remove_channels": self.remove_channels,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, data: Any) -> CompressionPlan:
        return _plan_from_dict(data)

    @classmethod
    def from_json(cls, text: str, *, path: str | Path | None = None) -> CompressionPlan:
        # Size, nesting and integer limits first: a recipe is small, anything huge is an error.
        data = load_json(
            text,
            what="the recipe",
            path=path,
            max_bytes=MAX_RECIPE_BYTES,
            error=RecipeError,
            hint="fix the syntax or re-save the recipe from the workbench",
        )
        try:
            return _plan_from_dict(data)
        except RecipeError as exc:
            if path is None:
                raise
            raise RecipeError(exc.reason, path=path, hint=exc.hint) from None

    def save(self, path: str | Path) -> None:
        """Write the recipe atomically (a uniquely named temporary file, then rename).

        Raises `core.base.errors.ExportError` when the file cannot be written.
        """

        atomic_write(Path(path), [(self.to_json() + "\n").encode("utf-8")], force=True)

    @classmethod
    def load(cls, path: str | Path) -> CompressionPlan:
        p = Path(path)
        if p.is_dir():
            raise RecipeError(
                "is a directory, not a recipe file", path=p, hint="pick the recipe's .json file"
            )
        if not p.is_file():
            raise RecipeError("recipe file not found", path=p, hint="check the path")
        size = p.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise RecipeError(
                f"the file is {size:,} bytes; a recipe is at most {MAX_RECIPE_BYTES:,}",
                path=p,
                hint="pass the recipe JSON written by the workbench, not a model or data file",
            )
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise RecipeError("not a text file", path=p, hint="a recipe is a JSON file") from None
        return cls.from_json(text, path=p)


# ---------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------
def _require_mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise RecipeError(f"{where}: expected an object, got {type(value).__name__}")
    return value


def _check_keys(data: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise RecipeError(
            f"{where}.{unknown[0]}: unknown key",
            hint=f"allowed keys here: {', '.join(sorted(allowed))}",
        )


def _typed(value: Any, kind: type, where: str) -> Any:
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RecipeError(f"{where}: expected a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise RecipeError(f"{where}: must be finite, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where}: expected an integer, got {value!r}")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: expected true or false, got {value!r}")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(kind)


def _choice(value: Any, choices: tuple[str, ...], where: str) -> str:
    value = _typed(value, str, where)
    if value not in choices:
        raise RecipeError(f"{where}: {value!r} is not one of {', '.join(choices)}")
    return value


def _prune_from(data: Any, where: str, *, is_default: bool) -> PruneConfig:
    data = _require_mapping(data, where)
    _check_keys(data, {f.name for f in fields(PruneConfig)}, where)
    kw: dict[str, Any] = {}
    for key in ("method", "mode", "scope"):
        if key in data:
            kw[key] = _typed(data[key], str, f"{where}.{key}")
    if "method" in kw and kw["method"] not in PRUNE_METHODS:
        raise RecipeError(
            f"{where}.method: {kw['method']!r} is not one of {', '.join(PRUNE_METHODS)}"
        )
    for key in ("sparsity", "threshold"):
        if key in data:
            kw[key] = _typed(data[key], float, f"{where}.{key}")
    for key in ("n", "m"):
        if key in data:
            kw[key] = _typed(data[key], int, f"{where}.{key}")
    cfg = _built(PruneConfig, where, **kw)
    if cfg.scope == "global" and not is_default:
        raise RecipeError(
            f"{where}.scope: 'global' is only valid in the default config",
            hint="per-layer overrides always prune within their own layer",
        )
    return cfg


def _quant_from(data: Any, where: str) -> QuantConfig:
    data = _require_mapping(data, where)
    _check_keys(data, {f.name for f in fields(QuantConfig)}, where)
    kw: dict[str, Any] = {}
    for key in ("bits", "bias_bits"):
        if key in data:
            kw[key] = None if data[key] is None else _typed(data[key], int, f"{where}.{key}")
    for key in ("symmetric", "per_channel", "bias_correction"):
        if key in data:
            kw[key] = _typed(data[key], bool, f"{where}.{key}")
    if "method" in data:
        kw["method"] = _typed(data["method"], str, f"{where}.method")
    if "group_size" in data:
        g = data["group_size"]
        kw["group_size"] = None if g is None else _typed(g, int, f"{where}.group_size")
    return _built(QuantConfig, where, **kw)


def _layer_from(data: Any, where: str, *, is_default: bool) -> LayerConfig:
    data = _require_mapping(data, where)
    _check_keys(data, {"prune", "quant", "skip"}, where)
    prune = _prune_from(data.get("prune", {}), f"{where}.prune", is_default=is_default)
    quant = _quant_from(data.get("quant", {}), f"{where}.quant")
    skip = _typed(data.get("skip", False), bool, f"{where}.skip")
    return LayerConfig(prune=prune, quant=quant, skip=skip)


def _recovery_from(data: Any, where: str) -> RecoveryConfig:
    data = _require_mapping(data, where)
    _check_keys(data, {f.name for f in fields(RecoveryConfig)}, where)
    kinds = {"epochs": int, "batch_size": int, "prune_steps": int, "distill": bool}
    kw = {
        f.name: _typed(data[f.name], kinds.get(f.name, float), f"{where}.{f.name}")
        for f in fields(RecoveryConfig)
        if f.name in data
    }
    return _built(RecoveryConfig, where, **kw)


def _plan_from_dict(data: Any) -> CompressionPlan:
    data = _require_mapping(data, "recipe")
    _check_keys(data, {"version", "default", "layers", "recovery", "remove_channels"}, "recipe")
    version = data.get("version", RECIPE_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version != RECIPE_VERSION:
        raise RecipeError(
            f"recipe.version: {version!r} is not supported",
            hint=f"this workbench reads recipe version {RECIPE_VERSION}",
        )
    default = _layer_from(data.get("default", {}), "default", is_default=True)
    layers_raw = _require_mapping(data.get("layers", {}), "layers")
    overrides = []
    for name, cfg in layers_raw.items():
        if not isinstance(name, str) or not name:
            raise RecipeError(f"layers: layer names must be non-empty strings, got {name!r}")
        overrides.append((name, _layer_from(cfg, f"layers.{name}", is_default=False)))
    recovery = _recovery_from(data.get("recovery", {}), "recovery")
    remove = _typed(data.get("remove_channels", False), bool, "recipe.remove_channels")
    return CompressionPlan(
        default=default, overrides=tuple(overrides), recovery=recovery, remove_channels=remove
    )


#: The defaults every front end starts from (`starting_plan`, `simple_plan`): one magnitude
#: threshold pooled over the model, asymmetric per-channel scales. Chosen by measurement
#: (one-shot, demo MLP and CNN at 80%/6, 90%/4 and 70%/3 bits): a global pool beat per-layer
#: targets in every case (e.g. CNN 70%/3: 69.4% vs 36.5% accuracy), asymmetric per-channel
#: scales were best or within a point except where their extra scale bytes matter on tiny
#: layers. Before, the window started per-layer/symmetric/per-tensor and the CLI like this.
DEFAULT_SCOPE = "global"
DEFAULT_SYMMETRIC = False
DEFAULT_PER_CHANNEL = True


def starting_plan() -> CompressionPlan:
    """An empty plan (nothing compressed) whose untouched settings are the shared defaults,
    so the first slider move in the window means what ``--sparsity``/``--bits`` mean."""
    return CompressionPlan(
        default=LayerConfig(
            prune=PruneConfig(scope=DEFAULT_SCOPE),
            quant=QuantConfig(symmetric=DEFAULT_SYMMETRIC, per_channel=DEFAULT_PER_CHANNEL),
        )
    )


def simple_plan(
    sparsity: float = 0.0,
    bits: int | None = None,
    method: str = "magnitude",
    *,
    scope: str = DEFAULT_SCOPE,
    symmetric: bool = DEFAULT_SYMMETRIC,
    per_channel: bool = DEFAULT_PER_CHANNEL,
) -> CompressionPlan:
    """The plan behind ``workbench compress --sparsity S --bits B --method M``.

    ``sparsity`` is the target fraction of zeros over all prunable weights (global scope for
    unstructured methods; per layer for channel and N:M methods, where it is implied).
    """
    semi = prune_method(method).semi_structured
    if method in STRUCTURED_METHODS or semi:
        scope = "layer"
    prune = PruneConfig(
        method=method if (sparsity > 0 or semi) else "none",
        mode="sparsity",
        sparsity=sparsity,
        scope=scope,
    )
    data = {
        "default": {
            "prune": asdict(prune),
            "quant": {"bits": bits, "symmetric": symmetric, "per_channel": per_channel},
        }
    }
    return _plan_from_dict(data)
