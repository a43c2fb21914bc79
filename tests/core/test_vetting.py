"""Opening a stranger's model file never runs code from it (core/io/vetting.py).

Every hostile file is generated here; payloads only create a marker file in ``tmp_path``.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from core.base.errors import ModelLoadError, UntrustedPickleError, WorkbenchError
from core.io.model_io import load_model
from core.io.vetting import zip_name_problem
from tests.models import make

MARKER = "PWNED"


class _Payload:
    """Unpickling this runs ``touch MARKER`` (a REDUCE to ``os.system``)."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def _members(path: Path) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(path) as zf:
        return [(n, zf.read(n)) for n in zf.namelist()]


def _write_zip(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members:
            zf.writestr(zipfile.ZipInfo(name), data)  # ZipInfo: duplicates are written as-is
    return path


def _payload_pickle(target: Path) -> bytes:
    buf = io.BytesIO()
    torch.save(((_Payload(target),), {}), buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def pt2(tmp_path_factory) -> tuple[Path, nn.Module, torch.Tensor]:
    model, x = make("encoder")
    path = tmp_path_factory.mktemp("pt2") / "good.pt2"
    torch.export.save(torch.export.export(model.eval(), (x,)), str(path))
    return path, model, x


def _root(members: list[tuple[str, bytes]]) -> str:
    return members[0][0].split("/", 1)[0] + "/"


def _assert_refused(path: Path, marker: Path, *words: str) -> WorkbenchError:
    with pytest.raises(UntrustedPickleError) as info:
        load_model(path)
    msg = str(info.value)
    assert str(path) in msg and "--trust" in msg, msg
    for word in words:
        assert word in msg, msg
    assert not marker.exists(), "code from the file ran"
    return info.value


# --------------------------------------------------------------------------- .pt2


def test_benign_pt2_programs_open_runnable(tmp_path):
    class WithConstants(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.register_buffer("scale", torch.full((3,), 2.0))
            self.register_buffer("shift", torch.ones(3), persistent=False)
            self.c = torch.tensor([1.0, 2.0, 3.0])  # a lifted tensor constant

        def forward(self, x):
            return self.fc(x) * self.scale + self.shift + self.c

    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)).eval()
    resnet, rx = make("resnet")
    cases = {
        "resnet": (resnet.eval(), rx, None),
        "dynamic": (mlp, torch.randn(4, 8), ({0: torch.export.Dim("b", min=2)},)),
        "constants": (WithConstants().eval(), torch.randn(2, 4), None),
    }
    for name, (model, x, dyn) in cases.items():
        path = tmp_path / f"{name}.pt2"
        torch.export.save(torch.export.export(model, (x,), dynamic_shapes=dyn), str(path))
        loaded = load_model(path)
        assert loaded.can_run and loaded.format == "pt2", name
        with torch.no_grad():
            torch.testing.assert_close(loaded.module(x), model(x))


def test_pt2_extra_upper_case_json_model_with_payload_is_refused(pt2, tmp_path):
    """torch's loader strips five characters off any models/* member: `.JSON` is a program too."""
    good, _, _ = pt2
    marker = tmp_path / MARKER
    members = _members(good)
    root = _root(members)
    program = dict(members)[root + "models/model.json"]
    members += [
        (root + "models/evil.JSON", program),
        (root + "data/sample_inputs/evil.pt", _payload_pickle(marker)),
    ]
    bad = _write_zip(tmp_path / "upper.pt2", members)
    _assert_refused(bad, marker, "case-variant")


def test_pt2_extra_lower_case_model_is_refused(pt2, tmp_path):
    good, _, _ = pt2
    marker = tmp_path / MARKER
    members = _members(good)
    root = _root(members)
    by_name = dict(members)
    for suffix in ("weights/model_weights_config.json", "constants/model_constants_config.json"):
        other = suffix.replace("model_", "evil_")
        members.append((root + "data/" + other, by_name[root + "data/" + suffix]))
    members += [
        (root + "models/evil.json", by_name[root + "models/model.json"]),
        (root + "data/sample_inputs/evil.pt", _payload_pickle(marker)),
    ]
    _assert_refused(_write_zip(tmp_path / "two.pt2", members), marker, "more than one program")


def test_pt2_second_weights_config_is_refused(pt2, tmp_path):
    good, _, _ = pt2
    members = _members(good)
    root = _root(members)
    config = dict(members)[root + "data/weights/model_weights_config.json"]
    members.append((root + "data/weights/other_weights_config.json", config))
    _assert_refused(_write_zip(tmp_path / "cfg.pt2", members), tmp_path / MARKER, "does not write")


def test_pt2_payload_in_sample_inputs_is_refused(pt2, tmp_path):
    good, _, _ = pt2
    marker = tmp_path / MARKER
    members = [
        (n, _payload_pickle(marker) if n.endswith("sample_inputs/model.pt") else d)
        for n, d in _members(good)
    ]
    _assert_refused(_write_zip(tmp_path / "sample.pt2", members), marker, "example inputs")


@pytest.mark.parametrize("shape", ["list", "entry_list", "extra_key"])
def test_pt2_config_of_the_wrong_shape_is_a_clear_error(pt2, tmp_path, shape):
    good, _, _ = pt2
    members = _members(good)
    root = _root(members)
    key = root + "data/weights/model_weights_config.json"
    config = json.loads(dict(members)[key])
    first = next(iter(config["config"]))
    if shape == "list":
        config = [config]
    elif shape == "entry_list":
        config["config"][first] = list(config["config"][first].values())
    else:
        config["config"][first]["loader"] = "os.system"
    members = [(n, json.dumps(config).encode() if n == key else d) for n, d in members]
    _assert_refused(_write_zip(tmp_path / f"{shape}.pt2", members), tmp_path / MARKER)


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "backslash", "duplicate", "case"])
def test_pt2_member_names_that_cannot_be_vetted_are_refused(pt2, tmp_path, kind):
    good, _, _ = pt2
    members = _members(good)
    root = _root(members)
    program = dict(members)[root + "models/model.json"]
    if kind == "absolute":
        members.append(("/" + root + "models/model.json", program))
    elif kind == "dotdot":
        members.append((root + "models/../models/model.json", program))
    elif kind == "backslash":
        members.append((root + "models\\model.json", program))
    elif kind == "duplicate":
        members.append((root + "models/model.json", program))
    else:
        members.append((root + "Models/model.json", program))
    error = _assert_refused(_write_zip(tmp_path / f"{kind}.pt2", members), tmp_path / MARKER)
    assert "Traceback" not in str(error)


def test_zip_name_rules():
    assert zip_name_problem(["r/a", "r/b/c.json"]) is None
    for names, word in [
        (["r/a", "r/a"], "twice"),
        (["/r/a"], "absolute"),
        (["r/../a"], ".."),
        (["r/a\\b"], "backslash"),
        (["r/a", "q/b"], "root"),
        (["r/A", "r/a"], "case"),
        (["r/x.Pt"], "case-variant"),
    ]:
        problem = zip_name_problem(names)
        assert problem is not None and word in problem, (names, problem)


def test_hostile_pt2_opens_with_trust_only_when_torch_can_load_it(pt2, tmp_path):
    """Trust hands the file to torch unchanged: the refusal above is the vetting, not a bug."""
    good, model, x = pt2
    members = _members(good)
    root = _root(members)
    members.append((root + "extra/notes.txt", b"written by torch.export.save(extra_files=...)"))
    extra = _write_zip(tmp_path / "extra.pt2", members)
    loaded = load_model(extra)  # string-only extra/ files are part of the allow-list
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), model(x))


# --------------------------------------------------------------------------- TorchScript


class _SetState(nn.Module):
    """Writes a file from ``__setstate__``, i.e. while ``torch.jit.load`` reads it."""

    def __init__(self, target: str):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, 3))
        self.target = target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, str, bool]:
        return (self.weight, self.target, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]) -> None:
        torch.ops.aten.save(state[0], state[1])
        self.weight = state[0]
        self.target = state[1]
        self.training = state[2]


class _SavesInForward(nn.Module):
    def __init__(self, target: str):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.target = target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.save(x, self.target)
        return self.fc(x)


def test_setstate_that_writes_a_file_opens_weights_only(tmp_path):
    marker = tmp_path / MARKER
    path = tmp_path / "setstate.pt"
    module = _SetState(str(marker))
    torch.jit.save(torch.jit.script(module), str(path))
    assert not marker.exists()
    loaded = load_model(path)
    assert not marker.exists(), "__setstate__ ran"
    assert loaded.weights_only and not loaded.can_run
    reason = loaded.metadata["opened_weights_only_reason"]
    assert reason == "opened weights-only: this TorchScript file defines __setstate__"
    (weight,) = [t for t in loaded.module.state_dict().values()]
    assert torch.equal(weight, module.weight.detach())
    with pytest.raises(ModelLoadError):
        loaded.module(torch.randn(1, 3))
    load_model(path, trust=True)  # the user vouches for it: torch.jit.load runs __setstate__
    assert marker.exists()


def test_file_io_op_in_forward_opens_weights_only(tmp_path):
    marker = tmp_path / MARKER
    path = tmp_path / "io.pt"
    module = _SavesInForward(str(marker))
    torch.jit.save(torch.jit.script(module), str(path))
    loaded = load_model(path)
    assert loaded.weights_only
    assert "save" in loaded.metadata["opened_weights_only_reason"]
    state = loaded.module.state_dict()
    assert torch.equal(state["fc.weight"], module.fc.weight.detach())
    assert not marker.exists()


def test_hand_edited_code_calling_a_custom_namespace_opens_weights_only(tmp_path):
    scripted = torch.jit.script(nn.Sequential(nn.Linear(3, 2)))
    path = tmp_path / "plain.pt"
    torch.jit.save(scripted, str(path))
    members = []
    for name, data in _members(path):
        # TorchScript mangles class files (linear/___torch_mangle_N.py) once another Linear
        # was scripted in this process: edit whichever code file calls the op.
        if name.endswith(".py"):
            data = data.replace(b"torch.linear(", b"ops.evil.linear(")
        members.append((name, data))
    assert any(b"ops.evil.linear(" in data for _, data in members)
    edited = _write_zip(tmp_path / "edited.pt", members)
    loaded = load_model(edited)
    assert loaded.weights_only
    assert "torch.ops.evil" in loaded.metadata["opened_weights_only_reason"]


@pytest.mark.parametrize("name", ["resnet", "lstm", "transformer", "encoder"])
@pytest.mark.parametrize("how", ["script", "trace"])
def test_benign_torchscript_opens_runnable_with_the_same_outputs(tmp_path, name, how):
    model, x = make(name)
    model.eval()
    with torch.no_grad():
        ts = (
            torch.jit.script(model)
            if how == "script"
            else torch.jit.trace(model, x, check_trace=False)
        )
    path = tmp_path / f"{name}.pt"
    torch.jit.save(ts, str(path))
    loaded = load_model(path)
    assert loaded.can_run, loaded.metadata.get("opened_weights_only_reason")
    assert "opened_weights_only_reason" not in loaded.metadata
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), model(x))


def test_torchscript_duplicate_member_is_refused(tmp_path):
    path = tmp_path / "mlp.pt"
    torch.jit.save(torch.jit.script(nn.Sequential(nn.Linear(3, 2))), str(path))
    members = _members(path)
    members.append(next(m for m in members if m[0].endswith("data.pkl")))
    with pytest.raises(UntrustedPickleError, match="twice"):
        load_model(_write_zip(tmp_path / "dup.pt", members))


def test_cli_inspect_prints_the_weights_only_reason(tmp_path):
    import subprocess
    import sys

    marker = tmp_path / MARKER
    path = tmp_path / "setstate.pt"
    torch.jit.save(torch.jit.script(_SetState(str(marker))), str(path))
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-m", "core.cli.main", "inspect", str(path)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "opened weights-only: this TorchScript file defines __setstate__" in proc.stdout
    assert not marker.exists()


# --------------------------------------------------------------------------- packed archives


def _packed_from(source: Path, tmp_path: Path) -> tuple[Path, Any]:
    from core.export.formats import export
    from tests.core._fixtures import make_result

    result = make_result(load_model(source, trust=True), sparsity=0.5, bits=8)
    packed = tmp_path / "model.packed.safetensors"
    export(result, "packed", packed, latency=False)
    return packed, result


def test_packed_archive_never_opens_its_recorded_source(tmp_path):
    """The archive names a hostile TorchScript file: opening the archive must not open it."""
    marker = tmp_path / MARKER
    source = tmp_path / "setstate.pt"
    torch.jit.save(torch.jit.script(_SetState(str(marker))), str(source))
    packed, result = _packed_from(source, tmp_path)  # opened with trust: writes the marker
    marker.unlink()
    opened = load_model(packed)
    assert not marker.exists(), "the recorded source was opened"
    assert opened.weights_only and opened.metadata["packed_source"] == str(source.absolute())
    assert "--base" in opened.metadata["opened_weights_only_reason"]
    weights = dict(opened.module.named_parameters())
    for name, value in result.compressed.module.state_dict().items():
        assert torch.equal(weights[name].detach(), value), name
    # Named explicitly, the base is vetted like any input: without trust its code never runs
    # (it opens weights-only, and its __getstate__ tuple does not name the archive's tensors).
    with pytest.raises(ModelLoadError):
        load_model(packed, base=source)
    assert not marker.exists()


def test_packed_archive_with_an_explicit_base_runs(tmp_path):
    from core.export.formats import result_from_packed

    model, x = make("encoder")
    source = tmp_path / "enc.pt"
    torch.jit.save(torch.jit.script(model.eval()), str(source))
    packed, result = _packed_from(source, tmp_path)
    assert load_model(packed).weights_only
    with pytest.raises(ModelLoadError, match="--base"):
        result_from_packed(packed)  # a recorded file path is never followed
    runnable = load_model(packed, base=source)
    assert runnable.can_run
    with torch.no_grad():
        torch.testing.assert_close(runnable.module(x), result.compressed.module(x))
    again = result_from_packed(packed, source)
    assert again.original.source == str(source)
    with pytest.raises(ModelLoadError, match="only applies to packed"):
        load_model(source, base=source)
