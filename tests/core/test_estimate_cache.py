"""`PreviewCache` (the window's live preview) equals `preview` exactly, and re-estimates only
what a plan edit changed.

Random plan edits as the window makes them (slider drags of the default, quantization
changes, per-layer overrides, methods, scopes, modes) on the ResNet-50 layout (radix and exact
score indices, a mixed global pool) and on a transformer with gradients (exact indices,
gradient criteria): every cached preview is compared field for field, as ``repr`` (so
``-0.0``/``0.0`` and the last bit of every float count), with a fresh `preview`.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace

import numpy as np
import pytest
import torch

import core.analysis.estimate as estimate
from core.analysis.estimate import PreviewCache, _KeptHistogram, code_entropy, preview
from core.analysis.selection import global_counts, target_count
from core.analysis.stats import ScoreIndex, analyze
from core.base.methods import prune_method, prune_method_names
from core.base.model import LoadedModel
from core.io.data import Dataset
from core.packed import estimate_archive_bytes
from core.recipe.plan import CompressionPlan, LayerConfig, PruneConfig, QuantConfig, simple_plan
from tests import models
from tests.core._fixtures import count_layer_rows

METHODS = prune_method_names()
GRADIENT = set(prune_method_names(needs_gradients=True))


@pytest.fixture(scope="module")
def resnet50_stats():
    """The ResNet-50 layout (107 layers: 53 conv, 53 BatchNorm, fc) at a quarter width: big
    layers get radix indices, small ones exact ones, as on the full-size model."""
    torch.manual_seed(0)
    model = models.ResNet50(base=16, classes=100).eval()
    stats = analyze(LoadedModel(module=model, format="eager", source="test:r50", name="r50"))
    kinds = {ts.scores["magnitude"].exact for ts in stats.tensors.values()}
    assert kinds == {True, False}  # both kinds of index are in the pool
    assert len(stats.layers) == 107
    return stats


@pytest.fixture(scope="module")
def transformer_stats():
    model, _ = models.make("transformer")
    loaded = LoadedModel(module=model, format="eager", source="test:tt", name="tt")
    g = torch.Generator().manual_seed(3)
    data = Dataset(torch.randint(0, 100, (64, 16), generator=g), torch.randint(0, 5, (64,)), "d")
    stats = analyze(loaded, data, grad_batches=2, batch_size=32)
    assert stats.has_gradients
    return stats


def _prunable(stats) -> list[str]:
    return [layer.name for layer in stats.layers if layer.prunable and layer.tensor is not None]


def _random_config(rng: random.Random, grads: bool, *, default: bool) -> LayerConfig:
    methods = [m for m in METHODS if grads or m not in GRADIENT]
    method = rng.choice(methods)
    scope = "layer"
    if default and rng.random() < 0.6 and not prune_method(method).layer_scope_only:
        scope = "global"
    mode = "threshold" if rng.random() < 0.3 else "sparsity"
    prune = PruneConfig(
        method=method,
        mode=mode,
        sparsity=rng.choice([0.0, rng.random() * 0.99]),
        threshold=rng.random() * (0.05 if method == "magnitude" else 1.0),
        scope=scope,
        n=rng.choice([1, 2]),
        m=4,
    )
    bits = rng.choice([None, 2, 3, 4, 5, 6, 8, 12, 16])
    per_channel = rng.random() < 0.5
    quant = QuantConfig(
        bits=bits,
        symmetric=rng.random() < 0.5,
        per_channel=per_channel,
        bias_bits=rng.choice([None, 8]),
        group_size=rng.choice([None, 32]) if per_channel else None,
    )
    return LayerConfig(prune=prune, quant=quant, skip=rng.random() < 0.05)


def _edit(rng: random.Random, plan: CompressionPlan, names: list[str], grads: bool):
    """One edit as the window makes it (a drag step, a toggle, an override...)."""
    d = plan.default
    kind = rng.choice(["drag", "drag", "drag", "bits", "override", "drop", "default", "nudge"])
    if kind == "drag":
        value = min(max(d.prune.sparsity + rng.uniform(-0.05, 0.05), 0.0), 0.99)
        return plan.with_default(replace(d, prune=replace(d.prune, sparsity=value)))
    if kind == "bits":
        return plan.with_default(replace(d, quant=replace(d.quant, bits=rng.choice([None, 4, 6]))))
    if kind == "override":
        return plan.with_layer(rng.choice(names), _random_config(rng, grads, default=False))
    if kind == "drop" and plan.overrides:
        return plan.without_layer(rng.choice(plan.overrides)[0])
    if kind == "nudge" and plan.overrides:
        name, cfg = rng.choice(plan.overrides)
        value = min(max(cfg.prune.sparsity + rng.uniform(-0.05, 0.05), 0.0), 0.99)
        return plan.with_layer(name, replace(cfg, prune=replace(cfg.prune, sparsity=value)))
    return plan.with_default(_random_config(rng, grads, default=True))


def _outcome(fn, plan):
    try:
        return repr(fn(plan))
    except estimate.CompressionError as exc:
        return f"error: {exc}"


@pytest.mark.parametrize("which", ["resnet50", "transformer"])
def test_cached_previews_equal_fresh_ones_over_random_edits(which, request):
    stats = request.getfixturevalue(f"{which}_stats")
    grads = stats.has_gradients
    names = _prunable(stats)
    rng = random.Random(20)
    cache = PreviewCache(stats)
    plan = simple_plan(0.5, 6)
    compared = errors = 0
    for _ in range(160):
        plan = _edit(rng, plan, names, grads)
        fresh = _outcome(lambda p: preview(stats, p), plan)
        assert _outcome(cache.preview, plan) == fresh, plan
        compared += 1
        errors += fresh.startswith("error")
    assert errors < compared // 2  # most plans are valid: the numbers were compared
    # The same plans again, now mostly from the cache: still equal.
    rng = random.Random(20)
    plan = simple_plan(0.5, 6)
    for _ in range(40):
        plan = _edit(rng, plan, names, grads)
        assert _outcome(cache.preview, plan) == _outcome(lambda p: preview(stats, p), plan)


def test_a_layer_edit_recomputes_only_that_layer(resnet50_stats, monkeypatch):
    stats = resnet50_stats
    names = _prunable(stats)
    computed = count_layer_rows(monkeypatch)
    cache = PreviewCache(stats)
    base = simple_plan(0.6, 6, scope="layer")
    cache.preview(base)
    assert sorted(computed) == sorted(names)
    # a drag of one layer's own sparsity: one row per step
    target = names[10]
    cfg = base.default
    for step in range(1, 6):
        computed.clear()
        plan = base.with_layer(target, replace(cfg, prune=replace(cfg.prune, sparsity=0.1 * step)))
        cached = cache.preview(plan)
        assert computed == [target]
        assert repr(cached) == repr(preview(stats, plan))
    # the same plan again: nothing recomputed; back to the plan of five steps ago: only
    # the layer that differs from the last plan
    computed.clear()
    cache.preview(plan)
    assert computed == []
    cache.preview(base)
    assert computed == [target]
    # a whole-model bit-width change touches every layer
    computed.clear()
    cache.preview(simple_plan(0.6, 4, scope="layer"))
    assert sorted(computed) == sorted(names)


def test_a_global_drag_reuses_the_pool_and_the_unchanged_tensors(resnet50_stats, monkeypatch):
    stats = resnet50_stats
    cache = PreviewCache(stats)
    pools, parts = [], []
    monkeypatch.setattr(
        estimate, "_global_pool", lambda *a, _f=estimate._global_pool: pools.append(1) or _f(*a)
    )
    part = estimate_archive_bytes.__globals__["_tensor_part"]
    monkeypatch.setitem(
        estimate_archive_bytes.__globals__, "_tensor_part", lambda s: parts.append(s) or part(s)
    )
    cache.preview(simple_plan(0.3, 6))
    coded = len(_prunable(stats))
    assert len(parts) == len(stats.state) and len(pools) == 1
    for s in (0.31, 0.32):
        pools.clear(), parts.clear()
        plan = simple_plan(s, 6)
        assert repr(cache.preview(plan)) == repr(preview(stats, plan))
        # the uncached preview sized every tensor once more; the cache at most the coded
        # ones (a small layer may keep its count for a step)
        assert len(pools) == 2 and len(stats.state) < len(parts) <= len(stats.state) + coded
    # a bit-width step back and forth: the pool (same target) is reused
    pools.clear()
    cache.preview(simple_plan(0.32, 4))
    cache.preview(simple_plan(0.32, 6))
    assert pools == []
    # only the last plan's entries are kept (nothing piles up for the garbage collector)
    assert len(cache._rows) == coded and len(cache._parts) == len(stats.state)


def test_kept_histogram_entropy_equals_code_entropy_of_kept_bins(resnet50_stats):
    rng = np.random.default_rng(5)
    checked = tails = 0
    for name in _prunable(resnet50_stats)[::7]:
        ts = resnet50_stats.tensors[name]
        index = ts.scores["magnitude"]
        kept = _KeptHistogram(index)
        top = float(np.abs([ts.min, ts.max]).max())
        thresholds = [0.0, top * 2, *(top * rng.random(6)), *(top * 1e-3 * rng.random(3))]
        # coarse grids, fine ones (beyond the exact-cell limit: the closed-form tail) and
        # degenerate steps
        deltas = [top / 3, top / 40, top / 5000, top / 1e6, 0.0, math.inf]
        for t in thresholds:
            for delta in deltas:
                want = code_entropy(*index.kept_bins(t), delta)
                assert kept.code_entropy(t, delta) == want, (name, t, delta)
                checked += 1
                tails += delta == top / 1e6 and want[0] > 0
    assert checked > 100 and tails > 0


def _radix_members(rng: np.random.Generator, k: int) -> list[ScoreIndex]:
    out = []
    for _ in range(k):
        n_bins = int(rng.integers(0, 40))
        bins = np.sort(rng.choice(np.arange(15_000, 16_500), size=n_bins, replace=False))
        counts = rng.integers(1, 50, size=n_bins)
        cum = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
        energy = np.concatenate(([0.0], np.cumsum(rng.random(n_bins))))
        nonfinite = int(rng.integers(0, 3))
        out.append(
            ScoreIndex(
                n=int(cum[-1]) + nonfinite,
                unit=1,
                nonfinite=nonfinite,
                nonfinite_energy=0.0,
                bins=bins.astype(np.int32),
                bin_cum=cum,
                bin_energy=energy,
            )
        )
    return out


def test_global_counts_from_the_pool_equal_the_merge():
    rng = np.random.default_rng(8)
    for _ in range(200):
        members = _radix_members(rng, int(rng.integers(1, 8)))
        pool = ScoreIndex.pooled(members)
        target = target_count(pool.n, pool.nonfinite, float(rng.random()))
        assert global_counts(members, target, pool=pool) == global_counts(members, target)


def _merged_counts(members: list[ScoreIndex], count: int) -> tuple[list[int], float]:
    """`global_counts`' exact path for any number of members (what one member used)."""
    twin = ScoreIndex(**{**members[0].__dict__})  # a second, equal member
    counts, threshold = global_counts([members[0], twin], 2 * count)
    return [counts[0]], threshold


def test_one_exact_member_prunes_exactly_its_count(resnet50_stats):
    for name in _prunable(resnet50_stats)[:12]:
        index = resnet50_stats.tensors[name].scores["magnitude"]
        if not index.exact:
            continue
        for sparsity in (0.0, 0.1, 0.5, 0.77, 0.99, 1.0):
            count = target_count(index.n, index.nonfinite, sparsity)
            counts, threshold = global_counts([index], count, pool=index)
            assert counts == [count]
            # the same threshold as the general path (there: the kf smallest of two equal
            # members pool as pairs, so the boundary value is the same)
            assert threshold == _merged_counts([index], count)[1]
            assert index.count_below(threshold) <= count


def test_unchanged_layers_keep_their_layer_preview_object(resnet50_stats):
    """A step hands back the previous `LayerPreview` object for every layer it did not
    change (the window's table skips those rows by identity) and a new, equal-to-`preview`
    one for every layer it changed."""
    stats = resnet50_stats
    cache = PreviewCache(stats)
    base = simple_plan(0.5, 6, scope="layer")  # (a global pool moves with any member)
    first = cache.preview(base)
    name = _prunable(stats)[7]
    plan = base.with_layer(name, LayerConfig(prune=PruneConfig(method="magnitude", sparsity=0.9)))
    second = cache.preview(plan)
    assert repr(second) == repr(preview(stats, plan))
    kept = {lp.name for a, lp in zip(first.layers, second.layers, strict=True) if a is lp}
    changed = {lp.name for a, lp in zip(first.layers, second.layers, strict=True) if a != lp}
    assert name in changed and name not in kept
    # all the others are the very same objects (their packed bytes did not move either)
    assert kept == {lp.name for lp in second.layers} - changed and len(kept) > 40
    # a whole-model step: the kept objects still hold the right numbers
    third_plan = simple_plan(0.6, 6, scope="layer").with_layer(name, plan.config_for(name))
    third = cache.preview(third_plan)
    assert repr(third) == repr(preview(stats, third_plan))
    assert any(a is b for a, b in zip(second.layers, third.layers, strict=True))  # name's


def test_a_warmed_cache_gives_the_same_previews_and_computes_no_warmed_row(
    resnet50_stats, monkeypatch
):
    """`PreviewCache.warm` (the window's idle-time warm-up for a target drag): previews of
    plans made of the warmed settings equal `preview` and an unwarmed cache's, compute no
    row again, and warming leaves what the next step compares with (the last preview's
    `LayerPreview` objects) as it was."""
    stats = resnet50_stats
    names = _prunable(stats)
    levels = [
        LayerConfig(
            prune=PruneConfig(method="magnitude" if s else "none", sparsity=s, scope="layer"),
            quant=QuantConfig(bits=b, symmetric=True, per_channel=pc, bias_bits=8 if b else None),
        )
        for s in (0.0, 0.5, 0.9)
        for b in (4, 8, None)
        for pc in (False, True)
    ]
    computed = count_layer_rows(monkeypatch)
    warm, cold = PreviewCache(stats), PreviewCache(stats)
    start = simple_plan(0.3, 6, scope="layer")
    shown = warm.preview(start)
    cold.preview(start)
    for cfg in levels:
        warm.warm(CompressionPlan(default=cfg))
    # the warm-up did not disturb the step after it: unchanged layers keep their objects
    again = warm.preview(start.with_layer(names[3], levels[4]))
    assert sum(a is b for a, b in zip(shown.layers, again.layers, strict=True)) > 40
    rng = random.Random(5)
    for _ in range(12):  # solver-like plans: every layer at one of the levels
        choice = [rng.choice(levels) for _ in names]
        overrides = tuple(zip(names, choice, strict=True))
        plan = CompressionPlan(default=rng.choice(levels), overrides=overrides)
        computed.clear()
        got = warm.preview(plan)
        assert computed == []  # every row came from the warm-up
        assert repr(got) == repr(preview(stats, plan)) == repr(cold.preview(plan))
    # a setting that was not warmed is computed as before
    computed.clear()
    plan = simple_plan(0.77, 5, scope="layer")
    got = warm.preview(plan)
    assert sorted(computed) == sorted(names)
    assert repr(got) == repr(preview(stats, plan))
