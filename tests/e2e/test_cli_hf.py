"""The Hugging Face workflow from the README, in subprocesses: inspect a folder with text data,
compress it to packed + hf + onnx, inspect the packed archive with the folder as base, re-export
from the archive, and open the written folder with transformers' own ``from_pretrained``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from tests import hf_models  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # The loader sets HF_HUB_OFFLINE itself; make sure the test does not do it for it.
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("TRANSFORMERS_OFFLINE", None)
    return subprocess.run(
        [sys.executable, "-m", "core.cli.main", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfcli")
    folder = root / "bert"
    hf_models.build_folder("classifier", folder)
    data = hf_models.write_jsonl(root / "train.jsonl", 30)
    out = root / "out"
    proc = _cli(
        "compress",
        str(folder),
        "--data",
        str(data),
        "--sparsity",
        "0.5",
        "--bits",
        "8",
        "--format",
        "packed,hf,onnx",
        "--out",
        str(out),
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr
    return root, folder, data, out


def test_inspect_folder_with_text_data(workflow):
    root, folder, data, _ = workflow
    proc = _cli("inspect", str(folder), "--data", str(data), "--json")
    assert proc.returncode == 0, proc.stderr
    desc = json.loads(proc.stdout)
    assert desc["format"] == "hf"
    assert desc["hf"]["kind"] == "classifier"
    assert desc["hf"]["architecture"] == "BertForSequenceClassification"
    assert desc["data"]["samples"] == 30 and desc["data"]["labelled"]
    assert desc["data"]["output_shape"] == [30, hf_models.NUM_LABELS]
    names = {layer["name"] for layer in desc["layers"]}
    assert "bert.encoder.layer.0.attention.self.query" in names and "classifier" in names


def test_compress_report_and_files(workflow):
    _, _, _, out = workflow
    report = json.loads((out / "report.json").read_text())
    assert report["model_format"] == "hf"
    fid = report["fidelity"]
    assert fid["metric"].startswith("accuracy") and 0.0 <= fid["agreement"] <= 1.0
    assert report["accuracy_before"] is not None and report["accuracy_after"] is not None
    exports = {e["format"]: e for e in report["exports"]}
    assert exports["hf"]["max_abs_diff"] == 0.0 and exports["onnx"]["max_abs_diff"] < 1e-4
    hf_dir = out / "hf_model"
    assert exports["hf"]["bytes_on_disk"] == sum(p.stat().st_size for p in hf_dir.iterdir())
    import torch
    import transformers

    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(hf_dir), local_files_only=True
    ).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    enc = tok(["the cat sat on the mat"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, hf_models.NUM_LABELS) and bool(torch.isfinite(logits).all())


def test_packed_reload_and_reexport(workflow):
    root, folder, data, out = workflow
    packed = out / "model.packed.safetensors"
    proc = _cli("inspect", str(packed), "--base", str(folder), "--json")
    assert proc.returncode == 0, proc.stderr
    desc = json.loads(proc.stdout)
    assert desc["format"] == "packed" and desc["base_format"] == "hf"
    again = root / "again"
    proc = _cli(
        "export", str(out), "--base", str(folder), "--format", "hf", "--out", str(again),
        "--data", str(data), "--quiet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    from safetensors.torch import load_file

    a = load_file(str(out / "hf_model" / "model.safetensors"))
    b = load_file(str(again / "hf_model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def test_compress_folder_without_data_uses_valid_random_tokens(workflow):
    """No --data: fidelity is measured on random inputs, whose token types and attention mask
    must stay in range (a BERT with 2 token types crashed on random ids 0..15)."""
    root, folder, _, _ = workflow
    out = root / "nodata"
    proc = _cli(
        "compress",
        str(folder),
        "--sparsity",
        "0.5",
        "--bits",
        "8",
        "--format",
        "packed",
        "--out",
        str(out),
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["fidelity"]["data"] == "random inputs"
    assert 0.0 < report["fidelity"]["cosine"] <= 1.0
