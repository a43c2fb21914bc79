"""Ensembles of compressed models against one model compressed less, at the same bytes.

K members are compressed from the same original with the same width (bits) and sparsity,
each with its own pruning method (cycled from ``methods``) and each fine-tuned on its own
seeded bootstrap sample of the training split (bagging), optionally distilled from the
original. Their averaged class probabilities (classifiers) or outputs are the ensemble's
prediction. The single baseline gets the same bits and recovery, and the lowest sparsity
whose packed size does not exceed the members' total (bisection on the sparsity over the
packed-size estimate), so both sides spend the same storage. The comparison is reported as
measured, including where the ensemble loses (and an ensemble always costs K forward passes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from core.analysis.stats import analyze
from core.base.errors import CompressionError, RecipeError
from core.base.progress import CancelToken, ProgressFn, no_progress, scaled
from core.compress.engine import compress
from core.evaluate import eval_mode, first_tensor, measure_latency, require_forward
from core.packed import write_packed
from core.recipe.plan import PRUNE_METHODS, RecoveryConfig, simple_plan
from core.recovery.training import compress_and_finetune, recovery_split

#: Bisection steps on the single model's sparsity (each is one compression).
MATCH_STEPS = 10


@dataclass(frozen=True)
class EnsembleSpec:
    """What to build: ``members`` variants at ``sparsity`` / ``bits``.

    ``methods``: pruning criteria cycled over the members. ``epochs``: fine-tuning epochs per
    member (and for the single baseline) on a bootstrap sample seeded ``seed + i``.
    """

    members: int = 2
    sparsity: float = 0.8
    bits: int | None = 4
    methods: tuple[str, ...] = ("magnitude",)
    epochs: int = 2
    distill: bool = False
    seed: int = 0

    def __post_init__(self) -> None:

        if not (isinstance(self.members, int) and 2 <= self.members <= 16):
            raise RecipeError(f"members: {self.members} is out of range 2..16")
        if not (math.isfinite(self.sparsity) and 0.0 <= self.sparsity < 1.0):
            raise RecipeError(f"sparsity: {self.sparsity} is out of range [0, 1)")
        if self.bits is not None and not 2 <= self.bits <= 16:
            raise RecipeError(f"bits: {self.bits} is out of range 2..16")
        if not self.methods:
            raise RecipeError("methods: give at least one pruning method")
        for m in self.methods:
            if m not in PRUNE_METHODS:
                raise RecipeError(f"methods: {m!r} is not one of {', '.join(PRUNE_METHODS)}")
        if not 0 <= self.epochs <= 10_000:
            raise RecipeError(f"epochs: {self.epochs} is out of range 0..10000")
        if self.epochs == 0 and len(set(self.methods)) < 2:
            raise RecipeError(
                "without fine-tuning, members compressed with one method are identical",
                hint="give --finetune-epochs N (bagging) or several --methods",
            )

    def plan(self, i: int):
        """The `CompressionPlan` of member ``i``."""

        method = self.methods[i % len(self.methods)]
        plan = simple_plan(self.sparsity, self.bits, method)
        return plan.with_recovery(RecoveryConfig(epochs=self.epochs, distill=self.distill))


def bootstrap(train: Any, seed: int) -> Any:
    """A bootstrap sample of ``train`` (same size, drawn with replacement, seeded)."""
    g = torch.Generator().manual_seed(seed)
    return train.subset(torch.randint(len(train), (len(train),), generator=g))


def _estimate(result: Any) -> int:
    return int(sum(r.packed_bytes for r in result.layers))


def _build(loaded, plan, train, val, stats, seed, progress, cancel):

    fit = bootstrap(train, seed) if plan.recovery.epochs > 0 and train is not None else train
    return compress_and_finetune(
        loaded, plan, fit, val, stats=stats, progress=progress, cancel=cancel
    )


def match_single(
    loaded: Any,
    stats: Any,
    target_bytes: int,
    bits: int | None,
    method: str = "magnitude",
    *,
    steps: int = MATCH_STEPS,
) -> tuple[float, int]:
    """The lowest sparsity (with ``bits``) whose packed-size estimate is <= ``target_bytes``.

    Returns ``(sparsity, estimate_bytes)``; the sparsity is 0 when even the unpruned model fits.
    """

    def size(s: float) -> int:
        return _estimate(compress(loaded, simple_plan(s, bits, method), stats))

    if size(0.0) <= target_bytes:
        return 0.0, size(0.0)
    lo, hi = 0.0, 0.999
    best = (hi, size(hi))
    if best[1] > target_bytes:
        raise CompressionError(
            f"no sparsity gives a single model within {target_bytes:,} B at bits={bits}",
            hint="use fewer bits for the members' budget or more members",
        )
    for _ in range(steps):
        mid = (lo + hi) / 2
        b = size(mid)
        if b <= target_bytes:
            hi, best = mid, (mid, b)
        else:
            lo = mid
    return best


def predict(modules: list[torch.nn.Module], x: torch.Tensor, classifier: bool) -> torch.Tensor:
    """The ensemble's output: mean class probabilities (classifiers) or mean outputs."""

    outs = []
    with torch.no_grad():
        for m in modules:
            with eval_mode(m):
                out = first_tensor(m(x)).float()
            outs.append(out.softmax(dim=1) if classifier else out)
    return torch.stack(outs).mean(dim=0)


def _score(modules, data, reference, batch: int = 256) -> dict[str, Any]:
    """Accuracy (labels) and top-1 agreement with ``reference`` of the averaged prediction."""
    correct = agree = n = 0
    classifier = True
    for x, y in data.batches(batch):
        ref = predict([reference], x, classifier=False)
        classifier = ref.ndim == 2 and ref.shape[1] > 1
        out = predict(modules, x, classifier)
        if classifier:
            pred = out.argmax(1)
            agree += int((pred == ref.argmax(1)).sum())
            if y is not None:
                correct += int((pred == y.reshape(-1)).sum())
        n += int(x.shape[0])
    return {
        "accuracy": correct / n if (classifier and data.y is not None and n) else None,
        "agreement": agree / n if classifier and n else None,
        "samples": n,
    }


def _latency(modules, x) -> float:

    return float(sum(measure_latency(m, x, warmup=2, repeats=10) for m in modules))


def _build_members(
    loaded: Any,
    spec: EnsembleSpec,
    stats: Any,
    fit: Any,
    val: Any,
    test: Any,
    out: Path,
    progress: ProgressFn,
    cancel: CancelToken | None,
) -> tuple[list[Any], list[dict[str, Any]]]:
    """Build, write and score each member; returns the results and their report entries."""
    k = spec.members
    members, entries = [], []
    for i in range(k):
        sub = scaled(progress, i / (k + 2), (i + 1) / (k + 2))
        sub(0.0, f"member {i + 1}/{k}")
        res = _build(loaded, spec.plan(i), fit, val, stats, spec.seed + i, sub, cancel)
        info = write_packed(res, out / f"member_{i + 1}.packed.safetensors", force=True)
        members.append(res)
        entries.append(
            {
                "method": spec.methods[i % len(spec.methods)],
                "seed": spec.seed + i,
                "bytes": info.bytes_on_disk,
                "estimate_bytes": _estimate(res),
                **_score([res.compressed.module], test, loaded.module),
            }
        )
    return members, entries


def _build_single(
    loaded: Any,
    spec: EnsembleSpec,
    stats: Any,
    target: int,
    fit: Any,
    val: Any,
    out: Path,
    cancel: CancelToken | None,
) -> tuple[float, Any, Any]:
    """The single model matched to ``target`` estimated bytes: its sparsity, result and
    written archive's info."""
    sparsity, _ = match_single(loaded, stats, target, spec.bits, spec.methods[0])
    single_plan = replace(spec, sparsity=sparsity).plan(0)
    single = _build(loaded, single_plan, fit, val, stats, spec.seed + 1000, no_progress, cancel)
    sinfo = write_packed(single, out / "single.packed.safetensors", force=True)
    return sparsity, single, sinfo


def _spec_block(spec: EnsembleSpec) -> dict[str, Any]:
    """The report's ``spec`` entry."""
    return {
        "members": spec.members,
        "sparsity": spec.sparsity,
        "bits": spec.bits,
        "methods": list(spec.methods),
        "epochs": spec.epochs,
        "distill": spec.distill,
        "seed": spec.seed,
    }


def run_ensemble(
    loaded: Any,
    spec: EnsembleSpec,
    train: Any,
    test: Any,
    out_dir: str | Path,
    *,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
) -> dict[str, Any]:
    """Build the members and the matched single model, write their packed archives into
    ``out_dir`` and return the comparison (the ``ensemble.json`` content).

    Parameters
    ----------
    loaded
        The original model; never modified.
    spec
        Members, bits, sparsity, methods, fine-tuning.
    train, test
        Training split (bootstrap samples, fine-tuning) and held-out split (scores).

    Returns
    -------
    dict
        ``original`` / ``members`` / ``ensemble`` / ``single`` entries with ``bytes`` (packed
        archive on disk), ``accuracy``, ``agreement`` (with the original), ``latency_ms``
        (batch of up to 64; the ensemble's is the sum over members), and ``winner``.
    """

    require_forward(loaded, "an ensemble")
    if spec.epochs > 0 and train is None:
        raise CompressionError("fine-tuning the members needs training data", path=loaded.source)
    out = Path(out_dir)
    fit, val = recovery_split(train) if train is not None else (None, None)
    needs_grad = any(m in ("taylor", "gradient_stability") for m in spec.methods)
    stats = analyze(loaded, fit if needs_grad else None)
    k = spec.members
    members, entries = _build_members(loaded, spec, stats, fit, val, test, out, progress, cancel)
    total = sum(e["bytes"] for e in entries)
    progress(k / (k + 2), "matching the single model's size")
    target = sum(e["estimate_bytes"] for e in entries)
    sparsity, single, sinfo = _build_single(loaded, spec, stats, target, fit, val, out, cancel)
    progress((k + 1) / (k + 2), "scoring")
    x = test.x[:64]
    ens = _score([m.compressed.module for m in members], test, loaded.module)
    one = _score([single.compressed.module], test, loaded.module)
    orig = _score([loaded.module], test, loaded.module)
    result = {
        "spec": _spec_block(spec),
        "data": getattr(test, "name", "test"),
        "original": {
            "bytes_fp32": sum(
                4 * p.numel() for p in loaded.module.parameters() if p.is_floating_point()
            ),
            **orig,
            "latency_ms": _latency([loaded.module], x),
        },
        "members": entries,
        "ensemble": {
            "bytes": total,
            **ens,
            "latency_ms": _latency([m.compressed.module for m in members], x),
        },
        "single": {
            "sparsity": sparsity,
            "bits": spec.bits,
            "bytes": sinfo.bytes_on_disk,
            **one,
            "latency_ms": _latency([single.compressed.module], x),
        },
        "latency_batch": int(x.shape[0]),
    }
    result["winner"] = _winner(result["ensemble"], result["single"])
    progress(1.0, "done")
    return result


def ensemble_of_plans(
    loaded: Any,
    plans: list[Any],
    stats: Any,
    train: Any,
    test: Any,
    *,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
) -> dict[str, Any]:
    """An ensemble whose members are given plans (the runs a user picked in the window).

    Each plan is applied as a compress run applies it (`core.recovery.training.compress_and_finetune`
    with its own recovery on the `recovery_split` of ``train``; recovery is dropped when there
    is no training data), and the members' averaged predictions (`predict`) are scored on
    ``test`` against the labels and the original.

    Returns
    -------
    dict
        ``members`` (per plan: ``payload_bytes``, the packed-payload estimate a run records,
        ``sparsity``, ``accuracy``, ``agreement``), ``ensemble`` (``payload_bytes``: the
        members' sum, ``accuracy``, ``agreement``, ``samples``) and ``original`` (its score).
    """

    require_forward(loaded, "an ensemble")
    if len(plans) < 2:
        raise RecipeError(
            f"an ensemble needs at least 2 members, got {len(plans)}",
            hint="select two or more runs",
        )
    if test is None:
        raise CompressionError(
            "scoring an ensemble needs held-out data", path=loaded.source, hint="open data first"
        )
    tune = train is not None and any(p.recovery.epochs > 0 for p in plans)
    fit, val = recovery_split(train) if tune else (None, None)
    k = len(plans)
    members, entries = [], []
    for i, plan in enumerate(plans):
        sub = scaled(progress, i / (k + 1), (i + 1) / (k + 1))
        sub(0.0, f"member {i + 1}/{k}")
        if plan.recovery.epochs > 0 and fit is None:
            plan = plan.with_recovery(replace(plan.recovery, epochs=0))
        res = compress_and_finetune(
            loaded,
            plan,
            fit if plan.recovery.epochs > 0 else None,
            val if plan.recovery.epochs > 0 else None,
            stats=stats,
            progress=sub,
            cancel=cancel,
            calibration=train,
        )
        members.append(res)
        entries.append(
            {
                "payload_bytes": _estimate(res),
                "sparsity": res.sparsity,
                **_score([res.compressed.module], test, loaded.module),
            }
        )
    progress(k / (k + 1), "scoring the ensemble")
    if cancel is not None:
        cancel.check()
    ens = _score([m.compressed.module for m in members], test, loaded.module)
    out = {
        "members": entries,
        "ensemble": {"payload_bytes": sum(e["payload_bytes"] for e in entries), **ens},
        "original": _score([loaded.module], test, loaded.module),
    }
    progress(1.0, "ensemble scored")
    return out


def _winner(ens: dict[str, Any], one: dict[str, Any]) -> str:
    key = "accuracy" if ens.get("accuracy") is not None else "agreement"
    if ens.get(key) is None or one.get(key) is None:
        return "unknown"
    if ens[key] > one[key]:
        return "ensemble"
    return "single" if one[key] > ens[key] else "tie"


def summary_lines(res: dict[str, Any]) -> list[str]:
    """A small table for the terminal (and docs/results.md)."""

    def pct(v: Any) -> str:
        return "n/a" if v is None else f"{100 * v:.2f}%"

    rows = [("original (fp32)", res["original"]["bytes_fp32"], res["original"])]
    for i, m in enumerate(res["members"], 1):
        rows.append((f"member {i} ({m['method']})", m["bytes"], m))
    spec = res["spec"]
    rows.append((f"ensemble of {spec['members']}", res["ensemble"]["bytes"], res["ensemble"]))
    rows.append(
        (
            f"single (sparsity {res['single']['sparsity']:.3f})",
            res["single"]["bytes"],
            res["single"],
        )
    )
    lines = ["| model | bytes | accuracy | agreement | latency ms |", "|---|---:|---:|---:|---:|"]
    for name, size, e in rows:
        lat = e.get("latency_ms")
        lat_txt = "" if lat is None else f"{lat:.3f}"
        lines.append(
            f"| {name} | {size:,} | {pct(e['accuracy'])} | {pct(e['agreement'])} | {lat_txt} |"
        )
    return lines


__all__ = [
    "EnsembleSpec",
    "bootstrap",
    "ensemble_of_plans",
    "match_single",
    "predict",
    "run_ensemble",
    "summary_lines",
]
