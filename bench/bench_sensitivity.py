"""Benchmark: a sensitivity scan of a MiniLM-size encoder against one evaluation pass.

The model has MiniLM-L6's shape (vocabulary 30,522, width 384, 6 layers, 12 heads, feed-forward
1,536: 22.7M weights, 37 prunable tensors) written with plain Linear layers so ``torch.fx``
can trace it: the scan then re-runs only the suffix of the network after each layer, from
activations cached on the evaluation batch. Random weights and random token batches (the cost
does not depend on the values). Prints the time of one evaluation pass, the scan time for a
grid of LEVELS levels per layer, the scan as a multiple of (layers x levels) full passes
(what a naive scan costs), and the time of a second, cached scan.

Run: ``.venv/bin/python bench/bench_sensitivity.py [--samples 16] [--seq 128]``
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from core.analysis.stats import analyze  # noqa: E402
from core.base.model import LoadedModel  # noqa: E402
from core.io.data import make_dataset  # noqa: E402
from core.planning.sensitivity import Level, scan  # noqa: E402

LEVELS = tuple(Level(s, b) for s in (0.0, 0.5, 0.9) for b in (4, 8, None))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, ff: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ff1, self.ff2 = nn.Linear(d, ff), nn.Linear(ff, d)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        return x.reshape(n, t, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        a = F.scaled_dot_product_attention(
            self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        )
        x = self.ln1(x + self.o(a.transpose(1, 2).reshape(n, t, d)))
        return self.ln2(x + self.ff2(F.gelu(self.ff1(x))))


class MiniLMSize(nn.Module):
    def __init__(self, vocab: int = 30522, d: int = 384, layers: int = 6, ff: int = 1536):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(512, d)
        self.blocks = nn.Sequential(*(Block(d, 12, ff) for _ in range(layers)))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        h = self.blocks(self.embed(tokens) + self.pos(pos))
        return F.normalize(h.mean(dim=1), dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    module = MiniLMSize().eval()
    x = torch.randint(0, 30522, (args.samples, args.seq))
    loaded = LoadedModel(module, "eager", "minilm-size", "minilm-size", example_input=x[:2])
    weights = sum(p.numel() for p in module.parameters() if p.ndim >= 2)
    t0 = time.perf_counter()
    stats = analyze(loaded)
    t_analyze = time.perf_counter() - t0
    data = make_dataset(x, None, name="random tokens")
    with torch.no_grad():
        module(x)
        t0 = time.perf_counter()
        module(x)
        t_pass = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as cache:
        result = scan(loaded, stats, data, levels=LEVELS, cache_dir=cache)
        t0 = time.perf_counter()
        again = scan(loaded, stats, data, levels=LEVELS, cache_dir=cache)
        t_cached = time.perf_counter() - t0
    n = len(result.layers)
    naive = n * len(LEVELS) * t_pass
    print(f"MiniLM-size encoder: {weights / 1e6:.1f}M weights in matrices, {n} scanned tensors")
    print(f"  {args.samples} x {args.seq} tokens, {torch.get_num_threads()} threads")
    print(f"  analysis:            {t_analyze:8.2f} s")
    print(f"  one evaluation pass: {1000 * t_pass:8.1f} ms")
    print(
        f"  scan, {len(LEVELS)} levels/layer: {result.seconds:8.2f} s "
        f"= {result.seconds / t_pass:.0f} passes ({result.notes[0]})"
    )
    print(
        f"  naive scan ({n} x {len(LEVELS)} full passes): {naive:.2f} s -> scan is "
        f"{result.seconds / naive:.2f}x of it"
    )
    print(f"  second scan (cache): {t_cached:8.3f} s ({again.cached_layers}/{n} layers cached)")
    assert math.isfinite(result.seconds)


if __name__ == "__main__":
    main()
