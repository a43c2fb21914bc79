"""``workbench compress`` of a weights-only safetensors file streams tensor by tensor
(`core.export.stream`) and writes exactly the files the dense path writes."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import core.cli.compress as cli_compress
import core.compress.engine as engine
import core.export.stream as stream
import core.packed.reader as reader
from core.base.memory import release_pages
from core.cli.main import main
from core.io.model_io import load_model
from core.ops.quantization import dequantize
from core.packed import read_packed
from core.packed.codec import pack_bits
from tests import hf_models
from tests.models import make


def _checkpoint(path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        # > 1 MiB: a view of the file's mapping, as at scale
        "embed.weight": torch.randn(640, 512, generator=g),
        "layers.0.fc.weight": torch.randn(256, 256, generator=g),
        "layers.0.fc.bias": torch.randn(256, generator=g),
        "head.weight": torch.randn(10, 256, generator=g),
        "head.bias": torch.randn(10, generator=g),
        "step": torch.tensor([7], dtype=torch.int64),
    }
    # ten small same-shape layers: compressed and encoded as groups by the dense path
    for i in range(10):
        tensors[f"blocks.{i}.proj.weight"] = torch.randn(16, 16, generator=g)
    save_file(tensors, str(path))


def _run(model, out, *extra) -> None:
    args = ["compress", str(model), "--sparsity", "0.5", "--bits", "8", "--out", str(out)]
    assert main([*args, "--quiet", *extra]) == 0


def _without_time(text: str) -> str:
    return re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[^\"<]*", "T", text)


def _spy_on_streaming(monkeypatch) -> list[str]:
    """The sources `core.export.stream` compresses tensor by tensor from now on."""
    calls: list[str] = []
    real = stream.compress_stream

    def spy(*args, **kw):
        calls.append(args[0].source)
        yield from real(*args, **kw)

    monkeypatch.setattr(stream, "compress_stream", spy)
    return calls


@pytest.mark.parametrize("extra", [(), ("--entropy",), ("--group-size", "32")])
def test_streamed_archive_and_report_equal_the_dense_path(tmp_path, monkeypatch, extra):
    model = tmp_path / "m.safetensors"
    _checkpoint(model)
    calls = _spy_on_streaming(monkeypatch)
    _run(model, tmp_path / "streamed", *extra)
    assert calls == [str(model)]  # the streaming path was taken
    monkeypatch.setattr(cli_compress, "_streams", lambda *a: False)
    _run(model, tmp_path / "dense", *extra)
    assert len(calls) == 1

    s, d = tmp_path / "streamed", tmp_path / "dense"
    name = "model.packed.safetensors"
    assert (s / name).read_bytes() == (d / name).read_bytes()
    assert (s / "recipe.json").read_text() == (d / "recipe.json").read_text()
    rs = json.loads((s / "report.json").read_text())
    rd = json.loads((d / "report.json").read_text())
    rs.pop("generated"), rd.pop("generated")
    for r in (rs, rd):
        r["exports"][0].pop("path")
    assert rs == rd
    assert rs["layers"] and rs["sparsity"] > 0.4
    html_s = _without_time((s / "report.html").read_text()).replace(str(s), "OUT")
    html_d = _without_time((d / "report.html").read_text()).replace(str(d), "OUT")
    assert html_s.count("<div class='hist'>") == len(rs["layers"])
    assert html_s == html_d
    # and it restores: the original's tensors, pruned and quantized
    archive = read_packed(s / name)
    original = dict(load_model(str(model)).module.state_dict())
    assert set(archive.tensors) == set(original)
    assert torch.equal(archive.tensors["step"], original["step"])
    w = archive.tensors["embed.weight"]
    assert 0.45 < float((w == 0).float().mean()) < 0.55
    # codes and masks are decoded again on access, one tensor at a time
    assert "embed.weight" in archive.quantized and "embed.weight" in archive.masks
    for name, qt in archive.quantized.items():
        assert torch.equal(dequantize(qt), archive.tensors[name])
    assert not bool(w[~archive.masks["embed.weight"]].any())


def _eager_cnn(path) -> None:
    model, _ = make("resnet")  # Conv + BatchNorm (running stats, num_batches_tracked)
    torch.save(model, path)


def _hf_bert(path) -> None:
    pytest.importorskip("transformers")
    hf_models.build_folder("encoder", path)


@pytest.mark.parametrize(
    ("build", "name", "extra", "evaluated"),
    [(_eager_cnn, "cnn.pt", ("--trust",), None), (_hf_bert, "bert", (), "random inputs")],
    ids=["eager-cnn-bn", "hf-bert"],
)
def test_streamed_archive_of_a_runnable_model_equals_the_dense_path(
    tmp_path, monkeypatch, build, name, extra, evaluated
):
    model = tmp_path / name
    build(model)
    calls = _spy_on_streaming(monkeypatch)
    _run(model, tmp_path / "streamed", *extra)
    assert len(calls) == 1  # the streaming path was taken
    monkeypatch.setattr(cli_compress, "_streams", lambda *a: False)
    _run(model, tmp_path / "dense", *extra)
    assert len(calls) == 1

    s, d = tmp_path / "streamed", tmp_path / "dense"
    packed = "model.packed.safetensors"
    assert (s / packed).read_bytes() == (d / packed).read_bytes()
    assert (s / "recipe.json").read_text() == (d / "recipe.json").read_text()
    rs = json.loads((s / "report.json").read_text())
    rd = json.loads((d / "report.json").read_text())
    assert rs["layers"] == rd["layers"] and rs["sparsity"] == rd["sparsity"] > 0.4
    # evaluated (with an example input: on random inputs) like the dense path, on the model
    # the archive restores
    assert rs["fidelity"]["data"] == rd["fidelity"]["data"] == evaluated
    for key in ("rel_l2", "cosine"):
        got, want = rs["fidelity"].get(key), rd["fidelity"].get(key)
        assert (got is None) == (want is None) == (evaluated is None)
        assert want is None or got == pytest.approx(want, rel=1e-6)
    # the archive restores a runnable model (for the HF folder: from its recorded folder)
    assert main(["inspect", str(s / packed), "--json"]) == 0
    assert main(["inspect", str(s / packed), "--base", str(model), "--json", *extra]) == 0
    restored = load_model(str(s / packed), trust=True, base=str(model))
    assert restored.can_run
    weights = dict(read_packed(s / packed).tensors)
    state = restored.module.state_dict()
    assert set(weights) == set(state)
    assert all(torch.equal(weights[k], state[k]) for k in weights)


def test_tied_weights_are_not_streamed():
    model = torch.nn.Sequential(torch.nn.Embedding(8, 4), torch.nn.Linear(4, 8, bias=False))
    model[1].weight = model[0].weight
    assert engine._shares_memory(model.state_dict().values())
    assert not engine._shares_memory(torch.nn.Linear(4, 8).state_dict().values())


def test_not_streamed_with_a_second_format(tmp_path, monkeypatch):
    model = tmp_path / "m.safetensors"
    _checkpoint(model)
    monkeypatch.setattr(stream, "compress_stream", None)  # would fail if called
    _run(model, tmp_path / "out", "--format", "packed,safetensors")
    assert (tmp_path / "out" / "model.packed.safetensors").is_file()
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_released_pages_of_a_mapped_tensor_keep_their_values(tmp_path):
    model = tmp_path / "m.safetensors"
    _checkpoint(model)
    t = load_model(str(model)).module.state_dict()["embed.weight"]
    before = t.clone()
    release_pages(t)
    release_pages(t.numpy())
    assert torch.equal(t, before)


@pytest.mark.parametrize("bits", [3, 8, 12])
def test_codes_unpack_in_chunks(monkeypatch, bits):
    g = np.random.default_rng(bits)
    values = g.integers(0, 1 << bits, 1000)
    buf = pack_bits(values, bits)
    monkeypatch.setattr(reader, "_UNPACK_CHUNK", 64)
    got = reader._unpack_codes(buf, values.size, bits)
    assert got.dtype == (np.uint8 if bits <= 8 else np.int32)
    assert np.array_equal(got, values)
