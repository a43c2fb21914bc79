"""Output that is complete or untouched: atomic files and all-or-nothing output directories.

Single files go through `atomic_write` (temporary file beside the target, fsync, rename).

A run that fills an output directory (``workbench compress --out DIR``, ``workbench export``,
the window's export) writes everything into a fresh sibling ``DIR.<random>.partial`` and
commits it by renames in the same parent (one filesystem, so each rename is atomic):

- DIR missing: ``rename(partial, DIR)``;
- DIR present: its entries are hard-linked (copied where links fail) into the staging
  folder first, except the names this run replaces; then ``rename(DIR, DIR.<random>.old)``,
  ``rename(partial, DIR)`` and the old folder is removed. SIGINT/SIGTERM are blocked
  between the two renames.

An exclusive ``flock`` on ``.<DIR name>.workbench-lock`` in the parent is held for the whole
run, so a second run on the same DIR is refused at once. Whoever takes the lock next cleans
up after a killed run: a ``DIR.<random>.old`` is put back when DIR is missing (a crash
between the two renames), stale ``.partial``/``.old`` siblings are removed.

The CLI wraps each command in `interrupts_raise`: SIGINT and SIGTERM raise `Interrupted`
(a `KeyboardInterrupt`) in the main thread, so the staging folder is removed on the way out
and `interrupt_exit` gives the exit status (128 + signal) and a one-line message.

Test hook (documented in docs/user-guide.md): with ``WORKBENCH_TEST_PAUSE_AT=<stage>`` a run
prints ``workbench: test pause at <stage>`` on stderr at `pause_point` ``<stage>`` and sleeps
until the file named by ``WORKBENCH_TEST_PAUSE_RELEASE`` exists or
``WORKBENCH_TEST_PAUSE_S`` seconds (default 60) have passed, so tests can signal a run at a
known point.

Why one module of this size: the single-file atomic write, the directory transaction, the lock
and the signal handling must agree on one protocol (staging name, commit order, recovery of an
interrupted swap).

Why one module of this size: the staging directory, its lock, signal handling and recovery of a
killed run form one protocol; splitting it would scatter its invariants.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from core.base.errors import ExportError, WorkbenchError
from core.base.progress import CancelToken

PAUSE_ENV = "WORKBENCH_TEST_PAUSE_AT"
PAUSE_RELEASE_ENV = "WORKBENCH_TEST_PAUSE_RELEASE"
PAUSE_SECONDS_ENV = "WORKBENCH_TEST_PAUSE_S"

#: Pseudo-filesystems an output directory can never live in.
_FORBIDDEN_ROOTS = ("/proc", "/sys")
#: Signals that unwind a CLI run (see `interrupts_raise`).
_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: Leftovers of an interrupted `atomic_write` (``.NAME.<random>.tmp<suffix>``) and of the old
#: fixed-name recipe writer: never carried into a new output directory.
_TEMP_FILE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp[^/]*$|^\.recipe\.json\.tmp$")


# ---------------------------------------------------------------------------------------
# test hook
# ---------------------------------------------------------------------------------------
def pause_point(stage: str) -> None:
    """Sleep here when ``WORKBENCH_TEST_PAUSE_AT`` names ``stage`` (end-to-end tests only).

    The run announces the pause on stderr and waits until the file named by
    ``WORKBENCH_TEST_PAUSE_RELEASE`` exists or ``WORKBENCH_TEST_PAUSE_S`` seconds (default 60)
    have passed; a signal arriving meanwhile interrupts the sleep as usual.
    """
    if os.environ.get(PAUSE_ENV) != stage:
        return
    print(f"workbench: test pause at {stage}", file=sys.stderr, flush=True)
    release = os.environ.get(PAUSE_RELEASE_ENV)
    deadline = time.monotonic() + float(os.environ.get(PAUSE_SECONDS_ENV, "60"))
    while time.monotonic() < deadline and not (release and os.path.exists(release)):
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------
# single files
# ---------------------------------------------------------------------------------------
def _umask() -> int:
    """The process umask, read without changing it (os.umask would race other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _fsync_path(path: str | Path, *, directory: bool = False) -> None:
    """Flush ``path`` to disk; best effort for directories (some filesystems refuse)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def atomic_write(
    target: str | Path,
    chunks: Sequence[bytes] | None = None,
    *,
    force: bool = False,
    writer: Callable[[Path], Any] | None = None,
    cancel: CancelToken | None = None,
) -> None:
    """Write ``chunks`` (or call ``writer(tmp_path)``) to a temporary file, then rename.

    Parameters
    ----------
    target
        The file to create or replace; its directory must exist.
    chunks
        Bytes written in order.
    force
        Replace an existing ``target``; without it an existing file is an `ExportError`.
    writer
        Called with the temporary path after ``chunks`` are written (for libraries that
        write by file name: ``torch.save``, ``torch.jit.save`` ...).
    cancel
        Checked between chunks and before the rename.

    Raises
    ------
    ExportError
        ``target`` exists without ``force``, its directory is missing, or writing failed.

    Notes
    -----
    The temporary file has a unique name in the target's directory (so the rename is atomic
    and concurrent writers never share it), is flushed to disk before the rename, and is
    removed on any exception: errors, `Cancelled` and `KeyboardInterrupt` alike.
    """
    target = Path(target)
    if target.exists() and not force:
        raise ExportError("file already exists", path=target, hint="pass --force to overwrite it")
    if not target.parent.is_dir():
        raise ExportError(
            "output directory does not exist", path=target.parent, hint="create it first"
        )
    try:
        # The temporary name keeps the extension: some writers (torch.export.save) check it.
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=f".tmp{target.suffix}", dir=target.parent
        )
    except OSError as exc:
        raise ExportError(
            f"cannot create a file in this directory ({exc.strerror or exc})",
            path=target.parent,
            hint="choose a writable output directory",
        ) from exc
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks or ():
                if cancel is not None:
                    cancel.check()
                fh.write(chunk)
        if writer is not None:
            writer(tmp)
        pause_point(f"write:{target.name}")
        if cancel is not None:
            cancel.check()
        _fsync_path(tmp)
        # mkstemp creates 0600 files; give the export the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise ExportError(
                f"could not write the file ({exc.strerror or exc})", path=target
            ) from exc
        raise


# ---------------------------------------------------------------------------------------
# signals
# ---------------------------------------------------------------------------------------
class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived during a CLI run (raised by `interrupts_raise`'s handler).

    Attributes
    ----------
    signum
        The signal number.
    """

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


#: Signals held back by `_signals_deferred` (the handler runs in the main thread only).
_deferral: dict[str, Any] = {"depth": 0, "pending": []}


def _raise_interrupted(signum: int, frame: Any) -> None:
    if _deferral["depth"]:
        _deferral["pending"].append(signum)
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def interrupts_raise() -> Iterator[None]:
    """While inside, SIGINT and SIGTERM raise `Interrupted` in the main thread.

    Python's default SIGTERM action ends the process without running ``finally`` blocks, which
    would leave staging folders behind. A signal the process ignores (``nohup``, background
    jobs of a non-interactive shell) stays ignored. Outside the main thread this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Any] = {}
    for sig in _SIGNALS:
        current = signal.getsignal(sig)
        if current in (signal.SIG_DFL, signal.default_int_handler):
            previous[sig] = signal.signal(sig, _raise_interrupted)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def interrupt_exit(exc: BaseException) -> tuple[int, str]:
    """Exit status (128 + signal number) and one line describing what the interrupt left.

    `OutputTransaction` marks interrupts that pass through it with the output directory and
    whether it had already been committed.
    """
    code = 128 + getattr(exc, "signum", int(signal.SIGINT))
    out = getattr(exc, "workbench_out", None)
    if out is None:
        return code, "interrupted"
    if getattr(exc, "workbench_committed", False):
        return code, f"interrupted; {out} was already written completely"
    return code, f"interrupted; {out} left as it was"


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold back `interrupts_raise`'s exception until the block is done, then raise it.

    Masking the signal would not do: any thread (torch's pools included) can receive it, and
    Python then runs the handler in the main thread at its next bytecode.
    """
    _deferral["depth"] += 1
    try:
        yield
    finally:
        _deferral["depth"] -= 1
        pending = _deferral["pending"]
        if not _deferral["depth"] and pending:
            _deferral["pending"] = []
            raise Interrupted(pending[0])


# ---------------------------------------------------------------------------------------
# the output location
# ---------------------------------------------------------------------------------------
def check_output_location(out: str | Path) -> Path:
    """Refuse, before any work, an output directory that could not be written.

    The path must not be (or be inside) a regular file, must not be under ``/proc`` or
    ``/sys``, and its nearest existing ancestor must be a writable directory: a real probe
    folder is created and removed there, so read-only mounts and missing permissions are
    found even for root. An existing DIR must be a writable directory that is not the
    current directory (or one containing it), since the finished output replaces it.

    Returns
    -------
    Path
        The real (symlink-free, absolute) path of the output directory.

    Raises
    ------
    ExportError
        One line naming the path, what is wrong and what to do.
    """
    given = Path(out)
    real = Path(os.path.realpath(given))
    hint = "choose another output directory (--out)"
    for root in _FORBIDDEN_ROOTS:
        if real == Path(root) or Path(root) in real.parents:
            raise ExportError(f"cannot write output under {root}", path=given, hint=hint)
    if real.exists() and not real.is_dir():
        raise ExportError("exists and is not a directory", path=given, hint=hint)
    cwd = Path(os.path.realpath(os.getcwd()))
    if real.is_dir() and (real == cwd or real in cwd.parents or real == real.parent):
        # The finished output replaces DIR by a rename: never the folder a shell is in.
        raise ExportError(
            "is the current directory or contains it; the output replaces the whole folder",
            path=given,
            hint="choose a dedicated output directory such as ./out",
        )
    if real.is_dir() and not os.access(real, os.W_OK | os.X_OK):
        raise ExportError("the output directory is not writable", path=given, hint=hint)
    ancestor = real.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ExportError(f"{ancestor} is a file, not a directory", path=given, hint=hint)
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ExportError(f"{ancestor} is not writable", path=given, hint=hint)
    try:
        probe = tempfile.mkdtemp(prefix=".workbench-probe-", dir=ancestor)
        os.rmdir(probe)
    except OSError as exc:
        raise ExportError(
            f"cannot create folders in {ancestor} ({exc.strerror or exc})", path=given, hint=hint
        ) from exc
    return real


# ---------------------------------------------------------------------------------------
# lock
# ---------------------------------------------------------------------------------------
def lock_path(real_out: Path) -> Path:
    """The lock file of an output directory: ``.<name>.workbench-lock`` in its parent."""
    return real_out.parent / f".{real_out.name}.workbench-lock"


class _Lock:
    """Exclusive, non-blocking ``flock`` on the output directory's lock file.

    The file is removed on release; a taker checks that the file it locked is still the one at
    the path (the inode), so two runs can never both hold a lock on different inodes.
    """

    def __init__(self, real_out: Path, shown: Path):
        self.path = lock_path(real_out)
        self.shown = shown
        self.fd: int | None = None

    def acquire(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise ExportError(
                    f"cannot create the lock file ({exc.strerror or exc})",
                    path=self.path,
                    hint="choose another output directory (--out)",
                ) from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                pid = self._holder(fd)
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise ExportError(
                        f"cannot lock the output directory ({exc.strerror or exc})",
                        path=self.path,
                    ) from exc
                raise ExportError(
                    f"another workbench run is writing {self.shown} (pid {pid}); wait for it "
                    "or choose another --out"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            # The previous holder removed the file between our open and flock: try again.
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self.fd = fd

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        except OSError:
            text = ""
        return text if text.isdigit() else "unknown"

    def release(self) -> None:
        if self.fd is None:
            return
        # Unlink while still holding the lock, so nobody can lock the file being removed.
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = None


# ---------------------------------------------------------------------------------------
# staging, recovery, commit
# ---------------------------------------------------------------------------------------
def _siblings(real_out: Path, kind: str) -> list[Path]:
    """``DIR.<8 random>.<kind>`` folders next to DIR (leftovers when the lock is free)."""
    pattern = re.compile(rf"^{re.escape(real_out.name)}\.[a-z0-9_]{{8}}\.{kind}$")
    try:
        names = os.listdir(real_out.parent)
    except OSError:
        return []
    return [real_out.parent / n for n in names if pattern.match(n)]


def _remove_tree(path: Path) -> None:
    """Remove a staging/old folder, never following a symlink out of it."""
    if path.is_symlink() or not path.exists():
        with contextlib.suppress(OSError):
            path.unlink()
        return
    shutil.rmtree(path, ignore_errors=True)


def _recover(real_out: Path) -> None:
    """Undo what a killed run left (call with the lock held)."""
    olds = _siblings(real_out, "old")
    if not real_out.exists() and not real_out.is_symlink() and olds:
        # Killed between "DIR -> old" and "partial -> DIR": the old DIR is the last complete one.
        newest = max(olds, key=lambda p: p.lstat().st_ctime)
        os.rename(newest, real_out)
        olds.remove(newest)
    for path in [*olds, *_siblings(real_out, "partial")]:
        _remove_tree(path)


def recover(out: str | Path) -> None:
    """Put back an output directory a killed run left renamed away, and clear leftovers.

    Does nothing while another run holds the directory's lock, or when its parent cannot be
    written. `output_dir` does this itself; call it before checking that a directory exists.
    """
    real = Path(os.path.realpath(out))
    if not real.parent.is_dir() or not os.access(real.parent, os.W_OK | os.X_OK):
        return
    lock = _Lock(real, Path(out))
    try:
        lock.acquire()
    except ExportError:
        return
    try:
        _recover(real)
    finally:
        lock.release()


def _link_or_copy(src: str, dst: str) -> None:
    # A hard link shares the bytes without copying; the new run replaces files by rename, so
    # the old directory's files are never changed through the link.
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _carry_over(src: Path, dst: Path, drop: Callable[[str], bool]) -> None:
    """Link/copy DIR's entries into the staging folder, except those ``drop`` names."""
    device = src.stat().st_dev
    for entry in os.scandir(src):
        if drop(entry.name) or _TEMP_FILE.match(entry.name):
            continue
        target = dst / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), target)
        elif entry.is_dir():
            if entry.stat().st_dev != device or os.path.ismount(entry.path):
                raise ExportError(
                    f"the output directory contains a mount point ({entry.name})",
                    path=src,
                    hint="choose a dedicated output directory",
                )
            shutil.copytree(entry.path, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry.path, str(target))
    shutil.copystat(src, dst)


def _relocate(exc: WorkbenchError, stage: Path, shown: Path) -> None:
    """Make an error raised inside the staging folder name the output directory instead."""

    def fix(text: str) -> str:
        return text.replace(str(stage), str(shown))

    exc.args = tuple(fix(a) if isinstance(a, str) else a for a in exc.args)
    if exc.path is not None:
        exc.path = fix(exc.path)


class OutputTransaction:
    """Fill an output directory completely or not at all (see the module docstring).

    Parameters
    ----------
    out
        The output directory (``--out``). Missing parent folders are created.
    force
        Allowed to replace names in ``owned`` that already exist in DIR; without it they
        are refused up front (before any work) with an `ExportError`.
    merge_existing
        Carry every entry of an existing DIR into the staging folder (``workbench export``
        adds files to a compressed directory and updates its report). Otherwise entries named
        in ``owned`` are left behind, so the new DIR describes this run alone; other entries
        (the user's own files) are always carried over.
    owned
        File names this run writes or makes stale.

    Use as ``with OutputTransaction(...) as stage:`` and write into ``stage``; leaving the
    block normally commits, any exception (errors, `Cancelled`, interrupts) removes the
    staging folder and leaves DIR as it was.
    """

    def __init__(
        self,
        out: str | Path,
        *,
        force: bool = False,
        merge_existing: bool = False,
        owned: Collection[str] = (),
    ):
        self.out = Path(out)
        self.force = force
        self.merge_existing = merge_existing
        self.owned = frozenset(owned)
        self.real: Path | None = None
        self.stage: Path | None = None
        self.committed = False
        self._lock: _Lock | None = None
        self._created: list[Path] = []

    def final(self, path: str | Path) -> Path:
        """Where a file written into the staging folder will be once committed."""
        if self.stage is None:
            raise RuntimeError("the transaction has not started")
        return self.out / Path(path).relative_to(self.stage)

    def __enter__(self) -> Path:
        self.real = check_output_location(self.out)
        missing = self.real.parent
        while not missing.exists():
            # Folders this run creates; a rolled-back run removes them again (deepest first).
            self._created.append(missing)
            missing = missing.parent
        try:
            self.real.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ExportError(
                f"cannot create the folder ({exc.strerror or exc})", path=self.real.parent
            ) from exc
        self._lock = _Lock(self.real, self.out)
        self._lock.acquire()
        try:
            try:
                _recover(self.real)
            except OSError as exc:
                raise ExportError(
                    f"cannot clean up after an earlier interrupted run ({exc.strerror or exc})",
                    path=self.out,
                    hint="remove the DIR.*.partial / DIR.*.old folders next to it by hand",
                ) from exc
            exists = self.real.is_dir()
            if exists and not self.merge_existing and not self.force:
                present = sorted(n for n in os.listdir(self.real) if n in self.owned)
                if present:
                    raise ExportError(
                        f"{present[0]} already exists in the output directory",
                        path=self.out,
                        hint="pass --force to overwrite, or choose another --out",
                    )
            try:
                self.stage = Path(
                    tempfile.mkdtemp(
                        prefix=f"{self.real.name}.", suffix=".partial", dir=self.real.parent
                    )
                )
                if exists:
                    merge = self.merge_existing
                    _carry_over(self.real, self.stage, lambda n: not merge and n in self.owned)
                else:
                    os.chmod(self.stage, 0o777 & ~_umask())
            except OSError as exc:
                raise ExportError(
                    f"cannot prepare the new output directory ({exc.strerror or exc})",
                    path=self.out,
                    hint="check the permissions of the directory and its files",
                ) from exc
            pause_point("staged")
        except BaseException as exc:
            self._rollback(exc)
            raise
        return self.stage

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc is not None:
            self._rollback(exc)
            return False
        try:
            self._commit()
        except BaseException as error:
            if not self.committed:
                self._rollback(error)
            else:
                self._mark(error)
                self._release()
            raise
        self._release()
        return False

    # -- internals ------------------------------------------------------------------
    def _mark(self, exc: BaseException) -> None:
        if isinstance(exc, KeyboardInterrupt):
            exc.workbench_out = str(self.out)  # type: ignore[attr-defined]
            exc.workbench_committed = self.committed  # type: ignore[attr-defined]
        elif isinstance(exc, WorkbenchError) and self.stage is not None and self.real is not None:
            _relocate(exc, self.stage, self.out)

    def _rollback(self, exc: BaseException) -> None:
        self._mark(exc)
        try:
            if self.stage is not None:
                with _signals_deferred():
                    _remove_tree(self.stage)
        except KeyboardInterrupt as late:
            # A signal during the clean-up: the clean-up is done; report the interrupt once.
            if not isinstance(exc, KeyboardInterrupt):
                self._mark(late)
                raise
        finally:
            self._release()
            for folder in self._created:
                try:
                    folder.rmdir()
                except OSError:
                    break

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _commit(self) -> None:
        assert self.stage is not None and self.real is not None
        _fsync_path(self.stage, directory=True)
        old: Path | None = None
        try:
            with _signals_deferred():
                try:
                    if self.real.is_dir():
                        old = self.real.parent / f"{self.real.name}.{secrets.token_hex(4)}.old"
                        os.rename(self.real, old)
                        pause_point("commit")
                        try:
                            os.rename(self.stage, self.real)
                        except OSError:
                            os.rename(old, self.real)
                            old = None
                            raise
                    else:
                        os.rename(self.stage, self.real)
                except OSError as exc:
                    raise ExportError(
                        f"could not move the finished output into place ({exc.strerror or exc})",
                        path=self.out,
                        hint="nothing was changed; check the folder's permissions",
                    ) from exc
                self.committed = True
                _fsync_path(self.real.parent, directory=True)
        finally:
            if old is not None and self.committed:
                _remove_tree(old)


def output_dir(
    out: str | Path,
    *,
    force: bool = False,
    merge_existing: bool = False,
    owned: Collection[str] = (),
) -> OutputTransaction:
    """``with output_dir(DIR, ...) as stage:`` — see `OutputTransaction`."""
    return OutputTransaction(out, force=force, merge_existing=merge_existing, owned=owned)


__all__ = [
    "Interrupted",
    "OutputTransaction",
    "atomic_write",
    "check_output_location",
    "interrupt_exit",
    "interrupts_raise",
    "lock_path",
    "output_dir",
    "pause_point",
    "recover",
]
