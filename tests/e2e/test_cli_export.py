"""``workbench compress --format ...`` and ``workbench export`` in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "core.cli.main", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_compress_then_reexport(tmp_path):
    out = tmp_path / "out"
    r = _cli(
        "compress",
        "demo:mlp",
        "--out",
        str(out),
        "--sparsity",
        "0.9",
        "--bits",
        "5",
        "--format",
        "packed,state_dict",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    packed = out / "model.packed.safetensors"
    report = json.loads((out / "report.json").read_text())
    assert report["compressed_bytes"] == packed.stat().st_size
    assert {e["format"] for e in report["exports"]} == {"packed", "state_dict"}
    assert (out / "report.html").is_file()

    r = _cli("export", str(out), "--format", "onnx,safetensors")
    assert r.returncode == 0, r.stderr
    assert (out / "model.onnx").is_file() and (out / "model.safetensors").is_file()
    assert "max|diff|" in r.stdout
    # report.json/html now list the re-exports next to the original ones
    report = json.loads((out / "report.json").read_text())
    by_format = {e["format"]: e for e in report["exports"]}
    assert set(by_format) == {"packed", "state_dict", "onnx", "safetensors"}
    assert by_format["onnx"]["bytes_on_disk"] == (out / "model.onnx").stat().st_size
    assert report["compressed_bytes"] == packed.stat().st_size
    assert "model.onnx" in (out / "report.html").read_text()
    # the re-exported dense weights are the compressed model's
    from safetensors.torch import load_file

    dense = torch.load(out / "model.pt", weights_only=True)
    again = load_file(str(out / "model.safetensors"))
    for name, value in dense.items():
        assert torch.equal(again[name], value)

    before = (out / "model.onnx").read_bytes()
    r = _cli("export", str(out), "--format", "onnx")
    assert r.returncode == 2
    assert "model.onnx" in r.stderr and "--force" in r.stderr
    assert (out / "model.onnx").read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_export_asks_for_base_when_the_source_is_gone(tmp_path):
    from core.io.zoo import build_demo

    model_file = tmp_path / "mine.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in build_demo("cnn").state_dict().items()}, model_file)
    out = tmp_path / "out"
    r = _cli(
        "compress",
        str(model_file),
        "--architecture",
        "demo:cnn",
        "--out",
        str(out),
        "--sparsity",
        "0.8",
        "--bits",
        "6",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    moved = tmp_path / "moved.safetensors"
    model_file.rename(moved)
    r = _cli("export", str(out), "--format", "onnx")
    assert r.returncode == 2
    assert "--base" in r.stderr
    r = _cli("export", str(out), "--format", "onnx", "--base", str(moved))
    assert r.returncode == 0, r.stderr
    assert (out / "model.onnx").is_file()
