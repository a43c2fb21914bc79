"""Compression Workbench engine: pure Python + torch + numpy. Never imports Qt."""

from pathlib import Path

__version__ = "0.1.0"

#: Shipped demo weights, icons and sample data live beside the packages (editable install).
RESOURCES = Path(__file__).resolve().parent.parent / "resources"
