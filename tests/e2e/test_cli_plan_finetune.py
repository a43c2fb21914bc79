"""``workbench compress --target-ratio R --max-drop P --finetune-epochs N``: the drop target is
checked after fine-tuning on the validation split before the real run, and the rounds are
recorded in report.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.cli.plan import DAMAGE_MODELS

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("scan-cache")


def _run(cache: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORKBENCH_CACHE": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "core.cli.main", "compress", *args, "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def test_max_drop_is_checked_after_finetuning_and_recorded(cache, tmp_path):
    out = tmp_path / "o"
    # --max-drop 0 at 30x: each damage model is tried until one round loses nothing
    proc = _run(cache, "demo:mlp", "--target-ratio", "30", "--max-drop", "0",
                "--finetune-epochs", "1", "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    planning = report["planning"]
    rounds = planning["checked_after_finetune"]
    assert 1 <= len(rounds) <= len(DAMAGE_MODELS)
    assert [r["damage_model"] for r in rounds] == [
        m for m in DAMAGE_MODELS if m in {r["damage_model"] for r in rounds}
    ]
    budget = report["original_bytes"] // 30
    for r in rounds:
        assert r["predicted_bytes"] <= budget
        assert isinstance(r["validation_drop"], float)
    chosen = [r for r in rounds if r["chosen"]]
    assert chosen and chosen[0]["validation_drop"] == min(r["validation_drop"] for r in rounds)
    # the recipe written is the chosen round's plan
    assert [c["sparsity"] for c in planning["layers"]] == [
        c["sparsity"] for c in chosen[0]["layers"]
    ]
    assert report["compressed_bytes"] <= budget
    assert set(planning["met"]) == {"bytes_within_target", "drop_within_target"}


def test_without_finetuning_nothing_is_checked_twice(cache, tmp_path):
    out = tmp_path / "o"
    proc = _run(cache, "demo:mlp", "--target-ratio", "12", "--max-drop", "5", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "report.json").read_text())["planning"]["checked_after_finetune"] == []
