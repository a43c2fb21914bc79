"""Passes over weights that view a mapped file give each tensor's pages back after it
(`core.base.memory.MappedPages`, `paged_forward`), archives restore to a mapped file
(`core.packed.restore_to_file`), and the chunked codec helpers equal their whole-array
forms."""

from __future__ import annotations

import json
import math
import sys
import tempfile

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import core.cli.inspect as cli_inspect
import core.export.stream as stream
import core.packed.codec as codec
import core.packed.reader as packed_reader
import core.packed.writer as writer
from core.base.errors import ExportError, ModelLoadError
from core.base.memory import MappedPages, map_large_allocations, paged_forward
from core.base.model import LoadedModel
from core.cli.main import main
from core.evaluate import evaluate
from core.io.data import Dataset
from core.io.model_io import load_model
from core.ops.quantization import dequantize, quantize
from core.packed import read_packed, read_packed_spilled, restore_to_file
from core.packed.codec import _entropy_bits, pack_bits, unpack_bits
from tests import hf_models

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc and madvise")


def _mapped_rss_kib(path) -> int:
    """Resident KiB of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
                inside = line.rstrip().endswith(str(path))
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


def _mapped_mlp(tmp_path):
    """A weights-only checkpoint of an MLP (4 MiB per layer) and the model loaded from it,
    whose parameters are views of the file's mapping."""
    g = torch.Generator().manual_seed(0)
    sizes = [(1024, 1024), (1024, 1024), (10, 1024)]
    tensors = {}
    for i, (o, n) in enumerate(sizes):
        tensors[f"{i}.weight"] = torch.randn(o, n, generator=g) * 0.05
        tensors[f"{i}.bias"] = torch.zeros(o)
    path = tmp_path / "mlp.safetensors"
    save_file(tensors, str(path))
    state = load_model(str(path)).module.state_dict()
    model = nn.Sequential(
        nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )
    for i, idx in enumerate((0, 2, 4)):
        model[idx].weight = nn.Parameter(state[f"{i}.weight"], requires_grad=False)
        model[idx].bias = nn.Parameter(state[f"{i}.bias"], requires_grad=False)
    return path, model


@linux
def test_mapped_pages_tells_file_views_from_anonymous_memory(tmp_path):
    path, model = _mapped_mlp(tmp_path)
    pages = MappedPages()
    assert pages.maps(model[0].weight) and pages.maps(model[2].weight)
    assert not pages.maps(torch.randn(1024, 1024))
    assert not pages.maps(np.zeros(1 << 20))
    assert not pages.maps(torch.empty(0))


@linux
def test_paged_forward_gives_pages_back_and_changes_nothing(tmp_path):
    path, model = _mapped_mlp(tmp_path)
    x = torch.randn(8, 1024, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)  # reads every page of the file
    resident = _mapped_rss_kib(path)
    if resident < 8 * 1024:
        pytest.skip("the file's pages were not resident to begin with")
    with torch.no_grad(), paged_forward(model):
        got = model(x)
    assert torch.equal(got, want)
    after = _mapped_rss_kib(path)
    if after == resident:
        pytest.skip("this kernel ignores MADV_PAGEOUT")
    assert after < resident / 4  # one layer at most, not the whole file
    # the hooks are gone afterwards
    assert not any(m._forward_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), want)


def test_paged_evaluation_equals_the_plain_one(tmp_path):
    _, model = _mapped_mlp(tmp_path)
    loaded = LoadedModel(model, "eager", "m", "m", example_input=torch.zeros(1, 1024))
    ref = LoadedModel(nn.Linear(1024, 10), "eager", "r", "r", example_input=torch.zeros(1, 1024))
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(40, 1024, generator=g), torch.randint(0, 10, (40,), generator=g)
    data = Dataset(x, y, "random")
    plain = evaluate(loaded, data, reference=ref, latency=False, batch_size=16)
    paged = evaluate(loaded, data, reference=ref, latency=False, batch_size=16, paged=True)
    assert plain == paged
    assert plain.agreement is not None


def _archive(tmp_path):
    model = tmp_path / "m.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file(
        {
            "a.weight": torch.randn(300, 70, generator=g),
            "b.weight": torch.randn(33, 5, generator=g).to(torch.bfloat16),
            "c.bias": torch.randn(7, generator=g),
            "steps": torch.tensor([3, 4], dtype=torch.int64),
            "empty": torch.zeros(0, 4),
        },
        str(model),
    )
    out = tmp_path / "out"
    args = ["compress", str(model), "--sparsity", "0.5", "--bits", "4", "--out", str(out)]
    assert main([*args, "--quiet"]) == 0
    return out / "model.packed.safetensors"


def test_restore_to_file_equals_read_packed(tmp_path):
    archive = _archive(tmp_path)
    want = read_packed(archive).tensors
    got = restore_to_file(archive, tmp_path / "restored.bin")
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape
        assert torch.equal(got[name], t), name
    if sys.platform.startswith("linux"):
        assert MappedPages().maps(got["a.weight"])
    # writes go to the process's copy, never to the file
    got["a.weight"].add_(1.0)
    again = restore_to_file(archive, tmp_path / "again.bin")
    assert torch.equal(again["a.weight"], want["a.weight"])


def test_restore_to_file_refuses_a_corrupt_archive_like_read_packed(tmp_path):
    archive = _archive(tmp_path)
    raw = bytearray(archive.read_bytes())
    raw[-5] ^= 0xFF  # inside the blob: the checksum no longer matches
    archive.write_bytes(bytes(raw))
    with pytest.raises(ModelLoadError, match="checksum") as a:
        read_packed(archive)
    with pytest.raises(ModelLoadError, match="checksum") as b:
        restore_to_file(archive, tmp_path / "r.bin")
    assert str(a.value) == str(b.value)


def _old_pack_bits(values, bits):
    values = np.asarray(values, dtype=np.uint32).ravel()
    if values.size and int(values.max()) >> bits:
        raise ValueError("does not fit")
    if bits in (8, 16):
        return values.astype(np.uint8 if bits == 8 else "<u2").tobytes()
    bitmat = ((values[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(bitmat.ravel(), bitorder="little").tobytes()


@pytest.mark.parametrize("bits", [1, 3, 7, 8, 12, 16])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.int64, np.uint16])
def test_pack_bits_in_the_values_own_dtype_equals_the_widened_form(bits, dtype):
    if np.iinfo(dtype).max < (1 << bits) - 1:
        pytest.skip("the dtype cannot hold the codes")
    rng = np.random.default_rng(bits)
    values = rng.integers(0, 1 << bits, 2_500_003).astype(dtype)  # > 2 chunks, odd length
    got = pack_bits(values, bits)
    assert got == _old_pack_bits(values, bits)
    assert np.array_equal(unpack_bits(got, values.size, bits), values.astype(np.int64))
    too_big = values.copy()
    if bits < 16 and np.iinfo(dtype).max >= 1 << bits:
        too_big[-1] = 1 << bits
        with pytest.raises(ValueError, match="does not fit"):
            pack_bits(too_big, bits)
    if np.iinfo(dtype).min < 0:
        too_big[-1] = -1
        with pytest.raises(ValueError, match="does not fit"):
            pack_bits(too_big, bits)


@pytest.mark.parametrize("dtype", [np.uint8, np.int32])
def test_entropy_in_chunks_equals_np_unique(dtype):
    rng = np.random.default_rng(0)
    values = rng.binomial(255, 0.3, 3_000_001).astype(dtype)
    _, counts = np.unique(values, return_counts=True)
    want = float(-(counts * np.log2(counts / values.size)).sum())
    assert _entropy_bits(values) == pytest.approx(want, rel=1e-12)


def test_inspect_chunk_stats_equal_the_bulk_form(monkeypatch):
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(*s, generator=g) for s in [(4, 4), (300, 300), (4, 4), (1,), (70000,)]]
    tensors[1][0, 0] = float("nan")
    want = cli_inspect._bulk_weight_stats(tensors)
    got = cli_inspect._chunk_stats(tensors, MappedPages())
    assert json.dumps(got) == json.dumps(want)


def test_large_allocations_setting_is_harmless():
    map_large_allocations()
    x = torch.ones(1 << 21)
    assert float(x.sum()) == float(1 << 21)
    map_large_allocations(128 * 1024)  # glibc's default again


def test_streamed_compress_of_a_large_model_is_not_timed(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    folder = tmp_path / "bert"
    hf_models.build_folder("encoder", folder)
    args = ["compress", str(folder), "--sparsity", "0.5", "--bits", "8", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "timed")]) == 0
    monkeypatch.setattr(stream, "STREAM_LATENCY_MAX_BYTES", 0)
    assert main([*args, "--out", str(tmp_path / "untimed")]) == 0
    timed = json.loads((tmp_path / "timed" / "report.json").read_text())
    untimed = json.loads((tmp_path / "untimed" / "report.json").read_text())
    assert timed["fidelity"]["latency_ms_after"] is not None
    assert untimed["fidelity"]["latency_ms_after"] is None
    assert any("latency not measured" in w for w in untimed["warnings"])
    assert not any("latency not measured" in w for w in timed.get("warnings", []))
    # the same fidelity in small batches
    for key in ("rel_l2", "cosine"):
        assert untimed["fidelity"][key] == pytest.approx(timed["fidelity"][key], rel=1e-5)
    assert math.isfinite(untimed["fidelity"]["cosine"])
    # nothing of the restored weights' file is left behind
    assert sorted(p.name for p in (tmp_path / "untimed").iterdir()) == sorted(
        p.name for p in (tmp_path / "timed").iterdir()
    )


@pytest.mark.parametrize("density", [0.0, 0.02, 0.49, 0.5, 0.97, 1.0])
def test_scrambled_positions_by_range_equal_the_whole_sort(monkeypatch, density):
    rng = np.random.default_rng(int(density * 100))
    mask = (rng.random((313, 257)) < density).reshape(313, 257)
    keys = codec.scramble_keys(mask.size)
    kept = keys[mask.ravel()]
    keys.sort()
    kept.sort()
    want = np.searchsorted(keys, kept)
    monkeypatch.setattr(codec, "_BUCKET", 4096)  # ~20 ranges of keys
    monkeypatch.setattr(codec, "_TAIL_CHUNK", 1000)  # chunks not aligned with anything
    got = codec.scrambled_positions(mask)
    assert got.dtype == np.int64 and np.array_equal(got, want)


def test_spilled_archive_equals_the_in_memory_one_and_leaves_no_file(tmp_path, monkeypatch):
    archive = _archive(tmp_path)
    monkeypatch.setattr(packed_reader, "SPILL_MIN_BYTES", 0)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    spilled = read_packed_spilled(archive)
    plain = read_packed(archive)
    assert list(spilled.tensors) == list(plain.tensors)
    assert all(torch.equal(spilled.tensors[k], v) for k, v in plain.tensors.items())
    assert set(spilled.quantized) == set(plain.quantized)
    assert list((tmp_path / "tmp").iterdir()) == []  # unlinked at once
    if sys.platform.startswith("linux"):
        assert MappedPages().maps(spilled.tensors["a.weight"])
    # a model opened from it runs on those weights
    opened = load_model(str(archive))
    assert torch.equal(opened.module.state_dict()["a.weight"], plain.tensors["a.weight"])


def test_spilled_archive_falls_back_to_memory_when_the_file_cannot_be_written(
    tmp_path, monkeypatch
):
    archive = _archive(tmp_path)
    monkeypatch.setattr(packed_reader, "SPILL_MIN_BYTES", 0)
    real = packed_reader._FileSink.put

    def full(self, name, value):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(packed_reader._FileSink, "put", full)
    got = read_packed_spilled(archive)
    monkeypatch.setattr(packed_reader._FileSink, "put", real)
    want = read_packed(archive)
    assert all(torch.equal(got.tensors[k], v) for k, v in want.tensors.items())


def test_a_meta_value_is_encoded_from_its_codes_alone():
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(3))
    qt = quantize(w, 4, symmetric=False, per_channel=True)
    value = dequantize(qt)
    dense = writer._encode_tensor("w", value, qt, None, entropy=False)
    writer._check_restores("w", value.to("meta"), qt, None)  # nothing to compare with
    meta = writer._encode_tensor("w", value.to("meta"), qt, None, entropy=False)
    assert meta[0] == dense[0] and meta[1] == dense[1]
    with pytest.raises(ExportError, match="no values and no codes"):
        writer._check_restores("w", value.to("meta"), None, None)


def test_spilled_archive_without_a_usable_temporary_folder_reads_into_memory(tmp_path, monkeypatch):
    archive = _archive(tmp_path)
    monkeypatch.setattr(packed_reader, "SPILL_MIN_BYTES", 0)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing" / "folder"))
    got = read_packed_spilled(archive)
    want = read_packed(archive)
    assert all(torch.equal(got.tensors[k], v) for k, v in want.tensors.items())
