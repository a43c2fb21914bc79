"""`count_mask` on large tensors selects the k-th finite score with a chunked radix select
(`core.analysis.selection.kth_finite`) instead of ``torch.kthvalue``: the masks must be
exactly those of the ``kthvalue`` implementation it replaced (kept here as the reference)."""

from __future__ import annotations

import pytest
import torch

import core.analysis.selection as selection
from core.analysis.selection import count_mask, kth_finite
from core.analysis.stats import SMALL_MAX

#: Elements per test tensor: above `SMALL_MAX` (the large-tensor path), several chunks.
N = SMALL_MAX + 4099
CHUNK = 1 << 14


def _reference(scores: torch.Tensor, count: int) -> torch.Tensor:
    """`count_mask`'s large-tensor path as it was, with ``torch.kthvalue``."""
    flat = scores.detach().reshape(-1).to(torch.float32)
    n = flat.numel()
    if count <= 0:
        return torch.ones(scores.shape, dtype=torch.bool)
    if count >= n:
        return torch.zeros(scores.shape, dtype=torch.bool)
    finite = torch.isfinite(flat)
    nonfinite = n - int(torch.count_nonzero(finite))
    if count <= nonfinite:
        return finite.reshape(scores.shape)
    values = flat[finite] if nonfinite else flat
    kf = count - nonfinite
    v = torch.kthvalue(values, kf).values
    prune = flat < v
    extra = kf - int(torch.count_nonzero(prune))
    if extra > 0:
        ties = torch.nonzero(flat == v).reshape(-1)[:extra]
        prune[ties] = True
    if nonfinite:
        prune |= ~finite
    return (~prune).reshape(scores.shape)


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    rand = torch.randn(N, generator=g)
    tied = torch.randint(0, 7, (N,), generator=g).float() * 0.25
    special = torch.randn(N, generator=g)
    idx = torch.randperm(N, generator=g)
    special[idx[:300]] = float("nan")
    special[idx[300:500]] = float("inf")
    special[idx[500:600]] = -float("inf")
    special[idx[600:5000]] = -0.0
    special[idx[5000:9000]] = 0.0
    zeros = torch.zeros(N)
    zeros[idx[: N // 2]] = -0.0
    return {
        "random": rand,
        "abs": rand.abs().reshape(-1, 5),
        "tied": tied,
        "all-equal": torch.full((N,), 0.5),
        "negative": -torch.rand(N, generator=g) - 1e-3,
        "nan-inf-signed-zero": special,
        "signed-zeros": zeros,
        "tiny": torch.randn(N, generator=g) * 1e-40,  # subnormals
        "half": torch.randn(N, generator=g).half(),
    }


@pytest.mark.parametrize("name", list(_inputs()))
def test_count_mask_equals_the_kthvalue_implementation(monkeypatch, name):
    monkeypatch.setattr(selection, "_SELECT_CHUNK", CHUNK)  # several chunks per tensor
    scores = _inputs()[name]
    n = scores.numel()
    nonfinite = n - int(torch.isfinite(scores.float()).sum())
    counts = {0, 1, 2, nonfinite, nonfinite + 1, n // 3, n // 2, n - 1, n, *range(7, n, n // 5)}
    # (scores are >= 0: a -inf is below every finite value and so counts twice, as before)
    exact = not bool((scores.float() == -float("inf")).any())
    for count in sorted(counts):
        got = count_mask(scores, count)
        want = _reference(scores, count)
        assert got.shape == scores.shape
        assert torch.equal(got, want), (name, count)
        if exact and count >= nonfinite:
            assert int((~got).sum()) == count


def test_kth_finite_equals_kthvalue(monkeypatch):
    monkeypatch.setattr(selection, "_SELECT_CHUNK", 1000)
    for name, t in _inputs().items():
        flat = t.reshape(-1).float()
        finite = flat[torch.isfinite(flat)]
        for k in (1, 2, finite.numel() // 2, finite.numel() - 1, finite.numel()):
            want = torch.kthvalue(finite, k).values
            got = kth_finite(flat, k)
            # equal as values (-0.0 == 0.0: the masks compare with < and ==)
            assert bool(got == want), (name, k, float(got), float(want))
