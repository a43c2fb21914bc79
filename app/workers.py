"""Background jobs: a function run on a thread pool with progress, cancel and a result signal.

Every long engine call (load, analyze, compress, evaluate, fine-tune, export) runs here so the
UI thread only ever draws. A job reports through Qt signals that are delivered, queued, on the
thread that created the `JobRunner` (the UI thread). The runner stamps each job with an id;
the controller keeps the id of the newest job per kind and ignores anything else, so a result
that arrives after it was superseded is simply dropped.
"""

from __future__ import annotations

import importlib
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PySide6.QtCore import QObject, QRunnable, QThreadPool, Signal

from app._compat import ensure_signal_refcounts
from core.base.progress import CancelToken, ProgressFn

ensure_signal_refcounts()

#: A job body: ``fn(progress, cancel) -> result``; it runs on a worker thread.
JobFn = Callable[[ProgressFn, CancelToken], Any]

#: Progress updates closer together than this are coalesced (the last one wins), so a tight
#: engine loop cannot flood the UI thread's event queue.
PROGRESS_INTERVAL_S = 0.05


#: Modules the engine imports lazily on first use. Importing one runs module code and loads
#: shared libraries while holding the GIL; done mid-job that froze the UI for ~200 ms (torch
#: pulls in torch._dynamo, sympy and torch.onnx on the first optimizer step / export), so the
#: window imports them once, in the background, at start-up.
WARM_MODULES = (
    "core.io.model_io",
    "core.analysis.inventory",
    "core.io.data",
    "core.analysis.stats",
    "core.analysis.estimate",
    "core.compress.engine",
    "core.evaluate",
    "core.recovery.training",
    "core.export.formats",
    "core.export.report",
    "torch.optim",
    "torch._dynamo",
    "torch.onnx",
    # What torch.export.load imports on first use (it reaches into torch._dynamo).
    "torch.export.pt2_archive",
)

#: Serialises the imports of `WARM_MODULES`. torch._dynamo, torch._export and torch.onnx import
#: each other in cycles: when two threads import into such a cycle at once, Python's deadlock
#: avoidance hands one of them a partially initialised module, the import fails, and the
#: half-built modules left in ``sys.modules`` make every later ``torch.export.load`` fail too
#: (a ``.pt2`` opened at start-up raced the warm-up that way). So the warm-up holds this lock
#: while importing, and every job takes it (a no-op once done) before its body runs.
_IMPORT_LOCK = threading.Lock()
#: How often a job waiting for the imports looks at its cancel token.
_IMPORT_POLL_S = 0.05

_warm_started = False
_imported = False


def _import_fresh(name: str, attempts: int = 2) -> bool:
    """Import ``name``; after a failure, drop the half-built modules it left and try again.

    Returns whether the module is importable. A module that is simply absent (optional parts
    of slim torch builds) is not an error: the job that needs it reports the problem itself.
    """
    for attempt in range(attempts):
        before = set(sys.modules)
        try:
            importlib.import_module(name)
            return True
        except ModuleNotFoundError as exc:
            if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
                return False
            error: Exception = exc
        except Exception as exc:  # noqa: BLE001 - a broken import must not kill the warm-up
            error = exc
        _drop_half_imported(name, before)
        if attempt == attempts - 1:
            print(
                f"workbench: warning: importing {name} failed "
                f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                "the features that need it will report the problem",
                file=sys.stderr,
            )
    return False


def _drop_half_imported(name: str, before: set[str]) -> None:
    """Forget the modules a failed import of ``name`` added under its package tree.

    Python removes the module whose code raised, but keeps the submodules that finished before
    the failure; a later import then re-runs the package's ``__init__`` without setting those
    submodules as attributes again (``torch._dynamo.utils`` went missing that way), so they
    must be re-imported too. Only modules this attempt added are dropped.
    """
    for mod in set(sys.modules) - before:
        if mod == name or mod.startswith(name + "."):
            sys.modules.pop(mod, None)


def import_engine_modules(cancel: CancelToken | None = None) -> None:
    """Import `WARM_MODULES` once per process, never two threads at a time.

    Waits while another thread (the start-up warm-up) is importing them; ``cancel`` is checked
    while waiting, so a cancelled job stops without waiting for the imports to finish.

    Raises
    ------
    Cancelled
        ``cancel`` was set while waiting.
    """
    global _imported
    if _imported:
        return
    while not _IMPORT_LOCK.acquire(timeout=_IMPORT_POLL_S):
        if cancel is not None:
            cancel.check()
    try:
        if not _imported:
            for name in WARM_MODULES:
                _import_fresh(name)
            _imported = True
    finally:
        _IMPORT_LOCK.release()


def warm_up_engine() -> threading.Thread | None:
    """Run `import_engine_modules` on a daemon thread (once per process); returns that thread.

    Jobs submitted meanwhile wait for it before their body runs (see `_IMPORT_LOCK`).
    """
    global _warm_started
    if _warm_started or _imported:
        return None
    _warm_started = True
    thread = threading.Thread(target=import_engine_modules, name="workbench-warm-up", daemon=True)
    thread.start()
    return thread


@dataclass
class JobHandle:
    """Book-keeping of one submitted job (lives on the UI thread)."""

    job_id: int
    kind: str
    description: str
    token: CancelToken = field(default_factory=CancelToken)
    fraction: float = 0.0
    message: str = ""
    started_at: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        self.token.cancel()


class _JobSignals(QObject):
    """Signals of one job; created on the UI thread so emissions from the worker are queued."""

    progressed = Signal(int, float, str)
    succeeded = Signal(int, object)
    failed = Signal(int, object, str)


class _Job(QRunnable):
    def __init__(self, job_id: int, fn: JobFn, token: CancelToken, signals: _JobSignals):
        super().__init__()
        self.setAutoDelete(False)
        self._id = job_id
        self._fn = fn
        self._token = token
        self._signals = signals
        self._last_emit = 0.0
        self._done_sent = False

    def _progress(self, fraction: float, message: str) -> None:
        now = time.perf_counter()
        # "Done" always gets through once, so the bar never stops short of full.
        finishing = fraction >= 1.0 and not self._done_sent
        if now - self._last_emit >= PROGRESS_INTERVAL_S or finishing:
            self._last_emit = now
            self._done_sent = self._done_sent or fraction >= 1.0
            self._signals.progressed.emit(self._id, float(fraction), str(message))

    def run(self) -> None:
        # The runnable outlives the job (`JobRunner._graveyard`): it must not keep the
        # function, whose closure holds the job's inputs (a replaced model of 10**9 weights).
        fn, self._fn = self._fn, None
        try:
            self._token.check()
            # Never run engine code while another thread imports torch's lazy modules.
            import_engine_modules(self._token)
            self._token.check()
            result = fn(self._progress, self._token)
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the UI, never kill the thread
            self._signals.failed.emit(self._id, exc, traceback.format_exc())
        else:
            self._signals.succeeded.emit(self._id, result)


class JobRunner(QObject):
    """Runs `JobFn` bodies on a private thread pool and re-emits their outcome on the UI thread.

    Signals carry the job id; `handle` gives the rest. At most ``max_threads`` jobs run at once
    (more wait in the queue); a cancelled job stops at its next ``cancel.check()``.
    """

    jobProgressed = Signal(int, float, str)
    jobSucceeded = Signal(int, object)
    jobFailed = Signal(int, object, str)

    def __init__(self, parent: QObject | None = None, *, max_threads: int = 3):
        super().__init__(parent)
        self._pool = QThreadPool(self)
        self._pool.setMaxThreadCount(max_threads)
        self._next_id = 0
        self._handles: dict[int, JobHandle] = {}
        # The runnables and their signal objects must outlive the worker thread's use of them:
        # a finished job's last emit is delivered while its run() may still be unwinding, so
        # finished jobs rest in a bounded graveyard instead of being freed at once.
        self._alive: dict[int, tuple[_Job, _JobSignals]] = {}
        self._graveyard: deque[tuple[_Job, _JobSignals]] = deque(maxlen=32)

    def submit(
        self, kind: str, description: str, fn: JobFn, *, token: CancelToken | None = None
    ) -> JobHandle:
        """Queue ``fn``; ``token`` lets the caller share the job's cancel token (a session
        job's own), otherwise a fresh one is made."""
        self._next_id += 1
        handle = JobHandle(self._next_id, kind, description)
        if token is not None:
            handle.token = token
        signals = _JobSignals()
        signals.progressed.connect(self._on_job_progressed)
        signals.succeeded.connect(self._on_job_succeeded)
        signals.failed.connect(self._on_job_failed)
        job = _Job(handle.job_id, fn, handle.token, signals)
        self._handles[handle.job_id] = handle
        self._alive[handle.job_id] = (job, signals)
        self._pool.start(job)
        return handle

    def handle(self, job_id: int) -> JobHandle | None:
        return self._handles.get(job_id)

    def running(self) -> list[JobHandle]:
        """Jobs submitted and not yet finished, oldest first."""
        return sorted(self._handles.values(), key=lambda h: h.job_id)

    def cancel_all(self) -> None:
        for handle in self._handles.values():
            handle.cancel()

    def wait(self, msecs: int = -1) -> bool:
        """Block until every job has returned (used on shutdown and in tests)."""
        return self._pool.waitForDone(msecs)

    def _on_job_progressed(self, job_id: int, fraction: float, message: str) -> None:
        handle = self._handles.get(job_id)
        if handle is None:
            return
        handle.fraction, handle.message = fraction, message
        self.jobProgressed.emit(job_id, fraction, message)

    def _finish(self, job_id: int) -> None:
        self._handles.pop(job_id, None)
        entry = self._alive.pop(job_id, None)
        if entry is not None:
            self._graveyard.append(entry)

    def _on_job_succeeded(self, job_id: int, result: object) -> None:
        # Emit before forgetting the handle so listeners can still look it up.
        self.jobSucceeded.emit(job_id, result)
        self._finish(job_id)

    def _on_job_failed(self, job_id: int, exc: object, tb: str) -> None:
        self.jobFailed.emit(job_id, exc, tb)
        self._finish(job_id)
