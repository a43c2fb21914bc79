"""``workbench ensemble MODEL --out DIR``: K compressed variants vs one model at equal bytes.

Writes ``member_<i>.packed.safetensors``, ``single.packed.safetensors`` and ``ensemble.json``
(see `core.recovery.ensemble.run_ensemble`) into ``--out`` as one transaction, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from core.base.errors import DataError
from core.base.outdir import output_dir
from core.cli.compress import _say
from core.io.data import demo_data_for, load_data, split_dataset
from core.io.model_io import load_model
from core.recovery.ensemble import EnsembleSpec, run_ensemble, summary_lines

#: Files an ensemble run owns in its output folder (members are numbered 1..16).
OWNED = (
    "ensemble.json",
    "single.packed.safetensors",
    *(f"member_{i}.packed.safetensors" for i in range(1, 17)),
)


def register(subparsers) -> None:
    """Add the ``ensemble`` subcommand to the ``workbench`` parser."""
    p = subparsers.add_parser(
        "ensemble",
        help="compare K compressed variants (an ensemble) with one model at the same bytes",
        description=(
            "Compress MODEL K times (pruning methods cycled, each member fine-tuned on its own "
            "bootstrap sample), average their predictions, and compare with a single model "
            "compressed less aggressively to the same total packed size."
        ),
    )
    p.add_argument("model", metavar="MODEL", help="model file or demo:mlp / demo:cnn")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--members", type=int, default=2, metavar="K", help="members, 2..16 (2)")
    p.add_argument("--sparsity", type=float, default=0.8, metavar="S", help="members' sparsity")
    p.add_argument("--bits", type=int, default=4, metavar="B", help="members' bits (4)")
    p.add_argument(
        "--methods",
        default="magnitude",
        metavar="M[,M...]",
        help="pruning criteria cycled over the members (default magnitude)",
    )
    p.add_argument(
        "--finetune-epochs",
        type=int,
        default=2,
        metavar="N",
        help="fine-tuning epochs per member and for the single model (2)",
    )
    p.add_argument("--distill", action="store_true", help="distil every model from the original")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed of member 1 (0)")
    p.add_argument("--data", metavar="FILE", help=".npz/.pt with 'x' and 'y' (80/20 split)")
    p.add_argument("--trust", action="store_true", help="allow unpickling a full model")
    p.add_argument("--force", action="store_true", help="overwrite an earlier ensemble run")
    p.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``workbench ensemble``; returns the exit code."""

    spec = EnsembleSpec(
        members=args.members,
        sparsity=args.sparsity,
        bits=args.bits,
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        epochs=args.finetune_epochs,
        distill=args.distill,
        seed=args.seed,
    )
    progress = _say(args.quiet)
    out = Path(args.out)
    with output_dir(out, force=args.force, owned=OWNED) as stage:
        loaded = load_model(args.model, trust=args.trust)
        if args.data:
            train, test = split_dataset(load_data(args.data, loaded), holdout=0.2, seed=0)
        else:
            split = demo_data_for(loaded)
            if split is None:
                raise DataError(
                    "an ensemble needs labelled data to fine-tune and score the members",
                    path=args.model,
                    hint="give --data FILE with 'x' and 'y'",
                )
            train, test = split
        res = run_ensemble(loaded, spec, train, test, stage, progress=progress)
        res["model"] = args.model
        (stage / "ensemble.json").write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    print("\n".join(summary_lines(res)))
    print(
        f"{args.model}: winner at equal bytes: {res['winner']} "
        f"(ensemble {res['ensemble']['bytes']:,} B, single {res['single']['bytes']:,} B); "
        f"wrote {out}",
        file=sys.stdout,
    )
    return 0
