"""Console entry point ``workbench``: subcommands run headless (no Qt import); otherwise the GUI."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from core.cli.main import SUBCOMMANDS

    if argv and argv[0] in SUBCOMMANDS:
        from core.cli.main import main as cli_main

        return cli_main(argv)
    from app.__main__ import gui_main

    return gui_main(argv)


if __name__ == "__main__":
    sys.exit(main())
