"""Histograms of the compressed weights on the original histograms' bin edges (the overlay the
window draws over each layer's histogram after Compress)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from core.base.errors import WorkbenchError
from core.base.progress import CancelToken
from core.io.model_io import get_tensor


@dataclass(frozen=True)
class AfterHistograms:
    """Counts of one compressed tensor on the original signed and log|w| bin edges."""

    signed: np.ndarray
    log_abs: np.ndarray


def after_histograms(
    result: Any, stats: Any, cancel: CancelToken | None = None
) -> dict[str, AfterHistograms]:
    """Per layer, the compressed weights counted on the original histograms' edges.

    Runs in the worker after compression, so the overlay is ready-made data for the plots.
    Pruned weights are exact zeros; the log|w| histogram counts only the kept ones. Layers
    whose tensor changed shape or name (channels physically removed) get no overlay.
    """

    out: dict[str, AfterHistograms] = {}
    if stats is None:
        return out
    module = result.compressed.module
    for name, ts in stats.tensors.items():
        if cancel is not None:
            cancel.check()
        tensor_name = ts.layer.tensor
        if tensor_name is None:
            continue
        try:
            w = get_tensor(module, tensor_name)
        except (KeyError, AttributeError, WorkbenchError):
            continue
        values = w.detach().to("cpu").float().reshape(-1).numpy()
        values = values[np.isfinite(values)]
        signed, _ = np.histogram(values, bins=np.asarray(ts.hist.edges))
        nz = np.abs(values[values != 0])
        log_abs, _ = np.histogram(np.log10(nz), bins=np.asarray(ts.hist_log.edges))
        out[name] = AfterHistograms(signed.astype(np.int64), log_abs.astype(np.int64))
    return out
