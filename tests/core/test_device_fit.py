"""The Qt-free side of the window's device chooser: `estimate_fit`, the session's device choice
and cached peak activations, and an ensemble of chosen plans recorded as a run."""

from __future__ import annotations

import pytest

from core.base.errors import RecipeError
from core.export.devices import (
    DeviceProfile,
    DeviceProfileError,
    estimate_fit,
    peak_activation_bytes,
)
from core.recipe.plan import simple_plan
from core.session import RunRecord, Session


def _profile(**kw) -> DeviceProfile:
    base = dict(
        name="d",
        description="",
        memory=1000,
        storage=10_000,
        formats=("packed",),
        dtypes=("fp32",),
        relative_compute=1.0,
    )
    return DeviceProfile(**{**base, **kw})


def test_estimate_fit_shared_memory_weight_memory_and_storage():
    shared = _profile()
    assert estimate_fit(shared, 600, 400)["fits"]
    over = estimate_fit(shared, 600, 401)
    assert not over["fits"] and over["memory_needed_bytes"] == 1001
    assert over["reasons"] == ["weights + activations 1,001 B > memory 1,000 B"]
    # A separate weight store: weights against it, activations alone against the memory.
    flash = _profile(weight_memory=5000)
    fit = estimate_fit(flash, 4000, 900)
    assert fit["fits"] and fit["memory_needed_bytes"] == 900
    bad = estimate_fit(flash, 5001, 1001)
    assert [r.split(" ")[0] for r in bad["reasons"]] == ["weights", "activations"]
    # Storage is checked on the weights' file size.
    assert "storage" in estimate_fit(_profile(memory=10**9, storage=100), 101, 0)["reasons"][0]
    # Unmeasured activations: weights alone are judged.
    assert estimate_fit(shared, 1000, None)["fits"]


@pytest.fixture(scope="module")
def session() -> Session:
    s = Session(strict=True)
    s.run(s.open_model("demo:mlp"))
    s.run(s.analyze())
    return s


def test_session_device_choice_and_cached_activations(session, monkeypatch):
    s = session
    events = []
    s.subscribe(lambda e, p: events.append(e))
    s.set_device("mcu")
    assert s.device.name == "mcu" and "device_changed" in events
    with pytest.raises(DeviceProfileError, match="no device 'nope'"):
        s.set_device("nope")
    x = s.model.example_input[:1]
    expected = peak_activation_bytes(s.model.module, x)
    import core.session

    calls = []
    monkeypatch.setattr(
        core.session, "peak_activation_bytes", lambda m, x: calls.append(1) or expected
    )
    s._activations = None
    fits = [s.device_fit(b) for b in (10_000, 20_000, 2 * 2**20)]
    assert len(calls) == 1  # measured once, then cached for the model
    assert [f["fits"] for f in fits] == [True, True, False]
    assert fits[0]["activation_bytes"] == expected
    s.set_device(None)
    assert s.device_fit(10_000) is None


def test_ensemble_of_two_runs_is_recorded(session):
    s = session
    from core.recipe.edits import ReplacePlan

    for plan in (simple_plan(0.5, 8), simple_plan(0.8, 4)):
        s.edit(ReplacePlan(plan=plan))
        s.run(s.compress())
        s.run(s.evaluate())
    ids = [r.id for r in s.runs if r.kind == "evaluate"][-2:]
    with pytest.raises(RecipeError, match="at least 2"):
        s.ensemble(ids[:1])
    s.run(s.ensemble(ids))
    rec = s.runs[-1]
    assert rec.kind == "ensemble" and rec.members == tuple(ids)
    members = [r for r in s.runs if r.id in ids]
    assert rec.payload_bytes == sum(r.payload_bytes for r in members)
    assert 0.5 < rec.accuracy_after <= 1.0 and 0 < rec.fidelity["agreement"] <= 1.0
    assert RunRecord.from_dict(rec.to_dict()) == rec
