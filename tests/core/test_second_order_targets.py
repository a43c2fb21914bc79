"""Second-order methods (`--method obs`, `--quant gptq --group-size 64`) with the planner's
targets, `.pt2` models, and cancel during second-order compression.

Tiny generated models and few samples keep these fast: a 64-128-64-4 MLP trained in the
fixture on a synthetic 4-class task (so its weights are not random)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from core.analysis.stats import analyze
from core.base.errors import Cancelled, CompressionError
from core.base.model import LoadedModel
from core.base.progress import CancelToken
from core.compress.engine import compress
from core.io.data import make_dataset
from core.recipe.plan import QuantConfig, simple_plan

ROOT = Path(__file__).resolve().parents[2]


def _mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(768, 64, generator=g)
    y = (x @ torch.randn(64, 4, generator=g)).argmax(1)
    m = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 4)
    )
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    for _ in range(80):
        loss = nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        assert (m(x).argmax(1) == y).float().mean() > 0.95  # learnt: not random weights
    return m, x, y


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The MLP as a full pickled model and as a ``.pt2`` program, plus its data file."""
    root = tmp_path_factory.mktemp("second-order-targets")
    m, x, y = _mlp()
    torch.save(m, root / "m.pt")
    torch.export.save(torch.export.export(m, (x[:4],)), root / "m.pt2")
    np.savez(root / "d.npz", x=x.numpy(), y=y.numpy())
    return root, m, x, y


def _cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORKBENCH_CACHE": str(root / "cache")}
    return subprocess.run(
        [sys.executable, "-m", "core.cli.main", "compress", *args, "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_obs_gptq_group64_with_ratio_and_min_cosine_meets_the_target(files):
    """One command asks for "8x, cosine >= 0.98" with the second-order methods."""
    root, *_ = files
    out = root / "o8"
    proc = _cli(root, str(root / "m.pt"), "--trust", "--data", str(root / "d.npz"),
                "--method", "obs", "--quant", "gptq", "--group-size", "64",
                "--target-ratio", "8", "--min-cosine", "0.98", "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    planning = report["planning"]
    budget = report["original_bytes"] // 8
    assert planning["budget_bytes"] == budget
    assert report["compressed_bytes"] <= budget and report["compression_ratio"] >= 8.0
    assert report["fidelity"]["cosine"] >= 0.98
    assert planning["met"] == {"bytes_within_target": True, "cosine_within_target": True}
    # every quantized layer of the written recipe uses GPTQ with 64-wide groups; pruned
    # layers (if any) use OBS
    recipe = json.loads((out / "recipe.json").read_text())
    configs = [recipe["default"], *(recipe.get("layers") or {}).values()]
    quantized = [c for c in configs if c["quant"]["bits"] is not None]
    assert quantized
    for c in quantized:
        assert c["quant"]["method"] == "gptq" and c["quant"]["group_size"] == 64
        assert c["quant"]["per_channel"] is True
    for c in configs:
        assert c["prune"]["method"] in ("obs", "none")
    # the byte model counted the group scales: the prediction is the file (within 1%)
    assert abs(planning["predicted"]["bytes"] - report["compressed_bytes"]) <= 0.01 * budget


def test_group_size_changes_the_planned_bytes(files):
    """The solver prices the group scales: same target, gptq + groups vs plain round-to-nearest
    both land under the budget (the grouped plan cannot afford the same widths)."""
    from core.planning.sensitivity import scan
    from core.planning.solver import Target, plan_for_target
    from core.recipe.plan import CompressionPlan

    _, m, x, y = files
    loaded = LoadedModel(m, "eager", "test:m", "m", example_input=x[:4], task="classification")
    stats = analyze(loaded)
    curves = scan(loaded, stats, make_dataset(x[:128], y[:128]), cache=False)
    target = Target(ratio=8)
    plain = plan_for_target(stats, curves, target)
    grouped = plan_for_target(stats, curves, target, quant={"method": "gptq", "group_size": 64})
    budget = target.budget(4 * stats.total_params)
    for sol in (plain, grouped):
        assert sol.predicted["bytes"] <= budget
    assert isinstance(grouped.plan, CompressionPlan)
    quant = [grouped.plan.config_for(name).quant for name in ("0", "2", "4")]
    assert all(q.group_size == 64 and q.method == "gptq" for q in quant if q.active)


def test_pt2_model_with_second_order_methods_is_refused_clearly(files):
    root, *_ = files
    out = root / "pt2"
    proc = _cli(root, str(root / "m.pt2"), "--data", str(root / "d.npz"), "--method", "obs",
                "--sparsity", "0.5", "--bits", "4", "--quant", "gptq", "--out", str(out))  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "no layer module to hook" in proc.stderr and "eager model" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()
    # the same file with the plain rules compresses
    proc = _cli(root, str(root / "m.pt2"), "--data", str(root / "d.npz"), "--sparsity", "0.5",
                "--bits", "4", "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def test_cancel_is_honoured_between_layers(files):
    _, m, x, y = files
    loaded = LoadedModel(m, "eager", "test:m", "m", example_input=x[:4], task="classification")
    stats = analyze(loaded)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    plan = simple_plan(0.5, 4, "obs")
    quant = QuantConfig(
        bits=4, symmetric=True, per_channel=True, bias_bits=8, method="gptq", group_size=64
    )
    plan = plan.with_default(replace(plan.default, quant=quant))
    token = CancelToken()
    seen: list[str] = []

    def progress(_f: float, message: str) -> None:
        seen.append(message)
        if message.startswith("quantizing ") and not token.cancelled:
            token.cancel()  # during the first layer

    with pytest.raises(Cancelled):
        compress(loaded, plan, stats, calibration=make_dataset(x, y), progress=progress,
                 cancel=token)  # fmt: skip
    layers = [s for s in seen if s.startswith("quantizing ")]
    assert len(layers) == 1, seen  # stopped before the second layer began
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k  # the original model is untouched
    # without a cancel the same plan runs through all three layers
    seen.clear()
    token = CancelToken()
    result = compress(loaded, plan, stats, calibration=make_dataset(x, y),
                      progress=lambda f, msg: seen.append(msg), cancel=token)  # fmt: skip
    assert len([s for s in seen if s.startswith("quantizing ")]) == 3
    assert result.sparsity >= 0.49


def test_weights_only_model_with_obs_is_a_clear_error(files):
    _, m, x, _ = files
    loaded = LoadedModel(m, "eager", "test:m", "m", example_input=x[:4], task="classification")
    stats = analyze(loaded)
    with pytest.raises(CompressionError, match="calibration data"):
        compress(loaded, simple_plan(0.5, None, "obs"), stats)


def test_torchscript_model_runs_second_order_or_says_why(files):
    """TorchScript keeps its submodules, so the layers' inputs can be hooked: OBS + GPTQ run
    on it and the packed result reloads; if a file could not be hooked the run must say so
    (exit 2, one line), never fall back silently."""
    root, m, x, _ = files
    ts = root / "m.ts.pt"
    torch.jit.save(torch.jit.script(m), str(ts))
    out = root / "ts-out"
    proc = _cli(
        root,
        str(ts),
        "--data",
        str(root / "d.npz"),
        "--method",
        "obs",
        "--quant",
        "gptq",
        "--sparsity",
        "0.5",
        "--bits",
        "4",
        "--out",
        str(out),
    )
    if proc.returncode == 2:
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 3
        assert "hook" in proc.stderr or "second-order" in proc.stderr or "obs" in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    methods = {layer["method"] for layer in report["layers"] if layer["nnz"] < layer["numel"]}
    assert methods == {"obs"}
