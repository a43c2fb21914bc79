"""``workbench compress/export --out DIR`` is complete or untouched under signals and races.

Runs the real CLI in a subprocess. ``WORKBENCH_TEST_PAUSE_AT=<stage>`` makes the run announce
and sleep at a named point (`core.base.outdir.pause_point`), so a signal lands there every time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from core.recipe.plan import CompressionPlan, simple_plan

ROOT = Path(__file__).resolve().parents[2]
FILES = {
    "model.packed.safetensors",
    "model.torchscript.pt",
    "recipe.json",
    "report.json",
    "report.html",
}


class Run:
    """A ``workbench`` subprocess whose stderr is read line by line in the background."""

    def __init__(self, *args: str, pause: str | None = None, shell: str | None = None, **env: str):
        full = {**os.environ, "OMP_NUM_THREADS": "1", **env}
        if pause:
            full["WORKBENCH_TEST_PAUSE_AT"] = pause
        argv = [sys.executable, "-m", "core.cli.main", *args]
        if shell is not None:
            # run the CLI at the end of a shell script (in a private mount namespace)
            cli = " ".join(f"'{a}'" for a in argv)
            argv = ["unshare", "-m", "sh", "-c", f"{shell} && exec {cli}"]
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=full,
        )
        self.lines: list[str] = []
        self._paused = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if line.startswith("workbench: test pause at"):
                self._paused.set()

    def wait_paused(self, timeout: float = 120) -> None:
        if not self._paused.wait(timeout):
            self.proc.kill()
            raise AssertionError(f"never paused; stderr: {self.lines}")

    def finish(self, timeout: float = 300) -> tuple[int, list[str]]:
        try:
            self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self._reader.join(10)
        self.proc.stdout.close()
        return self.proc.returncode, [ln for ln in self.lines if "test pause at" not in ln]


def _compress(out: Path, *extra: str, pause: str | None = None, **env: str) -> Run:
    return Run(
        "compress",
        "demo:mlp",
        "--out",
        str(out),
        "--format",
        "packed,torchscript",
        "--finetune-epochs",
        "0",
        "--quiet",
        *extra,
        pause=pause,
        **env,
    )


def _tree(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def _leftovers(parent: Path, out: Path) -> list[str]:
    """Anything next to DIR that a run made: staging/old folders, lock or temp files."""
    return sorted(n for n in os.listdir(parent) if n != out.name)


def _assert_consistent(out: Path, sparsity: float) -> None:
    """One complete run: exactly its files, report sizes equal the bytes on disk."""
    assert {p.name for p in out.iterdir()} == FILES
    report = json.loads((out / "report.json").read_text())
    sizes = {Path(e["path"]).name: e["bytes_on_disk"] for e in report["exports"]}
    assert sizes == {
        "model.packed.safetensors": (out / "model.packed.safetensors").stat().st_size,
        "model.torchscript.pt": (out / "model.torchscript.pt").stat().st_size,
    }
    assert all(Path(e["path"]).parent == out for e in report["exports"])
    assert report["compressed_bytes"] == sizes["model.packed.safetensors"]
    assert report["sparsity"] == pytest.approx(sparsity, abs=1e-3)
    plan = CompressionPlan.load(out / "recipe.json")
    assert plan == simple_plan(sparsity, None, "magnitude").with_recovery(plan.recovery)
    assert plan.recovery.epochs == 0


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """A complete earlier run (sparsity 0.5) to re-run over with --force."""
    out = tmp_path_factory.mktemp("done") / "out"
    code, lines = _compress(out, "--sparsity", "0.5").finish()
    assert code == 0, lines
    _assert_consistent(out, 0.5)
    return out, _tree(out)


def _fresh_copy(finished, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(finished[0], out)
    return out


@pytest.mark.parametrize(
    ("stage", "sig"),
    [
        # the second export is being written: the finished archive must not survive alone
        ("write:model.torchscript.pt", signal.SIGINT),
        ("exported", signal.SIGTERM),
    ],
)
def test_interrupting_a_new_run_leaves_no_directory(tmp_path, stage, sig):
    out = tmp_path / "out"
    run = _compress(out, "--sparsity", "0.5", pause=stage)
    run.wait_paused()
    run.proc.send_signal(sig)
    code, lines = run.finish()
    assert code == 128 + sig
    assert lines == [f"workbench: interrupted; {out} left as it was"]
    assert not out.exists()
    assert _leftovers(tmp_path, out) == []


@pytest.mark.parametrize(
    ("stage", "sig"),
    [("staged", signal.SIGTERM), ("write:report.json", signal.SIGINT)],
)
def test_interrupting_a_forced_rerun_leaves_the_old_result_byte_identical(
    finished, tmp_path, stage, sig
):
    out = _fresh_copy(finished, tmp_path)
    run = _compress(out, "--sparsity", "0.8", "--force", pause=stage)
    run.wait_paused()
    run.proc.send_signal(sig)
    code, lines = run.finish()
    assert code == 128 + sig and lines == [f"workbench: interrupted; {out} left as it was"]
    assert _tree(out) == finished[1]
    assert _leftovers(tmp_path, out) == []


def test_interrupt_during_the_swap_completes_the_swap(finished, tmp_path):
    out = _fresh_copy(finished, tmp_path)
    run = _compress(out, "--sparsity", "0.8", "--force", pause="commit", WORKBENCH_TEST_PAUSE_S="1")
    run.wait_paused()
    run.proc.send_signal(signal.SIGINT)
    code, lines = run.finish()
    assert code == 130
    assert lines == [f"workbench: interrupted; {out} was already written completely"]
    _assert_consistent(out, 0.8)
    assert _leftovers(tmp_path, out) == []


def test_a_run_killed_mid_swap_is_repaired_by_the_next_run(finished, tmp_path):
    out = _fresh_copy(finished, tmp_path)
    run = _compress(out, "--sparsity", "0.8", "--force", pause="commit")
    run.wait_paused()
    run.proc.kill()  # SIGKILL: no clean-up at all
    run.finish()
    assert not out.exists()
    left = _leftovers(tmp_path, out)
    # the old result renamed aside, the staging folder and the dead run's lock file
    assert sorted(n.rsplit(".", 1)[-1] for n in left) == ["old", "partial", "workbench-lock"]
    # The next run puts the last complete directory back before deciding anything:
    # without --force it then refuses, and the old result is there byte for byte.
    code, lines = _compress(out, "--sparsity", "0.8").finish()
    assert code == 2 and len(lines) == 1 and "already exists" in lines[0], lines
    assert _tree(out) == finished[1]
    assert _leftovers(tmp_path, out) == []


def test_two_runs_on_one_directory(tmp_path):
    out = tmp_path / "out"
    release = tmp_path.parent / f"{tmp_path.name}.release"
    first = _compress(
        out, "--sparsity", "0.5", pause="staged", WORKBENCH_TEST_PAUSE_RELEASE=str(release)
    )
    try:
        first.wait_paused()
        start = time.monotonic()
        code, lines = _compress(out, "--sparsity", "0.8", "--force").finish()
        assert code == 2
        assert lines == [
            f"workbench compress: error: another workbench run is writing {out} "
            f"(pid {first.proc.pid}); wait for it or choose another --out"
        ]
        assert time.monotonic() - start < 60
    finally:
        release.touch()
    code, lines = first.finish()
    release.unlink()
    assert code == 0, lines
    _assert_consistent(out, 0.5)
    assert _leftovers(tmp_path, out) == []


def test_racing_forced_runs_leave_one_complete_result(tmp_path):
    out = tmp_path / "out"
    runs = [_compress(out, "--sparsity", s, "--force") for s in ("0.5", "0.8")]
    results = [r.finish() for r in runs]
    codes = sorted(code for code, _ in results)
    assert codes[0] == 0 and codes[1] in (0, 2), results
    for code, lines in results:
        if code == 2:
            assert len(lines) == 1 and "another workbench run is writing" in lines[0]
    sparsity = json.loads((out / "report.json").read_text())["sparsity"]
    _assert_consistent(out, 0.5 if sparsity < 0.65 else 0.8)
    assert _leftovers(tmp_path, out) == []


def _one_line_error(run: Run) -> str:
    start = time.monotonic()
    code, lines = run.finish()
    assert code == 2, lines
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    assert time.monotonic() - start < 60
    return lines[0]


def test_unwritable_out_is_refused_before_any_work(tmp_path):
    afile = tmp_path / "plain-file"
    afile.write_text("not a folder")
    # without --quiet a run that got past the checks would print "loading demo:mlp" first
    line = _one_line_error(Run("compress", "demo:mlp", "--out", str(afile / "out")))
    assert f"{afile} is a file, not a directory" in line
    line = _one_line_error(Run("compress", "demo:mlp", "--out", "/proc/workbench-out"))
    assert "cannot write output under /proc" in line
    line = _one_line_error(Run("compress", "demo:mlp", "--out", str(afile)))
    assert "exists and is not a directory" in line
    assert afile.read_text() == "not a folder"
    assert sorted(os.listdir(tmp_path)) == ["plain-file"]


def _read_only(folder: Path, *args: str) -> Run:
    """Run the CLI with ``folder`` read-only (a read-only bind mount when we are root)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return Run(*args)
    if shutil.which("unshare") is None:
        pytest.skip("root without unshare: cannot make a read-only folder")
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount --bind -o ro '{folder}' '{folder}'"],
        capture_output=True,
    )
    if probe.returncode != 0:
        pytest.skip("root without mount namespaces: cannot make a read-only folder")
    return Run(*args, shell=f"mount --bind -o ro '{folder}' '{folder}'")


def test_read_only_targets_are_one_line_errors(finished, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    line = _one_line_error(_read_only(ro, "compress", "demo:mlp", "--out", str(ro / "out")))
    assert "not writable" in line or "Read-only" in line
    ro.chmod(0o755)
    # `workbench export` into a compressed directory that is read-only
    out = _fresh_copy(finished, tmp_path)
    line = _one_line_error(_read_only(out, "export", str(out), "--format", "state_dict"))
    assert "not writable" in line and str(out) in line
    out.chmod(0o755)
    assert _tree(out) == finished[1]
