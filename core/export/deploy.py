"""Deployed check: run every exported file itself on the held-out data.

The in-app numbers (accuracy after compression) come from the simulated compressed PyTorch
model. What ships is a file: an fp32 or int8 ONNX graph, a TorchScript or ``.pt2`` program, or
the packed archive restored into the architecture. This module loads each such file the way a
deployment would, evaluates its accuracy (labelled classifiers) or fidelity (agreement / rel.
L2 against the simulated model) on the same samples, and times it at batch 1 and at the data
batch as ``{"median", "p10", "p90"}`` over repeats.

A file whose accuracy differs from the simulation's on the same samples by more than
``margin`` (default one point), or whose outputs differ from the simulation's by a relative L2
error above ``max_rel_l2``, is flagged ``deployed_mismatch`` and gets a warning line: e.g. an
int8 ONNX graph whose re-quantization lost accuracy, or a file written wrongly (a weight
scaled by 10 keeps most argmaxes of a ReLU network, so accuracy alone misses it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.base.errors import ExportError
from core.evaluate import eval_mode, first_tensor, fixed_batch
from core.io.model_io import load_packed

#: Formats whose written file can be run here, and how it is loaded.
DEPLOYABLE_FORMATS = ("packed", "onnx", "onnx-int8", "torchscript", "pt2")
#: Accuracy difference (fraction, 0.01 = one point) above which a deployed file is flagged.
DEFAULT_MARGIN = 0.01
#: Relative L2 error of the file's outputs against the simulation above which it is flagged
#: even when its accuracy holds (a wrong scale can leave argmax intact on ReLU networks).
DEFAULT_REL_L2 = 0.25
#: Samples of the held-out data run through each file (bounded so big sets stay quick).
DEPLOY_SAMPLES = 2048
#: Batch size of the accuracy pass and of the "data batch" latency.
DEPLOY_BATCH = 64

Runner = Callable[[torch.Tensor], torch.Tensor]


def latency_stats(fn: Callable[[], Any], *, warmup: int = 2, repeats: int = 20) -> dict[str, Any]:
    """Wall-time statistics of ``fn()`` in milliseconds.

    Returns
    -------
    dict
        ``{"median", "p10", "p90", "repeats"}`` over ``repeats`` timed calls after ``warmup``
        untimed ones (p10 <= median <= p90 by construction of the percentiles).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    times = np.empty(repeats, dtype=np.float64)
    for i in range(repeats):
        t0 = time.perf_counter()
        fn()
        times[i] = (time.perf_counter() - t0) * 1000.0
    p10, median, p90 = np.percentile(times, [10, 50, 90])
    return {"median": float(median), "p10": float(p10), "p90": float(p90), "repeats": repeats}


def _torch_runner(module: Any) -> Runner:

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), eval_mode(module):
            return first_tensor(module(x)).detach().float()

    return run


def load_runner(fmt: str, path: str | Path, result: Any) -> Runner:
    """A callable running the exported file at ``path`` the way a deployment would.

    ONNX files run in onnxruntime (CPU), TorchScript via ``torch.jit.load``, ``.pt2`` via
    ``torch.export.load(...).module()``, and the packed archive restored into the original
    architecture (`core.io.model_io.load_packed`).
    """
    path = Path(path)
    if fmt in ("onnx", "onnx-int8"):
        import onnxruntime as ort

        # Built here, not via core.export.formats.ort_session: deploy and export are sibling layers.
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name

        def run(x: torch.Tensor) -> torch.Tensor:
            out = sess.run(None, {name: x.detach().cpu().numpy()})[0]
            return torch.as_tensor(np.asarray(out)).float()

        return run
    if fmt == "torchscript":
        return _torch_runner(torch.jit.load(str(path), map_location="cpu"))
    if fmt == "pt2":
        return _torch_runner(torch.export.load(str(path)).module())
    if fmt == "packed":
        return _torch_runner(load_packed(path, base=result.original).module)
    raise ExportError(
        f"the deployed check cannot run {fmt!r} files",
        path=path,
        hint=f"deployable formats: {', '.join(DEPLOYABLE_FORMATS)}",
    )


def _samples(result: Any, data: Any, limit: int) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """The held-out inputs (and labels) to run, else the model's example input."""
    x = getattr(data, "x", data if isinstance(data, torch.Tensor) else None)
    if isinstance(x, torch.Tensor) and x.shape[0] > 0:
        y = getattr(data, "y", None)
        return x[:limit], (y[:limit] if y is not None else None), getattr(data, "name", "data")
    ex = result.compressed.example_input
    if ex is None:
        ex = result.original.example_input
    if ex is None:
        raise ExportError(
            "the deployed check needs held-out data or an example input",
            path=result.original.source,
            hint="give sample data (--data FILE)",
        )
    return ex, None, "example input"


def _batches(x: torch.Tensor, size: int, fixed: int | None):
    """``(batch, real)`` pairs; a fixed-batch program gets short batches padded."""
    step = fixed or size
    for start in range(0, x.shape[0], step):
        b = x[start : start + step]
        real = int(b.shape[0])
        if fixed and real < fixed:
            b = torch.cat([b, b[-1:].expand(fixed - real, *b.shape[1:])])
        yield b, real


@dataclass
class _Agreement:
    """Running comparison of a deployed file's outputs with the simulation's."""

    seen: int = 0
    correct: int = 0
    sim_correct: int = 0
    agree: int = 0
    err_sq: float = 0.0
    ref_sq: float = 0.0
    max_diff: float = 0.0
    classifier: bool = False
    labelled: bool = False

    def add(self, out: torch.Tensor, ref: torch.Tensor, y: torch.Tensor | None) -> None:
        """One batch of ``real`` rows; ``y`` the labels of the whole sample (or ``None``)."""
        real = int(out.shape[0])
        diff = (out.double() - ref.double()).abs()
        self.max_diff = max(self.max_diff, float(diff.max()) if diff.numel() else 0.0)
        self.err_sq += float(diff.pow(2).sum())
        self.ref_sq += float(ref.double().pow(2).sum())
        self.classifier = out.ndim == 2 and out.shape[1] > 1
        if self.classifier:
            self.agree += int((out.argmax(1) == ref.argmax(1)).sum())
            if y is not None:
                labels = y[self.seen : self.seen + real].reshape(-1)
                self.correct += int((out.argmax(1) == labels).sum())
                self.sim_correct += int((ref.argmax(1) == labels).sum())
        self.seen += real

    @property
    def accuracy(self) -> float | None:
        ok = self.classifier and self.labelled and self.seen
        return self.correct / self.seen if ok else None

    @property
    def simulated_accuracy(self) -> float | None:
        return self.sim_correct / self.seen if self.accuracy is not None else None

    @property
    def rel_l2(self) -> float:
        if self.ref_sq > 0:
            return (self.err_sq**0.5) / self.ref_sq**0.5
        return 0.0 if self.err_sq == 0 else float("inf")


def _compare(
    fmt: str,
    path: str | Path,
    run: Runner,
    sim: Runner,
    x: torch.Tensor,
    y: torch.Tensor | None,
    batch: int,
    fixed: int | None,
) -> _Agreement:
    """Run the file and the simulation on the same batches and compare their outputs."""
    agreement = _Agreement(labelled=y is not None)
    for b, real in _batches(x, batch, fixed):
        out = run(b)[:real]
        ref = sim(b)[:real]
        if out.shape != ref.shape:
            raise ExportError(
                f"the deployed {fmt} file returns shape {tuple(out.shape)}, the simulation "
                f"{tuple(ref.shape)}",
                path=path,
            )
        agreement.add(out, ref, y)
    return agreement


def _mismatch_reasons(a: _Agreement, margin: float, max_rel_l2: float) -> list[str]:
    """Why the file does not behave like the simulation (empty when it does)."""
    reasons = []
    acc, sim_acc = a.accuracy, a.simulated_accuracy
    if acc is not None and abs(acc - sim_acc) > margin:
        reasons.append(f"accuracy {100 * acc:.2f}% vs simulated {100 * sim_acc:.2f}%")
    elif acc is None and a.classifier and (1.0 - a.agree / a.seen) > margin:
        # Without labels, top-1 agreement with the simulation is the deployed quality.
        reasons.append(f"top-1 agreement with the simulation {100 * a.agree / a.seen:.2f}%")
    if not a.rel_l2 <= max_rel_l2:
        reasons.append(f"relative L2 error of the outputs {a.rel_l2:.3g} > {max_rel_l2:g}")
    return reasons


def _latencies(
    run: Runner, x: torch.Tensor, batch: int, fixed: int | None, repeats: int
) -> dict[str, Any]:
    """Latency at batch 1 and at the data batch (only the fixed batch for fixed programs)."""
    lat: dict[str, Any] = {}
    sizes = [1, min(batch, int(x.shape[0]))]
    if fixed:
        sizes = [fixed]
    for size in dict.fromkeys(sizes):
        xb = next(_batches(x[:size], size, fixed))[0]
        lat[f"batch_{size}"] = latency_stats(lambda xb=xb: run(xb), repeats=repeats)
    return lat


def check_file(
    fmt: str,
    path: str | Path,
    result: Any,
    data: Any = None,
    *,
    simulated: Runner | None = None,
    margin: float = DEFAULT_MARGIN,
    max_rel_l2: float = DEFAULT_REL_L2,
    batch: int = DEPLOY_BATCH,
    limit: int = DEPLOY_SAMPLES,
    repeats: int = 20,
    latency: bool = True,
) -> dict[str, Any]:
    """Evaluate one exported file on the held-out data and time it.

    Parameters
    ----------
    fmt, path
        The export format and the written file.
    result
        The `core.compress.engine.CompressionResult` the file was written from (its compressed module
        is the in-app simulation the file is compared with).
    data
        A `core.io.data.Dataset` (labels give accuracy) or an input tensor; default: the
        model's example input.
    simulated
        Override of the simulation runner (tests).
    margin
        Accuracy difference (fraction) above which the file is flagged.
    max_rel_l2
        Relative L2 error of the outputs vs the simulation above which it is flagged too.
    batch
        Batch size of the evaluation pass and of the second latency measurement.
    limit
        At most this many samples are evaluated.
    repeats
        Timed repeats per latency measurement.
    latency
        Measure latency (``latency_ms`` is ``{}`` otherwise).

    Returns
    -------
    dict
        ``samples``, ``accuracy`` and ``simulated_accuracy`` (labelled classifiers, else
        None), ``agreement`` (top-1 vs the simulation), ``rel_l2``, ``max_abs_diff``,
        ``latency_ms`` ``{"batch_1": stats, "batch_N": stats}``, ``deployed_mismatch`` and
        ``warning`` (a line, or None).
    """

    run = load_runner(fmt, path, result)
    sim = simulated or _torch_runner(result.compressed.module)
    x, y, data_name = _samples(result, data, limit)
    fixed = fixed_batch(result.compressed) or result.compressed.metadata.get("fixed_batch")
    a = _compare(fmt, path, run, sim, x, y, batch, fixed)
    reasons = _mismatch_reasons(a, margin, max_rel_l2)
    mismatch = bool(reasons)
    warning = None
    if mismatch:
        what = "; ".join(reasons)
        warning = (
            f"deployed {fmt} file {Path(path).name}: {what} on {a.seen} samples of {data_name} "
            f"(accuracy margin {100 * margin:g} points); the file does not behave like the "
            "in-app model"
        )
    lat = _latencies(run, x, batch, fixed, repeats) if latency else {}
    return {
        "data": data_name,
        "samples": a.seen,
        "accuracy": a.accuracy,
        "simulated_accuracy": a.simulated_accuracy,
        "agreement": a.agree / a.seen if a.classifier and a.seen else None,
        "rel_l2": a.rel_l2,
        "max_abs_diff": a.max_diff,
        "latency_ms": lat,
        "margin": margin,
        "max_rel_l2": max_rel_l2,
        "deployed_mismatch": bool(mismatch),
        "warning": warning,
    }


def check_records(
    records: Sequence[Any],
    result: Any,
    data: Any = None,
    *,
    files: Mapping[str, Path] | None = None,
    progress: Callable[[float, str], None] | None = None,
    cancel: Any = None,
    **kw: Any,
) -> tuple[list[Any], list[str]]:
    """Run `check_file` on every deployable record; return the updated records and warnings.

    ``files``: format -> where the file is now (a staging folder), when the records already
    name their final place. Records of other formats (state_dict, safetensors, hf) and models
    without a forward pass are returned unchanged. ``progress(fraction, message)`` is told
    which file is checked; ``cancel`` (a `core.base.progress.CancelToken`) is checked between files.
    """
    if not result.compressed.can_run:
        return list(records), []
    x = getattr(data, "x", data if isinstance(data, torch.Tensor) else None)
    has_data = isinstance(x, torch.Tensor) and x.shape[0] > 0
    if (
        not has_data
        and result.compressed.example_input is None
        and (result.original.example_input is None)
    ):
        # Nothing to run the files on: say so instead of failing the export.
        return list(records), [
            "deployed check skipped: no held-out data or example input (give --data FILE)"
        ]
    out, warnings = [], []
    for i, rec in enumerate(records):
        if rec.format not in DEPLOYABLE_FORMATS:
            out.append(rec)
            continue
        if cancel is not None:
            cancel.check()
        if progress is not None:
            progress(i / len(records), f"checking the deployed {rec.format} file")
        path = (files or {}).get(rec.format, rec.path)
        info = check_file(rec.format, path, result, data, **kw)
        if info["warning"]:
            warnings.append(info["warning"])
        out.append(replace(rec, deployed=info))
    return out, warnings


def cost_per_million(
    latency_ms: float, batch: int, price_per_hour: float, concurrency: int = 1
) -> float:
    """US dollars per million inferences on an instance billed ``price_per_hour``.

    Throughput is ``concurrency * batch / latency`` inferences per second: ``concurrency``
    batches of ``batch`` samples in flight at once, each taking ``latency_ms``. With the
    latency measured using all of the machine's threads (the default here) the machine is
    already busy, so concurrency stays 1; give the number of single-threaded workers when the
    latency was measured with one thread each.
    """
    if not (latency_ms > 0 and batch >= 1 and concurrency >= 1 and price_per_hour >= 0):
        raise ValueError(
            f"cost needs latency > 0, batch >= 1, concurrency >= 1 and price >= 0; got "
            f"{latency_ms}, {batch}, {concurrency}, {price_per_hour}"
        )
    per_second = concurrency * batch / (latency_ms / 1000.0)
    return price_per_hour / 3600.0 / per_second * 1e6


def _cost_entry(
    latency_ms: float | None, batch: int | None, price: float, concurrency: int, what: str
) -> dict[str, Any] | None:
    if not latency_ms or not batch:
        return None
    return {
        "measured": what,
        "latency_ms": latency_ms,
        "batch": batch,
        "inferences_per_second": concurrency * batch / (latency_ms / 1000.0),
        "usd_per_million": cost_per_million(latency_ms, batch, price, concurrency),
    }


def cost_block(
    price_per_hour: float,
    evals: Mapping[str, Any] | None,
    records: Sequence[Any],
    *,
    concurrency: int = 1,
) -> dict[str, Any]:
    """The ``cost`` block of ``report.json``: cost per million inferences before and after.

    ``before``: the original PyTorch model (evaluation latency at its batch). ``after``: the
    cheapest deployed export (its median latency at the data batch), else the compressed
    PyTorch model; ``per_export`` lists every deployed file.
    """
    evals = evals or {}

    def _lat(ev: Any) -> tuple[float | None, int | None]:
        if ev is None:
            return None, None
        d = ev.to_dict() if hasattr(ev, "to_dict") else dict(ev)
        return d.get("latency_ms_per_batch"), d.get("latency_batch")

    before = _cost_entry(
        *_lat(evals.get("before")), price_per_hour, concurrency, "original, PyTorch"
    )
    simulated = _cost_entry(
        *_lat(evals.get("after")), price_per_hour, concurrency, "compressed, PyTorch simulation"
    )
    per_export: dict[str, Any] = {}
    for rec in records:
        lat = ((getattr(rec, "deployed", None) or {}).get("latency_ms")) or {}
        sizes = sorted((int(k.split("_")[1]), v) for k, v in lat.items())
        if sizes:
            n, stats = sizes[-1]
            per_export[rec.format] = _cost_entry(
                stats["median"], n, price_per_hour, concurrency, f"deployed {rec.format} file"
            )
    after = min(per_export.values(), key=lambda e: e["usd_per_million"], default=simulated)
    ratio = None
    if before and after:
        ratio = before["usd_per_million"] / after["usd_per_million"]
    return {
        "instance_price_per_hour_usd": price_per_hour,
        "concurrency": concurrency,
        "threads": torch.get_num_threads(),
        "before": before,
        "after": after,
        "after_simulated": simulated,
        "per_export": per_export,
        "saving_factor": ratio,
        "note": "batch sizes may differ between before and after; cost is per inference",
    }


__all__ = [
    "DEFAULT_MARGIN",
    "DEPLOYABLE_FORMATS",
    "check_file",
    "check_records",
    "cost_block",
    "cost_per_million",
    "latency_stats",
    "load_runner",
]
