"""One-shot second-order reconstruction: SparseGPT/OBS pruning, GPTQ rounding, bias correction.

The methods follow Frantar & Alistarh (GPTQ, 2022; SparseGPT, 2023; reference code in
IST-DASLab/gptq and IST-DASLab/sparsegpt). For one Linear/Conv layer with weight ``W``
(``rows x cols``, a conv kernel flattened to ``out x in*kh*kw``) and calibration inputs ``X``
(``cols x n``, conv inputs unfolded into patches), the layer's output error
``||W X - W' X||^2`` has the Hessian ``H = 2 X X^T / n``. Columns are visited in order; each
column is pruned (by the OBS saliency ``w^2 / [H^-1]_qq``) and/or rounded onto the affine grid,
and its error is pushed onto the not yet visited columns through the upper Cholesky factor of
``H^-1`` (block by block of `BLOCK` columns, the rest of the matrix updated once per block).
``H`` is damped by `DAMP` times its mean diagonal so the factorization exists.

Calibration statistics come from the caller's data (the *training* split in the CLI, the
window and `core.recovery.training`; reported figures come from the held-out split). Layers are done
one after another in the order the model calls them, and each layer's ``H`` is collected from
the model as compressed so far, so later layers compensate for the errors of earlier ones.
A layer's inputs are captured with a forward pre-hook; the forward pass stops right after the
hooked layer (when it is called once per pass), so collecting all ``L`` layers costs about
``L / 2`` forward passes over the calibration samples.

Memory: one ``cols x cols`` float32 matrix at a time (plus its Cholesky factor during the
column loop): ``4 * cols**2`` bytes, i.e. 64 MiB for ``cols = 4096`` (128 MiB at the peak of
the factorization), never one per layer.

What can be hooked: eager ``nn.Linear``, ``nn.Conv1d``/``nn.Conv2d`` with ``groups == 1`` and
numeric padding, and the input projection of self-attention ``nn.MultiheadAttention``. Other
weights (embeddings, norms, attention output projections that ``MultiheadAttention`` applies
functionally, grouped convolutions) have no input Gram matrix here: they get the plain rule
(magnitude mask / round to nearest) and the progress log says so. TorchScript models cannot be
hooked at all and are refused with a `CompressionError`, as are weights-only checkpoints and
runs without calibration data.

Why one module of this size: Hessian collection, OBS pruning, GPTQ rounding and bias correction
share the sequential layer-by-layer driver and its hooks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from core.base.errors import CompressionError
from core.base.methods import prune_method, quantizer
from core.base.model import LayerInfo, LoadedModel, forward
from core.base.progress import CancelToken, ProgressFn, no_progress
from core.evaluate import eval_mode
from core.ops.pruning import nm_group_counts
from core.ops.quantization import QuantizedTensor, dequantize, quant_params, quantize
from core.recipe.plan import CompressionPlan, LayerConfig

#: Calibration samples used at most (seeded random subset of the training data).
CALIBRATION_SAMPLES = 256
#: Samples per calibration forward pass.
CALIBRATION_BATCH = 32
#: Dampening of ``H``: ``DAMP * mean(diag(H))`` is added to its diagonal (as in GPTQ).
DAMP = 0.01
#: Columns per lazy-update block (GPTQ/SparseGPT use 128).
BLOCK = 128

Extractor = Callable[[tuple, dict], "torch.Tensor | None"]


# ---------------------------------------------------------------------------------------
# which configs need data
# ---------------------------------------------------------------------------------------
def needs_calibration(cfg: LayerConfig) -> bool:
    """True when ``cfg`` asks for a method that reads calibration inputs."""
    if cfg.skip:
        return False
    prune = cfg.prune.active and prune_method(cfg.prune.method).needs_calibration
    quant = cfg.quant.active and (
        quantizer(cfg.quant.method).needs_data or cfg.quant.bias_correction
    )
    return bool(prune or quant)


def plan_needs_calibration(plan: CompressionPlan, layers: list[LayerInfo]) -> bool:
    """True when any of ``layers`` is configured with a calibration method."""
    return any(needs_calibration(plan.config_for(layer.name)) for layer in layers)


def check_calibration(loaded: LoadedModel, calibration) -> None:
    """Refuse, with a message saying why, to run second-order methods on ``loaded``."""
    hint = "use magnitude pruning and round-to-nearest quantization (no data needed)"
    if not loaded.can_run:
        raise CompressionError(
            "these methods need calibration data run through the model (obs, obs_nm, gptq, "
            "bias correction), but this is a weights-only checkpoint without a forward pass",
            path=loaded.source,
            hint="give an architecture (--arch) or open the eager model, or " + hint,
        )
    if isinstance(loaded.module, torch.jit.ScriptModule):
        raise CompressionError(
            "these methods (obs, obs_nm, gptq, bias correction) capture each layer's inputs "
            "with hooks, which a TorchScript model does not support",
            path=loaded.source,
            hint="open the eager model (a full pickled model with --trust), or " + hint,
        )
    hookable = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention)
    if isinstance(loaded.module, torch.fx.GraphModule) and not any(
        isinstance(m, hookable) for m in loaded.module.modules()
    ):
        # torch.export graphs (.pt2) call aten.linear/aten.convolution as functions: no layer
        # module exists to hook, and falling back to the plain rule would be silent.
        raise CompressionError(
            f"these methods (obs, obs_nm, gptq, bias correction) capture each layer's inputs "
            f"with hooks, but this {loaded.format} graph calls its layers as functions "
            "(aten.linear / aten.convolution), so there is no layer module to hook",
            path=loaded.source,
            hint="open the eager model (a full pickled model with --trust), or " + hint,
        )
    if calibration is None or len(calibration) == 0:
        raise CompressionError(
            "these methods need calibration data (obs, obs_nm, gptq, bias correction)",
            path=loaded.source,
            hint="load data (--data FILE with an array 'x'), or " + hint,
        )


# ---------------------------------------------------------------------------------------
# input capture
# ---------------------------------------------------------------------------------------
def _linear_cols(mod: nn.Linear) -> Extractor:
    def extract(args: tuple, kwargs: dict) -> torch.Tensor | None:
        x = args[0] if args else kwargs.get("input")
        return x.reshape(-1, mod.in_features)

    return extract


def _conv_cols(mod: nn.Conv1d | nn.Conv2d) -> Extractor:
    one_d = isinstance(mod, nn.Conv1d)

    def pair(v: tuple[int, ...]) -> tuple[int, int]:
        return (1, int(v[0])) if one_d else (int(v[0]), int(v[1]))

    def extract(args: tuple, kwargs: dict) -> torch.Tensor | None:
        x = args[0] if args else kwargs.get("input")
        if one_d:
            x = x.unsqueeze(-2)
        # patches in the (in, kh, kw) order of weight.reshape(out, -1)
        cols = F.unfold(
            x,
            pair(mod.kernel_size),
            dilation=pair(mod.dilation),
            padding=pair(mod.padding),
            stride=pair(mod.stride),
        )
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])

    return extract


def _attention_cols(mod: nn.MultiheadAttention) -> Extractor:
    def extract(args: tuple, kwargs: dict) -> torch.Tensor | None:
        q = args[0] if args else kwargs.get("query")
        k = args[1] if len(args) > 1 else kwargs.get("key")
        v = args[2] if len(args) > 2 else kwargs.get("value")
        if k is not q or v is not q:
            return None  # cross-attention: q, k and v see different inputs
        return q.reshape(-1, mod.embed_dim)

    return extract


def _attention_output_cols(mod: nn.MultiheadAttention) -> Extractor:
    """Inputs of ``out_proj``, which `nn.MultiheadAttention` applies functionally: the attention
    is recomputed with an identity output projection (one extra attention per batch)."""

    def extract(args: tuple, kwargs: dict) -> torch.Tensor | None:
        names = ("query", "key", "value")
        q, k, v = (args[i] if len(args) > i else kwargs.get(names[i]) for i in range(3))
        if mod.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        d = mod.embed_dim
        out, _ = F.multi_head_attention_forward(
            q,
            k,
            v,
            d,
            mod.num_heads,
            mod.in_proj_weight,
            mod.in_proj_bias,
            mod.bias_k,
            mod.bias_v,
            mod.add_zero_attn,
            0.0,
            torch.eye(d, dtype=q.dtype),
            torch.zeros(d, dtype=q.dtype),
            training=False,
            key_padding_mask=kwargs.get("key_padding_mask"),
            need_weights=False,
            attn_mask=kwargs.get("attn_mask"),
            is_causal=bool(kwargs.get("is_causal", False)) and kwargs.get("attn_mask") is None,
            use_separate_proj_weight=not mod._qkv_same_embed_dim,
            q_proj_weight=getattr(mod, "q_proj_weight", None),
            k_proj_weight=getattr(mod, "k_proj_weight", None),
            v_proj_weight=getattr(mod, "v_proj_weight", None),
        )
        return out.reshape(-1, d)

    return extract


def _site(module: nn.Module, tensor: str) -> tuple[nn.Module, Extractor] | None:
    """The module whose call sees ``tensor``'s inputs, and how to turn them into columns."""
    owner_name, _, leaf = tensor.rpartition(".")
    modules = dict(module.named_modules())
    owner = modules.get(owner_name)
    if owner is None:
        return None
    parent_name, _, child = owner_name.rpartition(".")
    parent = modules.get(parent_name)
    if isinstance(parent, nn.MultiheadAttention) and child == "out_proj" and leaf == "weight":
        return parent, _attention_output_cols(parent)
    if isinstance(owner, nn.Linear) and leaf == "weight":
        return owner, _linear_cols(owner)
    if (
        isinstance(owner, nn.Conv1d | nn.Conv2d)
        and leaf == "weight"
        and owner.groups == 1
        and owner.padding_mode == "zeros"
        and not isinstance(owner.padding, str)
    ):
        return owner, _conv_cols(owner)
    if (
        isinstance(owner, nn.MultiheadAttention)
        and leaf == "in_proj_weight"
        and owner._qkv_same_embed_dim
    ):
        return owner, _attention_cols(owner)
    return None


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the hooked layer has been seen."""


@dataclass
class _Gram:
    """``H = 2 X X^T / n`` (float32) and the mean input ``mu`` of one layer."""

    h: torch.Tensor
    mu: torch.Tensor
    n: int
    #: ``2 (X - X_q)^T X_q / n``: how the original model's inputs ``X`` differ from the
    #: compressed model's ``X_q`` (``None`` without a reference model).
    drift: torch.Tensor | None = None


class Reconstructor:
    """Sequential second-order compression of the layers of one (working copy of a) model.

    Parameters
    ----------
    work
        The model being compressed, in place (the engine's clone).
    calibration
        `core.io.data.Dataset` whose ``x`` are fed to the model (at most `CALIBRATION_SAMPLES`).
    progress, cancel
        Messages per layer; the cancel token is checked between calibration batches.
    reference
        The uncompressed model (never modified). With it each layer targets the original
        model's outputs ``W X`` from the compressed inputs ``X_q`` (the least-squares weight
        ``W X^T X_q (X_q^T X_q)^-1``) instead of ``W X_q``, so it also undoes what earlier
        layers (and weights without a Gram matrix, such as embeddings) changed.
    """

    def __init__(
        self,
        work: LoadedModel,
        calibration,
        *,
        progress: ProgressFn = no_progress,
        cancel: CancelToken | None = None,
        reference: LoadedModel | None = None,
    ) -> None:
        check_calibration(work, calibration)
        self.work = work
        self.reference = reference
        n = len(calibration)
        g = torch.Generator().manual_seed(0)
        idx = torch.randperm(n, generator=g)[: min(n, CALIBRATION_SAMPLES)]
        self.x = calibration.x[idx]
        self.progress = progress
        self.cancel = cancel
        self.notes: list[str] = []

    # -- forward passes --------------------------------------------------------------------
    def _batches(self):
        for i in range(0, int(self.x.shape[0]), CALIBRATION_BATCH):
            if self.cancel is not None:
                self.cancel.check()
            yield self.x[i : i + CALIBRATION_BATCH]

    def _run(self, xb: torch.Tensor, model: LoadedModel | None = None) -> None:

        model = self.work if model is None else model
        with torch.no_grad(), eval_mode(model.module):
            try:
                forward(model, xb)
            except _Stop:
                pass

    def order(self, layers: list[LayerInfo]) -> list[LayerInfo]:
        """``layers`` in the order the model first calls them (unhooked ones last, in order)."""
        module = self.work.module
        seen: dict[int, int] = {}
        handles = []
        for layer in layers:
            site = _site(module, str(layer.tensor))
            if site is None:
                continue
            owner = site[0]

            def hook(mod, args, key=id(owner)):
                seen.setdefault(key, len(seen))

            handles.append(owner.register_forward_pre_hook(hook))
        try:
            self._run(self.x[:1])
        finally:
            for h in handles:
                h.remove()

        def rank(item: tuple[int, LayerInfo]) -> tuple[int, int]:
            i, layer = item
            site = _site(module, str(layer.tensor))
            first = seen.get(id(site[0])) if site is not None else None
            return (first if first is not None else len(seen) + i, i)

        return [layer for _, layer in sorted(enumerate(layers), key=rank)]

    def gram(self, layer: LayerInfo) -> _Gram | None:
        """``H`` and the mean input of ``layer`` on the calibration data, from the model as it
        is now; ``None`` when the layer's inputs cannot be captured (see the module docs)."""
        site = _site(self.work.module, str(layer.tensor))
        if site is None:
            return None
        owner, extract = site
        state: dict = {"h": None, "sum": None, "n": 0, "calls": 0, "stop": False, "bad": False}
        ref_site = None
        if self.reference is not None:
            ref_site = _site(self.reference.module, str(layer.tensor))
        refs: list[torch.Tensor] = []
        drift: dict = {"d": None, "ok": ref_site is not None}

        def ref_hook(mod, args, kwargs):
            x = ref_site[1](args, kwargs)
            if x is not None:
                refs.append(x.detach().to(torch.float32))
            if state["stop"]:
                raise _Stop()

        def hook(mod, args, kwargs):
            call = state["calls"]
            state["calls"] += 1
            x = extract(args, kwargs)
            if x is None:
                state["bad"] = True
                raise _Stop()
            x = x.detach().to(torch.float32)
            if state["h"] is None:
                state["h"] = torch.zeros(x.shape[1], x.shape[1])
                state["sum"] = torch.zeros(x.shape[1])
            state["h"].addmm_(x.T, x)
            state["sum"] += x.sum(dim=0)
            state["n"] += int(x.shape[0])
            if drift["ok"] and call < len(refs) and refs[call].shape == x.shape:
                if drift["d"] is None:
                    drift["d"] = torch.zeros_like(state["h"])
                drift["d"].addmm_((refs[call] - x).T, x)
            else:
                drift["ok"] = False
            if state["stop"]:
                raise _Stop()

        handle = owner.register_forward_pre_hook(hook, with_kwargs=True)
        ref_handle = None
        if ref_site is not None:
            ref_handle = ref_site[0].register_forward_pre_hook(ref_hook, with_kwargs=True)
        try:
            for i, xb in enumerate(self._batches()):
                refs.clear()
                state["calls"] = 0
                if ref_site is not None:
                    self._run(xb, self.reference)
                self._run(xb)
                if i == 0:
                    # stop the later passes early only when one call sees every input
                    state["stop"] = state["calls"] == 1
        finally:
            handle.remove()
            if ref_handle is not None:
                ref_handle.remove()
        if state["bad"]:
            return None
        if state["n"] == 0 and self.work.format in ("eager", "demo"):
            return None  # an eager module the forward pass does not call: plain rule, noted
        if state["n"] == 0:
            raise CompressionError(
                f"layer {layer.name!r}: its module was never called during the calibration "
                f"forward passes, so its inputs cannot be captured (a {self.work.format} model "
                "whose graph inlines its layers cannot be hooked)",
                path=self.work.source,
                hint="open the eager model, or use magnitude/round-to-nearest for this layer",
            )
        n = state["n"]
        d = drift["d"].mul_(2.0 / n) if (drift["ok"] and drift["d"] is not None) else None
        return _Gram(h=state["h"].mul_(2.0 / n), mu=state["sum"] / n, n=n, drift=d)

    # -- one layer -------------------------------------------------------------------------
    def apply_(
        self,
        layer: LayerInfo,
        cfg: LayerConfig,
        weight: torch.Tensor,
        mask: torch.Tensor | None,
        bias: torch.Tensor | None,
    ) -> tuple[QuantizedTensor | None, torch.Tensor | None]:
        """Compress ``weight`` in place as ``cfg`` asks, using this layer's calibration inputs.

        ``mask`` is the keep mask the plain criterion chose (its count is what the preview
        shows): kept as is for magnitude-style methods, re-chosen with the same count (or the
        same N:M pattern) for ``obs``/``obs_nm``. ``bias`` is updated in place when
        ``cfg.quant.bias_correction`` is set. Returns ``(codes or None, keep mask or None)``.
        """
        stats = self.gram(layer)
        if stats is None:
            self.notes.append(
                f"{layer.name}: its inputs cannot be captured ({layer.type}); used the plain "
                "magnitude mask and round-to-nearest"
            )
            self.progress(0.0, self.notes[-1])
            return _plain_(cfg, weight, mask)
        original = weight.detach().to(torch.float32).clone()
        prune = cfg.prune
        entry = prune_method(prune.method) if prune.active else None
        reselect = entry is not None and entry.needs_calibration
        quant = cfg.quant if cfg.quant.active else None
        gptq = quant is not None and quantizer(quant.method).needs_data
        rows = weight.shape[0]
        w2 = original.reshape(rows, -1)
        keep2 = None if mask is None else mask.reshape(rows, -1)
        if stats.drift is not None and bool(stats.drift.any()):
            w2 = w2 + retarget(w2, stats.h, stats.drift)
            weight.copy_(w2.reshape(weight.shape).to(weight.dtype))
        if not reselect and not gptq:
            qt, keep = _plain_(cfg, weight, mask)
        else:
            new, codes, scale, zp, keep_new = obs_gptq(
                w2,
                stats.h,
                keep=None if reselect else keep2,
                prune_count=(
                    int(keep2.numel() - keep2.sum())
                    if (reselect and not entry.semi_structured and keep2 is not None)
                    else None
                ),
                nm=(prune.n, prune.m) if (reselect and entry.semi_structured) else None,
                bits=quant.bits if gptq else None,
                symmetric=bool(quant.symmetric) if gptq else True,
                per_channel=bool(quant.per_channel) if gptq else False,
                group_size=quant.group_size if gptq else None,
            )
            keep = None if keep_new is None else keep_new.reshape(weight.shape)
            if gptq:
                qt = QuantizedTensor(
                    codes=codes.reshape(weight.shape),
                    scale=scale,
                    zero_point=zp,
                    bits=int(quant.bits),
                    symmetric=bool(quant.symmetric),
                    per_channel=bool(quant.per_channel),
                    mask=keep,
                    group_size=quant.group_size,
                )
                weight.copy_(dequantize(qt).to(weight.dtype))
            elif quant is not None:
                # OBS mask and update, then round to nearest on the updated weights
                weight.copy_(new.reshape(weight.shape).to(weight.dtype))
                qt, keep = _plain_(cfg, weight, keep)
            else:
                qt = None
                weight.copy_(new.reshape(weight.shape).to(weight.dtype))
        if quant is not None and quant.bias_correction and bias is not None:
            # E[W x] - E[W' x] = (W - W') mu: add it back so each output keeps its mean
            delta = (original - weight.detach().to(torch.float32)).reshape(rows, -1) @ stats.mu
            if delta.numel() == bias.numel():
                bias.add_(delta.reshape(bias.shape).to(bias.dtype))
        return qt, keep


def retarget(w: torch.Tensor, h: torch.Tensor, drift: torch.Tensor) -> torch.Tensor:
    """``W D (H + damping)^-1``: the change of ``W`` that best maps the compressed inputs onto
    the original outputs (``D = 2 (X - X_q)^T X_q / n``, ``H = 2 X_q^T X_q / n``)."""
    hd = h + DAMP * float(torch.diagonal(h).mean()) * torch.eye(h.shape[0])
    hd[torch.diagonal(h) <= 0, torch.diagonal(h) <= 0] += 1.0
    lower = torch.linalg.cholesky(hd)
    return torch.cholesky_solve((w @ drift).T, lower).T


def _plain_(
    cfg: LayerConfig, weight: torch.Tensor, mask: torch.Tensor | None
) -> tuple[QuantizedTensor | None, torch.Tensor | None]:
    """Magnitude mask + round to nearest, in place (the rule the engine applies otherwise)."""

    if cfg.quant.active:
        qt = quantize(
            weight,
            cfg.quant.bits,
            symmetric=cfg.quant.symmetric,
            per_channel=cfg.quant.per_channel,
            mask=mask,
            group_size=cfg.quant.group_size,
        )
        weight.copy_(dequantize(qt).to(weight.dtype))
        return qt, mask
    if mask is not None:
        weight.mul_(mask.to(weight.dtype))
    return None, mask


# ---------------------------------------------------------------------------------------
# the column loop
# ---------------------------------------------------------------------------------------
def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damping)^-1``; damping grows until it factorizes."""
    h = h.clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0  # inputs that are always zero: any weight there is free
    mean_diag = float(torch.diagonal(h).mean())
    damp = DAMP
    for _ in range(6):
        try:
            damped = h + damp * mean_diag * torch.eye(h.shape[0])
            lower = torch.linalg.cholesky(damped)
            inv = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(inv, upper=True)
        except torch.linalg.LinAlgError:
            damp *= 10.0
    raise CompressionError(
        "the calibration inputs' Hessian cannot be factorized even with strong damping",
        hint="use more (or more varied) calibration samples, or round-to-nearest here",
    )


def _block_size(group_size: int | None, m: int | None) -> int:
    """`BLOCK` rounded up to a multiple of the group size and of N:M's ``m``."""
    unit = math.lcm(group_size or 1, m or 1)
    return unit * max(1, -(-BLOCK // unit))


@dataclass
class _Grid:
    """GPTQ's quantization grid while the columns are rounded: the affine parameters (per
    row, or per group set as the columns reach each group), the current column's scale and
    zero point, and the int32 codes written so far."""

    bits: int
    symmetric: bool
    group_size: int | None
    codes: torch.Tensor
    scale: torch.Tensor
    zp: torch.Tensor
    s_col: torch.Tensor | None = None
    z_col: torch.Tensor | None = None

    @property
    def qmin(self) -> int:
        return 1 if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    def start_group(self, span: torch.Tensor, keep: torch.Tensor | None, g: int) -> None:
        """Fit group ``g``'s per-row parameters to its (compensated) columns ``span``."""
        gs, gz = quant_params(
            span, self.bits, symmetric=self.symmetric, per_channel=True, mask=keep
        )
        self.scale[:, g], self.zp[:, g] = gs, gz
        self.s_col, self.z_col = gs.reshape(-1), gz.reshape(-1)

    def round(self, q: torch.Tensor, gone: torch.Tensor, col: int) -> torch.Tensor:
        """Codes of column ``col`` (pruned rows at the zero point); returns their values."""
        s_vec = self.s_col.reshape(-1)
        z_vec = self.z_col.reshape(-1)
        c = torch.clamp(torch.round(q / s_vec) + z_vec, self.qmin, self.qmax).to(torch.int32)
        c = torch.where(gone, z_vec.to(torch.int32).expand_as(c), c)
        self.codes[:, col] = c
        q = (c - z_vec).to(torch.float32) * s_vec
        return torch.where(gone, torch.zeros_like(q), q)


def _new_grid(
    w: torch.Tensor,
    pruned: torch.Tensor,
    selects: bool,
    bits: int,
    symmetric: bool,
    per_channel: bool,
    group_size: int | None,
) -> _Grid:
    """The grid before the first column: fitted to ``w`` ungrouped, else one slot per group."""
    rows, cols = w.shape
    codes = torch.zeros((rows, cols), dtype=torch.int32)
    if group_size is not None:
        groups = -(-cols // group_size)
        scale = torch.ones(rows, groups)
        zp = torch.zeros(rows, groups, dtype=torch.int32)
        return _Grid(bits, symmetric, group_size, codes, scale, zp)
    scale, zp = quant_params(
        w,
        bits,
        symmetric=symmetric,
        per_channel=per_channel,
        mask=None if selects else ~pruned,
    )
    s_col = scale.reshape(-1, 1).expand(rows, 1) if scale.numel() > 1 else scale
    z_col = zp.reshape(-1, 1).expand(rows, 1) if zp.numel() > 1 else zp
    return _Grid(bits, symmetric, None, codes, scale, zp, s_col, z_col)


def _lowest_saliency(w1: torch.Tensor, d1: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the ``k`` lowest ``w^2 / [H^-1]_qq^2`` entries of the block ``w1``."""
    sal = (w1.pow(2) / d1.pow(2).reshape(1, -1)).reshape(-1)
    blk = torch.zeros(sal.numel(), dtype=torch.bool)
    if k:
        blk[torch.topk(sal, k, largest=False, sorted=False).indices] = True
    return blk.reshape(w1.shape)


def _prune_nm_run(
    w1: torch.Tensor,
    d1: torch.Tensor,
    pruned: torch.Tensor,
    i: int,
    col: int,
    nm: tuple[int, int],
) -> None:
    """Mark the N:M run starting at column ``col`` (block column ``i``) in ``pruned``."""
    n, m = nm
    cols = pruned.shape[1]
    nm_full, nm_tail = nm_group_counts(cols, n, m)
    width = m if col < nm_full * m else cols - col
    count = n if col < nm_full * m else nm_tail
    sal = w1[:, i : i + width].pow(2) / d1[i : i + width].pow(2).reshape(1, -1)
    run = torch.zeros_like(sal, dtype=torch.bool)
    if count:
        run.scatter_(1, torch.topk(sal, count, dim=1, largest=False).indices, True)
    pruned[:, col : col + width] = run


def _obs_block(
    w: torch.Tensor,
    u: torch.Tensor,
    pruned: torch.Tensor,
    b0: int,
    b1: int,
    prune_count: int | None,
    nm: tuple[int, int] | None,
    grid: _Grid | None,
) -> None:
    """Prune and/or round columns ``b0:b1`` of ``w`` in place, one column at a time, each
    column's error compensated in the block's remaining columns and then (lazily) in the
    columns after the block."""
    rows, cols = w.shape
    w1 = w[:, b0:b1].clone()
    q1 = torch.zeros_like(w1)
    err1 = torch.zeros_like(w1)
    u1 = u[b0:b1, b0:b1]
    d1 = torch.diagonal(u1)
    if prune_count is not None:
        k = prune_count * b1 // cols - prune_count * b0 // cols
        pruned[:, b0:b1] = _lowest_saliency(w1, d1, k)
    for i in range(b1 - b0):
        col = b0 + i
        if nm is not None and col % nm[1] == 0:
            _prune_nm_run(w1, d1, pruned, i, col, nm)
        if grid is not None and grid.group_size is not None and col % grid.group_size == 0:
            span = w1[:, i : i + grid.group_size]
            gkeep = None if nm is not None else ~pruned[:, col : col + span.shape[1]]
            grid.start_group(span, gkeep, col // grid.group_size)
        wc = w1[:, i]
        gone = pruned[:, col]
        q = torch.where(gone, torch.zeros_like(wc), wc)
        if grid is not None:
            q = grid.round(q, gone, col)
        q1[:, i] = q
        e = (wc - q) / d1[i]
        w1[:, i:] -= e.reshape(-1, 1) * u1[i, i:].reshape(1, -1)
        err1[:, i] = e
    w[:, b0:b1] = q1
    if b1 < cols:
        w[:, b1:] -= err1 @ u[b0:b1, b1:]


def obs_gptq(
    w: torch.Tensor,
    h: torch.Tensor,
    *,
    keep: torch.Tensor | None = None,
    prune_count: int | None = None,
    nm: tuple[int, int] | None = None,
    bits: int | None = None,
    symmetric: bool = True,
    per_channel: bool = False,
    group_size: int | None = None,
    _pruned_already: bool = False,
) -> tuple[
    torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None
]:
    """SparseGPT pruning and/or GPTQ rounding of one ``rows x cols`` weight matrix.

    Parameters
    ----------
    w
        The weights (float32, not modified).
    h
        ``cols x cols`` Hessian ``2 X X^T / n`` of the layer's inputs.
    keep
        A fixed keep mask (e.g. magnitude pruning): pruned weights stay exactly zero and the
        others compensate for them.
    prune_count
        Unstructured OBS: prune exactly this many weights, spread over the column blocks in
        proportion to their width; in each block the lowest ``w^2 / [H^-1]_qq^2`` go.
    nm
        ``(n, m)``: OBS N:M, in every run of ``m`` inputs of a row the ``n`` lowest saliencies
        are pruned (the short tail run as `core.ops.pruning.nm_mask` does).
    bits, symmetric, per_channel, group_size
        GPTQ onto this grid (`core.ops.quantization` conventions); ``bits=None``: no rounding.

    Returns
    -------
    tuple
        ``(weights, codes, scale, zero_point, keep)``: the new weights (pruned entries 0.0;
        quantized ones equal to ``dequantize`` of the codes), int32 codes or ``None``, the
        affine parameters (row-major per group when grouped) or ``None``, and the keep mask
        (``None`` when nothing is pruned).
    """
    w = w.detach().to(torch.float32).clone()
    rows, cols = w.shape
    if prune_count is not None and not 0 <= prune_count <= w.numel():
        raise ValueError(f"prune_count {prune_count} is out of range for {rows}x{cols}")
    prunes = prune_count is not None or nm is not None or (keep is not None and not keep.all())
    if bits is not None and prunes and not _pruned_already:
        # Prune and compensate first, then round the compensated weights with the mask fixed:
        # compensating for pruning moves kept weights outside the original range, and a grid
        # fixed beforehand would clip them (measured: worse than round-to-nearest).
        w, _, _, _, kept = obs_gptq(w, h, keep=keep, prune_count=prune_count, nm=nm)
        fixed = torch.ones_like(w, dtype=torch.bool) if kept is None else kept
        return obs_gptq(
            w,
            h,
            keep=fixed,
            bits=bits,
            symmetric=symmetric,
            per_channel=per_channel,
            group_size=group_size,
            _pruned_already=True,
        )
    u = _inverse_cholesky(h.to(torch.float32))
    pruned = torch.zeros_like(w, dtype=torch.bool) if keep is None else ~keep.to(torch.bool)
    selects = prune_count is not None or nm is not None
    block = _block_size(group_size, nm[1] if nm is not None else None)
    grid = None
    if bits is not None:
        grid = _new_grid(w, pruned, selects, bits, symmetric, per_channel, group_size)
    for b0 in range(0, cols, block):
        _obs_block(w, u, pruned, b0, min(b0 + block, cols), prune_count, nm, grid)
    keep_out = None if not pruned.any() and keep is None else ~pruned
    if grid is None:
        return w, None, None, None, keep_out
    scale, zp = grid.scale.reshape(-1).to(torch.float32), grid.zp.reshape(-1).to(torch.int32)
    return w, grid.codes, scale, zp, keep_out
