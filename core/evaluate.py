"""Accuracy, fidelity to a reference model, and CPU latency.

Fidelity works for any model with a forward pass, labelled data or not: top-1 agreement for
classifiers, and for every output the relative L2 error ``||y - y_ref|| / ||y_ref||`` over
the whole data set and the mean per-sample cosine similarity (an embedding encoder is judged
by these two).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from core.base.errors import CompressionError
from core.base.memory import paged_forward
from core.base.model import LoadedModel, first_tensor
from core.base.progress import CancelToken, ProgressFn, no_progress
from core.io.hf import next_token_stats


@dataclass(frozen=True)
class EvalResult:
    """Measured quality of a model on a data set.

    ``accuracy`` is ``None`` without labels (or for non-classifiers); ``agreement``,
    ``rel_l2`` and ``cosine`` are ``None`` without a reference model; ``agreement`` also for
    non-classifiers. ``latency_ms_per_batch`` is the median CPU time of one forward pass on
    a batch of ``latency_batch`` samples after warm-up.
    """

    samples: int
    accuracy: float | None
    agreement: float | None
    rel_l2: float | None
    cosine: float | None
    latency_ms_per_batch: float | None
    latency_batch: int
    classifier: bool
    #: Causal language models (Hugging Face folders): perplexity of the real next tokens and
    #: the share of them where the argmax prediction equals the reference's.
    perplexity: float | None = None
    next_token_agreement: float | None = None
    #: What fidelity means for this model (e.g. "cosine of the pooled sentence embedding").
    fidelity_metric: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Run ``module`` in eval mode and restore its previous mode afterwards.

    ``torch.export`` graphs bake their mode in and may refuse ``train()``/``eval()``; they
    are used as they are.
    """
    was_training = module.training
    try:
        module.eval()
    except (NotImplementedError, RuntimeError):
        was_training = False
    try:
        yield module
    finally:
        if was_training:
            module.train()


def require_forward(loaded: LoadedModel, what: str) -> None:
    """Raise `CompressionError` if ``loaded`` has no forward pass (weights-only file)."""
    if not loaded.can_run:
        raise CompressionError(
            f"{what} needs a forward pass, but this is a weights-only checkpoint",
            path=loaded.source,
            hint="open it with an architecture (--architecture) or use a TorchScript/.pt2 file",
        )


def is_classifier_output(loaded: LoadedModel, out: torch.Tensor, has_labels: bool) -> bool:
    """Outputs are class logits: a 2-D ``(batch, classes)`` tensor of a classification model
    (or of any model given integer labels)."""
    return out.ndim == 2 and out.shape[1] > 1 and (loaded.task == "classification" or has_labels)


def fixed_batch(loaded: LoadedModel) -> int | None:
    """The only batch size the model accepts, or ``None`` when any size works.

    ``torch.export`` programs exported without a dynamic batch dimension guard on the example
    batch size; they are probed once with one more sample.
    """
    ex = loaded.example_input
    if ex is None or not isinstance(loaded.module, torch.fx.GraphModule) or ex.ndim == 0:
        return None
    probe = torch.cat([ex, ex[:1]], dim=0)
    try:
        with torch.no_grad():
            loaded.module(probe)
    except Exception:  # noqa: BLE001 - a shape guard raises AssertionError/RuntimeError
        return int(ex.shape[0])
    return None


def batches_for(
    data,
    batch_size: int,
    fixed: int | None,
    *,
    shuffle: bool = False,
    seed: int = 0,
    pad: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, int]]:
    """``(x, y, real)`` batches; with a ``fixed`` batch size every batch has exactly that size.

    ``pad``: the last short batch is filled up by repeating its first sample (``real`` says
    how many rows are genuine, outputs beyond it are dropped); otherwise it is skipped.
    """
    size = fixed or batch_size
    for x, y in data.batches(size, shuffle=shuffle, seed=seed):
        real = int(x.shape[0])
        if fixed is not None and real < fixed:
            if not pad:
                continue
            fill = fixed - real
            x = torch.cat([x, x[:1].expand(fill, *x.shape[1:])], dim=0)
        yield x, y, real


def measure_latency(
    module: nn.Module, batch: torch.Tensor, *, warmup: int = 3, repeats: int = 15
) -> float:
    """Median wall time in milliseconds of ``module(batch)`` on the CPU after ``warmup`` runs."""
    times = []
    with torch.no_grad(), eval_mode(module):
        for _ in range(warmup):
            module(batch)
        for _ in range(repeats):
            t0 = time.perf_counter()
            module(batch)
            times.append((time.perf_counter() - t0) * 1000.0)
    return float(statistics.median(times))


def evaluate(
    loaded: LoadedModel,
    data,
    *,
    reference: LoadedModel | None = None,
    batch_size: int = 256,
    latency: bool = True,
    paged: bool = False,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
) -> EvalResult:
    """Evaluate ``loaded`` on ``data`` (a `core.io.data.Dataset`), optionally against a reference.

    Parameters
    ----------
    loaded
        The model to measure (usually the compressed one). Never modified.
    data
        Inputs ``x`` and optional labels ``y``.
    reference
        The model to compare with (usually the original): enables agreement / rel. L2 / cosine.
    batch_size
        Batch size for evaluation and for the latency measurement.
    latency
        Measure CPU latency per batch (median after warm-up).
    paged
        Give back each layer's memory-mapped weight pages once it has run
        (`core.base.memory.paged_forward`): a pass over weights that view a file then holds
        one layer of them at a time. The latency passes run without it.

    Returns
    -------
    EvalResult
    """
    require_forward(loaded, "evaluation")
    if reference is not None:
        require_forward(reference, "fidelity against the original")
    n = len(data)
    if n == 0:
        raise CompressionError("the evaluation data set is empty", path=getattr(data, "name", None))
    hf = loaded.metadata.get("hf") if isinstance(loaded.metadata.get("hf"), dict) else {}
    tally = _Tally(loaded, data.y is not None, reference is not None, hf.get("kind") == "causal_lm")
    first_batch: torch.Tensor | None = None
    fixed = fixed_batch(loaded)
    if reference is not None and fixed is None:
        fixed = fixed_batch(reference)
    with torch.no_grad(), eval_mode(loaded.module):
        ctx = eval_mode(reference.module) if reference is not None else nullcontext()
        modules = [loaded.module] + ([reference.module] if reference is not None else [])
        with ctx, paged_forward(*modules) if paged else nullcontext():
            for x, y, real in batches_for(data, batch_size, fixed):
                if cancel is not None:
                    cancel.check()
                if first_batch is None:
                    first_batch = x
                out = first_tensor(loaded.module(x)).detach().float()[:real]
                ref = None
                if reference is not None:
                    ref = first_tensor(reference.module(x)).detach().float()[:real]
                tally.add(out, y, ref, x[:real])
                progress(min(tally.seen / n, 1.0) * (0.9 if latency else 1.0), "evaluating")
    lat = None
    if latency and first_batch is not None:
        if cancel is not None:
            cancel.check()
        lat = measure_latency(loaded.module, first_batch)
        progress(1.0, "measured latency")
    return tally.result(
        lat, 0 if first_batch is None else int(first_batch.shape[0]), hf.get("fidelity")
    )


class _Tally:
    """Running sums of one `evaluate` pass: accuracy, agreement, output error and cosine
    against the reference, and next-token statistics for causal language models."""

    def __init__(self, loaded: LoadedModel, has_labels: bool, has_ref: bool, causal: bool):
        self.loaded, self.has_labels, self.has_ref, self.causal = (
            loaded,
            has_labels,
            has_ref,
            causal,
        )
        self.correct = self.agree = self.seen = 0
        self.err_sq = self.ref_sq = self.cos_sum = 0.0
        self.classifier = False
        self.nll = 0.0
        self.tokens = self.token_agree = 0

    def add(
        self, out: torch.Tensor, y: torch.Tensor | None, ref: torch.Tensor | None, x: torch.Tensor
    ) -> None:
        self.classifier = is_classifier_output(self.loaded, out, self.has_labels)
        if self.has_labels and self.classifier:
            self.correct += int((out.argmax(dim=1) == y.reshape(-1).to(out.device)).sum())  # type: ignore[union-attr]
        if ref is not None:
            if ref.shape != out.shape:
                raise CompressionError(
                    f"output shapes differ: {tuple(out.shape)} vs reference {tuple(ref.shape)}"
                )
            if self.classifier:
                self.agree += int((out.argmax(dim=1) == ref.argmax(dim=1)).sum())
            self.err_sq += float((out - ref).double().pow(2).sum())
            self.ref_sq += float(ref.double().pow(2).sum())
            a = out.reshape(out.shape[0], -1).double()
            b = ref.reshape(ref.shape[0], -1).double()
            self.cos_sum += float(torch.nn.functional.cosine_similarity(a, b, dim=1).sum())
        if self.causal:
            batch_nll, batch_tokens, batch_agree = next_token_stats(out, x, ref)
            self.nll += batch_nll
            self.tokens += batch_tokens
            self.token_agree += batch_agree
        self.seen += int(out.shape[0])

    def result(self, lat: float | None, latency_batch: int, metric: Any) -> EvalResult:
        seen, tokens = self.seen, self.tokens
        rel = None
        if self.has_ref:
            err, ref = self.err_sq, self.ref_sq
            rel = (err**0.5) / ref**0.5 if ref > 0 else (0.0 if err == 0 else float("inf"))
        return EvalResult(
            samples=seen,
            accuracy=(self.correct / seen) if (self.has_labels and self.classifier) else None,
            agreement=(self.agree / seen) if (self.has_ref and self.classifier) else None,
            rel_l2=rel,
            cosine=(self.cos_sum / seen) if self.has_ref else None,
            latency_ms_per_batch=lat,
            latency_batch=latency_batch,
            classifier=self.classifier,
            perplexity=math.exp(self.nll / tokens) if self.causal and tokens else None,
            next_token_agreement=(self.token_agree / tokens)
            if self.causal and tokens and self.has_ref
            else None,
            fidelity_metric=metric,
        )
