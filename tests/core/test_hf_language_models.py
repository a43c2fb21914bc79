"""Causal language models train on their own text: the next-token loss gives gradient
statistics (Taylor, gradient stability) without labels, and fine-tuning / distillation use
next-token cross-entropy and a per-token KL instead of matching the original's raw logits.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from core.analysis.stats import analyze, gradient_stats  # noqa: E402
from core.compress.engine import compress  # noqa: E402
from core.evaluate import evaluate  # noqa: E402
from core.io.data import load_data  # noqa: E402
from core.io.hf import language_model, next_token_loss, token_kl  # noqa: E402
from core.io.model_io import load_model  # noqa: E402
from core.recipe.plan import RecoveryConfig, simple_plan  # noqa: E402
from core.recovery.training import _Trainer, finetune  # noqa: E402
from core.session import Session  # noqa: E402
from tests import hf_models  # noqa: E402


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    hf_models.build_folder("causal_lm", root / "gpt2")
    loaded = load_model(root / "gpt2")
    text = hf_models.write_txt(root / "train.txt", 48, seed=2)
    return loaded, load_data(text, loaded), root


def _packed(ids, mask):
    return torch.stack([torch.tensor(ids), torch.tensor(mask)], dim=1)


def test_losses_count_real_tokens_only():
    torch.manual_seed(0)
    x = _packed([[5, 6, 7, 0], [8, 9, 0, 0]], [[1, 1, 1, 0], [1, 1, 0, 0]])
    logits = torch.randn(2, 4, 12)
    want = []
    for b, length in ((0, 3), (1, 2)):
        for t in range(length - 1):
            want.append(-torch.log_softmax(logits[b, t], -1)[x[b, 0, t + 1]])
    assert torch.allclose(next_token_loss(logits, x), torch.stack(want).mean())
    # The KL ignores padded positions: changing the student there changes nothing.
    teacher = torch.randn(2, 4, 12)
    other = logits.clone()
    other[0, 3] += 5.0
    other[1, 2:] -= 3.0
    assert torch.allclose(token_kl(logits, teacher, x, 2.0), token_kl(other, teacher, x, 2.0))
    assert float(token_kl(teacher, teacher, x, 2.0)) == pytest.approx(0.0, abs=1e-6)


def test_gradients_of_a_language_model_need_no_labels(lm):
    loaded, data, _ = lm
    assert language_model(loaded) and data.y is None
    name = "transformer.h.0.mlp.c_fc.weight"
    grads = gradient_stats(loaded, data, [name], batches=1, batch_size=len(data))
    # The same gradient autograd gives for the next-token loss of that one batch.
    work = load_model(loaded.source).module
    loss = next_token_loss(work(data.x), data.x)
    (want,) = torch.autograd.grad(loss, [dict(work.named_parameters())[name]])
    torch.testing.assert_close(grads[name].mean, want.float(), rtol=1e-4, atol=1e-7)
    stats = analyze(loaded, data, grad_batches=2, batch_size=16)
    assert all(ts.grad is not None for ts in stats.tensors.values())
    result = compress(loaded, simple_plan(0.5, None, "taylor"), stats)
    assert result.sparsity == pytest.approx(0.5, abs=0.02)


def test_the_session_keeps_unlabelled_text_for_a_language_models_gradients(lm):
    loaded, _, root = lm
    session = Session()
    notices = []
    session.subscribe(lambda event, payload: notices.append(payload) if event == "notice" else 0)
    session.run(session.open_model(str(loaded.source)))
    session.run(session.open_data(str(root / "train.txt")))
    session.run(session.analyze())
    assert not any("Gradient criteria" in str(n) for n in notices)
    assert all(ts.grad is not None for ts in session.stats.tensors.values())


def test_fine_tuning_a_language_model_lowers_its_perplexity_on_its_text(lm):
    loaded, data, _ = lm
    result = compress(loaded, simple_plan(0.7, 6), analyze(loaded))
    before = evaluate(result.compressed, data, latency=False).perplexity
    cfg = RecoveryConfig(epochs=4, lr=5e-3, batch_size=16)
    trainer = _Trainer(result, data, None, cfg, None)
    assert trainer.lm and not trainer.teacher_needed  # the text is the target
    tuned = finetune(result, data, None, cfg)
    after = evaluate(tuned.compressed, data, latency=False).perplexity
    assert math.isfinite(before) and after < 0.9 * before
    distil = RecoveryConfig(epochs=2, lr=5e-3, batch_size=16, distill=True)
    assert _Trainer(result, data, None, distil, None).teacher_needed
    tuned = finetune(result, data, None, distil)
    ev = evaluate(tuned.compressed, data, reference=loaded, latency=False)
    assert math.isfinite(ev.perplexity) and 0.0 <= ev.next_token_agreement <= 1.0


def test_a_language_models_scan_measures_its_next_token_loss(lm, tmp_path):
    """The scan's damage for a causal LM is its next-token loss increase on the text
    (metric ``lm_loss``): the baseline is the model's own loss, and a point's loss delta is
    what compressing that one layer does to it; there is no accuracy to plan against."""
    from core.base.errors import CompressionError
    from core.planning.sensitivity import Level, scan
    from core.planning.solver import Target, plan_for_target

    loaded, data, _ = lm
    stats = analyze(loaded)
    levels = [Level(0.0, None, False), Level(0.9, None, False), Level(0.0, 2, False)]
    result = scan(loaded, stats, data, levels=levels, cache_dir=tmp_path / "cache")
    assert result.metric == "lm_loss" and result.baseline["acc"] is None
    n = result.samples
    x = data.x[:n]
    with torch.no_grad():
        base = float(next_token_loss(loaded.module(x), x))
    assert result.baseline["loss"] == pytest.approx(base, rel=1e-5)
    name = "transformer.h.0.mlp.c_fc"
    curve = result.layer(name)
    point = curve.point(Level(0.9, None, False))
    # Compress that layer alone (90% magnitude) and measure the loss the same way.
    work = load_model(loaded.source).module
    w = dict(work.named_parameters())[f"{name}.weight"]
    with torch.no_grad():
        k = int(0.9 * w.numel())
        cut = w.abs().flatten().kthvalue(k).values
        w.mul_((w.abs() > cut).to(w.dtype))
        after = float(next_token_loss(work(x), x))
    assert point.loss_delta == pytest.approx(after - base, abs=2e-3)
    assert point.damage == pytest.approx(max(0.0, point.loss_delta), abs=1e-9)
    assert point.acc_delta is None
    with pytest.raises(CompressionError, match="max-drop"):
        plan_for_target(stats, result, Target(max_drop=1.0))
