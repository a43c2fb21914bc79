"""Exact target sparsity: how many scores a target prunes per tensor, and which ones.

A threshold can only prune whole groups of equal scores, and a radix `core.analysis.stats.ScoreIndex`
only knows counts at its bin edges, so "target sparsity -> threshold" lands near, not on, the
target. A *target* is therefore applied as a count: the preview decides how many scores each
tensor prunes (``round(target * n)``, never fewer than its non-finite scores, which every mask
prunes) and the engine prunes exactly that many with `count_mask`. A *threshold* asked for by
the user stays a threshold (`core.ops.pruning.threshold_mask`).

Which scores a count prunes (a total order, so every count is achievable):

* one tensor: non-finite scores first, then finite scores by value, equal values by flat index;
* global scope, every member exact (sorted scores): by value, then member order, then index;
* global scope with a radix member: by radix bin (the float32 top 16 bits: the value to within
  a relative ``2**-7``), then member order, then value, then index. The preview knows every
  member's count in every bin, so each tensor's count is exact and the pool's total is exactly
  the target; only inside the one boundary bin does member order stand in for value order.

Per tensor this always means "its ``k`` smallest scores", which is what `count_mask` applies.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from core.analysis.stats import _BIN_HI, EDGE_VALUES, SMALL_MAX, ScoreIndex, _between, _f32


def target_count(n: int, nonfinite: int, sparsity: float) -> int:
    """Scores a target ``sparsity`` prunes from ``n``: ``round(sparsity * n)``, at least the
    ``nonfinite`` ones (every mask prunes those), at most ``n``."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    return min(max(round(sparsity * n), nonfinite), n)


def count_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Keep mask (``scores``' shape) pruning exactly ``count`` scores.

    Non-finite scores go first, then finite ones by value; equal values by flat index, so the
    count is exact even when many scores tie (an all-zero tensor, duplicated weights).

    Parameters
    ----------
    scores
        Non-negative scores (NaN/Inf allowed).
    count
        How many to prune, ``0 <= count <= numel``; a count below the number of non-finite
        scores still prunes all of those (callers pass `target_count`).
    """
    flat = scores.detach().reshape(-1)
    n = flat.numel()
    if count <= 0 or n == 0:
        return torch.ones(scores.shape, dtype=torch.bool)
    if count >= n:
        return torch.zeros(scores.shape, dtype=torch.bool)
    if n <= SMALL_MAX:
        # numpy: per-call overhead matters when a model has 10**5 tiny tensors
        a = flat.to(torch.float32).numpy()
        key = np.where(np.isfinite(a), a, np.float32(-1.0))
        order = np.argsort(key, kind="stable")
        keep = np.ones(n, dtype=bool)
        keep[order[:count]] = False
        return torch.from_numpy(keep).reshape(scores.shape)
    if flat.dtype != torch.float32:
        flat = flat.to(torch.float32)
    finite = _finite(flat)
    # count_nonzero, not sum(): a bool sum makes an int64 copy (8 bytes per weight)
    nonfinite = n - int(torch.count_nonzero(finite))
    if count <= nonfinite:
        return finite.reshape(scores.shape)
    kf = count - nonfinite
    v = kth_finite(flat, kf)  # the largest finite score pruned
    prune = flat < v
    extra = kf - int(torch.count_nonzero(prune))
    if extra > 0:
        ties = torch.nonzero(flat == v).reshape(-1)[:extra]
        prune[ties] = True
    if nonfinite:
        prune |= ~finite
    return (~prune).reshape(scores.shape)


#: `kth_finite` reads its tensor in chunks of this many elements.
_SELECT_CHUNK = 1 << 20
#: Buckets of one radix pass (16 of the 32 key bits).
_RADIX = 1 << 16


def _finite(flat: torch.Tensor) -> torch.Tensor:
    """``torch.isfinite(flat)`` made `_SELECT_CHUNK` elements at a time (``isfinite`` of a
    float tensor makes a whole-tensor ``abs`` copy and two bool temporaries)."""
    out = torch.empty(flat.shape, dtype=torch.bool)
    for s in range(0, flat.numel(), _SELECT_CHUNK):
        out[s : s + _SELECT_CHUNK] = torch.isfinite(flat[s : s + _SELECT_CHUNK])
    return out


def _keys(chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keys, finite)`` of a float32 chunk: int32 keys in the order of the values (the bits,
    with a negative value's magnitude bits flipped; -0.0 just below +0.0), and which are finite."""
    bits = chunk.view(torch.int32)
    key = bits >> 31
    key &= 0x7FFFFFFF
    key ^= bits
    return key, torch.isfinite(chunk)


def _bucket(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """``(bucket, rank within it)`` of the ``k``-th (1-based) element counted by ``hist``."""
    cum = torch.cumsum(hist, 0)
    b = int(torch.searchsorted(cum, torch.tensor([k], dtype=cum.dtype))[0])
    return b, k - (int(cum[b - 1]) if b else 0)


def kth_finite(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th smallest (1-based) finite value of the float32 vector ``flat``, exactly
    (``torch.kthvalue`` of its finite values), as a 0-d tensor.

    A radix select on the values' bit patterns in two passes of `_SELECT_CHUNK` elements:
    a histogram of the keys' high 16 bits finds the bucket holding the ``k``-th value, one of
    that bucket's low 16 bits the value itself. Temporaries are a few bytes per element of
    one chunk (int32 keys, made in place), where `kthvalue` copies the values with int64
    indices (~3x the tensor).
    """
    n = flat.numel()
    high = torch.zeros(_RADIX, dtype=torch.int64)
    for s in range(0, n, _SELECT_CHUNK):
        key, finite = _keys(flat[s : s + _SELECT_CHUNK])
        key >>= 16
        key += _RADIX >> 1
        high += torch.bincount(key[finite], minlength=_RADIX)
    bucket, rank = _bucket(high, k)
    low = torch.zeros(_RADIX, dtype=torch.int64)
    for s in range(0, n, _SELECT_CHUNK):
        key, finite = _keys(flat[s : s + _SELECT_CHUNK])
        finite &= (key >> 16) == bucket - (_RADIX >> 1)
        key &= 0xFFFF
        low += torch.bincount(key[finite], minlength=_RADIX)
    bits = torch.tensor(
        [((bucket - (_RADIX >> 1)) << 16) | _bucket(low, rank)[0]], dtype=torch.int32
    )
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).view(torch.float32)[0]


def _segment_sums(flags: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Sum of ``flags`` over consecutive segments of the given sizes (empty segments -> 0)."""
    cum = np.zeros(flags.size + 1, dtype=np.int64)
    np.cumsum(flags, out=cum[1:])
    ends = np.cumsum(sizes)
    return cum[ends] - cum[ends - sizes]


def _fill(quota: int, room: np.ndarray) -> np.ndarray:
    """Hand ``quota`` out over ``room`` in order, each at most its room."""
    before = np.concatenate(([0], np.cumsum(room)[:-1]))
    return np.clip(quota - before, 0, room)


def _value_threshold(values: np.ndarray, kf: int) -> float:
    """Threshold to report when the ``kf`` smallest of sorted ``values`` are pruned.

    A strict threshold (``values[kf-1] < t <= values[kf]``) when one exists, so it prunes the
    same scores; at a tie it is the tied value (the count then includes some of them).
    """
    m = values.size
    if kf <= 0:
        return 0.0
    if kf >= m:
        return float(np.nextafter(values[-1], np.float32(np.inf)))
    lo, hi = values[kf - 1], values[kf]
    return _between(lo, hi) if lo < hi else float(hi)


def _bin_threshold(bin_index: int, count: int, quota: int) -> float:
    """Threshold to report when ``quota`` of the ``count`` scores of radix bin ``bin_index``
    are pruned: its upper edge when all of them are, else an
    interpolation inside the bin (within a relative ``2**-7`` of the true boundary)."""
    lo = float(EDGE_VALUES[bin_index])
    hi = float(_BIN_HI[bin_index])
    if quota >= count:
        return hi
    if bin_index == 0:
        return 0.0  # bin 0 is [0, 2**-133): exact zeros and the tiniest denormals
    return float(_f32(lo + (hi - lo) * quota / count))


def index_threshold(index: ScoreIndex, count: int) -> float:
    """Threshold to report for pruning ``count`` scores of one index (`count_mask`'s choice)."""
    _, threshold = global_counts([index], count, pool=index)
    return threshold


def global_counts(
    members: Sequence[ScoreIndex], count: int, *, pool: ScoreIndex | None = None
) -> tuple[list[int], float]:
    """Per-member counts that together prune exactly ``count`` scores of the pool.

    Parameters
    ----------
    members
        The score indices of the pooled tensors, in layer order (the tie-break order).
    count
        Total to prune (`target_count` of the pool), non-finite scores included.
    pool
        ``ScoreIndex.pooled(members)`` if already built (its sorted values, or its merged
        bins and counts: the boundary bin is then found without merging the members again).

    Returns
    -------
    (counts, threshold)
        ``counts[i]``: scores member ``i`` prunes (its non-finite ones included), summing to
        ``count``; ``threshold``: the value reported for the boundary (see the module doc).
    """
    nonfinite = np.array([m.nonfinite for m in members], dtype=np.int64)
    finite = np.array([m.finite for m in members], dtype=np.int64)
    kf = min(count - int(nonfinite.sum()), int(finite.sum()))
    if kf <= 0:
        return [int(x) for x in nonfinite], 0.0
    if all(m.values is not None for m in members):
        values = [m.values for m in members]
        if len(values) == 1:  # one tensor prunes exactly its kf smallest (the ties need no count)
            return [int(nonfinite[0]) + kf], _value_threshold(values[0], kf)
        cat = np.concatenate(values) if len(values) > 1 else values[0]
        merged = pool.values if pool is not None and pool.values is not None else np.sort(cat)
        v = merged[kf - 1]
        below = _segment_sums(cat < v, finite)
        ties = _segment_sums(cat == v, finite)
        taken = below + _fill(kf - int(below.sum()), ties)
        return [int(x) for x in nonfinite + taken], _value_threshold(merged, kf)
    if pool is not None:
        return _pooled_bin_counts(members, pool, nonfinite, kf)
    sizes = np.array([m.bins.size for m in members], dtype=np.int64)
    bins = np.concatenate([m.bins for m in members])
    counts = np.concatenate([np.diff(m.bin_cum) for m in members])
    # the boundary bin: the first whose cumulative pooled count reaches kf
    ub, inv = np.unique(bins, return_inverse=True)
    cum = np.cumsum(np.bincount(inv, weights=counts, minlength=ub.size).astype(np.int64))
    j = int(cum.searchsorted(kf, side="left"))
    boundary = int(ub[j])
    pooled_below = int(cum[j - 1]) if j else 0
    below = _segment_sums(np.where(bins < boundary, counts, 0), sizes)
    inside = _segment_sums(np.where(bins == boundary, counts, 0), sizes)
    quota = kf - pooled_below
    taken = below + _fill(quota, inside)
    threshold = _bin_threshold(boundary, int(cum[j]) - pooled_below, quota)
    return [int(x) for x in nonfinite + taken], threshold


def _pooled_bin_counts(
    members: Sequence[ScoreIndex], pool: ScoreIndex, nonfinite: np.ndarray, kf: int
) -> tuple[list[int], float]:
    """`global_counts`' radix case from the pooled index (its bins are the members' merged
    bins, its ``bin_cum`` their pooled counts): one ``searchsorted`` per member instead of
    merging every member's bins again, with the same counts and threshold."""
    cum = pool.bin_cum[1:]
    j = int(cum.searchsorted(kf, side="left"))
    boundary = int(pool.bins[j])
    pooled_below = int(cum[j - 1]) if j else 0
    below = np.zeros(len(members), dtype=np.int64)
    inside = np.zeros(len(members), dtype=np.int64)
    for i, m in enumerate(members):
        k = int(m.bins.searchsorted(boundary, side="left"))
        below[i] = m.bin_cum[k]
        if k < m.bins.size and int(m.bins[k]) == boundary:
            inside[i] = m.bin_cum[k + 1] - m.bin_cum[k]
    quota = kf - pooled_below
    taken = below + _fill(quota, inside)
    threshold = _bin_threshold(boundary, int(cum[j]) - pooled_below, quota)
    return [int(x) for x in nonfinite + taken], threshold


def energy_for_count(index: ScoreIndex, count: int) -> float:
    """Sum of squares of the weights behind the ``count`` smallest scores of ``index``.

    Exact for sorted indices (their energies are cumulated in `count_mask`'s order); for radix
    indices the boundary bin contributes in proportion to the share of it that is pruned.
    """
    kf = min(count - index.nonfinite, index.finite)
    if kf <= 0:
        return index.nonfinite_energy
    if index.value_energy is not None:
        return float(index.value_energy[kf]) + index.nonfinite_energy
    cum = index.bin_cum
    i = int(cum.searchsorted(kf, side="left"))
    lo_n, hi_n = int(cum[i - 1]), int(cum[i])
    e_lo, e_hi = float(index.bin_energy[i - 1]), float(index.bin_energy[i])
    share = (kf - lo_n) / (hi_n - lo_n) if hi_n > lo_n else 0.0
    return e_lo + (e_hi - e_lo) * share + index.nonfinite_energy
