"""``workbench compress MODEL --out DIR ...``: the whole pipeline headless.

load -> (data) -> analyze -> compress -> (fine-tune / distill) -> evaluate -> export -> recipe
+ report. The recipe written to ``DIR/recipe.json`` reproduces the run exactly.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from core.cli_plan import add_target_options, planned_plan, record_planning
from core.errors import CompressionError, RecipeError
from core.plan import (
    GRADIENT_METHODS,
    METHOD_HELP,
    PRUNE_METHODS,
    CompressionPlan,
    PruneConfig,
    simple_plan,
)
from core.progress import ProgressFn

#: Files in the output directory that are never overwritten without ``--force``.
PROTECTED = ("recipe.json", "report.json", "report.html")
DEFAULT_FORMATS = ("packed",)


def register(subparsers) -> None:
    """Add the ``compress`` subcommand to the ``workbench`` parser."""
    methods = "; ".join(f"{m}: {METHOD_HELP[m].rstrip('.')}" for m in PRUNE_METHODS if m != "none")
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
        "--arch",
        "--architecture",
        dest="architecture",
        metavar="DEMO",
        help="give a state_dict/safetensors file a demo architecture (demo:mlp or demo:cnn)",
    )
    p.add_argument(
        "--format",
        default=",".join(DEFAULT_FORMATS),
        metavar="F[,F...]",
        help="export formats: packed (default), onnx, onnx-int8, torchscript, state_dict, "
        "safetensors, pt2",
    )
    p.add_argument(
        "--entropy",
        action="store_true",
        help="entropy-code the packed archive's codes with zstd where smaller",
    )
    p.add_argument("--force", action="store_true", help="overwrite existing files in --out")
    p.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    add_target_options(p, compress=True)
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
            raise RecipeError(f"--method: {method!r} is not one of {', '.join(PRUNE_METHODS)}")
        if method == "none" and args.sparsity:
            raise RecipeError(
                "--sparsity has no effect with --method none",
                hint="choose a pruning method or drop --sparsity",
            )
        sparsity = args.sparsity if args.sparsity is not None else 0.0
        if not (math.isfinite(sparsity) and 0.0 <= sparsity < 1.0):
            raise RecipeError(f"--sparsity: {sparsity} is out of range [0, 1)")
        if method == "nm" and args.sparsity is not None:
            # N:M fixes the sparsity at N/M; silently ignoring another target would write a
            # report whose sparsity differs from what the user asked for.
            nm = PruneConfig()
            if not math.isclose(sparsity, nm.n / nm.m, abs_tol=1e-9):
                raise RecipeError(
                    f"--sparsity: {sparsity} is not possible with --method nm, which prunes "
                    f"{nm.n} of every {nm.m} weights (sparsity {nm.n / nm.m:g})",
                    hint="drop --sparsity, or give other n and m in a recipe's default.prune",
                )
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


def _owned() -> tuple[str, ...]:
    """Names a compress run writes or makes stale (refused without ``--force``, else replaced)."""
    from core.export import FILE_NAMES

    return (*FILE_NAMES.values(), *PROTECTED)


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
    from core.data import check_data, demo_data_for, load_data, split_dataset

    if path:
        data = load_data(path)
        check_data(loaded, data)
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


def run(args: argparse.Namespace) -> int:
    """Run ``workbench compress``; returns the exit code (errors raise `WorkbenchError`).

    The output location, the lock on it and existing files (without ``--force``) are checked
    before any work; everything is written into a staging folder that replaces ``--out`` only
    once complete (`core.outdir.OutputTransaction`).
    """
    from core.export import parse_formats
    from core.outdir import output_dir

    plan = _plan_from_args(args)
    formats = parse_formats(args.format)
    out = Path(args.out)
    progress = _say(args.quiet)
    with output_dir(out, force=args.force, owned=_owned()) as stage:
        report = _pipeline(args, plan, formats, stage, out, progress)
    print(_summary_line(args.model, report, out))
    return 0


def _pipeline(
    args: argparse.Namespace,
    plan: CompressionPlan,
    formats: list[str],
    stage: Path,
    out: Path,
    progress: ProgressFn,
) -> dict[str, Any]:
    """Load, compress, evaluate and write every file into ``stage``; returns the report."""
    from core.engine import protect_output_layer
    from core.evaluate import evaluate, require_forward
    from core.export import check_formats, export_all
    from core.model_io import load_model
    from core.outdir import pause_point
    from core.report import write_report
    from core.stats import analyze
    from core.training import compress_and_finetune, recovery_split

    progress(0.0, f"loading {args.model}")
    loaded = load_model(args.model, trust=args.trust, architecture=args.architecture)
    if not any(p.numel() and p.is_floating_point() for p in loaded.module.parameters()):
        raise CompressionError(
            "the model has no weights to compress",
            path=args.model,
            hint="it has 0 floating-point parameters; check that this is the right file",
        )
    for note in loaded.metadata.get("notes", ()):
        print(f"workbench compress: warning: {note}", file=sys.stderr, flush=True)
    configs = [plan.default, *(cfg for _, cfg in plan.overrides)]
    needs_grads = any(c.prune.active and c.prune.method in GRADIENT_METHODS for c in configs)
    if needs_grads and not loaded.can_run:
        raise CompressionError(
            "gradient criteria (taylor, gradient_stability) need a forward pass; this is a "
            "weights-only checkpoint",
            path=args.model,
            hint="use magnitude/channel/nm pruning, or give a TorchScript/.pt2 file",
        )
    if plan.recovery.epochs > 0:
        require_forward(loaded, "fine-tuning")
    # Fail before minutes of work when a requested format cannot be written for this model.
    check_formats(loaded, formats, has_input=bool(args.data) or loaded.example_input is not None)
    split = _data_for(loaded, args.data) if loaded.can_run else None
    train, test = split if split is not None else (None, None)
    if loaded.example_input is None and train is not None:
        # Tracing (channel removal, exports) needs an input; the data provides one.
        loaded = replace(loaded, example_input=train.x[:4].clone())
    progress(0.0, "analyzing")
    # Gradient statistics cost a few forward/backward passes; only the gradient criteria use them.
    stats = analyze(loaded, train if needs_grads else None)
    unknown = sorted(set(plan.layer_overrides) - {layer.name for layer in stats.layers})
    if unknown:
        raise RecipeError(
            f"layers.{unknown[0]}: the model has no layer of that name",
            path=args.recipe,
            hint="run `workbench inspect MODEL` for the layer names",
        )
    plan = protect_output_layer(plan, loaded, stats.layers)
    plan = planned_plan(args, loaded, stats, train, plan, progress)
    fit = val = None
    if plan.recovery.epochs > 0:
        if train is None:
            raise CompressionError(
                "fine-tuning needs training data",
                path=args.model,
                hint="pass --data FILE (x and y arrays) or drop --finetune-epochs",
            )
        fit, val = recovery_split(train)
    progress(0.0, "compressing")
    result = compress_and_finetune(loaded, plan, fit, val, stats=stats, progress=progress)

    evals: dict[str, Any] = {"before": None, "after": None, "data": None}
    eval_data = test if test is not None else (_random_inputs(loaded) if loaded.can_run else None)
    if eval_data is not None:
        progress(0.0, f"evaluating on {eval_data.name}")
        evals["before"] = evaluate(loaded, eval_data)
        evals["after"] = evaluate(result.compressed, eval_data, reference=loaded)
        evals["data"] = eval_data.name

    progress(0.0, "exporting")
    exports = export_all(result, formats, stage, force=args.force, data=test, entropy=args.entropy)
    # The report names each file where it will be once the staging folder is committed.
    exports = [replace(e, path=out / e.path.name) for e in exports]
    pause_point("exported")
    plan.save(stage / "recipe.json")
    json_path, _html = write_report(result, stage, evals=evals, exports=exports)
    return record_planning(json_path, args)


def _summary_line(model: str, report: dict[str, Any], out: Path) -> str:
    """One line for the terminal: sizes, ratio, sparsity and accuracy before/after."""
    size = report.get("compressed_bytes")
    ratio = report.get("compression_ratio")
    packed = f"{size:,} B packed ({ratio:.1f}x)" if size and ratio else "no packed export"
    acc_b, acc_a = report.get("accuracy_before"), report.get("accuracy_after")
    acc = (
        f", accuracy {100 * acc_b:.2f}% -> {100 * acc_a:.2f}%"
        if acc_b is not None and acc_a is not None
        else ""
    )
    fid = report.get("fidelity") or {}
    rel = fid.get("rel_l2")
    rel_txt = f", rel. L2 error {rel:.3g}" if rel is not None else ""
    on = f" (evaluated on {fid['data']})" if fid.get("data") else ""
    return (
        f"{model}: {report['original_bytes']:,} B fp32 -> {packed}, sparsity "
        f"{100 * report['sparsity']:.1f}%{acc}{rel_txt}{on}; wrote {out}"
    )
