"""``workbench compress --device NAME --instance-price P`` in a subprocess: the report's
deployed check per export, the ``device`` block with ``fits`` and the ``cost`` block."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "core.cli.main", "compress", *args, "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_device_fit_and_cost_in_report(tmp_path):
    out = tmp_path / "o"
    proc = _run(
        "demo:mlp", "--out", str(out), "--sparsity", "0.5", "--bits", "8",
        "--format", "packed,onnx-int8", "--device", "mcu", "--instance-price", "0.5",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    for entry in report["exports"]:
        assert entry["accuracy"] is not None and entry["deployed_mismatch"] is False
        for stats in entry["deployed"]["latency_ms"].values():
            assert 0 < stats["p10"] <= stats["median"] <= stats["p90"]
    dev = report["device"]
    # The shipped mcu profile runs int8 ONNX only: the packed archive is refused by format.
    assert dev["fits"] is True and dev["best"] == "onnx-int8"
    assert dev["peak_activation_bytes"] > 0
    assert "device mcu: fits as onnx-int8" in proc.stderr
    cost = report["cost"]
    assert cost["before"]["usd_per_million"] > 0 and cost["after"]["usd_per_million"] > 0
    assert "cost per million inferences" in proc.stderr


def test_device_does_not_fit_and_bad_catalogue(tmp_path):
    cat = json.loads((ROOT / "resources" / "devices.json").read_text())
    cat["devices"] = [d for d in cat["devices"] if d["name"] == "mcu"]
    cat["devices"][0]["weight_memory"] = "16 KiB"
    path = tmp_path / "devices.json"
    path.write_text(json.dumps(cat))
    out = tmp_path / "o"
    proc = _run(
        "demo:mlp", "--out", str(out), "--sparsity", "0.5", "--bits", "8",
        "--format", "onnx-int8", "--device", "mcu", "--devices", str(path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "report.json").read_text())["device"]["fits"] is False
    assert "device mcu: does not fit" in proc.stderr and "weight memory" in proc.stderr
    path.write_text('{"format": "workbench.devices", "version": 1, "devices": [{"name": 1}]}')
    proc = _run("demo:mlp", "--out", str(tmp_path / "p"), "--device", "mcu", "--devices", str(path))
    assert proc.returncode == 2 and "devices[0].name" in proc.stderr
    assert not (tmp_path / "p").exists()
