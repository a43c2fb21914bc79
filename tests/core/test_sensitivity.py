"""Sensitivity scans: measurement matches the engine, cache hit/miss/invalidation, resume after
cancel, data-free proxy curves for weights-only checkpoints."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from core.analysis.stats import analyze
from core.base.errors import Cancelled
from core.base.model import LoadedModel
from core.base.progress import CancelToken
from core.compress.engine import compress
from core.io.data import digits_split, make_dataset
from core.io.model_io import load_model
from core.planning.sensitivity import Level, SensitivityScan, default_levels, scan
from core.recipe.plan import CompressionPlan
from tests.models import make

#: A small grid keeps every scan here well under a second.
GRID = (Level(0.0, None), Level(0.5, None), Level(0.9, None), Level(0.0, 4), Level(0.8, 3, True))


@pytest.fixture(scope="module")
def resnet():
    module, ex = make("resnet")
    loaded = LoadedModel(module, "eager", "resnet", "resnet", example_input=ex)
    _, test = digits_split("image")
    data = test.subset(torch.arange(96))
    return loaded, analyze(loaded), data


def test_points_match_the_engine(resnet, tmp_path):
    """A scanned point equals compressing that layer alone with the engine and rerunning the
    whole model: the suffix re-run from cached activations changes nothing."""
    loaded, stats, data = resnet
    result = scan(loaded, stats, data, levels=GRID, cache_dir=tmp_path)
    assert result.metric == "loss" and not result.estimate
    assert "suffix" in result.notes[0]
    layer = "block.conv2"
    level = Level(0.8, 3, True)
    plan = CompressionPlan().with_layer(layer, level.config("magnitude"))
    comp = compress(loaded, plan, stats).compressed.module
    with torch.no_grad():
        base = loaded.module(data.x)
        out = comp(data.x)
    loss_delta = float(
        torch.nn.functional.cross_entropy(out, data.y)
        - torch.nn.functional.cross_entropy(base, data.y)
    )
    rel = float((out - base).norm() / base.norm())
    point = result.layer(layer).point(level)
    assert point.loss_delta == pytest.approx(loss_delta, rel=1e-4, abs=1e-6)
    assert point.rel_l2 == pytest.approx(rel, rel=1e-4)
    assert point.damage == pytest.approx(max(0.0, loss_delta), rel=1e-4, abs=1e-6)
    # the unpruned float32 level is the model itself
    assert result.layer(layer).point(Level(0.0, None)).rel_l2 == pytest.approx(0.0, abs=1e-6)


def test_cache_hit_miss_and_invalidation(resnet, tmp_path):
    loaded, stats, data = resnet
    first = scan(loaded, stats, data, levels=GRID, cache_dir=tmp_path)
    assert first.cached_layers == 0
    again = scan(loaded, stats, data, levels=GRID, cache_dir=tmp_path)
    assert again.cached_layers == len(first.layers)
    assert again.layers == first.layers
    # other data, another grid, other weights: misses
    other = data.subset(torch.arange(48))
    assert scan(loaded, stats, other, levels=GRID, cache_dir=tmp_path).cached_layers == 0
    assert scan(loaded, stats, data, levels=GRID[:3], cache_dir=tmp_path).cached_layers == 0
    module, ex = make("resnet")
    with torch.no_grad():
        module.fc.weight.mul_(1.5)
    changed = LoadedModel(module, "eager", "resnet", "resnet", example_input=ex)
    fresh = scan(changed, analyze(changed), data, levels=GRID, cache_dir=tmp_path)
    assert fresh.cached_layers == 0
    assert fresh.model_hash != first.model_hash
    assert fresh.layer("fc").points != first.layer("fc").points
    # the criterion is part of the key
    l2 = scan(loaded, stats, data, levels=GRID, method="channel_l2", cache_dir=tmp_path)
    assert l2.cached_layers == 0


def test_resume_after_cancel(resnet, tmp_path):
    loaded, stats, data = resnet
    token = CancelToken()
    seen = []

    def progress(fraction: float, message: str) -> None:
        seen.append(message)
        if len(seen) == 2 * len(GRID) + 1:  # two layers done, one level into the third
            token.cancel()

    with pytest.raises(Cancelled):
        scan(loaded, stats, data, levels=GRID, cache_dir=tmp_path, progress=progress, cancel=token)
    assert any("ETA" in m for m in seen)
    resumed = scan(loaded, stats, data, levels=GRID, cache_dir=tmp_path)
    assert resumed.cached_layers == 2
    clean = scan(loaded, stats, data, levels=GRID, cache=False)
    assert resumed.layers == clean.layers


def test_damaged_cache_file_is_measured_again(resnet, tmp_path):
    loaded, stats, data = resnet
    scan(loaded, stats, data, levels=GRID, cache_dir=tmp_path)
    files = sorted(tmp_path.rglob("layer-*.json"))
    files[0].write_text("{not json")
    again = scan(loaded, stats, data, levels=GRID, cache_dir=tmp_path)
    assert again.cached_layers == len(files) - 1


def test_weights_only_checkpoint_gets_marked_proxy_curves(tmp_path):
    from safetensors.torch import save_file

    module, _ = make("encoder")
    path = tmp_path / "enc.safetensors"
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    loaded = load_model(path)
    assert not loaded.can_run
    stats = analyze(loaded)
    result = scan(loaded, stats, None, cache_dir=tmp_path)
    assert result.estimate and result.metric == "proxy"
    assert result.to_dict()["estimate"] is True
    assert "estimate" in " ".join(result.notes)
    curve = result.layers[0]
    float_curve = [curve.point(Level(s, None)).damage for s in (0.0, 0.5, 0.9, 0.99)]
    assert float_curve[0] == 0.0
    assert all(a < b for a, b in zip(float_curve, float_curve[1:], strict=False))
    widths = [curve.point(Level(0.0, b)).damage for b in (8, 6, 4, 2)]
    assert all(a < b for a, b in zip(widths, widths[1:], strict=False))
    # round trip through JSON
    assert SensitivityScan.from_dict(result.to_dict()) == result


def test_default_grid_and_fidelity_metric_without_labels(tmp_path):
    levels = default_levels()
    assert Level(0.99, 2, True) in levels and Level(0.0, 16) in levels
    assert {lv.sparsity for lv in default_levels("nm")} == {0.0, 0.5}
    module, ex = make("encoder")
    loaded = LoadedModel(module, "eager", "enc", "enc", example_input=ex)
    data = make_dataset(torch.rand(64, 64), None, name="unlabelled")
    result = scan(loaded, analyze(loaded), data, levels=GRID, cache_dir=tmp_path)
    assert result.metric == "fidelity"
    p = result.layers[0].point(Level(0.9, None))
    assert p.loss_delta is None and p.acc_delta is None
    assert p.damage == pytest.approx(p.rel_l2**2)
    assert 0.0 < p.cosine < 1.0 and not math.isnan(p.cosine)
    assert replace(p, damage=0.0).cos_loss == pytest.approx(1.0 - p.cosine)
