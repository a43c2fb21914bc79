"""Compression results built directly from masks + `core.ops.quantization.quantize` (export tests).

The export tests need many plans on many models, fast; building the result by hand keeps them
independent of statistics/thresholds while producing exactly the shape the engine returns
(`core.compress.engine.CompressionResult`: dequantized weights in the compressed copy, masks and codes
keyed by parameter name).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import core.analysis.estimate
from core.base.model import LoadedModel
from core.compress.engine import CompressionResult, LayerReport
from core.ops.pruning import nm_mask
from core.ops.quantization import dequantize, quantize
from core.recipe.plan import CompressionPlan, simple_plan


def compressible(module: nn.Module) -> list[str]:
    """Parameter names the fixtures compress: every weight matrix/kernel (ndim >= 2)."""
    return [n for n, p in module.named_parameters() if p.ndim >= 2 and p.is_floating_point()]


def _mask(w: torch.Tensor, method: str, sparsity: float) -> torch.Tensor | None:
    if method == "nm":
        return nm_mask(w, 2, 4)
    if method == "channel":
        norms = w.detach().reshape(w.shape[0], -1).abs().sum(dim=1)
        k = int(round(sparsity * w.shape[0]))
        rows = torch.ones(w.shape[0], dtype=torch.bool)
        rows[torch.argsort(norms, stable=True)[:k]] = False
        return rows.reshape((-1,) + (1,) * (w.ndim - 1)).expand(w.shape).clone()
    if sparsity <= 0:
        return None
    flat = w.detach().abs().reshape(-1)
    k = int(round(sparsity * flat.numel()))
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[torch.argsort(flat, stable=True)[:k]] = False
    return keep.reshape(w.shape)


def make_result(
    loaded: LoadedModel,
    *,
    sparsity: float = 0.9,
    bits: int | None = 5,
    symmetric: bool = False,
    per_channel: bool = False,
    method: str = "magnitude",
    plan: CompressionPlan | None = None,
) -> CompressionResult:
    """Prune (magnitude / channel L1 / 2:4) and quantize every weight matrix of a copy."""
    work = copy.deepcopy(loaded.module)
    params = dict(work.named_parameters())
    masks, quantized, reports = {}, {}, []
    for name in compressible(loaded.module):
        w = params[name]
        mask = _mask(w, method, sparsity)
        with torch.no_grad():
            if bits is not None:
                qt = quantize(w, bits, symmetric=symmetric, per_channel=per_channel, mask=mask)
                w.copy_(dequantize(qt).to(w.dtype))
                quantized[name] = qt
            elif mask is not None:
                w.mul_(mask.to(w.dtype))
        if mask is not None:
            masks[name] = mask
        nnz = int(mask.sum()) if mask is not None else w.numel()
        reports.append(
            LayerReport(
                name=name.rsplit(".", 1)[0],
                tensor=name,
                type="Linear",
                shape=tuple(w.shape),
                numel=w.numel(),
                nnz=nnz,
                sparsity=1 - nnz / w.numel(),
                method=method if mask is not None else "none",
                threshold=None,
                bits=bits,
                symmetric=symmetric,
                per_channel=per_channel,
                sqnr_db=30.0,
                dense_bytes=4 * w.numel(),
                packed_bytes=0,
                original_numel=w.numel(),
            )
        )
    compressed = LoadedModel(
        module=work,
        format=loaded.format,
        source=loaded.source,
        name=loaded.name,
        example_input=loaded.example_input,
        weights_only=loaded.weights_only,
        task=loaded.task,
    )
    if plan is None:
        plan = simple_plan(
            sparsity if method != "nm" else 0.0,
            bits,
            {"channel": "channel_l1"}.get(method, method),
            symmetric=symmetric,
            per_channel=per_channel,
        )
    return CompressionResult(
        original=loaded,
        compressed=compressed,
        plan=plan,
        masks=masks,
        quantized=quantized,
        layers=tuple(reports),
    )


def eager(model: nn.Module, example: torch.Tensor, name: str = "test") -> LoadedModel:
    return LoadedModel(
        module=model, format="eager", source=f"<{name}>", name=name, example_input=example
    )


def count_layer_rows(monkeypatch) -> list[str]:
    """The names of the layers whose preview row `core.analysis.estimate` computes from now
    on (the list grows as they are computed)."""
    computed: list[str] = []
    row = core.analysis.estimate._layer_row

    def counting(layer, *args, **kwargs):
        computed.append(layer.name)
        return row(layer, *args, **kwargs)

    monkeypatch.setattr(core.analysis.estimate, "_layer_row", counting)
    return computed
