"""``workbench plan/compress MODEL --device NAME`` with no size target: the device profile's
memory becomes the packed archive's byte budget (weight memory, or memory minus the measured
peak activations, capped by storage), recorded in the plan and the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DENSE_MLP = 202_440  # fp32 bytes of demo:mlp's parameters


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("scan-cache")


def _run(cache: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORKBENCH_CACHE": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "core.cli.main", *args, "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def _catalogue(tmp_path: Path, **fields) -> Path:
    device = {
        "name": "tiny",
        "description": "test device",
        "memory": "64 KiB",
        "storage": "1 MiB",
        "formats": ["packed", "onnx"],
        "dtypes": ["fp32"],
        "relative_compute": 0.01,
        **fields,
    }
    path = tmp_path / "devices.json"
    path.write_text(json.dumps({"format": "workbench.devices", "version": 1, "devices": [device]}))
    return path


def test_plan_takes_memory_minus_activations_as_budget(cache, tmp_path):
    devices = _catalogue(tmp_path)
    out = tmp_path / "r.json"
    proc = _run(cache, "plan", "demo:mlp", "--device", "tiny", "--devices", str(devices),
                "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    info = json.loads((tmp_path / "r.plan.json").read_text())
    dev = info["device_budget"]
    acts = dev["peak_activation_bytes"]
    # demo:mlp at batch 1: 64 inputs -> 300 -> 100 -> 10, the largest layer in+out in float32
    assert acts == 4 * (300 + 100)
    assert dev["budget_bytes"] == 64 * 1024 - acts and dev["from"] == "memory - peak activations"
    assert info["budget_bytes"] == dev["budget_bytes"]
    assert info["predicted"]["bytes"] <= dev["budget_bytes"]
    assert "planning for a" in proc.stderr and "packed archive" in proc.stderr


def test_compress_fits_a_separate_weight_memory_and_reports_it(cache, tmp_path):
    # weights in a 20 KiB flash, read in place: the archive must fit it (about 10x)
    devices = _catalogue(tmp_path, memory="256 KiB", weight_memory="20 KiB")
    out = tmp_path / "o"
    proc = _run(cache, "compress", "demo:mlp", "--device", "tiny", "--devices", str(devices),
                "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    planning = report["planning"]
    assert planning["device_budget"]["from"] == "weight_memory"
    assert planning["budget_bytes"] == 20 * 1024
    assert report["compressed_bytes"] <= 20 * 1024 < DENSE_MLP
    assert planning["met"]["bytes_within_target"] is True
    packed = [c for c in report["device"]["candidates"] if c["format"] == "packed"]
    assert packed and packed[0]["file_bytes"] == report["compressed_bytes"]


def test_explicit_settings_keep_device_as_a_report_only(cache, tmp_path):
    devices = _catalogue(tmp_path, memory="1 KiB")
    out = tmp_path / "o"
    proc = _run(cache, "compress", "demo:mlp", "--sparsity", "0.5", "--bits", "8",
                "--device", "tiny", "--devices", str(devices), "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert "planning" not in report and report["device"]["fits"] is False


def test_activations_alone_over_memory_is_a_clear_error(cache, tmp_path):
    devices = _catalogue(tmp_path, memory="1 KiB")
    proc = _run(cache, "plan", "demo:mlp", "--device", "tiny", "--devices", str(devices),
                "--out", str(tmp_path / "r.json"))  # fmt: skip
    assert proc.returncode != 0
    assert "leave no memory for weights" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 3
