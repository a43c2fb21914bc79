"""Exact target sparsity (every tensor size, both scopes, ties), many tiny tensors, no weights."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from core.analysis.estimate import preview
from core.analysis.selection import count_mask, target_count
from core.analysis.stats import SMALL_MAX, analyze, build_index, score_tensor
from core.base.model import LoadedModel
from core.cli.main import main
from core.compress.engine import compress
from core.io.data import Dataset
from core.recipe.plan import CompressionPlan, LayerConfig, PruneConfig, simple_plan

#: One size above the radix threshold so the radix index and the kthvalue path both run.
SIZES = [1, 2, 3, 7, 16, 101, 5_000, SMALL_MAX + 1_234]


def _tied(n: int, seed: int) -> torch.Tensor:
    """Weights with heavy ties: a third zeros, a third copies of a few values, the rest random."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g)
    w[: n // 3] = 0.0
    lo, hi = n // 3, 2 * n // 3
    w[lo:hi] = torch.tensor([0.5, -0.5, 0.25])[torch.arange(hi - lo) % 3]
    return w[torch.randperm(n, generator=g)]


@pytest.mark.parametrize("n", SIZES)
def test_count_mask_prunes_exactly_the_smallest(n):
    w = _tied(n, seed=n)
    if n > 10:
        w[3] = float("nan")
    scores = w.abs()
    nonfinite = int((~torch.isfinite(scores)).sum())
    for s in (0.0, 0.1, 0.33, 0.5, 0.9, 0.999, 1.0):
        k = target_count(n, nonfinite, s)
        keep = count_mask(scores, k)
        assert int((~keep).sum()) == k
        assert abs(k - round(s * n)) <= max(nonfinite - round(s * n), 0)
        pruned = scores[~keep & torch.isfinite(scores)]
        kept = scores[keep]
        if pruned.numel() and kept.numel():
            assert float(pruned.max()) <= float(kept.min())
        assert not bool(keep[~torch.isfinite(scores)].any())  # NaN always pruned
    # ties break by index: the pruned zeros are the first ones
    zeros = torch.nonzero(scores == 0).reshape(-1)
    if zeros.numel() > 1:
        keep = count_mask(scores, nonfinite + zeros.numel() // 2)
        assert not bool(keep[zeros[: zeros.numel() // 2]].any())
        assert bool(keep[zeros[zeros.numel() // 2 :]].all())


class _Net(nn.Module):
    """Layers of very different sizes (one above `SMALL_MAX`), with tied weights."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.a = nn.Linear(8, 3)  # 24 weights
        self.b = nn.Linear(3, 400)  # 1200
        self.c = nn.Linear(400, 180)  # 72000 > SMALL_MAX: radix index
        self.d = nn.Linear(180, 5)  # 900
        with torch.no_grad():
            for i, lin in enumerate((self.a, self.b, self.c, self.d)):
                lin.weight.copy_(_tied(lin.weight.numel(), seed=i).reshape(lin.weight.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d(torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x)))))))


@pytest.fixture(scope="module")
def net():
    loaded = LoadedModel(module=_Net().eval(), format="eager", source="test:net", name="net")
    g = torch.Generator().manual_seed(4)
    data = Dataset(torch.randn(64, 8, generator=g), torch.randint(0, 5, (64,), generator=g), "d")
    stats = analyze(loaded, data, grad_batches=2, batch_size=32)
    assert not stats.tensors["c"].scores["magnitude"].exact
    return loaded, stats


@pytest.mark.parametrize("method", ["magnitude", "taylor", "gradient_stability"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_applied_sparsity_is_exact(net, method, scope):
    loaded, stats = net
    plan = simple_plan(0.9, None, method, scope=scope)
    pv = preview(stats, plan)
    result = compress(loaded, plan, stats)
    zeros = {r.tensor: int((~result.masks[r.tensor]).sum()) for r in result.layers}
    for lp in pv.layers:
        assert lp.numel - lp.nnz == zeros[lp.tensor], lp.name  # preview == applied mask
        if scope == "layer":
            assert abs(zeros[lp.tensor] - round(0.9 * lp.numel)) <= 1, lp.name
        # every tensor prunes its smallest scores
        w = dict(loaded.module.named_parameters())[lp.tensor].detach()
        scores = score_tensor(method, w, stats.tensors[lp.name].grad)
        mask = result.masks[lp.tensor]
        if (~mask).any() and mask.any():
            assert float(scores[~mask].max()) <= float(scores[mask].min())
    total = sum(lp.numel for lp in pv.layers)
    assert abs(sum(zeros.values()) - round(0.9 * total)) <= (1 if scope == "global" else 4)


def test_global_ties_across_layers_are_exact():
    # every weight of every layer is equal: only the tie-break decides, and the count is exact
    model = nn.Sequential(nn.Linear(300, 300), nn.Linear(300, 7))
    with torch.no_grad():
        for lin in model:
            lin.weight.fill_(0.125)
    loaded = LoadedModel(module=model, format="eager", source="ties", name="ties")
    stats = analyze(loaded)
    for s in (0.3, 0.9):
        result = compress(loaded, simple_plan(s, None, "magnitude", scope="global"), stats)
        pruned = sum(int((~m).sum()) for m in result.masks.values())
        assert pruned == round(s * (90_000 + 2_100))


def test_threshold_mode_stays_a_threshold(net):
    loaded, stats = net
    plan = CompressionPlan(
        default=LayerConfig(prune=PruneConfig(method="magnitude", mode="threshold", threshold=0.3))
    )
    pv = preview(stats, plan)
    result = compress(loaded, plan, stats)
    params = dict(loaded.module.named_parameters())
    for lp in pv.layers:
        assert lp.count is None
        w = params[lp.tensor].detach()
        assert int((~result.masks[lp.tensor]).sum()) == int((w.abs() < lp.threshold).sum())


def test_radix_index_counts_match_count_mask():
    w = _tied(300_000, seed=9)
    index = build_index(w.abs(), w)
    assert not index.exact
    k = target_count(index.n, index.nonfinite, 0.9)
    assert int((~count_mask(w.abs(), k)).sum()) == k == 270_000


def test_many_tiny_tensors_compress_end_to_end(tmp_path, capsys):
    n = 10_000
    g = torch.Generator().manual_seed(0)
    stack = torch.randn(n, 4, 4, generator=g)
    path = tmp_path / "tiny.safetensors"
    save_file({f"l{i}.weight": stack[i].clone() for i in range(n)}, str(path))
    start = time.perf_counter()
    rc = main(
        ["compress", str(path), "--out", str(tmp_path / "out"), "--sparsity", "0.5", "--bits",
         "8", "--finetune-epochs", "0", "--quiet"]
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    assert rc == 0
    assert (tmp_path / "out" / "model.packed.safetensors").stat().st_size > n * 8
    assert "sparsity 50.0%" in capsys.readouterr().out
    assert elapsed < 60, f"{n} tiny tensors took {elapsed:.0f} s"  # a hang guard only


def test_model_without_weights(tmp_path, capsys):
    path = tmp_path / "steps.safetensors"
    save_file({"steps": torch.tensor([3], dtype=torch.int64)}, str(path))
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "0 parameters" in out and "-----" not in out
    out_dir = tmp_path / "out"
    assert main(["compress", str(path), "--out", str(out_dir), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "the model has no weights to compress" in err and err.count("\n") == 1
    assert not out_dir.exists()
