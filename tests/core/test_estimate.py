"""Live preview: exact sparsity (the engine's masks), packed bytes, entropy bound and SQNR."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from core.analysis.estimate import code_entropy, preview
from core.analysis.selection import count_mask
from core.analysis.stats import SMALL_MAX, analyze, score_tensor
from core.base.errors import CompressionError
from core.base.model import LoadedModel
from core.compress.engine import compress
from core.io.data import Dataset
from core.io.model_io import load_model
from core.ops.pruning import channel_mask, nm_mask, threshold_mask
from core.ops.quantization import quantize
from core.packed import pack_result
from core.recipe.plan import CompressionPlan, LayerConfig, PruneConfig, simple_plan
from tests import models


class _Net(nn.Module):
    """A classifier with one layer above `SMALL_MAX` weights (radix index) and small ones."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(11)
        self.a = nn.Linear(64, 400)
        self.b = nn.Linear(400, 200)
        self.c = nn.Linear(200, 10)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.fixture(scope="module")
def net():
    model = _Net().eval()
    loaded = LoadedModel(module=model, format="eager", source="test:net", name="net")
    g = torch.Generator().manual_seed(12)
    data = Dataset(torch.randn(96, 64, generator=g), torch.randint(0, 10, (96,), generator=g), "d")
    stats = analyze(loaded, data, grad_batches=3, batch_size=32)
    assert not stats.tensors["b"].scores["magnitude"].exact  # 80000 > SMALL_MAX
    assert stats.tensors["b"].numel > SMALL_MAX
    return loaded, stats


@pytest.fixture(scope="module")
def mlp():
    loaded = load_model("demo:mlp")
    return loaded, analyze(loaded)


def _plans() -> dict[str, CompressionPlan]:
    per_layer = CompressionPlan(
        default=LayerConfig(prune=PruneConfig(method="magnitude", sparsity=0.7))
    ).with_layer(
        "b", LayerConfig(prune=PruneConfig(method="magnitude", mode="threshold", threshold=0.03))
    )
    mixed = (
        simple_plan(0.8, 6, "magnitude")
        .with_layer("a", LayerConfig(prune=PruneConfig(method="channel_l1", sparsity=0.25)))
        .with_layer("c", LayerConfig(prune=PruneConfig(method="nm", n=2, m=4)))
    )
    return {
        "layer": per_layer,
        "global": simple_plan(0.85, None, "magnitude"),
        "mixed": mixed,
        "l2": simple_plan(0.4, 4, "channel_l2"),
        "taylor": simple_plan(0.6, 5, "taylor"),
        "stability": simple_plan(0.5, None, "gradient_stability"),
        "threshold-global": CompressionPlan(
            default=LayerConfig(
                prune=PruneConfig(
                    method="magnitude", mode="threshold", threshold=0.02, scope="global"
                )
            )
        ),
    }


def _mask(stats, layer, lp, weight):
    cfg_method = lp.method
    if cfg_method == "none":
        return torch.ones_like(weight, dtype=torch.bool)
    if cfg_method == "nm":
        return nm_mask(weight, 2, 4)
    ts = stats.tensors[layer.name]
    scores = score_tensor(cfg_method, weight, ts.grad)
    if lp.count is not None:
        # a target sparsity is applied as an exact count: the count smallest scores
        keep = count_mask(scores, lp.count)
        pruned, kept = scores[~keep & torch.isfinite(scores)], scores[keep]
        if pruned.numel() and kept.numel():
            assert float(pruned.max()) <= float(kept.min())
        if scores.ndim == 1 and weight.ndim > 1:
            return keep.reshape((-1,) + (1,) * (weight.ndim - 1)).expand(weight.shape)
        return keep
    if cfg_method in ("channel_l1", "channel_l2"):
        return channel_mask(scores, lp.threshold, weight.shape)
    return threshold_mask(scores, lp.threshold)


@pytest.mark.parametrize("plan_name", list(_plans()))
def test_preview_nnz_is_the_applied_mask(net, plan_name):
    loaded, stats = net
    plan = _plans()[plan_name]
    pv = preview(stats, plan)
    params = dict(loaded.module.named_parameters())
    layers = {layer.name: layer for layer in stats.layers}
    for lp in pv.layers:
        mask = _mask(stats, layers[lp.name], lp, params[lp.tensor].detach())
        assert int(mask.sum()) == lp.nnz, (plan_name, lp.name)
        assert lp.sparsity == pytest.approx(1 - lp.nnz / lp.numel)
    assert pv.total_nnz == sum(lp.nnz for lp in pv.layers)
    if plan_name.startswith("global") or plan_name == "threshold-global":
        assert len({lp.threshold for lp in pv.layers}) == 1
        assert {lp.scope for lp in pv.layers} == {"global"}
    if plan_name == "global":
        assert pv.sparsity == pytest.approx(0.85, abs=0.005)
    if plan_name == "layer":
        assert pv.layer("a").sparsity == pytest.approx(0.7, abs=1e-4)  # exact index
        assert pv.layer("c").sparsity == pytest.approx(0.7, abs=1e-3)
        assert pv.layer("b").threshold == pytest.approx(0.03, rel=2**-7)


def test_engine_applies_the_previewed_sparsity(net):
    loaded, stats = net
    plan = _plans()["mixed"]
    pv = preview(stats, plan)
    result = compress(loaded, plan, stats)
    for lp in pv.layers:
        assert int(result.masks[lp.tensor].sum()) == lp.nnz
    # bytes: the preview is the packed archive's own size model for the compressed result
    _, _, _, estimate = pack_result(result)
    assert pv.packed_bytes == estimate.total
    for lp in pv.layers:
        assert lp.packed_bytes == estimate.tensors[lp.tensor]


def test_totals_and_ratio(mlp):
    loaded, stats = mlp
    plan = simple_plan(0.9, 5)
    pv = preview(stats, plan)
    floats = sum(p.numel() for p in loaded.module.parameters() if p.is_floating_point())
    assert pv.dense_bytes == 4 * floats
    assert pv.compression_ratio == pytest.approx(pv.dense_bytes / pv.packed_bytes)
    assert pv.total_numel == sum(stats.tensors[n].numel for n in stats.tensors)
    assert pv.sparsity == pytest.approx(0.9, abs=1e-4)
    assert 0 < pv.entropy_bytes < pv.packed_bytes
    assert pv.header_bytes > 0 and pv.packed_bytes > pv.header_bytes
    result = compress(loaded, plan, stats)
    _, _, records, estimate = pack_result(result)
    assert pv.packed_bytes == estimate.total
    # entropy bound: estimated from histograms, compared with the real codes' entropy
    real = {r.name: r.entropy_bytes for r in records}
    for lp in pv.layers:
        assert lp.entropy_bytes == pytest.approx(real[lp.tensor], rel=0.08), lp.name
    assert sum(lp.entropy_bytes for lp in pv.layers) == pytest.approx(
        sum(real[lp.tensor] for lp in pv.layers), rel=0.04
    )


def test_sqnr_estimates(mlp):
    loaded, stats = mlp
    # pruning only: pruned energy is exact for sorted indices, so SQNR matches the result
    prune_only = simple_plan(0.7, None)
    pv = preview(stats, prune_only)
    measured = {r.name: r.sqnr_db for r in compress(loaded, prune_only, stats).layers}
    for lp in pv.layers:
        assert lp.sqnr_db == pytest.approx(measured[lp.name], abs=1e-6)
    # quantization only: uniform-noise model delta**2 / 12
    for bits, per_channel in ((8, False), (6, True)):
        plan = simple_plan(0.0, bits, per_channel=per_channel)
        pv = preview(stats, plan)
        measured = {r.name: r.sqnr_db for r in compress(loaded, plan, stats).layers}
        for lp in pv.layers:
            assert abs(lp.sqnr_db - measured[lp.name]) < 1.0, (bits, lp.name)
    assert preview(stats, CompressionPlan()).sqnr_db == math.inf


def test_code_entropy_matches_real_codes():
    g = torch.Generator().manual_seed(13)
    w = torch.randn(120_000, generator=g) * 0.1
    lin = nn.Linear(1, 1)
    lin.weight = nn.Parameter(w.reshape(300, 400))
    stats = analyze(LoadedModel(module=nn.Sequential(lin), format="eager", source="t", name="t"))
    mag = stats.tensors["0"].scores["magnitude"]
    for bits in (3, 4, 8, 12):
        qt = quantize(w, bits, symmetric=True)
        codes = (qt.codes - qt.zero_point).abs().numpy()
        _, counts = np.unique(codes, return_counts=True)
        p = counts / counts.sum()
        real = float(-(p * np.log2(p)).sum())
        bins, kept = mag.kept_bins(0.0)
        estimate, nonzero = code_entropy(bins, kept, float(qt.scale))
        assert estimate == pytest.approx(real, rel=0.02, abs=0.02), bits
        assert nonzero == pytest.approx(float((codes != 0).mean()), abs=0.01)


def test_skip_and_no_pruning(mlp):
    _, stats = mlp
    plan = simple_plan(0.9, 4).with_layer("fc2", LayerConfig(skip=True))
    pv = preview(stats, plan)
    lp = pv.layer("fc2")
    assert lp.skip and lp.threshold is None and lp.bits is None
    assert lp.nnz == lp.numel and lp.sqnr_db == math.inf
    assert lp.packed_bytes == 4 * lp.numel == lp.entropy_bytes
    # the skipped layer leaves the global pool: the others share one threshold
    assert pv.layer("fc1").threshold == pv.layer("fc3").threshold
    dense = preview(stats, CompressionPlan())
    assert dense.sparsity == 0.0 and all(lp.threshold is None for lp in dense.layers)
    assert dense.packed_bytes > dense.dense_bytes  # raw tensors plus a header


def test_gradient_plan_without_gradients_is_refused(mlp):
    _, stats = mlp
    plan = simple_plan(0.5, None).with_layer(
        "fc2", LayerConfig(prune=PruneConfig(method="taylor", sparsity=0.5))
    )
    with pytest.raises(CompressionError, match="'fc2'.*taylor.*gradient") as err:
        preview(stats, plan)
    assert "load data" in str(err.value)
    with pytest.raises(CompressionError, match="gradient_stability"):
        preview(stats, simple_plan(0.5, None, "gradient_stability"))


def test_unknown_layer_is_refused(mlp):
    _, stats = mlp
    plan = CompressionPlan().with_layer("nope", LayerConfig(skip=True))
    with pytest.raises(CompressionError, match="'nope'"):
        preview(stats, plan)


@pytest.mark.parametrize("name", ["resnet", "transformer", "lstm"])
def test_generated_models_preview_matches_masks(name):
    model, x = models.make(name)
    loaded = LoadedModel(module=model, format="eager", source=name, name=name, example_input=x)
    stats = analyze(loaded)
    params = dict(model.named_parameters())
    layers = {layer.name: layer for layer in stats.layers}
    for plan in (
        simple_plan(0.6, 4),
        simple_plan(0.3, 8, "channel_l2"),
        simple_plan(0.0, None, "nm"),
    ):
        pv = preview(stats, plan)
        for lp in pv.layers:
            mask = _mask(stats, layers[lp.name], lp, params[lp.tensor].detach())
            assert int(mask.sum()) == lp.nnz, (name, lp.name)


def test_all_zero_layer_is_previewed():
    model = nn.Sequential(nn.Linear(300, 300), nn.Linear(30, 10))
    with torch.no_grad():
        model[0].weight.zero_()
        model[1].weight.zero_()
    stats = analyze(LoadedModel(module=model, format="eager", source="z", name="z"))
    ts = stats.tensors["0"]
    assert ts.zeros == ts.numel and ts.sparsity == 1.0 and ts.hist_log.total == 0
    pv = preview(stats, simple_plan(0.5, 4, scope="layer"))
    for lp in pv.layers:
        # every score ties at 0: ties break by index, so the target count is still exact
        assert lp.nnz == lp.numel - round(0.5 * lp.numel)
        assert lp.threshold == 0.0 and lp.sqnr_db == math.inf
