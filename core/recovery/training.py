"""Recovery after compression: fine-tuning with fixed masks, simulated quantization, distillation.

The trainer keeps a float *master* copy of every compressed weight. Before each forward pass
the model's parameter is overwritten with ``fake_quantize(master) * mask``; after the backward
pass the gradient with respect to that quantized weight is passed straight through to the
master (the straight-through estimator) with pruned positions zeroed, the optimizer steps the
masters, and the masks are re-applied. Only parameter *values* are written and only ``.grad``
is read, so the same loop trains eager modules, TorchScript modules and the ``GraphModule`` of
a ``torch.export`` program alike.

Modules run in eval mode throughout (BatchNorm statistics and dropout frozen): TorchScript and
``torch.export`` graphs bake their mode in, and this keeps every format training identically.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import replace

import torch
import torch.nn.functional as F

from core.analysis.stats import analyze
from core.base.errors import CompressionError
from core.base.methods import prune_method
from core.base.model import LoadedModel
from core.base.progress import CancelToken, ProgressFn, no_progress, scaled
from core.compress.engine import compress, measure_result
from core.evaluate import (
    batches_for,
    eval_mode,
    first_tensor,
    fixed_batch,
    is_classifier_output,
    require_forward,
)
from core.io.data import split_dataset
from core.io.hf import language_model, next_token_loss, token_kl
from core.io.model_io import clone_model
from core.ops.quantization import QuantizedTensor, dequantize, quantize
from core.recipe.plan import (
    GRADIENT_METHODS,
    CompressionPlan,
    LayerConfig,
    QuantConfig,
    RecoveryConfig,
)


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    temperature: float,
    alpha: float,
    classifier: bool,
) -> torch.Tensor:
    """Hinton et al.'s loss ``alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE``.

    Without labels only the distillation term is used. For outputs that are not class logits
    (embeddings, per-step features) the soft-target term is the mean squared error to the
    teacher's outputs.
    """
    if classifier:
        t = temperature
        soft = F.kl_div(
            F.log_softmax(student / t, dim=1),
            F.softmax(teacher / t, dim=1),
            reduction="batchmean",
        ) * (t * t)
    else:
        soft = F.mse_loss(student, teacher)
    if labels is None:
        return soft
    return alpha * soft + (1.0 - alpha) * task_loss(student, labels, classifier=classifier)


def task_loss(out: torch.Tensor, labels: torch.Tensor, *, classifier: bool) -> torch.Tensor:
    """Cross-entropy for class logits, mean squared error for anything else."""
    if classifier:
        return F.cross_entropy(out, labels.reshape(-1).long())
    return F.mse_loss(out, labels.to(out.dtype).reshape(out.shape))


def _quant_cfg(qt: QuantizedTensor) -> QuantConfig:
    return QuantConfig(bits=qt.bits, symmetric=qt.symmetric, per_channel=qt.per_channel)


def _project(
    master: torch.Tensor, mask: torch.Tensor | None, cfg: QuantConfig | None
) -> tuple[torch.Tensor, QuantizedTensor | None]:
    """Masked (and quantized-dequantized) value of a master weight, with its codes."""
    if cfg is None or cfg.bits is None:
        return (master if mask is None else master * mask), None
    qt = quantize(
        master,
        cfg.bits,
        symmetric=cfg.symmetric,
        per_channel=cfg.per_channel,
        mask=mask,
        group_size=cfg.group_size,
    )
    return dequantize(qt), qt


def finetune(
    result,
    train,
    val,
    cfg: RecoveryConfig,
    *,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
):
    """Fine-tune a compressed model with its masks fixed and quantization simulated.

    Parameters
    ----------
    result
        A `core.compress.engine.CompressionResult`; neither it nor its models are modified.
    train
        Training data (`core.io.data.Dataset`). Without labels the original model's outputs
        are the targets (its argmax for classifiers).
    val
        Held-out data: the checkpoint with the best score on it is kept (accuracy when
        labelled, else the negative loss). The compressed starting point counts as a
        checkpoint, so fine-tuning never returns something worse on ``val`` than it got.
    cfg
        Epochs, learning rate, batch size, distillation temperature and alpha.

    Returns
    -------
    CompressionResult
        A new result whose compressed model holds the fine-tuned, re-quantized weights; its
        codes dequantize exactly to the weights and pruned weights are exactly zero.

    Raises
    ------
    CompressionError
        No forward pass, or parameters that are not trainable.
    Cancelled
        When ``cancel`` fires; nothing is modified.
    """

    trainer = _Trainer(result, train, val, cfg, cancel)
    with trainer.modes():
        trainer.load_weights()
        best_score = trainer.val_score() if trainer.has_val else None
        best_state = trainer.snapshot()
        for epoch in range(cfg.epochs):
            trainer.epoch(epoch, progress)
            if trainer.has_val:
                trainer.load_weights()
                score = trainer.val_score()
                if score > best_score:
                    best_score, best_state = score, trainer.snapshot()
            else:
                best_state = trainer.snapshot()
        trainer.restore(best_state)
    return measure_result(trainer.finish())


class _Trainer:
    """The state of one `finetune` run: float32 master copies of the compressed tensors
    (trained with straight-through gradients, projected onto mask and grid before every
    forward pass), the optimizer and its cosine schedule, and the loss and validation score."""

    def __init__(self, result, train, val, cfg: RecoveryConfig, cancel: CancelToken | None):

        require_forward(result.compressed, "fine-tuning")
        # A causal language model trains on its text (next-token loss): no labels needed,
        # and the original is needed only to distil from.
        self.lm = language_model(result.original)
        if train.y is None and not self.lm:
            require_forward(
                result.original, "fine-tuning without labels (the original gives targets)"
            )
        if len(train) == 0:
            raise CompressionError(
                "the training data set is empty", path=getattr(train, "name", None)
            )
        self.result, self.train, self.val, self.cfg, self.cancel = result, train, val, cfg, cancel
        self.teacher: LoadedModel = result.original
        if cfg.distill:
            require_forward(self.teacher, "distillation")
        self.teacher_needed = cfg.distill or (
            not self.lm and (train.y is None or (val is not None and val.y is None))
        )
        self.student = clone_model(result.compressed)
        self.module = self.student.module
        self.params = dict(self.module.named_parameters())
        missing = sorted((set(result.masks) | set(result.quantized)) - set(self.params))
        if missing:
            raise CompressionError(
                f"compressed tensor {missing[0]!r} is not a parameter of the model",
                hint="fine-tuning updates parameters; this tensor is a constant of the graph",
            )
        compressed_names = sorted(set(result.masks) | set(result.quantized))
        self.qcfgs = {n: _quant_cfg(qt) for n, qt in result.quantized.items()}
        self.masters: dict[str, torch.Tensor] = {
            name: self.params[name].detach().clone().float() for name in compressed_names
        }
        plain = [
            p for n, p in self.params.items() if n not in self.masters and p.dtype.is_floating_point
        ]
        self.grad_flags = {n: p.requires_grad for n, p in self.params.items()}
        try:
            for p in self.params.values():
                if p.dtype.is_floating_point:
                    p.requires_grad_(True)
        except RuntimeError as exc:
            raise CompressionError(
                f"the model's parameters cannot be trained ({exc})",
                path=self.student.source,
                hint="export the model with trainable parameters or fine-tune the eager model",
            ) from None
        master_list = list(self.masters.values())
        for t in master_list:
            t.requires_grad_(True)
        fixed = fixed_batch(self.student)
        if self.teacher_needed and fixed is None:
            fixed = fixed_batch(self.teacher)
        self.fixed = fixed
        self.opt = torch.optim.Adam(plain + master_list, lr=cfg.lr)
        n_batches = len(train) // fixed if fixed else math.ceil(len(train) / cfg.batch_size)
        if n_batches == 0:
            raise CompressionError(
                f"the model only accepts batches of {fixed} samples; the training set has "
                f"{len(train)}",
                hint="provide more training samples",
            )
        self.total_steps = max(cfg.epochs * n_batches, 1)
        # Cosine decay to zero: the last epochs settle the weights onto the quantization grid
        # instead of jumping between codes, which matters at 3-5 bits.
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=self.total_steps)
        self.masks = {n: m.to(torch.bool) for n, m in result.masks.items()}
        probe_x, _, _ = next(iter(batches_for(train, min(cfg.batch_size, len(train)), fixed)))
        with torch.no_grad(), eval_mode(self.module):
            self.classifier = is_classifier_output(
                self.student, self.forward(probe_x), train.y is not None
            )
        self.has_val = val is not None and len(val) > 0
        self.step = 0

    def modes(self):
        """Eval mode for student and (when needed) teacher, gradients on, for the whole run."""
        from contextlib import ExitStack

        stack = ExitStack()
        stack.enter_context(eval_mode(self.module))
        stack.enter_context(
            eval_mode(self.teacher.module) if self.teacher_needed else nullcontext()
        )
        stack.enter_context(torch.set_grad_enabled(True))
        return stack

    def load_weights(self) -> None:
        with torch.no_grad():
            for name, master in self.masters.items():
                value, _ = _project(master, self.masks.get(name), self.qcfgs.get(name))
                self.params[name].copy_(value.to(self.params[name].dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return first_tensor(self.module(x))

    def batch_loss(self, x: torch.Tensor, y: torch.Tensor | None, real: int) -> torch.Tensor:
        cfg = self.cfg
        out = self.forward(x)[:real]
        if self.lm:
            return self._lm_loss(out, x[:real])
        if cfg.distill or y is None:
            with torch.no_grad():
                t_out = first_tensor(self.teacher.module(x)).detach()[:real]
        if cfg.distill:
            return distillation_loss(
                out,
                t_out,
                y,
                temperature=cfg.temperature,
                alpha=cfg.alpha,
                classifier=self.classifier,
            )
        if y is None:
            # No labels: the original model's predictions are the targets.
            y = t_out.argmax(dim=1) if self.classifier else t_out
        return task_loss(out, y, classifier=self.classifier)

    def _lm_loss(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A causal LM's loss: next-token cross-entropy on the text, blended with the
        per-token distillation term (`core.io.hf.token_kl`) when distilling."""
        cfg = self.cfg
        ce = next_token_loss(out, x)
        if not cfg.distill:
            return ce
        with torch.no_grad():
            t_out = first_tensor(self.teacher.module(x)).detach()
        return cfg.alpha * token_kl(out, t_out, x, cfg.temperature) + (1.0 - cfg.alpha) * ce

    def val_score(self) -> tuple[float, float]:
        """(accuracy or -inf, -loss): higher is better, compared lexicographically."""
        correct = 0
        total_loss = 0.0
        n = 0
        val = self.val
        with torch.no_grad():
            for x, y, real in batches_for(val, max(self.cfg.batch_size, 256), self.fixed):
                if self.cancel is not None:
                    self.cancel.check()
                out = self.forward(x)[:real]
                if y is not None and self.classifier:
                    correct += int((out.argmax(dim=1) == y.reshape(-1)).sum())
                total_loss += float(self.batch_loss(x, y, real)) * real
                n += real
        acc = correct / n if (val.y is not None and self.classifier and n) else -math.inf
        return acc, -total_loss / max(n, 1)

    def snapshot(self) -> dict[str, torch.Tensor]:
        state = {n: t.detach().clone() for n, t in self.masters.items()}
        state.update(
            {n: p.detach().clone() for n, p in self.params.items() if n not in self.masters}
        )
        return state

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, t in state.items():
                (self.masters[n] if n in self.masters else self.params[n]).copy_(t)

    def epoch(self, epoch: int, progress: ProgressFn) -> None:
        """One pass over the training data (shuffled with the epoch as seed)."""
        cfg = self.cfg
        for x, y, real in batches_for(
            self.train, cfg.batch_size, self.fixed, shuffle=True, seed=epoch, pad=False
        ):
            if self.cancel is not None:
                self.cancel.check()
            self.load_weights()
            self.opt.zero_grad(set_to_none=True)
            for p in self.params.values():
                p.grad = None
            loss = self.batch_loss(x, y, real)
            if not torch.isfinite(loss):
                raise CompressionError(
                    f"the loss became {float(loss)} in epoch {epoch + 1}",
                    hint="lower the learning rate",
                )
            loss.backward()
            for name, master in self.masters.items():
                g = self.params[name].grad
                # Straight-through: d loss / d master := d loss / d quantized weight,
                # zero where pruned so pruned weights never move.
                master.grad = None if g is None else g.detach().float()
                if master.grad is not None and name in self.masks:
                    master.grad.mul_(self.masks[name])
            self.opt.step()
            self.sched.step()
            with torch.no_grad():
                for name, master in self.masters.items():
                    if name in self.masks:
                        master.mul_(self.masks[name])
            self.step += 1
            progress(
                self.step / self.total_steps,
                f"epoch {epoch + 1}/{cfg.epochs}, batch loss {float(loss.detach()):.4f}",
            )

    def finish(self):
        """The result with the trained weights projected onto mask and grid (codes included);
        the parameters' gradient flags as they were."""
        for n, p in self.params.items():
            p.grad = None
            p.requires_grad_(self.grad_flags[n])
        quantized: dict[str, QuantizedTensor] = {}
        with torch.no_grad():
            for name, master in self.masters.items():
                value, qt = _project(master.detach(), self.masks.get(name), self.qcfgs.get(name))
                self.params[name].copy_(value.to(self.params[name].dtype))
                if qt is not None:
                    quantized[name] = qt
        return replace(self.result, compressed=self.student, quantized=quantized)


#: Share of the training data held out to pick the best fine-tuning checkpoint.
VAL_HOLDOUT = 0.2


def recovery_split(train):
    """``(fit, val)``: the fixed seeded split of ``train`` that fine-tuning uses everywhere.

    The CLI, the GUI and the benchmark all split the same way, so a recipe re-run from the
    command line reproduces the benchmark's numbers exactly.
    """

    return split_dataset(train, holdout=VAL_HOLDOUT, seed=1)


def _step_plan(plan: CompressionPlan, step: int, steps: int) -> CompressionPlan:
    """The plan of step ``step`` (1-based) of ``steps`` of iterative compression.

    As in Deep Compression (prune, retrain, then quantize, retrain), the first ``steps - 1``
    steps only prune, in float, and the last one quantizes at the final sparsity. Sparsity-mode
    targets shrink the density geometrically over the pruning steps,
    ``1 - (1 - s) ** (step / (steps - 1))``, so each removes the same fraction of what is left.
    A single step prunes and quantizes at once.
    """
    prune_steps = max(steps - 1, 1)
    fraction = min(step / prune_steps, 1.0)

    def _cfg(cfg: LayerConfig) -> LayerConfig:
        prune, quant = cfg.prune, cfg.quant
        if (
            prune.mode == "sparsity"
            and not prune_method(prune.method).semi_structured
            and prune.active
        ):
            prune = replace(prune, sparsity=1.0 - (1.0 - prune.sparsity) ** fraction)
        if step < steps:
            quant = replace(quant, bits=None, bias_bits=None)
        return replace(cfg, prune=prune, quant=quant)

    out = plan.with_default(_cfg(plan.default))
    for name, cfg in plan.overrides:
        out = out.with_layer(name, _cfg(cfg))
    return out


def compress_and_finetune(
    loaded: LoadedModel,
    plan: CompressionPlan,
    train,
    val,
    *,
    stats=None,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
    calibration=None,
):
    """`core.compress.engine.compress` followed by the recovery ``plan.recovery`` asks for.

    With ``plan.recovery.prune_steps > 1`` pruning is iterative: prune part of the way, fine-tune
    with the masks fixed, prune further (the zeros of earlier steps score lowest, so they stay
    pruned), ... and quantize at the last step. Distillation always uses ``loaded`` as teacher.

    Parameters
    ----------
    loaded
        The original model; never modified.
    plan
        The plan; its ``recovery`` sets epochs (per step), steps, learning rate, distillation.
    train, val
        Training data and held-out data for the best checkpoint (see `finetune`); ``train`` may
        be ``None`` only when ``plan.recovery.epochs == 0``.
    stats
        `core.analysis.stats.ModelStats` of ``loaded`` if already computed (else analysed here).
    calibration
        Data for the second-order methods (`core.compress.second_order`): the training split, never
        the held-out one; defaults to ``train``.

    Returns
    -------
    CompressionResult
        Measured against ``loaded``; its ``plan`` is ``plan``.

    Raises
    ------
    CompressionError
        Fine-tuning without data; iterative pruning with a criterion that can revive pruned
        weights (gradient stability) or with channel removal.
    Cancelled
        When ``cancel`` fires; nothing is modified.
    """

    rec = plan.recovery
    steps = rec.prune_steps if rec.epochs > 0 else 1
    if rec.epochs > 0 and train is None:
        raise CompressionError(
            "fine-tuning needs training data",
            path=loaded.source,
            hint="provide data (x and y arrays) or set recovery.epochs to 0",
        )
    configs = [plan.default, *(cfg for _, cfg in plan.overrides)]
    if steps > 1:
        if any(c.prune.active and c.prune.method == "gradient_stability" for c in configs):
            raise CompressionError(
                "iterative pruning (prune_steps > 1) cannot use gradient stability: a pruned "
                "weight's gradient can still be large, so it would come back",
                hint="use magnitude or Taylor pruning, or set prune_steps to 1",
            )
        if plan.remove_channels:
            raise CompressionError(
                "iterative pruning (prune_steps > 1) cannot be combined with channel removal",
                hint="set prune_steps to 1 or switch off 'remove channels'",
            )
    needs_grads = any(c.prune.active and c.prune.method in GRADIENT_METHODS for c in configs)
    current = loaded
    result = None
    for step in range(1, steps + 1):
        if cancel is not None:
            cancel.check()
        span = scaled(progress, (step - 1) / steps, step / steps)
        label = f"step {step}/{steps}: " if steps > 1 else ""
        if step > 1 or stats is None:
            span(0.0, f"{label}analyzing")
            stats = analyze(current, train if needs_grads else None, cancel=cancel)
        span(0.05, f"{label}pruning and quantizing")
        result = compress(
            current,
            _step_plan(plan, step, steps),
            stats,
            cancel=cancel,
            calibration=train if calibration is None else calibration,
        )
        result = replace(result, original=loaded, plan=plan)
        if rec.epochs > 0:
            result = finetune(
                result,
                train,
                val,
                rec,
                progress=lambda f, m, span=span, label=label: span(0.1 + 0.9 * f, label + m),
                cancel=cancel,
            )
        current = result.compressed
    assert result is not None
    progress(1.0, "compressed")
    if steps == 1 and rec.epochs <= 0:
        return result  # compress measured it against `loaded` and nothing changed since
    return measure_result(result)
