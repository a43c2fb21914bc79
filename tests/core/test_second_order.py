"""One-shot second-order compression (`core.compress.second_order`): OBS/SparseGPT, GPTQ, group-wise
scales and bias correction, measured on a generated transformer trained in the test."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from core.analysis.estimate import preview
from core.analysis.stats import analyze
from core.base.errors import CompressionError, RecipeError
from core.base.model import LoadedModel
from core.cli.compress import _plan_from_args
from core.cli.main import build_parser
from core.compress.engine import compress
from core.compress.second_order import obs_gptq
from core.io.data import make_dataset
from core.ops.quantization import dequantize, quantize
from core.packed import read_packed, write_packed
from core.recipe.plan import CompressionPlan, QuantConfig, simple_plan
from tests.models import TinyTransformer


def _task(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, 100, (n, 16), generator=g)
    return x, ((x < 50).sum(1) - 6).clamp(0, 4)


@pytest.fixture(scope="module")
def trained():
    """A TinyTransformer trained a few epochs on a synthetic counting task (not random)."""
    torch.manual_seed(0)
    model = TinyTransformer()
    g = torch.Generator().manual_seed(1)
    xtr, ytr = _task(1024, g)
    xte, yte = _task(256, g)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    model.train()
    for _ in range(8):
        for i in range(0, 1024, 64):
            loss = nn.functional.cross_entropy(model(xtr[i : i + 64]), ytr[i : i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    assert acc > 0.6  # learnt the task: its weights are not random
    loaded = LoadedModel(
        model, "eager", "test:t", "t", example_input=xtr[:4], task="classification"
    )
    return loaded, make_dataset(xtr, ytr, name="train"), xte, analyze(loaded)


def _plan(method: str, quant: str, group: int | None = None) -> CompressionPlan:
    plan = simple_plan(0.5, 4, method)
    d = plan.default
    return plan.with_default(replace(d, quant=replace(d.quant, method=quant, group_size=group)))


def _output_error(loaded: LoadedModel, result, x: torch.Tensor) -> float:
    with torch.no_grad():
        ref, out = loaded.module(x), result.compressed.module(x)
    return float((ref - out).pow(2).sum() / ref.pow(2).sum())


def test_obs_gptq_beats_magnitude_rtn_at_the_same_bytes(trained):
    loaded, train, xte, stats = trained
    base = compress(loaded, _plan("magnitude", "rtn"), stats)
    second = compress(loaded, _plan("obs", "gptq"), stats, calibration=train)
    base_err, second_err = _output_error(loaded, base, xte), _output_error(loaded, second, xte)
    # measured: 0.131 vs 0.036 (held-out inputs, never used for calibration)
    assert second_err < 0.6 * base_err
    base_bytes = sum(r.packed_bytes for r in base.layers)
    assert sum(r.packed_bytes for r in second.layers) <= 1.01 * base_bytes
    assert second.sparsity >= 0.5 - 1e-3
    # the original is never touched
    assert all(
        not torch.equal(a, b)
        for a, b in [(base.compressed.module.head.weight, loaded.module.head.weight)]
    )


def test_gptq_keeps_the_magnitude_mask_and_exact_zeros(trained):
    loaded, train, _, stats = trained
    plan = _plan("magnitude", "gptq")
    plain = compress(loaded, _plan("magnitude", "rtn"), stats)
    result = compress(loaded, plan, stats, calibration=train)
    weights = dict(result.compressed.module.named_parameters())
    for name, mask in result.masks.items():
        assert torch.equal(mask, plain.masks[name])
        assert bool((weights[name].detach()[~mask] == 0).all())
        if name in result.quantized:
            assert torch.equal(dequantize(result.quantized[name]), weights[name].detach())


def test_no_calibration_data_is_a_clear_error(trained):
    loaded, _, _, stats = trained
    with pytest.raises(CompressionError, match="need calibration data"):
        compress(loaded, _plan("obs", "gptq"), stats)


def test_obs_nm_pattern_is_exact(trained):
    loaded, train, _, stats = trained
    plan = simple_plan(0.0, None, "obs_nm")
    result = compress(loaded, plan, stats, calibration=train)
    w = dict(result.compressed.module.named_parameters())["encoder.layers.0.linear1.weight"]
    groups = (w.detach().reshape(w.shape[0], -1, 4) != 0).sum(-1)
    assert bool((groups <= 2).all())
    assert result.layer("encoder.layers.0.linear1").nnz == w.numel() // 2


def test_group_size_bytes_match_the_file_and_reload_bit_identical(trained, tmp_path):
    loaded, train, _, stats = trained
    for method in ("rtn", "gptq"):
        plan = simple_plan(0.0, 4, "magnitude")
        plan = plan.with_default(
            replace(plan.default, quant=replace(plan.default.quant, method=method, group_size=32))
        )
        result = compress(loaded, plan, stats, calibration=train)
        path = tmp_path / f"{method}.packed.safetensors"
        write_packed(result, path)
        # dense codes: no estimated index stream, so the preview is exact to the byte
        assert preview(stats, plan).packed_bytes == path.stat().st_size
        archive = read_packed(path)
        state = result.compressed.module.state_dict()
        for name, value in archive.tensors.items():
            assert torch.equal(value, state[name]), name
        qt = result.quantized["encoder.layers.0.linear2.weight"]
        assert qt.group_size == 32 and qt.scale.numel() == 32 * (64 // 32)


def test_group_wise_rtn_has_lower_error_than_per_channel():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 256, generator=g) * torch.logspace(-2, 0, 256).reshape(1, -1)
    per_channel = dequantize(quantize(w, 4, symmetric=False, per_channel=True))
    grouped = dequantize(quantize(w, 4, symmetric=False, per_channel=True, group_size=32))
    assert (grouped - w).pow(2).sum() < 0.5 * (per_channel - w).pow(2).sum()


def test_obs_gptq_matrix_level():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 64, generator=g) @ (torch.randn(64, 64, generator=g) * 0.3)
    w = torch.randn(32, 64, generator=g)
    h = 2 * x.T @ x / x.shape[0]

    def err(wq: torch.Tensor) -> float:
        return float(torch.trace((w - wq) @ h @ (w - wq).T) / torch.trace(w @ h @ w.T))

    new, codes, scale, zp, keep = obs_gptq(w, h, bits=3, symmetric=False, per_channel=True)
    rtn = dequantize(quantize(w, 3, symmetric=False, per_channel=True))
    assert err(new) < 0.9 * err(rtn)
    assert keep is None and codes.dtype == torch.int32
    new, _, _, _, keep = obs_gptq(w, h, prune_count=w.numel() // 2)
    assert int((~keep).sum()) == w.numel() // 2 and bool((new[~keep] == 0).all())


def test_bias_correction_restores_the_output_mean(trained):
    loaded, train, xte, stats = trained
    plan = simple_plan(0.0, 3, "magnitude")
    corrected = plan.with_default(
        replace(plan.default, quant=replace(plan.default.quant, bias_correction=True))
    )
    plain = compress(loaded, plan, stats)
    fixed = compress(loaded, corrected, stats, calibration=train)
    with torch.no_grad():
        ref = loaded.module(xte).mean(0)
        shift_plain = (plain.compressed.module(xte).mean(0) - ref).abs().sum()
        shift_fixed = (fixed.compressed.module(xte).mean(0) - ref).abs().sum()
    assert shift_fixed < shift_plain


def test_recipe_round_trip_and_validation():
    plan = _plan("obs", "gptq", 64)
    back = CompressionPlan.from_json(plan.to_json())
    assert back == plan and back.default.quant.group_size == 64
    with pytest.raises(RecipeError, match="group_size"):
        QuantConfig(bits=4, per_channel=False, group_size=32)
    with pytest.raises(RecipeError, match="method"):
        QuantConfig(bits=4, method="nearest")
    data = plan.to_dict()
    data["default"]["quant"]["group_size"] = 1
    with pytest.raises(RecipeError, match="default.quant.group_size"):
        CompressionPlan.from_dict(data)


def test_cli_flags_build_the_plan():
    parser = build_parser()
    args = parser.parse_args(
        [
            "compress",
            "demo:mlp",
            "--out",
            "x",
            "--sparsity",
            "0.5",
            "--bits",
            "4",
            "--method",
            "obs",
            "--quant",
            "gptq",
            "--group-size",
            "64",
        ]
    )
    plan = _plan_from_args(args)
    assert plan.default.prune.method == "obs"
    assert plan.default.quant.method == "gptq" and plan.default.quant.group_size == 64
    bad = parser.parse_args(["compress", "demo:mlp", "--out", "x", "--bits", "4", "--quant", "x"])
    with pytest.raises(RecipeError, match="quant"):
        _plan_from_args(bad)
