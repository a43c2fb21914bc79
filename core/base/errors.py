"""Typed errors. Every message names the file (when there is one), what was wrong and what to do."""

from __future__ import annotations

from pathlib import Path


class WorkbenchError(Exception):
    """Base class of every expected failure; the CLI prints it in one line, the GUI in a dialog."""

    def __init__(self, message: str, *, path: str | Path | None = None, hint: str | None = None):
        self.path = str(path) if path is not None else None
        self.reason = message
        self.hint = hint
        parts = []
        if self.path:
            parts.append(f"{self.path}: ")
        parts.append(message)
        if hint:
            parts.append(f" ({hint})")
        super().__init__("".join(parts))


class ModelLoadError(WorkbenchError):
    """A model file could not be opened: missing, empty, truncated, unknown or unsupported format."""


class UntrustedPickleError(ModelLoadError):
    """The file needs unpickling of arbitrary objects and the user has not said they trust it."""


class DataError(WorkbenchError):
    """A data file is missing, malformed, or does not match the model."""


class RecipeError(WorkbenchError):
    """A recipe is malformed: unknown key, wrong type or out-of-range value (message names the field)."""


class CompressionError(WorkbenchError):
    """A plan cannot be applied to this model."""


class ExportError(WorkbenchError):
    """An export could not be written; nothing partial is left behind."""


class Cancelled(WorkbenchError):
    """The user cancelled a long operation; nothing half-done was kept."""

    def __init__(self, message: str = "cancelled by the user"):
        super().__init__(message)
