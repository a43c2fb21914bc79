"""End-to-end workflows of the ``workbench`` CLI on user models that are not the demos.

Every model and data file is generated on the fly (tests/models.py) in the formats users bring:
TorchScript, ``torch.export`` programs (static and dynamic batch), safetensors / state_dict
checkpoints and a pickled module. Each test drives the real command line in a subprocess and then
checks that the numbers it reports are honest: ``compressed_bytes`` is the packed file's size,
``sparsity`` is the fraction of zeros in the exported weights, the ONNX files run in onnxruntime
and agree with PyTorch, and the packed archive restores the compressed model exactly.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from core.analysis.inventory import prunable_layers
from core.base.model import forward
from core.export.formats import load_packed
from core.io.model_io import load_model
from core.recipe.plan import CompressionPlan
from tests.models import make

ROOT = Path(__file__).resolve().parents[2]
ALL_FORMATS = "packed,onnx,onnx-int8,torchscript,state_dict,safetensors"
# One intra-op thread: the subprocesses run tiny models, where thread start-up and spinning cost
# more than they gain (on a busy 2-core machine two threads make them ~100x slower).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "core.cli.main", *args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


def compress(model: Path | str, out: Path, *args: str) -> dict:
    proc = cli("compress", str(model), "--out", str(out), "--quiet", *args)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return json.loads((out / "report.json").read_text())


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, no traceback, exactly one line on stderr that says what and names the file."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert re.match(r"workbench (inspect|compress|export): error: ", lines[0]), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ---------------------------------------------------------------------------------------
# generated user files
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Iterator[dict[str, Path]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            # jit.trace / torch.export talk about the tracing of nn.LSTM/GRU internals.
            warnings.simplefilter("ignore")
            yield _generate(tmp_path_factory.mktemp("user_files"))
    finally:
        torch.set_num_threads(threads)


def _generate(d: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    g = torch.Generator().manual_seed(1)

    def data(name: str, model: torch.nn.Module, x: torch.Tensor, labelled: bool, ext: str):
        with torch.no_grad():
            y = model(x).argmax(dim=1) if labelled else None
        path = d / f"{name}_{'xy' if labelled else 'x'}.{ext}"
        if ext == "npz":
            arrays = {"x": x.numpy()} | ({} if y is None else {"y": y.numpy()})
            np.savez(path, **arrays)
        else:
            torch.save({"x": x} | ({} if y is None else {"y": y}), path)
        out[path.stem] = path

    resnet, ex = make("resnet")
    out["resnet.ts"] = d / "resnet.ts"
    torch.jit.save(torch.jit.trace(resnet, ex), str(out["resnet.ts"]))
    # A dynamic batch dimension: torch writes it as Symbol('s..', positive=True, integer=True).
    dyn = torch.export.export(resnet, (ex,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    out["resnet_dyn.pt2"] = d / "resnet_dyn.pt2"
    torch.export.save(dyn, str(out["resnet_dyn.pt2"]))
    out["resnet_pickle.pt"] = d / "resnet_pickle.pt"
    torch.save(resnet, out["resnet_pickle.pt"])
    data("resnet", resnet, torch.randn(60, 1, 8, 8, generator=g), True, "npz")

    transformer, ex = make("transformer")
    out["transformer.pt2"] = d / "transformer.pt2"  # static batch of 4, as exported
    torch.export.save(torch.export.export(transformer, (ex,)), str(out["transformer.pt2"]))
    data("transformer", transformer, torch.randint(0, 100, (60, 16), generator=g), True, "npz")

    lstm, ex = make("lstm")
    out["lstm.ts"] = d / "lstm.ts"
    torch.jit.save(torch.jit.trace(lstm, ex), str(out["lstm.ts"]))
    out["lstm.safetensors"] = d / "lstm.safetensors"
    save_file({k: v.contiguous() for k, v in lstm.state_dict().items()}, out["lstm.safetensors"])
    data("lstm", lstm, torch.randn(60, 8, 8, generator=g), True, "pt")

    gru, ex = make("gru")
    out["gru.pt2"] = d / "gru.pt2"
    torch.export.save(torch.export.export(gru, (ex,)), str(out["gru.pt2"]))
    x = torch.randn(60, 12, 6, generator=g)
    np.savez(d / "gru_x.npz", x=x.numpy())
    out["gru_x"] = d / "gru_x.npz"

    encoder, _ = make("encoder")
    out["encoder.safetensors"] = d / "encoder.safetensors"
    save_file(
        {k: v.contiguous() for k, v in encoder.state_dict().items()}, out["encoder.safetensors"]
    )

    bad = d / "resnet_nan.npz"
    xn = torch.randn(20, 1, 8, 8, generator=g)
    xn[3, 0, 2, 2] = float("nan")
    np.savez(bad, x=xn.numpy())
    out["resnet_nan"] = bad
    np.savez(d / "resnet_flat.npz", x=torch.randn(20, 64, generator=g).numpy())
    out["resnet_flat"] = d / "resnet_flat.npz"
    np.savez(d / "resnet_label12.npz", x=torch.randn(20, 1, 8, 8).numpy(), y=np.full(20, 12))
    out["resnet_label12"] = d / "resnet_label12.npz"
    return out


def prunable_zeros(source: Path | str, state: dict[str, torch.Tensor], trust: bool = False):
    """(zeros, total) over the source model's prunable weight tensors in an exported state."""
    names = [info.tensor for info in prunable_layers(load_model(source, trust=trust))]
    assert names and all(n in state for n in names), (names, list(state))
    zeros = sum(int((state[n] == 0).sum()) for n in names)
    return zeros, sum(state[n].numel() for n in names)


def check_honest_numbers(source: Path, out: Path, report: dict) -> dict[str, torch.Tensor]:
    """Packed size on disk, sparsity of the dense export, per-layer zeros: all as reported."""
    packed = out / "model.packed.safetensors"
    assert report["compressed_bytes"] == packed.stat().st_size
    assert report["compression_ratio"] == pytest.approx(
        report["original_bytes"] / report["compressed_bytes"]
    )
    dense = out / "model.pt"
    state = (
        torch.load(dense, weights_only=True)
        if dense.exists()
        else load_file(str(out / "model.safetensors"))
    )
    zeros, total = prunable_zeros(source, state)
    assert report["sparsity"] == pytest.approx(zeros / total, abs=1e-9)
    for layer in report["layers"]:
        t = state[layer["tensor"]]
        assert layer["numel"] - layer["nnz"] == int((t == 0).sum()), layer["name"]
    # The packed archive restores exactly the weights of the dense export.
    restored = load_packed(packed, source).module.state_dict()
    for name, value in state.items():
        assert torch.equal(restored[name].to(value.dtype), value), name
    listed = {e["format"]: e for e in report["exports"]}
    for fmt, entry in listed.items():
        assert Path(entry["path"]).stat().st_size == entry["bytes_on_disk"], fmt
    return state


def run_model(loaded, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return forward(loaded, x)


def ort_run(path: Path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


# ---------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------
def test_inspect_table_json_and_trust(files):
    proc = cli("inspect", str(files["transformer.pt2"]))
    assert proc.returncode == 0, proc.stderr
    assert "format  pt2" in proc.stdout
    assert re.search(r"^embed\s+Embedding\s+100x32\s+3,200\s+yes", proc.stdout, re.M)
    assert re.search(r"in_proj_weight\s+MultiheadAttention\s+96x32", proc.stdout)

    proc = cli("inspect", str(files["lstm.safetensors"]), "--json", "--data", str(files["lstm_xy"]))
    assert proc.returncode == 0, proc.stderr
    desc = json.loads(proc.stdout)
    state = load_file(str(files["lstm.safetensors"]))
    assert desc["format"] == "safetensors" and desc["weights_only"] is True
    assert desc["total_params"] == sum(t.numel() for t in state.values())
    rows = {row["name"]: row for row in desc["layers"]}
    row = rows["lstm.weight_hh_l1"]
    w = state["lstm.weight_hh_l1"]
    assert row["shape"] == [128, 32] and row["prunable"] and row["sparsity"] == 0.0
    assert row["weight_stats"]["min"] == pytest.approx(float(w.min()))
    assert row["weight_stats"]["std"] == pytest.approx(
        float(w.double().std(unbiased=False)), rel=1e-6
    )
    assert desc["data"]["samples"] == 60 and desc["data"]["labelled"] is True

    assert_one_line_error(
        cli("inspect", str(files["resnet_pickle.pt"])),
        "resnet_pickle.pt",
        "ResNetBN",
        "--trust",
    )
    proc = cli("inspect", str(files["resnet_pickle.pt"]), "--trust", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["format"] == "eager"


def test_inspect_refuses_bad_files_in_one_line(files, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(4096))
    assert_one_line_error(cli("inspect", str(junk)), "junk.pt")
    assert_one_line_error(cli("inspect", str(tmp_path / "missing.pt2")), "missing.pt2", "no such")
    trunc = tmp_path / "trunc.ts"
    trunc.write_bytes(files["resnet.ts"].read_bytes()[:2000])
    assert_one_line_error(cli("inspect", str(trunc)), "trunc.ts", "truncated")


def test_pt2_guard_code_from_the_file_never_runs(files, tmp_path):
    """``ExportedProgram.module()`` exec()s the archive's guards_code: a crafted one is refused."""
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt2"
    with zipfile.ZipFile(files["gru.pt2"]) as zin, zipfile.ZipFile(evil, "w") as zout:
        for info in zin.infolist():
            raw = zin.read(info.filename)
            if re.search(r"models/[^/]+\.json$", info.filename):
                program = json.loads(raw)
                program["guards_code"] = [f"__import__('os').mkdir({str(marker)!r}) is None"]
                raw = json.dumps(program).encode()
            zout.writestr(info, raw)
    proc = cli("inspect", str(evil), "--data", str(files["gru_x"]))
    assert_one_line_error(proc, "evil.pt2", "guard", "--trust")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------
# compress + every export, checked on the files themselves
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resnet_run(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("resnet_ts") / "out"
    report = compress(
        files["resnet.ts"],
        out,
        *("--sparsity", "0.7", "--bits", "6", "--method", "magnitude"),
        *("--data", str(files["resnet_xy"]), "--format", ALL_FORMATS),
    )
    return out, report


def test_torchscript_cnn_all_formats(files, resnet_run):
    out, report = resnet_run
    source = files["resnet.ts"]
    assert {e["format"] for e in report["exports"]} == set(ALL_FORMATS.split(","))
    assert report["model_format"] == "torchscript"
    assert report["sparsity"] == pytest.approx(0.7, abs=2e-3)
    # The labels are the original model's own predictions: accuracy before must be exactly 1.
    assert report["accuracy_before"] == 1.0 and 0.0 <= report["accuracy_after"] <= 1.0
    assert 0.0 < report["fidelity"]["rel_l2"] < 1.0
    assert all(layer["bits"] == 6 for layer in report["layers"])
    check_honest_numbers(source, out, report)
    assert (out / "report.html").stat().st_size > 1000
    assert CompressionPlan.load(out / "recipe.json").default.quant.bits == 6

    x = torch.from_numpy(np.load(files["resnet_xy"])["x"][:7])
    restored = load_packed(out / "model.packed.safetensors", source)
    with torch.no_grad():
        expected = forward(restored, x)
        scripted = torch.jit.load(str(out / "model.torchscript.pt"))(x)
    assert torch.equal(scripted, expected)
    np.testing.assert_allclose(ort_run(out / "model.onnx", x), expected.numpy(), atol=1e-5)
    int8 = ort_run(out / "model.int8.onnx", x)
    assert int8.shape == tuple(expected.shape) and np.isfinite(int8).all()
    assert (out / "model.int8.onnx").stat().st_size < (out / "model.onnx").stat().st_size
    rel = np.linalg.norm(int8 - expected.numpy()) / np.linalg.norm(expected.numpy())
    assert rel < 0.1


def test_static_batch_pt2_transformer(files, tmp_path):
    """A .pt2 exported with a fixed batch of 4 (the common case) compresses and exports."""
    out = tmp_path / "out"
    source = files["transformer.pt2"]
    report = compress(
        source,
        out,
        *("--sparsity", "0.5", "--bits", "8", "--data", str(files["transformer_xy"])),
        *("--format", "packed,onnx,torchscript,state_dict"),
    )
    assert report["model_format"] == "pt2" and report["accuracy_before"] == 1.0
    check_honest_numbers(source, out, report)
    notes = {e["format"]: e["note"] for e in report["exports"]}
    assert "batch size fixed at 4" in notes["onnx"]

    x = torch.from_numpy(np.load(files["transformer_xy"])["x"][:4])
    restored = load_packed(out / "model.packed.safetensors", source)
    with torch.no_grad():
        expected = forward(restored, x)
        scripted = torch.jit.load(str(out / "model.torchscript.pt"))(x)
    assert torch.equal(scripted, expected)
    np.testing.assert_allclose(ort_run(out / "model.onnx", x), expected.numpy(), atol=1e-5)
    # Any batch size still works through the workbench's own runner (chunks of 4).
    assert forward(restored, torch.from_numpy(np.load(files["transformer_xy"])["x"][:9])).shape == (
        9,
        5,
    )


def test_dynamic_pt2_channel_pruning_and_pt2_export(files, tmp_path):
    out = tmp_path / "out"
    source = files["resnet_dyn.pt2"]
    report = compress(
        source,
        out,
        *("--sparsity", "0.5", "--bits", "5", "--method", "channel_l2"),
        *("--data", str(files["resnet_xy"]), "--format", "packed,pt2,onnx,state_dict"),
    )
    check_honest_numbers(source, out, report)
    conv = next(layer for layer in report["layers"] if layer["name"] == "block.conv1")
    rows = torch.load(out / "model.pt", weights_only=True)["block.conv1.weight"].flatten(1)
    kept_rows = rows.abs().sum(dim=1) > 0
    # Whole output channels are pruned, nothing in between.
    assert conv["sparsity"] > 0 and not ((rows == 0).any(dim=1) & kept_rows).all()
    notes = {e["format"]: e["note"] for e in report["exports"]}
    assert "dynamic batch" in notes["pt2"]
    program = torch.export.load(str(out / "model.pt2")).module()
    x = torch.from_numpy(np.load(files["resnet_xy"])["x"][:7])
    expected = run_model(load_packed(out / "model.packed.safetensors", source), x)
    with torch.no_grad():
        assert torch.allclose(program(x), expected, atol=1e-6)
        assert program(x[:3]).shape == (3, 10)
    np.testing.assert_allclose(ort_run(out / "model.onnx", x), expected.numpy(), atol=1e-5)


def test_lstm_gradient_method_finetune_and_distill(files, tmp_path):
    out = tmp_path / "out"
    source = files["lstm.ts"]
    report = compress(
        source,
        out,
        *("--sparsity", "0.6", "--bits", "4", "--method", "taylor"),
        *("--data", str(files["lstm_xy"]), "--finetune-epochs", "1", "--distill"),
        *("--format", "packed,onnx,safetensors"),
    )
    assert report["recipe"]["recovery"]["epochs"] == 1 and report["recipe"]["recovery"]["distill"]
    assert report["accuracy_after"] is not None
    # Fine-tuning keeps the masks: the target sparsity holds in the exported weights.
    state = check_honest_numbers(source, out, report)
    zeros, total = prunable_zeros(source, state)
    assert zeros / total >= 0.6 - 1e-3
    x = torch.load(files["lstm_xy"], weights_only=True)["x"][:5]
    expected = run_model(load_packed(out / "model.packed.safetensors", source), x)
    np.testing.assert_allclose(ort_run(out / "model.onnx", x), expected.numpy(), atol=1e-5)


def test_unlabelled_non_classifier_pt2(files, tmp_path):
    """A GRU tagger (per-step outputs) with x-only data: no accuracy, fidelity measured."""
    out = tmp_path / "out"
    report = compress(
        files["gru.pt2"],
        out,
        *("--sparsity", "0.5", "--method", "nm", "--bits", "8"),
        *("--data", str(files["gru_x"]), "--format", "packed,state_dict"),
    )
    assert report["accuracy_before"] is None and report["accuracy_after"] is None
    fid = report["fidelity"]
    assert fid["rel_l2"] is not None and 0 < fid["rel_l2"] < 1 and fid["cosine"] > 0.5
    check_honest_numbers(files["gru.pt2"], out, report)
    state = torch.load(out / "model.pt", weights_only=True)
    groups = state["gru.weight_hh_l0"].reshape(-1, 4)
    assert int((groups == 0).sum(dim=1).min()) >= 2  # 2:4 in every group of 4 inputs


def test_weights_only_safetensors(files, tmp_path):
    out = tmp_path / "out"
    source = files["encoder.safetensors"]
    report = compress(
        source, out, "--sparsity", "0.8", "--bits", "4", "--format", "packed,state_dict,safetensors"
    )
    assert report["accuracy_before"] is None and report["fidelity"]["rel_l2"] is None
    assert report["sparsity"] == pytest.approx(0.8, abs=1e-3)
    check_honest_numbers(source, out, report)
    # Formats that need a forward pass are refused before anything is written.
    fresh = tmp_path / "fresh"
    proc = cli("compress", str(source), "--out", str(fresh), "--quiet", "--format", "packed,onnx")
    assert_one_line_error(proc, "encoder.safetensors", "onnx", "weights-only")
    assert not fresh.exists() or not any(fresh.iterdir())


# ---------------------------------------------------------------------------------------
# recipes
# ---------------------------------------------------------------------------------------
def test_recipe_per_layer_settings_reproduce_exactly(files, tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text(
        json.dumps(
            {
                "version": 1,
                "default": {"prune": {"method": "magnitude", "sparsity": 0.6, "scope": "layer"}},
                "layers": {
                    "head": {"skip": True},
                    "lstm.weight_hh_l1": {
                        "prune": {"method": "magnitude", "sparsity": 0.8},
                        "quant": {"bits": 4, "symmetric": True},
                    },
                },
            }
        )
    )
    first = compress(files["lstm.ts"], tmp_path / "a", "--recipe", str(recipe))
    layers = {layer["name"]: layer for layer in first["layers"]}
    assert layers["head"]["skipped"] and layers["head"]["nnz"] == layers["head"]["numel"]
    assert layers["lstm.weight_hh_l1"]["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert layers["lstm.weight_hh_l1"]["bits"] == 4
    assert layers["lstm.weight_ih_l0"]["sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert layers["lstm.weight_ih_l0"]["bits"] is None
    compress(files["lstm.ts"], tmp_path / "b", "--recipe", str(tmp_path / "a" / "recipe.json"))
    a = (tmp_path / "a" / "model.packed.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "model.packed.safetensors").read_bytes()


@pytest.mark.parametrize(
    "recipe, needles",
    [
        ({"version": 1, "default": {"prune": {"method": "magnitud"}}}, ["default.prune.method"]),
        ({"version": 1, "default": {"quant": {"bits": 17}}}, ["default.quant.bits", "17"]),
        ({"version": 1, "defaults": {}}, ["defaults", "unknown key"]),
    ],
)
def test_invalid_recipe_names_the_field(files, tmp_path, recipe, needles):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(recipe))
    out = tmp_path / "out"
    proc = cli(
        "compress", str(files["lstm.ts"]), "--out", str(out), "--recipe", str(path), "--quiet"
    )
    assert_one_line_error(proc, "bad.json", *needles)
    assert not out.exists()


# ---------------------------------------------------------------------------------------
# re-export, overwrite protection
# ---------------------------------------------------------------------------------------
def test_reexport_and_overwrite_refusal(files, resnet_run, tmp_path):
    out, report = resnet_run
    before = (out / "model.packed.safetensors").read_bytes()
    proc = cli(
        "compress", str(files["resnet.ts"]), "--out", str(out), "--sparsity", "0.2", "--quiet"
    )
    assert_one_line_error(proc, "already exists", "--force")
    assert (out / "model.packed.safetensors").read_bytes() == before

    again = tmp_path / "again"
    # The archive records the source's path but never opens it unasked: --base names it.
    proc = cli("export", str(out), "--format", "onnx", "--out", str(again), cwd=tmp_path)
    assert_one_line_error(proc, "--base")
    proc = cli(
        "export",
        str(out),
        "--format",
        "onnx,safetensors,torchscript",
        "--out",
        str(again),
        "--data",
        str(files["resnet_xy"]),
        "--base",
        str(files["resnet.ts"]),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "max|diff|" in proc.stdout
    original = load_file(str(out / "model.safetensors"))
    assert all(
        torch.equal(v, original[k]) for k, v in load_file(str(again / "model.safetensors")).items()
    )
    x = torch.from_numpy(np.load(files["resnet_xy"])["x"][:5])
    with torch.no_grad():
        ref = torch.jit.load(str(out / "model.torchscript.pt"))(x).numpy()
    np.testing.assert_allclose(ort_run(again / "model.onnx", x), ref, atol=1e-5)

    stamp = (again / "model.onnx").read_bytes()
    proc = cli(
        "export",
        str(out),
        "--format",
        "onnx",
        "--out",
        str(again),
        "--data",
        str(files["resnet_xy"]),
        "--base",
        str(files["resnet.ts"]),
    )
    assert_one_line_error(proc, "model.onnx", "--force")
    assert (again / "model.onnx").read_bytes() == stamp
    assert not [p for p in again.iterdir() if p.name.startswith(".")]  # no temporary left
    assert_one_line_error(cli("export", str(tmp_path / "nowhere"), "--format", "onnx"), "nowhere")


# ---------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------
def test_bad_inputs_are_one_line_errors(files, tmp_path):
    out = tmp_path / "out"
    lstm = str(files["lstm.ts"])
    proc = cli(
        "compress", lstm, "--out", str(out), "--sparsity", "0.5", "--method", "taylor", "--quiet"
    )
    assert_one_line_error(proc, "taylor", "--data")
    proc = cli("compress", lstm, "--out", str(out), "--data", str(tmp_path / "nope.npz"), "--quiet")
    assert_one_line_error(proc, "nope.npz", "no such file")
    resnet = str(files["resnet.ts"])
    proc = cli("compress", resnet, "--out", str(out), "--data", str(files["resnet_nan"]), "--quiet")
    assert_one_line_error(proc, "resnet_nan.npz", "NaN")
    proc = cli("compress", resnet, "--out", str(out), "--data", lstm, "--quiet")
    assert_one_line_error(proc, "lstm.ts", "TorchScript model, not a data file")
    proc = cli("compress", resnet, "--out", str(out), "--sparsity", "1.5", "--quiet")
    assert_one_line_error(proc, "--sparsity")
    assert not out.exists()


@pytest.mark.parametrize(
    "data, needle",
    [("resnet_flat", "cannot run on x of per-sample shape [64]"), ("resnet_label12", "label 12")],
)
def test_compress_checks_data_against_the_model(files, tmp_path, data, needle):
    proc = cli(
        "compress",
        str(files["resnet.ts"]),
        "--out",
        str(tmp_path / "o"),
        "--data",
        str(files[data]),
        "--quiet",
    )
    assert_one_line_error(proc, f"{data}.npz", needle)
    assert not (tmp_path / "o").exists()


def test_pickled_module_compresses_only_with_trust(files, tmp_path):
    out = tmp_path / "out"
    source = files["resnet_pickle.pt"]
    proc = cli("compress", str(source), "--out", str(out), "--quiet")
    assert_one_line_error(proc, "resnet_pickle.pt", "--trust")
    proc = cli(
        "compress",
        str(source),
        "--trust",
        "--out",
        str(out),
        *("--sparsity", "0.5", "--bits", "8", "--data", str(files["resnet_xy"])),
        *("--format", "packed,state_dict", "--quiet"),
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    state = torch.load(out / "model.pt", weights_only=True)
    zeros, total = prunable_zeros(source, state, trust=True)
    assert report["sparsity"] == pytest.approx(zeros / total, abs=1e-9)
    assert report["compressed_bytes"] == (out / "model.packed.safetensors").stat().st_size
    restored = load_packed(out / "model.packed.safetensors", source, trust=True)
    assert all(torch.equal(restored.module.state_dict()[k], v) for k, v in state.items())


def test_packed_archive_opens_as_the_compressed_model(files, resnet_run):
    """`workbench inspect model.packed.safetensors` shows the compressed weights, not codes."""
    out, report = resnet_run
    packed = str(out / "model.packed.safetensors")
    proc = cli("inspect", packed, "--base", str(files["resnet.ts"]), "--json")
    assert proc.returncode == 0, proc.stderr
    desc = json.loads(proc.stdout)
    rows = {row["name"]: row for row in desc["layers"]}
    for layer in report["layers"]:
        assert rows[layer["name"]]["sparsity"] == pytest.approx(layer["sparsity"], abs=1e-9)
    assert (
        desc["total_params"]
        == json.loads(cli("inspect", str(files["resnet.ts"]), "--json").stdout)["total_params"]
    )
    # Without --base the recorded source is not opened: weights only, and the table says why.
    proc = cli("inspect", packed)
    assert proc.returncode == 0, proc.stderr
    assert "weights only" in proc.stdout and "pass --base ORIGINAL" in proc.stdout


def test_channel_pruning_keeps_every_output_logit(files, tmp_path):
    out = tmp_path / "out"
    compress(
        files["resnet.ts"],
        out,
        *("--method", "channel_l1", "--sparsity", "0.5", "--format", "state_dict"),
    )
    head = torch.load(out / "model.pt", weights_only=True)["fc.weight"]
    assert bool((head.abs().sum(dim=1) > 0).all()), "rows of the output layer were pruned"
