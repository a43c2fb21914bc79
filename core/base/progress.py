"""Progress callbacks and cancel tokens shared by every long-running core function."""

from __future__ import annotations

import threading
from collections.abc import Callable

from core.base.errors import Cancelled

#: ``progress(fraction_done in [0, 1], message)``
ProgressFn = Callable[[float, str], None]


def no_progress(fraction: float, message: str) -> None:
    """Progress sink that ignores everything."""


class CancelToken:
    """Thread-safe flag a worker checks between layers/batches; ``check`` raises `Cancelled`."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled()


def scaled(progress: ProgressFn, start: float, stop: float) -> ProgressFn:
    """Map a sub-task's 0..1 progress into ``[start, stop]`` of the parent's progress."""

    def _inner(fraction: float, message: str) -> None:
        progress(start + (stop - start) * min(max(fraction, 0.0), 1.0), message)

    return _inner
