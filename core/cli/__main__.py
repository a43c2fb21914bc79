"""`python -m core.cli`: the same as the `workbench` command-line entry."""

import sys

from core.cli.main import main

sys.exit(main())
