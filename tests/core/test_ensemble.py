"""Ensembles of compressed models vs one model at the same bytes (demo:mlp on digits)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from core.analysis.stats import analyze
from core.base.errors import RecipeError
from core.io.model_io import load_model
from core.recovery.ensemble import EnsembleSpec, bootstrap, match_single, predict

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("kw", "fragment"),
    [
        ({"members": 1}, "members"),
        ({"sparsity": 1.0}, "sparsity"),
        ({"bits": 1}, "bits"),
        ({"methods": ("nope",)}, "methods"),
        ({"epochs": 0}, "identical"),
    ],
)
def test_spec_validates(kw, fragment):
    with pytest.raises(RecipeError, match=fragment):
        EnsembleSpec(**kw)
    EnsembleSpec(epochs=0, methods=("magnitude", "taylor"))  # diverse without training


def test_predict_averages_probabilities():
    a, b = nn.Linear(3, 4), nn.Linear(3, 4)
    x = torch.randn(5, 3)
    expected = (a(x).softmax(1) + b(x).softmax(1)) / 2
    torch.testing.assert_close(predict([a, b], x, classifier=True), expected.detach())
    torch.testing.assert_close(predict([a, b], x, classifier=False), ((a(x) + b(x)) / 2).detach())


def test_bootstrap_is_seeded_and_differs():
    from core.io.data import make_dataset

    data = make_dataset(torch.arange(50.0).reshape(50, 1), torch.zeros(50, dtype=torch.long))
    assert torch.equal(bootstrap(data, 3).x, bootstrap(data, 3).x)
    assert not torch.equal(bootstrap(data, 3).x, bootstrap(data, 4).x)
    assert len(bootstrap(data, 3)) == 50


def test_match_single_stays_within_budget():
    model = load_model("demo:mlp")
    stats = analyze(model)
    from core.compress.engine import compress
    from core.recipe.plan import simple_plan

    member = sum(r.packed_bytes for r in compress(model, simple_plan(0.9, 4), stats).layers)
    sparsity, size = match_single(model, stats, 2 * member, 4, steps=6)
    assert size <= 2 * member and 0.0 < sparsity < 0.9


def test_ensemble_of_two_mlps_end_to_end(tmp_path):
    out = tmp_path / "ens"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "core.cli.main",
            "ensemble",
            "demo:mlp",
            "--out",
            str(out),
            "--members",
            "2",
            "--sparsity",
            "0.9",
            "--bits",
            "4",
            "--finetune-epochs",
            "1",
            "--quiet",
        ],  # fmt: skip
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads((out / "ensemble.json").read_text())
    assert len(res["members"]) == 2
    for i, m in enumerate(res["members"], 1):
        assert (out / f"member_{i}.packed.safetensors").stat().st_size == m["bytes"]
        assert 0.5 < m["accuracy"] <= 1.0
    assert res["ensemble"]["bytes"] == sum(m["bytes"] for m in res["members"])
    # equal bytes: the single model's layers fit the members' budget (archive headers aside)
    assert res["single"]["bytes"] <= res["ensemble"]["bytes"]
    assert res["single"]["sparsity"] < 0.9
    assert 0.5 < res["ensemble"]["accuracy"] <= 1.0 and res["ensemble"]["samples"] > 100
    assert res["winner"] in ("ensemble", "single", "tie")
    assert "winner at equal bytes" in proc.stdout and "| ensemble of 2 |" in proc.stdout
