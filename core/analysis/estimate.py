"""Live estimates of a plan: sparsity, sizes, entropy bound and SQNR, in O(layers * log n).

`preview` reads only the precomputed `core.analysis.stats.ModelStats`: every number is a lookup in a
`core.analysis.stats.ScoreIndex` or a closed form over a handful of stored sums, so it runs on the UI
thread while a slider moves. `PreviewCache` gives the same results and re-estimates only what
a plan edit changed (the window keeps one per analysis).

What is exact and what is estimated
-----------------------------------
* Sparsity and nonzeros are exact: a target sparsity becomes a count per layer
  (`LayerPreview.count`, `core.analysis.selection`), ``round(target * n)`` per layer or over the global
  pool, and the engine prunes exactly that many scores; a threshold set by the user is applied
  as reported here (`LayerPreview.threshold`). Either way the applied mask prunes exactly
  ``numel - nnz`` weights. For a target, the reported threshold is the boundary value (inside
  a radix bin, interpolated to within a relative ``2**-7``).
* Packed bytes come from the archive's own size model (`core.packed.estimate_archive_bytes`):
  exact except for relative-index streams (expected length for random positions).
* The entropy bound is ``nnz * H(codes) + numel * H2(density)`` bits (``rows * H2`` for whole
  pruned channels) plus scales and zero points, plus every tensor stored raw and the header. ``H(codes)`` comes from the layer's
  ``|w|`` radix histogram (piecewise-uniform density) mapped onto the quantization grid, with
  one bit of sign weighted by the fraction of non-zero codes; the kept weights' distribution
  is exact for magnitude pruning and the whole tensor's otherwise. Per-channel quantization
  uses the geometric mean of the channels' steps.
* SQNR = ``10 log10(signal / (pruned energy + quantization noise))`` with the pruned energy
  from the index (N:M: order statistics of the ``|w|`` distribution) and quantization noise
  ``nnz * delta**2 / 12`` from the absmax/range of the weights (per channel: the mean of
  ``delta_c**2``).
* The SQNR is the round-to-nearest bound: it is computed for magnitude-style masks and
  round-to-nearest codes. Group-wise scales (``group_size``) use the per-channel step (a group's
  range is never wider than its row's), and the second-order methods (``obs``/``obs_nm``
  pruning, ``gptq`` rounding, bias correction, `core.compress.second_order`) change which weights are
  kept and how they round, not how many or how many bytes, so sparsity and bytes stay exact
  while their measured error after compression is typically lower than this bound.
* With ``remove_channels`` the archive also loses the consumers' input columns, which the
  preview does not model: it counts the pruned channels as masked rows (an upper bound).

Why one module of this size: `preview` and `PreviewCache` must compute every number with the
same functions (the cache is tested bit for bit against the uncached path), so both live here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.analysis.selection import energy_for_count, global_counts, index_threshold, target_count
from core.analysis.stats import _BIN_HI, _BIN_LO, ModelStats, ScoreIndex, TensorStats
from core.base.errors import CompressionError
from core.base.methods import prune_method
from core.ops.pruning import nm_pruned_count
from core.ops.quantization import n_quant_params
from core.packed import (
    ST_DTYPES,
    TensorSpec,
    archive_metadata,
    estimate_archive_bytes,
    quant_param_bytes,
)
from core.recipe.plan import GRADIENT_METHODS, STRUCTURED_METHODS, CompressionPlan

#: Quantization cells whose probabilities are integrated exactly; above them every radix bin
#: spans several cells and its share of the entropy has a closed form.
_CELL_LIMIT = 512


@dataclass(frozen=True)
class LayerPreview:
    """Estimates for one prunable layer.

    ``threshold`` is the one the engine will apply (``None``: no threshold mask, e.g. N:M or
    no pruning). ``signal`` and ``noise`` are the weight energy and the estimated error energy
    behind ``sqnr_db``. ``packed_bytes`` is the archive payload of this tensor;
    ``entropy_bytes`` its entropy-coded lower bound. ``count``: for a target sparsity, the
    number of scores (weights, or channels for channel methods) the engine prunes with
    `core.analysis.selection.count_mask`; ``None`` where the mask is a threshold (or N:M, or none).
    """

    name: str
    tensor: str
    method: str
    scope: str
    threshold: float | None
    numel: int
    nnz: int
    sparsity: float
    bits: int | None
    symmetric: bool
    per_channel: bool
    dense_bytes: int
    packed_bytes: int
    entropy_bytes: int
    sqnr_db: float
    signal: float
    noise: float
    skip: bool
    count: int | None = None


@dataclass(frozen=True)
class PlanPreview:
    """Estimates for the whole plan.

    ``total_numel``/``total_nnz``/``sparsity`` are over the prunable layers. ``dense_bytes`` is
    float32 for every floating-point parameter (prunable or not); ``packed_bytes`` the whole
    packed archive (every state tensor, header included); ``entropy_bytes`` its entropy-coded
    lower bound; ``compression_ratio = dense_bytes / packed_bytes``; ``sqnr_db`` pools the
    signal and noise of every prunable layer.
    """

    layers: tuple[LayerPreview, ...]
    total_numel: int
    total_nnz: int
    sparsity: float
    dense_bytes: int
    packed_bytes: int
    entropy_bytes: int
    compression_ratio: float
    sqnr_db: float
    header_bytes: int

    def layer(self, name: str) -> LayerPreview:
        for lp in self.layers:
            if lp.name == name:
                return lp
        raise KeyError(name)


def _sqnr(signal: float, noise: float) -> float:
    if noise <= 0.0:
        return math.inf
    if signal <= 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _h2(p: float) -> float:
    """Binary entropy in bits."""
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -(p * math.log2(p) + (1.0 - p) * math.log2(1.0 - p))


def _mean_step_sq(ts: TensorStats, bits: int, symmetric: bool, per_channel: bool) -> float:
    """Mean squared quantization step ``delta**2`` (over channels when per-channel)."""
    half = 2 ** (bits - 1) - 1
    qmax = 2**bits - 1
    if per_channel:
        return ts.mean_absmax_sq / half**2 if symmetric else ts.mean_range_sq / qmax**2
    lo, hi = min(ts.min, 0.0), max(ts.max, 0.0)
    delta = max(-lo, hi) / half if symmetric else (hi - lo) / qmax
    return delta * delta


def _entropy_step(ts: TensorStats, bits: int, symmetric: bool, per_channel: bool) -> float:
    """Quantization step for the entropy estimate: per-channel, the channels' geometric mean
    (entropy shifts by ``-log2 delta``, so channels average in log space)."""
    if not per_channel:
        return math.sqrt(_mean_step_sq(ts, bits, symmetric, False))
    if symmetric:
        return math.exp(ts.log_absmax) / (2 ** (bits - 1) - 1)
    return math.exp(ts.log_range) / (2**bits - 1)


def code_entropy(bins: np.ndarray, counts: np.ndarray, delta: float) -> tuple[float, float]:
    """Entropy (bits per value) of ``round(|w| / delta)`` and the probability it is non-zero.

    ``bins``/``counts`` are a radix histogram of ``|w|`` (`core.analysis.stats.ScoreIndex` bins); values
    are taken as uniform within each bin. Cells up to `_CELL_LIMIT` get their probability from
    the piecewise-linear CDF; above that each bin spreads over several cells uniformly, which
    contributes ``-p log2(p * delta / width)``.
    """
    total = float(counts.sum())
    if total <= 0.0 or not delta > 0.0 or not math.isfinite(delta):
        return 0.0, 0.0
    a, b = _BIN_LO[bins], _BIN_HI[bins]
    cum = np.concatenate(([0.0], np.cumsum(counts)))
    xp = np.empty(2 * bins.size)
    xp[0::2], xp[1::2] = a, b
    fp = np.empty(2 * bins.size)
    fp[0::2], fp[1::2] = cum[:-1], cum[1:]
    cells = int(min(math.ceil(float(b[-1]) / delta + 0.5), _CELL_LIMIT))
    upper = (np.arange(1, cells + 1) - 0.5) * delta
    cdf = np.interp(upper, xp, fp)
    masses = np.diff(cdf, prepend=0.0)
    p = masses[masses > 0.0] / total
    entropy = float(-(p * np.log2(p)).sum())
    nonzero = 1.0 - float(masses[0]) / total
    if total - cdf[-1] > 0.0:
        cut = float(upper[-1])
        sel = b > cut
        lo = np.maximum(a[sel], cut)
        width = b[sel] - lo
        pm = counts[sel] * (width / (b[sel] - a[sel])) / total
        ok = pm > 0.0
        spread = np.maximum(width[ok], delta)
        entropy += float(-(pm[ok] * np.log2(pm[ok] * delta / spread)).sum())
    return entropy, nonzero


class _KeptHistogram:
    """``code_entropy(*index.kept_bins(t), delta)`` for any ``t`` and ``delta``, equal to it
    bit for bit but from arrays built once per index.

    `code_entropy` builds the piecewise-linear CDF over every kept bin and integrates it at
    the cell edges; only the points up to the last cell edge (and one beyond) change the
    interpolated values, the kept counts are the stored cumulative counts minus the pruned
    ones (integers in float64, so the same values as the cumsum), and the bins above the last
    cell are a suffix of the ascending bins. A call is O(cells + log bins), not O(bins).
    """

    def __init__(self, index: ScoreIndex):
        self.index = index
        n = index.bins.size
        self.xp = np.empty(2 * n)
        self.xp[0::2], self.xp[1::2] = _BIN_LO[index.bins], _BIN_HI[index.bins]
        self.a, self.b = self.xp[0::2], self.xp[1::2]  # views: 32 bytes per bin in all
        cum = index.bin_cum.astype(np.float64)
        self.fp = np.empty(2 * n)
        self.fp[0::2], self.fp[1::2] = cum[:-1], cum[1:]
        self._upper: tuple[int, float, np.ndarray] | None = None  # the last cells' edges

    def code_entropy(self, threshold: float, delta: float) -> tuple[float, float]:
        index = self.index
        cum_i = index.bin_cum
        # ScoreIndex.kept_bins: first kept bin j, the first one's count reduced by `below`
        below = index.count_below(threshold) - index.nonfinite
        j = int(cum_i.searchsorted(below, side="right")) - 1
        j = min(max(j, 0), len(index.bins))
        if j >= len(index.bins):
            return 0.0, 0.0
        total = float(cum_i[-1] - below)
        if total <= 0.0 or not delta > 0.0 or not math.isfinite(delta):
            return 0.0, 0.0
        a, b = self.a[j:], self.b[j:]
        cells = int(min(math.ceil(float(b[-1]) / delta + 0.5), _CELL_LIMIT))
        if self._upper is None or self._upper[:2] != (cells, delta):
            self._upper = (cells, delta, (np.arange(1, cells + 1) - 0.5) * delta)
        upper = self._upper[2]
        xp = self.xp[2 * j :]
        end = min(int(xp.searchsorted(upper[-1], side="right")) + 1, xp.size)
        fp = self.fp[2 * j : 2 * j + end] - float(below)
        fp[0] = 0.0
        cdf = np.interp(upper, xp[:end], fp)
        masses = np.empty_like(cdf)  # np.diff(cdf, prepend=0.0), without its overhead
        masses[0] = cdf[0]
        np.subtract(cdf[1:], cdf[:-1], out=masses[1:])
        p = masses[masses > 0.0] / total
        entropy = float(-(p * np.log2(p)).sum())
        nonzero = 1.0 - float(masses[0]) / total
        if total - cdf[-1] > 0.0:
            cut = float(upper[-1])
            s = int(b.searchsorted(cut, side="right"))  # b ascending: b > cut is b[s:]
            counts = np.diff(cum_i[j + s :]).astype(np.float64)
            if s == 0:
                counts[0] = float(cum_i[j + 1] - below)
            lo = np.maximum(a[s:], cut)
            width = b[s:] - lo
            pm = counts * (width / (b[s:] - a[s:])) / total
            ok = pm > 0.0
            spread = np.maximum(width[ok], delta)
            entropy += float(-(pm[ok] * np.log2(pm[ok] * delta / spread)).sum())
        return entropy, nonzero


def _nm_pruned_energy(mag: ScoreIndex, n: int, m: int, pruned: int) -> float:
    """Expected energy of the ``n`` smallest ``|w|`` of every group of ``m``.

    A weight at CDF position ``F`` is among the ``n`` smallest of its group when at most
    ``n - 1`` of the other ``m - 1`` weights are smaller: ``P = sum_j<n C(m-1, j) F^j (1-F)^(m-1-j)``.
    The result is scaled so the expected count equals the exact ``pruned``.
    """
    counts = mag.bin_counts.astype(np.float64)
    total = counts.sum()
    if total <= 0.0 or pruned <= 0:
        return 0.0
    energy = np.diff(mag.bin_energy)
    f = (mag.bin_cum[:-1] + 0.5 * counts) / total
    prob = np.zeros_like(f)
    for j in range(n):
        prob += math.comb(m - 1, j) * f**j * (1.0 - f) ** (m - 1 - j)
    expected = float((counts * prob).sum())
    if expected <= 0.0:
        return 0.0
    return float((energy * prob).sum()) * pruned / expected


def _gradient_error(name: str, method: str) -> CompressionError:
    return CompressionError(
        f"layer {name!r} uses {method!r}, which needs gradient statistics, and the analysis "
        "ran without data",
        hint="load data and run the analysis with gradients, or use magnitude pruning",
    )


def _bias_spec(
    layer, state_shapes: dict[str, tuple[tuple[int, ...], str]], bits: int, symmetric: bool
) -> TensorSpec | None:
    """Spec of the layer's bias coded at ``bits`` (same rule as `core.compress.engine.bias_name`)."""
    for name in layer.param_names:
        entry = state_shapes.get(name)
        if name == layer.tensor or entry is None:
            continue
        shape, dtype = entry
        if len(shape) == 1 and dtype in ("F32", "F64", "F16", "BF16"):
            return TensorSpec(name, shape, math.prod(shape), bits=bits, symmetric=symmetric)
    return None


def preview(stats: ModelStats, plan: CompressionPlan) -> PlanPreview:
    """Estimate what ``plan`` does to the analysed model, without touching any weight.

    Parameters
    ----------
    stats
        `core.analysis.stats.analyze` output for the model.
    plan
        The plan to estimate.

    Returns
    -------
    PlanPreview
        Per prunable layer and in total: exact sparsity/nonzeros and the thresholds the engine
        applies, packed archive bytes, entropy bound, compression ratio and estimated SQNR.

    Raises
    ------
    CompressionError
        The plan names a layer the model does not have, or a layer uses a gradient criterion
        but the statistics hold no gradients.
    """
    return _preview(stats, plan, None)


class _Recent:
    """A dict of what the current preview used, falling back to what the previous one used
    (`rotate` between previews drops the rest), then to what `PreviewCache.warm` kept.
    Cached objects thus die young: an unbounded cache would pile up long-lived objects that
    the garbage collector's full passes walk (a ~90 ms pause in the middle of a drag); the
    warm ones are bounded (one entry per layer and warmed setting)."""

    __slots__ = ("kept", "new", "old")

    def __init__(self) -> None:
        self.old: dict = {}
        self.new: dict = {}
        self.kept: dict = {}

    def rotate(self) -> None:
        self.old, self.new = self.new, {}

    def get(self, key: Any) -> Any:
        hit = self.new.get(key)
        if hit is None:
            hit = self.old.get(key)
            if hit is None:
                hit = self.kept.get(key)
            if hit is not None:
                self.new[key] = hit
        return hit

    def __setitem__(self, key: Any, value: Any) -> None:
        self.new[key] = value

    def __len__(self) -> int:
        return len(self.new)


class PreviewCache:
    """`preview` for one `ModelStats`, reusing what the previous plan already computed.

    A slider step changes one field of the plan; this keeps, per layer, its pruning (keyed by
    its prune settings, or for members of the global pool by the shared threshold and its
    count), its preview row and archive specs (keyed by its config and pruning), the global
    pool's counts (keyed by the default's prune settings and the members), each archive
    tensor's bytes and layout entry (keyed by its spec), and per-layer arrays that make the
    entropy of the kept weights O(cells + log bins) instead of O(bins) (`_KeptHistogram`),
    and each layer's `LayerPreview` (keyed by its row and packed bytes: a layer the step did
    not change keeps the very same object, which views compare by identity).
    Every number is computed by the same code from the same inputs as `preview`, so
    ``PreviewCache(stats).preview(plan) == preview(stats, plan)`` field for field
    (tests/core/test_estimate_cache.py). Only the previous plan's entries are kept (a slider
    step compares with the step before). Not thread-safe: one cache per thread.
    """

    def __init__(self, stats: ModelStats):
        self.stats = stats
        self._state_shapes = {st.name: (tuple(st.shape), st.dtype) for st in stats.state}
        self._raw_specs = [
            TensorSpec(st.name, st.shape, math.prod(st.shape), dtype=st.dtype) for st in stats.state
        ]
        self._pools = _Recent()
        self._prunings = _Recent()
        self._rows = _Recent()
        self._parts = _Recent()
        self._layer_previews = _Recent()
        self._kept: dict[str, _KeptHistogram] = {}  # arrays only, one per quantized layer

    def preview(self, plan: CompressionPlan) -> PlanPreview:
        """Same as ``preview(self.stats, plan)``."""
        for table in (
            self._pools,
            self._prunings,
            self._rows,
            self._parts,
            self._layer_previews,
        ):
            table.rotate()
        return _preview(self.stats, plan, self)

    def warm(self, plan: CompressionPlan) -> None:
        """Compute what previewing ``plan`` needs and keep it for the cache's life: each
        layer's pruning, row, archive parts and `LayerPreview` at ``plan``'s settings (not
        the global pool, which depends on the whole plan). For idle time: a target drag's
        plans set every layer to one of the scan's levels, so warming ``CompressionPlan(
        default=level config)`` per level makes the drag's first step (every layer new)
        and its big steps cost lookups. The entries the next `preview` compares with (the
        last preview's) are left as they are; the numbers are the same as without warming.
        """
        kept = (self._prunings, self._rows, self._parts, self._layer_previews)
        tables = (*kept, self._pools)
        saved = [(t.old, t.new) for t in tables]
        for t in tables:
            t.old, t.new = {}, {}
        try:
            _preview(self.stats, plan, self)
        finally:
            for t, (old, new) in zip(tables, saved, strict=True):
                if t in kept:
                    t.kept.update(t.new)
                t.old, t.new = old, new

    def _global_pool(self, plan: CompressionPlan, prunable: list):
        members = tuple(layer.name for layer in prunable if plan.is_global_member(layer.name))
        key = (plan.default.prune, plan.default.skip, members)
        hit = self._pools.get(key)
        if hit is None:
            hit = self._pools[key] = _global_pool(self.stats, plan, prunable)
        return hit

    def _layer_pruning(self, name: str, ts: Any, cfg: Any) -> _Pruning:
        key = (name, cfg.prune, cfg.skip)
        hit = self._prunings.get(key)
        if hit is None:
            hit = self._prunings[key] = _layer_pruning(name, ts, cfg)
        return hit

    def _layer(self, layer: Any, ts: Any, cfg: Any, pr: _Pruning):
        key = (layer.name, cfg, pr)
        hit = self._rows.get(key)
        if hit is None:
            kept = self._kept.get(layer.name)
            if kept is None and not cfg.skip and cfg.quant.active:  # (entropy of codes only)
                kept = self._kept[layer.name] = _KeptHistogram(ts.scores["magnitude"])
            hit = self._rows[key] = _layer_entry(layer, ts, cfg, pr, self._state_shapes, kept)
        return hit

    def _layer_preview(self, row: dict, packed: int, coded: bool) -> LayerPreview:
        """The previous preview's `LayerPreview` object for an unchanged layer (same row
        object, same bytes), so views can skip it by identity (`LayerTableModel`)."""
        key = (id(row), packed, coded)
        hit = self._layer_previews.get(key)
        if hit is None or hit[0] is not row:
            hit = self._layer_previews[key] = (row, _layer_preview(row, packed, coded))
        return hit[1]


def _layer_entry(
    layer: Any,
    ts: Any,
    cfg: Any,
    pruning: _Pruning,
    state_shapes: dict[str, tuple[tuple[int, ...], str]],
    kept: _KeptHistogram | None = None,
) -> tuple[dict, TensorSpec | None, TensorSpec | None]:
    """(preview row, spec of the coded weight, spec of the coded bias) of one layer."""
    row, spec = _layer_row(layer, ts, cfg, pruning, kept)
    bias = None
    if not cfg.skip and cfg.quant.bias_bits is not None:
        bias = _bias_spec(layer, state_shapes, cfg.quant.bias_bits, bool(cfg.quant.symmetric))
    return row, spec, bias


def _preview(stats: ModelStats, plan: CompressionPlan, cache: PreviewCache | None) -> PlanPreview:
    prunable = _prunable(stats, plan)
    if cache is None:
        member_set, global_threshold, global_count = _global_pool(stats, plan, prunable)
        state_shapes = {st.name: (tuple(st.shape), st.dtype) for st in stats.state}
    else:
        member_set, global_threshold, global_count = cache._global_pool(plan, prunable)
        state_shapes = cache._state_shapes
    partial = []
    coded: dict[str, TensorSpec] = {}
    for layer in prunable:
        ts = stats.tensors[layer.name]
        cfg = plan.config_for(layer.name)
        if layer.name in member_set:
            pruning = _global_member_pruning(ts, cfg, global_threshold, global_count)
        elif cache is None:
            pruning = _layer_pruning(layer.name, ts, cfg)
        else:
            pruning = cache._layer_pruning(layer.name, ts, cfg)
        if cache is None:
            row, spec, bias = _layer_entry(layer, ts, cfg, pruning, state_shapes)
        else:
            row, spec, bias = cache._layer(layer, ts, cfg, pruning)
        if spec is not None:
            coded[spec.name] = spec
        if bias is not None:
            coded[bias.name] = bias
        partial.append(row)
    return _assemble(stats, plan, partial, coded, cache)


def pruning_targets(
    stats: ModelStats, plan: CompressionPlan
) -> dict[str, tuple[float | None, int | None]]:
    """``{layer: (threshold, count)}``: what `preview` reports as each layer's ``threshold``
    and ``count``, without the size and error estimates (what the engine needs)."""
    prunable = _prunable(stats, plan)
    member_set, global_threshold, global_count = _global_pool(stats, plan, prunable)
    out: dict[str, tuple[float | None, int | None]] = {}
    for layer in prunable:
        ts = stats.tensors[layer.name]
        cfg = plan.config_for(layer.name)
        if layer.name in member_set:
            pr = _global_member_pruning(ts, cfg, global_threshold, global_count)
        else:
            pr = _layer_pruning(layer.name, ts, cfg)
        out[layer.name] = (pr.threshold, pr.count)
    return out


def _prunable(stats: ModelStats, plan: CompressionPlan) -> list:
    """The layers the preview covers; a plan naming unknown layers is refused."""
    known = {layer.name for layer in stats.layers}
    unknown = sorted(set(plan.layer_overrides) - known)
    if unknown:
        raise CompressionError(
            f"the plan configures layer {unknown[0]!r}, which this model does not have",
            hint="remove it from the recipe or open the model the recipe was made for",
        )
    prunable = [layer for layer in stats.layers if layer.prunable and layer.tensor is not None]
    for layer in prunable:
        if layer.name not in stats.tensors:
            raise CompressionError(
                f"layer {layer.name!r} has no statistics", hint="analyze the model again"
            )
    return prunable


def _global_pool(
    stats: ModelStats, plan: CompressionPlan, prunable: list
) -> tuple[set[str], float | None, dict[str, int]]:
    """(members, shared threshold, exact count per member) of the default's global pool."""
    members = [layer.name for layer in prunable if plan.is_global_member(layer.name)]
    global_threshold: float | None = None
    global_count: dict[str, int] = {}
    dprune = plan.default.prune
    if members:
        if dprune.method in GRADIENT_METHODS:
            for name in members:
                if stats.tensors[name].grad is None:
                    raise _gradient_error(name, dprune.method)
        pool = stats.pooled(dprune.method, members)
        if dprune.mode == "sparsity":
            counts, global_threshold = global_counts(
                [stats.tensors[name].scores[dprune.method] for name in members],
                target_count(pool.n, pool.nonfinite, dprune.sparsity),
                pool=pool,
            )
            global_count = dict(zip(members, counts, strict=True))
        else:
            global_threshold = pool.snap(dprune.threshold)
    return set(members), global_threshold, global_count


@dataclass(frozen=True)
class _Pruning:
    """What the plan's pruning does to one layer (before quantization)."""

    method: str = "none"
    scope: str = "layer"
    threshold: float | None = None
    count: int | None = None
    pruned: int = 0
    pruned_energy: float = 0.0
    structured: bool = False


def _from_index(
    index: Any, method: str, scope: str, threshold: float, count: int | None
) -> _Pruning:
    if count is None:
        pruned = index.count_below(threshold) * index.unit
        energy = index.energy_below(threshold)
    else:
        pruned = count * index.unit
        energy = energy_for_count(index, count)
    return _Pruning(method, scope, threshold, count, pruned, energy, method in STRUCTURED_METHODS)


def _global_member_pruning(
    ts: Any, cfg: Any, threshold: float | None, counts: dict[str, int]
) -> _Pruning:
    method = cfg.prune.method
    assert threshold is not None
    return _from_index(ts.scores[method], method, "global", threshold, counts.get(ts.layer.name))


def _layer_pruning(name: str, ts: Any, cfg: Any) -> _Pruning:
    prune = cfg.prune
    if cfg.skip or not prune.active:
        return _Pruning()
    method = prune.method
    if prune_method(method).semi_structured:
        shape = tuple(int(s) for s in ts.layer.shape)
        pruned = nm_pruned_count(shape, prune.n, prune.m)
        energy = _nm_pruned_energy(ts.scores["magnitude"], prune.n, prune.m, pruned)
        return _Pruning(method, pruned=pruned, pruned_energy=energy)
    if method in GRADIENT_METHODS and ts.grad is None:
        raise _gradient_error(name, method)
    index = ts.scores[method]
    count = None
    if prune.mode == "sparsity":
        count = target_count(index.n, index.nonfinite, prune.sparsity)
        threshold = index_threshold(index, count)
    else:
        threshold = index.snap(prune.threshold)
    assert threshold is not None
    return _from_index(index, method, "layer", threshold, count)


def _layer_row(
    layer: Any, ts: Any, cfg: Any, pr: _Pruning, kept: _KeptHistogram | None = None
) -> tuple[dict, TensorSpec | None]:
    """The preview row of one layer and the archive spec of its coded tensor (if coded).

    ``kept``: the layer's `_KeptHistogram` (same entropy, computed faster) if one is kept."""
    quant = cfg.quant
    numel = ts.numel
    shape = tuple(int(s) for s in layer.shape)
    nnz = numel - pr.pruned
    bits = quant.bits if (not cfg.skip and quant.active) else None
    symmetric = bool(quant.symmetric) if bits else False
    per_channel = bool(quant.per_channel) if bits else False
    group = quant.group_size if bits else None
    qnoise = 0.0
    if bits:
        step_sq = _mean_step_sq(ts, bits, symmetric, per_channel)
        qnoise = max(nnz - ts.nonfinite, 0) * step_sq / 12.0
    noise = pr.pruned_energy + qnoise
    spec = None
    if bits or pr.method != "none":
        spec = TensorSpec(
            str(layer.tensor),
            shape,
            nnz,
            bits=bits,
            symmetric=symmetric,
            per_channel=per_channel,
            structured=pr.structured and nnz < numel,
            dtype=ts.dtype,
            group_size=group,
        )
    # entropy bound of this tensor's payload
    itemsize = ST_DTYPES.get(ts.dtype, 4)
    if bits:
        mag = ts.scores["magnitude"]
        kept_t = pr.threshold if (pr.method == "magnitude" and pr.threshold is not None) else 0.0
        step = _entropy_step(ts, bits, symmetric, per_channel)
        if kept is None:
            kbins, kcounts = mag.kept_bins(kept_t)
            h_mag, p_nonzero = code_entropy(kbins, kcounts, step)
        else:
            h_mag, p_nonzero = kept.code_entropy(kept_t, step)
        value_bits = nnz * (h_mag + p_nonzero * _h2(ts.neg_fraction))
        n_params = n_quant_params(shape, per_channel=per_channel, group_size=group)
        side = quant_param_bytes(bits, n_params, symmetric=symmetric)
    else:
        value_bits = nnz * 8.0 * itemsize
        side = 0
    # a row mask is one binary symbol per output channel
    symbols = ts.rows if (pr.structured and ts.rows) else numel
    mask_bits = symbols * _h2(nnz / numel) if 0 < nnz < numel else 0.0
    entropy = math.ceil((value_bits + mask_bits) / 8.0) + side
    row = dict(
        name=layer.name,
        tensor=str(layer.tensor),
        method=pr.method,
        scope=pr.scope,
        threshold=pr.threshold,
        numel=numel,
        nnz=nnz,
        sparsity=pr.pruned / numel if numel else 0.0,
        bits=bits,
        symmetric=symmetric,
        per_channel=per_channel,
        dense_bytes=4 * numel,
        entropy_bytes=int(entropy),
        sqnr_db=_sqnr(ts.sumsq, noise),
        signal=ts.sumsq,
        noise=noise,
        skip=cfg.skip,
        count=pr.count,
    )
    return row, spec


def _layer_preview(row: dict, packed: int, coded: bool) -> LayerPreview:
    """The `LayerPreview` of a preview row whose tensor takes ``packed`` archive bytes
    (``coded``: quantized or pruned; else its entropy bound is its raw size)."""
    if not coded:
        row = {**row, "entropy_bytes": packed}
    return LayerPreview(packed_bytes=packed, **row)


def _assemble(
    stats: ModelStats,
    plan: CompressionPlan,
    partial: list[dict],
    coded: dict[str, TensorSpec],
    cache: PreviewCache | None = None,
) -> PlanPreview:
    """Archive bytes for every state tensor (coded or raw), then the totals. ``partial``'s
    rows are only read (a `PreviewCache` keeps them)."""
    specs = []
    raw_bytes = 0
    seen = set()
    for i, st in enumerate(stats.state):
        seen.add(st.name)
        spec = coded.get(st.name)
        if spec is None:
            if cache is None:
                spec = TensorSpec(st.name, st.shape, math.prod(st.shape), dtype=st.dtype)
            else:
                spec = cache._raw_specs[i]
            raw_bytes += math.prod(st.shape) * ST_DTYPES.get(st.dtype, 4)
        specs.append(spec)
    specs.extend(spec for name, spec in coded.items() if name not in seen)
    meta = archive_metadata(plan, source=stats.source, source_format=stats.format)
    archive = estimate_archive_bytes(specs, meta, parts=None if cache is None else cache._parts)

    layers = []
    for row in partial:
        tensor = row["tensor"]
        if tensor in archive.tensors:
            packed = archive.tensors[tensor]
        else:
            packed = row["numel"] * ST_DTYPES.get(stats.tensors[row["name"]].dtype, 4)
        if cache is None:
            layers.append(_layer_preview(row, int(packed), tensor in coded))
        else:
            layers.append(cache._layer_preview(row, int(packed), tensor in coded))

    total_numel = sum(lp.numel for lp in layers)
    total_nnz = sum(lp.nnz for lp in layers)
    dense = 4 * stats.total_params
    entropy_total = (
        sum(lp.entropy_bytes for lp in layers if lp.tensor in coded) + raw_bytes + archive.header
    )
    signal = sum(lp.signal for lp in layers)
    noise = sum(lp.noise for lp in layers)
    return PlanPreview(
        layers=tuple(layers),
        total_numel=total_numel,
        total_nnz=total_nnz,
        sparsity=1.0 - total_nnz / total_numel if total_numel else 0.0,
        dense_bytes=dense,
        packed_bytes=int(archive.total),
        entropy_bytes=int(entropy_total),
        compression_ratio=dense / archive.total if archive.total else math.inf,
        sqnr_db=_sqnr(signal, noise),
        header_bytes=int(archive.header),
    )
