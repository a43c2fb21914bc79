"""Fine-tuning with fixed masks and simulated quantization, distillation, best checkpoint, cancel —
on the demo MLP and on generated eager, TorchScript and torch.export models."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from core.analysis.stats import analyze
from core.base.errors import Cancelled, CompressionError
from core.base.model import LoadedModel
from core.base.progress import CancelToken
from core.compress.engine import compress
from core.evaluate import evaluate
from core.io.data import digits_split, make_dataset, split_dataset
from core.io.model_io import load_model
from core.ops.quantization import dequantize
from core.recipe.plan import LayerConfig, PruneConfig, QuantConfig, RecoveryConfig, simple_plan
from core.recovery.training import (
    _step_plan,
    compress_and_finetune,
    distillation_loss,
    finetune,
    recovery_split,
)
from tests.models import make


def _loaded(name: str, fmt: str = "eager") -> LoadedModel:
    model, x = make(name)
    if fmt == "torchscript":
        model = torch.jit.script(model)
    elif fmt == "pt2":
        model = torch.export.export(model, (x,)).module()
    task = "unknown" if name == "encoder" else "classification"
    return LoadedModel(model, fmt, f"test:{name}", name, example_input=x, task=task)


def _labelled(loaded: LoadedModel, n: int = 64, seed: int = 0):
    x = loaded.example_input
    g = torch.Generator().manual_seed(seed)
    if x.dtype.is_floating_point:
        xs = torch.randn((n, *x.shape[1:]), generator=g)
    else:
        xs = torch.randint(0, 100, (n, *x.shape[1:]), generator=g)
    with torch.no_grad():
        classes = loaded.module(x).shape[1]
    return make_dataset(xs, torch.randint(0, classes, (n,), generator=g), name="random")


def _params(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _check_masks_and_codes(result, before):
    params = dict(result.compressed.module.named_parameters())
    changed = False
    for name, mask in result.masks.items():
        w = params[name].detach()
        assert torch.all(w[~mask] == 0.0), f"{name}: pruned weight revived"
        if name in result.quantized:
            assert torch.equal(dequantize(result.quantized[name]), w), f"{name}: codes stale"
            assert torch.equal(result.quantized[name].mask, mask)
        changed |= not torch.equal(w, before[name])
    assert changed, "fine-tuning did not change any compressed weight"


def test_distillation_loss_terms():
    s = torch.randn(8, 5)
    t = torch.randn(8, 5)
    y = torch.randint(0, 5, (8,))
    ce = F.cross_entropy(s, y)
    pure_ce = distillation_loss(s, t, y, temperature=4.0, alpha=0.0, classifier=True)
    assert torch.allclose(pure_ce, ce)
    assert float(distillation_loss(t, t, None, temperature=3.0, alpha=1.0, classifier=True)) < 1e-6
    kl = F.kl_div(F.log_softmax(s / 2, 1), F.softmax(t / 2, 1), reduction="batchmean")
    half = distillation_loss(s, t, y, temperature=2.0, alpha=0.5, classifier=True)
    assert torch.allclose(half, 0.5 * 4 * kl + 0.5 * ce)
    assert torch.allclose(
        distillation_loss(s, t, None, temperature=2.0, alpha=0.3, classifier=False),
        F.mse_loss(s, t),
    )


def test_finetune_demo_mlp_recovers_and_keeps_masks_and_codes():
    loaded = load_model("demo:mlp")
    train, test = digits_split("flat")
    stats = analyze(loaded)
    result = compress(loaded, simple_plan(0.95, 4, per_channel=False), stats)
    before = _params(result.compressed.module)
    acc0 = evaluate(result.compressed, test, latency=False).accuracy
    fit, val = split_dataset(train, holdout=0.2, seed=1)
    cfg = RecoveryConfig(epochs=4, lr=2e-3, batch_size=64, distill=True, alpha=0.7)
    steps = []
    tuned = finetune(result, fit, val, cfg, progress=lambda f, m: steps.append(f))
    acc1 = evaluate(tuned.compressed, test, latency=False).accuracy
    assert acc1 > acc0 + 0.05, (acc0, acc1)
    _check_masks_and_codes(tuned, before)
    assert steps[-1] == pytest.approx(1.0) and len(steps) == 4 * len(range(0, len(fit), 64))
    # the result is re-measured: same sparsity (masks fixed), new SQNR
    for r0, r1 in zip(result.layers, tuned.layers, strict=True):
        assert r1.threshold == r0.threshold and r1.bits == 4
        assert r1.nnz <= int(tuned.masks[r1.tensor].sum())
    # the input result is untouched
    assert all(torch.equal(v, before[k]) for k, v in _params(result.compressed.module).items())


@pytest.mark.parametrize(
    "name,fmt",
    [
        ("resnet", "eager"),
        ("transformer", "eager"),
        ("lstm", "eager"),
        ("resnet", "pt2"),
        ("lstm", "torchscript"),
    ],
)
def test_finetune_generated_models_all_formats(name, fmt):
    loaded = _loaded(name, fmt)
    original = _params(loaded.module)
    stats = analyze(loaded)
    result = compress(loaded, simple_plan(0.7, 6), stats)
    before = _params(result.compressed.module)
    data = _labelled(loaded)
    fit, val = split_dataset(data, holdout=0.25, seed=0)
    # a large learning rate so one short epoch moves weights by more than a quantization step
    tuned = finetune(result, fit, val, RecoveryConfig(epochs=2, lr=2e-2, batch_size=16))
    _check_masks_and_codes(tuned, before)
    assert all(torch.equal(v, original[k]) for k, v in _params(loaded.module).items())
    assert tuned.compressed.format == fmt


def test_best_checkpoint_never_worse_on_val():
    loaded = load_model("demo:mlp")
    train, _ = digits_split("flat")
    stats = analyze(loaded)
    result = compress(loaded, simple_plan(0.5, 8), stats)
    fit, val = split_dataset(train, holdout=0.2, seed=1)
    acc0 = evaluate(result.compressed, val, latency=False).accuracy
    # a destructive learning rate: training makes things worse, the start point must win
    tuned = finetune(result, fit, val, RecoveryConfig(epochs=1, lr=5.0, batch_size=32))
    assert evaluate(tuned.compressed, val, latency=False).accuracy >= acc0


def test_distillation_without_labels_for_an_encoder():
    loaded = _loaded("encoder")
    stats = analyze(loaded)
    result = compress(loaded, simple_plan(0.8, 4), stats)
    x = torch.randn(96, 64, generator=torch.Generator().manual_seed(1))
    fit, val = make_dataset(x[:64], None, "fit"), make_dataset(x[64:], None, "val")
    err0 = evaluate(result.compressed, val, reference=loaded, latency=False).rel_l2
    cfg = RecoveryConfig(epochs=15, lr=3e-3, batch_size=16, distill=True)
    tuned = finetune(result, fit, val, cfg)
    err1 = evaluate(tuned.compressed, val, reference=loaded, latency=False).rel_l2
    assert err1 < err0


def test_finetune_without_labels_uses_the_originals_predictions():
    loaded = load_model("demo:mlp")
    result = compress(loaded, simple_plan(0.85, 4, per_channel=False), analyze(loaded))
    train, test = digits_split("flat")
    unlabelled = make_dataset(train.x, None, "digits without labels")
    fit, val = recovery_split(unlabelled)
    acc0 = evaluate(result.compressed, test, latency=False).accuracy
    tuned = finetune(result, fit, val, RecoveryConfig(epochs=3, lr=2e-3))
    assert evaluate(tuned.compressed, test, latency=False).accuracy > acc0 + 0.05


def test_finetune_cancel_keeps_everything():
    loaded = load_model("demo:mlp")
    train, _ = digits_split("flat")
    result = compress(loaded, simple_plan(0.9, 4), analyze(loaded))
    before = _params(result.compressed.module)
    token = CancelToken()
    calls = []

    def progress(fraction, message):
        calls.append(fraction)
        if len(calls) == 3:
            token.cancel()

    fit, val = split_dataset(train, holdout=0.2)
    with pytest.raises(Cancelled):
        finetune(result, fit, val, RecoveryConfig(epochs=3), progress=progress, cancel=token)
    assert all(torch.equal(v, before[k]) for k, v in _params(result.compressed.module).items())


def test_step_plan_schedule():
    plan = simple_plan(0.9, 4).with_layer(
        "fc3",
        LayerConfig(prune=PruneConfig(method="nm"), quant=QuantConfig(bits=6, bias_bits=8)),
    )
    steps = [_step_plan(plan, k, 3) for k in (1, 2, 3)]
    assert steps[0].default.prune.sparsity == pytest.approx(1 - 0.1**0.5)
    assert steps[1].default.prune.sparsity == pytest.approx(0.9)
    assert steps[2].default.prune.sparsity == pytest.approx(0.9)
    assert [s.default.quant.bits for s in steps] == [None, None, 4]
    assert [s.config_for("fc3").quant.bias_bits for s in steps] == [None, None, 8]
    assert all(s.config_for("fc3").prune.method == "nm" for s in steps)
    assert _step_plan(plan, 1, 1) == plan


def test_iterative_compress_and_finetune():
    loaded = load_model("demo:mlp")
    train, test = digits_split("flat")
    fit, val = recovery_split(train)
    plan = simple_plan(0.95, 4, per_channel=False).with_recovery(
        RecoveryConfig(epochs=1, lr=2e-3, batch_size=64, distill=True, prune_steps=3)
    )
    seen = []
    result = compress_and_finetune(loaded, plan, fit, val, progress=lambda f, m: seen.append(m))
    assert result.original is loaded and result.plan == plan
    assert sum(int(m.sum()) for m in result.masks.values()) == round(0.05 * 50200)
    params = dict(result.compressed.module.named_parameters())
    for name, qt in result.quantized.items():
        assert torch.equal(dequantize(qt), params[name].detach())
        assert torch.all(params[name].detach()[~result.masks[name]] == 0)
    assert any(m.startswith("step 3/3") for m in seen)
    one_shot = compress_and_finetune(
        loaded, plan.with_recovery(replace(plan.recovery, prune_steps=1, epochs=3)), fit, val
    )
    acc = evaluate(result.compressed, test, latency=False).accuracy
    assert acc > evaluate(one_shot.compressed, test, latency=False).accuracy


def test_iterative_refuses_gradient_stability():
    loaded = load_model("demo:mlp")
    train, _ = digits_split("flat")
    plan = simple_plan(0.5, None, "gradient_stability").with_recovery(
        RecoveryConfig(epochs=1, prune_steps=2)
    )
    with pytest.raises(CompressionError, match="gradient stability"):
        compress_and_finetune(loaded, plan, *recovery_split(train))
