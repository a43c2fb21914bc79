"""Pruning masks and physical channel removal.

Masks are boolean *keep* masks with the weight's shape (``True`` = kept). The rule everywhere
is the one the live preview counts with: a weight is pruned iff its score is strictly below
the threshold. Scores come from `core.analysis.stats.score_tensor` so the preview and the applied mask
can never disagree.

Physical removal (`remove_channels_`) uses Torch-Pruning's dependency graph, which knows that
removing an output channel of a convolution also removes the matching BatchNorm entries, the
input columns of every consumer and the coupled channels of residual additions.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from core.base.errors import CompressionError


# ---------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------
def threshold_mask(scores: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """Keep mask ``scores >= threshold`` (pruned iff strictly below); ``None`` keeps everything.

    Non-finite scores (NaN weights) are pruned: they cannot be represented by the quantizer and
    the preview counts them as below every threshold.
    """
    if threshold is None:
        return torch.ones_like(scores, dtype=torch.bool)
    keep = scores >= threshold
    return keep & torch.isfinite(scores)


def channel_mask(
    channel_scores: torch.Tensor, threshold: float | None, weight_shape: Sequence[int]
) -> torch.Tensor:
    """Keep mask over whole output channels (axis 0), broadcast to ``weight_shape``.

    Parameters
    ----------
    channel_scores
        One non-negative score per output channel (shape ``(weight_shape[0],)``), e.g. the
        channel's L1 or L2 norm.
    threshold
        Channels whose score is strictly below it are pruned; ``None`` keeps all.
    weight_shape
        Shape of the weight the mask is for.
    """
    shape = tuple(int(s) for s in weight_shape)
    scores = channel_scores.reshape(-1)
    if scores.numel() != shape[0]:
        raise ValueError(f"expected {shape[0]} channel scores, got {scores.numel()}")
    rows = threshold_mask(scores, threshold)
    return rows.reshape((-1,) + (1,) * (len(shape) - 1)).expand(shape).clone()


def nm_group_counts(row_length: int, n: int, m: int) -> tuple[int, int]:
    """``(full_groups, pruned_in_tail)`` for one row of ``row_length`` weights under N:M.

    A trailing partial group of ``r < m`` weights prunes ``floor(n * r / m)`` of them, so a
    row never gets denser than the N:M ratio allows and exactly ``n`` of every full group of
    ``m`` are pruned.
    """
    full = row_length // m
    tail = row_length - full * m
    return full, (n * tail) // m


def nm_pruned_count(shape: Sequence[int], n: int, m: int) -> int:
    """Exact number of weights an N:M mask prunes from a tensor of ``shape``."""
    shape = tuple(int(s) for s in shape)
    if not shape:
        return 0
    rows = shape[0] if len(shape) > 1 else 1
    length = 1
    for s in shape[1:] if len(shape) > 1 else shape:
        length *= s
    full, tail_pruned = nm_group_counts(length, n, m)
    return rows * (full * n + tail_pruned)


def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M semi-structured keep mask: in every group of ``m`` consecutive input weights prune
    the ``n`` smallest ``|w|``.

    Groups run along the input axis after flattening each output channel (a conv kernel
    ``(out, in, kh, kw)`` becomes rows of ``in * kh * kw``), which is the layout sparse tensor
    cores use for 2:4. Ties are broken by position (stable sort) so the count is exact.
    """
    if not 1 <= n < m:
        raise ValueError(f"need 1 <= n < m, got n={n}, m={m}")
    w = weight.detach()
    if w.ndim == 0:
        return torch.ones_like(w, dtype=torch.bool)
    rows = w.reshape(w.shape[0], -1) if w.ndim > 1 else w.reshape(1, -1)
    mag = torch.nan_to_num(rows.abs().to(torch.float32), nan=-1.0)
    keep = torch.ones_like(mag, dtype=torch.bool)
    length = mag.shape[1]
    full, tail_pruned = nm_group_counts(length, n, m)
    if full:
        groups = mag[:, : full * m].reshape(mag.shape[0], full, m)
        order = torch.argsort(groups, dim=-1, stable=True)
        gkeep = torch.ones_like(groups, dtype=torch.bool)
        gkeep.scatter_(-1, order[..., :n], False)
        keep[:, : full * m] = gkeep.reshape(mag.shape[0], full * m)
    if tail_pruned:
        tail = mag[:, full * m :]
        order = torch.argsort(tail, dim=-1, stable=True)
        tkeep = torch.ones_like(tail, dtype=torch.bool)
        tkeep.scatter_(-1, order[:, :tail_pruned], False)
        keep[:, full * m :] = tkeep
    return keep.reshape(w.shape)


# ---------------------------------------------------------------------------------------
# physical channel removal
# ---------------------------------------------------------------------------------------
_REMOVABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class ChannelRemoval:
    """What `remove_channels_` did.

    ``removed``: root layer -> output channel indices removed (original numbering), one entry
    per dependency group that was pruned. ``kept``: every module (by name) whose output
    channels shrank -> the original indices of the channels it kept. ``covered``: planned
    layers whose channels were decided by another layer coupled to them (residual additions,
    depthwise convolutions): layer -> the root that decided.
    """

    removed: Mapping[str, list[int]]
    kept: Mapping[str, list[int]]
    covered: Mapping[str, str]


def output_modules(model: nn.Module, example_input: torch.Tensor) -> set[str]:
    """Names of modules whose output tensor is (part of) the model's output.

    Their output channels cannot be removed without changing what the model returns.
    """
    produced: dict[int, str] = {}
    hooks = []

    def _hook(name: str):
        def _record(_mod, _inp, out):
            if isinstance(out, torch.Tensor):
                produced[id(out)] = name

        return _record

    for name, mod in model.named_modules():
        if isinstance(mod, _REMOVABLE):
            hooks.append(mod.register_forward_hook(_hook(name)))
    try:
        with torch.no_grad():
            out = model(example_input)
    finally:
        for h in hooks:
            h.remove()
    outs = out if isinstance(out, tuple | list) else (out,)
    return {produced[id(o)] for o in outs if isinstance(o, torch.Tensor) and id(o) in produced}


def _prune_fn(module: nn.Module):
    import torch_pruning as tp

    if isinstance(module, nn.Linear):
        return tp.prune_linear_out_channels
    return tp.prune_conv_out_channels


def _build_graph(model: nn.Module, example_input: torch.Tensor):
    import torch_pruning as tp

    try:
        return tp.DependencyGraph().build_dependency(
            model, example_inputs=example_input, verbose=False
        )
    except Exception as exc:  # noqa: BLE001 - tracing arbitrary user code fails in many ways
        raise CompressionError(
            f"could not trace the model's channel dependencies ({type(exc).__name__}: {exc})",
            hint="switch off 'remove channels': the channels stay masked (zero rows) instead",
        ) from None


def _groups(
    model: nn.Module,
    example_input: torch.Tensor,
    pruned: Mapping[str, Sequence[int]],
) -> tuple[list[tuple[str, list[int]]], dict[str, str]]:
    """Dependency groups to prune on ``model``: ``[(root layer, idxs)]`` and the covered map.

    Layers are taken in the order given; a planned layer coupled to an earlier root is not
    pruned again (its channels were already decided by the root).
    """
    graph = _build_graph(model, example_input)
    modules = dict(model.named_modules())
    name_of = {id(m): n for n, m in modules.items()}
    covered: dict[str, str] = {}
    plan: list[tuple[str, list[int]]] = []
    for layer, idxs in pruned.items():
        if layer in covered or not idxs:
            continue
        mod = modules[layer]
        group = graph.get_pruning_group(mod, _prune_fn(mod), idxs=list(idxs))
        for item in group.items:
            target = name_of.get(id(item.dep.target.module))
            if target is not None and target != layer and target in pruned:
                if "out_channels" in getattr(item.dep.handler, "__name__", ""):
                    covered[target] = layer
        plan.append((layer, list(idxs)))
    return plan, covered


def _apply_groups(model: nn.Module, example_input: torch.Tensor, plan) -> None:
    graph = _build_graph(model, example_input)
    modules = dict(model.named_modules())
    for layer, idxs in plan:
        mod = modules[layer]
        group = graph.get_pruning_group(mod, _prune_fn(mod), idxs=idxs)
        if not graph.check_pruning_group(group):
            raise CompressionError(
                f"layer {layer!r}: removing {len(idxs)} channels would leave a coupled layer "
                "with no channels",
                hint="lower the channel sparsity of this layer",
            )
        group.prune()


def remove_channels_(
    model: nn.Module,
    example_input: torch.Tensor,
    pruned: Mapping[str, Sequence[int]],
    *,
    companions: Sequence[nn.Module] = (),
) -> ChannelRemoval:
    """Physically remove output channels from an eager model, in place.

    Parameters
    ----------
    model
        An eager ``nn.Module`` (TorchScript / ``torch.export`` graphs cannot be re-shaped).
    example_input
        A batch the model accepts (used to trace channel dependencies).
    pruned
        Layer (module name) -> output channel indices to remove. Only ``nn.Linear``,
        ``nn.ConvNd`` and depthwise convolutions can be roots. A layer coupled to an earlier one (for example both
        sides of a residual addition) follows that earlier root's choice.
    companions
        Models with the same architecture (deep copies) pruned identically; the engine passes
        a copy whose weights hold the float masks so masks shrink exactly like the weights.

    Returns
    -------
    ChannelRemoval
        Removed and kept indices per layer and which planned layers were covered by another.

    Raises
    ------
    CompressionError
        The model cannot be traced, a layer is not a Linear/Conv layer, a layer produces the
        model's output (removing its channels would change the output shape) or a coupled
        layer would be left empty.
    """
    modules = dict(model.named_modules())
    for layer in pruned:
        mod = modules.get(layer)
        if mod is None:
            raise CompressionError(f"layer {layer!r} is not a module of this model")
        groups = getattr(mod, "groups", 1)
        depthwise = groups > 1 and groups == mod.in_channels == mod.out_channels
        if not isinstance(mod, _REMOVABLE) or (groups != 1 and not depthwise and pruned[layer]):
            raise CompressionError(
                f"layer {layer!r} ({type(mod).__name__}): only Linear, Conv and depthwise Conv "
                "layers can have channels removed",
                hint="use channel masking for this layer (switch off 'remove channels')",
            )
    outputs = output_modules(model, example_input)
    blocked = sorted(set(pruned) & outputs)
    if blocked and any(len(pruned[b]) for b in blocked):
        raise CompressionError(
            f"layer {blocked[0]!r} produces the model's output; removing its channels would "
            "change the output shape",
            hint="skip channel pruning on the output layer",
        )
    # Index tensors record, for every module, which original output channel each row is.
    tracker = copy.deepcopy(model)
    tracked: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, mod in tracker.named_modules():
            w = getattr(mod, "weight", None)
            if isinstance(mod, _REMOVABLE) and isinstance(w, torch.Tensor) and w.ndim >= 1:
                rows = torch.arange(w.shape[0], dtype=w.dtype)
                w.copy_(rows.reshape((-1,) + (1,) * (w.ndim - 1)).expand_as(w))
                tracked[name] = w
    before = {n: int(t.shape[0]) for n, t in tracked.items()}
    plan, covered = _groups(model, example_input, pruned)
    for target in (model, *companions, tracker):
        _apply_groups(target, example_input, plan)
    kept: dict[str, list[int]] = {}
    tmods = dict(tracker.named_modules())
    for name, n0 in before.items():
        w = tmods[name].weight
        if int(w.shape[0]) != n0:
            kept[name] = [int(v) for v in w.detach().reshape(w.shape[0], -1)[:, 0].round()]
    removed = {layer: sorted(int(i) for i in idxs) for layer, idxs in plan}
    return ChannelRemoval(removed=removed, kept=kept, covered=covered)
