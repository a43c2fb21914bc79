"""Dense exports verified against PyTorch, atomic writes, re-export from the archive, report."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from core.base.errors import Cancelled, ExportError, ModelLoadError
from core.base.model import LoadedModel
from core.base.progress import CancelToken
from core.export.formats import (
    EXPORT_FORMATS,
    FILE_NAMES,
    export,
    export_all,
    parse_formats,
    result_from_packed,
)
from core.export.report import write_report
from core.recipe.plan import CompressionPlan
from tests.core._fixtures import eager, make_result
from tests.models import make


def _result(kind: str, **kw):
    model, x = make(kind)
    return make_result(eager(model, x, kind), **kw)


def _inputs(kind: str, n: int = 16, seed: int = 5) -> torch.Tensor:
    from tests.models import example_input

    model, _ = make(kind)
    return example_input(model, batch=n, seed=seed)


def _torch_out(result, x):
    with torch.no_grad():
        return result.compressed.module(x).numpy()


@pytest.mark.parametrize("kind", ["resnet", "transformer", "lstm"])
def test_onnx_matches_pytorch_in_onnxruntime(tmp_path, kind):
    result = _result(kind, sparsity=0.8, bits=6, per_channel=True)
    rec = export(result, "onnx", tmp_path / "model.onnx", data=_inputs(kind))
    assert rec.max_abs_diff is not None and rec.max_abs_diff < 1e-4
    assert rec.latency_ms is not None and rec.latency_ms > 0
    # independent check on other inputs and another batch size (the batch axis is dynamic)
    x = _inputs(kind, n=7, seed=11)
    sess = ort.InferenceSession(str(rec.path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(out, _torch_out(result, x), atol=1e-4, rtol=0)


def test_dense_pytorch_exports_hold_pruned_zeros_and_dequantized_values(tmp_path):
    from safetensors.torch import load_file

    result = _result("resnet", sparsity=0.7, bits=4)
    x = _inputs("resnet")
    records = export_all(
        result, ["state_dict", "safetensors", "torchscript", "pt2"], tmp_path, data=x, latency=False
    )
    assert [r.path.name for r in records] == [
        "model.pt",
        "model.safetensors",
        "model.torchscript.pt",
        "model.pt2",
    ]
    for r in records:
        assert r.max_abs_diff == 0.0, r.format
        assert r.bytes_on_disk == r.path.stat().st_size
    expected = result.compressed.module.state_dict()
    for state in (
        torch.load(tmp_path / "model.pt", weights_only=True),
        load_file(str(tmp_path / "model.safetensors")),
    ):
        for name, value in expected.items():
            assert torch.equal(state[name], value), name
        for name, mask in result.masks.items():
            assert (state[name][~mask] == 0).all()
    scripted = torch.jit.load(str(tmp_path / "model.torchscript.pt"))
    with torch.no_grad():
        assert torch.equal(scripted(x), result.compressed.module(x))
    program = torch.export.load(str(tmp_path / "model.pt2")).module()
    with torch.no_grad():
        assert torch.equal(program(x), result.compressed.module(x))


def test_onnx_int8_is_smaller_and_close(tmp_path):
    result = _result("encoder", sparsity=0.5, bits=8)
    x = _inputs("encoder", n=64)
    fp32, int8 = export_all(result, ["onnx", "onnx-int8"], tmp_path, data=x, latency=False)
    assert int8.path.name == "model.int8.onnx"
    assert int8.bytes_on_disk < 0.5 * fp32.bytes_on_disk
    assert "int8" in int8.note
    # unit-norm embeddings: int8 activations stay within a few hundredths
    assert int8.max_abs_diff is not None and int8.max_abs_diff < 0.05


def test_static_int8_for_convolutions(tmp_path):
    result = _result("resnet", sparsity=0.5, bits=8)
    rec = export(
        result, "onnx-int8", tmp_path / "model.int8.onnx", data=_inputs("resnet", 64), latency=False
    )
    assert "static QDQ" in rec.note
    ref = np.abs(_torch_out(result, _inputs("resnet", 64))).max()
    assert rec.max_abs_diff < 0.1 * ref


def test_weights_only_and_torchscript_sources_refuse_what_they_cannot_do(tmp_path):
    result = _result("lstm")
    wo = replace(
        result,
        compressed=replace(result.compressed, weights_only=True, example_input=None),
        original=replace(result.original, weights_only=True, example_input=None),
    )
    with pytest.raises(ExportError, match="weights-only"):
        export(wo, "torchscript", tmp_path / "a.pt")
    with pytest.raises(ExportError, match="weights-only"):
        export(wo, "onnx", tmp_path / "a.onnx")
    rec = export(wo, "state_dict", tmp_path / "model.pt", latency=False)
    assert rec.max_abs_diff is None and rec.bytes_on_disk > 0

    model, x = make("resnet")
    ts = LoadedModel(
        module=torch.jit.script(model),
        format="torchscript",
        source="<ts>",
        name="ts",
        example_input=x,
    )
    ts_result = make_result(ts)
    with pytest.raises(ExportError, match="TorchScript model cannot be converted"):
        export(ts_result, "pt2", tmp_path / "model.pt2")
    rec = export(ts_result, "torchscript", tmp_path / "model.torchscript.pt", latency=False)
    assert rec.note == "re-saved TorchScript" and rec.max_abs_diff == 0.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "model.torchscript.pt"]


def test_existing_files_block_the_whole_export_without_force(tmp_path):
    result = _result("lstm")
    (tmp_path / "model.onnx").write_bytes(b"old")
    with pytest.raises(ExportError, match=r"model\.onnx.*--force"):
        export_all(result, ["state_dict", "onnx"], tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    records = export_all(result, ["state_dict", "onnx"], tmp_path, force=True, latency=False)
    assert (tmp_path / "model.onnx").read_bytes() != b"old"
    assert {r.format for r in records} == {"state_dict", "onnx"}


def test_interrupted_writes_leave_nothing_behind(tmp_path, monkeypatch):
    result = _result("lstm")

    def _broken_save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"partial bytes")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", _broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        export(result, "state_dict", tmp_path / "model.pt")
    assert list(tmp_path.iterdir()) == []

    def _broken_onnx(model, args, f, *a, **kw):
        with open(f, "wb") as fh:
            fh.write(b"half a graph")
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(torch.onnx, "export", _broken_onnx)
    with pytest.raises(ExportError, match="exporter crashed"):
        export(result, "onnx", tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []

    # cancelled between the header and the blob of the packed archive
    token = CancelToken()
    import core.packed as packed

    real_check = token.check
    calls = {"n": 0}

    def _check():
        calls["n"] += 1
        if calls["n"] > 12:
            token.cancel()
        real_check()

    monkeypatch.setattr(token, "check", _check)
    with pytest.raises(Cancelled):
        packed.write_packed(result, tmp_path / "model.packed.safetensors", cancel=token)
    assert list(tmp_path.iterdir()) == []


def test_parse_formats_and_file_names():
    assert parse_formats("packed, onnx,packed") == ["packed", "onnx"]
    with pytest.raises(ExportError, match="unknown export format 'zip'"):
        parse_formats("onnx,zip")
    assert set(FILE_NAMES) == set(EXPORT_FORMATS)
    assert len(set(FILE_NAMES.values())) == len(EXPORT_FORMATS)


# ---------------------------------------------------------------------------------------
# the real engine: preview == file size, re-export from the archive
# ---------------------------------------------------------------------------------------
def _engine_result(source: str, plan):
    from core.analysis.stats import analyze
    from core.compress.engine import compress
    from core.io.data import demo_data_for
    from core.io.model_io import load_model

    loaded = load_model(source)
    split = demo_data_for(loaded)
    stats = analyze(loaded, split[0] if split else None)
    return loaded, stats, compress(loaded, plan, stats)


@pytest.mark.parametrize("source", ["demo:mlp", "demo:cnn"])
def test_preview_equals_file_size_within_one_percent(tmp_path, source):
    from core.analysis.estimate import preview
    from core.packed import write_packed
    from core.recipe.plan import simple_plan

    plans = [
        simple_plan(0.95, 5),
        simple_plan(0.9, 4, per_channel=False),
        simple_plan(0.97, 6, symmetric=True),
        simple_plan(0.3, 8),
        simple_plan(0.8, None),
        simple_plan(0.0, 4, "nm"),
        simple_plan(0.5, 8, "channel_l2"),
    ]
    # The shipped Deep-Compression recipes also code the biases (bias_bits).
    name = source.split(":")[1]
    plans.append(
        CompressionPlan.load(Path(__file__).parents[2] / f"resources/recipes/demo_{name}.json")
    )
    for i, plan in enumerate(plans):
        loaded, stats, result = _engine_result(source, plan)
        expected = preview(stats, plan).packed_bytes
        disk = write_packed(result, tmp_path / f"{i}.packed.safetensors").bytes_on_disk
        assert abs(disk - expected) / disk < 0.01, (plan, disk, expected)


def test_reexport_from_archive_restores_the_compressed_model(tmp_path):
    from core.recipe.plan import simple_plan

    loaded, _, result = _engine_result("demo:cnn", simple_plan(0.9, 5))
    export_all(result, ["packed"], tmp_path)
    again = result_from_packed(tmp_path / "model.packed.safetensors")
    assert again.original.source == "demo:cnn"
    assert again.plan == result.plan
    for name, value in result.compressed.module.state_dict().items():
        assert torch.equal(again.compressed.module.state_dict()[name], value)
    for a, b in zip(again.layers, result.layers, strict=True):
        assert (a.name, a.nnz, a.bits, a.method) == (b.name, b.nnz, b.bits, b.method)
    rec = export(again, "onnx", tmp_path / "model.onnx", data=loaded.example_input, latency=False)
    assert rec.max_abs_diff < 1e-4


def test_report_json_and_self_contained_html(tmp_path):
    from core.evaluate import evaluate

    result = _result("resnet", sparsity=0.8, bits=5)
    x = _inputs("resnet", 32)
    from core.io.data import make_dataset

    data = make_dataset(x, None, name="random")
    evals = {
        "before": evaluate(result.original, data, latency=False),
        "after": evaluate(result.compressed, data, reference=result.original, latency=False),
        "data": "random",
    }
    exports = export_all(result, ["packed", "onnx"], tmp_path, data=x, latency=False)
    json_path, html_path = write_report(result, tmp_path, evals=evals, exports=exports)
    report = json.loads(json_path.read_text())
    assert report["compressed_bytes"] == (tmp_path / "model.packed.safetensors").stat().st_size
    assert report["compression_ratio"] == pytest.approx(
        report["original_bytes"] / report["compressed_bytes"]
    )
    assert [e["format"] for e in report["exports"]] == ["packed", "onnx"]
    assert len(report["layers"]) == len(result.layers)
    assert report["fidelity"]["cosine"] is not None
    page = html_path.read_text()
    assert page.count("<svg") == len(result.layers)
    assert "<style>" in page and "src=" not in page and "<link" not in page
    for layer in result.layers:
        assert f"<td>{layer.name}</td>" in page


def test_export_cli_needs_an_archive_and_known_formats(tmp_path, capsys):
    from core.cli.main import main

    assert main(["export", str(tmp_path), "--format", "onnx"]) == 2
    err = capsys.readouterr().err
    assert "model.packed.safetensors" in err and str(tmp_path) in err
    assert main(["export", str(tmp_path), "--format", "onnx,tar"]) == 2
    assert "unknown export format 'tar'" in capsys.readouterr().err


def test_files_on_disk_round_trip_through_the_engine(tmp_path):
    """TorchScript and .pt2 files: compress, pack, load back with the original named as base
    (the recorded source path alone is never opened: the user did not name it)."""
    from core.analysis.stats import analyze
    from core.compress.engine import compress
    from core.io.model_io import load_model, load_packed
    from core.packed import write_packed
    from core.recipe.plan import simple_plan

    model, x = make("resnet")
    torch.jit.save(torch.jit.script(model), str(tmp_path / "net.torchscript.pt"))
    torch.export.save(torch.export.export(model, (x,)), str(tmp_path / "net.pt2"))
    for name in ("net.torchscript.pt", "net.pt2"):
        loaded = load_model(tmp_path / name)
        result = compress(loaded, simple_plan(0.85, 6), analyze(loaded))
        archive = tmp_path / f"{name}.packed.safetensors"
        write_packed(result, archive)
        with pytest.raises(ModelLoadError, match="--base"):
            load_packed(archive)
        restored = load_packed(archive, tmp_path / name)
        assert restored.format == loaded.format
        with torch.no_grad():
            assert torch.equal(restored.module(x), result.compressed.module(x))


def test_impossible_formats_fail_before_anything_is_written(tmp_path):
    from core.export.formats import check_formats

    result = _result("lstm")
    wo = replace(
        result,
        compressed=replace(result.compressed, weights_only=True, example_input=None),
        original=replace(result.original, weights_only=True, example_input=None),
    )
    with pytest.raises(ExportError, match="onnx export needs a model with a forward pass"):
        export_all(wo, ["packed", "state_dict", "onnx"], tmp_path)
    assert list(tmp_path.iterdir()) == []
    check_formats(wo.compressed, ["packed", "state_dict", "safetensors"])
    no_input = replace(result.compressed, example_input=None)
    with pytest.raises(ExportError, match="needs an example input"):
        check_formats(no_input, ["onnx"], has_input=False)
    check_formats(no_input, ["onnx"], has_input=True)


def test_a_failing_export_removes_the_files_the_call_created(tmp_path, monkeypatch):
    import core.export.formats as export_mod

    result = _result("lstm")
    (tmp_path / "model.pt").write_bytes(b"kept: it existed before")

    def _broken(*args, **kwargs):
        raise ExportError("exporter crashed")

    monkeypatch.setitem(export_mod._WRITERS, "onnx", _broken)
    with pytest.raises(ExportError, match="exporter crashed"):
        export_all(
            result, ["safetensors", "state_dict", "onnx"], tmp_path, force=True, latency=False
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_static_batch_pt2_exports_verify_on_its_batch_size(tmp_path):
    """A .pt2 exported with a fixed batch only runs on that batch; exports must respect it."""
    model, x = make("gru")
    ep = torch.export.export(model, (x,))
    loaded = LoadedModel(
        module=ep.module(),
        format="pt2",
        source="gru.pt2",
        name="gru",
        example_input=x,
        metadata={"fixed_batch": int(x.shape[0])},
    )
    result = make_result(loaded, sparsity=0.5, bits=8)
    data = torch.randn(40, *x.shape[1:])
    records = export_all(
        result, ["packed", "onnx", "torchscript", "pt2"], tmp_path, data=data, latency=False
    )
    for rec in records:
        assert rec.max_abs_diff is not None and rec.max_abs_diff < 1e-4, rec.format
    notes = {r.format: r.note for r in records}
    assert "batch size fixed at 4" in notes["onnx"] and "fixed at 4" in notes["pt2"]
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[0] == 4


def test_pt2_export_keeps_the_batch_dimension_dynamic(tmp_path):
    result = _result("resnet", sparsity=0.5, bits=6)
    rec = export(result, "pt2", tmp_path / "model.pt2", data=_inputs("resnet", n=8), latency=False)
    assert "dynamic batch" in rec.note
    program = torch.export.load(str(tmp_path / "model.pt2")).module()
    x = _inputs("resnet", n=3, seed=2)
    with torch.no_grad():
        np.testing.assert_allclose(program(x).numpy(), _torch_out(result, x), atol=1e-5)


def test_an_interrupt_while_verifying_removes_the_renamed_file_too(tmp_path, monkeypatch):
    """Ctrl-C can land after a file's atomic rename, while it is being checked in onnxruntime."""
    import core.export.formats as export_mod

    result = _result("lstm")

    def _interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_mod, "_onnx_verify", _interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_all(result, ["packed", "onnx"], tmp_path, latency=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_export_fp32_onnx(tmp_path, dtype):
    """bfloat16 cannot be exported to ONNX (and onnxruntime's CPU kernels lack it): the ONNX
    graph is written in fp32, as its description says, and verified against the model; the
    verification itself widens bfloat16 outputs (numpy has no bfloat16)."""
    model, x = make("transformer")
    model = model.to(dtype)
    result = make_result(eager(model, x, "half"), sparsity=0.5, bits=8)
    data = _inputs("transformer", n=8)
    records = {r.format: r for r in export_all(result, ["packed", "onnx"], tmp_path, data=data)}
    assert records["packed"].max_abs_diff == 0.0
    import onnx

    graph = onnx.load(str(records["onnx"].path)).graph
    assert {i.data_type for i in graph.initializer} <= {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.INT64,
        onnx.TensorProto.BOOL,
    }
    # fp32 against the narrow model: within the narrow type's rounding, not bit-equal.
    assert 0.0 <= records["onnx"].max_abs_diff < 0.1
    assert "fp32 ONNX" in records["onnx"].note


def test_a_bfloat16_model_is_also_compared_with_its_size_as_stored(tmp_path):
    """The fp32 baseline doubles a bfloat16 checkpoint's real size: the report also gives
    the size as stored and the ratio against it (CLI line and HTML card too); an fp32 model's
    report has them equal and shows no extra card."""
    from core.cli.compress import _summary_line

    model, x = make("transformer")
    result = make_result(eager(model.to(torch.bfloat16), x, "bf16"), sparsity=0.5, bits=8)
    exports = export_all(result, ["packed"], tmp_path, data=_inputs("transformer", 8))
    json_path, html_path = write_report(result, tmp_path, exports=exports)
    report = json.loads(json_path.read_text())
    floats = [p for p in model.parameters() if p.dtype.is_floating_point]
    assert report["stored_bytes"] == sum(2 * p.numel() for p in floats)
    assert report["original_bytes"] == 2 * report["stored_bytes"]
    assert report["compression_ratio_vs_stored"] == pytest.approx(
        report["stored_bytes"] / report["compressed_bytes"]
    )
    assert "size as stored" in html_path.read_text()
    line = _summary_line("m", report, tmp_path)
    assert f"({report['stored_bytes']:,} B as stored)" in line and "x vs stored" in line

    fp32 = _result("transformer", sparsity=0.5, bits=8)
    out = tmp_path / "fp32"
    out.mkdir()
    json_path, html_path = write_report(fp32, out, exports=export_all(fp32, ["packed"], out))
    report = json.loads(json_path.read_text())
    assert report["stored_bytes"] == report["original_bytes"]
    assert "size as stored" not in html_path.read_text()
    assert "as stored" not in _summary_line("m", report, out)
