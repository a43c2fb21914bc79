"""A model compressed straight into its packed archive, tensor by tensor.

`write_outputs`/`write_into` (`core.export.outputs`) pack a `CompressionResult` that holds a
dense compressed copy of the whole model next to the original: two to three times the
weights in memory at 10**8-10**9 of them. A model of any format compressed without data,
fine-tuning, calibration or channel removal into the packed format alone needs none of
that: `stream_into` takes each tensor from the model (for a weights-only checkpoint, from
the memory-mapped file), compresses it (`core.compress.engine.compress_stream`), appends it
to the archive (`core.packed.write_packed_stream`) and drops it. The archive's bytes and
``recipe.json`` are those of the dense path; for a weights-only checkpoint the report too
(only its ``generated`` time differs): the report's weight histograms are taken while each
layer is at hand. A model with a forward pass is evaluated afterwards on the weights the
archive restores (``evals`` as a function of the archive; `core.cli.compress`).
"""

from __future__ import annotations

import dataclasses
import html
import json
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.func import functional_call

from core.base.memory import MappedPages, trim_heap
from core.base.outdir import atomic_write, pause_point
from core.base.progress import CancelToken, ProgressFn, no_progress
from core.compress.engine import CompressionResult, LayerReport, can_stream, compress_stream
from core.evaluate import evaluate
from core.export.formats import ExportRecord, file_name, packed_note
from core.export.report import (
    HTML_HISTOGRAMS,
    _pct,
    dumps,
    fp32_bytes,
    histogram_pair,
    render_html,
    report_data,
    svg_histogram,
)
from core.io.model_io import WeightsOnlyModule
from core.packed import restore_to_file, write_packed_stream
from core.recipe.plan import CompressionPlan

#: After a layer of at least this many weights the C heap is trimmed (`trim_heap`).
_TRIM_NUMEL = 1 << 20
#: ``(edges, before counts, after counts)`` of one layer (`histogram_pair`).
Histogram = tuple[np.ndarray, np.ndarray, np.ndarray]


def can_stream_outputs(
    loaded: Any, plan: CompressionPlan, stats: Any, formats: Sequence[str], data: Any
) -> bool:
    """Whether `stream_into` writes what `write_into` would: the packed format alone, no
    data, and a model and plan `core.compress.engine.can_stream` accepts."""
    return list(formats) == ["packed"] and data is None and can_stream(loaded, plan, stats)


def _histogram_tensors(loaded: Any, stats: Any) -> set[str]:
    """Tensors of the layers the report draws (the `HTML_HISTOGRAMS` largest, ties in layer
    order, as `core.export.report` picks them)."""
    layers = [layer for layer in stats.layers if layer.prunable and layer.tensor is not None]
    sizes = {k: int(v.numel()) for k, v in loaded.module.state_dict().items()}
    order = sorted(range(len(layers)), key=lambda i: -sizes.get(str(layers[i].tensor), 0))
    return {str(layers[i].tensor) for i in order[:HTML_HISTOGRAMS]}


def stream_packed(
    target: Path,
    loaded: Any,
    plan: CompressionPlan,
    stats: Any,
    *,
    entropy: bool = False,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
) -> tuple[CompressionResult, Any, dict[str, Histogram]]:
    """Compress ``loaded`` into the archive ``target`` tensor by tensor.

    Returns ``(result, info, histograms)``: a `CompressionResult` with the layer reports
    (its ``compressed`` model holds no tensors), the `core.packed.PackedInfo` and the report
    histograms by tensor name.
    """
    drawn = _histogram_tensors(loaded, stats)
    # Tensors that view a mapped file (a safetensors checkpoint, a Hugging Face model's
    # parameters) are read when their turn comes and given back after (`MappedPages`);
    # tensors in anonymous memory are left alone (paging them out would only swap).
    release = MappedPages().release
    for tensor in loaded.module.state_dict().values():
        release(tensor)
    reports: dict[str, LayerReport] = {}
    hists: dict[str, Histogram] = {}

    def items():
        for name, value, qt, mask, report, original in compress_stream(
            loaded, plan, stats, progress=progress, cancel=cancel, release=release
        ):
            if report is not None:
                reports[report.name] = report
                if name in drawn:
                    hists[name] = histogram_pair(original, value, mask)
            # done with the original: its pages of the mapped checkpoint leave the process
            # before the encoder's temporaries arrive (read again where it is the value)
            release(original)
            if qt is not None:
                # The encoder reads the codes and mask alone; the dense values (the codes
                # dequantized, nothing to check them against) need not sit beside its
                # temporaries: a meta tensor keeps their shape and dtype.
                value = value.to("meta")
            yield name, value, qt, mask
            release(original)
            del value, qt, mask, original
            if report is not None and report.numel >= _TRIM_NUMEL:
                trim_heap()  # the freed temporaries of a large layer back to the system

    empty = WeightsOnlyModule(source=str(loaded.source))
    result = CompressionResult(
        original=loaded,
        compressed=dataclasses.replace(loaded, module=empty),
        plan=plan,
        masks={},
        quantized={},
        layers=(),
    )
    info = write_packed_stream(result, items(), target, force=True, entropy=entropy, cancel=cancel)
    layers = [layer for layer in stats.layers if layer.prunable and layer.tensor is not None]
    result = dataclasses.replace(result, layers=tuple(reports[layer.name] for layer in layers))
    return result, info, hists


def stream_into(
    stage: Path,
    out: Path,
    loaded: Any,
    plan: CompressionPlan,
    stats: Any,
    *,
    recipe: CompressionPlan | None = None,
    evals: Mapping[str, Any] | Callable[[Path], Mapping[str, Any]] | None = None,
    entropy: bool = False,
    report_extra: Mapping[str, Any] | Callable[[list[Any]], Mapping[str, Any]] | None = None,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
) -> tuple[list[ExportRecord], dict[str, Any], CompressionResult]:
    """`core.export.outputs.write_into` of ``["packed"]`` for a model `can_stream_outputs`
    accepts, compressing as it writes: ``(records, report content, result)``. ``evals``
    may be a function of the written archive (a model with a forward pass is measured on the
    model the archive restores, as it holds no compressed copy)."""
    target = stage / file_name("packed")
    result, info, hists = stream_packed(
        target, loaded, plan, stats, entropy=entropy, progress=progress, cancel=cancel
    )
    if callable(evals):
        evals = evals(target)
    note, extra = packed_note(info)
    record = ExportRecord(
        format="packed",
        path=out / target.name,
        bytes_on_disk=target.stat().st_size,
        max_abs_diff=None,
        latency_ms=None,
        note=note,
        extra=extra,
    )
    pause_point("exported")
    (recipe or result.plan).save(stage / "recipe.json")
    blocks = report_extra([record]) if callable(report_extra) else report_extra
    data = report_data(
        result, evals=evals or {}, exports=[record], extra={"warnings": [], **dict(blocks or {})}
    )
    text = dumps(data)
    atomic_write(stage / "report.json", [text.encode("utf-8")], force=True)
    page = _with_histograms(render_html(result, data), result, hists)
    atomic_write(stage / "report.html", [page.encode("utf-8")], force=True)
    return [record], json.loads(text), result


def _with_histograms(page: str, result: CompressionResult, hists: Mapping[str, Histogram]) -> str:
    """``page`` (rendered from a result without compressed tensors, so without histogram
    plots) with the plots `core.export.report.render_html` draws, in layer order."""
    marker = "</div><h2>Recipe</h2>"
    plots = [
        f"<div class='hist'><h3>{html.escape(r.name)} <span class='muted'>"
        f"{_pct(r.sparsity)} pruned</span></h3>{svg_histogram(*hists[r.tensor])}</div>"
        for r in result.layers
        if r.tensor in hists
    ]
    head, found, tail = page.rpartition(marker)
    return head + "".join(plots) + found + tail if found else page


# ---------------------------------------------------------------------------------------
# evaluating what was streamed
# ---------------------------------------------------------------------------------------
#: Models with more fp32 weight bytes than this are not timed after a streamed compress:
#: a latency pass needs every weight resident, which is what streaming avoids.
STREAM_LATENCY_MAX_BYTES = 1 << 28
#: Evaluation batch of such a model (activations of a 512-token encoder at 64 sequences a
#: batch are larger than its weights).
STREAM_EVAL_BATCH = 8


def _timed(loaded: Any) -> bool:
    return fp32_bytes(loaded.module) <= STREAM_LATENCY_MAX_BYTES


class _Substituted(torch.nn.Module):
    """``module`` run with the tensors of ``state`` in place of its own
    (`torch.func.functional_call`): the model an archive restores, without a copy of it."""

    def __init__(self, module: torch.nn.Module, state: Mapping[str, torch.Tensor]):
        super().__init__()
        if set(state) != set(module.state_dict()):
            raise RuntimeError("the archive's tensors are not the model's state dict")
        self.inner = module
        self.state = dict(state)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # non-persistent buffers (not in a state dict or an archive) stay the module's own
        return functional_call(self.inner, self.state, args, kwargs)


def archive_evals(
    loaded: Any, data: Any, progress: ProgressFn = no_progress
) -> Callable[[Path], dict[str, Any]]:
    """``evals`` for `stream_into`: the original and the model the written archive restores
    (its weights equal the dense path's compressed model exactly) on ``data``.

    The restored weights are written to a file beside the archive and mapped
    (`core.packed.restore_to_file`), then run in the original's module (no copy of it);
    both passes give back each layer's mapped pages once it has run
    (`core.base.memory.paged_forward`), so a Hugging Face model (whose weights view its
    safetensors file) is evaluated holding about one layer of weights. Models over
    `STREAM_LATENCY_MAX_BYTES` are not timed (`latency_warnings` says so)."""

    def measure(archive: Path) -> dict[str, Any]:
        progress(0.0, f"evaluating on {data.name}")
        timed = _timed(loaded)
        # untimed (a large model): small batches, so activations stay small beside it
        size = {} if timed else {"batch_size": STREAM_EVAL_BATCH}
        before = evaluate(loaded, data, latency=timed, paged=True, **size)
        with tempfile.TemporaryDirectory(dir=archive.parent, prefix=".restored-") as tmp:
            state = restore_to_file(archive, Path(tmp) / "weights.bin")
            restored = dataclasses.replace(loaded, module=_Substituted(loaded.module, state))
            after = evaluate(restored, data, reference=loaded, latency=timed, paged=True, **size)
            del state, restored
        return {"before": before, "after": after, "data": data.name}

    return measure


def latency_warnings(loaded: Any) -> list[str]:
    """The report's warning when `archive_evals` leaves the latency out."""
    if not loaded.can_run or _timed(loaded):
        return []
    return [
        "latency not measured: this compress streamed the model tensor by tensor to bound "
        "memory, and timing needs every weight in memory (export another format too, or "
        "give --data, to have it timed)"
    ]
