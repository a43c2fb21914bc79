"""JobRunner: results, failures, cancellation and progress all reach the UI thread."""

from __future__ import annotations

import threading
import time

import pytest
from PySide6.QtCore import QThread, QTimer

from app.workers import JobRunner
from core.base.errors import Cancelled, ModelLoadError


@pytest.fixture
def runner(qtbot):
    r = JobRunner()
    yield r
    r.cancel_all()
    r.wait(5000)


def test_result_arrives_on_ui_thread(qtbot, runner):
    seen = {}

    def job(progress, cancel):
        seen["worker"] = threading.get_ident()
        progress(0.5, "half")
        return 42

    with qtbot.waitSignal(runner.jobSucceeded, timeout=5000) as blocker:
        handle = runner.submit("analyze", "test", job)
    assert blocker.args == [handle.job_id, 42]
    assert seen["worker"] != threading.get_ident()
    assert runner.running() == []


def test_engine_error_is_reported_not_raised(qtbot, runner):
    def job(progress, cancel):
        raise ModelLoadError("truncated file", path="x.pt", hint="re-save it")

    with qtbot.waitSignal(runner.jobFailed, timeout=5000) as blocker:
        runner.submit("load", "bad", job)
    _, exc, tb = blocker.args
    assert isinstance(exc, ModelLoadError)
    assert str(exc) == "x.pt: truncated file (re-save it)"
    assert "ModelLoadError" in tb


def test_cancel_stops_a_running_job(qtbot, runner):
    started = threading.Event()

    def job(progress, cancel):
        started.set()
        for i in range(10_000):
            cancel.check()
            progress(i / 10_000, "working")
            time.sleep(0.001)
        return "finished"

    with qtbot.waitSignal(runner.jobFailed, timeout=5000) as blocker:
        handle = runner.submit("compress", "long", job)
        assert started.wait(5)
        handle.cancel()
    assert isinstance(blocker.args[1], Cancelled)


def test_progress_is_throttled_and_loop_keeps_ticking(qtbot, runner):
    """A busy worker floods progress calls; the UI thread still gets timer ticks on time."""
    progress_events = []
    runner.jobProgressed.connect(lambda _id, f, _m: progress_events.append(f))
    ticks = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))

    def job(progress, cancel):
        t0 = time.perf_counter()
        n = 0
        while time.perf_counter() - t0 < 0.6:
            n += 1
            progress(min(n / 1e7, 1.0), "spinning")
        progress(1.0, "done")
        progress(1.0, "done again")
        return n

    timer.start()
    with qtbot.waitSignal(runner.jobSucceeded, timeout=10_000) as blocker:
        runner.submit("finetune", "spin", job)
    timer.stop()
    calls = blocker.args[1]
    assert calls > 1000
    # 0.6 s at most one emit per 50 ms, plus the final one (sent once).
    assert 1 <= len(progress_events) <= 20
    assert len(ticks) >= 20
    gaps = [b - a for a, b in zip(ticks, ticks[1:], strict=False)]
    assert max(gaps) < 0.5


def test_runner_lives_on_creating_thread(qtbot, runner):
    assert runner.thread() is QThread.currentThread()


@pytest.mark.parametrize("fails", [False, True])
def test_a_finished_job_does_not_keep_its_inputs(qtbot, runner, fails):
    """Finished runnables rest in the runner for a while; the job's function (whose
    closure holds its inputs, e.g. the model a new one replaces) must be freed at once."""
    import gc
    import weakref

    class Inputs:
        pass

    inputs = Inputs()
    held = weakref.ref(inputs)

    def make(inputs=inputs):
        def job(progress, cancel):
            if fails:
                raise ValueError("boom")
            return len(repr(inputs))

        return job

    signal = runner.jobFailed if fails else runner.jobSucceeded
    with qtbot.waitSignal(signal, timeout=5000):
        runner.submit("analyze", "test", make())
    del inputs, make
    qtbot.waitUntil(lambda: runner.running() == [], timeout=5000)
    gc.collect()
    assert held() is None
