"""Benchmark: analysis, threshold lookups and plan preview on a 25M-parameter model.

Prints, from one run on 2 threads: the time of one plain pass over all weights (sum of |w|),
the analysis time as a ratio to it (aim: at most 10x), a whole-model threshold -> sparsity
lookup (aim: under 1 ms), a target sparsity -> threshold lookup, and ``preview(stats, plan)``
for a plan mixing a global default with per-layer overrides (aim: under 1 ms). Writes the table
to the "Analysis and preview" section of docs/benchmarks.md (between its markers; other
sections are left alone).

Run: ``.venv/bin/python bench/bench_analysis.py [--no-write]``
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from core.analysis.estimate import preview  # noqa: E402
from core.analysis.inventory import inventory  # noqa: E402
from core.analysis.stats import analyze, radix_counts  # noqa: E402
from core.base.model import LoadedModel  # noqa: E402
from core.recipe.plan import (  # noqa: E402
    CompressionPlan,
    LayerConfig,
    PruneConfig,
    QuantConfig,
)

DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench:analysis -->", "<!-- /bench:analysis -->"


def build_model(seed: int = 0) -> nn.Module:
    """About 25.2M parameters: three big Linear layers and a small head."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(1024, 4096),
        nn.ReLU(),
        nn.Linear(4096, 4096),
        nn.ReLU(),
        nn.Linear(4096, 1024),
        nn.ReLU(),
        nn.Linear(1024, 10),
    ).eval()


def timed(fn: Callable[[], object], repeat: int) -> float:
    """Best of ``repeat`` calls in seconds, after one warm-up call.

    The minimum is the least disturbed by other processes on a shared machine.
    """
    fn()
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def timed_pair(
    a: Callable[[], object], b: Callable[[], object], rounds: int
) -> tuple[float, float]:
    """Best times of ``a`` and ``b`` measured in alternation, so both see the same load."""
    a(), b()
    best_a = best_b = math.inf
    for _ in range(rounds):
        t0 = time.perf_counter()
        a()
        t1 = time.perf_counter()
        b()
        t2 = time.perf_counter()
        best_a, best_b = min(best_a, t1 - t0), min(best_b, t2 - t1)
    return best_a, best_b


def make_plan() -> CompressionPlan:
    """Global magnitude default (80 %, 6-bit per-channel) plus per-layer overrides."""
    default = LayerConfig(
        prune=PruneConfig(method="magnitude", mode="sparsity", sparsity=0.8, scope="global"),
        quant=QuantConfig(bits=6, symmetric=False, per_channel=True),
    )
    return (
        CompressionPlan(default=default)
        .with_layer(
            "4",
            LayerConfig(
                prune=PruneConfig(method="magnitude", mode="threshold", threshold=0.01),
                quant=QuantConfig(bits=4, symmetric=True),
            ),
        )
        .with_layer(
            "6",
            LayerConfig(
                prune=PruneConfig(method="channel_l2", sparsity=0.3), quant=QuantConfig(bits=8)
            ),
        )
    )


def run(write: bool) -> str:
    torch.set_num_threads(2)
    load = os.getloadavg()[0]
    model = build_model()
    loaded = LoadedModel(module=model, format="eager", source="bench:mlp25m", name="mlp25m")
    layers = inventory(loaded)
    weights = [p.detach() for n, p in model.named_parameters() if n.endswith("weight")]
    n_weights = sum(w.numel() for w in weights)

    buf = torch.empty(1 << 20)

    def plain_pass() -> float:
        """sum(|w|) over every weight, read once: abs into a cache-sized buffer, then sum."""
        total = 0.0
        for w in weights:
            flat = w.reshape(-1)
            for i in range(0, flat.numel(), buf.numel()):
                part = flat[i : i + buf.numel()]
                total += float(torch.abs(part, out=buf[: part.numel()]).sum())
        return total

    plain, t_analyze = timed_pair(plain_pass, lambda: analyze(loaded, layers=layers), 40)
    plain_sum = timed(lambda: sum(float(w.sum()) for w in weights), 40)
    t_radix = timed(lambda: [radix_counts(w) for w in weights], 20)
    plain_norm = timed(lambda: sum(float(torch.linalg.vector_norm(w, 1)) for w in weights), 40)
    stats = analyze(loaded, layers=layers)

    names = list(stats.tensors)
    indices = [stats.tensors[n].scores["magnitude"] for n in names]
    thresholds = [0.001 * (1 + i) for i in range(50)]
    it = iter(range(10**9))

    def lookup() -> int:
        t = thresholds[next(it) % len(thresholds)]
        return sum(ix.count_below(t) for ix in indices)

    t_lookup = timed(lookup, 200)
    pool = stats.pooled("magnitude", names)
    t_pooled_lookup = timed(lambda: pool.count_below(thresholds[next(it) % 50]), 200)
    t_target = timed(lambda: pool.threshold_for_sparsity(0.05 + (next(it) % 90) / 100), 200)

    plan = make_plan()
    fresh = analyze(loaded, layers=layers)
    t0 = time.perf_counter()
    preview(fresh, plan)  # first call also pools the global layers' bins (then cached)
    t_preview_cold = time.perf_counter() - t0
    t_preview = timed(lambda: preview(stats, plan), 100)
    pv = preview(stats, plan)

    ms = 1e3
    rows = [
        ("weights (prunable tensors)", f"{n_weights:,} in {len(indices)} tensors", ""),
        ("plain pass: sum of abs(w) (abs into a buffer, sum)", f"{plain * ms:.2f} ms", "1.0x"),
        ("for reference: sum of w", f"{plain_sum * ms:.2f} ms", f"{plain_sum / plain:.2f}x"),
        (
            "for reference: `vector_norm(w, 1)`",
            f"{plain_norm * ms:.2f} ms",
            f"{plain_norm / plain:.2f}x",
        ),
        (
            "`analyze` (no data: histograms, stats, 3 score indices)",
            f"{t_analyze * ms:.1f} ms",
            f"{t_analyze / plain:.1f}x (aim <= 10x)",
        ),
        (
            "of which: the radix pass alone (`radix_counts`: shift + `bincount`)",
            f"{t_radix * ms:.1f} ms",
            f"{t_radix / plain:.1f}x",
        ),
        (
            "whole-model threshold -> sparsity (sum over layers)",
            f"{t_lookup * 1e6:.1f} us",
            "aim < 1 ms",
        ),
        ("global pooled threshold -> sparsity", f"{t_pooled_lookup * 1e6:.1f} us", ""),
        ("global target sparsity -> threshold", f"{t_target * 1e6:.1f} us", ""),
        (
            "`preview(stats, plan)` (global + per-layer overrides)",
            f"{t_preview * ms:.3f} ms",
            "aim < 1 ms",
        ),
        ("`preview` first call (builds the global pool once)", f"{t_preview_cold * ms:.3f} ms", ""),
    ]
    lines = [
        f"Model: 4 Linear layers, {stats.total_params:,} parameters; torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}.",
        "Times are the best of repeated calls in one run (the plain pass and `analyze` alternate, so "
        "both see the same load); ratios are to the plain pass of the same run. Load average "
        f"before the run: {load:.2f} (other processes share the cores).",
        "",
        "| step | time | ratio / aim |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
        f"Preview of the plan: sparsity {pv.sparsity:.4f}, packed {pv.packed_bytes:,} B, "
        f"ratio {pv.compression_ratio:.1f}x, entropy bound {pv.entropy_bytes:,} B, "
        f"SQNR {pv.sqnr_db:.1f} dB.",
    ]
    text = "\n".join(lines)
    print(text)
    if write:
        _write_section(text)
    return text


def _write_section(body: str) -> None:
    section = f"{BEGIN}\n## Analysis and preview\n\n{body}\n\nProduced by `bench/bench_analysis.py`.\n{END}"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    old = DOC.read_text(encoding="utf-8") if DOC.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    new = (
        pattern.sub(lambda _: section, old)
        if pattern.search(old)
        else old.rstrip() + "\n\n" + section + "\n"
    )
    DOC.write_text(new, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print only, leave docs/ alone")
    args = parser.parse_args()
    run(write=not args.no_write)


if __name__ == "__main__":
    main()
