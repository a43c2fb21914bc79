"""Headless command line: ``workbench inspect|compress|export ...``.

Each subcommand lives in its own module exposing ``register(subparsers)``; the parser's
``func`` returns the exit code. Expected failures (`WorkbenchError`) print one line on stderr
and exit 2; nothing prints a traceback for them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from core.base.errors import Cancelled, WorkbenchError
from core.base.memory import map_large_allocations
from core.base.outdir import interrupt_exit, interrupts_raise

#: subcommand -> module defining ``register(subparsers)``
SUBCOMMANDS = {
    "inspect": "core.cli.inspect",
    "compress": "core.cli.compress",
    "export": "core.cli.export",
    "scan": "core.cli.scan",
    "plan": "core.cli.plan",
    "ensemble": "core.cli.ensemble",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="workbench",
        description=(
            "Compression Workbench. Without a subcommand, opens the desktop workbench "
            "(`workbench [MODEL]`). Subcommands run the same engine headless."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS.values():
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    map_large_allocations()  # a batch run: its peak memory is what counts
    try:
        # SIGTERM must unwind like Ctrl-C so a half-written output directory is removed.
        with interrupts_raise():
            return int(args.func(args) or 0)
    except Cancelled as exc:
        print(f"workbench: {exc}", file=sys.stderr)
        return 130
    except WorkbenchError as exc:
        print(f"workbench {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        code, line = interrupt_exit(exc)
        print(f"workbench: {line}", file=sys.stderr)
        return code
    except BrokenPipeError:
        # The reader (e.g. `| head`) went away: stop quietly, like other Unix tools.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
