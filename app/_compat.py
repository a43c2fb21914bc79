"""Guard against PySide6 6.12.0's reference leak on ``Signal.emit``.

PySide6 6.12.0 returns ``Py_True`` from ``SignalInstance.emit`` without taking a reference, so
every emit made from Python drops one reference to ``True``. On Python 3.12+ ``True`` is
immortal and nothing happens; on 3.11 the interpreter aborts ("bool_dealloc") after a few
hundred signals. pyproject excludes that release; this module makes a workbench running on it
anyway survive: it measures the leak once and, only if it is there, gives ``True`` the same
practically-infinite reference count CPython 3.12 gives it by design.
"""

from __future__ import annotations

import ctypes
import sys
import warnings

_checked = False

#: References added to ``True`` when the leak is present: one per emit for ~10^12 emits.
_HEADROOM = 1 << 40


def signal_emit_leaks() -> bool:
    """True when emitting a Qt signal from Python loses a reference to ``True``."""
    from PySide6.QtCore import QObject, Signal

    class _Probe(QObject):
        pinged = Signal()

    probe = _Probe()
    before = sys.getrefcount(True)
    for _ in range(8):
        probe.pinged.emit()
    return sys.getrefcount(True) < before


def ensure_signal_refcounts() -> None:
    """Check once per process; compensate (with a warning) when the leak is present."""
    global _checked
    if _checked or sys.version_info >= (3, 12):
        _checked = True
        return
    _checked = True
    if not signal_emit_leaks():
        return
    # ob_refcnt is the first field of every PyObject in release builds of CPython.
    ctypes.c_ssize_t.from_address(id(True)).value += _HEADROOM
    warnings.warn(
        "this PySide6 release leaks a reference on every Signal.emit(); compensated. "
        "Install PySide6-Essentials != 6.12.0 to fix it properly.",
        RuntimeWarning,
        stacklevel=2,
    )
