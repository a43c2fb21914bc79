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

from core.cli_inspect import _bulk_weight_stats, _dumps, _json_safe, describe, weight_stats
from core.errors import ModelLoadError
from core.inventory import inventory
from core.limits import safetensors_header
from core.model import LoadedModel
from core.model_io import (
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
