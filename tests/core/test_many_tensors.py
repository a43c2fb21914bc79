"""Checkpoints of many small tensors: the flat weights-only module, the safetensors reader and
the bulk paths of ``inspect`` give exactly what the one-tensor-at-a-time code gives."""

from __future__ import annotations

import json
import random
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from core.analysis.inventory import inventory
from core.base.errors import ModelLoadError
from core.base.limits import safetensors_header
from core.base.model import LoadedModel
from core.cli.inspect import _bulk_weight_stats, _dumps, _json_safe, describe, weight_stats
from core.io.model_io import (
    SAFETENSORS_OPEN,
    WeightsOnlyModule,
    _load_safetensors,
    clone_model,
    get_tensor,
    load_model,
    note_nonfinite,
    set_tensor,
)


def _tree(state: dict[str, torch.Tensor]) -> nn.Module:
    """Reference: a real module tree (one ``nn.Module`` per name prefix)."""
    root = nn.Module()
    for name, t in state.items():
        *path, leaf = name.split(".")
        node = root
        for part in path:
            if part not in node._modules:
                node._modules[part] = nn.Module()
            node = node._modules[part]
        if t.is_floating_point():
            node._parameters[leaf] = nn.Parameter(t.clone())
        else:
            node._buffers[leaf] = t.clone()
    return root


def _random_state(rng: random.Random, n: int) -> dict[str, torch.Tensor]:
    names: set[str] = set()
    while len(names) < n:
        depth = rng.randint(1, 4)
        names.add(".".join(rng.choice("abc") + str(rng.randint(0, 1)) for _ in range(depth)))
    ordered = sorted(names) if rng.random() < 0.5 else rng.sample(sorted(names), len(names))
    return {
        k: torch.randn(2) if rng.random() < 0.7 else torch.tensor([rng.randint(0, 9)])
        for k in ordered
    }


def test_flat_module_lists_names_like_a_module_tree():
    rng = random.Random(0)
    checked = 0
    for _ in range(400):
        state = _random_state(rng, rng.choice([3, 8, 25]))
        try:
            ref = _tree(state)
            # the reference accepts names a checkpoint tree refuses; skip those
            flat = WeightsOnlyModule(state)
        except ModelLoadError:
            continue
        checked += 1
        assert [k for k, _ in flat.named_parameters()] == [k for k, _ in ref.named_parameters()]
        assert [k for k, _ in flat.named_buffers()] == [k for k, _ in ref.named_buffers()]
        assert list(flat.state_dict()) == list(ref.state_dict())
    assert checked > 100


def test_flat_module_refuses_prefix_clashes_and_resolves_names():
    with pytest.raises(ModelLoadError, match="also a prefix"):
        WeightsOnlyModule({"a": torch.ones(1), "a.b": torch.ones(1)})
    with pytest.raises(ModelLoadError, match="also a module path"):
        WeightsOnlyModule({"a.b": torch.ones(1), "a": torch.ones(1)})
    with pytest.raises(ModelLoadError, match="empty path component"):
        WeightsOnlyModule({"a..b": torch.ones(1)})
    module = WeightsOnlyModule({"eval.weight": torch.ones(2, 2), "t": torch.arange(3)})
    assert get_tensor(module, "eval.weight").shape == (2, 2)  # shadows nn.Module.eval
    set_tensor(module, "eval.weight", torch.zeros(3, 2))  # new shape: still a parameter
    assert isinstance(module._parameters["eval.weight"], nn.Parameter)
    assert get_tensor(module, "eval.weight").shape == (3, 2)
    with pytest.raises(KeyError):
        get_tensor(module, "missing")
    loaded = LoadedModel(module, "safetensors", "x", "x", weights_only=True)
    copy = clone_model(loaded).module
    assert list(copy.state_dict()) == list(module.state_dict())
    copy._parameters["eval.weight"].data.fill_(5.0)
    assert float(get_tensor(module, "eval.weight").detach().sum()) == 0.0  # no shared storage


def test_reader_matches_safetensors_load_file(tmp_path):
    state = {
        "z": torch.randn(3, 4),
        "h": torch.randn(5).half(),
        "bf": torch.randn(2, 2).bfloat16(),
        "i": torch.arange(5),
        "bo": torch.tensor([True, False]),
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(2.5),
        "u": torch.arange(3, dtype=torch.uint8),
        "d": torch.randn(3, dtype=torch.float64),
    }
    path = tmp_path / "m.safetensors"
    save_file(state, str(path))
    ours = load_model(path).module.state_dict()
    ref = load_file(str(path))
    assert set(ours) == set(ref)
    for k, v in ref.items():
        assert ours[k].dtype == v.dtype and torch.equal(ours[k], v), k


def test_reader_handles_unaligned_offsets_and_header_order(tmp_path):
    header = {
        "b": {"dtype": "F64", "shape": [1], "data_offsets": [1, 9]},
        "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
    }
    raw = json.dumps(header).encode()  # odd length: the data section starts unaligned
    path = tmp_path / "u.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\x07" + np.array([3.25]).tobytes())
    tensors, _, _ = _load_safetensors(path)
    assert list(tensors) == list(load_file(str(path))) == ["a", "b"]  # file-offset order
    state = load_model(path).module.state_dict()
    assert float(state["b"]) == 3.25 and int(state["a"]) == 7
    entries, _ = safetensors_header(path, supported=SAFETENSORS_OPEN)
    assert entries["b"]["data_offsets"] == (1, 9) and entries["b"]["shape"] == (1,)


def test_overlapping_tensors_are_named(tmp_path):
    header = {
        "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    raw = json.dumps(header).encode()
    path = tmp_path / "o.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(12))
    with pytest.raises(ModelLoadError, match="'x' and 'y' overlap"):
        load_model(path)


def test_bulk_weight_stats_equal_one_by_one():
    rng = random.Random(1)
    torch.manual_seed(1)
    tensors = []
    for _ in range(1500):
        shape = rng.choice([(1,), (3,), (4, 4), (9,), (130,), (1024,), (1500,), (0,), ()])
        dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16, torch.float64])
        x = (torch.randn(shape) * rng.choice([1.0, 1e-3, 1e5])).to(dtype)
        if x.numel() and rng.random() < 0.05:
            x.view(-1)[0] = rng.choice([float("nan"), float("inf")])
        if x.numel() and rng.random() < 0.2:
            x.view(-1)[: x.numel() // 2] = 0
        tensors.append(x)
    tensors.append(torch.arange(6).reshape(2, 3))
    assert _bulk_weight_stats(tensors) == [weight_stats(t) for t in tensors]


def test_json_output_equals_json_module(tmp_path):
    state = {
        "a.weight": torch.randn(3, 4),
        "b": torch.tensor([float("nan"), 1.0]),
        "c.x": torch.zeros(2),
        "s": torch.tensor(1.5),
        'q"\n.weight': torch.randn(2, 2),
    }
    path = tmp_path / "m.safetensors"
    save_file(state, str(path))
    for source in ("demo:mlp", str(path)):
        loaded = load_model(source)
        full = describe(loaded)
        expected = json.dumps(_json_safe(full), indent=2, allow_nan=False)
        assert _dumps(full) == expected
        assert _dumps(describe(loaded, stream=True)) == expected
    empty = LoadedModel(WeightsOnlyModule({}), "safetensors", "e", "e", weights_only=True)
    assert _dumps(describe(empty, stream=True)) == json.dumps(_json_safe(describe(empty)), indent=2)


def test_many_one_element_tensors_inventory_and_nonfinite():
    n = 5000
    values = torch.arange(n, dtype=torch.float32)
    values[17] = float("nan")
    state = {f"layer{i}.weight": values[i : i + 1].clone() for i in range(n)}
    state["half.weight"] = torch.tensor([float("inf"), 1.0]).half()
    loaded = LoadedModel(WeightsOnlyModule(state), "safetensors", "m", "m", weights_only=True)
    assert list(note_nonfinite(loaded)) == ["layer17.weight", "half.weight"]
    rows = inventory(loaded)
    assert [r.tensor for r in rows] == list(state)
    assert not any(r.prunable for r in rows)  # 1-D weights: norm-like, not compressible


# ---------------------------------------------------------------------------------------
# batched analysis / compression / packing of small same-shape tensors
# ---------------------------------------------------------------------------------------
def _same(x, y, path=""):
    """Field-by-field equality of stats/records (arrays by value and dtype, floats exactly)."""
    import dataclasses
    import math

    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, path
        assert np.array_equal(x, y, equal_nan=True), path
    elif dataclasses.is_dataclass(x):
        for f in dataclasses.fields(x):
            _same(getattr(x, f.name), getattr(y, f.name), f"{path}.{f.name}")
    elif isinstance(x, dict):
        assert x.keys() == y.keys(), path
        for k in x:
            _same(x[k], y[k], f"{path}/{k}")
    elif isinstance(x, float):
        assert x == y or (math.isnan(x) and math.isnan(y)), (path, x, y)
    else:
        assert x == y, (path, x, y)


def _odd_tensors(shape, count, seed):
    """Small tensors with the awkward contents: zeros, constants, ties, NaN, fp16, overflow."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for j in range(count):
        w = torch.randn(shape, generator=g) * float(10 ** ((j % 7) - 3))
        kind = j % 8
        if kind == 1:
            w = torch.zeros(shape)
        elif kind == 2:
            w = torch.full(shape, 0.5)
        elif kind == 3:
            w[w.abs() < w.abs().mean()] = 0
        elif kind == 4:
            w = w.round()
        elif kind == 5:
            w.view(-1)[0] = float("nan")
        elif kind == 6:
            w = w.half()
        elif kind == 7:
            w = torch.full(shape, 3e37) * torch.randn(shape, generator=g).sign()
        out.append(w)
    return out


@pytest.mark.parametrize("shape", [(4, 4), (8, 3, 3, 3), (16,), (1, 5), (3, 1), (64, 64)])
def test_batched_statistics_equal_one_by_one(shape):
    from core.analysis import stats as S
    from core.base.model import LayerInfo

    ws = _odd_tensors(shape, 40, seed=len(shape))
    layers = [
        LayerInfo(f"l{j}", "Linear", f"l{j}.weight", shape, w.numel(), 4 * w.numel(), True)
        for j, w in enumerate(ws)
    ]
    got = S._batch_small_stats(layers, ws, ["F32"] * len(ws))
    batched = 0
    for layer, w, g in zip(layers, ws, got, strict=True):
        if g is None:  # NaN or overflowing norms: done one by one by the caller
            assert not torch.isfinite(w).all() or float(w.abs().max()) > 1e30
            continue
        batched += 1
        _same(g, S._tensor_stats(layer, w, None, "F32"), layer.name)
    assert batched >= 30


def _mixed_checkpoint(tmp_path):
    g = torch.Generator().manual_seed(0)
    st = {f"a{i}.weight": torch.randn(4, 6, generator=g) * (i + 1) for i in range(40)}
    st.update({f"b{i}.weight": torch.randn(8, 3, 3, 3, generator=g) for i in range(12)})
    st["a5.weight"][0, 0] = 0
    st["a6.weight"][:] = 0
    st["a7.weight"][1] = 1.0
    st["big.weight"] = torch.randn(60, 80, generator=g)
    path = tmp_path / "mixed.safetensors"
    save_file(st, str(path))
    return load_model(path)


_GROUP_PLANS = [
    ("magnitude", "sparsity", 0.5, {"bits": 8}),
    ("magnitude", "sparsity", 0.97, {"bits": 4, "symmetric": False, "per_channel": True}),
    ("magnitude", "threshold", 0.0, {"bits": 3}),
    ("none", "sparsity", 0.0, {"bits": 4, "per_channel": True, "group_size": 32}),
    ("magnitude", "sparsity", 0.3, {}),
]


def _plan(method, mode, sparsity, quant, scope="layer"):
    from core.recipe.plan import CompressionPlan, LayerConfig, PruneConfig, QuantConfig

    prune = PruneConfig(method=method, mode=mode, sparsity=sparsity, threshold=0.7, scope=scope)
    return CompressionPlan(default=LayerConfig(prune=prune, quant=QuantConfig(**quant)))


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_grouped_compression_and_packing_equal_one_by_one(tmp_path, monkeypatch, scope):
    """The engine's `_compress_group` and the writer's `_encode_group` give the same weights,
    masks, codes, reports and archive bytes as the one-layer paths."""
    import dataclasses
    import math

    from core.analysis.stats import analyze
    from core.compress import engine
    from core.packed import writer

    loaded = _mixed_checkpoint(tmp_path)
    stats = analyze(loaded)
    for method, mode, sparsity, quant in _GROUP_PLANS:
        plan = _plan(method, mode, sparsity, quant, scope if mode == "sparsity" else "layer")
        monkeypatch.setattr(engine, "_GROUP_MIN", 8)
        a = engine.compress(loaded, plan, stats)
        monkeypatch.setattr(engine, "_GROUP_MIN", 10**9)
        b = engine.compress(loaded, plan, stats)
        sa, sb = a.compressed.module.state_dict(), b.compressed.module.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert a.masks.keys() == b.masks.keys()
        assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
        assert a.quantized.keys() == b.quantized.keys()
        for k, qa in a.quantized.items():
            qb = b.quantized[k]
            for f in ("codes", "scale", "zero_point"):
                assert torch.equal(getattr(qa, f), getattr(qb, f)), (k, f)
        for ra, rb in zip(a.layers, b.layers, strict=True):
            da, db = dataclasses.asdict(ra), dataclasses.asdict(rb)
            qa, qb = da.pop("sqnr_db"), db.pop("sqnr_db")
            assert da == db
            # the SQNR sums run over a stack: equal up to summation order
            assert qa == qb or math.isclose(qa, qb, rel_tol=1e-9)
        for entropy in (False, True):
            monkeypatch.setattr(writer, "_GROUP_MIN", 8)
            pa = writer.pack_result(a, entropy=entropy)
            monkeypatch.setattr(writer, "_GROUP_MIN", 10**9)
            pb = writer.pack_result(a, entropy=entropy)
            assert pa[0] == pb[0] and pa[1] == pb[1] and pa[2] == pb[2] and pa[3] == pb[3]


def test_quantize_stack_equals_quantize():
    import itertools

    from core.ops.quantization import dequantize, quantize, quantize_stack

    g = torch.Generator().manual_seed(1)
    for shape in [(4, 4), (3, 5, 2), (16, 1), (2, 70)]:
        for bits, sym, per_channel, group, masked in itertools.product(
            [2, 8], [True, False], [False, True], [None, 32], [False, True]
        ):
            scales = torch.logspace(-3, 3, 12).reshape(12, *([1] * len(shape)))
            w = torch.randn((12, *shape), generator=g) * scales
            w[3] = 0
            w[4].view(-1)[0] = float("nan")
            mask = (torch.rand(w.shape, generator=g) > 0.5) if masked else None
            if mask is not None:
                mask[5] = False
            qts, deq = quantize_stack(
                w, bits, symmetric=sym, per_channel=per_channel, mask=mask, group_size=group
            )
            for i in range(12):
                ref = quantize(
                    w[i],
                    bits,
                    symmetric=sym,
                    per_channel=per_channel,
                    mask=None if mask is None else mask[i],
                    group_size=group,
                )
                for f in ("codes", "scale", "zero_point"):
                    assert torch.equal(getattr(ref, f), getattr(qts[i], f))
                assert torch.equal(dequantize(ref), deq[i])


def test_report_json_of_many_layers_is_the_same_json():
    from core.export.report import dumps

    data = {
        "model": "m",
        "layers": [{"name": f"l{i}", "sqnr_db": None, "shape": [4, 4]} for i in range(500)],
        "exports": [{"format": "packed", "bytes": 12}],
        "nested": {"a": [1, 2], "b": "x\ny"},
    }
    text = dumps(data)
    assert json.loads(text) == data
    assert text.count("\n") > 500  # one layer per line, not one giant line
    small = {"a": 1, "b": {"c": [1, 2]}}
    assert dumps(small) == json.dumps(small, indent=2) + "\n"


def test_compress_of_many_tiny_tensors_end_to_end(tmp_path):
    """2*10**4 tiny tensors through the CLI: the batched paths, a loadable archive with the
    planned sparsity (the speed itself is measured in bench/bench_many_tensors.py)."""
    from core.cli.main import main
    from core.io.model_io import load_packed

    g = torch.Generator().manual_seed(3)
    st = {f"t{i}.weight": torch.randn(4, 4, generator=g) for i in range(20000)}
    st["odd.weight"] = torch.randn(5, 7, generator=g)
    src = tmp_path / "many.safetensors"
    save_file(st, str(src))
    out = tmp_path / "out"
    rc = main(["compress", str(src), "--sparsity", "0.5", "--bits", "8", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert len(report["layers"]) == 20001
    restored = load_packed(out / "model.packed.safetensors", base=src)
    sd = restored.module.state_dict()
    zeros = sum(int((sd[k] == 0).sum()) for k in st)
    total = sum(v.numel() for v in st.values())
    assert abs(zeros / total - 0.5) < 0.01
