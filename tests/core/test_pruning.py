"""Masks (threshold, N:M, channel) and physical channel removal with Torch-Pruning."""

import copy

import pytest
import torch
import torch_pruning as tp
from torch import nn

from core.base.errors import CompressionError
from core.io.zoo import DigitsCNN
from core.ops.pruning import (
    channel_mask,
    nm_mask,
    nm_pruned_count,
    remove_channels_,
    threshold_mask,
)
from tests.models import make


def test_threshold_is_strict_and_nan_pruned():
    scores = torch.tensor([0.1, 0.2, 0.3, float("nan")])
    assert threshold_mask(scores, 0.2).tolist() == [False, True, True, False]
    assert threshold_mask(scores, None).all()


@pytest.mark.parametrize("shape", [(16, 32), (8, 3, 3, 3), (5, 10), (7,)])
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_nm_mask_exact_per_group(shape, n, m):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    keep = nm_mask(w, n, m)
    assert keep.shape == w.shape
    assert int((~keep).sum()) == nm_pruned_count(shape, n, m)
    rows = keep.reshape(shape[0], -1) if len(shape) > 1 else keep.reshape(1, -1)
    full = rows.shape[1] // m
    groups = rows[:, : full * m].reshape(rows.shape[0], full, m)
    # exactly n pruned in every full group, and they are the n smallest |w|
    assert torch.all((~groups).sum(dim=-1) == n)
    mags = (w.reshape(rows.shape) if len(shape) > 1 else w.reshape(1, -1)).abs()
    g_mag = mags[:, : full * m].reshape(rows.shape[0], full, m)
    largest_pruned = torch.where(~groups, g_mag, torch.zeros_like(g_mag)).amax(-1)
    smallest_kept = torch.where(groups, g_mag, torch.full_like(g_mag, 1e9)).amin(-1)
    assert torch.all(largest_pruned <= smallest_kept)


def test_nm_24_is_exactly_half():
    w = torch.randn(64, 128)
    assert float((~nm_mask(w, 2, 4)).float().mean()) == 0.5


def test_nm_ties_still_exact():
    w = torch.ones(4, 8)
    assert int((~nm_mask(w, 2, 4)).sum()) == 16


def test_channel_mask_broadcasts_rows():
    scores = torch.tensor([3.0, 1.0, 2.0, 0.5])
    keep = channel_mask(scores, 1.5, (4, 2, 3, 3))
    assert keep.shape == (4, 2, 3, 3)
    assert keep.reshape(4, -1).all(dim=1).tolist() == [True, False, True, False]
    assert not keep.reshape(4, -1)[[1, 3]].any()


def _zero_groups(model: nn.Module, x: torch.Tensor, pruned: dict[str, list[int]]) -> nn.Module:
    """Masking equivalent of removal: zero every out-channel parameter removal would drop."""
    masked = copy.deepcopy(model)
    graph = tp.DependencyGraph().build_dependency(masked, example_inputs=x, verbose=False)
    mods = dict(masked.named_modules())
    with torch.no_grad():
        for name, idxs in pruned.items():
            mod = mods[name]
            fn = (
                tp.prune_linear_out_channels
                if isinstance(mod, nn.Linear)
                else tp.prune_conv_out_channels
            )
            group = graph.get_pruning_group(mod, fn, idxs=idxs)
            for item in group.items:
                target = item.dep.target.module
                if "out_channels" not in item.dep.handler.__name__:
                    continue
                for pname in ("weight", "bias"):
                    p = getattr(target, pname, None)
                    if isinstance(p, torch.Tensor):
                        p[item.idxs] = 0.0
    return masked


def test_remove_channels_resnet_matches_masked_outputs():
    model, x = make("resnet")
    pruned = {"stem": [0, 3, 5], "block.conv1": [1, 2, 9], "pw": [4, 5, 6, 7, 30]}
    reference = _zero_groups(model, x, pruned)
    removed = copy.deepcopy(model)
    info = remove_channels_(removed, x, pruned)
    assert removed.stem.out_channels == 13 and removed.bn.num_features == 13
    # residual coupling: conv2's outputs and the depthwise conv follow the stem
    assert removed.block.conv2.out_channels == 13 and removed.dw.out_channels == 13
    assert removed.block.conv1.out_channels == 13 and removed.block.conv2.in_channels == 13
    assert removed.pw.out_channels == 27 and removed.fc.in_features == 27
    assert info.kept["stem"] == [i for i in range(16) if i not in (0, 3, 5)]
    assert info.removed["pw"] == [4, 5, 6, 7, 30]
    with torch.no_grad():
        assert torch.allclose(removed(x), reference(x), atol=1e-5)
        assert not torch.allclose(removed(x), model(x), atol=1e-3)
    # the caller's original model is not touched by remove_channels_ on a copy
    assert model.stem.out_channels == 16


def test_remove_channels_coupled_layer_is_covered():
    model, x = make("resnet")
    info = remove_channels_(copy.deepcopy(model), x, {"stem": [1], "block.conv2": [2]})
    assert info.covered == {"block.conv2": "stem"}
    assert "block.conv2" not in info.removed


def test_remove_channels_demo_cnn_flatten():
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    x = torch.rand(5, 1, 8, 8)
    pruned = {"conv1": [0, 4], "conv2": [1, 2, 3], "fc1": list(range(0, 120, 3)), "fc2": [0]}
    reference = _zero_groups(model, x, pruned)
    removed = copy.deepcopy(model)
    remove_channels_(removed, x, pruned)
    assert removed.conv1.out_channels == 4 and removed.conv2.in_channels == 4
    assert removed.conv2.out_channels == 13 and removed.fc1.in_features == 13 * 4
    assert removed.fc1.out_features == 80 and removed.fc2.in_features == 80
    assert removed.fc2.out_features == 83
    with torch.no_grad():
        assert torch.allclose(removed(x), reference(x), atol=1e-5)


def test_remove_channels_refuses_output_layer():
    model, x = make("resnet")
    with pytest.raises(CompressionError, match="output"):
        remove_channels_(copy.deepcopy(model), x, {"fc": [0]})


def test_remove_channels_refuses_non_linear_conv():
    model, x = make("resnet")
    with pytest.raises(CompressionError, match="only Linear"):
        remove_channels_(copy.deepcopy(model), x, {"bn": [0]})


def test_remove_channels_depthwise_root_follows_its_producers():
    model, x = make("resnet")
    removed = copy.deepcopy(model)
    info = remove_channels_(removed, x, {"dw": [3, 4]})
    assert removed.dw.out_channels == 14 and removed.dw.groups == 14
    assert removed.stem.out_channels == 14
    assert info.kept["stem"] == [i for i in range(16) if i not in (3, 4)]
    assert removed(x).shape == (4, 10)
