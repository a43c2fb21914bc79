"""Packed archive: codecs, exact round trip, size on disk vs the size model, safety."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from core.base.errors import ExportError, ModelLoadError
from core.base.model import LoadedModel
from core.io.model_io import load_packed
from core.packed import (
    TensorSpec,
    archive_metadata,
    archive_overhead_bytes,
    compact_recipe,
    estimate_archive_bytes,
    expected_index_entries,
    pack_bits,
    read_packed,
    relidx_cost,
    relidx_decode,
    relidx_encode,
    scramble_order,
    scrambled_positions,
    tensor_packed_bytes,
    unpack_bits,
    write_packed,
)
from core.recipe.plan import CompressionPlan, LayerConfig, PruneConfig, QuantConfig, simple_plan
from tests.core._fixtures import eager, make_result
from tests.models import make


def _forward(loaded: LoadedModel, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return loaded.module(x)


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    return torch.equal(a, b)


# ---------------------------------------------------------------------------------------
# codecs
# ---------------------------------------------------------------------------------------
def test_bit_packing_round_trips_every_width_and_is_tight():
    rng = np.random.default_rng(1)
    for bits in range(1, 17):
        n = int(rng.integers(0, 2000))
        values = rng.integers(0, 2**bits, size=n)
        buf = pack_bits(values, bits)
        assert len(buf) == math.ceil(n * bits / 8)
        np.testing.assert_array_equal(unpack_bits(buf, n, bits), values)
    with pytest.raises(ValueError):
        pack_bits(np.array([4]), 2)


def test_relative_index_round_trips_with_fillers():
    rng = np.random.default_rng(2)
    for density in (0.0005, 0.02, 0.3, 1.0):
        pos = np.flatnonzero(rng.random(5000) < density)
        for k in (1, 2, 3, 5, 8, 16):
            entries = relidx_encode(pos, k)
            np.testing.assert_array_equal(relidx_decode(entries, k), pos)
            # one entry per kept weight plus floor(gap / (2^k - 1)) fillers
            gaps = np.diff(pos, prepend=-1) - 1
            assert entries.size == pos.size + int((gaps // (2**k - 1)).sum())


def test_expected_index_length_matches_random_masks():
    rng = np.random.default_rng(3)
    numel = 200_000
    for density in (0.01, 0.05, 0.08, 0.2):
        pos = np.flatnonzero(rng.random(numel) < density)
        real_bytes, k, entries = relidx_cost(pos)
        expected = expected_index_entries(numel, pos.size, k)
        assert abs(entries - expected) / expected < 0.01
        # the closed form is the sum over the geometric tail
        q, esc = 1 - pos.size / numel, 2**k - 1
        series = pos.size * (1 + sum(q ** (j * esc) for j in range(1, 2000)))
        assert expected == pytest.approx(series, rel=1e-9)


def test_scrambled_order_is_pinned_and_makes_structured_masks_look_random():
    # the order is part of the file format: pin it
    assert scramble_order(10).tolist() == [3, 5, 7, 4, 1, 2, 8, 9, 6, 0]
    assert scramble_order(1000)[:5].tolist() == [558, 992, 196, 963, 472]
    order = scramble_order(4096)
    assert np.array_equal(np.sort(order), np.arange(4096))
    # a pruned first layer: dead neurons (rows), blank pixels (columns), sparse elsewhere
    rng = np.random.default_rng(4)
    row_density = np.minimum(rng.gamma(0.5, 0.2, size=(300, 1)), 1.0)  # some neurons matter
    mask = rng.random((300, 64)) < row_density
    mask[rng.choice(300, 73, replace=False)] = False
    mask[:, rng.choice(64, 12, replace=False)] = False
    nnz = int(mask.sum())
    _, k, entries = relidx_cost(scrambled_positions(mask))
    expected = expected_index_entries(mask.size, nnz, k)
    assert abs(entries - expected) / expected < 0.03
    _, k_raw, raw = relidx_cost(np.flatnonzero(mask))
    assert raw > 1.05 * expected_index_entries(mask.size, nnz, k_raw)
    # and it decodes back to the same mask
    from core.packed import PatternChoice, decode_pattern, encode_pattern

    choice = PatternChoice("r", 0, nnz, k, entries)
    assert np.array_equal(
        decode_pattern([k, entries], mask.shape, encode_pattern(mask, choice)), mask
    )


def test_tensor_bytes_pick_the_cheapest_pattern():
    # dense 4-bit codes beat a bitmask at 10% sparsity
    assert tensor_packed_bytes(10_000, 9_000, 4, 1) == 5_000 + 4 + 1
    # a bitmask at 50%: 1250 + 5000*4/8
    assert tensor_packed_bytes(10_000, 5_000, 4, 1, symmetric=True) == 1_250 + 2_500 + 4
    # whole rows: one bit per row
    assert (
        tensor_packed_bytes(100 * 64, 50 * 64, 8, 100, structured_rows=100)
        == 13 + 3_200 + 400 + 100
    )
    # unquantized sparse values are float32
    dense = tensor_packed_bytes(1000, 1000, None, 0)
    assert dense == 4000
    assert tensor_packed_bytes(1000, 0, 5, 1) == 4 + 1


def test_compact_recipe_round_trips():
    plan = simple_plan(0.93, 5, symmetric=False, per_channel=False)
    plan = plan.with_layer(
        "fc3", LayerConfig(prune=PruneConfig("magnitude", sparsity=0.5), quant=QuantConfig(8))
    ).with_layer("fc1", LayerConfig(skip=True))
    text = compact_recipe(plan)
    assert CompressionPlan.from_json(text) == plan
    assert len(text) < len(json.dumps(plan.to_dict(), separators=(",", ":")))
    assert CompressionPlan.from_json(compact_recipe(CompressionPlan())) == CompressionPlan()


# ---------------------------------------------------------------------------------------
# round trip
# ---------------------------------------------------------------------------------------
def _source(kind: str) -> LoadedModel:
    if kind in ("resnet", "transformer", "lstm", "gru"):
        model, x = make(kind)
        return eager(model, x, kind)
    model, x = make("resnet")
    if kind == "pt2":
        module = torch.export.export(model, (x,)).module()
        return LoadedModel(module=module, format="pt2", source="<pt2>", name="pt2", example_input=x)
    if kind == "torchscript":
        module = torch.jit.script(model)
        return LoadedModel(
            module=module, format="torchscript", source="<ts>", name="ts", example_input=x
        )
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["resnet", "transformer", "lstm", "pt2", "torchscript"])
def test_round_trip_restores_the_compressed_model_exactly(tmp_path, kind):
    loaded = _source(kind)
    result = make_result(loaded, sparsity=0.9, bits=5, per_channel=True)
    path = tmp_path / "model.packed.safetensors"
    write_packed(result, path)

    archive = read_packed(path)
    state = result.compressed.module.state_dict()
    assert list(archive.tensors) == list(state)
    for name, value in state.items():
        assert _bitwise_equal(archive.tensors[name], value), name
    for name, qt in result.quantized.items():
        assert torch.equal(archive.quantized[name].codes[qt.mask], qt.codes[qt.mask])
    assert archive.plan == result.plan

    restored = load_packed(path, base=loaded)
    assert type(restored.module) is type(loaded.module) or kind == "pt2"
    for name, value in restored.module.state_dict().items():
        assert _bitwise_equal(value, state[name]), name
    x = loaded.example_input
    assert torch.equal(_forward(restored, x), _forward(result.compressed, x))
    # the base itself is never modified
    assert not torch.equal(_forward(loaded, x), _forward(restored, x))


def test_round_trip_of_unquantized_and_entropy_coded_tensors(tmp_path):
    loaded = _source("lstm")
    plain = make_result(loaded, sparsity=0.8, bits=None)
    write_packed(plain, tmp_path / "a.packed.safetensors")
    archive = read_packed(tmp_path / "a.packed.safetensors")
    for name, value in plain.compressed.module.state_dict().items():
        assert torch.equal(archive.tensors[name], value)
    assert set(archive.masks) == set(plain.masks)

    coded = make_result(loaded, sparsity=0.5, bits=8)
    raw = write_packed(coded, tmp_path / "b.packed.safetensors")
    ent = write_packed(coded, tmp_path / "c.packed.safetensors", entropy=True)
    assert ent.entropy_coded and ent.bytes_on_disk < raw.bytes_on_disk
    assert raw.entropy_bound_bytes < raw.bytes_on_disk
    archive = read_packed(tmp_path / "c.packed.safetensors")
    for name, value in coded.compressed.module.state_dict().items():
        assert _bitwise_equal(archive.tensors[name], value)


def test_removed_channels_are_rebuilt_on_load(tmp_path):
    from dataclasses import replace

    from core.ops.pruning import remove_channels_

    model, x = make("encoder")
    loaded = eager(model, x, "encoder")
    work = eager(__import__("copy").deepcopy(model), x, "encoder")
    info = remove_channels_(work.module, x, {"net.0": list(range(0, 128, 3))})
    base = make_result(work, sparsity=0.6, bits=6)
    result = replace(base, original=loaded, removed_channels=dict(info.kept))
    path = tmp_path / "model.packed.safetensors"
    write_packed(result, path)
    restored = load_packed(path, base=loaded)
    assert restored.module.net[0].weight.shape == (128 - 43, 64)
    assert torch.equal(_forward(restored, x), _forward(result.compressed, x))


# ---------------------------------------------------------------------------------------
# size on disk vs estimate
# ---------------------------------------------------------------------------------------
PLANS = [
    dict(sparsity=0.0, bits=8),
    dict(sparsity=0.5, bits=4, per_channel=True),
    dict(sparsity=0.9, bits=5),
    dict(sparsity=0.95, bits=2, symmetric=True),
    dict(sparsity=0.97, bits=6, per_channel=True),
    dict(sparsity=0.8, bits=16),
    dict(sparsity=0.9, bits=None),
    dict(method="nm", bits=4),
    dict(method="channel", sparsity=0.5, bits=8, per_channel=True, symmetric=True),
    dict(method="channel", sparsity=0.25, bits=None),
]


def _specs(result) -> list[TensorSpec]:
    """What a preview knows: shapes, nnz of the masks, and the plan's quantization settings."""
    specs = []
    for name, value in result.compressed.module.state_dict().items():
        mask, qt = result.masks.get(name), result.quantized.get(name)
        nnz = int(mask.sum()) if mask is not None else value.numel()
        structured = mask is not None and bool(
            (mask.reshape(mask.shape[0], -1).all(1) | ~mask.reshape(mask.shape[0], -1).any(1)).all()
        )
        specs.append(
            TensorSpec(
                name,
                tuple(value.shape),
                nnz,
                bits=qt.bits if qt is not None else None,
                symmetric=bool(qt.symmetric) if qt is not None else False,
                per_channel=bool(qt.per_channel) if qt is not None else False,
                structured=structured,
                dtype={torch.float32: "F32", torch.int64: "I64"}[value.dtype],
            )
        )
    return specs


@pytest.mark.parametrize("kind", ["resnet", "transformer", "lstm", "gru"])
def test_size_on_disk_matches_the_estimate_within_one_percent(tmp_path, kind):
    loaded = _source(kind)
    for i, plan in enumerate(PLANS):
        result = make_result(loaded, **plan)
        path = tmp_path / f"{i}.packed.safetensors"
        info = write_packed(result, path)
        meta = archive_metadata(result.plan, source=loaded.source, source_format=loaded.format)
        estimate = estimate_archive_bytes(_specs(result), meta)
        disk = path.stat().st_size
        assert info.bytes_on_disk == disk
        assert abs(disk - estimate.total) / disk < 0.01, (kind, plan, disk, estimate.total)
        # header size is computed, not guessed: off by a few digits of the index lengths only
        header = archive_overhead_bytes([], meta, layout=None)
        assert header > 0
        assert abs(info.header_bytes - estimate.header) <= 8 * len(result.masks)


def test_demo_mlp_reaches_40x_at_deep_compression_settings(tmp_path):
    """LeNet-300-100 at ~96% sparsity with 4-bit per-tensor codes: the format allows >= 40x."""
    from core.io.zoo import build_demo

    model = build_demo("mlp").eval()
    loaded = eager(model, torch.rand(2, 64), "mlp")
    result = make_result(loaded, sparsity=0.96, bits=4)
    info = write_packed(result, tmp_path / "m.packed.safetensors")
    dense = 4 * sum(p.numel() for p in model.parameters())
    assert dense / info.bytes_on_disk >= 40


# ---------------------------------------------------------------------------------------
# safety
# ---------------------------------------------------------------------------------------
def test_archive_is_plain_safetensors_and_loads_without_pickle(tmp_path, monkeypatch):
    loaded = _source("resnet")
    result = make_result(loaded)
    path = tmp_path / "model.packed.safetensors"
    write_packed(result, path)
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    assert set(header) == {"__metadata__", "packed"}
    assert header["packed"]["dtype"] == "U8"
    assert header["packed"]["data_offsets"][1] == len(raw) - 8 - n
    with safe_open(str(path), framework="np") as fh:
        assert list(fh.keys()) == ["packed"]
        assert fh.metadata()["format"] == "workbench.packed"

    def _no_pickle(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "load", _no_pickle)
    monkeypatch.setattr(pickle, "loads", _no_pickle)
    monkeypatch.setattr(torch, "load", _no_pickle)
    restored = load_packed(path, base=loaded)
    assert torch.equal(
        _forward(restored, loaded.example_input), _forward(result.compressed, loaded.example_input)
    )


def test_corrupt_truncated_and_foreign_files_are_refused(tmp_path):
    from safetensors.numpy import save_file

    loaded = _source("lstm")
    path = tmp_path / "model.packed.safetensors"
    write_packed(make_result(loaded), path)
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    bad = tmp_path / "bad.packed.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ModelLoadError, match="checksum"):
        read_packed(bad)
    cut = tmp_path / "cut.packed.safetensors"
    cut.write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(ModelLoadError, match="cut.packed"):
        read_packed(cut)
    foreign = tmp_path / "weights.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(foreign))
    with pytest.raises(ModelLoadError, match="not a workbench packed archive"):
        read_packed(foreign)


def test_missing_source_asks_for_base(tmp_path):
    loaded = _source("lstm")
    path = tmp_path / "model.packed.safetensors"
    write_packed(make_result(loaded), path)
    with pytest.raises(ModelLoadError, match="--base"):
        load_packed(path)
    other = _source("gru")
    with pytest.raises(ModelLoadError, match="does not match"):
        load_packed(path, base=other)


def test_existing_file_is_not_overwritten_without_force(tmp_path):
    loaded = _source("lstm")
    path = tmp_path / "model.packed.safetensors"
    path.write_bytes(b"keep me")
    with pytest.raises(ExportError, match="--force"):
        write_packed(make_result(loaded), path)
    assert path.read_bytes() == b"keep me"
    write_packed(make_result(loaded), path, force=True)
    assert read_packed(path).tensors
    assert [p.name for p in tmp_path.iterdir()] == ["model.packed.safetensors"]


def test_inconsistent_result_is_refused(tmp_path):
    from dataclasses import replace

    loaded = _source("lstm")
    result = make_result(loaded, bits=4)
    name = next(iter(result.quantized))
    with torch.no_grad():
        dict(result.compressed.module.named_parameters())[name].add_(0.01)
    with pytest.raises(ExportError, match="differ from its codes"):
        write_packed(result, tmp_path / "x.packed.safetensors")
    bogus = replace(result, masks={"nope.weight": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(ExportError, match="nope.weight"):
        write_packed(bogus, tmp_path / "y.packed.safetensors")
    assert not list(tmp_path.iterdir())


_NAME = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12
)


@settings(max_examples=60, deadline=None)
@given(
    names=st.lists(_NAME, max_size=6, unique=True),
    source=_NAME,
    bits=st.sampled_from([None, 2, 4, 8]),
)
def test_the_estimated_header_is_the_header_built(names, source, bits):
    """`estimate_archive_bytes` sizes the header without building it (escaped entries
    summed into an empty layout): the same bytes as `archive_overhead_bytes` with the
    layout built, whatever the tensor names and the metadata (quotes, backslashes, control
    characters, non-ASCII)."""
    from core.packed.bytemodel import _tensor_part

    specs = [
        TensorSpec(name, (3 + i, 5), 7 if bits else 15 + 5 * i, bits=bits)
        for i, name in enumerate(names)
    ]
    meta = {"source": source, "source_format": "torchscript", "recipe": source[::-1]}
    parts = [_tensor_part(s) for s in specs]
    built = archive_overhead_bytes(
        names, meta, layout=[p[1] for p in parts], blob_bytes=sum(p[0] for p in parts)
    )
    assert estimate_archive_bytes(specs, meta).header == built
