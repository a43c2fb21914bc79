"""Every generated hostile input through the real CLI, bounded in time and memory.

Per case: the payload never ran (no marker file), the run finished within `harness.TIMEOUT`
and `harness.AS_LIMIT`, the exit code is 0 or 2, stderr has no traceback and at most a few
lines; a refused ``compress`` leaves its output directory empty. Cheap cases share one
long-lived worker process (torch is imported once); bombs run in fresh subprocesses.

``test_payload_is_live`` loads each payload with ``--trust`` and checks that it DOES write the
marker: the refusal tests are only meaningful when the payloads really work.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.hostile import generators as G
from tests.hostile.harness import AS_LIMIT, CliWorker, Outcome, problems, run_cli


@pytest.fixture(scope="session")
def hostile_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="session")
def worker(hostile_root: Path) -> Iterator[CliWorker]:
    with CliWorker(hostile_root / "worker") as w:
        yield w


@pytest.fixture(scope="session")
def seeds(hostile_root: Path, worker: CliWorker) -> G.Seeds:
    """A real packed archive written by ``workbench compress`` (once per session)."""
    out = hostile_root / "seed_packed"
    done = worker.run(
        ["compress", "demo:mlp", "--out", str(out), "--format", "packed", "--finetune-epochs",
         "0", "--quiet"],
        scratch=hostile_root / "seed",
        timeout=180,
    )  # fmt: skip
    assert done.rc == 0 and not problems(done), done.summary()
    return G.Seeds(packed=out / "model.packed.safetensors", cache=hostile_root / "bomb-cache")


def _argv(h: G.Hostile, path: Path, case_dir: Path, *, trust: bool = False) -> list[str]:
    extra = ["--trust"] if trust else []
    if h.command == "data":
        return ["inspect", "demo:mlp", "--data", str(path), "--json"]
    if h.command == "run":  # a clean data file makes inspect run the model's forward pass
        data = case_dir / "clean.npz"
        np.savez(data, x=np.random.default_rng(0).random((4, 64), dtype=np.float32))
        return ["inspect", str(path), "--json", "--data", str(data), *extra]
    if h.command == "compress" and not trust:
        return ["compress", str(path), "--out", str(case_dir / "out"), "--quiet",
                "--finetune-epochs", "0"]  # fmt: skip
    return ["inspect", str(path), "--json", *extra]


def _run(h: G.Hostile, case_dir: Path, marker: Path, seeds: G.Seeds, worker: CliWorker, *,
         trust: bool = False) -> Outcome:  # fmt: skip
    case = G.Case(*h.make(case_dir, marker, seeds))
    assert case.path.exists(), f"generator {h.name} wrote nothing"
    argv = _argv(h, case.path, case_dir, trust=trust)
    if h.isolate:
        return run_cli(argv, scratch=case_dir, marker=marker)
    return worker.run(argv, scratch=case_dir, marker=marker)


def test_baseline_fits_under_the_caps(hostile_root: Path, worker: CliWorker) -> None:
    """A normal ``inspect`` passes the same harness with room to spare (the caps are fair)."""
    out = worker.run(["inspect", "demo:mlp", "--json"], scratch=hostile_root / "baseline")
    assert out.rc == 0 and not problems(out), out.summary()
    assert '"format": "demo"' in out.stdout
    assert out.vm_peak_kb is not None and out.vm_peak_kb * 1024 + (1 << 30) <= AS_LIMIT, (
        f"baseline peak {out.vm_peak_kb} kB leaves < 1 GiB under the cap"
    )


def test_harness_detects_a_traceback_and_a_marker(hostile_root: Path) -> None:
    """The rules flag what they must: a crash, a marker, a timeout, a chatty stderr."""
    d = hostile_root / "selfcheck"
    d.mkdir()
    marker = d / "PWNED"
    marker.write_text("x")
    bad = Outcome(["inspect"], 1, "", "Traceback (most recent call last):\nValueError: x\n", 1.0,
                  marker_written=marker.exists())  # fmt: skip
    found = problems(bad)
    assert any("marker" in p for p in found) and any("traceback" in p for p in found)
    assert any("exit code 1" in p for p in found)
    assert problems(Outcome(["x"], None, "", "", 61.0, timed_out=True)) == ["timed out after 61s"]
    assert problems(Outcome(["x"], 2, "", "a\nb\nc\nd\n", 0.1))
    assert problems(Outcome(["x"], 2, "", "workbench inspect: error: f: bad (hint)\n", 0.1)) == []


@pytest.mark.parametrize("h", G.REGISTRY, ids=[h.name for h in G.REGISTRY])
def test_hostile_input_is_refused_or_opened_safely(
    h: G.Hostile, hostile_root: Path, seeds: G.Seeds, worker: CliWorker
) -> None:
    case_dir = hostile_root / "cases" / h.name
    case_dir.mkdir(parents=True)
    marker = case_dir / "PWNED"
    out = _run(h, case_dir, marker, seeds, worker)
    found = problems(out)
    if h.command == "compress" and out.rc != 0:
        left = (
            sorted(p.name for p in (case_dir / "out").glob("*"))
            if (case_dir / "out").exists()
            else []
        )
        if left:
            found.append(f"refused compress left files in --out: {left[:5]}")
    assert not found, f"{h.name}: {'; '.join(found)}\n{out.summary()}"


LIVE = [h for h in G.REGISTRY if h.live]


@pytest.mark.parametrize("h", LIVE, ids=[h.name for h in LIVE])
def test_payload_is_live(
    h: G.Hostile, hostile_root: Path, seeds: G.Seeds, worker: CliWorker
) -> None:
    """With ``--trust`` the loader really unpickles / deserializes: the payload must run."""
    case_dir = hostile_root / "live" / h.name
    case_dir.mkdir(parents=True)
    marker = case_dir / "PWNED"
    out = _run(h, case_dir, marker, seeds, worker, trust=True)
    assert marker.exists(), f"{h.name}: payload did not run even with --trust\n{out.summary()}"
