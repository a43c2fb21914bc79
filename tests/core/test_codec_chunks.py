"""The packed codec's scrambled positions and relative-index costs are computed in chunks of
`core.packed.codec._KEY_CHUNK` (no whole-tensor int64 temporaries): the results must be those
of the whole-array computation (kept here as the reference)."""

from __future__ import annotations

import numpy as np
import pytest

import core.packed.codec as codec
from core.packed.codec import INDEX_BITS, relidx_cost, scramble_keys, scrambled_positions


def _positions_reference(mask: np.ndarray) -> np.ndarray:
    keys = scramble_keys(int(mask.size))
    kept = keys[mask.ravel()]
    keys.sort()
    kept.sort()
    return np.searchsorted(keys, kept)


def _cost_reference(positions: np.ndarray) -> tuple[int, int, int]:
    pos = np.asarray(positions, dtype=np.int64)
    gaps = np.diff(pos, prepend=-1) - 1
    best = None
    for k in INDEX_BITS:
        entries = int((gaps // ((1 << k) - 1)).sum()) + pos.size
        cost = (entries * k + 7) // 8
        if best is None or cost < best[0]:
            best = (cost, k, entries)
    return best


@pytest.mark.parametrize("density", [0.0, 0.001, 0.05, 0.3, 0.49, 0.9, 1.0])
def test_chunked_positions_and_costs_equal_the_whole_array(monkeypatch, density):
    monkeypatch.setattr(codec, "_KEY_CHUNK", 257)  # many chunks, ragged last one
    rng = np.random.default_rng(int(density * 1000))
    mask = rng.random((67, 91)) < density
    want = _positions_reference(mask)
    got = scrambled_positions(mask)
    assert got.dtype == want.dtype and np.array_equal(got, want)
    assert relidx_cost(got) == _cost_reference(want)
    # sparse positions with long gaps (escapes at every width)
    far = np.cumsum(rng.integers(1, 70_000, 1000))
    assert relidx_cost(far) == _cost_reference(far)
    assert relidx_cost(np.zeros(0, dtype=np.int64)) == _cost_reference(np.zeros(0, np.int64))
