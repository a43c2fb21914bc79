"""``workbench scan MODEL [--data D] [--method M] [--out scan.json]``: per-layer sensitivity.

Prints one row per prunable layer with the damage of pruning it alone (float32 weights) at a
few sparsities and of quantizing it alone at a few widths; ``--out`` writes every curve as
JSON (`core.planning.sensitivity.SensitivityScan.to_dict`). Without data (or for a weights-only
checkpoint) the curves are data-free estimates and say so.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from core.base.errors import RecipeError
from core.base.methods import prune_method
from core.base.outdir import atomic_write
from core.base.progress import ProgressFn
from core.planning.sensitivity import Level, scan
from core.recipe.plan import PRUNE_METHODS
from core.session import Session

#: Columns of the table: (label, level) pairs picked from the scanned grid.
_SPARSITY_COLUMNS = (0.5, 0.8, 0.9, 0.95, 0.99)
_BITS_COLUMNS = (8, 6, 4, 3, 2)


def add_model_options(p: argparse.ArgumentParser) -> None:
    """Options `scan` and `plan` share: model, data, criterion, cache."""
    p.add_argument(
        "model", metavar="MODEL", help="model file, Hugging Face folder or demo:mlp / demo:cnn"
    )
    p.add_argument(
        "--data",
        metavar="FILE",
        help=".npz/.pt with 'x' and optional 'y', or .txt/.jsonl text for a Hugging Face "
        "folder (split 80/20; the 20%% is scanned). Demos use the built-in digits",
    )
    p.add_argument(
        "--method",
        default="magnitude",
        metavar="M",
        help=f"pruning criterion of the sparsity axis: {', '.join(PRUNE_METHODS)}",
    )
    p.add_argument("--samples", type=int, default=512, metavar="N", help="held-out samples used")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the scan cache")
    p.add_argument("--trust", action="store_true", help="allow unpickling a full model")
    p.add_argument(
        "--arch",
        "--architecture",
        dest="architecture",
        metavar="DEMO",
        help="give a state_dict/safetensors file a demo architecture",
    )
    p.add_argument("--quiet", action="store_true", help="no progress messages on stderr")


def register(subparsers) -> None:
    """Add the ``scan`` subcommand."""
    p = subparsers.add_parser(
        "scan",
        help="measure how much each layer can be pruned / quantized on its own",
        description=(
            "Compress each prunable layer alone over a grid of sparsities x bit-widths and "
            "measure the effect on held-out data (loss/accuracy delta, output cosine). Results "
            "are cached (in $WORKBENCH_CACHE or ~/.cache/compression-workbench/sensitivity)."
        ),
    )
    add_model_options(p)
    p.add_argument("--out", metavar="scan.json", help="write every curve as JSON")
    p.set_defaults(func=run)


def progress_printer(quiet: bool) -> ProgressFn:
    """Progress on stderr, at most one line per layer/step."""
    last = {"head": ""}

    def _progress(fraction: float, message: str) -> None:
        if quiet:
            return
        head = message.split(",")[0]
        if head != last["head"]:
            last["head"] = head
            print(f"  [{100 * fraction:3.0f}%] {message}", file=sys.stderr, flush=True)

    return _progress


def open_session(args: argparse.Namespace, progress: ProgressFn) -> Any:
    """A strict session with the model, its data (``--data`` or the demo digits) and stats."""

    if args.method not in PRUNE_METHODS:
        raise RecipeError(f"--method: {args.method!r} is not one of {', '.join(PRUNE_METHODS)}")
    if not 1 <= args.samples <= 1_000_000:
        raise RecipeError(f"--samples: {args.samples} is out of range 1..1000000")
    session = Session(strict=True)
    progress(0.0, f"loading {args.model}")
    session.run(session.open_model(args.model, trust=args.trust, architecture=args.architecture))
    for note in session.model.metadata.get("notes", ()):
        print(f"workbench: warning: {note}", file=sys.stderr, flush=True)
    if args.data:
        session.run(session.open_data(args.data))
    grads = prune_method(args.method).needs_gradients
    progress(0.0, "analyzing")
    session.run(session.analyze(gradients=grads))
    return session


def run_scan(args: argparse.Namespace, session: Any, progress: ProgressFn, data: Any = None):
    """The scan for the session's model on ``data`` (default: its held-out split)."""

    data = data if data is not None else session.test
    return scan(
        session.model,
        session.stats,
        data if session.model.can_run else None,
        method=args.method,
        max_samples=args.samples,
        cache=not args.no_cache,
        progress=progress,
    )


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def scan_table(result: Any) -> str:
    """One line per layer: damage at a few sparsities (float32) and widths (unpruned)."""

    unit = {
        "loss": "loss delta",
        "lm_loss": "next-token loss delta (nats/token)",
        "fidelity": "rel. L2^2",
        "proxy": "1/SQNR (estimate)",
    }
    heads = [f"s{s:g}" for s in _SPARSITY_COLUMNS] + [f"{b}b" for b in _BITS_COLUMNS]
    width = max([len(c.name) for c in result.layers] + [5])
    lines = [
        f"damage = {unit.get(result.metric, result.metric)} when only that layer is compressed"
        + (" -- ESTIMATES, no data" if result.estimate else "")
    ]
    lines.append(f"{'layer':<{width}} {'weights':>9} " + " ".join(f"{h:>7}" for h in heads))
    for curve in result.layers:
        cells = []
        for s in _SPARSITY_COLUMNS:
            p = curve.point(Level(s, None, False))
            cells.append(_fmt(p.damage if p else None))
        for b in _BITS_COLUMNS:
            p = curve.point(Level(0.0, b, False))
            cells.append(_fmt(p.damage if p else None))
        lines.append(
            f"{curve.name:<{width}} {curve.numel:>9,} " + " ".join(f"{c:>7}" for c in cells)
        )
    base = result.baseline
    if base.get("loss") is not None:
        acc = f", accuracy {100 * base['acc']:.2f}%" if base.get("acc") is not None else ""
        what = "next-token loss" if result.metric == "lm_loss" else "loss"
        lines.append(
            f"baseline on {result.samples} held-out samples: {what} {base['loss']:.4f}{acc}"
        )
    lines.append(
        f"scan: {result.seconds:.2f} s ({result.cached_layers}/{len(result.layers)} layers from "
        f"cache; one evaluation pass {result.eval_seconds * 1000:.1f} ms; "
        f"{'; '.join(result.notes)})"
    )
    return "\n".join(lines)


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as JSON atomically."""

    atomic_write(Path(path), [(json.dumps(obj, indent=1) + "\n").encode("utf-8")], force=True)


def run(args: argparse.Namespace) -> int:
    progress = progress_printer(args.quiet)
    session = open_session(args, progress)
    result = run_scan(args, session, progress)
    print(scan_table(result))
    if args.out:
        write_json(args.out, result.to_dict())
        print(f"wrote {args.out}")
    return 0
