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

from core.base.errors import RecipeError
from core.base.outdir import output_dir
from core.base.progress import ProgressFn
from core.cli.plan import add_target_options, planned_plan, record_planning
from core.export.deploy import cost_block
from core.export.devices import device_block, fits_line, get_device
from core.export.formats import check_formats, parse_formats
from core.export.outputs import owned_names, write_into
from core.export.report import stored_narrower
from core.export.stream import archive_evals, can_stream_outputs, latency_warnings, stream_into
from core.io.data import make_dataset
from core.recipe.edits import ReplacePlan
from core.recipe.plan import (
    METHOD_HELP,
    PRUNE_METHODS,
    QUANT_METHODS,
    CompressionPlan,
    PruneConfig,
    simple_plan,
)
from core.session import Session

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
    p.add_argument(
        "model", metavar="MODEL", help="model file, Hugging Face folder or demo:mlp / demo:cnn"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    _add_recipe_args(p)
    _add_training_args(p)
    _add_loading_args(p)
    _add_export_args(p)
    _add_device_args(p)
    p.add_argument("--force", action="store_true", help="overwrite existing files in --out")
    p.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    add_target_options(p, compress=True)
    p.set_defaults(func=run)


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    """Recipe options: a recipe file, or the simple plan's sparsity, bits, quantizer and method."""
    p.add_argument("--recipe", metavar="R.json", help="recipe file (excludes the three below)")
    p.add_argument(
        "--sparsity",
        type=float,
        metavar="S",
        help="target fraction of zeros over all prunable weights, in [0, 1)",
    )
    p.add_argument("--bits", type=int, metavar="B", help="quantization width 2..16 (default off)")
    p.add_argument(
        "--quant",
        metavar="Q",
        help=f"rounding rule with --bits: {', '.join(QUANT_METHODS)} (default rtn; gptq needs "
        "calibration data: the training split of --data or the demo's digits)",
    )
    p.add_argument(
        "--group-size",
        type=int,
        metavar="G",
        help="one scale per G consecutive inputs of each output channel (e.g. 32/64/128)",
    )
    p.add_argument(
        "--method",
        metavar="M",
        help=f"pruning criterion: {', '.join(PRUNE_METHODS)} (default magnitude)",
    )


def _add_training_args(p: argparse.ArgumentParser) -> None:
    """Data and fine-tuning options: held-out / calibration data, epochs, distillation."""
    p.add_argument(
        "--data",
        metavar="FILE",
        help=".npz/.pt with 'x' and optional 'y'; .txt/.jsonl text for Hugging Face folders",
    )
    p.add_argument(
        "--finetune-epochs", type=int, metavar="N", help="fine-tune N epochs with masks fixed"
    )
    p.add_argument(
        "--distill", action="store_true", help="distil from the original model while fine-tuning"
    )


def _add_loading_args(p: argparse.ArgumentParser) -> None:
    """Model loading options: unpickling and a demo architecture for weights-only files."""
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


def _add_export_args(p: argparse.ArgumentParser) -> None:
    """Export options: formats and the packed archive's entropy coding."""
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


def _add_device_args(p: argparse.ArgumentParser) -> None:
    """Deployment target options: device profile fit and serving cost."""
    p.add_argument(
        "--device",
        metavar="NAME",
        help="report whether the result fits this device profile (rpi4, jetson-nano, phone, "
        "mcu, x86-server, or one of --devices)",
    )
    p.add_argument(
        "--devices", metavar="FILE", help="device catalogue JSON (default resources/devices.json)"
    )
    p.add_argument(
        "--instance-price",
        type=float,
        metavar="USD_PER_HOUR",
        help="report the cost per million inferences before/after at this instance price",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=1,
        metavar="N",
        help="batches served in parallel for --instance-price (default 1: the latency is "
        "measured with all CPU threads)",
    )


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
    quant_flags = {
        "method": getattr(args, "quant", None),
        "group_size": getattr(args, "group_size", None),
    }
    quant_flags = {k: v for k, v in quant_flags.items() if v is not None}
    if quant_flags:
        if args.recipe:
            raise RecipeError(
                "--recipe cannot be combined with --quant/--group-size",
                hint="put quant.method / quant.group_size into the recipe or drop --recipe",
            )
        try:
            quant = replace(plan.default.quant, **quant_flags)
        except RecipeError as exc:
            raise RecipeError(
                f"--{exc.reason.replace('method:', 'quant:')}", hint=exc.hint
            ) from None
        plan = plan.with_default(replace(plan.default, quant=quant))
    recovery = plan.recovery
    if args.finetune_epochs is not None:
        if not 0 <= args.finetune_epochs <= 10_000:
            raise RecipeError(f"--finetune-epochs: {args.finetune_epochs} is out of range 0..10000")
        recovery = replace(recovery, epochs=args.finetune_epochs)
    if args.distill:
        recovery = replace(recovery, distill=True)
    return plan.with_recovery(recovery)


def _random_inputs(loaded, n: int = 64):
    """Random inputs shaped like the model's example input (fidelity without data)."""

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
    elif ex.ndim >= 3:
        # Integer channels (token ids / attention mask / token types of a Hugging Face
        # model): each channel drawn within its own range, so a mask stays 0/1 and token
        # types stay valid; ids up to the vocabulary when the model says how large it is.
        x = torch.empty(shape, dtype=torch.int64)
        vocab = _vocab_size(loaded)
        for c in range(shape[1]):
            lo, hi = int(ex[:, c].min()), int(ex[:, c].max())
            if c == 0 and vocab:
                lo, hi = 0, vocab - 1
            x[:, c] = torch.randint(lo, hi + 1, (n, *shape[2:]), generator=g)
        x = x.to(ex.dtype)
    else:
        x = torch.randint(0, int(ex.max()) + 1, shape, generator=g).to(ex.dtype)
    return make_dataset(x, None, name="random inputs")


def _vocab_size(loaded) -> int | None:
    """The vocabulary of a model opened from a Hugging Face folder, else ``None``."""
    if not isinstance(loaded.metadata.get("hf"), dict):
        return None
    config = getattr(getattr(loaded.module, "hf", None), "config", None)
    vocab = getattr(config, "vocab_size", None)
    return int(vocab) if isinstance(vocab, int) and vocab > 0 else None


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
    once complete (`core.base.outdir.OutputTransaction`).
    """

    plan = _plan_from_args(args)
    formats = parse_formats(args.format)
    _check_target_args(args)
    out = Path(args.out)
    progress = _say(args.quiet)
    with output_dir(out, force=args.force, owned=owned_names()) as stage:
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
    """Drive a strict `core.session.Session` through load -> data -> analyze -> (plan) ->
    compress -> evaluate, then write every file into ``stage``; returns the report."""

    session = Session(strict=True)
    session.subscribe(_print_notices)
    progress(0.0, f"loading {args.model}")
    loaded = session.run(
        session.open_model(
            args.model,
            trust=args.trust,
            architecture=args.architecture,
            plan=plan,
            recipe_path=args.recipe,
        ),
        progress,
    )[0]
    # Fail before minutes of work when the plan or a requested format cannot run here.
    session.check_runnable()
    check_formats(
        session.model, formats, has_input=bool(args.data) or loaded.example_input is not None
    )
    if args.data and session.model.can_run:
        session.run(session.open_data(args.data, label_with_model=False), progress)
    elif not session.model.can_run:
        session.train = session.test = None
    progress(0.0, "analyzing")
    session.run(session.analyze(), progress)
    planned = planned_plan(
        args, session.model, session.stats, session.train, session.plan, progress
    )
    session.edit(ReplacePlan(plan=planned), merge=False)
    if _streams(args, session, formats):
        return _pipeline_streamed(args, session, stage, out, progress)
    progress(0.0, "compressing")
    session.run(session.compress(), progress)
    eval_data = session.test
    if eval_data is None and session.model.can_run:
        eval_data = _random_inputs(session.model)
    if eval_data is not None:
        progress(0.0, f"evaluating on {eval_data.name}")
        session.run(session.evaluate(eval_data), progress)
    ev = session.evaluation
    evals = {
        "before": ev.before if ev else None,
        "after": ev.after if ev else None,
        "data": ev.data_name if ev else None,
    }
    progress(0.0, "exporting")
    records, content = write_into(
        stage,
        out,
        session.result,
        formats,
        plan=session.plan,
        evals=evals,
        data=session.test,
        entropy=args.entropy,
        report_extra=_target_blocks(args, session, evals),
        progress=progress,
    )
    _print_targets(content or {})
    return record_planning(stage / "report.json", args)


def _streams(args: argparse.Namespace, session: Session, formats: list[str]) -> bool:
    """A model packed without data, fine-tuning, calibration, channel removal or device/cost
    blocks: compressed tensor by tensor into the archive (`core.export.stream`)."""
    if getattr(args, "device_profile", None) is not None or args.instance_price is not None:
        return False
    return can_stream_outputs(session.model, session.plan, session.stats, formats, session.test)


def _pipeline_streamed(
    args: argparse.Namespace, session: Session, stage: Path, out: Path, progress: ProgressFn
) -> dict[str, Any]:
    """`_pipeline`'s compress and export steps in one pass over the tensors (the same
    archive); a model with a forward pass is then evaluated on random inputs like the dense
    path does, on the model the archive restores (`core.export.stream.archive_evals`)."""
    progress(0.0, "compressing and exporting packed")
    eval_data = _random_inputs(session.model) if session.model.can_run else None
    evals: Any = {"before": None, "after": None, "data": None}
    if eval_data is not None:
        evals = archive_evals(session.model, eval_data, progress)
    _, content, _ = stream_into(
        stage,
        out,
        session.model,
        session.plan,
        session.stats,
        recipe=session.plan,
        evals=evals,
        entropy=args.entropy,
        report_extra={"warnings": latency_warnings(session.model)},
        progress=progress,
    )
    _print_targets(content)
    return record_planning(stage / "report.json", args)


def _check_target_args(args: argparse.Namespace) -> None:
    """Validate --device/--instance-price before any work (a bad catalogue fails fast)."""
    args.device_profile = None
    if getattr(args, "device", None):
        args.device_profile = get_device(args.device, args.devices)
    price = getattr(args, "instance_price", None)
    if price is not None and not (math.isfinite(price) and price >= 0):
        raise RecipeError(f"--instance-price: {price} is not a price >= 0 (USD per hour)")
    if getattr(args, "concurrency", 1) < 1:
        raise RecipeError(f"--concurrency: {args.concurrency} is not >= 1")


def _target_blocks(args: argparse.Namespace, session: Any, evals: dict[str, Any]):
    """The report's ``device`` and ``cost`` blocks, computed from the checked exports."""
    profile = getattr(args, "device_profile", None)
    price = getattr(args, "instance_price", None)
    if profile is None and price is None:
        return None

    def blocks(records: list[Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if profile is not None:
            data = session.test
            sample = data.x if data is not None else session.model.example_input
            out["device"] = device_block(profile, session.result, records, sample)
        if price is not None:
            out["cost"] = cost_block(price, evals, records, concurrency=args.concurrency)
        return out

    return blocks


def _print_targets(report: dict[str, Any]) -> None:
    """Warnings of the deployed check, device fit and cost, one line each on stderr."""
    for line in report.get("warnings") or ():
        print(f"workbench compress: warning: {line}", file=sys.stderr, flush=True)
    if report.get("device"):
        print(f"workbench compress: {fits_line(report['device'])}", file=sys.stderr, flush=True)
    cost = report.get("cost")
    if cost and cost.get("before") and cost.get("after"):
        print(
            f"workbench compress: cost per million inferences at "
            f"${cost['instance_price_per_hour_usd']:g}/h: ${cost['before']['usd_per_million']:.4g}"
            f" before -> ${cost['after']['usd_per_million']:.4g} after "
            f"({cost['after']['measured']})",
            file=sys.stderr,
            flush=True,
        )


def _print_notices(event: str, payload: Any) -> None:
    if event == "notice":
        text = str(payload)
        kind = "warning" if text.startswith("warning: ") else "note"
        text = text.removeprefix("warning: ")
        print(f"workbench compress: {kind}: {text}", file=sys.stderr, flush=True)


def _as_stored(report: dict[str, Any]) -> str:
    """`` (N B as stored)`` when the original is narrower than fp32 (bfloat16/float16)."""
    return f" ({report['stored_bytes']:,} B as stored)" if stored_narrower(report) else ""


def _summary_line(model: str, report: dict[str, Any], out: Path) -> str:
    """One line for the terminal: sizes, ratio, sparsity and accuracy before/after."""
    size = report.get("compressed_bytes")
    ratio = report.get("compression_ratio")
    packed = f"{size:,} B packed ({ratio:.1f}x)" if size and ratio else "no packed export"
    narrow = report.get("compression_ratio_vs_stored")
    if size and ratio and narrow and _as_stored(report):
        packed = f"{size:,} B packed ({ratio:.1f}x; {narrow:.1f}x vs stored)"
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
        f"{model}: {report['original_bytes']:,} B fp32{_as_stored(report)} -> {packed}, sparsity "
        f"{100 * report['sparsity']:.1f}%{acc}{rel_txt}{on}; wrote {out}"
    )
