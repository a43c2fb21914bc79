"""``workbench compress`` in a subprocess: report fields, recipe round-trip, overwrite refusal,
one-line errors, a non-demo TorchScript model with user data and fine-tuning."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from core.recipe.plan import CompressionPlan, simple_plan
from tests.models import make

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    # One intra-op thread: tiny models run faster than with threads spinning on a busy box.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "core.cli.main", "compress", *args, "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mlp")
    proc = _run(
        "demo:mlp",
        "--out",
        str(out),
        "--sparsity",
        "0.9",
        "--bits",
        "4",
        "--format",
        "packed,state_dict",
    )
    return out, proc


def test_demo_mlp_report_fields(mlp_run):
    out, proc = mlp_run
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    packed = out / "model.packed.safetensors"
    assert report["compressed_bytes"] == packed.stat().st_size
    assert report["original_bytes"] == 4 * 50610
    assert report["compression_ratio"] == pytest.approx(
        report["original_bytes"] / report["compressed_bytes"]
    )
    assert report["compression_ratio"] > 10
    assert report["sparsity"] == pytest.approx(0.9, abs=1e-4)
    assert report["accuracy_before"] > 0.95
    assert 0.0 <= report["accuracy_after"] <= 1.0
    fid = report["fidelity"]
    assert {"agreement", "rel_l2", "cosine"} <= set(fid) and fid["rel_l2"] > 0
    names = [layer["name"] for layer in report["layers"]]
    assert names == ["fc1", "fc2", "fc3"]
    assert all(layer["bits"] == 4 for layer in report["layers"])
    plan = CompressionPlan.load(out / "recipe.json")
    assert plan == simple_plan(0.9, 4, "magnitude")
    assert "packed" in proc.stdout and "x)" in proc.stdout


def test_refuses_to_overwrite_without_force(mlp_run):
    out, _ = mlp_run
    before = (out / "model.packed.safetensors").read_bytes()
    proc = _run("demo:mlp", "--out", str(out), "--sparsity", "0.5")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--force" in lines[0] and "Traceback" not in proc.stderr
    assert (out / "model.packed.safetensors").read_bytes() == before
    assert (out / "model.pt").is_file()
    proc = _run("demo:mlp", "--out", str(out), "--sparsity", "0.5", "--force")
    assert proc.returncode == 0, proc.stderr
    # the state_dict of the earlier run is not left next to the new packed model
    assert not (out / "model.pt").exists()
    assert json.loads((out / "report.json").read_text())["sparsity"] == pytest.approx(0.5, abs=1e-4)


def test_bad_recipe_is_one_line_error(tmp_path):
    recipe = tmp_path / "bad.json"
    recipe.write_text(json.dumps({"version": 1, "default": {"quant": {"bitz": 4}}}))
    proc = _run("demo:mlp", "--out", str(tmp_path / "o"), "--recipe", str(recipe))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "default.quant.bitz" in lines[0] and "bad.json" in lines[0]
    assert not (tmp_path / "o").exists()
    proc = _run("demo:mlp", "--out", str(tmp_path / "o"), "--recipe", str(recipe), "--bits", "4")
    assert proc.returncode == 2 and "--recipe cannot be combined" in proc.stderr
    proc = _run("demo:mlp", "--out", str(tmp_path / "o"), "--sparsity", "1.5")
    assert proc.returncode == 2 and "sparsity" in proc.stderr.strip().splitlines()[0]


def test_torchscript_lstm_with_data_and_finetuning(tmp_path):
    model, _ = make("lstm")
    path = tmp_path / "lstm.ts"
    torch.jit.save(torch.jit.script(model), str(path))
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(
        data,
        x=rng.standard_normal((80, 8, 8)).astype(np.float32),
        y=rng.integers(0, 10, 80),
    )
    out = tmp_path / "out"
    proc = _run(
        str(path),
        "--out",
        str(out),
        "--sparsity",
        "0.6",
        "--bits",
        "6",
        "--method",
        "taylor",
        "--data",
        str(data),
        "--finetune-epochs",
        "1",
        "--distill",
        "--format",
        "packed,state_dict",
        "--entropy",
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["accuracy_after"] is not None
    assert 0.0 < report["fidelity"]["rel_l2"] < 1.0
    assert (out / "model.pt").is_file()
    assert report["compressed_bytes"] == (out / "model.packed.safetensors").stat().st_size
    plan = CompressionPlan.load(out / "recipe.json")
    assert plan.recovery.epochs == 1 and plan.recovery.distill
    assert plan.default.prune.method == "taylor"
    assert {layer["method"] for layer in report["layers"]} == {"taylor"}


def test_data_and_recipe_mistakes_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((10, 3), dtype=np.float32), y=np.zeros(10, dtype=np.int64))
    proc = _run("demo:mlp", "--out", str(tmp_path / "a"), "--sparsity", "0.5", "--data", str(bad))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "cannot run on x" in lines[0]
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"layers": {"nonexistent": {"skip": True}}}))
    proc = _run("demo:mlp", "--out", str(tmp_path / "b"), "--recipe", str(recipe))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1
    assert "r.json" in lines[0] and "layers.nonexistent" in lines[0]
    proc = _run("demo:mlp", "--out", str(tmp_path / "c"), "--method", "none", "--sparsity", "0.5")
    assert proc.returncode == 2 and "no effect with --method none" in proc.stderr
    # N:M fixes the sparsity at N/M: another target is refused, not silently ignored
    proc = _run("demo:mlp", "--out", str(tmp_path / "d"), "--method", "nm", "--sparsity", "0.9")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "--method nm" in lines[0]
    assert not (tmp_path / "d").exists()


def test_pickled_eager_model_channel_removal_uses_data_as_example(tmp_path):
    model, _ = make("resnet")
    path = tmp_path / "resnet.pt"
    torch.save(model, path)
    rng = np.random.default_rng(1)
    data = tmp_path / "xy.npz"
    np.savez(
        data, x=rng.standard_normal((40, 1, 8, 8)).astype(np.float32), y=rng.integers(0, 10, 40)
    )
    recipe = tmp_path / "rm.json"
    recipe.write_text(
        json.dumps(
            {
                "default": {"prune": {"method": "channel_l2", "sparsity": 0.25}},
                "layers": {"dw": {"skip": True}},
                "remove_channels": True,
            }
        )
    )
    out = tmp_path / "out"
    proc = _run(
        str(path), "--trust", "--out", str(out), "--recipe", str(recipe), "--data", str(data)
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert set(report["removed_channels"]) == {"stem", "block.conv1", "pw"}
    assert report["compressed_bytes"] == (out / "model.packed.safetensors").stat().st_size


class _Features(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_unlabelled_data_gives_a_classifier_gradients_and_others_a_clear_refusal(tmp_path):
    """--data without 'y': a classifier's own top-1 predictions are the labels of its gradient
    statistics, so --method taylor runs; a model whose outputs are not class scores is
    refused before any work, saying the data has no labels (not "analyze with --data")."""
    from core.io.data import digits_split

    split = digits_split("flat")
    x = split[0].x[:200].numpy()
    np.savez(tmp_path / "unlabelled.npz", x=x)
    out = tmp_path / "taylor"
    r = _run("demo:mlp", "--data", str(tmp_path / "unlabelled.npz"), "--sparsity", "0.5",
             "--method", "taylor", "--out", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert report["recipe"]["default"]["prune"]["method"] == "taylor"

    path = tmp_path / "features.pt2"  # per-position features [N, 4, 8], no class scores
    example = torch.randn(4, 4, 8)
    torch.export.save(torch.export.export(_Features().eval(), (example,)), str(path))
    np.savez(tmp_path / "tokens.npz", x=torch.randn(40, 4, 8).numpy())
    r = _run(str(path), "--data", str(tmp_path / "tokens.npz"), "--sparsity", "0.5",
             "--method", "taylor", "--out", str(tmp_path / "refused"))  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "has no labels" in r.stderr and "tokens.npz" in r.stderr
    assert not (tmp_path / "refused").exists()
