"""`core.compress.engine.compress`: exact sparsity per criterion, zeros kept by quantization, SQNR floors,
channel removal, cancel safety — on generated non-demo models (CNN with BatchNorm, transformer,
LSTM, a torch.export GraphModule, TorchScript) and the demo MLP."""

import math
from dataclasses import replace

import pytest
import torch

from core.analysis.estimate import preview
from core.analysis.stats import analyze
from core.base.errors import Cancelled, CompressionError
from core.base.model import LoadedModel
from core.base.progress import CancelToken
from core.compress.engine import compress, output_layer, protect_output_layer
from core.io.data import make_dataset
from core.io.model_io import load_model
from core.ops.quantization import dequantize, sqnr_db
from core.recipe.plan import CompressionPlan, LayerConfig, PruneConfig, QuantConfig, simple_plan
from tests.models import make


def _loaded(name: str, fmt: str = "eager") -> LoadedModel:
    model, x = make(name)
    if fmt == "torchscript":
        model = torch.jit.trace(model, x)
    elif fmt == "pt2":
        model = torch.export.export(model, (x,)).module()
    return LoadedModel(model, fmt, f"test:{name}", name, example_input=x, task="classification")


def _data(loaded: LoadedModel, n: int = 48) -> object:
    x = loaded.example_input
    g = torch.Generator().manual_seed(3)
    if x.dtype.is_floating_point:
        xs = torch.randn((n, *x.shape[1:]), generator=g)
    else:
        xs = torch.randint(0, 100, (n, *x.shape[1:]), generator=g)
    with torch.no_grad():
        classes = loaded.module(x).shape[1]
    return make_dataset(xs, torch.randint(0, classes, (n,), generator=g), name="random")


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _plan(method: str, sparsity: float, *, scope: str = "layer", bits=None) -> CompressionPlan:
    prune = PruneConfig(method=method, mode="sparsity", sparsity=sparsity, scope=scope)
    return CompressionPlan(default=LayerConfig(prune=prune, quant=QuantConfig(bits=bits)))


@pytest.fixture(scope="module")
def resnet_with_grads():
    loaded = _loaded("resnet")
    return loaded, analyze(loaded, _data(loaded), grad_batches=2, batch_size=16)


@pytest.mark.parametrize(
    "method", ["magnitude", "gradient_stability", "taylor", "channel_l1", "channel_l2"]
)
def test_applied_mask_equals_preview_exactly(resnet_with_grads, method):
    loaded, stats = resnet_with_grads
    plan = _plan(method, 0.6)
    pv = preview(stats, plan)
    result = compress(loaded, plan, stats)
    for lp in pv.layers:
        r = result.layer(lp.name)
        mask = result.masks[r.tensor]
        assert int(mask.sum()) == lp.nnz, lp.name
        assert r.nnz == lp.nnz  # no quantization: kept weights stay non-zero
        if method.startswith("channel"):
            rows = mask.reshape(mask.shape[0], -1)
            assert torch.all(rows.all(dim=1) | ~rows.any(dim=1)), "whole rows only"
            assert abs(int((~rows.any(dim=1)).sum()) - 0.6 * rows.shape[0]) <= 0.5
        else:
            assert abs((1 - lp.nnz / lp.numel) - 0.6) <= 0.5 / lp.numel + 1e-9


def test_global_magnitude_hits_pooled_target(resnet_with_grads):
    loaded, stats = resnet_with_grads
    result = compress(loaded, _plan("magnitude", 0.8, scope="global"), stats)
    total = sum(r.numel for r in result.layers)
    assert abs(result.sparsity - 0.8) <= 1.0 / total + 1e-9
    # one threshold shared by all layers; per-layer sparsities differ
    assert len({r.threshold for r in result.layers}) == 1
    assert len({round(r.sparsity, 3) for r in result.layers}) > 1


def test_nm_24_exactly_half_per_group():
    loaded = _loaded("transformer")
    stats = analyze(loaded)
    plan = CompressionPlan(default=LayerConfig(prune=PruneConfig(method="nm", n=2, m=4)))
    result = compress(loaded, plan, stats)
    for r in result.layers:
        mask = result.masks[r.tensor]
        rows = mask.reshape(mask.shape[0], -1)
        groups = rows[:, : rows.shape[1] // 4 * 4].reshape(rows.shape[0], -1, 4)
        assert torch.all(groups.sum(dim=-1) == 2), r.name
    assert result.sparsity == 0.5


@pytest.mark.parametrize("name", ["resnet", "transformer", "lstm"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_quantization_keeps_pruned_zeros_and_codes_match(name, symmetric):
    loaded = _loaded(name)
    before = _state(loaded.module)
    stats = analyze(loaded)
    plan = simple_plan(0.7, 4, "magnitude", symmetric=symmetric, per_channel=True)
    result = compress(loaded, plan, stats)
    weights = dict(result.compressed.module.named_parameters())
    for r in result.layers:
        w = weights[r.tensor]
        mask = result.masks[r.tensor]
        assert torch.all(w[~mask] == 0.0)
        assert torch.equal(dequantize(result.quantized[r.tensor]), w.detach())
        assert r.bits == 4 and r.nnz <= int(mask.sum())
    # the original is bit-identical
    after = _state(loaded.module)
    assert all(torch.equal(before[k], after[k]) for k in before)


#: Quantization alone of randomly initialised weights, per-channel asymmetric: ~6 dB/bit.
SQNR_FLOORS = {2: 3.0, 4: 14.0, 6: 26.0, 8: 38.0, 12: 62.0, 16: 86.0}


@pytest.mark.parametrize("bits", sorted(SQNR_FLOORS))
def test_sqnr_floor_per_bit_width(bits):
    loaded = _loaded("resnet")
    stats = analyze(loaded)
    result = compress(loaded, simple_plan(0.0, bits, per_channel=True), stats)
    for r in result.layers:
        assert r.sqnr_db >= SQNR_FLOORS[bits], (r.name, r.sqnr_db)
    assert min(r.sqnr_db for r in result.layers) < SQNR_FLOORS[bits] + 12


def test_report_bytes_and_sqnr_include_pruning():
    loaded = _loaded("encoder")
    stats = analyze(loaded)
    result = compress(loaded, simple_plan(0.9, 5, per_channel=False), stats)
    pv = preview(stats, simple_plan(0.9, 5, per_channel=False))
    for r, lp in zip(result.layers, pv.layers, strict=True):
        assert r.dense_bytes == 4 * r.numel
        assert r.packed_bytes < r.dense_bytes / 4
        assert abs(r.packed_bytes - lp.packed_bytes) <= 0.02 * lp.packed_bytes
        # SQNR is measured against the original: pruning error dominates at 90% sparsity
        w0 = dict(loaded.module.named_parameters())[r.tensor].detach()
        pruning_only = sqnr_db(w0, w0 * result.masks[r.tensor])
        assert r.sqnr_db <= pruning_only
        assert r.sqnr_db == pytest.approx(pruning_only, abs=0.5)


@pytest.mark.parametrize("fmt", ["pt2", "torchscript"])
def test_graph_formats_compress(fmt):
    loaded = _loaded("resnet", fmt)
    x = loaded.example_input
    ref = loaded.module(x).detach().clone()
    stats = analyze(loaded)
    result = compress(loaded, simple_plan(0.5, 8), stats)
    assert result.compressed.module is not loaded.module
    assert torch.equal(loaded.module(x), ref)
    out = result.compressed.module(x)
    assert out.shape == ref.shape and not torch.equal(out, ref)
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert cos > 0.8
    assert abs(result.sparsity - 0.5) < 0.01


def test_remove_channels_resnet():
    loaded = _loaded("resnet")
    stats = analyze(loaded)
    # fc produces the output: its pruned rows stay masked; dw and conv2 follow the stem
    plan = _plan("channel_l2", 0.25)
    masked = compress(loaded, plan, stats)
    removed = compress(loaded, replace(plan, remove_channels=True), stats)
    m = removed.compressed.module
    assert m.stem.out_channels == 12 and m.block.conv1.out_channels == 12
    assert m.pw.out_channels == 24 and m.fc.in_features == 24
    assert set(removed.removed_channels) == {"stem", "block.conv1", "pw"}
    assert len(removed.removed_channels["pw"]) == 24
    # masks and codes follow the new shapes
    params = dict(m.named_parameters())
    for name, mask in removed.masks.items():
        assert mask.shape == params[name].shape
    out = m(loaded.example_input)
    assert out.shape == (4, 10)
    # stem's kept channels are exactly the ones the mask kept (conv2 follows the stem)
    kept_rows = masked.masks["stem.weight"].reshape(16, -1).all(dim=1)
    assert removed.removed_channels["stem"] == [int(i) for i in torch.nonzero(kept_rows)]
    assert loaded.module.stem.out_channels == 16
    # removed weights count as zeros of the original layer: pw lost a quarter of its rows
    # (its own mask) and a quarter of its input columns (the stem's channels)
    assert removed.layer("pw").sparsity == pytest.approx(1 - 0.75 * 0.75, abs=1e-6)


def test_remove_channels_refused_for_graph_models():
    loaded = _loaded("resnet", "torchscript")
    stats = analyze(loaded)
    with pytest.raises(CompressionError, match="eager"):
        compress(loaded, replace(_plan("channel_l1", 0.5), remove_channels=True), stats)


def test_unknown_layer_and_missing_gradients_are_errors():
    loaded = _loaded("lstm")
    stats = analyze(loaded)
    with pytest.raises(CompressionError, match="nope"):
        compress(loaded, simple_plan(0.5).with_layer("nope", LayerConfig()), stats)
    with pytest.raises(CompressionError, match="gradient"):
        compress(loaded, _plan("taylor", 0.5), stats)


def _cancel_at_every_progress_point(loaded, plan, min_calls: int) -> None:
    """Cancel ``compress`` at each of its progress points in turn; the original never changes."""
    stats = analyze(loaded)
    before = _state(loaded.module)
    calls = []
    compress(loaded, plan, stats, progress=lambda f, m: calls.append(m))
    assert len(calls) >= min_calls
    for k in range(len(calls)):
        token = CancelToken()
        seen = []

        def progress(fraction, message, token=token, seen=seen, k=k):
            seen.append(message)
            if len(seen) == k + 1:
                token.cancel()

        with pytest.raises(Cancelled):
            compress(loaded, plan, stats, progress=progress, cancel=token)
        after = _state(loaded.module)
        assert all(torch.equal(before[n], after[n]) for n in before), f"cancel at {k}"


def test_cancel_at_every_progress_point_leaves_original_intact():
    loaded = load_model("demo:mlp")
    plan = simple_plan(0.9, 4)
    _cancel_at_every_progress_point(loaded, plan, min_calls=5)
    assert math.isclose(compress(loaded, plan, analyze(loaded)).sparsity, 0.9, abs_tol=1e-4)


@pytest.mark.parametrize(
    "name, fmt", [("resnet", "eager"), ("transformer", "pt2"), ("lstm", "torchscript")]
)
def test_cancel_on_generated_models_leaves_the_original_intact(name, fmt):
    _cancel_at_every_progress_point(_loaded(name, fmt), simple_plan(0.8, 4), min_calls=3)


def test_bias_bits_quantize_biases_exactly():
    loaded = load_model("demo:mlp")
    stats = analyze(loaded)
    base = simple_plan(0.9, 4, per_channel=False)
    quant = replace(base.default.quant, bias_bits=8)
    plan = base.with_default(replace(base.default, quant=quant))
    result = compress(loaded, plan, stats)
    params = dict(result.compressed.module.named_parameters())
    originals = dict(loaded.module.named_parameters())
    for layer in ("fc1", "fc2", "fc3"):
        qt = result.quantized[f"{layer}.bias"]
        assert qt.bits == 8 and qt.scale.numel() == 1 and qt.mask is None
        bias = params[f"{layer}.bias"].detach()
        assert torch.equal(dequantize(qt), bias)
        assert sqnr_db(originals[f"{layer}.bias"], bias) > 38.0
    # without bias_bits the biases stay untouched float32
    plain = compress(loaded, base, stats)
    assert not any(name.endswith("bias") for name in plain.quantized)
    assert torch.equal(
        dict(plain.compressed.module.named_parameters())["fc1.bias"], originals["fc1.bias"]
    )


def test_bias_bits_recipe_validation():
    from core.base.errors import RecipeError

    plan = CompressionPlan.from_dict({"default": {"quant": {"bits": 4, "bias_bits": 8}}})
    assert plan.default.quant.bias_bits == 8
    assert CompressionPlan.from_json(plan.to_json()) == plan
    with pytest.raises(RecipeError, match="default.quant.bias_bits"):
        CompressionPlan.from_dict({"default": {"quant": {"bias_bits": 1}}})


def test_remove_channels_keeps_the_output_layer_masked():
    loaded = load_model("demo:cnn")
    stats = analyze(loaded)
    plan = replace(_plan("channel_l2", 0.3), remove_channels=True)
    result = compress(loaded, plan, stats)
    m = result.compressed.module
    assert m.fc3.out_features == 10 and "fc3" not in result.removed_channels
    assert m.conv1.out_channels == 4 and m.fc2.out_features == 59
    rows = result.masks["fc3.weight"].reshape(10, -1)
    assert int((~rows.any(dim=1)).sum()) == 3
    assert m(loaded.example_input).shape == (loaded.example_input.shape[0], 10)


@pytest.mark.parametrize("fmt", ["eager", "torchscript", "pt2"])
def test_output_layer_is_exempt_from_default_channel_pruning(fmt):
    loaded = _loaded("resnet", fmt)
    stats = analyze(loaded)
    assert output_layer(loaded, stats.layers) == "fc"
    assert output_layer(replace(loaded, example_input=None), stats.layers) == "fc"
    plan = protect_output_layer(_plan("channel_l1", 0.5, bits=8), loaded, stats.layers)
    assert plan.config_for("fc").prune.method == "none"
    assert plan.config_for("fc").quant.bits == 8
    result = compress(loaded, plan, stats)
    head = dict(result.compressed.module.named_parameters())["fc.weight"]
    assert bool((head.abs().sum(dim=1) > 0).all())
    assert preview(stats, plan).layers[-1].nnz == head.numel()
    # magnitude pruning and explicit overrides are left alone
    assert protect_output_layer(_plan("magnitude", 0.5), loaded, stats.layers) == _plan(
        "magnitude", 0.5
    )
    own = _plan("channel_l1", 0.5).with_layer("fc", LayerConfig())
    assert protect_output_layer(own, loaded, stats.layers) == own
