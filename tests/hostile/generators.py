"""Generators of hostile inputs: each writes one attack file into a directory.

Every generator has the signature ``make(directory, marker, seeds) -> Case`` and returns
``(path, kind, description)``. Payloads never do anything but create the file ``marker``
(``touch`` through ``os.system``, or ``open(marker, "w")`` through ``exec``/``eval``/TorchScript
``aten::save``), so a test detects execution by checking that file and nothing else is harmed.

`REGISTRY` lists every generator with how the CLI is pointed at it:

* ``command`` -- ``inspect`` (``inspect FILE --json``), ``run`` (the same with a clean
  ``--data`` file, so the model's forward pass runs), ``data`` (``inspect demo:mlp --data
  FILE``) or ``compress`` (``compress FILE --out DIR``; a refusal must leave DIR empty).
* ``live`` -- loading the file with ``--trust`` really runs the payload: the suite checks that,
  so a payload that silently stopped working cannot make a refusal test pass by accident.
* ``isolate`` -- run in a fresh subprocess (decompression bombs and other resource attacks).

Bombs are large when decompressed (`BOMB_BYTES`) but small on disk; they are written in
streamed chunks so the generator itself stays in low memory, and cached in ``seeds.cache``.
"""

from __future__ import annotations

import builtins
import collections
import functools
import hashlib
import io
import json
import os
import pickle
import shlex
import struct
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

#: Decompressed size of every bomb: above the suite's address-space headroom (harness.AS_LIMIT
#: minus what torch needs), so a reader that inflates it blindly runs out of memory.
BOMB_BYTES = 2 << 30
_CHUNK = 1 << 24


class Case(NamedTuple):
    """One generated hostile input."""

    path: Path
    kind: str
    description: str


@dataclass(frozen=True)
class Seeds:
    """Clean inputs that mutating generators start from.

    Attributes
    ----------
    packed
        A real ``model.packed.safetensors`` written by ``workbench compress demo:mlp``.
    cache
        Directory where expensive, marker-independent inputs (bombs) are kept for reuse.
    """

    packed: Path | None = None
    cache: Path | None = None


@dataclass(frozen=True)
class Hostile:
    """A registered generator and how the suite runs the CLI on its output."""

    name: str
    make: Callable[[Path, Path, Seeds], Case]
    command: str = "inspect"
    live: bool = False
    isolate: bool = False
    needs: tuple[str, ...] = field(default_factory=tuple)


REGISTRY: list[Hostile] = []


def _hostile(
    name: str,
    *,
    command: str = "inspect",
    live: bool = False,
    isolate: bool = False,
    needs: tuple[str, ...] = (),
) -> Callable[[Callable[[Path, Path, Seeds], Case]], Callable[[Path, Path, Seeds], Case]]:
    def register(fn: Callable[[Path, Path, Seeds], Case]) -> Callable[[Path, Path, Seeds], Case]:
        REGISTRY.append(Hostile(name, fn, command, live, isolate, needs))
        return fn

    return register


def by_name(name: str) -> Hostile:
    """The registered generator called ``name``."""
    for h in REGISTRY:
        if h.name == name:
            return h
    raise KeyError(name)


# =========================================================================== payloads


class _Reduce:
    """An object that pickles as ``fn(*args)``: the classic unpickling payload."""

    def __init__(self, fn: Callable[..., Any], *args: Any):
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return self.fn, self.args


def _touch_cmd(marker: Path) -> str:
    return f"touch {shlex.quote(str(marker))}"


def _write_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('pwned')"


def shell_payload(marker: Path) -> _Reduce:
    """Pickles as ``os.system("touch MARKER")`` (the global is ``posix.system``)."""
    return _Reduce(os.system, _touch_cmd(marker))


def exec_payload(marker: Path) -> _Reduce:
    """Pickles as ``builtins.exec("open(MARKER, 'w').write(...)")``."""
    return _Reduce(builtins.exec, _write_code(marker))


def eval_payload(marker: Path) -> _Reduce:
    """Pickles as ``builtins.eval("open(MARKER, 'w').write(...)")``."""
    return _Reduce(builtins.eval, _write_code(marker))


# -- hand-assembled pickle opcodes --------------------------------------------------------
def _u(s: str) -> bytes:
    """BINUNICODE."""
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _g(module: str, name: str) -> bytes:
    """GLOBAL (text form, any protocol)."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _sg(module: str, name: str) -> bytes:
    """STACK_GLOBAL (protocol 4+, allows dotted names resolved with getattr)."""
    return _u(module) + _u(name) + b"\x93"


def _op_pickle(variant: str, marker: Path) -> bytes:
    cmd, code = _touch_cmd(marker), _write_code(marker)
    if variant == "reduce":  # GLOBAL posix.system + TUPLE1 + REDUCE
        return b"\x80\x02" + _g("posix", "system") + _u(cmd) + b"\x85R."
    if variant == "stack_global":
        return b"\x80\x04" + _sg("os", "system") + _u(cmd) + b"\x85R."
    if variant == "inst":  # INST builds by calling the class/callable with the marked args
        return b"\x80\x02(" + _u(cmd) + b"ios\nsystem\n."
    if variant == "build":
        # A Namespace gets "__setstate__ = os.system" in its __dict__ from the first BUILD;
        # the second BUILD then calls it with the command.
        return (
            b"\x80\x02"
            + _g("argparse", "Namespace")
            + b")R}"
            + _u("__setstate__")
            + _g("os", "system")
            + b"sb"
            + _u(cmd)
            + b"b."
        )
    if variant == "exec":
        return b"\x80\x02" + _g("builtins", "exec") + _u(code) + b"\x85R."
    if variant == "eval":
        return b"\x80\x02" + _g("builtins", "eval") + _u(code) + b"\x85R."
    if variant == "getattr":
        # getattr(getattr(os.path, "os"), "system")(cmd): no "system" global anywhere.
        return (
            b"\x80\x02"
            + _g("builtins", "getattr")
            + b"("
            + _g("builtins", "getattr")
            + b"("
            + _g("os", "path")
            + _u("os")
            + b"tR"
            + _u("system")
            + b"tR("
            + _u(cmd)
            + b"tR."
        )
    if variant == "torch_serialization_os":  # looks like a torch global
        return b"\x80\x04" + _sg("torch.serialization", "os.system") + _u(cmd) + b"\x85R."
    if variant == "torch_utils_os":
        return b"\x80\x04" + _sg("torch._utils", "os.system") + _u(cmd) + b"\x85R."
    raise ValueError(variant)


# =========================================================================== evil pickles

for _proto in range(6):

    def _plain(directory: Path, marker: Path, seeds: Seeds, _p: int = _proto) -> Case:
        path = directory / f"model_p{_p}.pkl"
        path.write_bytes(pickle.dumps(shell_payload(marker), protocol=_p))
        return Case(path, "pickle", f"pickle.dump protocol {_p} of os.system('touch')")

    _hostile(f"pickle_protocol_{_proto}", live=_proto >= 2)(_plain)

for _variant in (
    "reduce",
    "stack_global",
    "inst",
    "build",
    "exec",
    "eval",
    "getattr",
    "torch_serialization_os",
    "torch_utils_os",
):

    def _ops(directory: Path, marker: Path, seeds: Seeds, _v: str = _variant) -> Case:
        path = directory / f"model_{_v}.pt"
        path.write_bytes(_op_pickle(_v, marker))
        return Case(path, "pickle", f"hand-assembled pickle: {_v} variant writing the marker")

    _hostile(f"pickle_op_{_variant}", live=True)(_ops)


@_hostile("torch_legacy_stream", live=True)
def torch_legacy_stream(directory: Path, marker: Path, seeds: Seeds) -> Case:
    path = directory / "legacy.pt"
    obj = {"fc.weight": torch.zeros(3, 4), "fc.bias": torch.zeros(3), "meta": shell_payload(marker)}
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    return Case(path, "torch-legacy", "legacy (non-zip) torch.save stream with os.system")


@_hostile("torch_zip_data_pkl", live=True)
def torch_zip_data_pkl(directory: Path, marker: Path, seeds: Seeds) -> Case:
    path = directory / "checkpoint.pt"
    torch.save({"fc.weight": torch.zeros(3, 4), "hook": exec_payload(marker)}, path)
    return Case(path, "torch-zip", "torch zip whose data.pkl calls builtins.exec")


@_hostile("torch_zip_nested_checkpoint", live=True)
def torch_zip_nested(directory: Path, marker: Path, seeds: Seeds) -> Case:
    path = directory / "nested.ckpt"
    ckpt = {
        "epoch": 7,
        "state_dict": {"fc.weight": torch.zeros(3, 4), "fc.bias": torch.zeros(3)},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "sched": eval_payload(marker)}]},
    }
    torch.save(ckpt, path)
    return Case(path, "torch-zip", "checkpoint dict whose optimizer state hides eval()")


@_hostile("torch_zip_compress_refused", command="compress", live=True)
def torch_zip_compress(directory: Path, marker: Path, seeds: Seeds) -> Case:
    path = directory / "evil_compress.pt"
    torch.save({"fc.weight": torch.zeros(3, 4), "x": shell_payload(marker)}, path)
    return Case(path, "torch-zip", "compress of an evil checkpoint: refused, output dir untouched")


# -- data files -------------------------------------------------------------------------
@_hostile("data_pt_pickle", command="data")
def data_pt_pickle(directory: Path, marker: Path, seeds: Seeds) -> Case:
    path = directory / "data.pt"
    torch.save({"x": torch.zeros(4, 64), "y": shell_payload(marker)}, path)
    return Case(path, "data-pt", "--data .pt whose 'y' is an os.system payload")


@_hostile("data_plain_pickle", command="data")
def data_plain_pickle(directory: Path, marker: Path, seeds: Seeds) -> Case:
    path = directory / "data.pt"
    path.write_bytes(_op_pickle("stack_global", marker))
    return Case(path, "data-pickle", "--data file that is a STACK_GLOBAL pickle payload")


@_hostile("data_npz_object_array", command="data")
def data_npz_object(directory: Path, marker: Path, seeds: Seeds) -> Case:
    path = directory / "data.npz"
    y = np.empty(1, dtype=object)
    y[0] = shell_payload(marker)
    np.savez(path, x=np.zeros((4, 64), np.float32), y=y)
    return Case(path, "npz", "--data .npz with a pickled object array")


# =========================================================================== TorchScript


class ScriptBlob:
    """A TorchScript class whose ``__setstate__`` writes a file with ``aten::save`` on load."""

    def __init__(self, target: str):
        self.target = target

    def __getstate__(self) -> str:
        return self.target

    def __setstate__(self, state: str) -> None:
        self.target = state
        torch.ops.aten.save(state, state)


class ScriptPayload(nn.Module):
    """A plausible model carrying a `ScriptBlob` attribute."""

    def __init__(self, target: str):
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.blob = ScriptBlob(target)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def _torchscript_payload(path: Path, marker: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(ScriptBlob)
        torch.jit.save(torch.jit.script(ScriptPayload(str(marker))), str(path))


@_hostile("torchscript_setstate_save", live=True)
def torchscript_setstate(directory: Path, marker: Path, seeds: Seeds) -> Case:
    path = directory / "scripted.pt"
    _torchscript_payload(path, marker)
    return Case(path, "torchscript", "TorchScript class __setstate__ calling aten::save")


# =========================================================================== .pt2


@functools.lru_cache(maxsize=1)
def _clean_pt2() -> bytes:
    """A real torch.export archive (dynamic batch: its program holds sym-expr strings)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).eval()
    batch = torch.export.Dim("batch", min=2, max=1024)
    ep = torch.export.export(model, (torch.randn(4, 64),), dynamic_shapes=({0: batch},))
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    return buf.getvalue()


def _pt2_root(names: list[str]) -> str:
    for n in names:
        if n.endswith("archive_format"):
            return n[: -len("archive_format")]
    raise ValueError("no archive_format member")


def _rewrite_zip(
    src: bytes,
    dst: Path,
    *,
    replace: dict[str, bytes] | None = None,
    add: list[tuple[str, bytes]] | None = None,
    add_raw: list[tuple[str, bytes]] | None = None,
    first: list[tuple[str, bytes]] | None = None,
) -> None:
    """Copy a torch zip, replacing members (names relative to its root folder), appending
    members (``add``: relative, ``add_raw``: exact names) or prepending them (``first``)."""
    replace = replace or {}
    with zipfile.ZipFile(io.BytesIO(src)) as zin:
        root = (
            _pt2_root(zin.namelist())
            if any(n.endswith("archive_format") for n in zin.namelist())
            else zin.namelist()[0].split("/")[0] + "/"
        )
        with warnings.catch_warnings(), zipfile.ZipFile(dst, "w") as zout:
            warnings.simplefilter("ignore")  # duplicate names are the point of some cases
            for rel, data in first or []:
                zout.writestr(root + rel, data)
            for info in zin.infolist():
                rel = info.filename[len(root) :]
                zout.writestr(info.filename, replace.get(rel, zin.read(info)))
            for rel, data in add or []:
                zout.writestr(root + rel, data)
            for name, data in add_raw or []:
                zout.writestr(zipfile.ZipInfo(name), data)


def _pt2_member(rel: str) -> bytes:
    with zipfile.ZipFile(io.BytesIO(_clean_pt2())) as z:
        return z.read(_pt2_root(z.namelist()) + rel)


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _pt2(directory: Path, name: str, description: str, **kw: Any) -> Case:
    path = directory / name
    _rewrite_zip(_clean_pt2(), path, **kw)
    return Case(path, "pt2", description)


@_hostile("pt2_sample_inputs_pickle", live=True)
def pt2_sample_inputs(directory: Path, marker: Path, seeds: Seeds) -> Case:
    evil = _torch_bytes(((shell_payload(marker),), {}))
    return _pt2(
        directory,
        "sample.pt2",
        "sample inputs member is an os.system pickle",
        replace={"data/sample_inputs/model.pt": evil},
    )


def _weights_config() -> dict[str, Any]:
    return json.loads(_pt2_member("data/weights/model_weights_config.json"))


@_hostile("pt2_weights_pickle", live=True)
def pt2_weights_pickle(directory: Path, marker: Path, seeds: Seeds) -> Case:
    cfg = _weights_config()
    first = next(iter(cfg["config"].values()))
    first["use_pickle"] = True
    return _pt2(
        directory,
        "weights.pt2",
        "a weight marked use_pickle whose payload calls exec",
        replace={
            "data/weights/model_weights_config.json": json.dumps(cfg).encode(),
            "data/weights/" + first["path_name"]: _torch_bytes(exec_payload(marker)),
        },
    )


@_hostile("pt2_constants_pickle", live=True)
def pt2_constants_pickle(directory: Path, marker: Path, seeds: Seeds) -> Case:
    cfg = {
        "config": {
            "lifted_tensor_0": {
                "path_name": "tensor_constant_0",
                "is_param": False,
                "use_pickle": True,
                "tensor_meta": None,
            }
        }
    }
    return _pt2(
        directory,
        "constants.pt2",
        "a pickled tensor constant that is an os.system payload",
        replace={"data/constants/model_constants_config.json": json.dumps(cfg).encode()},
        add=[("data/constants/tensor_constant_0", _torch_bytes(shell_payload(marker)))],
    )


@_hostile("pt2_opaque_constant", live=True)
def pt2_opaque_constant(directory: Path, marker: Path, seeds: Seeds) -> Case:
    cfg = {
        "config": {
            "obj": {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                    "tensor_meta": None}
        }
    }  # fmt: skip
    return _pt2(
        directory,
        "opaque.pt2",
        "an opaque constant (plain pickle.loads) with an os.system payload",
        replace={"data/constants/model_constants_config.json": json.dumps(cfg).encode()},
        add=[("data/constants/opaque_obj_0", pickle.dumps(shell_payload(marker), protocol=2))],
    )


@_hostile("pt2_legacy_weights_file", live=True)
def pt2_legacy_weights(directory: Path, marker: Path, seeds: Seeds) -> Case:
    return _pt2(
        directory,
        "legacy_weights.pt2",
        "legacy data/weights/model.pt holding an exec payload",
        add=[("data/weights/model.pt", _torch_bytes({"w": exec_payload(marker)}))],
    )


def _extra_model(model: str, marker: Path) -> list[tuple[str, bytes]]:
    """Members of a second program ``model`` whose sample inputs are a payload."""
    return [
        (f"data/sample_inputs/{model}.pt", _torch_bytes(((shell_payload(marker),), {}))),
        (
            f"data/weights/{model}_weights_config.json",
            _pt2_member("data/weights/model_weights_config.json"),
        ),
        (
            f"data/constants/{model}_constants_config.json",
            _pt2_member("data/constants/model_constants_config.json"),
        ),
    ]


@_hostile("pt2_uppercase_json_model", live=True)
def pt2_uppercase_json(directory: Path, marker: Path, seeds: Seeds) -> Case:
    return _pt2(
        directory,
        "upper.pt2",
        "second program models/evil.JSON (upper case) with pickled sample inputs",
        add=[("models/evil.JSON", _pt2_member("models/model.json")), *_extra_model("evil", marker)],
    )


@_hostile("pt2_nested_sub_model", live=True)
def pt2_nested_sub_model(directory: Path, marker: Path, seeds: Seeds) -> Case:
    return _pt2(
        directory,
        "submodel.pt2",
        "second program models/sub/evil.json in a sub-folder with pickled sample inputs",
        add=[
            ("models/sub/evil.json", _pt2_member("models/model.json")),
            *_extra_model("sub/evil", marker),
        ],
    )


@_hostile("pt2_duplicate_sample_first_evil")
def pt2_dup_first(directory: Path, marker: Path, seeds: Seeds) -> Case:
    evil = _torch_bytes(((shell_payload(marker),), {}))
    return _pt2(
        directory,
        "dup_first.pt2",
        "duplicate member names: the first sample-inputs entry is evil, the last benign",
        first=[("data/sample_inputs/model.pt", evil)],
    )


@_hostile("pt2_duplicate_sample_last_evil")
def pt2_dup_last(directory: Path, marker: Path, seeds: Seeds) -> Case:
    evil = _torch_bytes(((shell_payload(marker),), {}))
    return _pt2(
        directory,
        "dup_last.pt2",
        "duplicate member names: the first sample-inputs entry is benign, the last evil",
        add=[("data/sample_inputs/model.pt", evil)],
    )


def _evil_weights_config(marker: Path) -> tuple[bytes, bytes, str]:
    cfg = _weights_config()
    first = next(iter(cfg["config"].values()))
    first["use_pickle"] = True
    first["path_name"] = "weight_evil"
    return json.dumps(cfg).encode(), _torch_bytes(shell_payload(marker)), "data/weights/weight_evil"


@_hostile("pt2_second_weights_config_first")
def pt2_second_config_first(directory: Path, marker: Path, seeds: Seeds) -> Case:
    cfg, evil, member = _evil_weights_config(marker)
    return _pt2(
        directory,
        "config_first.pt2",
        "two weights configs under one name; the first marks a pickled evil weight",
        first=[("data/weights/model_weights_config.json", cfg)],
        add=[(member, evil)],
    )


@_hostile("pt2_second_weights_config_last")
def pt2_second_config_last(directory: Path, marker: Path, seeds: Seeds) -> Case:
    cfg, evil, member = _evil_weights_config(marker)
    return _pt2(
        directory,
        "config_last.pt2",
        "two weights configs under one name; the last marks a pickled evil weight",
        add=[("data/weights/model_weights_config.json", cfg), (member, evil)],
    )


@_hostile("pt2_config_is_list")
def pt2_config_list(directory: Path, marker: Path, seeds: Seeds) -> Case:
    cfg = {"config": list(_weights_config()["config"].values())}
    return _pt2(
        directory,
        "config_list.pt2",
        "weights config whose 'config' is a list instead of an object",
        replace={"data/weights/model_weights_config.json": json.dumps(cfg).encode()},
    )


@_hostile("pt2_config_toplevel_list")
def pt2_config_toplevel_list(directory: Path, marker: Path, seeds: Seeds) -> Case:
    return _pt2(
        directory,
        "config_toplevel.pt2",
        "constants config that is a JSON list",
        replace={"data/constants/model_constants_config.json": b'[{"path_name": "x"}]'},
    )


@_hostile("pt2_absolute_member")
def pt2_absolute_member(directory: Path, marker: Path, seeds: Seeds) -> Case:
    return _pt2(
        directory,
        "absolute.pt2",
        "a member named with the absolute marker path",
        add_raw=[(str(marker), b"pwned")],
    )


@_hostile("pt2_dotdot_member")
def pt2_dotdot_member(directory: Path, marker: Path, seeds: Seeds) -> Case:
    rel = "../" * 12 + str(marker).lstrip("/")
    return _pt2(
        directory,
        "dotdot.pt2",
        "a member whose name climbs out with ../ to the marker path",
        add=[(rel, b"pwned")],
        add_raw=[("../" + marker.name, b"pwned")],
    )


def _program() -> dict[str, Any]:
    return json.loads(_pt2_member("models/model.json"))


@_hostile("pt2_guards_code_call", command="run", live=True)
def pt2_guards_call(directory: Path, marker: Path, seeds: Seeds) -> Case:
    program = _program()
    # Guard code is compiled into the module's input check and runs on every forward call.
    program["guards_code"] = [f"__import__('os').system({_touch_cmd(marker)!r}) == 0"]
    return _pt2(
        directory,
        "guards.pt2",
        "guards_code entry that calls os.system (compiled with exec by ep.module())",
        replace={"models/model.json": json.dumps(program).encode()},
    )


def _replace_first_expr(obj: Any, new: str) -> bool:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "expr_str" and isinstance(v, str):
                obj[k] = new
                return True
            if _replace_first_expr(v, new):
                return True
    elif isinstance(obj, list):
        return any(_replace_first_expr(v, new) for v in obj)
    return False


@_hostile("pt2_sym_expr_attribute", live=True)
def pt2_sym_expr(directory: Path, marker: Path, seeds: Seeds) -> Case:
    program = _program()
    evil = f"s31.__class__.__init__.__globals__['os'].system({_touch_cmd(marker)!r})"
    if not _replace_first_expr(program, f"__import__('os').system({_touch_cmd(marker)!r})"):
        raise AssertionError("the clean program has no sym-expr string to replace")
    program.setdefault("range_constraints", {})[evil] = {"min_val": 2, "max_val": 4}
    return _pt2(
        directory,
        "symexpr.pt2",
        "sym-expr strings that call os.system / walk attributes (sympify evaluates them)",
        replace={"models/model.json": json.dumps(program).encode()},
    )


@_hostile("pt2_compress_refused", command="compress", live=True)
def pt2_compress(directory: Path, marker: Path, seeds: Seeds) -> Case:
    case = pt2_uppercase_json(directory, marker, seeds)
    return Case(case.path, case.kind, "compress of the .JSON-sub-model .pt2: output dir untouched")


# =========================================================================== safetensors


def _safetensors(path: Path, header: bytes | dict[str, Any], data: bytes = b"",
                 declared: int | None = None) -> None:  # fmt: skip
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    n = len(text) if declared is None else declared
    path.write_bytes(struct.pack("<Q", n) + text + data)


def _st_case(directory: Path, name: str, desc: str, header: Any, data: bytes = b"",
             declared: int | None = None) -> Case:  # fmt: skip
    path = directory / f"{name}.safetensors"
    _safetensors(path, header, data, declared)
    return Case(path, "safetensors", desc)


def _w(dtype: str, shape: list[int], start: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


@_hostile("st_header_longer_than_file")
def st_header_long(d: Path, m: Path, s: Seeds) -> Case:
    return _st_case(d, "hdr_long", "header length field beyond the file", b'{"a":1}', b"",
                    declared=10**9)  # fmt: skip


@_hostile("st_header_length_huge")
def st_header_huge(d: Path, m: Path, s: Seeds) -> Case:
    return _st_case(d, "hdr_huge", "header length 2**63", b'{"a":1}', b"", declared=2**63)


@_hostile("st_header_not_json")
def st_header_not_json(d: Path, m: Path, s: Seeds) -> Case:
    return _st_case(d, "hdr_junk", "header starts with { but is not JSON", b"{\x00\xff not json")


@_hostile("st_header_deep_json")
def st_header_deep(d: Path, m: Path, s: Seeds) -> Case:
    deep = b'{"w":' * 50_000 + b"1" + b"}" * 50_000
    return _st_case(d, "hdr_deep", "header JSON nested 50,000 levels", deep)


@_hostile("st_offsets_out_of_range")
def st_offsets(d: Path, m: Path, s: Seeds) -> Case:
    hdr = {"w": _w("F32", [4], 0, 10**12)}
    return _st_case(d, "offsets", "data_offsets end 10**12 in a 16-byte file", hdr, bytes(16))


@_hostile("st_offsets_overlapping")
def st_overlap(d: Path, m: Path, s: Seeds) -> Case:
    hdr = {"a.weight": _w("F32", [4], 0, 16), "b.weight": _w("F32", [4], 8, 24)}
    return _st_case(d, "overlap", "two tensors sharing bytes", hdr, bytes(24))


@_hostile("st_negative_shape")
def st_negative_shape(d: Path, m: Path, s: Seeds) -> Case:
    hdr = {"w": _w("F32", [-1, -4], 0, 16)}
    return _st_case(d, "negshape", "shape [-1, -4]", hdr, bytes(16))


@_hostile("st_huge_shape")
def st_huge_shape(d: Path, m: Path, s: Seeds) -> Case:
    hdr = {"w": _w("F32", [2**40, 2**40], 0, 16)}
    return _st_case(d, "hugeshape", "shape [2**40, 2**40] over 16 bytes", hdr, bytes(16))


@_hostile("st_unknown_dtype")
def st_unknown_dtype(d: Path, m: Path, s: Seeds) -> Case:
    hdr = {"w": _w("Q7", [4], 0, 16)}
    return _st_case(d, "dtype_q7", "dtype 'Q7'", hdr, bytes(16))


@_hostile("st_uint_dtypes")
def st_uint_dtypes(d: Path, m: Path, s: Seeds) -> Case:
    hdr = {
        "a.weight": _w("U16", [4], 0, 8),
        "b.weight": _w("U32", [4], 8, 24),
        "c.weight": _w("U64", [4], 24, 56),
        "d.weight": _w("BOOL", [8], 56, 64),
    }
    return _st_case(d, "uints", "unsigned 16/32/64-bit and bool tensors", hdr, bytes(64))


@_hostile("st_float8")
def st_float8(d: Path, m: Path, s: Seeds) -> Case:
    data = bytes(range(1, 33))
    hdr = {"a.weight": _w("F8_E4M3", [4, 4], 0, 16), "b.weight": _w("F8_E5M2", [4, 4], 16, 32)}
    return _st_case(d, "float8", "float8 (E4M3, E5M2) weights", hdr, data)


@_hostile("st_many_tiny_tensors")
def st_many_tensors(d: Path, m: Path, s: Seeds) -> Case:
    n = 100_000
    hdr = {f"layer{i}.weight": _w("F32", [1], 4 * i, 4 * i + 4) for i in range(n)}
    data = np.arange(n, dtype="<f4").tobytes()
    return _st_case(d, "many", f"{n:,} one-element tensors (must finish fast)", hdr, data)


@_hostile("st_nan_inf_weights")
def st_nan_inf(d: Path, m: Path, s: Seeds) -> Case:
    w = np.array([[np.nan, np.inf], [-np.inf, 1.0]], dtype="<f4")
    hdr = {"fc.weight": _w("F32", [2, 2], 0, 16), "all_nan.weight": _w("F32", [3], 16, 28)}
    data = w.tobytes() + np.full(3, np.nan, dtype="<f4").tobytes()
    return _st_case(d, "naninf", "NaN/Inf weights (must open and report them)", hdr, data)


@_hostile("st_metadata_not_strings")
def st_metadata_types(d: Path, m: Path, s: Seeds) -> Case:
    hdr = {"__metadata__": {"format": ["pt"], "n": 1}, "w": _w("F32", [4], 0, 16)}
    return _st_case(d, "meta_types", "__metadata__ values that are not strings", hdr, bytes(16))


@_hostile("st_compress_refused", command="compress")
def st_compress(d: Path, m: Path, s: Seeds) -> Case:
    return _st_case(d, "cmp_junk", "compress of a junk-header safetensors: output dir untouched",
                    b"{\x00 junk")  # fmt: skip


# =========================================================================== packed archives


def _read_st(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _packed_variant(
    seeds: Seeds,
    dst: Path,
    *,
    meta: dict[str, str] | None = None,
    layout: Callable[[list[Any]], Any] | None = None,
    prefix: bytes = b"",
    raw_layout: str | None = None,
) -> None:
    """Write a mutated copy of the seed archive with a valid checksum (an attacker can
    recompute it: it only guards against accidental corruption)."""
    if seeds.packed is None:
        raise ValueError("this generator needs seeds.packed (a real packed archive)")
    header, data = _read_st(seeds.packed)
    md = dict(header["__metadata__"])
    start, end = header["packed"]["data_offsets"]
    blob = prefix + data[start:end]
    if layout is not None:
        md["layout"] = json.dumps(layout(json.loads(md["layout"])), separators=(",", ":"))
    if raw_layout is not None:
        md["layout"] = raw_layout
    md.update(meta or {})
    md["sha256"] = hashlib.sha256(blob).hexdigest()[:16]
    new = {"__metadata__": md, "packed": _w("U8", [len(blob)], 0, len(blob))}
    _safetensors(dst, new, blob)


def _packed_case(d: Path, name: str, desc: str, seeds: Seeds, **kw: Any) -> Case:
    path = d / f"{name}.packed.safetensors"
    _packed_variant(seeds, path, **kw)
    return Case(path, "packed", desc)


@_hostile("packed_source_torchscript_payload", needs=("packed",))
def packed_source_ts(d: Path, m: Path, s: Seeds) -> Case:
    evil = d / "base_model.pt"
    _torchscript_payload(evil, m)
    return _packed_case(d, "src_ts", "archive whose recorded source is a TorchScript payload", s,
                        meta={"source": str(evil), "source_format": "torchscript"})  # fmt: skip


@_hostile("packed_source_pickle_payload", needs=("packed",))
def packed_source_pickle(d: Path, m: Path, s: Seeds) -> Case:
    evil = d / "base_model.pt"
    torch.save({"fc1.weight": torch.zeros(2), "x": shell_payload(m)}, evil)
    return _packed_case(d, "src_pkl", "archive whose recorded source is an evil pickle", s,
                        meta={"source": str(evil), "source_format": "eager"})  # fmt: skip


@_hostile("packed_source_pt2_payload", needs=("packed",))
def packed_source_pt2(d: Path, m: Path, s: Seeds) -> Case:
    evil = pt2_uppercase_json(d, m, s).path
    return _packed_case(d, "src_pt2", "archive whose recorded source is a .JSON-model .pt2", s,
                        meta={"source": str(evil), "source_format": "pt2"})  # fmt: skip


@_hostile("packed_zstd_bomb", needs=("packed",))
def packed_zstd_bomb(d: Path, m: Path, s: Seeds) -> Case:
    import zstandard

    numel = BOMB_BYTES  # 8-bit codes: one byte each
    out = io.BytesIO()
    cctx = zstandard.ZstdCompressor(level=1, write_content_size=True)
    with cctx.stream_writer(out, size=numel, closefd=False) as w:
        zeros = bytes(_CHUNK)
        for _ in range(numel // _CHUNK):
            w.write(zeros)
    z = out.getvalue()
    entry = ["bomb.weight", [numel // 4096, 4096], 8, 0, 0, len(z)]
    extra = z + struct.pack("<f", 1.0) + b"\x00"  # codes, scale, 8-bit zero point
    return _packed_case(d, "zstd_bomb", f"zstd codes inflating to {numel:,} bytes", s,
                        layout=lambda lay: [entry, *lay], prefix=extra)  # fmt: skip


@_hostile("packed_row_mask_bomb", needs=("packed",))
def packed_row_mask_bomb(d: Path, m: Path, s: Seeds) -> Case:
    entry = ["bomb.weight", [8, 1 << 31], 0, 0, 2]  # row mask: 1 byte, every row pruned
    return _packed_case(d, "row_bomb", "row-mask tensor of 8 x 2**31 described by one byte", s,
                        layout=lambda lay: [entry, *lay], prefix=b"\x00")  # fmt: skip


@_hostile("packed_negative_shape", needs=("packed",))
def packed_negative_shape(d: Path, m: Path, s: Seeds) -> Case:
    def mutate(lay: list[Any]) -> list[Any]:
        lay[1] = [lay[1][0], [-1, -lay[1][1][0]]]  # fc1.bias: product still 300
        return lay

    return _packed_case(d, "negshape", "layout shape [-1, -300] (product is positive)", s,
                        layout=mutate)  # fmt: skip


@_hostile("packed_huge_ints", needs=("packed",))
def packed_huge_ints(d: Path, m: Path, s: Seeds) -> Case:
    def mutate(lay: list[Any]) -> list[Any]:
        lay[0] = [lay[0][0], [10**30, 10**30]]
        return lay

    return _packed_case(d, "hugeint", "layout shape [10**30, 10**30]", s, layout=mutate)


@_hostile("packed_int_too_many_digits", needs=("packed",))
def packed_long_int(d: Path, m: Path, s: Seeds) -> Case:
    lay = '[["fc1.weight",[' + "9" * 5000 + ",64]]]"
    return _packed_case(d, "longint", "layout with a 5,000-digit integer", s, raw_layout=lay)


@_hostile("packed_deep_json", needs=("packed",))
def packed_deep_json(d: Path, m: Path, s: Seeds) -> Case:
    return _packed_case(d, "deep", "layout JSON nested 100,000 levels", s,
                        raw_layout="[" * 100_000 + "]" * 100_000)  # fmt: skip


@_hostile("packed_layout_not_list", needs=("packed",))
def packed_layout_not_list(d: Path, m: Path, s: Seeds) -> Case:
    return _packed_case(d, "layout_obj", "layout is an object of numbers", s,
                        raw_layout='{"fc1.weight": 3, "x": null}')  # fmt: skip


@_hostile("packed_duplicate_names", needs=("packed",))
def packed_duplicate_names(d: Path, m: Path, s: Seeds) -> Case:
    header, data = _read_st(s.packed) if s.packed else ({}, b"")
    lay = json.loads(header["__metadata__"]["layout"]) if header else []
    bias = lay[1] if lay else ["fc1.bias", [300]]
    extra = bytes(4 * int(np.prod(bias[1])))
    return _packed_case(d, "dup", "the same tensor name twice in the layout", s,
                        layout=lambda lay: [bias, *lay], prefix=extra)  # fmt: skip


@_hostile("packed_name_with_newlines", needs=("packed",))
def packed_newline_names(d: Path, m: Path, s: Seeds) -> Case:
    def mutate(lay: list[Any]) -> list[Any]:
        lay[0][0] = "fc1.weight\nworkbench inspect: ok\nall\nfine\nhere\n"
        return lay

    return _packed_case(d, "newline", "a tensor name carrying newlines (fake output lines)", s,
                        layout=mutate)  # fmt: skip


@_hostile("packed_unknown_dtype", needs=("packed",))
def packed_unknown_dtype(d: Path, m: Path, s: Seeds) -> Case:
    def mutate(lay: list[Any]) -> list[Any]:
        lay[1] = [lay[1][0], lay[1][1], "Z9"]
        return lay

    return _packed_case(d, "dtype", "layout dtype 'Z9'", s, layout=mutate)


@_hostile("packed_removed_channels_garbage", needs=("packed",))
def packed_removed_garbage(d: Path, m: Path, s: Seeds) -> Case:
    return _packed_case(d, "removed", "removed_channels with strings and floats", s,
                        meta={"removed_channels": '{"fc1": "zz", "fc2": [1e999]}'})  # fmt: skip


@_hostile("packed_removed_channels_list", needs=("packed",))
def packed_removed_list(d: Path, m: Path, s: Seeds) -> Case:
    return _packed_case(d, "removed_list", "removed_channels is a list and 'input' a bomb", s,
                        meta={"removed_channels": "[1, 2, 3]",
                              "input": '[[1000000000000, 64], "float32"]'})  # fmt: skip


@_hostile("packed_removed_channels_input_bomb", needs=("packed",))
def packed_removed_input_bomb(d: Path, m: Path, s: Seeds) -> Case:
    return _packed_case(d, "removed_bomb", "removed_channels for a missing layer, huge 'input'",
                        s, meta={"removed_channels": '{"nope": [0]}',
                                 "input": '[[1000000000000, 64], "os.system"]'})  # fmt: skip


@_hostile("packed_recipe_garbage", needs=("packed",))
def packed_recipe_garbage(d: Path, m: Path, s: Seeds) -> Case:
    return _packed_case(d, "recipe", "recipe metadata that is deep JSON", s,
                        meta={"recipe": "[" * 100_000 + "]" * 100_000,
                              "architecture": "demo:../../etc"})  # fmt: skip


# =========================================================================== bombs


def _cached(seeds: Seeds, directory: Path, name: str) -> tuple[Path, bool]:
    """(path, exists): bombs do not depend on the marker, so one copy serves the session."""
    base = seeds.cache or directory
    base.mkdir(parents=True, exist_ok=True)
    path = base / name
    return path, path.exists()


class _PrecompressedZeros:
    """Stand-in for zipfile's deflate compressor: a whole chunk of `_ZEROS` is emitted as one
    precomputed, byte-aligned deflate segment (compressed once), anything else goes through a
    real compressor flushed with ``Z_FULL_FLUSH``. Gigabytes of zeros then cost a CRC pass
    instead of a deflate pass; the stream is valid deflate (the segments share no history)."""

    def __init__(self) -> None:
        one = zlib.compressobj(9, zlib.DEFLATED, -15)
        self._zeros = one.compress(_ZEROS) + one.flush(zlib.Z_FULL_FLUSH)
        self._real = zlib.compressobj(9, zlib.DEFLATED, -15)

    def compress(self, data: bytes) -> bytes:
        if data is _ZEROS:
            return self._zeros
        return self._real.compress(data) + self._real.flush(zlib.Z_FULL_FLUSH)

    def flush(self) -> bytes:
        return self._real.flush(zlib.Z_FINISH)


_ZEROS = bytes(_CHUNK)


def _bomb_zip(path: Path, small: dict[str, bytes], big: str, head: bytes, zeros: int) -> None:
    """A zip with ``small`` members plus ``big`` = ``head`` followed by ``zeros`` zero bytes
    (a multiple of the chunk size), deflated; written to a temporary name, then renamed."""
    if zeros % _CHUNK:
        raise ValueError("zeros must be a multiple of the chunk size")
    tmp = path.with_name(path.name + ".part")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in small.items():
            z.writestr(name, data)
        with z.open(big, "w", force_zip64=True) as fh:
            if hasattr(fh, "_compressor"):  # CPython's _ZipWriteFile; else deflate for real
                fh._compressor = _PrecompressedZeros()
            if head:
                fh.write(head)
            for _ in range(zeros // _CHUNK):
                fh.write(_ZEROS)
    tmp.replace(path)


class _FakeStorage:
    def __init__(self, numel: int):
        self.numel = numel


class _TensorRef:
    def __init__(self, storage: _FakeStorage):
        self.storage = storage

    def __reduce__(self) -> tuple[Any, ...]:
        n = self.storage.numel
        rebuild = torch._utils._rebuild_tensor_v2
        return rebuild, (self.storage, 0, (n,), (1,), False, collections.OrderedDict())


class _TorchPickler(pickle.Pickler):
    """Writes data.pkl the way torch.save does: storages as persistent ids."""

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _FakeStorage):
            return ("storage", torch.FloatStorage, "0", "cpu", obj.numel)
        return None


def torch_zip_with_storage(path: Path, numel: int, storage: bytes | None) -> None:
    """A torch zip holding one float tensor of ``numel`` zeros (the storage is ``storage``,
    or ``numel`` zeros streamed compressed when None)."""
    buf = io.BytesIO()
    _TorchPickler(buf, protocol=2).dump({"fc.weight": _TensorRef(_FakeStorage(numel))})
    small = {"archive/data.pkl": buf.getvalue(), "archive/byteorder": b"little",
             "archive/version": b"3\n"}  # fmt: skip
    if storage is not None:
        with zipfile.ZipFile(path, "w") as z:
            for k, v in small.items():
                z.writestr(k, v)
            z.writestr("archive/data/0", storage)
        return
    _bomb_zip(path, small, "archive/data/0", b"", 4 * numel)


@_hostile("bomb_torch_zip_data_pkl", isolate=True)
def bomb_data_pkl(d: Path, m: Path, s: Seeds) -> Case:
    path, done = _cached(s, d, "bomb_data_pkl.pt")
    if not done:
        clean = _torch_bytes({"fc.weight": torch.zeros(4, 4)})
        with zipfile.ZipFile(io.BytesIO(clean)) as z:
            root = z.namelist()[0].split("/")[0] + "/"
            small = {n: z.read(n) for n in z.namelist() if not n.endswith("data.pkl")}
            pkl = z.read(root + "data.pkl")
        # A valid pickle followed by gigabytes of zeros: torch reads the whole record.
        _bomb_zip(path, small, root + "data.pkl", pkl, BOMB_BYTES)
    return Case(path, "torch-zip", f"data.pkl deflated from {BOMB_BYTES:,} bytes")


@_hostile("bomb_torch_zip_storage", isolate=True)
def bomb_storage(d: Path, m: Path, s: Seeds) -> Case:
    path, done = _cached(s, d, "bomb_storage.pt")
    if not done:
        torch_zip_with_storage(path, BOMB_BYTES // 4, None)
    return Case(path, "torch-zip", f"a tensor storage deflated from {BOMB_BYTES:,} bytes")


@_hostile("bomb_npz_data", command="data", isolate=True)
def bomb_npz(d: Path, m: Path, s: Seeds) -> Case:
    path, done = _cached(s, d, "bomb_data.npz")
    if not done:
        head = io.BytesIO()
        shape = (BOMB_BYTES // (4 * 64), 64)
        np.lib.format.write_array_header_1_0(
            head, {"descr": "<f4", "fortran_order": False, "shape": shape}
        )
        _bomb_zip(path, {}, "x.npy", head.getvalue(), BOMB_BYTES)
    return Case(path, "npz", f"--data .npz whose x.npy inflates to {BOMB_BYTES:,} bytes")


@_hostile("bomb_pt2_weight", isolate=True)
def bomb_pt2_weight(d: Path, m: Path, s: Seeds) -> Case:
    path, done = _cached(s, d, "bomb_weight.pt2")
    if not done:
        with zipfile.ZipFile(io.BytesIO(_clean_pt2())) as z:
            root = _pt2_root(z.namelist())
            small = {n: z.read(n) for n in z.namelist() if not n.endswith("/weight_0")}
        _bomb_zip(path, small, root + "data/weights/weight_0", b"", BOMB_BYTES)
    return Case(path, "pt2", f".pt2 weight member deflated from {BOMB_BYTES:,} bytes")
