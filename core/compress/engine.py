"""Apply a `CompressionPlan`: prune, optionally remove channels, quantize, measure.

`compress` works on a clone of the model; the caller's model is never touched, also when the
run is cancelled at any point. Thresholds and, for a target sparsity, exact per-layer counts
(`core.analysis.selection`) come from `core.analysis.estimate.pruning_targets` (what `core.analysis.estimate.preview` shows) and scores from `core.analysis.stats.score_tensor`,
the same functions the live preview uses, so the sparsity the user saw is exactly the sparsity
applied. Quantization runs after pruning with the keep mask, so
pruned weights stay exactly zero.

Why one module of this size: applying a plan (masks, quantization, channel removal) and
measuring what it did per layer are one step whose numbers the preview and the archive must
reproduce exactly.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from core.analysis.estimate import pruning_targets
from core.analysis.selection import count_mask
from core.analysis.stats import score_tensor
from core.base.errors import CompressionError
from core.base.memory import MappedPages, paged_forward
from core.base.methods import prune_method
from core.base.model import LayerInfo, LoadedModel
from core.base.progress import CancelToken, ProgressFn, no_progress
from core.compress import second_order
from core.evaluate import eval_mode, first_tensor
from core.io.model_io import clone_model
from core.ops.pruning import (
    channel_mask,
    nm_mask,
    output_modules,
    remove_channels_,
    threshold_mask,
)
from core.ops.quantization import QuantizedTensor, dequantize, quantize, quantize_stack
from core.packed import tensor_packed_bytes
from core.recipe.edits import protect_output
from core.recipe.plan import (
    GRADIENT_METHODS,
    SCORE_ALIASES,
    STRUCTURED_METHODS,
    CompressionPlan,
    LayerConfig,
)

#: Formats whose module is a plain eager ``nn.Module`` (channels can be removed physically).
EAGER_FORMATS = ("eager", "demo")


@dataclass(frozen=True)
class LayerReport:
    """What compression did to one layer, measured on the result.

    ``shape``/``numel`` are the tensor's current shape and size (smaller than the original's
    when channels were removed); ``original_numel`` is the size before. ``sparsity`` is
    ``1 - nnz / original_numel``. ``sqnr_db`` compares the final weights with the original
    ones (pruning and quantization error together; removed weights count as error).
    ``dense_bytes`` is the original float32 size, ``packed_bytes`` the payload the packed
    archive spends on this tensor (`core.packed.tensor_packed_bytes`).
    """

    name: str
    tensor: str
    type: str
    shape: tuple[int, ...]
    numel: int
    nnz: int
    sparsity: float
    method: str
    threshold: float | None
    bits: int | None
    symmetric: bool
    per_channel: bool
    sqnr_db: float
    dense_bytes: int
    packed_bytes: int
    original_numel: int = 0
    skipped: bool = False

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["shape"] = list(self.shape)
        d["sqnr_db"] = None if not math.isfinite(self.sqnr_db) else self.sqnr_db
        return d


@dataclass(frozen=True)
class CompressionResult:
    """The compressed copy and everything needed to export and report it.

    ``masks`` and ``quantized`` are keyed by parameter name (``LayerInfo.tensor``); ``masks``
    holds the keep mask of every pruned tensor, ``quantized`` the codes of every quantized
    tensor (``dequantize(quantized[t])`` equals the compressed weight exactly), including
    biases when the plan sets ``bias_bits``.
    ``removed_channels``: layer -> kept output channel indices (original numbering) for every
    layer whose output channels were physically removed; empty otherwise.
    ``aligned_original``: for tensors whose shape changed, the original weights with the same
    rows/columns removed (used to measure error against the original).
    """

    original: LoadedModel
    compressed: LoadedModel
    plan: CompressionPlan
    masks: Mapping[str, torch.Tensor]
    quantized: Mapping[str, QuantizedTensor]
    layers: tuple[LayerReport, ...]
    removed_channels: Mapping[str, list[int]] = field(default_factory=dict)
    aligned_original: Mapping[str, torch.Tensor] = field(default_factory=dict, compare=False)

    @property
    def total_numel(self) -> int:
        """Weights of the compressed layers before compression."""
        return sum(r.original_numel for r in self.layers)

    @property
    def total_nnz(self) -> int:
        return sum(r.nnz for r in self.layers)

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over all prunable weights (removed weights count as zeros)."""
        n = self.total_numel
        return 1.0 - self.total_nnz / n if n else 0.0

    def layer(self, name: str) -> LayerReport:
        for r in self.layers:
            if r.name == name:
                return r
        raise KeyError(name)


# ---------------------------------------------------------------------------------------
# tensors by name
# ---------------------------------------------------------------------------------------
def named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers of ``module`` by full name (TorchScript and GraphModules too)."""
    out = dict(module.named_buffers())
    out.update(dict(module.named_parameters()))
    return out


def _tensor(tensors: Mapping[str, torch.Tensor], name: str, *, where: str) -> torch.Tensor:
    if name not in tensors:
        raise CompressionError(
            f"layer {where!r}: tensor {name!r} not found in the model",
            hint="the statistics were computed on a different model; analyze this one again",
        )
    return tensors[name]


def bias_name(layer: LayerInfo, tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The layer's bias: its other one-dimensional floating-point parameter, if any."""
    for name in layer.param_names:
        t = tensors.get(name)
        if name != layer.tensor and t is not None and t.ndim == 1 and t.is_floating_point():
            return name
    return None


# ---------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------
def _check_plan(loaded: LoadedModel, plan: CompressionPlan, stats) -> None:
    names = {layer.name for layer in stats.layers}
    unknown = sorted(set(plan.layer_overrides) - names)
    if unknown:
        raise CompressionError(
            f"the recipe configures layer {unknown[0]!r}, which this model does not have",
            hint=f"layers are: {', '.join(sorted(names)[:8])}{' ...' if len(names) > 8 else ''}",
        )
    for layer in stats.layers:
        cfg = plan.config_for(layer.name)
        if cfg.skip or not cfg.prune.active or not layer.prunable:
            continue
        method = cfg.prune.method
        ts = stats.tensors.get(layer.name)
        if method in GRADIENT_METHODS and (ts is None or ts.grad is None):
            raise CompressionError(
                f"layer {layer.name!r}: method {method!r} needs gradient statistics",
                hint="analyze the model with data (--data FILE) or use magnitude pruning",
            )
    if plan.remove_channels and _uses_channels(plan, stats.layers):
        if loaded.format not in EAGER_FORMATS or isinstance(
            loaded.module, torch.jit.ScriptModule | torch.fx.GraphModule
        ):
            raise CompressionError(
                f"channels can only be removed physically from eager PyTorch modules, not from "
                f"a {loaded.format} model (its graph has fixed shapes)",
                path=loaded.source,
                hint="switch off 'remove channels': pruned channels stay as zero rows",
            )
        if loaded.example_input is None:
            raise CompressionError(
                "removing channels needs an example input to trace the model's dependencies",
                path=loaded.source,
                hint="switch off 'remove channels' or open the model with sample data",
            )


def _uses_channels(plan: CompressionPlan, layers) -> bool:
    return any(
        (not plan.config_for(layer.name).skip)
        and plan.config_for(layer.name).prune.active
        and plan.config_for(layer.name).prune.method in STRUCTURED_METHODS
        for layer in layers
    )


def output_layer(loaded: LoadedModel, layers) -> str | None:
    """The prunable layer whose output is the model's output (the class logits), if known.

    Eager modules are traced with forward hooks; TorchScript and ``torch.export`` graphs hide
    their submodules' calls, so there it is the last prunable layer (inventory order) with as
    many output rows as the model has outputs. Without an input to run (weights-only files,
    TorchScript without data) it is the last prunable Linear/Conv layer in inventory order,
    where models register their head.
    """

    prunable = [layer for layer in layers if layer.prunable and layer.tensor]
    if not loaded.can_run or loaded.example_input is None:
        heads = [layer for layer in prunable if layer.type.startswith(("Linear", "Conv"))]
        return heads[-1].name if heads else None
    owners = {layer.tensor.rsplit(".", 1)[0]: layer.name for layer in prunable}
    module = loaded.module
    with torch.no_grad(), eval_mode(module), paged_forward(module):
        if not isinstance(module, torch.jit.ScriptModule | torch.fx.GraphModule):
            for owner in output_modules(module, loaded.example_input):
                if owner in owners:
                    return owners[owner]
        out = first_tensor(module(loaded.example_input))
    for layer in reversed(prunable):
        if out.ndim >= 1 and layer.shape and layer.shape[0] == out.shape[-1]:
            return layer.name
    return None


def protect_output_layer(plan: CompressionPlan, loaded: LoadedModel, layers) -> CompressionPlan:
    """``plan`` with the output layer exempt from the default's channel pruning: the rule of
    `core.recipe.edits.protect_output`, on the output layer `output_layer` finds by running the model
    (only when the default prunes channels; that search costs a forward pass)."""
    default = plan.default
    if default.skip or default.prune.method not in STRUCTURED_METHODS or not default.prune.active:
        return plan
    return protect_output(plan, output_layer(loaded, layers))


# ---------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------
def layer_mask(
    layer: LayerInfo,
    cfg: LayerConfig,
    weight: torch.Tensor,
    threshold: float | None,
    grad,
    count: int | None = None,
    release: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """The keep mask the plan asks for on one layer.

    ``release`` (see `compress_stream`) is called on ``weight`` once its scores are made.

    ``count`` (`core.analysis.estimate.LayerPreview.count`, for a target sparsity) prunes exactly that
    many scores (`core.analysis.selection.count_mask`); otherwise ``threshold`` (from the preview) is
    applied as a threshold.
    """

    method = cfg.prune.method
    if prune_method(method).semi_structured:
        return nm_mask(weight, cfg.prune.n, cfg.prune.m)
    scores = score_tensor(SCORE_ALIASES.get(method, method), weight.detach(), grad)
    if release is not None:
        release(weight)
    if method in STRUCTURED_METHODS:
        if count is not None:
            rows = count_mask(scores.reshape(-1), count)
            shape = tuple(weight.shape)
            return rows.reshape((-1,) + (1,) * (len(shape) - 1)).expand(shape).clone()
        return channel_mask(scores, threshold, weight.shape)
    if count is not None:
        return count_mask(scores.reshape(weight.shape), count)
    return threshold_mask(scores.reshape(weight.shape), threshold)


# ---------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------
#: Tensors above this many elements are measured in chunks (`_sqnr_sums_chunked`).
_SQNR_CHUNK = 1 << 22
#: Elements per chunk there (1M: float64 temporaries of ~8 MB each).
_SQNR_STEP = 1 << 20


def _sqnr_sums_chunked(
    original: torch.Tensor, aligned: torch.Tensor, final: torch.Tensor
) -> tuple[float, float, float]:
    """(signal, removed, error) energies of `_sqnr` in float64 chunks: a few tens of MB of
    temporaries instead of four float64 copies of a 10**8-weight tensor."""

    pages = MappedPages()  # a mapped original's pages, given back chunk by chunk

    def sum_sq(t: torch.Tensor) -> float:
        flat = t.detach().reshape(-1)
        total = 0.0
        for s in range(0, flat.numel(), _SQNR_STEP):
            total += float(flat[s : s + _SQNR_STEP].double().square_().sum())
            pages.release(flat[s : s + _SQNR_STEP])
        return total

    sig = sum_sq(original)
    removed = 0.0 if aligned is original else max(sig - sum_sq(aligned), 0.0)
    a, f = aligned.detach().reshape(-1), final.detach().reshape(-1)
    err = removed
    for s in range(0, f.numel(), _SQNR_STEP):
        err += float((f[s : s + _SQNR_STEP].double() - a[s : s + _SQNR_STEP]).square_().sum())
        pages.release(a[s : s + _SQNR_STEP])
    return sig, removed, err


def _sqnr(original: torch.Tensor, aligned: torch.Tensor, final: torch.Tensor) -> float:
    """SQNR of ``final`` against ``original``; weights removed from the shape count as error."""
    if max(original.numel(), final.numel()) > _SQNR_CHUNK:
        sig, removed, err = _sqnr_sums_chunked(original, aligned, final)
    else:
        o = original.detach().double()
        a = aligned.detach().double()
        sig = float(o.pow(2).sum())
        removed = max(sig - float(a.pow(2).sum()), 0.0)
        err = float((final.detach().double() - a).pow(2).sum()) + removed
    if err == 0.0:
        return math.inf
    if sig == 0.0:
        return -math.inf
    return 10.0 * math.log10(sig / err)


def _report(
    layer: LayerInfo,
    cfg: LayerConfig,
    threshold: float | None,
    original: torch.Tensor,
    aligned: torch.Tensor,
    final: torch.Tensor,
    qt: QuantizedTensor | None,
    pruned: bool,
) -> LayerReport:
    numel = int(final.numel())
    nnz = int(torch.count_nonzero(final))
    orig_numel = int(original.numel())
    bits = qt.bits if qt is not None else None
    per_channel = bool(qt.per_channel) if qt is not None else False
    symmetric = bool(qt.symmetric) if qt is not None else False
    n_params = int(qt.scale.numel()) if qt is not None else 0
    structured = pruned and cfg.prune.method in STRUCTURED_METHODS and final.ndim >= 1
    packed = tensor_packed_bytes(
        numel,
        nnz,
        bits,
        n_params,
        structured_rows=int(final.shape[0]) if structured else None,
        symmetric=symmetric,
    )
    return LayerReport(
        name=layer.name,
        tensor=str(layer.tensor),
        type=layer.type,
        shape=tuple(int(s) for s in final.shape),
        numel=numel,
        nnz=nnz,
        sparsity=1.0 - nnz / orig_numel if orig_numel else 0.0,
        method=cfg.prune.method if pruned else "none",
        threshold=threshold if pruned else None,
        bits=bits,
        symmetric=symmetric,
        per_channel=per_channel,
        sqnr_db=_sqnr(original, aligned, final),
        dense_bytes=4 * orig_numel,
        packed_bytes=int(packed),
        original_numel=orig_numel,
        skipped=cfg.skip,
    )


def measure_result(result: CompressionResult) -> CompressionResult:
    """Re-measure every `LayerReport` of ``result`` from its current weights.

    Used after fine-tuning: method and threshold are kept, everything measurable is redone.
    """
    orig = named_tensors(result.original.module)
    comp = named_tensors(result.compressed.module)
    layers = []
    for r in result.layers:
        cfg = result.plan.config_for(r.name)
        info = LayerInfo(
            name=r.name,
            type=r.type,
            tensor=r.tensor,
            shape=r.shape,
            params=r.numel,
            bytes=r.dense_bytes,
            prunable=True,
        )
        original = orig[r.tensor]
        aligned = result.aligned_original.get(r.tensor, original)
        layers.append(
            _report(
                info,
                cfg,
                r.threshold,
                original,
                aligned,
                comp[r.tensor],
                result.quantized.get(r.tensor),
                r.method != "none",
            )
        )
    return replace(result, layers=tuple(layers))


# ---------------------------------------------------------------------------------------
# compress
# ---------------------------------------------------------------------------------------
def _check(cancel: CancelToken | None) -> None:
    if cancel is not None:
        cancel.check()


#: Tensors up to this many elements that share a shape and a plan setting are compressed
#: together (checkpoints with 10**5 tiny tensors); at least `_GROUP_MIN` of them.
_GROUP_MAX = 4096
_GROUP_MIN = 8


def _groupable(cfg: LayerConfig) -> bool:
    """Settings `_compress_group` applies exactly as the one-layer path does: element-wise
    scores without gradients or calibration, no bias quantization."""
    if cfg.skip or cfg.quant.bias_bits is not None:
        return False
    if not cfg.prune.active:
        return True
    method = prune_method(cfg.prune.method)
    return (
        SCORE_ALIASES.get(method.name, method.name) == "magnitude"
        and not method.needs_calibration
        and not method.semi_structured
        and not method.structured
    )


def _small_groups(
    layers: list[LayerInfo], plan: CompressionPlan, tensors: Mapping[str, torch.Tensor]
) -> list[list[LayerInfo]]:
    """Layers to compress together: same shape, dtype and setting, small, `_groupable`."""
    groups: dict[tuple, list[LayerInfo]] = {}
    for layer in layers:
        w = tensors.get(str(layer.tensor))
        if w is None or w.ndim < 1 or not 0 < w.numel() <= _GROUP_MAX:
            continue
        if w.dtype != torch.float32:
            continue
        cfg = plan.config_for(layer.name)
        if _groupable(cfg):
            groups.setdefault((tuple(w.shape), w.dtype, cfg), []).append(layer)
    out = []
    for members in groups.values():
        if len(members) >= _GROUP_MIN:
            step = max(_GROUP_MIN, (1 << 18) // max(tensors[str(members[0].tensor)].numel(), 1))
            out.extend(members[i : i + step] for i in range(0, len(members), step))
    return out


def _group_masks(
    w: torch.Tensor, cfg: LayerConfig, thresholds: list[float | None], counts: list[int | None]
) -> torch.Tensor | None:
    """`layer_mask` of each ``w[i]`` (magnitude scores), in one pass; ``None``: no pruning."""
    if not cfg.prune.active:
        return None
    b = w.shape[0]
    scores = w.detach().abs().reshape(b, -1).to(torch.float32)
    if all(c is not None for c in counts):
        # `count_mask`: non-finite first, then by value, ties by flat index (stable sort)
        a = scores.numpy()
        key = np.where(np.isfinite(a), a, np.float32(-1.0))
        order = np.argsort(key, axis=1, kind="stable")
        ranks = np.empty_like(order)
        np.put_along_axis(ranks, order, np.arange(a.shape[1])[None, :].repeat(b, 0), axis=1)
        keep = ranks >= np.asarray(counts, dtype=np.int64)[:, None]
        return torch.from_numpy(keep).reshape(w.shape)
    keep = torch.ones(scores.shape, dtype=torch.bool)
    for i, (t, c) in enumerate(zip(thresholds, counts, strict=True)):
        if c is not None:
            keep[i] = count_mask(scores[i], c)
        elif t is not None:
            keep[i] = threshold_mask(scores[i], t)
    return keep.reshape(w.shape)


def _compress_group(
    members: list[LayerInfo],
    cfg: LayerConfig,
    current: Mapping[str, torch.Tensor],
    thresholds: Mapping[str, float | None],
    counts: Mapping[str, int | None],
) -> tuple[dict[str, torch.Tensor], dict[str, QuantizedTensor], dict[str, LayerReport]]:
    """Masks, codes and reports of a `_small_groups` group, equal to the one-layer path
    (`layer_mask`, `quantize`, `_report`) up to the summation order of the SQNR sums."""
    names = [str(layer.tensor) for layer in members]
    live = [current[n] for n in names]
    w = torch.stack([t.detach() for t in live])
    original = w.clone()
    mask = _group_masks(
        w, cfg, [thresholds.get(m.name) for m in members], [counts.get(m.name) for m in members]
    )
    masks: dict[str, torch.Tensor] = {}
    if mask is not None:
        masks = dict(zip(names, mask.unbind(0), strict=True))
    final, qts = _group_quantize(w, cfg, mask)
    quantized: dict[str, QuantizedTensor] = {
        n: qt for n, qt in zip(names, qts, strict=True) if qt is not None
    }
    with torch.no_grad():
        for t, f in zip(live, final.unbind(0), strict=True):
            t.copy_(f)
    reports = _group_reports(members, cfg, thresholds, original, final, qts, mask is not None)
    return masks, quantized, reports


def _group_quantize(
    w: torch.Tensor, cfg: LayerConfig, mask: torch.Tensor | None
) -> tuple[torch.Tensor, list[QuantizedTensor | None]]:
    """Final (dequantized, masked) values of a stacked group and each member's codes
    (``None`` each when ``cfg`` does not quantize)."""
    if cfg.quant.active:
        got, deq = quantize_stack(
            w,
            cfg.quant.bits,  # type: ignore[arg-type]
            symmetric=cfg.quant.symmetric,
            per_channel=cfg.quant.per_channel,
            mask=mask,
            group_size=cfg.quant.group_size,
        )
        return deq.to(w.dtype), list(got)
    qts: list[QuantizedTensor | None] = [None] * w.shape[0]
    if mask is not None:
        return w * mask.to(w.dtype), qts
    return w, qts


def _group_reports(
    members: list[LayerInfo],
    cfg: LayerConfig,
    thresholds: Mapping[str, float | None],
    original: torch.Tensor,
    final: torch.Tensor,
    qts: list[QuantizedTensor | None],
    pruned: bool,
) -> dict[str, LayerReport]:
    """`_report` of each member of a stacked group, from batched SQNR sums and counts."""
    b = len(members)
    o = original.reshape(b, -1).double()
    f = final.reshape(b, -1).double()
    sig = o.pow(2).sum(dim=1).tolist()
    err = (f - o).pow(2).sum(dim=1).tolist()
    nnz = torch.count_nonzero(final.reshape(b, -1), dim=1).tolist()
    numel = int(original[0].numel())
    shape = tuple(int(x) for x in original.shape[1:])
    reports = {}
    for i, layer in enumerate(members):
        qt = qts[i]
        sqnr = (
            math.inf
            if err[i] == 0.0
            else (-math.inf if sig[i] == 0.0 else 10.0 * math.log10(sig[i] / err[i]))
        )
        packed = tensor_packed_bytes(
            numel,
            nnz[i],
            qt.bits if qt is not None else None,
            int(qt.scale.numel()) if qt is not None else 0,
            structured_rows=None,
            symmetric=bool(qt.symmetric) if qt is not None else False,
        )
        reports[layer.name] = LayerReport(
            name=layer.name,
            tensor=str(layer.tensor),
            type=layer.type,
            shape=shape,
            numel=numel,
            nnz=nnz[i],
            sparsity=1.0 - nnz[i] / numel,
            method=cfg.prune.method if pruned else "none",
            threshold=thresholds.get(layer.name) if pruned else None,
            bits=qt.bits if qt is not None else None,
            symmetric=bool(qt.symmetric) if qt is not None else False,
            per_channel=bool(qt.per_channel) if qt is not None else False,
            sqnr_db=sqnr,
            dense_bytes=4 * numel,
            packed_bytes=int(packed),
            original_numel=numel,
            skipped=cfg.skip,
        )
    return reports


def compress(
    loaded: LoadedModel,
    plan: CompressionPlan,
    stats,
    *,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
    calibration=None,
) -> CompressionResult:
    """Apply ``plan`` to a copy of ``loaded``.

    Parameters
    ----------
    loaded
        The model to compress; never modified.
    plan
        Per-layer pruning and quantization settings.
    stats
        `core.analysis.stats.ModelStats` of ``loaded`` (from `core.analysis.stats.analyze`); supplies thresholds
        (via `core.analysis.estimate.pruning_targets`) and gradient statistics.
    progress, cancel
        Progress callback and cancel token, checked between layers.
    calibration
        `core.io.data.Dataset` (the training split) for the methods that read layer inputs
        (``obs``/``obs_nm`` pruning, ``gptq`` rounding, bias correction; `core.compress.second_order`).
        Those layers are then processed in call order, each from the inputs the already
        compressed layers produce.

    Returns
    -------
    CompressionResult
        The compressed copy (pruned, dequantized weights), masks, codes and per-layer reports.

    Raises
    ------
    CompressionError
        The plan names unknown layers, needs gradients that were not recorded, asks to
        remove channels from a model that cannot be re-shaped, or uses a calibration method
        without calibration data (or on a model whose layers cannot be hooked).
    Cancelled
        When ``cancel`` fires; the original is untouched and nothing is returned.
    """

    _check_plan(loaded, plan, stats)
    calibrated = second_order.plan_needs_calibration(plan, list(stats.layers))
    if calibrated:
        second_order.check_calibration(loaded, calibration)
    thresholds, counts = _targets(stats, plan, progress, cancel)
    _check(cancel)
    progress(0.02, "copying the model")
    work = clone_model(loaded)
    _check(cancel)
    module = work.module
    layers = [layer for layer in stats.layers if layer.prunable and layer.tensor is not None]
    n = max(len(layers), 1)
    tensors = named_tensors(module)
    # groups of small same-shape tensors are done in one pass each (`_compress_group`)
    reshaping = plan.remove_channels and _uses_channels(plan, layers)
    grouped = [] if (calibrated or reshaping) else _small_groups(layers, plan, tensors)
    in_group = {layer.name for members in grouped for layer in members}
    originals, masks = _prune_layers(
        [layer for layer in layers if layer.name not in in_group],
        n,
        plan,
        stats,
        tensors,
        named_tensors(loaded.module),
        (thresholds, counts),
        progress,
        cancel,
    )

    removed, aligned, masks = _remove_pruned_channels(work, layers, plan, masks, progress, cancel)

    quantized: dict[str, QuantizedTensor] = {}
    current = named_tensors(module)
    group_reports = _compress_groups(
        grouped, plan, current, (thresholds, counts), (masks, quantized), progress, cancel
    )
    recon = _reconstructor(calibrated, work, loaded, calibration, progress, cancel)
    reports = _compress_layers(
        layers,
        plan,
        current,
        (masks, quantized),
        recon,
        group_reports,
        (originals, aligned),
        thresholds,
        progress,
        cancel,
    )
    progress(1.0, "compressed")
    # A cancel that arrives with the last progress message still wins: a cancelled run
    # never hands back a result.
    _check(cancel)
    return CompressionResult(
        original=loaded,
        compressed=work,
        plan=plan,
        masks=masks,
        quantized=quantized,
        layers=tuple(reports),
        removed_channels=removed,
        aligned_original=aligned,
    )


def _targets(
    stats, plan: CompressionPlan, progress: ProgressFn, cancel: CancelToken | None
) -> tuple[dict[str, float | None], dict[str, int | None]]:
    """Per-layer thresholds and exact keep counts (`pruning_targets`), by layer name."""
    _check(cancel)
    progress(0.0, "computing thresholds")
    targets = pruning_targets(stats, plan)
    thresholds = {name: t for name, (t, _) in targets.items()}
    counts = {name: c for name, (_, c) in targets.items()}
    return thresholds, counts


def _remove_pruned_channels(
    work: LoadedModel,
    layers: list[LayerInfo],
    plan: CompressionPlan,
    masks: dict[str, torch.Tensor],
    progress: ProgressFn,
    cancel: CancelToken | None,
) -> tuple[dict[str, list[int]], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """`_remove` when the plan removes channels of channel-pruned layers; else nothing
    removed, nothing aligned and ``masks`` as they are."""
    removed: dict[str, list[int]] = {}
    aligned: dict[str, torch.Tensor] = {}
    if plan.remove_channels and _uses_channels(plan, layers):
        _check(cancel)
        progress(0.4, "removing pruned channels")
        removed, aligned, masks = _remove(work, layers, plan, masks)
    return removed, aligned, masks


def _compress_groups(
    grouped: list[list[LayerInfo]],
    plan: CompressionPlan,
    current: Mapping[str, torch.Tensor],
    targets: tuple[Mapping[str, float | None], Mapping[str, int | None]],
    out: tuple[dict[str, torch.Tensor], dict[str, QuantizedTensor]],
    progress: ProgressFn,
    cancel: CancelToken | None,
) -> dict[str, LayerReport]:
    """`_compress_group` each group in place; record masks and codes in ``out`` (masks,
    quantized) and return the reports by layer name."""
    thresholds, counts = targets
    masks, quantized = out
    group_reports: dict[str, LayerReport] = {}
    for g, members in enumerate(grouped):
        _check(cancel)
        progress(0.4 + 0.1 * g / len(grouped), f"compressing {members[0].name} and others")
        gm, gq, gr = _compress_group(
            members, plan.config_for(members[0].name), current, thresholds, counts
        )
        masks.update(gm)
        quantized.update(gq)
        group_reports.update(gr)
    return group_reports


def _reconstructor(
    calibrated: bool,
    work: LoadedModel,
    loaded: LoadedModel,
    calibration,
    progress: ProgressFn,
    cancel: CancelToken | None,
) -> second_order.Reconstructor | None:
    """The `second_order.Reconstructor` of ``work`` (reference ``loaded``) for a calibrated
    plan; ``None`` otherwise."""
    if not calibrated:
        return None
    return second_order.Reconstructor(
        work, calibration, progress=progress, cancel=cancel, reference=loaded
    )


def _compress_layers(
    layers: list[LayerInfo],
    plan: CompressionPlan,
    current: Mapping[str, torch.Tensor],
    out: tuple[dict[str, torch.Tensor], dict[str, QuantizedTensor]],
    recon: Any,
    group_reports: Mapping[str, LayerReport],
    sources: tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]],
    thresholds: Mapping[str, float | None],
    progress: ProgressFn,
    cancel: CancelToken | None,
) -> list[LayerReport]:
    """`_compress_layer` each layer not in a group (in call order with ``recon``); return
    all reports in the order of ``layers``."""
    originals, aligned = sources
    n = max(len(layers), 1)
    order = recon.order(layers) if recon is not None else layers
    reports = []
    for i, layer in enumerate(order):
        if layer.name in group_reports:
            reports.append(group_reports[layer.name])
            continue
        _check(cancel)
        progress(0.5 + 0.5 * i / n, f"quantizing {layer.name}")
        original = originals[str(layer.tensor)]
        reports.append(
            _compress_layer(
                layer,
                plan.config_for(layer.name),
                current,
                out,
                recon,
                (original, aligned.get(str(layer.tensor), original)),
                thresholds.get(layer.name),
            )
        )
    if recon is not None:
        rank = {layer.name: i for i, layer in enumerate(layers)}
        reports.sort(key=lambda r: rank[r.name])
    return reports


def _compress_layer(
    layer: LayerInfo,
    cfg: LayerConfig,
    current: Mapping[str, torch.Tensor],
    out: tuple[dict[str, torch.Tensor], dict[str, QuantizedTensor]],
    recon: Any,
    originals: tuple[torch.Tensor, torch.Tensor],
    threshold: float | None,
) -> LayerReport:
    """Quantize (or reconstruct, with ``recon``) one pruned layer in place; record its mask and
    codes in ``out`` (masks, quantized) and return its report."""

    masks, quantized = out
    name = str(layer.tensor)
    w = current[name]
    mask = masks.get(name)
    bias = bias_name(layer, current)
    if recon is not None and second_order.needs_calibration(cfg):
        with torch.no_grad():
            qt, mask = recon.apply_(
                layer, cfg, w, mask, current[bias] if bias is not None else None
            )
        if mask is not None:
            masks[name] = mask
    else:
        qt = _quantize_layer(cfg, w, mask)
    if qt is not None:
        quantized[name] = qt
    if not cfg.skip and cfg.quant.bias_bits is not None and bias is not None:
        quantized[bias] = _quantize_bias(cfg, current[bias])
    original, aligned = originals
    return _report(layer, cfg, threshold, original, aligned, w, qt, name in masks)


def _prune_layers(
    layers: list[LayerInfo],
    n: int,
    plan: CompressionPlan,
    stats,
    tensors: Mapping[str, torch.Tensor],
    source: Mapping[str, torch.Tensor],
    targets: tuple[Mapping[str, float | None], Mapping[str, int | None]],
    progress: ProgressFn,
    cancel: CancelToken | None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(originals, masks)`` of ``layers``: each weight before compression and its keep mask
    (`layer_mask`; none for skipped layers and layers without pruning)."""
    thresholds, counts = targets
    originals: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(layers):
        _check(cancel)
        progress(0.05 + 0.35 * i / n, f"pruning {layer.name}")
        w = _tensor(tensors, layer.tensor, where=layer.name)
        # ``loaded`` is never modified: its tensor is the original (no third copy of the
        # weights at 10**8-10**9 of them); a clone only where the copy's names differ.
        o = source.get(str(layer.tensor))
        same = o is not None and o.shape == w.shape and o.dtype == w.dtype
        originals[str(layer.tensor)] = o.detach() if same else w.detach().clone()  # type: ignore[union-attr]
        cfg = plan.config_for(layer.name)
        if cfg.skip or not cfg.prune.active:
            continue
        ts = stats.tensors.get(layer.name)
        grad = ts.grad if ts is not None else None
        masks[str(layer.tensor)] = layer_mask(
            layer, cfg, w, thresholds.get(layer.name), grad, counts.get(layer.name)
        )
    return originals, masks


def _quantize_layer(
    cfg: LayerConfig, w: torch.Tensor, mask: torch.Tensor | None
) -> QuantizedTensor | None:
    """Quantize ``w`` in place (dequantized values) on its keep ``mask``, or only apply the
    mask when the plan does not quantize it; the codes, if any."""
    with torch.no_grad():
        if not cfg.skip and cfg.quant.active:
            qt = quantize(
                w,
                cfg.quant.bits,  # type: ignore[arg-type]
                symmetric=cfg.quant.symmetric,
                per_channel=cfg.quant.per_channel,
                mask=mask,
                group_size=cfg.quant.group_size,
            )
            w.copy_(dequantize(qt).to(w.dtype))
            return qt
        if mask is not None:
            w.mul_(mask.to(w.dtype))
    return None


def _quantize_bias(cfg: LayerConfig, b: torch.Tensor) -> QuantizedTensor:
    """Quantize a layer's bias in place to ``cfg.quant.bias_bits`` (per tensor)."""
    with torch.no_grad():
        bqt = quantize(
            b,
            cfg.quant.bias_bits,  # type: ignore[arg-type]
            symmetric=cfg.quant.symmetric,
            per_channel=False,
        )
        b.copy_(dequantize(bqt).to(b.dtype))
    return bqt


def _remove(
    work: LoadedModel,
    layers: list[LayerInfo],
    plan: CompressionPlan,
    masks: dict[str, torch.Tensor],
) -> tuple[dict[str, list[int]], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Physically remove the masked channels of channel-pruned layers from ``work``.

    Returns kept output channels per layer, the original weights aligned with the new shapes
    and the masks shrunk to them.
    """
    module = work.module
    modules = dict(module.named_modules())
    # Removing the output layer's channels would change what the model returns: its pruned
    # rows stay masked (zero) instead.
    outputs = output_modules(module, work.example_input)
    pruned: dict[str, list[int]] = {}
    for layer in layers:
        cfg = plan.config_for(layer.name)
        mask = masks.get(layer.tensor)
        if cfg.skip or mask is None or cfg.prune.method not in STRUCTURED_METHODS:
            continue
        owner = layer.tensor.rsplit(".", 1)[0] if "." in layer.tensor else ""
        if owner in outputs:
            continue
        if owner not in modules:
            raise CompressionError(f"layer {layer.name!r}: cannot find its module {owner!r}")
        rows = mask.reshape(mask.shape[0], -1).any(dim=1)
        idxs = [int(i) for i in torch.nonzero(~rows).reshape(-1)]
        if idxs:
            pruned[owner] = idxs
    if not pruned:
        return {}, {}, masks
    # Companions shrink exactly like the model: one carries the masks as 0/1 floats, one the
    # original weights (the working copy holds them too at this point).
    mask_model = copy.deepcopy(module)
    ref_model = copy.deepcopy(module)
    mask_tensors = named_tensors(mask_model)
    with torch.no_grad():
        for name, mask in masks.items():
            mask_tensors[name].copy_(mask.to(mask_tensors[name].dtype))
    before = {name: tuple(t.shape) for name, t in named_tensors(module).items()}
    info = remove_channels_(module, work.example_input, pruned, companions=(mask_model, ref_model))
    after = named_tensors(module)
    mask_after = named_tensors(mask_model)
    ref_after = named_tensors(ref_model)
    new_masks = {name: mask_after[name].detach() > 0.5 for name in masks}
    aligned = {
        name: ref_after[name].detach().clone()
        for name, t in after.items()
        if tuple(t.shape) != before.get(name)
    }
    # Only the group roots are reported: re-applying their removals on the original
    # architecture (the packed loader does this) reproduces every coupled change too.
    kept = {}
    for root, idxs in info.removed.items():
        n_rows = int(before[f"{root}.weight"][0])
        kept[root] = sorted(set(range(n_rows)) - set(idxs))
    return kept, aligned, new_masks


# ---------------------------------------------------------------------------------------
# streaming (no model clone, no dense compressed copy)
# ---------------------------------------------------------------------------------------
def can_stream(loaded: LoadedModel, plan: CompressionPlan, stats) -> bool:
    """Whether `compress_stream` applies: a model of any format whose plan compresses every
    layer from its own weights alone (no calibration, fine-tuning or channel removal, no bias
    quantization, which edits a second tensor) and whose state tensors share no memory (a
    tied weight is compressed once in the dense path's clone, so its second name would hold
    the compressed values, which a stream of the original's tensors does not know)."""
    layers = [layer for layer in stats.layers if layer.prunable and layer.tensor is not None]
    if plan.recovery.epochs > 0 or second_order.plan_needs_calibration(plan, layers):
        return False
    if plan.remove_channels and _uses_channels(plan, layers):
        return False
    if any(plan.config_for(layer.name).quant.bias_bits is not None for layer in layers):
        return False
    return not _shares_memory(loaded.module.state_dict().values())


def _shares_memory(tensors) -> bool:
    """Whether any two of ``tensors`` overlap in memory (tied weights, views of one another)."""
    spans = sorted(
        (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
        for t in tensors
        if isinstance(t, torch.Tensor) and t.numel() > 0 and t.device.type != "meta"
    )
    reach = 0
    for start, end in spans:
        if start < reach:
            return True
        reach = max(reach, end)
    return False


#: One state tensor of `compress_stream`: ``(name, value, codes, mask, report, original)``;
#: ``report`` is ``None`` for tensors that are not a layer's weight.
StreamedTensor = tuple[
    str,
    torch.Tensor,
    QuantizedTensor | None,
    torch.Tensor | None,
    LayerReport | None,
    torch.Tensor,
]


def compress_stream(
    loaded: LoadedModel,
    plan: CompressionPlan,
    stats,
    *,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
    release: Callable[[torch.Tensor], None] | None = None,
) -> Iterator[StreamedTensor]:
    """`compress` of a model `can_stream` accepts, one state tensor at a time.

    ``release``, if given, is called on a layer's original between the passes that read it
    (mask, codes): `core.base.memory.MappedPages.release` gives back the pages of a mapped
    checkpoint that the next pass reads again, instead of holding them beside its
    temporaries.

    Yields every tensor of ``loaded``'s state dict in order, as the compressed model of
    `compress` would hold it (same values, codes, masks and `LayerReport`s), each made from
    the original (a view of the memory-mapped file for weights-only checkpoints; ``loaded``
    is never modified) and dropped by the caller before the next:
    no copy of the whole model is ever made. Groups of small same-shape tensors are done
    first (`_compress_group`, as `compress` does); they are small by definition.
    """
    _check_plan(loaded, plan, stats)
    if not can_stream(loaded, plan, stats):
        raise CompressionError("this model or plan cannot be compressed tensor by tensor")
    _check(cancel)
    progress(0.0, "computing thresholds")
    targets = pruning_targets(stats, plan)
    thresholds = {name: t for name, (t, _) in targets.items()}
    counts = {name: c for name, (_, c) in targets.items()}
    layers = [layer for layer in stats.layers if layer.prunable and layer.tensor is not None]
    source = named_tensors(loaded.module)
    by_tensor = {str(layer.tensor): layer for layer in layers}
    for name, layer in by_tensor.items():
        _tensor(source, name, where=layer.name)
    grouped = _small_groups(layers, plan, source)
    small: dict[str, torch.Tensor] = {}
    done: dict[str, tuple[QuantizedTensor | None, torch.Tensor | None, LayerReport]] = {}
    for members in grouped:
        _check(cancel)
        names = [str(layer.tensor) for layer in members]
        small.update((n, source[n].detach().clone()) for n in names)
        gm, gq, gr = _compress_group(
            members, plan.config_for(members[0].name), small, thresholds, counts
        )
        done.update(
            (n, (gq.get(n), gm.get(n), gr[m.name])) for n, m in zip(names, members, strict=True)
        )
    state = loaded.module.state_dict()
    for i, (name, value) in enumerate(state.items()):
        _check(cancel)
        original = value.detach()
        layer = by_tensor.get(name)
        if name in done:
            qt, mask, report = done.pop(name)
            yield name, small.pop(name), qt, mask, report, original
        elif layer is None:
            yield name, original, None, None, None, original
        else:
            progress(i / max(len(state), 1), f"compressing {layer.name}")
            yield _stream_layer(layer, plan, stats, original, thresholds, counts, release)
    progress(1.0, "compressed")


def _stream_layer(
    layer: LayerInfo,
    plan: CompressionPlan,
    stats,
    original: torch.Tensor,
    thresholds: Mapping[str, float | None],
    counts: Mapping[str, int | None],
    release: Callable[[torch.Tensor], None] | None = None,
) -> StreamedTensor:
    """One layer as `_prune_layers` + `_compress_layer` make it: the mask (`layer_mask`) and
    codes (`quantize`) of the original weights, the final values ``dequantize(codes)`` (or the
    masked weights) as a new tensor; the original (a view of the file) is only read."""
    name = str(layer.tensor)
    cfg = plan.config_for(layer.name)
    threshold = thresholds.get(layer.name)
    mask = None
    if not cfg.skip and cfg.prune.active:
        ts = stats.tensors.get(layer.name)
        grad = ts.grad if ts is not None else None
        mask = layer_mask(
            layer, cfg, original, threshold, grad, counts.get(layer.name), release=release
        )
    qt = None
    with torch.no_grad():
        if not cfg.skip and cfg.quant.active:
            qt = quantize(
                original,
                cfg.quant.bits,  # type: ignore[arg-type]
                symmetric=cfg.quant.symmetric,
                per_channel=cfg.quant.per_channel,
                mask=mask,
                group_size=cfg.quant.group_size,
            )
            if release is not None:
                release(original)
            value = dequantize(qt).to(original.dtype)
        elif mask is not None:
            value = original * mask.to(original.dtype)
        else:
            value = original  # unchanged: nothing to copy
    report = _report(layer, cfg, threshold, original, original, value, qt, mask is not None)
    return name, value, qt, mask, report, original
