"""Statistics and score indices: exact counts, pooling, histograms, gradient statistics."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from core.analysis.inventory import inventory
from core.analysis.stats import (
    EDGE_VALUES,
    INF_EDGE,
    SMALL_MAX,
    ScoreIndex,
    analyze,
    build_index,
    gradient_stats,
    score_tensor,
)
from core.base.errors import Cancelled, CompressionError, DataError
from core.base.model import LoadedModel
from core.base.progress import CancelToken
from core.io.data import Dataset
from core.ops.pruning import threshold_mask
from core.recipe.plan import SCORE_ALIASES
from tests import models


def _awkward(n: int, seed: int = 0) -> torch.Tensor:
    """Gaussian weights with exact zeros, -0.0, ties, NaN and +-Inf mixed in."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g) * 0.05
    w[:50] = 0.0
    w[50:60] = -0.0
    w[60:70] = float("nan")
    w[70:75] = float("inf")
    w[75:80] = float("-inf")
    w[100:400] = w[400:700]  # ties
    w[700:800] = 0.0123
    return w[torch.randperm(n, generator=g)]


def _pruned(scores: torch.Tensor, t: float) -> int:
    """Weights the engine prunes at threshold ``t`` (its own mask function)."""
    return int((~threshold_mask(scores, t)).sum())


@pytest.mark.parametrize("n", [5_000, SMALL_MAX + 4_000])
def test_target_sparsity_lookup_is_exact(n):
    w = _awkward(n)
    scores = w.abs()
    index = build_index(scores, w)
    assert index.exact == (n <= SMALL_MAX)
    # a radix bin may hold a few tenths of a percent of a Gaussian's weights
    slack = 0 if index.exact else int(index.bin_counts.max())
    for s in (0.0, 0.001, 0.1, 0.25, 0.5, 0.77, 0.9, 0.99, 0.999):
        t = index.threshold_for_sparsity(s)
        assert t == float(np.float32(t))  # float32-exact, as a float32 score sees it
        count = index.count_below(t)
        assert count == _pruned(scores, t), (s, t)
        target = round(s * n)
        nonfinite = 20
        assert abs(count - max(target, nonfinite)) <= slack + 100  # ties: 100 equal values
    # ties resolve to the closest achievable count
    distinct = build_index(torch.rand(3000) + 0.1, torch.ones(3000))
    for s in (0.1, 0.333, 0.5):
        assert distinct.count_below(distinct.threshold_for_sparsity(s)) == round(s * 3000)


@pytest.mark.parametrize("n", [5_000, SMALL_MAX + 4_000])
def test_threshold_lookup_counts_the_applied_mask(n):
    w = _awkward(n, seed=1)
    scores = w.abs()
    index = build_index(scores, w)
    for t in (0.0, 1e-30, 0.001, 0.0123, 0.02, 0.05, 0.1, 0.3, 1e30, math.inf):
        ts = index.snap(t)
        if index.exact:
            assert ts == float(np.float32(t))
        else:  # an edge: low 16 bits of the float32 pattern are zero, within 2**-7 of t
            assert (np.array([ts], np.float32).view(np.uint32)[0] & 0xFFFF) == 0
            assert t == 0 or abs(ts - t) <= t * 2**-7 or math.isinf(t)
        assert index.count_below(t) == _pruned(scores, ts)


def test_radix_edges_give_exact_counts():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(300_000, generator=g) * torch.rand(300_000, generator=g) * 3
    index = build_index(w.abs(), w)
    assert not index.exact
    a = w.abs()
    for e in np.linspace(0x3000, 0x4100, 23).astype(int):
        assert index.count_below(float(EDGE_VALUES[e])) == int((a < float(EDGE_VALUES[e])).sum())
    assert index.count_below(float(EDGE_VALUES[INF_EDGE])) == w.numel()


def test_energy_below():
    g = torch.Generator().manual_seed(4)
    small = torch.randn(4000, generator=g)
    index = build_index(small.abs(), small)
    t = index.threshold_for_sparsity(0.6)
    direct = float(small.double().pow(2)[small.abs() < t].sum())
    assert index.energy_below(t) == pytest.approx(direct, rel=1e-12)
    # large magnitude index (from analyze): within-bin energy is estimated, bins are tiny
    lin = nn.Linear(1000, 200, bias=False)
    w = lin.weight.detach()
    mag = analyze(_loaded(nn.Sequential(lin))).tensors["0"].scores["magnitude"]
    assert not mag.exact
    for s in (0.3, 0.8):
        t = mag.threshold_for_sparsity(s)
        direct = float(w.double().pow(2)[w.abs() < t].sum())
        assert mag.energy_below(t) == pytest.approx(direct, rel=2e-3)
    # large index of another score: per-weight energies are summed exactly
    scores = torch.rand(w.shape, generator=g)
    other = build_index(scores, w)
    t = other.threshold_for_sparsity(0.5)
    direct = float(w.double().pow(2)[scores < t].sum())
    assert other.energy_below(t) == pytest.approx(direct, rel=1e-9)


def test_global_pool_is_exact():
    g = torch.Generator().manual_seed(5)
    tensors = [_awkward(3000, 1), torch.randn(90_000, generator=g), torch.rand(500, generator=g)]
    indices = [build_index(t.abs(), t) for t in tensors]
    pooled = ScoreIndex.pooled(indices)
    assert not pooled.exact and pooled.n == sum(t.numel() for t in tensors)
    everything = torch.cat([t.abs() for t in tensors])
    for s in (0.1, 0.5, 0.9):
        t = pooled.threshold_for_sparsity(s)
        per_member = sum(ix.count_below(t) for ix in indices)
        assert per_member == pooled.count_below(t) == _pruned(everything, t)
        assert abs(per_member / pooled.n - s) < 0.01
    # all members small: the pool is exact at any threshold
    exact_pool = ScoreIndex.pooled([indices[0], indices[2]])
    assert exact_pool.exact
    both = torch.cat([tensors[0].abs(), tensors[2].abs()])
    for t in (0.01, 0.0123, 0.4):
        assert exact_pool.count_below(t) == _pruned(both, t)
    t = exact_pool.threshold_for_sparsity(0.37)
    assert exact_pool.count_below(t) == _pruned(both, t)


def _loaded(module: nn.Module, fmt: str = "eager", example=None) -> LoadedModel:
    return LoadedModel(module=module, format=fmt, source="test", name="test", example_input=example)


@pytest.mark.parametrize("rows,cols", [(30, 40), (300, 400)])
def test_tensor_statistics(rows, cols):
    g = torch.Generator().manual_seed(6)
    lin = nn.Linear(cols, rows)
    with torch.no_grad():
        w = torch.randn(rows, cols, generator=g) * 0.1 + 0.01
        w[0, :5] = 0.0
        w[1, 0] = float("nan")
        w[2, 1] = float("inf")
        w[4] = float("nan")  # a whole channel of NaN must not bend min/max
        w[5] = 5.0 if rows == 30 else -5.0
        lin.weight.copy_(w)
    stats = analyze(_loaded(nn.Sequential(lin)))
    ts = stats.tensors["0"]
    fin = w[torch.isfinite(w)].double()
    assert ts.numel == rows * cols
    assert ts.nonfinite == 2 + cols
    assert ts.zeros == 5 and ts.sparsity == pytest.approx(5 / (rows * cols))
    assert ts.min == pytest.approx(float(fin.min())) and ts.max == pytest.approx(float(fin.max()))
    assert ts.mean == pytest.approx(float(fin.mean()), rel=1e-5)
    assert ts.std == pytest.approx(float(fin.std(correction=0)), rel=1e-5)
    assert ts.sumsq == pytest.approx(float(fin.pow(2).sum()), rel=1e-6)
    assert ts.hist.total == fin.numel()
    assert ts.hist_log.total == fin.numel() - 5
    assert ts.hist.edges[0] == pytest.approx(float(fin.min()), rel=1e-6)
    # the histogram's shape follows the data: its fullest bin holds the mode near the mean
    centre = 0.5 * (ts.hist.edges[:-1] + ts.hist.edges[1:])
    assert abs(centre[int(np.argmax(ts.hist.counts))] - 0.01) < 0.08
    assert ts.hist.counts[0 if rows > 30 else -1] >= cols  # the channel of +-5.0
    assert ts.row_max[3] == pytest.approx(float(w[3].max()))
    assert ts.row_min[0] == pytest.approx(float(w[0][torch.isfinite(w[0])].min()))
    # plus methods sharing the magnitude index (core.recipe.plan.SCORE_ALIASES, e.g. "obs")
    assert set(ts.scores) == {"magnitude", "channel_l1", "channel_l2", *SCORE_ALIASES}
    assert all(ts.scores[m] is ts.scores[a] for m, a in SCORE_ALIASES.items())
    assert ts.grad is None and not stats.has_gradients
    assert stats.total_params == rows * cols + rows


def test_score_definitions():
    w = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    assert torch.equal(score_tensor("magnitude", w, None), w.abs())
    assert torch.allclose(score_tensor("channel_l1", w, None), torch.tensor([3.0, 0.5]))
    assert torch.allclose(score_tensor("channel_l2", w, None), torch.tensor([5**0.5, 0.5]))
    with pytest.raises(CompressionError, match="gradient"):
        score_tensor("taylor", w, None)
    with pytest.raises(ValueError):
        score_tensor("nm", w, None)


# ---------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------
class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x)


def _tiny_data(n=14, labels=True):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(n, 4, generator=g)
    y = torch.randint(0, 3, (n,), generator=g) if labels else None
    return Dataset(x, y, "tiny")


@pytest.mark.parametrize("labels", [True, False])
def test_gradient_mean_std_match_hand_computation(labels):
    model = _Tiny()
    data = _tiny_data(labels=labels)
    stats = analyze(_loaded(model), data, grad_batches=3, batch_size=5)
    ts = stats.tensors["fc"]
    assert stats.has_gradients and ts.grad is not None and ts.grad.batches == 3
    # by hand: an independent copy, one autograd call per batch of 5 (the last has 4)
    ref = copy.deepcopy(model)
    grads = []
    for start in range(0, 14, 5):
        xb = data.x[start : start + 5]
        out = ref(xb)
        yb = data.y[start : start + 5] if labels else out.argmax(1).detach()
        loss = nn.functional.cross_entropy(out, yb)
        (g,) = torch.autograd.grad(loss, [ref.fc.weight])
        grads.append(g.double())
    stack = torch.stack(grads)
    mean = stack.mean(0)
    std = ((stack - mean) ** 2).mean(0).sqrt()
    assert torch.allclose(ts.grad.mean.double(), mean, atol=1e-7, rtol=1e-5)
    assert torch.allclose(ts.grad.std.double(), std, atol=1e-7, rtol=1e-5)
    assert ts.grad.hist_mean.total == 12 and ts.grad.hist_std.total == 12
    stab = score_tensor("gradient_stability", model.fc.weight, ts.grad)
    assert torch.allclose(stab.double(), torch.maximum(mean.abs(), std), atol=1e-7, rtol=1e-5)
    taylor = score_tensor("taylor", model.fc.weight, ts.grad).double()
    expect = model.fc.weight.detach().abs().double() * stack.pow(2).mean(0).sqrt()
    assert torch.allclose(taylor, expect, atol=1e-7, rtol=1e-5)
    assert set(ts.scores) >= {"gradient_stability", "taylor"}


def test_gradient_needs_class_logits():
    model, x = models.make("gru")
    data = Dataset(x, None, "seq")
    with pytest.raises(DataError, match="classifier"):
        analyze(_loaded(model, example=x), data)


def test_gradient_label_range_checked():
    data = Dataset(torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1]), "bad")
    with pytest.raises(DataError, match="labels must be in 0..2"):
        analyze(_loaded(_Tiny()), data)


def test_weights_only_model_has_no_gradients():
    from core.io.model_io import WeightsOnlyModule

    module = WeightsOnlyModule({"fc.weight": torch.randn(3, 4), "fc.bias": torch.zeros(3)})
    loaded = LoadedModel(
        module=module, format="safetensors", source="w.safetensors", name="w", weights_only=True
    )
    stats = analyze(loaded)  # histograms and indices need no forward pass
    assert stats.tensors and not stats.has_gradients
    with pytest.raises(DataError, match="weights-only"):
        analyze(loaded, _tiny_data())


def test_cancel_raises_and_leaves_the_model_untouched():
    model = _Tiny()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    token = CancelToken()
    seen = []

    def progress(fraction, message):
        seen.append(message)
        if "batch 2" in message:
            token.cancel()

    with pytest.raises(Cancelled):
        analyze(
            _loaded(model),
            _tiny_data(),
            grad_batches=3,
            batch_size=5,
            progress=progress,
            cancel=token,
        )
    assert any("batch 1" in m for m in seen)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model.training and all(p.grad is None for p in model.parameters())
    # cancelled before the statistics pass as well
    token2 = CancelToken()
    token2.cancel()
    with pytest.raises(Cancelled):
        analyze(_loaded(model), cancel=token2)


def _classifier_data(name: str, x: torch.Tensor, n: int = 24) -> Dataset:
    g = torch.Generator().manual_seed(9)
    if name == "transformer":
        xs = torch.randint(0, 100, (n, 16), generator=g)
    else:
        xs = torch.randn((n,) + tuple(x.shape[1:]), generator=g)
    return Dataset(xs, None, name)


@pytest.mark.parametrize("name", ["resnet", "transformer", "lstm"])
@pytest.mark.parametrize("fmt", ["eager", "torchscript", "pt2"])
def test_generated_models_are_analyzable(name, fmt):
    model, x = models.make(name)
    if fmt == "torchscript":
        module = torch.jit.trace(model, x, check_trace=False)
    elif fmt == "pt2":
        module = torch.export.export(model, (x,)).module()
    else:
        module = model
    loaded = _loaded(module, fmt, example=x)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    stats = analyze(loaded, _classifier_data(name, x), grad_batches=2, batch_size=8)
    prunable = [layer for layer in inventory(loaded) if layer.prunable]
    assert prunable and set(stats.tensors) == {layer.name for layer in prunable}
    assert stats.has_gradients
    named = dict(module.named_parameters())
    for layer in prunable:
        ts = stats.tensors[layer.name]
        assert ts.grad is not None and tuple(ts.grad.mean.shape) == tuple(layer.shape)
        assert float(ts.grad.std.abs().sum()) >= 0.0 and torch.isfinite(ts.grad.mean).all()
        index = ts.scores["taylor"]
        t = index.threshold_for_sparsity(0.5)
        scores = score_tensor("taylor", named[layer.tensor], ts.grad)
        assert index.count_below(t) == _pruned(scores, t)
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k])


def test_gradient_stats_requires_positive_batches():
    with pytest.raises(ValueError):
        gradient_stats(_loaded(_Tiny()), _tiny_data(), ["fc.weight"], batches=0)


def test_progress_is_monotonic_and_complete():
    seen = []
    analyze(
        _loaded(_Tiny()),
        _tiny_data(),
        grad_batches=3,
        batch_size=5,
        progress=lambda f, m: seen.append(f),
    )
    assert seen[-1] == 1.0 and seen == sorted(seen) and len(seen) >= 5
