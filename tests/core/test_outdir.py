"""`core.base.outdir`: all-or-nothing output directories, the lock, recovery and atomic files."""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import pytest

from core.base import outdir
from core.base.errors import Cancelled, ExportError
from core.base.outdir import (
    OutputTransaction,
    atomic_write,
    check_output_location,
    interrupt_exit,
    lock_path,
    output_dir,
    recover,
)

OWNED = ("model.packed.safetensors", "model.pt", "recipe.json", "report.json")


def _tree(root: Path) -> dict[str, bytes | None]:
    """Relative path -> bytes (None for folders): a byte-exact picture of a directory."""
    out: dict[str, bytes | None] = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = None if p.is_dir() else p.read_bytes()
    return out


def _siblings(parent: Path, keep: set[str]) -> list[str]:
    return sorted(n for n in os.listdir(parent) if n not in keep)


def _previous_run(out: Path) -> dict[str, bytes | None]:
    out.mkdir()
    (out / "model.packed.safetensors").write_bytes(os.urandom(300))
    (out / "model.pt").write_bytes(os.urandom(200))
    (out / "report.json").write_text('{"run": 1}\n')
    (out / "notes.txt").write_text("the user's own notes\n")
    (out / "plots").mkdir()
    (out / "plots" / "a.svg").write_text("<svg/>")
    return _tree(out)


def test_commit_into_a_new_directory(tmp_path):
    out = tmp_path / "a" / "out"
    with output_dir(out, owned=OWNED) as stage:
        assert stage.parent == out.parent and stage.name.endswith(".partial")
        assert not out.exists()
        atomic_write(stage / "model.pt", [b"new model"])
        (stage / "report.json").write_text("{}")
    assert _tree(out) == {"model.pt": b"new model", "report.json": b"{}"}
    # neither the staging folder nor the lock file is left next to it
    assert _siblings(out.parent, {"out"}) == []
    assert (os.stat(out).st_mode & 0o777) == 0o777 & ~outdir._umask()


def test_force_replaces_owned_files_and_keeps_the_users(tmp_path):
    out = tmp_path / "out"
    before = _previous_run(out)
    inode = (out / "notes.txt").stat().st_ino
    with output_dir(out, force=True, owned=OWNED) as stage:
        atomic_write(stage / "model.packed.safetensors", [b"packed v2"])
        # the old directory is untouched until the commit
        assert _tree(out) == before
    after = _tree(out)
    assert after["model.packed.safetensors"] == b"packed v2"
    # the earlier run's other owned files are gone: DIR describes this run alone
    assert "model.pt" not in after and "report.json" not in after
    assert after["notes.txt"] == before["notes.txt"]
    assert after["plots/a.svg"] == before["plots/a.svg"]
    assert (out / "notes.txt").stat().st_ino == inode  # linked, not copied
    assert _siblings(tmp_path, {"out"}) == []


def test_merge_existing_carries_everything(tmp_path):
    out = tmp_path / "out"
    before = _previous_run(out)
    with output_dir(out, merge_existing=True, owned=OWNED) as stage:
        assert _tree(stage) == before
        atomic_write(stage / "report.json", [b'{"run": 2}\n'], force=True)
        atomic_write(stage / "model.onnx", [b"onnx"])
        # writing replaces the staged link: the live directory still has the old report
        assert (out / "report.json").read_bytes() == before["report.json"]
    after = _tree(out)
    assert after == {**before, "report.json": b'{"run": 2}\n', "model.onnx": b"onnx"}


def test_existing_owned_file_without_force_is_refused_before_any_work(tmp_path):
    out = tmp_path / "out"
    before = _previous_run(out)
    with pytest.raises(ExportError, match="model.packed.safetensors already exists.*--force"):
        with output_dir(out, owned=OWNED):
            pytest.fail("the block must not run")
    assert _tree(out) == before
    assert _siblings(tmp_path, {"out"}) == []


@pytest.mark.parametrize(
    "failure", [RuntimeError("boom"), Cancelled(), KeyboardInterrupt(), ExportError("disk full")]
)
def test_failure_midway_leaves_the_directory_as_it_was(tmp_path, failure):
    out = tmp_path / "out"
    before = _previous_run(out)
    with pytest.raises(type(failure)) as info:
        with output_dir(out, force=True, owned=OWNED) as stage:
            atomic_write(stage / "model.packed.safetensors", [b"half of run 2"])
            raise failure
    assert _tree(out) == before
    assert _siblings(tmp_path, {"out"}) == []
    if isinstance(failure, KeyboardInterrupt):
        assert interrupt_exit(info.value) == (130, f"interrupted; {out} left as it was")


def test_failure_in_a_new_directory_removes_the_folders_it_created(tmp_path):
    out = tmp_path / "x" / "y" / "out"
    with pytest.raises(RuntimeError):
        with output_dir(out) as stage:
            (stage / "model.pt").write_bytes(b"1")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_errors_raised_inside_name_the_output_directory_not_the_stage(tmp_path):
    out = tmp_path / "out"
    _previous_run(out)
    with pytest.raises(ExportError) as info:
        with output_dir(out, merge_existing=True) as stage:
            atomic_write(stage / "model.pt", [b"x"])  # exists, no force
    assert str(out / "model.pt") in str(info.value) and ".partial" not in str(info.value)
    assert info.value.path == str(out / "model.pt")


def test_a_second_run_on_the_same_directory_is_refused(tmp_path):
    out = tmp_path / "out"
    with output_dir(out) as stage:
        (stage / "model.pt").write_bytes(b"first")
        with pytest.raises(ExportError) as info:
            with output_dir(out, force=True):
                pytest.fail("the block must not run")
        assert str(info.value) == (
            f"another workbench run is writing {out} (pid {os.getpid()}); "
            "wait for it or choose another --out"
        )
        assert stage.is_dir()  # the refused run did not clean up the live one's staging
        # another output directory in the same parent is independent
        with output_dir(tmp_path / "other") as other:
            (other / "f").write_bytes(b"2")
    assert (out / "model.pt").read_bytes() == b"first"
    assert (tmp_path / "other" / "f").read_bytes() == b"2"
    assert not lock_path(out.resolve()).exists()


def test_stale_leftovers_of_a_killed_run_are_cleaned(tmp_path):
    out = tmp_path / "out"
    before = _previous_run(out)
    partial = tmp_path / "out.k3j9x0ab.partial"
    partial.mkdir()
    (partial / "model.packed.safetensors").write_bytes(os.urandom(1000))
    old = tmp_path / "out.0123abcd.old"
    old.mkdir()
    (old / "model.pt").write_bytes(b"older still")
    (out / ".model.pt.ab12cd34.tmp.pt").write_bytes(b"temp of an old-style run")
    lookalike = tmp_path / "out.v2.partial"  # not ours: never touched
    lookalike.mkdir()
    with output_dir(out, merge_existing=True) as stage:
        assert not partial.exists() and not old.exists()
        assert not (stage / ".model.pt.ab12cd34.tmp.pt").exists()
    assert _tree(out) == before
    assert lookalike.is_dir()
    assert _siblings(tmp_path, {"out", "out.v2.partial"}) == []


def test_a_directory_renamed_aside_by_a_crash_is_put_back(tmp_path):
    out = tmp_path / "out"
    before = _previous_run(out)
    # killed between "DIR -> DIR.*.old" and "partial -> DIR"
    os.rename(out, tmp_path / "out.zz99zz99.old")
    (tmp_path / "out.aa11aa11.partial").mkdir()
    recover(out)
    assert _tree(out) == before
    assert _siblings(tmp_path, {"out"}) == []
    # and a transaction does the same on its own
    os.rename(out, tmp_path / "out.zz99zz98.old")
    with pytest.raises(ExportError, match="already exists"):
        with output_dir(out, owned=OWNED):
            pass
    assert _tree(out) == before


def test_interrupt_during_the_swap_is_held_until_the_swap_is_done(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _previous_run(out)
    renames = []
    real_rename = os.rename

    def rename(src, dst):
        renames.append((Path(src).name, Path(dst).name))
        if len(renames) == 1:
            # a Ctrl-C between the two renames must not be acted on until both are done
            os.kill(os.getpid(), signal.SIGINT)
        real_rename(src, dst)

    monkeypatch.setattr(outdir.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt) as info:
        with outdir.interrupts_raise(), output_dir(out, force=True, owned=OWNED) as stage:
            (stage / "model.pt").write_bytes(b"run 2")
    assert len(renames) == 2
    assert (out / "model.pt").read_bytes() == b"run 2"
    assert _siblings(tmp_path, {"out"}) == []
    assert interrupt_exit(info.value) == (130, f"interrupted; {out} was already written completely")


def test_sigterm_raises_an_interrupt_only_inside_the_guard():
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    with pytest.raises(outdir.Interrupted) as info:
        with outdir.interrupts_raise():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):
                pass
    assert info.value.signum == signal.SIGTERM
    assert interrupt_exit(info.value) == (143, "interrupted")
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_unwritable_locations_are_refused(tmp_path, monkeypatch):
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(ExportError, match="is a file, not a directory"):
        check_output_location(afile / "sub" / "out")
    with pytest.raises(ExportError, match="exists and is not a directory"):
        check_output_location(afile)
    for bad in ("/proc/workbench-out", "/sys/kernel/workbench-out", "/proc"):
        with pytest.raises(ExportError, match="cannot write output under"):
            check_output_location(bad)
    # through a symlink into /proc
    link = tmp_path / "link"
    link.symlink_to("/proc/self")
    with pytest.raises(ExportError, match="under /proc"):
        check_output_location(link / "out")

    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        outdir.os, "access", lambda p, mode: False if Path(p) == ro else real_access(p, mode)
    )
    with pytest.raises(ExportError, match="not writable"):
        check_output_location(ro / "out")
    with pytest.raises(ExportError, match="output directory is not writable"):
        check_output_location(ro)
    monkeypatch.setattr(outdir.os, "access", real_access)

    def read_only_fs(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(outdir.tempfile, "mkdtemp", read_only_fs)
    with pytest.raises(ExportError, match="Read-only file system"):
        with output_dir(tmp_path / "out"):
            pytest.fail("the block must not run")
    assert not (tmp_path / "out").exists()


def test_atomic_write_leaves_nothing_on_interrupt_and_flushes(tmp_path, monkeypatch):
    target = tmp_path / "model.pt"

    def writer(tmp):
        Path(tmp).write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, writer=writer)
    assert os.listdir(tmp_path) == []
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(outdir.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    atomic_write(target, [b"a", b"b"])
    assert target.read_bytes() == b"ab" and synced
    with pytest.raises(ExportError, match="already exists"):
        atomic_write(target, [b"c"])


def test_atomic_write_into_an_unwritable_directory_is_an_export_error(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(outdir.tempfile, "mkstemp", denied)
    with pytest.raises(ExportError, match="cannot create a file in this directory"):
        atomic_write(tmp_path / "recipe.json", [b"{}"])


def test_transaction_final_paths(tmp_path):
    tx = OutputTransaction(tmp_path / "out")
    with tx as stage:
        assert tx.final(stage / "model.pt") == tmp_path / "out" / "model.pt"


def test_the_current_directory_is_never_swapped(tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    monkeypatch.chdir(work / "sub")
    for target in (".", "..", str(work)):
        with pytest.raises(ExportError, match="is the current directory or contains it"):
            with output_dir(target):
                pytest.fail("the block must not run")
    with output_dir("out") as stage:
        (stage / "f").write_bytes(b"1")
    assert (work / "sub" / "out" / "f").read_bytes() == b"1"
    assert os.listdir(work) == ["sub"]


def test_unreadable_files_in_the_directory_are_an_export_error(tmp_path, monkeypatch):
    out = tmp_path / "out"
    before = _previous_run(out)

    def denied(src, dst, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), src)

    monkeypatch.setattr(outdir, "_link_or_copy", denied)
    with pytest.raises(ExportError, match="cannot prepare the new output directory"):
        with output_dir(out, merge_existing=True):
            pytest.fail("the block must not run")
    assert _tree(out) == before
    assert _siblings(tmp_path, {"out"}) == []
