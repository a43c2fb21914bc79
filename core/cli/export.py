"""``workbench export COMPRESSED_DIR --format ...``: re-export a compressed model.

Reads ``COMPRESSED_DIR/model.packed.safetensors`` (written by ``workbench compress``), restores
the compressed model on the original architecture (``--base``, default: the source recorded in
the archive) and writes the requested formats as ``model.<ext>`` next to it (or into ``--out``).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from core.base.errors import ExportError
from core.base.outdir import output_dir, recover
from core.export.deploy import check_records
from core.export.formats import EXPORT_FORMATS, export_all, parse_formats, result_from_packed
from core.export.report import update_report
from core.io.data import demo_data_for, load_data

ARCHIVE = "model.packed.safetensors"


def register(subparsers) -> None:
    """Add the ``export`` subcommand to the ``workbench`` parser."""

    p = subparsers.add_parser(
        "export",
        help="re-export a compressed model (from its packed archive) to other formats",
        description=(
            f"Restore the compressed model from COMPRESSED_DIR/{ARCHIVE} and write "
            "model.<ext> files for the requested formats. Every export is checked against the "
            "restored PyTorch model on data (max abs difference) and timed."
        ),
    )
    p.add_argument(
        "compressed_dir",
        metavar="COMPRESSED_DIR",
        help=f"directory written by `workbench compress` (holds {ARCHIVE})",
    )
    p.add_argument(
        "--format",
        required=True,
        metavar="F[,F...]",
        help=f"comma-separated: {', '.join(EXPORT_FORMATS)}",
    )
    p.add_argument("--out", metavar="DIR", help="output directory (default: COMPRESSED_DIR)")
    p.add_argument(
        "--base",
        metavar="MODEL",
        help="the original model (file or demo:mlp/demo:cnn) that gives the architecture; "
        "default: the source recorded in the archive",
    )
    p.add_argument("--trust", action="store_true", help="allow unpickling a pickled --base model")
    p.add_argument(
        "--data", metavar="FILE", help=".npz/.pt with 'x': verification/calibration inputs"
    )
    p.add_argument(
        "--entropy", action="store_true", help="packed: entropy-code the codes with zstd"
    )
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(func=run)


def _data(result, path: str | None):

    if path:
        return load_data(path, result.original)
    if not result.original.can_run:
        return None
    split = demo_data_for(result.original)
    return split[1] if split is not None else None


def run(args: argparse.Namespace) -> int:
    """Run ``workbench export``; returns the exit code (errors raise `WorkbenchError`).

    The new files and the updated report are written into a staging copy of the output
    directory (its existing files hard-linked in), which replaces it only once complete.
    """

    formats = parse_formats(args.format)
    src = Path(args.compressed_dir)
    if not src.exists():
        # A run killed while swapping the directory in leaves it renamed aside: put it back.
        recover(src)
    if not src.exists():
        raise ExportError(
            "no such directory",
            path=src,
            hint="pass the --out directory of `workbench compress` (it writes the packed archive)",
        )
    archive = src / ARCHIVE if src.is_dir() else src
    if not archive.is_file():
        raise ExportError(
            f"no {ARCHIVE} in this directory",
            path=src,
            hint="pass the --out directory of `workbench compress` (it writes the packed archive)",
        )
    out = Path(args.out) if args.out else archive.parent
    with output_dir(out, force=args.force, merge_existing=True) as stage:
        # Into its own directory: read the staged snapshot, taken under the lock.
        same = out.resolve() == archive.parent.resolve()
        result = result_from_packed(
            stage / archive.name if same else archive, args.base, trust=args.trust
        )
        data = _data(result, args.data)
        records = export_all(
            result, formats, stage, force=args.force, data=data, entropy=args.entropy
        )
        # Run each written file itself on the held-out data (accuracy, latency spread).
        records, warnings = check_records(records, result, data)
        for line in warnings:
            print(f"workbench export: warning: {line}", file=sys.stderr, flush=True)
        records = [replace(r, path=out / r.path.name) for r in records]
        # Keep the report that `compress` wrote beside the files in step with them.
        update_report(result, stage, records)
    if not args.quiet:
        width = max((len(str(r.path)) for r in records), default=0)
        for r in records:
            diff = "n/a" if r.max_abs_diff is None else f"{r.max_abs_diff:.2e}"
            lat = "n/a" if r.latency_ms is None else f"{r.latency_ms:.3f} ms"
            print(
                f"{r.format:<12} {str(r.path):<{width}}  {r.bytes_on_disk:>10,} B  "
                f"max|diff| {diff}  latency {lat}  {r.note}",
                file=sys.stdout,
            )
    return 0
