"""Run ``workbench`` (``core.cli.main``) on hostile inputs, bounded in time and memory.

Two ways, same limits and same `Outcome`:

* `run_cli` -- a fresh ``python -m core.cli.main ...`` subprocess per case (bombs, resource limits).
* `CliWorker` -- one long-lived subprocess that imports torch once and runs ``core.cli.main.main``
  in-process per case, with its file descriptors 1/2 redirected to per-case files. Importing
  torch costs seconds per process, so the cheap cases share it.

Both run with ``cwd`` and ``HOME`` set to the case's scratch directory, one intra-op thread,
``RLIMIT_AS`` = `AS_LIMIT` and a wall-clock timeout after which the whole process group is
killed. `problems` turns an outcome into the list of rule violations a test asserts is empty.

Run ``python -m tests.hostile.harness --worker`` only through `CliWorker`.
"""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
#: Address-space cap. ``inspect demo:mlp`` peaks at ~1.0 GB of virtual memory (torch's import
#: alone maps most of it); the cap leaves ~1.5 GB on top for honest work, far below a bomb.
AS_LIMIT = int(os.environ.get("HOSTILE_AS_LIMIT_MB", "2560")) << 20
#: Per-case wall-clock limit (seconds).
TIMEOUT = float(os.environ.get("HOSTILE_TIMEOUT_S", "60"))
#: stderr lines a refusal may print (one error line; a little slack for a progress line).
MAX_STDERR_LINES = 3
#: Exit code the worker reports for an exception that escaped ``main`` (it prints its traceback).
UNCAUGHT = 97


@dataclass
class Outcome:
    """What one CLI run did."""

    argv: list[str]
    rc: int | None
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False
    died: str | None = None
    marker_written: bool = False
    vm_peak_kb: int | None = None

    def summary(self) -> str:
        tail = self.stderr.strip().splitlines()[-3:]
        return (
            f"workbench {' '.join(self.argv)} -> rc={self.rc} in {self.seconds:.1f}s"
            + (" TIMEOUT" if self.timed_out else "")
            + (f" DIED({self.died})" if self.died else "")
            + (" MARKER" if self.marker_written else "")
            + ("\n  stderr: " + "\n          ".join(tail) if tail else "")
        )


def problems(out: Outcome, *, max_lines: int = MAX_STDERR_LINES) -> list[str]:
    """Every rule the outcome breaks (empty when the CLI refused or accepted cleanly).

    Rules: the payload never ran, the process finished within the time and memory caps, the
    exit code is 0 (opened) or 2 (refused with a `WorkbenchError`), stderr holds no
    traceback and at most ``max_lines`` lines.
    """
    found = []
    if out.marker_written:
        found.append("payload ran: marker file written")
    if out.timed_out:
        found.append(f"timed out after {out.seconds:.0f}s")
    if out.died:
        found.append(f"process died: {out.died}")
    if not out.timed_out and not out.died and out.rc not in (0, 2):
        found.append(f"exit code {out.rc}")
    if "Traceback" in out.stderr:
        last = [ln for ln in out.stderr.strip().splitlines() if ln.strip()][-1:]
        found.append(f"traceback: {last[0][:200] if last else '?'}")
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    if len(lines) > max_lines:
        found.append(f"{len(lines)} stderr lines (at most {max_lines})")
    return found


def _env(scratch: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HOME=str(scratch),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])]),
        PYTHONDONTWRITEBYTECODE="1",
        QT_QPA_PLATFORM="offscreen",
    )
    return env


def _limiter(as_limit: int) -> Any:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (as_limit, as_limit))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _died(rc: int | None) -> str | None:
    if rc is None or rc >= 0:
        return None
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


def run_cli(
    argv: list[str],
    *,
    scratch: Path,
    marker: Path | None = None,
    timeout: float = TIMEOUT,
    as_limit: int = AS_LIMIT,
) -> Outcome:
    """``python -m core.cli.main *argv`` in a fresh, capped subprocess."""
    scratch.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "core.cli.main", *argv],
        cwd=scratch,
        env=_env(scratch),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        preexec_fn=_limiter(as_limit),
        start_new_session=True,
    )
    timed_out = False
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
        stdout, stderr = proc.communicate()
    return Outcome(
        argv=list(argv),
        rc=proc.returncode,
        stdout=stdout,
        stderr=stderr,
        seconds=time.monotonic() - start,
        timed_out=timed_out,
        died=None if timed_out else _died(proc.returncode),
        marker_written=marker is not None and marker.exists(),
    )


class CliWorker:
    """A long-lived capped subprocess running ``core.cli.main.main`` per request.

    A case that times out or kills the worker costs one restart; the next `run` starts a
    fresh worker. Use as a context manager or call `close`.
    """

    def __init__(self, scratch: Path, *, as_limit: int = AS_LIMIT, start_timeout: float = 180):
        self.scratch = scratch
        self.as_limit = as_limit
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._n = 0

    def __enter__(self) -> CliWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _readline(self, timeout: float) -> str | None:
        """One reply line, or None on timeout; '' when the worker died."""
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        return self.proc.stdout.readline()

    def _start(self) -> None:
        self.scratch.mkdir(parents=True, exist_ok=True)
        log = (self.scratch / f"worker{self.restarts}.log").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.hostile.harness", "--worker"],
            cwd=self.scratch,
            env=_env(self.scratch),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            bufsize=1,
            preexec_fn=_limiter(self.as_limit),
            start_new_session=True,
        )
        log.close()
        line = self._readline(self.start_timeout)
        if not line or line.strip() != "ready":
            self.close()
            raise RuntimeError(f"hostile-suite worker did not start (see {log.name})")
        self.restarts += 1

    def close(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc)
            self.proc = None

    def run(
        self,
        argv: list[str],
        *,
        scratch: Path,
        marker: Path | None = None,
        timeout: float = TIMEOUT,
    ) -> Outcome:
        """Run ``main(argv)`` in the worker with cwd/HOME = ``scratch``."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = None
            self._start()
        assert self.proc is not None and self.proc.stdin is not None
        scratch.mkdir(parents=True, exist_ok=True)
        self._n += 1
        out_path, err_path = scratch / f".stdout{self._n}", scratch / f".stderr{self._n}"
        request = {"argv": argv, "cwd": str(scratch), "out": str(out_path), "err": str(err_path)}
        start = time.monotonic()
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self._readline(timeout)
        seconds = time.monotonic() - start
        reply: dict[str, Any] = {}
        timed_out = line is None
        died = None
        if timed_out:
            self.close()
        elif not line:
            rc = self.proc.wait()
            died = _died(rc) or f"worker exited with {rc}"
            self.proc = None
        else:
            reply = json.loads(line)

        def read(p: Path) -> str:
            try:
                return p.read_text(errors="replace")
            except OSError:
                return ""

        return Outcome(
            argv=list(argv),
            rc=reply.get("rc"),
            stdout=read(out_path),
            stderr=read(err_path),
            seconds=seconds,
            timed_out=timed_out,
            died=died,
            marker_written=marker is not None and marker.exists(),
            vm_peak_kb=reply.get("vm_peak_kb"),
        )


# --------------------------------------------------------------------------- worker side


def _vm_peak_kb() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmPeak:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _serve() -> None:
    """Worker loop: one JSON request per stdin line, one JSON reply per line on the original
    stdout; fds 1 and 2 point at the case's files while ``main`` runs."""
    import gc
    import traceback

    reply = os.fdopen(os.dup(1), "w", buffering=1)
    log = os.dup(2)  # the worker's own log, restored after every case
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # nothing but replies may reach the protocol pipe
    from core.cli.main import main

    reply.write("ready\n")
    for line in sys.stdin:
        req = json.loads(line)
        os.chdir(req["cwd"])
        os.environ["HOME"] = req["cwd"]
        out_fd = os.open(req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        err_fd = os.open(req["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        rc: int
        try:
            rc = int(main(req["argv"]) or 0)
        except SystemExit as exc:  # argparse errors
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:  # noqa: BLE001 - an escaped exception is what the suite reports
            traceback.print_exc()
            rc = UNCAUGHT
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            except Exception:  # noqa: BLE001 - a broken stream must not kill the worker
                pass
            os.dup2(devnull, 1)
            os.dup2(log, 2)
            os.close(out_fd)
            os.close(err_fd)
        gc.collect()
        reply.write(json.dumps({"rc": rc, "vm_peak_kb": _vm_peak_kb()}) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        _serve()
    else:
        sys.exit("usage: python -m tests.hostile.harness --worker (started by CliWorker)")
