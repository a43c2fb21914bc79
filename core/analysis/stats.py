"""Per-layer statistics: histograms, gradient statistics and the score indices behind live previews.

`analyze` walks every prunable tensor once and precomputes what the GUI shows (signed and
log10 histograms, min/max/mean/std, non-finite count, current sparsity) and, per pruning
criterion, a `ScoreIndex`: a cumulative structure over the tensor's non-negative importance
scores that turns "threshold -> sparsity" and "target sparsity -> threshold" into
``searchsorted`` lookups.

Score index
-----------
* Small tensors (at most `SMALL_MAX` scores) keep their finite scores sorted: exact counts at
  any threshold.
* Large tensors keep a radix histogram over the top 16 bits of the float32 bit pattern of the
  score. For non-negative floats the bit pattern is monotone in the value, so the boundaries
  between bins ("edges", floats whose low 16 bits are zero) split the scores exactly: the
  cumulative count at an edge is the exact number of scores below it. A threshold asked for by
  the user is snapped to the nearest edge (relative step at most 2**-7); the preview reports the
  snapped threshold and the engine applies that same value, so the count is exact.
* Every index (sorted ones too) also stores its bins with the same edges, so global pruning
  pools any set of tensors by adding bin counts.

The pruning rule is the engine's (`core.ops.pruning.threshold_mask`): a weight is pruned iff its
score is strictly below the threshold, and weights with a non-finite score (NaN/Inf) are pruned
by every threshold. `ScoreIndex.count_below` counts exactly that.

Scores (`score_tensor`, the single definition the engine uses too):

* ``magnitude``: ``|w|``.
* ``gradient_stability``: ``max(|mean g|, std g)`` over the recorded batches (see
  `core.recipe.plan.METHOD_HELP`): pruned when both the gradient mean and its spread are small.
* ``taylor``: ``|w| * sqrt(mean(g**2)) = |w| * hypot(mean g, std g)`` (population std).
* ``channel_l1`` / ``channel_l2``: the norm of each output channel (row of
  ``weight.reshape(shape[0], -1)``; for embeddings a row is one token's vector).

Why one module of this size: the score indices (sorted scores for small tensors, radix
histograms for large ones), the histograms and the gradient statistics are built in the same
passes over each tensor and must agree bin for bin with what core.analysis.estimate and core.analysis.selection
look up.

Why one module of this size: the histograms, the radix and sorted score indices, the batched
small-tensor path and `analyze` share private layouts (radix bins, `_cum`, `_sorted_index`) that
must stay bit-identical between the one-tensor and batched paths; splitting them would export
those internals.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from core.analysis.inventory import float_param_count, inventory
from core.base.errors import CompressionError, DataError, WorkbenchError
from core.base.memory import MappedPages
from core.base.methods import channel_rows, prune_methods
from core.base.methods import score_tensor as registry_score
from core.base.model import LayerInfo, LoadedModel, first_tensor
from core.base.progress import CancelToken, ProgressFn, no_progress, scaled
from core.io.data import Dataset
from core.io.hf import language_model, next_token_loss
from core.io.model_io import clone_model
from core.packed import SAFETENSORS_DTYPES
from core.recipe.plan import GRADIENT_METHODS, SCORE_ALIASES

#: Tensors with at most this many scores keep them sorted (exact counts at any threshold).
SMALL_MAX = 65536
#: Bins of the signed and log10 weight histograms shown by the GUI.
HIST_BINS = 128


def hist_bins(n: int) -> int:
    """Display bins of a tensor of ``n`` values: `HIST_BINS`, fewer for tiny tensors (a
    checkpoint of 10**5 4x4 tensors would otherwise hold 4 KiB of empty bins per tensor)."""
    return min(HIST_BINS, max(n, 8))


#: Radix bins of a non-negative float32: the top 16 bits with the sign bit clear.
RADIX_BINS = 32768
#: Edge index of +inf. Edges ``0 .. INF_EDGE`` are valid thresholds; bins ``>= INF_EDGE`` hold
#: +inf and NaN patterns, which never count as finite.
INF_EDGE = 0x7F80
#: Elements per chunk of the radix pass (int32 buffer of 4 MiB stays in cache).
_CHUNK = 1 << 20

#: Criteria with a score index (``nm`` and ``none`` need none).
SCORE_METHODS = tuple(
    m.name for m in prune_methods() if m.score is not None and m.score_alias is None
)

#: Float value of every valid edge (``edge index << 16`` read as float32), as float64.
EDGE_VALUES = (
    (np.arange(INF_EDGE + 1, dtype=np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)
)
#: Upper edge of every finite bin; the last finite bin ends at float32's largest value.
_BIN_HI = EDGE_VALUES[1:].copy()
_BIN_HI[-1] = float(np.finfo(np.float32).max)
_BIN_LO = EDGE_VALUES[:-1]
#: Arithmetic centre of every finite bin.
BIN_CENTERS = 0.5 * (_BIN_LO + _BIN_HI)


# ---------------------------------------------------------------------------------------
# value objects
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Histogram:
    """Bin ``i`` counts values in ``[edges[i], edges[i+1])`` (the last bin is closed)."""

    edges: np.ndarray
    counts: np.ndarray

    @property
    def total(self) -> int:
        return int(self.counts.sum())


_F32_MAX = float(np.finfo(np.float32).max)


def _f32(t: float) -> np.float32:
    """``t`` rounded to float32 (what a float32 score is compared with); huge values -> inf."""
    if abs(t) <= _F32_MAX or not math.isfinite(t):
        return np.float32(t)
    with np.errstate(over="ignore"):  # the common path skips the (slow) errstate context
        return np.float32(t)


def _between(a: float, b: float) -> float:
    """A float32 threshold ``t`` with ``a < t <= b`` (the midpoint when representable)."""
    mid = _f32((float(a) + float(b)) / 2.0)
    return float(mid) if float(mid) > float(a) else float(b)


@dataclass(frozen=True, eq=False)
class ScoreIndex:
    """Cumulative structure over the non-negative scores of one tensor.

    Attributes
    ----------
    n
        Number of scores: weights, or output channels for channel methods.
    unit
        Weights per score (the row length for channel methods, else 1).
    nonfinite
        Scores that are NaN or Inf; every threshold prunes them (as the engine does).
    nonfinite_energy
        Sum of squares of the finite weights behind those scores.
    bins, bin_cum, bin_energy
        Ascending indices of the non-empty finite radix bins; ``bin_cum[i]`` is the number of
        finite scores in bins before ``bins[i]`` (length ``len(bins) + 1``, last = all finite)
        and ``bin_energy[i]`` the sum of squares of their weights. The count at an edge ``e`` is
        ``bin_cum[searchsorted(bins, e)]``, exact.
    values, value_energy
        For exact (small) indices: the sorted finite scores (float32) and the cumulative sum of
        squares of their weights in that order (length ``len(values) + 1``); else ``None``.
    """

    n: int
    unit: int
    nonfinite: int
    nonfinite_energy: float
    bins: np.ndarray
    bin_cum: np.ndarray
    bin_energy: np.ndarray
    values: np.ndarray | None = None
    value_energy: np.ndarray | None = None

    @property
    def exact(self) -> bool:
        """True when counts are exact at any threshold (sorted scores), not only at edges."""
        return self.values is not None

    @property
    def finite(self) -> int:
        return int(self.bin_cum[-1])

    @property
    def bin_counts(self) -> np.ndarray:
        return np.diff(self.bin_cum)

    # -- thresholds ----------------------------------------------------------------------
    def snap(self, threshold: float) -> float:
        """The threshold the preview reports and the engine applies for a requested one.

        Exact indices keep it (as float32, which is what a float32 score is compared with);
        radix indices move it to the nearest bin edge, where their count is exact.
        """
        t = _f32(threshold)
        if math.isnan(t):
            raise ValueError("threshold must not be NaN")
        if t <= 0.0:
            return 0.0
        if self.exact:
            return float(t)
        return float(EDGE_VALUES[_nearest_edge(t)])

    def _finite_below(self, t: float) -> int:
        """Finite scores strictly below ``t`` (``t`` already snapped)."""
        if t <= 0.0:
            return 0
        if self.values is not None:
            return int(self.values.searchsorted(_f32(t), side="left"))
        e = _edge_index(t)
        return int(self.bin_cum[self.bins.searchsorted(e, side="left")])

    def count_below(self, threshold: float) -> int:
        """Number of scores the threshold prunes: finite scores ``< t`` plus non-finite ones.

        ``t`` is first snapped (`snap`): for exact indices this is the exact count at ``t``
        itself; for radix indices it is the exact count at the nearest edge, which is the
        threshold the preview reports and the engine applies.
        """
        return self.nonfinite + self._finite_below(self.snap(threshold))

    def energy_below(self, threshold: float) -> float:
        """Sum of squares of the weights the threshold prunes (finite weights only).

        Exact for sorted indices and for radix indices built with per-weight energies; for
        the magnitude radix index the within-bin energy assumes values spread uniformly over
        the bin (relative bin width <= 2**-7).
        """
        t = self.snap(threshold)
        if self.values is not None and self.value_energy is not None:
            e = float(self.value_energy[self._finite_below(t)])
        else:
            e = float(self.bin_energy[self.bins.searchsorted(_edge_index(t), side="left")])
        return e + self.nonfinite_energy

    def threshold_for_sparsity(self, sparsity: float) -> float:
        """A threshold whose pruned count is as close as possible to ``round(sparsity * n)``.

        Ties go to the smaller count. The count it really prunes is ``count_below(t)``.
        """
        if not 0.0 <= sparsity <= 1.0:
            raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
        return self.threshold_for_count(round(sparsity * self.n))

    def threshold_for_count(self, k: int) -> float:
        """A threshold pruning as close as possible to ``k`` scores (see `threshold_for_sparsity`)."""
        kf = k - self.nonfinite
        if kf <= 0 or self.finite == 0:
            return 0.0
        if self.values is not None:
            return _sorted_threshold(self.values, kf)
        j = int(self.bin_cum.searchsorted(kf, side="left"))
        if j >= len(self.bin_cum):
            j = len(self.bin_cum) - 1
        if j > 0 and (kf - self.bin_cum[j - 1]) <= (self.bin_cum[j] - kf):
            j -= 1
        edge = int(self.bins[j]) if j < len(self.bins) else int(self.bins[-1]) + 1
        return float(EDGE_VALUES[edge])

    # -- kept distribution (entropy estimates) ------------------------------------------
    def kept_bins(self, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """``(bins, counts)`` of the finite scores at or above the (snapped) threshold."""
        t = self.snap(threshold)
        below = self._finite_below(t)
        j = int(self.bin_cum.searchsorted(below, side="right")) - 1
        j = min(max(j, 0), len(self.bins))
        bins = self.bins[j:]
        counts = np.diff(self.bin_cum[j:]).astype(np.float64)
        if counts.size:
            counts[0] = float(self.bin_cum[j + 1] - below)
        return bins, counts

    # -- construction --------------------------------------------------------------------
    @classmethod
    def pooled(cls, members: Sequence[ScoreIndex]) -> ScoreIndex:
        """One index over the union of ``members``' scores (global pruning scope).

        Bin counts add up because every index uses the same edges; when every member is
        exact the pooled index is exact too (merged sorted scores).
        """
        if not members:
            raise ValueError("cannot pool zero indices")
        all_bins = np.concatenate([m.bins for m in members])
        all_counts = np.concatenate([np.diff(m.bin_cum) for m in members])
        all_energy = np.concatenate([np.diff(m.bin_energy) for m in members])
        bins, inv = np.unique(all_bins, return_inverse=True)
        counts = np.zeros(bins.size, dtype=np.int64)
        np.add.at(counts, inv, all_counts)
        energy = np.bincount(inv, weights=all_energy, minlength=bins.size)
        values = value_energy = None
        if all(m.values is not None for m in members):
            vals = np.concatenate([m.values for m in members])
            en = np.concatenate([np.diff(m.value_energy) for m in members])
            order = np.argsort(vals, kind="stable")
            values = vals[order]
            value_energy = _cum(en[order])
        return cls(
            n=sum(m.n for m in members),
            unit=1,
            nonfinite=sum(m.nonfinite for m in members),
            nonfinite_energy=sum(m.nonfinite_energy for m in members),
            bins=bins.astype(np.int32),
            bin_cum=_cum(counts),
            bin_energy=_cum(energy),
            values=values,
            value_energy=value_energy,
        )


def _cum(x: np.ndarray) -> np.ndarray:
    out = np.zeros(x.size + 1, dtype=np.int64 if x.dtype.kind in "iu" else np.float64)
    np.cumsum(x, out=out[1:])
    return out


def _edge_index(t: float) -> int:
    """Largest edge index ``<= t`` for ``t > 0`` (float32); ``INF_EDGE`` for +inf."""
    p = int(_f32(t).view(np.uint32))
    return min(p >> 16, INF_EDGE)


def _nearest_edge(t: np.float32) -> int:
    lo = _edge_index(float(t))
    if lo >= INF_EDGE or float(EDGE_VALUES[lo]) == float(t):
        return lo
    hi = lo + 1
    return hi if (EDGE_VALUES[hi] - t) < (t - EDGE_VALUES[lo]) else lo


def _sorted_threshold(values: np.ndarray, k: int) -> float:
    """Threshold over sorted finite ``values`` pruning as close as possible to ``k`` of them."""
    m = values.size
    if k >= m:
        return float(np.nextafter(values[-1], np.float32(np.inf)))
    v = values[k]
    lo = int(values.searchsorted(v, side="left"))
    hi = int(values.searchsorted(v, side="right"))
    if k - lo <= hi - k:
        return 0.0 if lo == 0 else _between(values[lo - 1], v)
    return _between(v, values[hi]) if hi < m else float(np.nextafter(v, np.float32(np.inf)))


@dataclass(frozen=True)
class GradientStats:
    """Per-weight gradient statistics over ``batches`` mini-batches.

    ``mean`` and ``std`` (float32, the weight's shape) are the running mean and population
    standard deviation (ddof=0) of the gradient of each batch's mean cross-entropy loss.
    """

    mean: torch.Tensor
    std: torch.Tensor
    batches: int
    hist_mean: Histogram
    hist_std: Histogram


@dataclass(frozen=True)
class TensorStats:
    """Statistics of one prunable tensor (over its finite values unless said otherwise).

    ``sparsity`` is the fraction of exact zeros now; ``std`` is the population std.
    ``row_min``/``row_max`` are per output channel (rows of ``reshape(shape[0], -1)``);
    ``sumsq`` the sum of squares (the signal energy of SQNR estimates); ``neg_fraction`` the
    fraction of finite values with the sign bit set (the sign's share of the code entropy); ``mean_absmax_sq`` and
    ``mean_range_sq`` the channel means of ``max(|row_min|, |row_max|)**2`` and of
    ``(max(row_max, 0) - min(row_min, 0))**2`` (per-channel quantization noise estimates), and
    ``log_absmax``/``log_range`` the channel means of their natural logs over non-zero channels
    (geometric-mean steps for the entropy estimate).
    """

    layer: LayerInfo
    numel: int
    min: float
    max: float
    mean: float
    std: float
    nonfinite: int
    zeros: int
    sparsity: float
    hist: Histogram
    hist_log: Histogram
    scores: Mapping[str, ScoreIndex]
    grad: GradientStats | None
    row_min: np.ndarray
    row_max: np.ndarray
    sumsq: float
    neg_fraction: float
    mean_absmax_sq: float
    mean_range_sq: float
    log_absmax: float = 0.0
    log_range: float = 0.0
    dtype: str = "F32"

    @property
    def absmax_per_channel(self) -> np.ndarray:
        return np.maximum(np.abs(self.row_min), np.abs(self.row_max))

    @property
    def rows(self) -> int:
        return int(self.row_min.size)

    @property
    def row_len(self) -> int:
        return self.numel // self.rows if self.rows else 0


@dataclass(frozen=True)
class StateTensor:
    """One entry of the model's state dict, as the packed archive will store it."""

    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class ModelStats:
    """Everything `analyze` found; input of `core.analysis.estimate.preview` and the engine.

    ``tensors`` holds the prunable layers by layer name; ``layers`` every inventory row.
    ``total_params`` counts floating-point parameters. ``state`` lists every state-dict tensor
    (parameters and buffers) for the archive size model; ``source``/``format`` are the model's.
    """

    layers: tuple[LayerInfo, ...]
    tensors: Mapping[str, TensorStats]
    has_gradients: bool
    total_params: int
    state: tuple[StateTensor, ...] = ()
    source: str = ""
    format: str = ""
    grad_batches: int = 0
    _pools: dict = field(default_factory=dict, compare=False, repr=False)

    def pooled(self, method: str, layer_names: Sequence[str]) -> ScoreIndex:
        """The pooled `ScoreIndex` of ``method`` over ``layer_names`` (built once, then cached)."""
        key = (method, tuple(layer_names))
        index = self._pools.get(key)
        if index is None:
            index = ScoreIndex.pooled([self.tensors[n].scores[method] for n in layer_names])
            self._pools[key] = index
        return index


# ---------------------------------------------------------------------------------------
# scores
# ---------------------------------------------------------------------------------------
def score_tensor(method: str, weight: torch.Tensor, grad: GradientStats | None) -> torch.Tensor:
    """The importance score of ``method`` (the method registry's score function)."""
    return registry_score(method, weight, grad)


# ---------------------------------------------------------------------------------------
# radix pass
# ---------------------------------------------------------------------------------------
def radix_counts(
    values: torch.Tensor, energy_of: torch.Tensor | None = None
) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Signed 65536-bin radix histogram of a float32 tensor's top 16 bits (one pass).

    Returns ``(counts, energy, zeros)``: ``counts[i]`` for ``i < 32768`` counts negative
    values of magnitude bin ``i``, ``counts[32768 + i]`` non-negative ones; ``energy`` (when
    ``energy_of`` is given, one entry per value) sums ``energy_of**2`` over the same bins
    (non-finite squares count 0); ``zeros`` is the exact number of zeros (+0.0 and -0.0).

    ``(pattern >> 16) + 32768`` maps negative floats to ``0..32767`` (their magnitude bin)
    and non-negative ones to ``32768..65535``: the arithmetic shift does the sign handling.
    The work goes chunk by chunk through a cache-sized buffer. (Splitting the serial
    ``bincount`` over Python threads was measured slower inside `analyze`: the threads compete
    with torch's spinning pool threads.)
    """
    flat = values.detach().reshape(-1)
    if flat.dtype != torch.float32:
        flat = flat.to(torch.float32)
    flat = flat.contiguous()
    bits = flat.view(torch.int32)
    src = energy_of.detach().reshape(-1) if energy_of is not None else None
    n = flat.numel()
    counts = np.zeros(2 * RADIX_BINS, dtype=np.int64)
    esum = np.zeros(2 * RADIX_BINS, dtype=np.float64) if src is not None else None
    zeros = 0
    buf = torch.empty(min(_CHUNK, max(n, 1)), dtype=torch.int32)
    for s in range(0, n, _CHUNK):
        e = min(s + _CHUNK, n)
        b = buf[: e - s]
        torch.bitwise_right_shift(bits[s:e], 16, out=b)
        b.add_(RADIX_BINS)
        chunk = torch.bincount(b, minlength=2 * RADIX_BINS).numpy()
        counts += chunk
        # Exact zeros live in the two magnitude-0 bins (with denormals below 2**-133);
        # count them only in the chunks where those bins are not empty.
        if chunk[0] or chunk[RADIX_BINS]:
            zeros += (e - s) - int(torch.count_nonzero(flat[s:e]))
        if esum is not None and src is not None:
            w = torch.nan_to_num_(src[s:e].to(torch.float64).square_(), nan=0.0, posinf=0.0)
            esum += torch.bincount(b, weights=w, minlength=2 * RADIX_BINS).numpy()
    return counts, esum, zeros


def _fold(signed: np.ndarray) -> np.ndarray:
    return signed[:RADIX_BINS] + signed[RADIX_BINS:]


def _index_from_radix(
    n: int, unit: int, mag_counts: np.ndarray, mag_energy: np.ndarray
) -> ScoreIndex:
    finite_counts = mag_counts[:INF_EDGE]
    bins = np.flatnonzero(finite_counts).astype(np.int32)
    return ScoreIndex(
        n=n,
        unit=unit,
        nonfinite=int(mag_counts[INF_EDGE:].sum()),
        nonfinite_energy=float(mag_energy[INF_EDGE:].sum()),
        bins=bins,
        bin_cum=_cum(finite_counts[bins].astype(np.int64)),
        bin_energy=_cum(mag_energy[bins].astype(np.float64)),
    )


def _uniform_bin_energy(counts: np.ndarray) -> np.ndarray:
    """Sum of squares per magnitude bin assuming values spread uniformly over the bin."""
    energy = np.zeros(counts.size, dtype=np.float64)
    lo, hi = _BIN_LO, _BIN_HI
    energy[:INF_EDGE] = counts[:INF_EDGE] * (lo * lo + lo * hi + hi * hi) / 3.0
    return energy


def build_index(scores: torch.Tensor, energy_of: torch.Tensor, unit: int = 1) -> ScoreIndex:
    """`ScoreIndex` of non-negative ``scores``; ``energy_of**2`` is each score's weight energy.

    ``energy_of`` has one entry per score: the weight itself for per-weight scores, the row's
    L2 norm (over finite values) for channel scores. Non-finite squares count as 0.
    """
    s = scores.detach().reshape(-1).to(torch.float32)
    n = s.numel()
    if n > SMALL_MAX:
        counts, esum, _ = radix_counts(s, energy_of)
        assert esum is not None
        return _index_from_radix(n, unit, _fold(counts), _fold(esum))
    e = energy_of.detach().reshape(-1).to(torch.float64).numpy()
    return _sorted_index(s.numpy(), e * e, unit)


def _sorted_index(s: np.ndarray, en: np.ndarray, unit: int) -> ScoreIndex:
    """Exact index of float32 scores ``s`` with per-score energies ``en`` (numpy throughout:
    a model may have 10**5 tiny tensors, where torch's per-call overhead dominates)."""
    n = s.size
    fin = np.isfinite(s)
    all_finite = bool(fin.all())
    en = np.where(np.isfinite(en), en, 0.0)
    nonfinite_energy = 0.0 if all_finite else float(en[~fin].sum())
    if not all_finite:
        s, en = s[fin], en[fin]
    order = np.argsort(s, kind="stable")
    vals = s[order]
    ven = en[order]
    # sorted non-negative floats: the bin numbers (top 16 bits) are non-decreasing too
    vbins = (vals.view(np.uint32) >> np.uint32(16)) & np.uint32(0x7FFF)
    if vals.size:
        starts = np.concatenate(([0], np.flatnonzero(vbins[1:] != vbins[:-1]) + 1))
        counts = np.diff(np.append(starts, vals.size)).astype(np.int64)
        benergy = np.add.reduceat(ven, starts)
        bins = vbins[starts]
    else:
        counts = np.zeros(0, dtype=np.int64)
        benergy = np.zeros(0)
        bins = vbins
    return ScoreIndex(
        n=n,
        unit=unit,
        nonfinite=int(n - vals.size),
        nonfinite_energy=nonfinite_energy,
        bins=bins.astype(np.int32),
        bin_cum=_cum(counts),
        bin_energy=_cum(benergy),
        values=vals,
        value_energy=_cum(ven),
    )


# ---------------------------------------------------------------------------------------
# histograms
# ---------------------------------------------------------------------------------------
def _range(lo: float, hi: float) -> tuple[float, float]:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return 0.0, 1.0
    if hi > lo:
        return lo, hi
    pad = max(abs(lo) * 1e-3, 1e-12)
    return lo - pad, hi + pad


def histogram(values: torch.Tensor, bins: int = HIST_BINS) -> Histogram:
    """Histogram of the finite entries of ``values`` over their own ``[min, max]``."""
    v = values.detach().reshape(-1).to(torch.float32)
    v = v[torch.isfinite(v)]
    if v.numel() == 0:
        return Histogram(np.linspace(0.0, 1.0, bins + 1), np.zeros(bins, dtype=np.int64))
    lo, hi = _range(float(v.min()), float(v.max()))
    counts = torch.histc(v, bins=bins, min=lo, max=hi).to(torch.int64).numpy()
    return Histogram(np.linspace(lo, hi, bins + 1), counts)


def _hist_from_points(
    points: np.ndarray, weights: np.ndarray, lo: float, hi: float, bins: int
) -> Histogram:
    lo, hi = _range(lo, hi)
    idx = np.floor((points - lo) / (hi - lo) * bins)
    idx = np.clip(np.nan_to_num(idx, nan=0.0), 0, bins - 1).astype(np.int64)
    counts = np.bincount(idx, weights=weights, minlength=bins)
    return Histogram(np.linspace(lo, hi, bins + 1), np.rint(counts).astype(np.int64))


def _radix_histograms(
    signed: np.ndarray, lo: float, hi: float, zeros: int, bins: int = HIST_BINS
) -> tuple[Histogram, Histogram]:
    """Signed and log10|w| histograms from radix counts: each radix bin (relative width
    <= 2**-7) goes to the display bin holding its centre, so every finite value is counted."""
    neg = signed[:INF_EDGE].astype(np.float64)
    pos = signed[RADIX_BINS : RADIX_BINS + INF_EDGE].astype(np.float64)
    nz_neg, nz_pos = np.flatnonzero(neg), np.flatnonzero(pos)
    points = np.concatenate([-BIN_CENTERS[nz_neg], BIN_CENTERS[nz_pos]])
    weights = np.concatenate([neg[nz_neg], pos[nz_pos]])
    hist = _hist_from_points(points, weights, lo, hi, bins)
    mag = neg + pos
    mag[0] -= zeros  # bin 0 holds the exact zeros (and denormals below 2**-133)
    nz = np.flatnonzero(mag > 0)
    if nz.size == 0:
        return hist, Histogram(np.linspace(0.0, 1.0, bins + 1), np.zeros(bins, dtype=np.int64))
    logs = np.log10(np.maximum(BIN_CENTERS[nz], np.finfo(np.float32).tiny))
    top = math.log10(max(abs(lo), abs(hi))) if max(abs(lo), abs(hi)) > 0 else float(logs.max())
    log_lo = math.log10(max(float(_BIN_LO[nz[0]]), float(np.finfo(np.float32).tiny)))
    return hist, _hist_from_points(logs, mag[nz], log_lo, top, bins)


# ---------------------------------------------------------------------------------------
# one tensor
# ---------------------------------------------------------------------------------------
def _tensor_stats(
    layer: LayerInfo, weight: torch.Tensor, grad: GradientStats | None, dtype: str
) -> TensorStats:
    w = weight.detach()
    if w.dtype != torch.float32:
        w = w.to(torch.float32)
    w = w.contiguous()
    flat = w.reshape(-1)
    n = flat.numel()
    rows2d = channel_rows(w)
    if n > SMALL_MAX:
        signed, _, zeros = radix_counts(flat)
        mag = _fold(signed)
        nonfinite = int(mag[INF_EDGE:].sum())
        negatives = int(signed[:INF_EDGE].sum())
    else:
        # small tensors skip the 65536-bin radix pass: counted directly in numpy
        a = flat.numpy()
        finite_np = np.isfinite(a)
        nonfinite = n - int(np.count_nonzero(finite_np))
        zeros = n - int(np.count_nonzero(a))
        negatives = int(np.count_nonzero(np.signbit(a) & finite_np))
        if not nonfinite and rows2d.numel():
            return _small_tensor_stats(layer, w, a, grad, dtype, zeros, negatives)

    l1 = score_tensor("channel_l1", w, None)
    l2 = score_tensor("channel_l2", w, None)
    fin, row_sq, row_min, row_max = _finite_rows(w, flat, rows2d, l2, nonfinite)
    nfin = fin.numel()
    sumsq = float(row_sq.sum())
    lo, hi, mean, std = _moments(fin, row_min, row_max, sumsq, nonfinite)

    if n <= SMALL_MAX:
        hist = histogram(fin, hist_bins(n))
        nonzero = fin[fin != 0]
        hist_log = histogram(torch.log10(nonzero.abs()), hist_bins(n))
    else:
        hist, hist_log = _radix_histograms(signed, lo, hi, zeros)
    neg_fraction = negatives / nfin if nfin else 0.5

    # Scores: magnitude via the radix counts already made (large) or sorted |w| (small).
    if n > SMALL_MAX:
        energy = _uniform_bin_energy(mag)
        if zeros and mag[0]:
            # exact zeros (in bin 0) carry no energy
            energy[0] *= (mag[0] - zeros) / mag[0]
        magnitude = _index_from_radix(n, 1, mag, energy)
    else:
        absw = flat.abs()
        magnitude = build_index(absw, absw)
    scores: dict[str, ScoreIndex] = {"magnitude": magnitude}
    unit = n // rows2d.shape[0] if rows2d.shape[0] else 1
    scores["channel_l2"] = build_index(l2, row_sq.sqrt(), unit)
    scores["channel_l1"] = build_index(l1, row_sq.sqrt(), unit)
    if grad is not None:
        for method in GRADIENT_METHODS:
            scores[method] = build_index(score_tensor(method, w, grad), flat)
    return _make_stats(
        layer,
        n,
        (lo, hi, mean, std),
        nonfinite,
        zeros,
        (hist, hist_log),
        scores,
        grad,
        row_min.to(torch.float64).numpy(),
        row_max.to(torch.float64).numpy(),
        sumsq,
        neg_fraction,
        dtype,
    )


def _finite_rows(
    w: torch.Tensor, flat: torch.Tensor, rows2d: torch.Tensor, l2: torch.Tensor, nonfinite: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(finite values, per-row sum of squares, row min, row max)`` over the finite values
    (rows without any are 0)."""
    if not nonfinite:
        row_sq = l2.to(torch.float64).square()
        if rows2d.numel():
            # amin and amax separately: the fused aminmax(dim=1) is much slower on CPU.
            return flat, row_sq, rows2d.amin(dim=1), rows2d.amax(dim=1)
        zeros = torch.zeros(rows2d.shape[0])
        return flat, row_sq, zeros, zeros
    finite_mask = torch.isfinite(flat)
    fin = flat[finite_mask]
    clean2d = channel_rows(torch.where(finite_mask, flat, torch.zeros_like(flat)).reshape(w.shape))
    row_sq = torch.linalg.vector_norm(clean2d, 2, dim=1).to(torch.float64).square()
    big = torch.finfo(torch.float32).max
    fmask2d = channel_rows(finite_mask.reshape(w.shape))
    row_min = torch.where(fmask2d, rows2d, torch.full_like(rows2d, big)).amin(dim=1)
    row_max = torch.where(fmask2d, rows2d, torch.full_like(rows2d, -big)).amax(dim=1)
    empty_rows = ~fmask2d.any(dim=1)
    row_min = torch.where(empty_rows, torch.zeros_like(row_min), row_min)
    row_max = torch.where(empty_rows, torch.zeros_like(row_max), row_max)
    return fin, row_sq, row_min, row_max


def _moments(
    fin: torch.Tensor, row_min: torch.Tensor, row_max: torch.Tensor, sumsq: float, nonfinite: int
) -> tuple[float, float, float, float]:
    """``(min, max, mean, population std)`` of the finite values ``fin``."""
    nfin = fin.numel()
    if not nfin:
        return 0.0, 0.0, 0.0, 0.0
    if nonfinite:
        lo, hi = (float(v) for v in torch.aminmax(fin))
    else:
        lo, hi = float(row_min.min()), float(row_max.max())
    mean = float(fin.sum()) / nfin
    var = sumsq / nfin - mean * mean
    if var <= 1e-6 * mean * mean:  # cancellation: recompute directly
        var = float(torch.var(fin.to(torch.float64), correction=0))
    return lo, hi, mean, math.sqrt(max(var, 0.0))


def _make_stats(
    layer: LayerInfo,
    n: int,
    moments: tuple[float, float, float, float],
    nonfinite: int,
    zeros: int,
    hists: tuple[Histogram, Histogram],
    scores: dict[str, ScoreIndex],
    grad: GradientStats | None,
    rmin: np.ndarray,
    rmax: np.ndarray,
    sumsq: float,
    neg_fraction: float,
    dtype: str,
    derived: tuple[float, float, float, float] | None = None,
) -> TensorStats:
    """``derived``: `_channel_figures` when the caller has them (batched analysis)."""
    lo, hi, mean, std = moments
    hist, hist_log = hists
    # methods that threshold the same score share its index (no second build)
    scores.update({m: scores[a] for m, a in SCORE_ALIASES.items() if a in scores})
    absmax_sq, range_sq, log_absmax, log_range = derived or _channel_figures(rmin, rmax)
    return TensorStats(
        layer=layer,
        numel=n,
        min=lo,
        max=hi,
        mean=mean,
        std=std,
        nonfinite=nonfinite,
        zeros=zeros,
        sparsity=zeros / n if n else 0.0,
        hist=hist,
        hist_log=hist_log,
        scores=scores,
        grad=grad,
        row_min=rmin,
        row_max=rmax,
        sumsq=sumsq,
        neg_fraction=neg_fraction,
        mean_absmax_sq=absmax_sq,
        mean_range_sq=range_sq,
        log_absmax=log_absmax,
        log_range=log_range,
        dtype=dtype,
    )


def _channel_figures(rmin: np.ndarray, rmax: np.ndarray) -> tuple[float, float, float, float]:
    """Mean squared channel absmax and range, and the mean logs of both (non-zero channels)."""
    absmax = np.maximum(np.abs(rmin), np.abs(rmax))
    span = np.maximum(rmax, 0.0) - np.minimum(rmin, 0.0)
    return (
        float(np.mean(absmax * absmax)) if absmax.size else 0.0,
        float(np.mean(span * span)) if span.size else 0.0,
        _mean_log(absmax),
        _mean_log(span),
    )


def _channel_figures_rows(rmin: np.ndarray, rmax: np.ndarray) -> list[tuple[float, ...] | None]:
    """`_channel_figures` of each row of ``(B, rows)`` extremes, equal to it row by row
    (per-row reductions along the contiguous axis sum the same way); rows with a zero or
    non-finite channel (whose logs skip entries) come back ``None``."""
    absmax = np.maximum(np.abs(rmin), np.abs(rmax))
    span = np.maximum(rmax, 0.0) - np.minimum(rmin, 0.0)
    a2 = np.mean(absmax * absmax, axis=1)
    s2 = np.mean(span * span, axis=1)
    clean = (np.isfinite(absmax) & (absmax > 0) & np.isfinite(span) & (span > 0)).all(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        la = np.log(absmax).mean(axis=1)
        ls = np.log(span).mean(axis=1)
    return [
        (float(a2[r]), float(s2[r]), float(la[r]), float(ls[r])) if clean[r] else None
        for r in range(absmax.shape[0])
    ]


def _np_histogram(v: np.ndarray, bins: int = HIST_BINS) -> Histogram:
    """`histogram` of finite numpy values (no torch call: cheap for tiny tensors)."""
    if v.size == 0:
        return Histogram(np.linspace(0.0, 1.0, bins + 1), np.zeros(bins, dtype=np.int64))
    lo, hi = _range(float(v.min()), float(v.max()))
    idx = ((v.astype(np.float64) - lo) * (bins / (hi - lo))).astype(np.int64)
    np.clip(idx, 0, bins - 1, out=idx)
    return Histogram(np.linspace(lo, hi, bins + 1), np.bincount(idx, minlength=bins))


def _small_tensor_stats(
    layer: LayerInfo,
    w: torch.Tensor,
    a: np.ndarray,
    grad: GradientStats | None,
    dtype: str,
    zeros: int,
    negatives: int,
) -> TensorStats:
    """`_tensor_stats` of a small, all-finite, non-empty float32 tensor, mostly in numpy.

    A checkpoint may hold 10**5 tiny tensors; per-call overhead, not arithmetic, is the cost.
    Channel scores still come from `score_tensor` (the engine's own definition), so threshold
    counts stay exact.
    """
    n = a.size
    rows = channel_rows(w).shape[0]
    r2 = a.reshape(rows, n // rows)
    l1 = score_tensor("channel_l1", w, None).numpy()
    l2 = score_tensor("channel_l2", w, None).numpy().astype(np.float64)
    row_sq = l2 * l2
    row_min, row_max = r2.min(axis=1), r2.max(axis=1)
    lo, hi = float(row_min.min()), float(row_max.max())
    mean = float(a.sum(dtype=np.float64)) / n
    sumsq = float(row_sq.sum())
    var = sumsq / n - mean * mean
    if var <= 1e-6 * mean * mean:  # cancellation: recompute directly
        var = float(np.var(a, dtype=np.float64))
    nonzero = a[a != 0] if zeros else a
    bins = hist_bins(n)
    hists = (_np_histogram(a, bins), _np_histogram(np.log10(np.abs(nonzero)), bins))
    a64 = a.astype(np.float64)
    unit = n // rows
    scores: dict[str, ScoreIndex] = {
        "magnitude": _sorted_index(np.abs(a), a64 * a64, 1),
        "channel_l2": _sorted_index(l2.astype(np.float32), row_sq, unit),
        "channel_l1": _sorted_index(l1, row_sq, unit),
    }
    if grad is not None:
        flat = w.reshape(-1)
        for method in GRADIENT_METHODS:
            scores[method] = build_index(score_tensor(method, w, grad), flat)
    return _make_stats(
        layer,
        n,
        (lo, hi, mean, math.sqrt(max(var, 0.0))),
        0,
        zeros,
        hists,
        scores,
        grad,
        row_min.astype(np.float64),
        row_max.astype(np.float64),
        sumsq,
        negatives / n,
        dtype,
    )


#: Tensors up to this many elements are analysed together, one numpy pass per group of the
#: same shape (checkpoints with 10**5-10**6 tiny tensors: per-call overhead is the cost).
BATCH_MAX = 4096
#: Smallest group worth stacking.
BATCH_MIN = 8


def _sorted_indices(s: np.ndarray, en: np.ndarray, unit: int) -> list[ScoreIndex]:
    """`_sorted_index` of every row of the finite ``(B, m)`` scores ``s`` (float32) with
    energies ``en`` (float64), equal to calling it row by row."""
    b, m = s.shape
    order = np.argsort(s, axis=1, kind="stable")
    vals = np.take_along_axis(s, order, axis=1)
    ven = np.take_along_axis(en, order, axis=1)
    vcum = np.zeros((b, m + 1), dtype=np.float64)
    np.cumsum(ven, axis=1, out=vcum[:, 1:])
    flat_bins = ((vals.view(np.uint32) >> np.uint32(16)) & np.uint32(0x7FFF)).reshape(-1)
    edge = np.ones(b * m, dtype=bool)
    edge[1:] = flat_bins[1:] != flat_bins[:-1]
    edge[::m] = True
    starts = np.flatnonzero(edge)
    counts = np.diff(np.append(starts, b * m)).astype(np.int64)
    benergy = np.add.reduceat(ven.reshape(-1), starts)
    bins = flat_bins[starts].astype(np.int32)
    cuts = starts.searchsorted(np.arange(b + 1) * m)
    lens = np.diff(cuts)
    # each row's bins laid out left-aligned in a zero-padded (B, widest + 1) table: a
    # cumulative sum along axis 1 is then, per row, the sequential sum `_cum` makes alone
    width = int(lens.max())
    col = np.arange(starts.size) - np.repeat(cuts[:-1], lens)
    row = np.repeat(np.arange(b), lens)
    ctab = np.zeros((b, width + 1), dtype=np.int64)
    etab = np.zeros((b, width + 1), dtype=np.float64)
    ctab[row, col + 1] = counts
    etab[row, col + 1] = benergy
    np.cumsum(ctab, axis=1, out=ctab)
    np.cumsum(etab, axis=1, out=etab)
    return [
        ScoreIndex(
            n=m,
            unit=unit,
            nonfinite=0,
            nonfinite_energy=0.0,
            bins=bins[cuts[r] : cuts[r + 1]],
            bin_cum=ctab[r, : lens[r] + 1],
            bin_energy=etab[r, : lens[r] + 1],
            values=vals[r],
            value_energy=vcum[r],
        )
        for r in range(b)
    ]


def _range_rows(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`_range` of finite row extremes, element by element."""
    flat = hi <= lo
    pad = np.maximum(np.abs(lo) * 1e-3, 1e-12)
    return np.where(flat, lo - pad, lo), np.where(flat, hi + pad, hi)


def _hist_rows(v: np.ndarray, valid: np.ndarray | None, bins: int = HIST_BINS) -> list[Histogram]:
    """`_np_histogram` of each row of ``v`` (restricted to ``valid`` where given)."""
    b, m = v.shape
    if valid is None:
        lo, hi = v.min(axis=1), v.max(axis=1)
        has = np.ones(b, dtype=bool)
    else:
        lo = np.where(valid, v, np.inf).min(axis=1)
        hi = np.where(valid, v, -np.inf).max(axis=1)
        has = valid.any(axis=1)
        lo, hi = np.where(has, lo, 0.0), np.where(has, hi, 1.0)
    lo, hi = _range_rows(lo.astype(np.float64), hi.astype(np.float64))
    factor = bins / (hi - lo)
    with np.errstate(invalid="ignore"):  # -inf logs of zeros: not ``valid``, dropped below
        idx = ((v.astype(np.float64) - lo[:, None]) * factor[:, None]).astype(np.int64)
    np.clip(idx, 0, bins - 1, out=idx)
    idx += (np.arange(b, dtype=np.int64) * bins)[:, None]
    sel = idx.reshape(-1) if valid is None else idx[valid]
    counts = np.bincount(sel, minlength=b * bins).reshape(b, bins)
    edges = np.linspace(lo, hi, bins + 1, axis=1)
    empty_edges = np.linspace(0.0, 1.0, bins + 1)
    return [
        Histogram(edges[r], counts[r]) if has[r] else Histogram(empty_edges, counts[r])
        for r in range(b)
    ]


def _batch_small_stats(
    layers: Sequence[LayerInfo], ws: Sequence[torch.Tensor], dtypes: Sequence[str]
) -> list[TensorStats | None]:
    """`_tensor_stats` of same-shape small tensors without gradients, stacked: equal to the
    one-by-one results. Rows holding NaN/Inf come back as ``None`` (done one by one)."""
    shape = tuple(ws[0].shape)
    stacked = torch.stack([w.detach() for w in ws]).to(torch.float32)
    b = stacked.shape[0]
    n = math.prod(shape)
    rows = channel_rows(ws[0]).shape[0]
    unit = n // rows if rows else 1
    a = stacked.reshape(b, n).numpy()
    finite = np.isfinite(a).all(axis=1)
    out: list[TensorStats | None] = [None] * b
    keep = np.flatnonzero(finite)
    if keep.size == 0 or n == 0 or rows == 0:
        return out
    if keep.size < b:
        a = a[keep]
        stacked = stacked[torch.from_numpy(keep)]
    r3 = stacked.reshape(a.shape[0], rows, unit)
    # the channel scores exactly as the registry computes them (abs + sum, vector_norm)
    l1 = torch.abs(r3).sum(dim=2).numpy()
    l2 = torch.linalg.vector_norm(r3, 2, dim=2).numpy()
    ok = np.isfinite(l1).all(axis=1) & np.isfinite(l2).all(axis=1)
    if not ok.all():  # norms that overflow float32: one by one
        keep, a, l1, l2 = keep[ok], a[ok], l1[ok], l2[ok]
        if keep.size == 0:
            return out
    k = a.shape[0]
    l2_64 = l2.astype(np.float64)
    row_sq = l2_64 * l2_64
    a3 = a.reshape(k, rows, unit)
    row_min, row_max = a3.min(axis=2), a3.max(axis=2)
    zeros = n - np.count_nonzero(a, axis=1)
    negatives = np.count_nonzero(np.signbit(a), axis=1)
    mean = a.sum(axis=1, dtype=np.float64) / n
    sumsq = row_sq.sum(axis=1)
    var = sumsq / n - mean * mean
    with np.errstate(divide="ignore"):
        logs = np.log10(np.abs(a))
    hists = _hist_rows(a, None, hist_bins(n))
    hists_log = _hist_rows(logs, a != 0, hist_bins(n))
    a64 = a.astype(np.float64)
    mags = _sorted_indices(np.abs(a), a64 * a64, 1)
    l2s = _sorted_indices(l2, row_sq, unit)
    l1s = _sorted_indices(l1, row_sq, unit)
    rmin64, rmax64 = row_min.astype(np.float64), row_max.astype(np.float64)
    figures = _channel_figures_rows(rmin64, rmax64)
    for j, i in enumerate(keep):
        v = float(var[j])
        m = float(mean[j])
        if v <= 1e-6 * m * m:  # cancellation: recompute directly
            v = float(np.var(a[j], dtype=np.float64))
        scores = {"magnitude": mags[j], "channel_l2": l2s[j], "channel_l1": l1s[j]}
        out[i] = _make_stats(
            layers[i],
            n,
            (float(rmin64[j].min()), float(rmax64[j].max()), m, math.sqrt(max(v, 0.0))),
            0,
            int(zeros[j]),
            (hists[j], hists_log[j]),
            scores,
            None,
            rmin64[j],
            rmax64[j],
            float(sumsq[j]),
            int(negatives[j]) / n,
            dtypes[i],
            figures[j],  # type: ignore[arg-type]
        )
    return out


def _all_tensor_stats(
    layers: Sequence[LayerInfo],
    named: Mapping[str, torch.Tensor],
    grads: Mapping[str, GradientStats],
    dtypes: Mapping[str, str],
    *,
    source: object,
    progress: ProgressFn,
    cancel: CancelToken | None,
) -> dict[str, TensorStats]:
    """`_tensor_stats` of every layer in ``layers``; small same-shape tensors without gradient
    statistics go through `_batch_small_stats` in groups."""
    for layer in layers:
        assert layer.tensor is not None
        if layer.tensor not in named:
            raise WorkbenchError(
                f"layer {layer.name!r}: tensor {layer.tensor!r} is not in the model",
                path=source,
            )
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, layer in enumerate(layers):
        w = named[layer.tensor]  # type: ignore[index]
        if (
            layer.tensor not in grads
            and 0 < w.numel() <= BATCH_MAX
            and w.dtype in (torch.float16, torch.bfloat16, torch.float32)
        ):
            groups.setdefault(tuple(w.shape), []).append(i)
    done: dict[int, TensorStats] = {}
    total = max(len(layers), 1)
    for idx in groups.values():
        if len(idx) < BATCH_MIN:
            continue
        step = max(BATCH_MIN, (1 << 18) // max(named[layers[idx[0]].tensor].numel(), 1))  # type: ignore[index]
        for s in range(0, len(idx), step):
            if cancel is not None:
                cancel.check()
            part = idx[s : s + step]
            progress(len(done) / total, f"statistics of {layers[part[0]].name} and others")
            got = _batch_small_stats(
                [layers[i] for i in part],
                [named[layers[i].tensor] for i in part],  # type: ignore[index]
                [dtypes.get(layers[i].tensor, "F32") for i in part],  # type: ignore[arg-type]
            )
            done.update({i: st for i, st in zip(part, got, strict=True) if st is not None})
    tensors: dict[str, TensorStats] = {}
    pages = MappedPages()
    for i, layer in enumerate(layers):
        st = done.get(i)
        if st is None:
            if cancel is not None:
                cancel.check()
            progress(i / total, f"statistics of {layer.name}")
            t = layer.tensor
            assert t is not None
            st = _tensor_stats(layer, named[t], grads.get(t), dtypes.get(t, "F32"))
            pages.release(named[t])  # a mapped checkpoint's pages, read again when used
        tensors[layer.name] = st
    return tensors


def _mean_log(x: np.ndarray) -> float:
    pos = x[np.isfinite(x) & (x > 0)]
    return float(np.log(pos).mean()) if pos.size else 0.0


# ---------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------
def _named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    out = dict(module.named_buffers())
    out.update(dict(module.named_parameters()))
    return out


def _logits(out: object) -> torch.Tensor:
    try:
        return first_tensor(out)
    except CompressionError:
        raise DataError(
            f"the model returned a {type(out).__name__}, not a tensor of class scores",
            hint="gradient criteria need a classifier (outputs of shape (N, classes))",
        ) from None


def _batch_gradients(
    work: nn.Module,
    xb: torch.Tensor,
    yb: torch.Tensor | None,
    targets: list[torch.Tensor],
    where: str | None,
    language_model: bool = False,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of the batch's mean cross-entropy with respect to ``targets``; without labels
    the model's own argmax predictions (from the same forward pass) are the labels. A causal
    language model's loss is its own: the next token's cross-entropy over the text."""
    with torch.enable_grad():
        try:
            raw = work(xb)
        except WorkbenchError:
            raise
        except Exception as exc:  # the model's own code rejected the batch
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(
                f"the model failed on a batch of shape {list(xb.shape)}: {first}",
                path=where,
                hint="check that the data matches the model's input",
            ) from None
        out = _logits(raw)
        if language_model:
            return torch.autograd.grad(next_token_loss(out, xb), targets, allow_unused=True)
        if out.ndim != 2 or not out.is_floating_point():
            raise DataError(
                f"the model's outputs have shape {list(out.shape)}, not (N, classes) "
                "logits; gradient criteria need a classifier",
                path=where,
                hint="use magnitude or channel pruning for this model",
            )
        # Without labels the model's own predictions are the labels (what
        # core.io.data.with_model_labels gives), taken from this same forward pass.
        y = (out.detach().argmax(dim=1) if yb is None else yb).to(torch.int64).reshape(-1)
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= out.shape[1]):
            raise DataError(
                f"labels must be in 0..{out.shape[1] - 1} for a model with "
                f"{out.shape[1]} outputs, found {int(y.min())}..{int(y.max())}",
                path=where,
                hint="check the labels 'y' of the data file",
            )
        loss = nn.functional.cross_entropy(out, y)
        return torch.autograd.grad(loss, targets, allow_unused=True)


def gradient_stats(
    loaded: LoadedModel,
    data: Dataset,
    tensors: Sequence[str],
    *,
    batches: int = 8,
    batch_size: int = 64,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
) -> dict[str, GradientStats]:
    """Running mean and std of the loss gradient of each named tensor over ``batches`` batches.

    The loss of a batch is the mean cross-entropy of the model's outputs against ``data.y``
    (or, without labels, against the model's own argmax predictions); for a causal language
    model (`core.io.hf.language_model`) the next-token cross-entropy over the text. Gradients are taken on
    a copy of the model in eval mode, so ``loaded`` is never modified (not even its
    ``requires_grad`` flags), also when cancelled.

    Raises
    ------
    DataError
        Weights-only model, outputs that are not ``(N, classes)`` logits, or labels out of range.
    Cancelled
        When ``cancel`` fires (checked before every batch).
    """

    if not loaded.can_run:
        raise DataError(
            "gradient statistics need a forward pass, and this model is weights-only",
            path=loaded.source,
            hint="open the model with an architecture (or as TorchScript/.pt2) to use "
            "gradient criteria, or use magnitude pruning",
        )
    if batches < 1 or batch_size < 1:
        raise ValueError("batches and batch_size must be >= 1")
    if cancel is not None:
        cancel.check()
    if loaded.format == "pt2" and loaded.example_input is not None:
        # torch.export programs usually fix the batch size they were exported with.
        batch_size = int(loaded.example_input.shape[0]) if loaded.example_input.ndim else batch_size
        if len(data) >= batch_size:
            whole = (len(data) // batch_size) * batch_size
            data = Dataset(data.x[:whole], None if data.y is None else data.y[:whole], data.name)
    take = min(len(data), batches * batch_size)
    if take == 0:
        raise DataError("the data set is empty", path=data.name, hint="provide some samples")
    data = Dataset(data.x[:take], None if data.y is None else data.y[:take], data.name)
    lm = language_model(loaded)
    work = clone_model(loaded).module
    work.eval()
    named = _named_tensors(work)
    missing = [t for t in tensors if t not in named]
    if missing:
        raise CompressionError(f"tensor {missing[0]!r} not found in the model")
    for p in work.parameters():
        p.requires_grad_(False)
    targets = {t: named[t] for t in tensors}
    for t in targets.values():
        t.requires_grad_(True)
    mean = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in targets.items()}
    m2 = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in targets.items()}
    total = -(-take // batch_size)
    count = 0
    for i, (xb, yb) in enumerate(data.batches(batch_size)):
        if cancel is not None:
            cancel.check()
        progress(i / total, f"gradients: batch {i + 1} of {total}")
        for t in targets.values():
            t.grad = None
        grads = _batch_gradients(work, xb, yb, list(targets.values()), data.name, lm)
        count += 1
        # Welford's update in float64: stable even when the spread is tiny next to the mean.
        for (name, tensor), g in zip(targets.items(), grads, strict=True):
            g64 = (g if g is not None else torch.zeros_like(tensor)).detach().to(torch.float64)
            delta = g64 - mean[name]
            mean[name] += delta / count
            m2[name] += delta * (g64 - mean[name])
    if cancel is not None:
        cancel.check()
    progress(1.0, "gradients done")
    out_stats = {}
    for name in targets:
        mu = mean[name].to(torch.float32)
        sd = (m2[name] / count).sqrt().to(torch.float32)
        out_stats[name] = GradientStats(
            mean=mu, std=sd, batches=count, hist_mean=histogram(mu), hist_std=histogram(sd)
        )
    return out_stats


# ---------------------------------------------------------------------------------------
# analyze
# ---------------------------------------------------------------------------------------
def _state_entries(module: nn.Module) -> tuple[StateTensor, ...]:
    out = []
    for name, t in module.state_dict().items():
        if isinstance(t, torch.Tensor):
            dtype = SAFETENSORS_DTYPES.get(t.dtype, str(t.dtype).removeprefix("torch."))
            out.append(StateTensor(name, tuple(int(s) for s in t.shape), dtype))
    return tuple(out)


def analyze(
    loaded: LoadedModel,
    data: Dataset | None = None,
    *,
    grad_batches: int = 8,
    batch_size: int = 64,
    layers: Sequence[LayerInfo] | None = None,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
) -> ModelStats:
    """Statistics and score indices of every prunable tensor of ``loaded``.

    Parameters
    ----------
    loaded
        The model; never modified.
    data
        Optional samples: with them, per-weight gradient statistics are recorded over
        ``grad_batches`` batches of ``batch_size`` and the gradient criteria become available.
    layers
        The inventory to use (default: `core.analysis.inventory.inventory(loaded)`).
    progress, cancel
        Progress callback; cancel token checked between batches and layers.

    Returns
    -------
    ModelStats
        Frozen snapshot; ``tensors`` by layer name for every prunable layer.

    Raises
    ------
    DataError
        ``data`` given but the model cannot produce class logits for it (see `gradient_stats`).
    Cancelled
        When ``cancel`` fires.
    """
    if layers is None:
        layers = inventory(loaded)
    layers = tuple(layers)
    prunable = [layer for layer in layers if layer.prunable and layer.tensor is not None]
    named = _named_tensors(loaded.module)
    state = _state_entries(loaded.module)
    dtypes = {s.name: s.dtype for s in state}
    grads: dict[str, GradientStats] = {}
    split = 0.0
    if data is not None:
        split = 0.6
        grads = gradient_stats(
            loaded,
            data,
            [layer.tensor for layer in prunable if layer.tensor is not None],
            batches=grad_batches,
            batch_size=batch_size,
            progress=scaled(progress, 0.0, split),
            cancel=cancel,
        )
    tensors = _all_tensor_stats(
        prunable,
        named,
        grads,
        dtypes,
        source=loaded.source,
        progress=scaled(progress, split, 1.0),
        cancel=cancel,
    )
    if cancel is not None:
        cancel.check()
    progress(1.0, "analysis done")

    return ModelStats(
        layers=layers,
        tensors=tensors,
        has_gradients=bool(grads),
        total_params=float_param_count(loaded.module),
        state=state,
        source=str(loaded.source),
        format=str(loaded.format),
        grad_batches=max((g.batches for g in grads.values()), default=0),
    )
