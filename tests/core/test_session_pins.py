"""Pins as a session job (issue #12): a pin change returns the job that prepares the solver's
tables off the owner's thread; its result equals the synchronous one and a newer pin change
supersedes an older rebuild."""

from __future__ import annotations

import numpy as np
import pytest

import core.session as session_module
from core.base.errors import Cancelled
from core.base.progress import no_progress
from core.planning.sensitivity import default_levels
from core.planning.solver import Target, build_problem, quick_plan, smallest_plan
from core.session import Job, Session

#: 5 sparsities x 3 widths (per-channel variants): a few seconds on the demo MLP.
LEVELS = default_levels("magnitude", sparsities=(0.0, 0.5, 0.8, 0.9), bits=(4, 8, None))


@pytest.fixture(scope="module")
def scanned(tmp_path_factory):
    s = Session()
    s.run(s.open_model("demo:mlp"))
    s.run(s.analyze())
    s.run(s.scan(levels=LEVELS, cache_dir=tmp_path_factory.mktemp("scan-cache")))
    return s


def _fresh(scanned: Session) -> Session:
    """A session on the same model, statistics and scan, with no pins and its own plan."""
    s = Session()
    s.run(s.open_model("demo:mlp"))
    s.stats, s.sensitivity = scanned.stats, scanned.sensitivity
    s.plan_to_target(Target(ratio=4.0))  # a solved plan to pin layers of
    return s


def _same_problem(a, b) -> None:
    assert a.names == b.names and a.levels == b.levels and dict(a.pinned) == dict(b.pinned)
    assert a.dense_bytes == b.dense_bytes and a.method == b.method
    for field in ("cost", "damage", "acc_drop", "cos_loss", "sparsity"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field


def test_a_pin_change_is_a_job_whose_result_equals_the_synchronous_one(scanned, monkeypatch):
    s = _fresh(scanned)
    events = []
    s.subscribe(lambda event, payload: events.append((event, payload)))
    job = s.set_pins(["fc1"])
    assert isinstance(job, Job) and job.kind == "pins" and s.busy("pins")
    # The marks follow at once; the tables do not exist yet for these pins.
    assert s.pins == frozenset({"fc1"}) and ("pins_changed", s.pins) in events
    assert s.set_pins(["fc1"]) is None  # unchanged: nothing to rebuild
    # The rebuild drops rows from the per-layer tables: no preview per level again.
    monkeypatch.setattr(
        session_module,
        "build_problem",
        lambda *a, **k: pytest.fail("a pin change rebuilt every layer's tables"),
    )
    progress = []
    payload = job.fn(lambda f, m: progress.append((f, m)), job.cancel)
    assert progress and all(0.0 <= f <= 1.0 for f, _ in progress)
    assert s.finish(job, payload) and not s.busy("pins")
    monkeypatch.undo()
    pinned = {"fc1": s.plan.config_for("fc1")}
    expected = build_problem(s.stats, s.sensitivity, pinned=pinned)
    problem, memo = s._solver_problem(pinned)
    _same_problem(problem, expected)
    # The reach the window shows comes with it (the event carries it).
    reach = (expected.dense_bytes, smallest_plan(s.stats, expected)[1])
    assert s.target_range() == reach and events[-1] == ("solver_ready", reach)
    # The solved plan equals the synchronous solve on the freshly built tables.
    kept, base = s.plan.config_for("fc1"), s.plan
    sol = s.plan_to_target(Target(ratio=6.0))
    direct = quick_plan(s.stats, s.sensitivity, Target(ratio=6.0), problem=expected, base=base)
    assert sol.plan == direct.plan and sol.predicted == direct.predicted
    assert s.plan.config_for("fc1") == kept


def test_the_frontier_for_new_pins_is_a_job_of_its_own(scanned):
    assert scanned.frontier_job() is None  # the scan predicted it (no pins)
    s = _fresh(scanned)
    s.run(s.set_pins(["fc2"]))
    # The pins job leaves the frontier to its own job: a target step need not wait for it.
    job = s.frontier_job()
    assert job is not None and job.kind == "frontier"
    events = []
    s.subscribe(lambda event, payload: events.append((event, payload)))
    points = s.run(job)[0]
    pinned = {"fc2": s.plan.config_for("fc2")}
    expected = build_problem(s.stats, s.sensitivity, pinned=pinned)
    direct = session_module._frontier_points(s.stats, s.sensitivity, expected, {}, s.plan)
    assert points == direct and len(points) >= 2
    assert events[-1] == ("frontier_ready", points) and s.frontier_points() == points
    assert s.frontier_job() is None  # known now
    # A pin change supersedes a frontier still being predicted for the old pins.
    s.run(s.set_pins(["fc3"]))
    job = s.frontier_job()
    assert job is not None
    s.set_pins(["fc1"])
    assert job.cancel.cancelled and not s.is_current(job)


def test_a_second_pin_change_supersedes_the_first(scanned):
    s = _fresh(scanned)
    first = s.set_pins(["fc1"])
    second = s.set_pins(["fc1", "fc2"])
    assert first.cancel.cancelled and not s.is_current(first) and s.is_current(second)
    with pytest.raises(Cancelled):
        first.fn(no_progress, first.cancel)
    # A result that still arrives is dropped.
    assert not s.finish(first, second.fn(no_progress, second.cancel))
    s.run(second)
    pinned = {n: s.plan.config_for(n) for n in ("fc1", "fc2")}
    problem, _ = s._solver_problem(pinned)
    _same_problem(problem, build_problem(s.stats, s.sensitivity, pinned=pinned))
    assert problem.names == tuple(c.name for c in s.sensitivity.layers if c.name not in pinned)


def test_without_a_scan_pins_need_no_job_and_a_target_step_derives_the_tables(scanned):
    s = Session()
    s.run(s.open_model("demo:mlp"))
    assert s.set_pins(["fc2"]) is None and s.pins == frozenset({"fc2"})
    s.stats, s.sensitivity = scanned.stats, scanned.sensitivity
    # A caller that never runs the job (the CLI's `plan --pin`) gets the same plan.
    s.set_pins(["fc3"])
    kept, base = s.plan.config_for("fc3"), s.plan
    sol = s.plan_to_target(Target(ratio=5.0))
    pinned = {"fc3": kept}
    expected = build_problem(s.stats, s.sensitivity, pinned=pinned)
    direct = quick_plan(s.stats, s.sensitivity, Target(ratio=5.0), problem=expected, base=base)
    assert sol.plan == direct.plan and s.plan.config_for("fc3") == kept
