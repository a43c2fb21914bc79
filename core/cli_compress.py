"""``workbench compress MODEL --out DIR ...``: the whole pipeline headless.

load -> (data) -> analyze -> compress -> (fine-tune / distill) -> evaluate -> export -> recipe
+ report. The recipe written to ``DIR/recipe.json`` reproduces the run exactly.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from core.errors import CompressionError, ExportError, RecipeError
from core.plan import METHOD_HELP, PRUNE_METHODS, CompressionPlan, simple_plan
from core.progress import ProgressFn

#: Files in the output directory that are never overwritten without ``--force``.
PROTECTED = ("recipe.json", "report.json", "report.html")
DEFAULT_FORMATS = ("packed",)


def register(subparsers) -> None:
    """Add the ``compress`` subcommand to the ``workbench`` parser."""
    methods = "; ".join(f"{m}: {METHOD_HELP[m]}" for m in PRUNE_METHODS if m != "none")
    p = subparsers.add_parser(
        "compress",
        help="prune + quantize a model (and optionally fine-tune), export it and write a report",
        description=(
            "Compress MODEL (a file or demo:mlp / demo:cnn) with a recipe or with "
            "--sparsity/--bits/--method, write the compressed model, the recipe and "
            "report.json into --out."
        ),
        epilog=f"Pruning methods. {methods}",
    )
    p.add_argument("model", metavar="MODEL", help="model file or demo:mlp / demo:cnn")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--recipe", metavar="R.json", help="recipe file (excludes the three below)")
    p.add_argument(
        "--sparsity",
        type=float,
        metavar="S",
        help="target fraction of zeros over all prunable weights, in [0, 1)",
    )
    p.add_argument("--bits", type=int, metavar="B", help="quantization width 2..16 (default off)")
    p.add_argument(
        "--method",
        metavar="M",
        help=f"pruning criterion: {', '.join(PRUNE_METHODS)} (default magnitude)",
    )
    p.add_argument("--data", metavar="FILE", help=".npz/.pt with 'x' and optional 'y'")
    p.add_argument(
        "--finetune-epochs", type=int, metavar="N", help="fine-tune N epochs with masks fixed"
    )
    p.add_argument(
        "--distill", action="store_true", help="distil from the original model while fine-tuning"
    )
    p.add_argument(
        "--trust", action="store_true", help="allow unpickling a full model (runs its code)"
    )
    p.add_argument(
        "--architecture", metavar="A", help="demo:mlp/demo:cnn architecture for a weights file"
    )
    p.add_argument(
        "--format",
        default=",".join(DEFAULT_FORMATS),
        metavar="F[,F...]",
        help="export formats: packed (default), onnx, onnx-int8, torchscript, state_dict, "
        "safetensors, pt2",
    )
    p.add_argument("--force", action="store_true", help="overwrite existing files in --out")
    p.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    p.set_defaults(func=run)


# ---------------------------------------------------------------------------------------
def _plan_from_args(args: argparse.Namespace) -> CompressionPlan:
    flags = [f for f in ("sparsity", "bits", "method") if getattr(args, f) is not None]
    if args.recipe:
        if flags:
            raise RecipeError(
                f"--recipe cannot be combined with --{flags[0]}",
                hint="put the setting into the recipe or drop --recipe",
            )
        plan = CompressionPlan.load(args.recipe)
    else:
        method = args.method or "magnitude"
        if method not in PRUNE_METHODS:
            raise RecipeError(
                f"--method: {method!r} is not one of {', '.join(PRUNE_METHODS)}"
            )
        sparsity = args.sparsity if args.sparsity is not None else 0.0
        if not (math.isfinite(sparsity) and 0.0 <= sparsity < 1.0):
            raise RecipeError(f"--sparsity: {sparsity} is out of range [0, 1)")
        if args.bits is not None and not 2 <= args.bits <= 16:
            raise RecipeError(f"--bits: {args.bits} is out of range 2..16")
        plan = simple_plan(sparsity, args.bits, method)
    recovery = plan.recovery
    if args.finetune_epochs is not None:
        if not 0 <= args.finetune_epochs <= 10_000:
            raise RecipeError(f"--finetune-epochs: {args.finetune_epochs} is out of range 0..10000")
        recovery = replace(recovery, epochs=args.finetune_epochs)
    if args.distill:
        recovery = replace(recovery, distill=True)
    return plan.with_recovery(recovery)


def _formats(text: str) -> list[str]:
    from core.export import EXPORT_FORMATS

    formats = [f.strip() for f in text.split(",") if f.strip()]
    bad = [f for f in formats if f not in EXPORT_FORMATS]
    if bad or not formats:
        raise ExportError(
            f"--format: {bad[0] if bad else text!r} is not a known format",
            hint=f"choose from {', '.join(EXPORT_FORMATS)}",
        )
    return list(dict.fromkeys(formats))


def _check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError("--out exists and is not a directory", path=out)
    if not out.is_dir() or force:
        return
    existing = sorted(
        p.name for p in out.iterdir() if p.name.startswith("model.") or p.name in PROTECTED
    )
    if existing:
        raise ExportError(
            f"{existing[0]} already exists in the output directory",
            path=out,
            hint="pass --force to overwrite, or choose another --out",
        )


def _random_inputs(loaded, n: int = 64):
    """Random inputs shaped like the model's example input (fidelity without data)."""
    from core.data import make_dataset

    ex = loaded.example_input
    if ex is None:
        return None
    g = torch.Generator().manual_seed(0)
    shape = (n, *ex.shape[1:])
    if ex.dtype.is_floating_point:
        lo, hi = float(ex.min()), float(ex.max())
        if lo >= 0.0 and hi <= 1.0:
            x = torch.rand(shape, generator=g)
        else:
            x = torch.randn(shape, generator=g)
        x = x.to(ex.dtype)
    else:
        x = torch.randint(0, int(ex.max()) + 1, shape, generator=g).to(ex.dtype)
    return make_dataset(x, None, name="random inputs")


def _data_for(loaded, path: str | None):
    """(train, test) datasets: the user's file split 80/20, the demo's digits split, or None."""
    from core.data import demo_data_for, load_data, split_dataset

    if path:
        data = load_data(path)
        return split_dataset(data, holdout=0.2, seed=0)
    return demo_data_for(loaded)


def _say(quiet: bool) -> ProgressFn:
    last = {"msg": ""}

    def _progress(fraction: float, message: str) -> None:
        if quiet:
            return
        head = message.split(",")[0]
        if head != last["msg"]:
            last["msg"] = head
            print(f"  {message}", file=sys.stderr, flush=True)

    return _progress


def _eval_dict(ev) -> dict[str, Any] | None:
    if ev is None:
        return None
    d = ev.to_dict()
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def run(args: argparse.Namespace) -> int:
    """Run ``workbench compress``; returns the exit code (errors raise `WorkbenchError`)."""
    from core.engine import compress
    from core.evaluate import evaluate
    from core.export import export_all
    from core.model_io import load_model
    from core.report import write_report
    from core.stats import analyze
    from core.training import finetune

    plan = _plan_from_args(args)
    formats = _formats(args.format)
    out = Path(args.out)
    _check_out_dir(out, args.force)
    progress = _say(args.quiet)

    progress(0.0, f"loading {args.model}")
    loaded = load_model(args.model, trust=args.trust, architecture=args.architecture)
    split = _data_for(loaded, args.data) if loaded.can_run else None
    train, test = split if split is not None else (None, None)
    progress(0.0, "analyzing")
    stats = analyze(loaded, train if loaded.can_run else None, progress=progress)
    progress(0.0, "compressing")
    result = compress(loaded, plan, stats, progress=progress)
    if plan.recovery.epochs > 0:
        if train is None:
            raise CompressionError(
                "fine-tuning needs training data",
                path=args.model,
                hint="pass --data FILE (x and y arrays) or drop --finetune-epochs",
            )
        from core.data import split_dataset

        fit, val = split_dataset(train, holdout=0.2, seed=1)
        progress(0.0, "fine-tuning")
        result = finetune(result, fit, val, plan.recovery, progress=progress)

    evals: dict[str, Any] = {"before": None, "after": None, "data": None}
    eval_data = test if test is not None else (_random_inputs(loaded) if loaded.can_run else None)
    if eval_data is not None:
        progress(0.0, f"evaluating on {eval_data.name}")
        evals["before"] = evaluate(loaded, eval_data)
        evals["after"] = evaluate(result.compressed, eval_data, reference=loaded)
        evals["data"] = eval_data.name

    out.mkdir(parents=True, exist_ok=True)
    progress(0.0, "exporting")
    exports = export_all(result, formats, out, force=args.force, data=test, progress=progress)
    plan.save(out / "recipe.json")
    json_path, _html = write_report(result, out, evals=evals, exports=exports)
    summary = _summary(result, evals, exports, loaded)
    _merge_report(Path(json_path), summary)
    ratio = summary["compression_ratio"]
    acc_b, acc_a = summary["accuracy_before"], summary["accuracy_after"]
    acc = (
        f", accuracy {100 * acc_b:.2f}% -> {100 * acc_a:.2f}%"
        if acc_b is not None and acc_a is not None
        else ""
    )
    print(
        f"{args.model}: {summary['original_bytes']:,} B fp32 -> {summary['compressed_bytes']:,} B "
        f"packed ({ratio:.1f}x), sparsity {100 * summary['sparsity']:.1f}%{acc}; wrote {out}"
    )
    return 0


def fp32_bytes(module: torch.nn.Module) -> int:
    """Bytes of every floating-point parameter stored as float32 (the baseline size)."""
    return sum(4 * p.numel() for p in module.parameters() if p.dtype.is_floating_point)


def _summary(result, evals: dict[str, Any], exports, loaded) -> dict[str, Any]:
    """The fields report.json must carry whatever else the report writer adds."""
    packed = [r for r in exports if getattr(r, "format", None) == "packed"]
    compressed = (
        int(Path(packed[0].path).stat().st_size)
        if packed
        else sum(r.packed_bytes for r in result.layers)
    )
    original = fp32_bytes(loaded.module)
    before, after = evals.get("before"), evals.get("after")
    return {
        "model": loaded.source,
        "original_bytes": original,
        "compressed_bytes": compressed,
        "compression_ratio": original / compressed if compressed else None,
        "sparsity": result.sparsity,
        "accuracy_before": before.accuracy if before is not None else None,
        "accuracy_after": after.accuracy if after is not None else None,
        "fidelity": {
            "data": evals.get("data"),
            "agreement": after.agreement if after is not None else None,
            "rel_l2": after.rel_l2 if after is not None else None,
            "cosine": after.cosine if after is not None else None,
            "latency_ms_before": before.latency_ms_per_batch if before is not None else None,
            "latency_ms_after": after.latency_ms_per_batch if after is not None else None,
        },
        "layers": [r.to_dict() for r in result.layers],
        "removed_channels": {k: list(v) for k, v in result.removed_channels.items()},
    }


def _merge_report(path: Path, summary: dict[str, Any]) -> None:
    """Add the required fields to the report writer's JSON (its own values win)."""
    data: dict[str, Any] = {}
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
    for key, value in summary.items():
        if data.get(key) is None:
            data[key] = value
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False, default=str) + "\n", "utf-8")
    tmp.replace(path)
