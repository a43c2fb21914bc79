"""Layer inventory rows for every model type and every format."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from core.analysis.inventory import float_param_count, inventory, prunable_layers
from core.base.model import LoadedModel
from core.cli.inspect import weight_stats
from core.io.model_io import get_tensor, load_model
from tests.models import make


def _eager(model: nn.Module) -> LoadedModel:
    return LoadedModel(model, "eager", "memory", type(model).__name__)


def _by_name(rows):
    return {r.name: r for r in rows}


def test_resnet_rows_convs_norms_depthwise():
    model, _ = make("resnet")
    rows = _by_name(inventory(_eager(model)))
    assert list(rows) == [
        "stem", "bn", "block.conv1", "block.bn1", "block.conv2", "block.bn2", "dw", "dw_bn",
        "pw", "fc",
    ]  # fmt: skip
    assert rows["dw"].type == "Conv2d" and rows["dw"].groups == 16 and rows["dw"].prunable
    assert rows["dw"].shape == (16, 1, 3, 3) and rows["dw"].params == 144
    assert rows["bn"].type == "BatchNorm2d" and not rows["bn"].prunable
    assert rows["bn"].param_names == ("bn.weight", "bn.bias") and rows["bn"].params == 32
    assert rows["pw"].params == 32 * 16 + 32 and rows["pw"].bytes == 4 * (32 * 16 + 32)
    assert rows["fc"].tensor == "fc.weight" and rows["fc"].type == "Linear"
    assert sum(r.params for r in rows.values()) == float_param_count(model)


def test_transformer_rows_embedding_attention_bare_parameter():
    model, _ = make("transformer")
    rows = _by_name(inventory(_eager(model)))
    assert rows["pos"].type == "Parameter" and not rows["pos"].prunable
    assert rows["embed"].type == "Embedding" and rows["embed"].shape == (100, 32)
    attn = rows["encoder.layers.0.self_attn.in_proj_weight"]
    assert attn.type == "MultiheadAttention" and attn.prunable and attn.shape == (96, 32)
    assert attn.param_names == (
        "encoder.layers.0.self_attn.in_proj_weight",
        "encoder.layers.0.self_attn.in_proj_bias",
    )
    out = rows["encoder.layers.0.self_attn.out_proj"]
    assert out.type == "Linear" and out.tensor == "encoder.layers.0.self_attn.out_proj.weight"
    assert rows["norm"].type == "LayerNorm" and not rows["norm"].prunable
    assert sum(r.params for r in rows.values()) == float_param_count(model)


@pytest.mark.parametrize("name, cls", [("lstm", "LSTM"), ("gru", "GRU")])
def test_recurrent_rows_one_per_weight_matrix(name, cls):
    model, _ = make(name)
    rows = inventory(_eager(model))
    rnn = [r for r in rows if r.type == cls]
    layers = 2 if name == "lstm" else 1
    assert [r.name for r in rnn][:2] == [f"{name}.weight_ih_l0", f"{name}.weight_hh_l0"]
    assert len(rnn) == 2 * layers
    r = rnn[0]
    assert r.tensor == r.name and r.param_names == (r.name, r.name.replace("weight", "bias"))
    gates = 4 if cls == "LSTM" else 3
    assert r.shape[0] == gates * get_tensor(model, f"{name}.weight_hh_l0").shape[1]
    assert sum(x.params for x in rows) == float_param_count(model)


class _Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3, groups=2)
        self.gn = nn.GroupNorm(2, 8)
        self.ln = nn.LayerNorm(8, elementwise_affine=False)
        self.emb = nn.Embedding(10, 4)
        self.scale = nn.Parameter(torch.ones(3, 3))
        self.half = nn.Linear(4, 2).half()


def test_conv1d_grouped_groupnorm_half_and_paramless_norm():
    rows = _by_name(inventory(_eager(_Mixed())))
    assert rows["conv"].type == "Conv1d" and rows["conv"].groups == 2
    assert rows["conv"].shape == (8, 2, 3)
    assert rows["gn"].type == "GroupNorm" and not rows["gn"].prunable
    assert "ln" not in rows  # no parameters, no row
    assert rows["scale"].type == "Parameter" and not rows["scale"].prunable
    assert rows["half"].dtype == "float16" and rows["half"].bytes == 2 * (4 * 2 + 2)
    assert [r.name for r in prunable_layers(_eager(_Mixed()))] == ["conv", "emb", "half"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inv")
    out = {}
    for name in ("resnet", "transformer", "lstm"):
        model, x = make(name)
        ts = folder / f"{name}.ts"
        torch.jit.save(torch.jit.script(model), str(ts))
        pt2 = folder / f"{name}.pt2"
        torch.export.save(torch.export.export(model, (x,)), str(pt2))
        st = folder / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(st))
        out[name] = (model, ts, pt2, st)
    return out


@pytest.mark.parametrize("name", ["resnet", "transformer", "lstm"])
def test_every_format_gives_the_same_rows(saved, name):
    model, ts, pt2, st = saved[name]
    eager = inventory(_eager(model))
    for path in (ts, pt2):
        rows = inventory(load_model(path))
        assert [
            (r.name, r.type, r.tensor, r.shape, r.params, r.prunable, r.groups) for r in rows
        ] == [(r.name, r.type, r.tensor, r.shape, r.params, r.prunable, r.groups) for r in eager], (
            path.suffix
        )
    weights_only = _by_name(inventory(load_model(st)))
    assert set(weights_only) == {r.name for r in eager}
    for r in eager:
        w = weights_only[r.name]
        assert w.type.endswith("?") and w.tensor == r.tensor and w.shape == r.shape
        assert w.prunable == r.prunable
        if r.type in ("Linear", "Conv2d", "Embedding", "LSTM", "MultiheadAttention"):
            assert w.type == r.type + "?"
            assert w.params == r.params


def test_weights_only_counts_every_float_tensor(saved):
    _, _, _, st = saved["resnet"]
    loaded = load_model(st)
    bn = _by_name(inventory(loaded))["bn"]
    assert bn.type == "BatchNorm?" and not bn.prunable
    assert set(bn.param_names) == {"bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"}
    assert sum(r.params for r in inventory(loaded)) == float_param_count(loaded.module)


def test_nonfinite_weights_are_counted_not_fatal():
    model, _ = make("encoder")
    with torch.no_grad():
        model.net[0].weight[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0])
    rows = inventory(_eager(model))
    ws = weight_stats(get_tensor(model, rows[0].tensor))
    assert ws["stats"]["nonfinite"] == 3
    finite = model.net[0].weight[torch.isfinite(model.net[0].weight)].double()
    assert ws["stats"]["max"] == pytest.approx(float(finite.max()))
    assert ws["stats"]["std"] == pytest.approx(float(finite.std(unbiased=False)))
    assert ws["sparsity"] == pytest.approx(1 / model.net[0].weight.numel())
