"""``workbench inspect`` run as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.models import make

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "core.cli.main", "inspect", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )


def test_inspect_demo_json():
    proc = _run("demo:mlp", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert (
        out["format"] == "demo" and out["total_params"] == 64 * 300 + 300 + 300 * 100 + 100 + 1010
    )
    assert [layer["name"] for layer in out["layers"]] == ["fc1", "fc2", "fc3"]
    fc1 = out["layers"][0]
    assert fc1["type"] == "Linear" and fc1["shape"] == [300, 64] and fc1["params"] == 19500
    assert fc1["prunable"] is True and fc1["sparsity"] == 0.0
    assert set(fc1["weight_stats"]) == {"min", "max", "mean", "std", "nonfinite"}
    assert fc1["weight_stats"]["min"] < 0 < fc1["weight_stats"]["max"]


def test_inspect_generated_file_with_nan_and_data(tmp_path):
    model, x = make("resnet")
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
        model.fc.weight[1, 0] = float("inf")
        model.pw.weight[:4] = 0.0
    path = tmp_path / "resnet.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(path))
    data = tmp_path / "data.npz"
    np.savez(
        data, x=np.random.default_rng(0).random((5, 1, 8, 8)).astype(np.float32), y=[0, 1, 2, 3, 9]
    )
    proc = _run(str(path), "--json", "--data", str(data))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["format"] == "pt2"
    assert out["total_params"] == sum(p.numel() for p in model.parameters())
    layers = {layer["name"]: layer for layer in out["layers"]}
    assert layers["fc"]["weight_stats"]["nonfinite"] == 2
    assert layers["pw"]["sparsity"] == pytest.approx(4 / 32)
    assert layers["dw"]["groups"] == 16 and layers["bn"]["prunable"] is False
    assert out["data"]["samples"] == 5 and out["data"]["output_shape"] == [5, 10]

    table = _run(str(path))
    assert table.returncode == 0 and "Conv2d g=16" in table.stdout and "BatchNorm2d" in table.stdout


def test_inspect_bad_file_one_line_no_traceback(tmp_path):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"\x00garbage" * 50)
    proc = _run(str(bad))
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_inspect_data_that_does_not_fit(tmp_path):
    data = tmp_path / "wrong.npz"
    np.savez(data, x=np.zeros((3, 5), dtype=np.float32))
    proc = _run("demo:cnn", "--data", str(data))
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert "wrong.npz" in proc.stderr


def test_inspect_packed_archive_says_what_the_file_is(tmp_path):
    """A packed archive is reported as `packed` with its base, without the base's accuracy."""
    from core.export.formats import export
    from core.io.model_io import load_model
    from tests.core._fixtures import make_result

    result = make_result(load_model("demo:mlp"), sparsity=0.8, bits=4)
    path = tmp_path / "model.packed.safetensors"
    export(result, "packed", path, latency=False)
    proc = _run(str(path), "--json")
    assert proc.returncode == 0, proc.stderr
    desc = json.loads(proc.stdout)
    assert desc["format"] == "packed"
    assert desc["base_format"] == "demo" and desc["base_source"] == "demo:mlp"
    assert "test_accuracy" not in desc
    sparsity = {row["name"]: row["sparsity"] for row in desc["layers"]}
    assert sparsity["fc2"] >= 0.75
    table = _run(str(path)).stdout
    assert "packed  (compressed demo model from demo:mlp)" in table
    assert "test accuracy" not in table
