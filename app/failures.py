"""Dialog text for failures the engine did not anticipate, and their log line.

Expected failures are `core.base.errors.WorkbenchError`s and carry their own one-line message (file,
what is wrong, what to do). Anything else that escapes a job is either an engine bug or a bad
input the engine does not yet recognise; the dialog still names the file, says what could not be
done and what to try, and the full traceback goes to stderr and the dialog's details, so a real
bug stays visible and reportable.
"""

from __future__ import annotations

import sys
import traceback

#: Longest reason (an exception's first line) quoted in a dialog; torch's can run for pages.
MAX_REASON = 200

#: Per job kind (plus "recipe"): what could not be done to the subject, and what to try.
_WHAT = {
    "load": "the model file could not be opened",
    "data": "the data file could not be read",
    "recipe": "the recipe could not be read",
    "export": "the export could not be written",
}
_ADVICE = {
    "load": "the file may be damaged or written by an incompatible tool: save or download it "
    "again; if it opens elsewhere, please report this with the details",
    "data": "the file may be damaged: save it again, e.g. numpy.savez('data.npz', x=x, y=y); "
    "if it reads fine elsewhere, please report this with the details",
    "recipe": "the file may be damaged: save the recipe again from the workbench; if it looks "
    "fine, please report this with the details",
    "export": "check that the folder is writable and the disk has room, then export again; "
    "otherwise please report this with the details",
}
_BUG_ADVICE = (
    "this is a bug in the workbench, please report it with the details; the open model and "
    "plan are unchanged"
)


def short_reason(exc: BaseException) -> str:
    """``Type: first line of the message`` (reason cut to `MAX_REASON` characters)."""
    lines = str(exc).strip().splitlines()
    reason = lines[0].strip() if lines else ""
    if len(reason) > MAX_REASON:
        reason = reason[: MAX_REASON - 3].rstrip() + "..."
    cls = type(exc)
    # zlib.error and friends say little without their module.
    name = (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )
    return f"{name}: {reason}" if reason else name


def unexpected_message(kind: str, subject: str, exc: BaseException, title: str = "") -> str:
    """One line for an exception that is not a `WorkbenchError`.

    Parameters
    ----------
    kind
        The job kind (``load``, ``data``, ``export``...) or ``recipe``.
    subject
        The file or folder the operation worked on, or the model's source; may be empty.
    exc
        The exception.
    title
        What the operation is called in the UI ("Analyze"), for kinds without a file of their own.

    Returns
    -------
    str
        ``"<subject>: <what failed> (unexpected <Type>: <reason>); <what to do>"``.
    """
    what = _WHAT.get(kind) or f"{(title or kind).lower()} failed"
    advice = _ADVICE.get(kind, _BUG_ADVICE)
    head = f"{subject}: {what}" if subject else what[:1].upper() + what[1:]
    return f"{head} (unexpected {short_reason(exc)}); {advice}"


def log_unexpected(title: str, details: str | BaseException) -> str:
    """Print an unexpected failure's traceback to stderr; returns the traceback text."""
    if isinstance(details, BaseException):
        details = "".join(traceback.format_exception(type(details), details, details.__traceback__))
    print(f"workbench: {title}: unexpected error\n{details.rstrip()}", file=sys.stderr)
    return details
