"""``workbench scan`` / ``workbench plan`` / ``workbench compress --target-ratio`` in a subprocess:
table and JSON curves, a verified recipe whose archive lands within 1% under the byte target,
the frontier's recipes, a clear infeasible-target error, and report.json's planning record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.recipe.plan import CompressionPlan

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


def test_scan_prints_a_table_and_writes_curves(cache, tmp_path):
    out = tmp_path / "scan.json"
    proc = _run(cache, "scan", "demo:mlp", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "fc1" in proc.stdout and "loss delta" in proc.stdout
    data = json.loads(out.read_text())
    assert [c["name"] for c in data["layers"]] == ["fc1", "fc2", "fc3"]
    assert data["estimate"] is False and data["metric"] == "loss"
    assert len(data["layers"][0]["points"]) == len(data["levels"])
    # second scan: every layer from the cache
    again = _run(cache, "scan", "demo:mlp")
    assert again.returncode == 0
    assert "3/3 layers from cache" in again.stdout


def test_plan_verify_lands_within_one_percent_under_the_target(cache, tmp_path):
    recipe = tmp_path / "recipe.json"
    proc = _run(cache, "plan", "demo:mlp", "--target-ratio", "25", "--verify", "--out", str(recipe))
    assert proc.returncode == 0, proc.stderr
    assert "predicted:" in proc.stdout and "measured:" in proc.stdout
    plan = CompressionPlan.load(recipe)
    assert plan.overrides or plan.default.quant.bits is not None
    info = json.loads((tmp_path / "recipe.plan.json").read_text())
    budget = DENSE_MLP // 25
    assert info["budget_bytes"] == budget
    measured = info["measured"]["bytes"]
    assert 0.99 * budget <= measured <= budget
    # the recipe compresses to exactly that archive
    out = tmp_path / "run"
    done = _run(cache, "compress", "demo:mlp", "--recipe", str(recipe), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert (out / "model.packed.safetensors").stat().st_size == measured


def test_frontier_points_are_recipes(cache, tmp_path):
    out = tmp_path / "frontier.json"
    proc = _run(cache, "plan", "demo:mlp", "--frontier", "--points", "12", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    points = json.loads(out.read_text())["points"]
    assert 10 <= len(points) <= 12
    assert len(proc.stdout.strip().splitlines()) == len(points) + 2  # header + rows + "wrote"
    for p in points:
        CompressionPlan.from_dict(p["recipe"])
        assert p["predicted"]["bytes"] > 0


def test_infeasible_target_says_the_smallest_reachable_size(cache, tmp_path):
    proc = _run(
        cache, "plan", "demo:mlp", "--target-bytes", "500", "--out", str(tmp_path / "r.json")
    )
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1
    assert "not reachable" in err and "smallest plan" in err
    assert not (tmp_path / "r.json").exists()


def test_bad_target_flags_are_one_line_errors(cache, tmp_path):
    proc = _run(cache, "plan", "demo:mlp", "--out", str(tmp_path / "r.json"))
    assert proc.returncode == 2 and "no target" in proc.stderr
    proc = _run(
        cache,
        "compress",
        "demo:mlp",
        "--target-ratio",
        "10",
        "--bits",
        "4",
        "--out",
        str(tmp_path / "o"),
    )
    assert proc.returncode == 2 and "--bits cannot be combined" in proc.stderr


def test_compress_with_a_target_records_target_prediction_and_measurement(cache, tmp_path):
    out = tmp_path / "out"
    proc = _run(cache, "compress", "demo:mlp", "--target-ratio", "12", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    planning = report["planning"]
    assert planning["target"]["ratio"] == 12
    budget = DENSE_MLP // 12
    assert planning["predicted"]["bytes"] <= budget
    assert planning["measured"]["bytes"] == report["compressed_bytes"] <= budget
    assert planning["met"]["bytes_within_target"] is True
    assert planning["measured"]["accuracy_drop"] is not None
    # the recipe written beside it is the planned one, per layer
    plan = CompressionPlan.load(out / "recipe.json")
    assert {c["layer"] for c in planning["layers"]} == {"fc1", "fc2", "fc3"}
    assert plan.config_for("fc1").quant.bits is not None or plan.config_for("fc1").prune.active
