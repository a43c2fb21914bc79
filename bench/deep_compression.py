"""Deep-Compression-style results for the digits demos (Han et al. 2016, Table 1).

For ``demo:mlp`` (LeNet-300-100 on 8x8 digits) and ``demo:cnn`` (LeNet-5 style) this runs
per-layer recipes (sparsity + code width per layer, biases at 8 bits, iterative magnitude
pruning with distillation and quantization-aware fine-tuning), and writes ``docs/results.md``
with the per-layer table, error before/after on the test split and the sizes measured on disk
(the packed archive, plain and with its zstd-coded codes). The recipe is saved to
``resources/recipes/demo_<name>.json``; fine-tuning is deterministic and uses the same
held-out split as the CLI, so ``workbench compress demo:mlp --recipe
resources/recipes/demo_mlp.json --out DIR`` reproduces the table's numbers on the same number of
threads (another count changes floating-point sums and so a few pruning decisions).

Targets (issue 3): ``demo:mlp`` >= 40x smaller than fp32 with at most 0.5 point accuracy drop;
``demo:cnn`` >= 30x with at most 1 point drop; the exit status is 1 when one is missed.
Run: ``.venv/bin/python bench/deep_compression.py`` (about a minute on 2 free CPU cores);
``--search`` also runs the alternative candidates and keeps the smallest archive whose
held-out validation accuracy stays within the allowed drop.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.evaluate import evaluate  # noqa: E402
from core.export.formats import export  # noqa: E402
from core.export.report import fp32_bytes  # noqa: E402
from core.io.data import demo_data_for  # noqa: E402
from core.io.model_io import load_model  # noqa: E402
from core.recipe.plan import (  # noqa: E402
    CompressionPlan,
    LayerConfig,
    PruneConfig,
    QuantConfig,
    RecoveryConfig,
)
from core.recovery.training import compress_and_finetune, recovery_split  # noqa: E402

#: Han et al. 2016, Table 1 (MNIST, 784 inputs): the rows our table mirrors.
PAPER = {
    "mlp": ("LeNet-300-100", 1.64, 1.58, 40),
    "cnn": ("LeNet-5", 0.80, 0.74, 39),
}
TARGETS = {"mlp": (40.0, 0.5), "cnn": (30.0, 1.0)}
BIAS_BITS = 8


@dataclass(frozen=True)
class Candidate:
    """Per-layer ``(sparsity, bits)`` plus the recovery schedule (see `plan_for`)."""

    layers: dict[str, tuple[float, int]]
    steps: int = 11
    epochs: int = 20
    lr: float = 2e-3
    batch_size: int = 32
    alpha: float = 0.7


#: The shipped recipe first, then the alternatives ``--search`` also runs. Found by hand on
#: the held-out split: the hidden layers hold almost all weights and take ~95% sparsity; the
#: first layer sees 64 pixels (a fifth always blank); the output layer is small and keeps
#: more. 10 float pruning steps + 1 quantization step, 20 epochs each, beat 5 + 1 x 30 by
#: about 0.4 points at the same size.
CANDIDATES = {
    "mlp": [
        Candidate({"fc1": (0.93, 4), "fc2": (0.955, 4), "fc3": (0.7, 5)}),
        Candidate({"fc1": (0.93, 4), "fc2": (0.95, 4), "fc3": (0.7, 5)}),
        Candidate({"fc1": (0.945, 4), "fc2": (0.945, 4), "fc3": (0.7, 4)}),
        Candidate({"fc1": (0.93, 4), "fc2": (0.955, 4), "fc3": (0.7, 5)}, steps=6, epochs=30),
    ],
    "cnn": [
        Candidate(
            {
                "conv1": (0.2, 6),
                "conv2": (0.78, 4),
                "fc1": (0.965, 4),
                "fc2": (0.965, 4),
                "fc3": (0.82, 4),
            }
        ),
        Candidate(
            {
                "conv1": (0.2, 6),
                "conv2": (0.75, 4),
                "fc1": (0.965, 4),
                "fc2": (0.965, 4),
                "fc3": (0.8, 4),
            }
        ),
        Candidate(
            {
                "conv1": (0.2, 6),
                "conv2": (0.75, 4),
                "fc1": (0.97, 4),
                "fc2": (0.97, 4),
                "fc3": (0.8, 4),
            }
        ),
    ],
}


def plan_for(c: Candidate) -> CompressionPlan:
    """Magnitude pruning per layer, symmetric per-tensor codes, 8-bit biases, distillation.

    The most common (sparsity, bits) pair becomes the plan's default and only the other layers
    get overrides: the recipe travels in the archive's header, where every override costs
    about 90 bytes of a budget of a few kilobytes.
    """

    def layer(sparsity: float, bits: int) -> LayerConfig:
        return LayerConfig(
            prune=PruneConfig(method="magnitude", mode="sparsity", sparsity=sparsity),
            quant=QuantConfig(bits=bits, symmetric=True, per_channel=False, bias_bits=BIAS_BITS),
        )

    settings = list(c.layers.values())
    common = max(settings, key=settings.count)
    plan = CompressionPlan(
        default=layer(*common),
        recovery=RecoveryConfig(
            epochs=c.epochs,
            lr=c.lr,
            batch_size=c.batch_size,
            distill=True,
            temperature=4.0,
            alpha=c.alpha,
            prune_steps=c.steps,
        ),
    )
    for name, setting in c.layers.items():
        if setting != common:
            plan = plan.with_layer(name, layer(*setting))
    return plan


def run_candidate(name: str, c: Candidate, loaded, train, test, workdir: Path) -> dict:
    fit, val = recovery_split(train)
    plan = plan_for(c)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    result = compress_and_finetune(loaded, plan, fit, val)
    seconds = time.perf_counter() - t0
    path = workdir / f"{name}-{abs(hash(plan)) % 10**8}.packed.safetensors"
    record = export(result, "packed", path, force=True, data=test)
    zpath = path.with_name(path.name.replace(".packed.", ".zstd.packed."))
    zrecord = export(result, "packed", zpath, force=True, data=test, entropy=True)
    before = evaluate(loaded, test, latency=False)
    after = evaluate(result.compressed, test, reference=loaded, latency=False)
    val_before = evaluate(loaded, val, latency=False).accuracy
    val_after = evaluate(result.compressed, val, latency=False).accuracy
    dense = fp32_bytes(loaded.module)
    return {
        "candidate": c,
        "plan": plan,
        "result": result,
        "packed_bytes": record.bytes_on_disk,
        "estimate_bytes": (record.extra or {}).get("estimate_bytes"),
        "max_abs_diff": record.max_abs_diff,
        "dense_bytes": dense,
        "ratio": dense / record.bytes_on_disk,
        "zstd_bytes": zrecord.bytes_on_disk,
        "zstd_ratio": dense / zrecord.bytes_on_disk,
        "zstd_max_abs_diff": zrecord.max_abs_diff,
        "entropy_bound_bytes": (record.extra or {}).get("entropy_bound_bytes"),
        "acc_before": before.accuracy,
        "acc_after": after.accuracy,
        "agreement": after.agreement,
        "val_before": val_before,
        "val_after": val_after,
        "seconds": seconds,
    }


def pick(name: str, runs: list[dict]) -> dict:
    """Smallest archive meeting the ratio target with the val drop within the limit."""
    ratio, drop = TARGETS[name]
    ok = [
        r for r in runs if r["ratio"] >= ratio and 100 * (r["val_before"] - r["val_after"]) <= drop
    ]
    pool = ok or runs
    return min(pool, key=lambda r: r["packed_bytes"] if ok else -r["val_after"])


def table(name: str, best: dict, runs: list[dict]) -> list[str]:
    res = best["result"]
    paper = PAPER[name]
    ratio_t, drop_t = TARGETS[name]
    err_b = 100 * (1 - best["acc_before"])
    err_a = 100 * (1 - best["acc_after"])
    met = best["ratio"] >= ratio_t and (err_a - err_b) <= drop_t
    params = sum(p.numel() for p in best["result"].original.module.parameters())
    lines = [
        f"### demo:{name} ({paper[0]} style, {params:,} parameters)",
        "",
        f"Target: >= {ratio_t:.0f}x smaller than fp32 with at most {drop_t} point accuracy drop "
        f"-> **{'met' if met else 'NOT met'}**. Deep Compression Table 1, {paper[0]} on MNIST: "
        f"{paper[1]:.2f}% -> {paper[2]:.2f}% error at {paper[3]}x.",
        "",
        "| Layer | Weights | Kept (nnz) | Sparsity | Bits | Bias bits | SQNR vs fp32 dB | Packed B |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res.layers:
        cfg = best["plan"].config_for(r.name)
        lines.append(
            f"| {r.name} | {r.numel:,} | {r.nnz:,} | {100 * r.sparsity:.1f}% | {r.bits} | "
            f"{cfg.quant.bias_bits} | {r.sqnr_db:.1f} | {r.packed_bytes:,} |"
        )
    lines += [
        f"| **total** | {res.total_numel:,} | {res.total_nnz:,} | {100 * res.sparsity:.1f}% "
        f"| | | | |",
        "",
        "| | Top-1 error (test) | Size on disk | Compression |",
        "|---|---:|---:|---:|",
        f"| fp32 reference (all parameters) | {err_b:.2f}% | {best['dense_bytes']:,} B | 1x |",
        f"| compressed, `model.packed.safetensors` | {err_a:.2f}% | "
        f"{best['packed_bytes']:,} B | **{best['ratio']:.1f}x** |",
        f"| same, codes zstd-coded (`--entropy`) | {err_a:.2f}% | {best['zstd_bytes']:,} B "
        f"| {best['zstd_ratio']:.1f}x |",
        "",
        f"Top-1 agreement with the original: {100 * best['agreement']:.2f}%. Held-out "
        f"validation accuracy (picks the best fine-tuning checkpoint; with `--search` also the "
        f"recipe): {100 * best['val_before']:.2f}% -> "
        f"{100 * best['val_after']:.2f}%. Packed archive restores the compressed model exactly "
        f"(max abs output difference {best['max_abs_diff']:.1e}); size estimate "
        f"{best['estimate_bytes']:,} B, entropy bound {best['entropy_bound_bytes']:,} B. "
        f"Recovery: {best['candidate'].steps - 1} pruning steps + 1 quantization step, "
        f"{best['candidate'].epochs} epochs each, {best['seconds']:.1f} s. Reproduce (with "
        f"the same number of threads: another count changes a few pruning decisions): "
        f"`workbench compress demo:{name} --recipe resources/recipes/demo_{name}.json "
        f"--out DIR`.",
        "",
    ]
    if len(runs) > 1:
        lines += [
            "Candidates tried (sparsity/bits per layer -> size, ratio, val and test accuracy):",
            "",
        ]
        for r in runs:
            c = r["candidate"]
            spec = ", ".join(f"{k} {sp:.3g}/{b}" for k, (sp, b) in c.layers.items())
            mark = " (chosen)" if r is best else ""
            lines.append(
                f"- {spec}, {c.steps} steps x {c.epochs} epochs: {r['packed_bytes']:,} B, "
                f"{r['ratio']:.1f}x, val {100 * r['val_after']:.2f}%, test "
                f"{100 * r['acc_after']:.2f}%{mark}"
            )
        lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--search", action="store_true", help="also run the alternative candidates")
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    out_lines = [
        "# Deep-Compression-style results on the digits demos",
        "",
        "Produced by `bench/deep_compression.py` "
        f"({time.strftime('%Y-%m-%d', time.gmtime())}, torch {torch.__version__}, "
        f"{platform.machine()}, {torch.get_num_threads()} threads). Method: iterative magnitude "
        "pruning per layer (density shrinks geometrically over the steps), distillation from "
        "the original (T=4, alpha=0.7) with the masks fixed, quantization-aware fine-tuning "
        "(straight-through) in the last step, symmetric per-tensor codes, biases at "
        f"{BIAS_BITS} bits. Sizes are bytes on disk of `model.packed.safetensors` (codes, "
        "sparsity pattern, scales, header with the recipe) against fp32 bytes of all "
        "parameters; Deep Compression's 40x/39x include Huffman coding, comparable to our "
        "zstd-coded row. Errors are on the fixed 30% test split of scikit-learn's digits "
        "(540 images, 1 image = 0.185 points); the best fine-tuning checkpoint and the "
        "recipe are chosen on a held-out 20% of the training split.",
        "",
    ]
    status = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            loaded = load_model(f"demo:{name}")
            train, test = demo_data_for(loaded)
            cands = CANDIDATES[name] if args.search else CANDIDATES[name][:1]
            runs = []
            for c in cands:
                r = run_candidate(name, c, loaded, train, test, Path(tmp))
                print(
                    f"demo:{name} {r['packed_bytes']:,} B {r['ratio']:.1f}x val "
                    f"{100 * r['val_before']:.2f}->{100 * r['val_after']:.2f} test "
                    f"{100 * r['acc_before']:.2f}->{100 * r['acc_after']:.2f} "
                    f"({r['seconds']:.0f} s)",
                    flush=True,
                )
                runs.append(r)
            best = pick(name, runs)
            out_lines += table(name, best, runs)
            ratio_t, drop_t = TARGETS[name]
            if best["ratio"] < ratio_t or 100 * (best["acc_before"] - best["acc_after"]) > drop_t:
                status = 1
            if not args.no_write:
                recipes = ROOT / "resources" / "recipes"
                recipes.mkdir(parents=True, exist_ok=True)
                best["plan"].save(recipes / f"demo_{name}.json")
    text = "\n".join(out_lines)
    print(text)
    if not args.no_write:
        (ROOT / "docs").mkdir(exist_ok=True)
        path = ROOT / "docs" / "results.md"
        old = path.read_text(encoding="utf-8") if path.is_file() else ""
        path.write_text(_keep_marked_sections(text, old), encoding="utf-8")
    return status


def _keep_marked_sections(new: str, old: str) -> str:
    """``new`` followed by every ``<!-- name:begin --> ... <!-- name:end -->`` section of ``old``
    that ``new`` does not have: other benchmarks (plan_demos, bench_second_order,
    deploy_ensemble) own those sections and rewrite only them."""
    import re

    kept = []
    for m in re.finditer(r"<!-- ([\w-]+):begin -->.*?<!-- \1:end -->", old, flags=re.S):
        if f"<!-- {m.group(1)}:begin -->" not in new:
            kept.append(m.group(0))  # each section carries its own heading
    return new.rstrip("\n") + "\n" + "".join("\n" + k + "\n" for k in kept)


if __name__ == "__main__":
    sys.exit(main())
