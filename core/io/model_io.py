"""Open and save every model format the workbench accepts; detection is by content.

Formats (see docs/formats.md):

- ``demo:mlp`` / ``demo:cnn``: built-in digits models (`core.io.zoo`), runnable.
- TorchScript (``torch.jit.save``): a zip holding ``code/`` and ``constants.pkl``; runnable.
- ``torch.export`` programs (``.pt2``, ``torch.export.save``): a zip holding ``archive_format``
  = ``pt2`` and ``models/*.json``; runnable (``ExportedProgram.module()``).
- ``state_dict`` files (``torch.save`` of a dict of tensors, zip or legacy pickle stream,
  including ``{"state_dict": ...}``/``{"model": ...}`` checkpoints) and ``.safetensors``:
  weights-only unless an ``architecture`` (a demo name) is given.
- a pickled ``nn.Module`` (``torch.save(model)``/``pickle.dump``): only with ``trust=True``.

Safety: nothing from a file is unpickled with a general unpickler unless the caller passes
``trust=True``. State dicts are read with ``torch.load(weights_only=True)``. ``.pt2`` archives are
checked before ``torch.export.load`` sees them, because that loader falls back to full
unpickling for some members and evaluates symbolic-shape strings with sympy: members that would
be unpickled must pass a ``weights_only`` load first, opaque/custom objects and compiled
AOTInductor code need trust, and every symbolic expression and guard (``guards_code``, which
``ExportedProgram.module()`` compiles with ``exec``) must be plain arithmetic on input sizes;
the archive must match an allow-list of the members ``torch.export.save`` writes. TorchScript
code is vetted before ``torch.jit.load`` (which runs ``__setstate__``); code that is not
vetted-safe opens weights-only. A packed archive never opens the file it records as its source.
All of these checks live in `core.io.vetting` (threat model: docs/formats.md).

Why one module of this size: it is the single door every file format comes in by (detection by
content, one loader per format, the weights-only module, packed archives with an explicit base,
saving); the vetting and the limits it relies on live in core.io.vetting and core.base.limits.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import io
import mmap
import os
import pickle
import shutil
import struct
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.base.errors import ExportError, ModelLoadError, UntrustedPickleError, WorkbenchError
from core.base.limits import (
    CORRUPT_CONTAINER_ERRORS,
    SafetensorsEntry,
    check_torch_zip,
    corrupt_reason,
    escape_name,
    safetensors_header,
)
from core.base.memory import MappedPages
from core.base.model import LoadedModel
from core.base.progress import CancelToken, ProgressFn, no_progress
from core.io.data import digits_split
from core.io.hf import is_hf_folder, load_hf_folder
from core.io.vetting import (
    TORCH_GLOBAL_ROOTS,
    TRUST_HINT,
    is_plain_pickle,
    pickle_globals,
    read_torchscript_tensors,
    safe_guard,
    safe_sym_expr,
    vet_pt2,
    vet_torchscript,
)
from core.io.zoo import DEMOS, build_demo, demo_info, demo_name, demo_spec, load_demo
from core.packed import FORMAT_ID, read_packed_spilled, restore_into

SUPPORTED = (
    "TorchScript (torch.jit.save), torch.export programs (.pt2), state_dict files "
    "(torch.save of a dict of tensors), .safetensors, or a pickled nn.Module with --trust"
)
#: Checkpoint keys that commonly wrap the real state dict.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "weights", "params")
#: Prefixes left by DataParallel / torch.compile that no architecture expects.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


# --------------------------------------------------------------------------- helpers


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line[:240]


def _check(cancel: CancelToken | None) -> None:
    if cancel is not None:
        cancel.check()


def _looks_truncated(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(
        s in text
        for s in (
            "truncated",
            "ran out of input",
            "eoferror",
            "unexpected eof",
            "failed finding central directory",
            "invalid header or archive is corrupted",
        )
    )


def _zip_names(path: Path) -> list[str] | None:
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return None


def _archive_root(names: list[str], marker: str) -> str | None:
    """The folder prefix (``"archive/"``) under which ``marker`` sits, if present."""
    for n in names:
        if n == marker:
            return ""
        if n.endswith("/" + marker) and n.count("/") == marker.count("/") + 1:
            return n[: -len(marker)]
    return None


def _sniff(path: Path) -> str:
    """Classify a file by its bytes: torchscript | pt2 | torch_zip | zip | safetensors | pickle
    | zip_truncated | onnx | unknown."""
    with path.open("rb") as fh:
        head = fh.read(64)
    names = _zip_names(path)
    if names is not None:
        if _archive_root(names, "archive_format") is not None and any(
            "/models/" in n or n.startswith("models/") for n in names
        ):
            return "pt2"
        if _archive_root(names, "constants.pkl") is not None and any("/code/" in n for n in names):
            return "torchscript"
        if _archive_root(names, "data.pkl") is not None:
            return "torch_zip"
        return "zip"
    if head[:4] == b"PK\x03\x04":
        return "zip_truncated"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 2 <= n:
            return "safetensors"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    if path.suffix.lower() == ".onnx" or (head[:1] == b"\x08" and b"onnx" in head[:64].lower()):
        return "onnx"
    return "unknown"


# --------------------------------------------------------------------------- weights-only


def _listed_in_tree_order(tensors: Mapping[str, torch.Tensor]) -> bool:
    """True when ``tensors`` is already listed in module-tree order and holds no name a tree
    refuses (checkpoints usually are): one pass with the open path as a stack, no tree.

    Tree order: a node's own parameters, then its own buffers (non-float tensors), then its
    children's subtrees, each subtree contiguous.
    """
    closed: set[str] = set()  # prefixes whose subtree has ended
    stack: list[str] = []  # open prefixes, root first ("a", "a.b", ...)
    parts_open: list[str] = []  # their last components
    entered = [False]  # per open node (root first): has a child subtree started?
    buffered = [False]  # per open node: has one of its buffers been listed?
    for name in tensors:
        parts = name.split(".")
        if "" in parts or name in closed:
            return False
        depth = len(parts) - 1
        common = 0
        limit = min(depth, len(parts_open))
        while common < limit and parts[common] == parts_open[common]:
            common += 1
        while len(stack) > common:
            closed.add(stack.pop())
            parts_open.pop()
            entered.pop()
            buffered.pop()
        for i in range(common, depth):
            prefix = f"{stack[-1]}.{parts[i]}" if stack else parts[i]
            if prefix in closed or prefix in tensors:
                return False
            entered[-1] = True
            stack.append(prefix)
            parts_open.append(parts[i])
            entered.append(False)
            buffered.append(False)
        if entered[-1]:  # a tensor after a child subtree of its own node
            return False
        if tensors[name].is_floating_point():
            if buffered[-1]:  # a parameter after a buffer of the same node
                return False
        else:
            buffered[-1] = True
    return True


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while many acyclic objects are made.

    Reading 10**6 tensors allocates millions of objects, none in reference cycles; the
    collector would still walk all of them again and again (~20% of the load time).
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _tree_order(tensors: Mapping[str, torch.Tensor], source: str) -> list[str]:
    """``tensors``' names in the order a module tree built from them would list them.

    Also refuses names a tree cannot hold: an empty path component, or a name that is both a
    tensor and a prefix of another tensor's name.
    """
    if _listed_in_tree_order(tensors):
        return list(tensors)
    # Nested plain dicts: part -> child dict, or part -> full name (a tensor leaf).
    root: dict[str, Any] = {}
    where = source or None
    for name in tensors:
        parts = name.split(".")
        if "" in parts:
            raise ModelLoadError(
                f"tensor name {name!r} has an empty path component",
                path=where,
                hint="rename the checkpoint's keys to dotted module paths",
            )
        node = root
        for i in range(len(parts) - 1):
            child = node.get(parts[i])
            if child is None:
                child = node[parts[i]] = {}
            elif not isinstance(child, dict):
                raise ModelLoadError(
                    f"tensor {'.'.join(parts[: i + 1])!r} is also a prefix of {name!r}",
                    path=where,
                    hint="a checkpoint key cannot be both a tensor and a module path",
                )
            node = child
        if isinstance(node.get(parts[-1]), dict):
            raise ModelLoadError(
                f"tensor {name!r} is also a module path of other tensors",
                path=where,
                hint="a checkpoint key cannot be both a tensor and a module path",
            )
        node[parts[-1]] = name
    order: list[str] = []
    # Iterative DFS (a hostile name can nest deeper than the recursion limit): a node lists
    # its own tensors, then each child subtree in first-appearance order.
    stack: list[dict[str, Any]] = [root]
    while stack:
        node = stack.pop()
        children = []
        buffers = []
        for v in node.values():
            if not isinstance(v, str):
                children.append(v)
            elif tensors[v].is_floating_point():
                order.append(v)
            else:
                buffers.append(v)
        order.extend(buffers)  # a module's state_dict: its parameters, then its buffers
        stack.extend(reversed(children))
    return order


class WeightsOnlyModule(nn.Module):
    """One flat module holding a checkpoint's tensors under their full names; it has weights but
    no forward pass.

    Floating-point tensors become parameters, everything else (``num_batches_tracked``,
    integer tables) buffers, so ``named_parameters()`` yields exactly the checkpoint's float
    tensors under their original names and ``state_dict()`` reproduces the checkpoint. The
    names are keys of this one module's ``_parameters``/``_buffers`` (``"features.0.weight"``),
    not a tree of submodules: a tree costs an ``nn.Module`` (about 2 KB and a few microseconds)
    per name prefix, which dominates checkpoints of 10**5-10**6 tiny tensors. Iteration order
    is still the order such a tree would give (a node's own tensors, then its children's, in
    first-appearance order), so layer order does not depend on this choice. `get_tensor` and
    `set_tensor` resolve names by one dictionary lookup.

    Parameters
    ----------
    tensors
        Checkpoint name -> tensor (``"features.0.weight"``). ``None`` builds an empty module.
    source
        Shown in the error `forward` raises.
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor] | None = None,
        source: str = "",
        *,
        consume: bool = False,
    ):
        super().__init__()
        self._source = source
        tensors = tensors or {}
        params, buffers = self._parameters, self._buffers
        order = _tree_order(tensors, source)
        # consume=True (a dict the caller no longer needs): each entry is dropped once wrapped,
        # so the tensor objects are not held twice while 10**6 parameters are made.
        take = tensors.pop if consume and isinstance(tensors, dict) else tensors.__getitem__
        for name in order:
            t = take(name)
            if t.is_floating_point():
                # nn.Parameter makes its own detached alias of ``t``
                params[name] = nn.Parameter(t, requires_grad=True)
            else:
                buffers[name] = t.detach()
        #: every name in tree order (state_dict order: a tree interleaves parameters and buffers)
        self._order = order

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        """``nn.Module.named_parameters`` without the per-tensor bookkeeping of a tree walk: the
        flat map holds each parameter once under its full name."""
        if not remove_duplicate:
            yield from super().named_parameters(prefix, recurse, remove_duplicate)
            return
        dot = prefix + "." if prefix else ""
        seen: set[int] = set()
        for name, param in self._parameters.items():
            # distinct objects unless a caller stored one parameter under two names
            if param is None or id(param) in seen:
                continue
            seen.add(id(param))
            yield dot + name, param

    def named_buffers(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """``nn.Module.named_buffers`` over the flat map (see `named_parameters`)."""
        if not remove_duplicate:
            yield from super().named_buffers(prefix, recurse, remove_duplicate)
            return
        dot = prefix + "." if prefix else ""
        seen: set[int] = set()
        for name, buf in self._buffers.items():
            if buf is None or id(buf) in seen:
                continue
            seen.add(id(buf))
            yield dot + name, buf

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        params, buffers = self._parameters, self._buffers
        if len(self._order) != len(params) + len(buffers):
            # Tensors added or removed behind the constructor's back: the plain order.
            super()._save_to_state_dict(destination, prefix, keep_vars)
            return
        for name in self._order:
            t = params.get(name)
            if t is None:
                t = buffers.get(name)
            if t is not None:
                destination[prefix + name] = t if keep_vars else t.detach()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise ModelLoadError(
            "this model was opened from a weights-only file and has no forward pass",
            path=self._source or None,
            hint=(
                "histograms, compression and export work without one; to run it, open a "
                "TorchScript or .pt2 file, or give an architecture (e.g. demo:mlp)"
            ),
        )

    def extra_repr(self) -> str:
        return "weights only" if self._source == "" else f"weights only from {self._source}"


# --------------------------------------------------------------------------- state dicts


def _tensor_mapping(obj: Any) -> dict[str, torch.Tensor] | None:
    """The flat name -> tensor mapping inside a loaded checkpoint, or ``None``."""
    if not isinstance(obj, Mapping):
        return None
    if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return dict(obj)
    for key in STATE_DICT_KEYS:
        inner = obj.get(key)
        found = _tensor_mapping(inner) if isinstance(inner, Mapping) else None
        if found:
            return found
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            flat[prefix] = value
        elif isinstance(value, Mapping):
            for k, v in value.items():
                if isinstance(k, str):
                    walk(f"{prefix}.{k}" if prefix else k, v)

    walk("", obj)
    return flat or None


def _strip_wrapper_prefix(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    for prefix in WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix) :]: v for k, v in state.items()}, prefix
    return state, ""


def _torch_load_weights_only(path: Path, *, trust: bool, kind: str, sniffed: str) -> Any:
    """``torch.load(weights_only=True)``; a file with pickled objects needs ``trust``."""
    if sniffed == "torch_zip":
        # torch inflates every member to its declared size: refuse zip bombs before it does.
        check_torch_zip(path, what=f"the {kind}")
    try:
        with warnings.catch_warnings(), path.open("rb") as fh:
            # torch warns about unusual pickle protocols; the outcome is reported below instead.
            warnings.simplefilter("ignore")
            # A file object, not the path: torch.load dispatches on a ".safetensors" suffix.
            return torch.load(fh, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many unrelated types for corrupt or unsafe files
        if _looks_truncated(exc):
            raise ModelLoadError(
                f"the {kind} is truncated or corrupt ({_first_line(exc)})",
                path=path,
                hint="copy or download the file again",
            ) from None
        refused = "Weights only load failed" in str(exc)
        names = pickle_globals(path, sniffed) if refused else None
        if not names:
            reason = "it is not a valid pickle stream" if refused else _first_line(exc)
            raise ModelLoadError(
                f"the {kind} cannot be read ({reason})",
                path=path,
                hint=f"the workbench opens {SUPPORTED}",
            ) from None
        if not trust:
            foreign = [n for n in names if not n.startswith(TORCH_GLOBAL_ROOTS)]
            shown = ", ".join(dict.fromkeys(foreign or names))
            raise UntrustedPickleError(
                f"the {kind} holds pickled Python objects (it references {shown[:160]}), "
                "which are never unpickled without trust",
                path=path,
                hint=TRUST_HINT,
            ) from None
    return _trusted_load(path, kind)


def _trusted_load(path: Path, kind: str) -> Any:
    try:
        if is_plain_pickle(path):
            # pickle.dump output: torch.load would unpickle it once just to read a magic number.
            with path.open("rb") as fh:
                return pickle.load(fh)
        with path.open("rb") as fh:
            return torch.load(fh, map_location="cpu", weights_only=False)
    except Exception as exc:  # a trusted pickle can fail in any way (missing classes...)
        raise ModelLoadError(
            f"the trusted {kind} could not be unpickled ({_first_line(exc)})",
            path=path,
            hint="the classes it references must be importable here (same code as when saved)",
        ) from None


# --------------------------------------------------------------------------- .pt2 safety

# The checks live in core.io.vetting; these names stay importable from here.
_safe_guard = safe_guard
_safe_sym_expr = safe_sym_expr


def _pt2_example(ep: Any) -> tuple[tuple[Any, ...] | None, dict[str, Any]]:
    """Example positional args for a program: its saved ``example_inputs`` or, failing that,
    tensors built from the input placeholders' shapes."""
    saved = getattr(ep, "example_inputs", None)
    if saved:
        args, kwargs = saved
        if all(isinstance(a, torch.Tensor) for a in args):
            return tuple(a.detach().clone() for a in args), dict(kwargs or {})
    user_inputs = list(ep.graph_signature.user_inputs)
    built: list[torch.Tensor] = []
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in user_inputs:
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            return None, {}
        shape = []
        for d in val.shape:
            try:
                shape.append(int(d))
            except (TypeError, ValueError):
                # A dynamic dimension: use its hint when the shape env has one, else 2.
                hint = getattr(getattr(d, "node", None), "hint", None)
                shape.append(int(hint) if hint is not None else 2)
        g = torch.Generator().manual_seed(0)
        if val.dtype.is_floating_point:
            built.append(torch.randn(shape, generator=g).to(val.dtype))
        elif val.dtype == torch.bool:
            built.append(torch.zeros(shape, dtype=torch.bool))
        else:
            built.append(torch.zeros(shape, dtype=val.dtype))
    return (tuple(built) if built else None), {}


# --------------------------------------------------------------------------- loaders


@contextlib.contextmanager
def _vetting_copy(path: Path, trust: bool) -> Iterator[Path]:
    """The file to vet and then load: a private copy unless the user trusts the file.

    Vetting reads the archive, then torch reads it again to load it; on the user's path a
    file swapped in between (by anyone who can write there) would be loaded unvetted. The
    copy lives in a fresh 0700 temporary folder only this process writes to, and errors
    raised while vetting name the user's file, not the copy.
    """
    if trust:
        yield path
        return
    folder = tempfile.mkdtemp(prefix="workbench-vet-")
    copy = Path(folder) / (path.name or "model")
    try:
        shutil.copyfile(path, copy)
        try:
            yield copy
        except WorkbenchError as exc:
            exc.args = tuple(
                a.replace(str(copy), str(path)) if isinstance(a, str) else a for a in exc.args
            )
            if exc.path is not None:
                exc.path = exc.path.replace(str(copy), str(path))
            raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _load_torchscript(path: Path, trust: bool) -> tuple[nn.Module, str | None]:
    """(module, why it opened weights-only or None). Without trust the archive's code is vetted
    first (`core.io.vetting.vet_torchscript`): code that is not vetted-safe never reaches
    ``torch.jit.load``; its tensors are read with a tensor-only unpickler instead."""
    with _vetting_copy(path, trust) as src:
        return _load_torchscript_from(src, path, trust)


def _load_torchscript_from(src: Path, path: Path, trust: bool) -> tuple[nn.Module, str | None]:
    if not trust:
        try:
            problem = vet_torchscript(src)
        except (zipfile.BadZipFile, OSError) as exc:
            raise ModelLoadError(
                f"the TorchScript archive cannot be read ({_first_line(exc)})",
                path=path,
                hint="copy or download the file again",
            ) from None
        if problem is not None:
            tensors = read_torchscript_tensors(src)
            reason = f"opened weights-only: this TorchScript file {problem}"
            return WeightsOnlyModule(tensors, source=str(path)), reason
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation notices would break one-line CLI errors
            module = torch.jit.load(str(src), map_location="cpu")
    except Exception as exc:  # torch.jit raises RuntimeError subclasses with long messages
        raise ModelLoadError(
            f"the TorchScript archive cannot be loaded ({_first_line(exc)})",
            path=path,
            hint="save it again with torch.jit.save(torch.jit.script(model), path)",
        ) from None
    return module.eval(), None


def _load_pt2(path: Path, names: list[str], trust: bool) -> tuple[nn.Module, dict[str, Any]]:
    with _vetting_copy(path, trust) as src:
        if not trust:
            vet_pt2(src)
        return _load_pt2_from(src, path)


def _load_pt2_from(src: Path, path: Path) -> tuple[nn.Module, dict[str, Any]]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.load(str(src))
            module = ep.module()
    except Exception as exc:  # the deserializer raises many types on version/format mismatch
        raise ModelLoadError(
            f"the torch.export program cannot be loaded ({_first_line(exc)})",
            path=path,
            hint=(
                "it may have been saved by another torch version; this workbench runs torch "
                f"{torch.__version__.split('+')[0]}: save it again with torch.export.save()"
            ),
        ) from None
    args, kwargs = _pt2_example(ep)
    meta: dict[str, Any] = {"exported_program": ep, "example_args": args, "example_kwargs": kwargs}
    batch = _static_batch(ep)
    if batch is not None:
        meta["fixed_batch"] = batch
    return module, meta


def _static_batch(ep: Any) -> int | None:
    """The first input's batch size when the program was exported with a static one."""
    user_inputs = list(ep.graph_signature.user_inputs)
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and val.ndim >= 1 and isinstance(val.shape[0], int):
                return int(val.shape[0])
            return None
    return None


#: safetensors dtypes a model file may use; float8 ones are widened to float32 for analysis.
SAFETENSORS_OPEN = (
    "F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2",
)  # fmt: skip
_FLOAT8 = ("F8_E4M3", "F8_E5M2")


def _load_safetensors(
    path: Path,
) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, str]]:
    """(tensors, ``__metadata__``, float8 tensor name -> its dtype) of a safetensors file.

    The header is checked first (`core.base.limits.safetensors_header`: sizes, dtypes, offsets), so
    nothing the file merely declares is allocated. float8 weights become float32: histograms,
    pruning and quantization all compute in float32 anyway, and the values are exact.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    entries, header_meta = safetensors_header(path, supported=SAFETENSORS_OPEN)
    widened = {n: e["dtype"] for n, e in entries.items() if e["dtype"] in _FLOAT8}
    try:
        if sys.byteorder == "little":
            # The header is parsed and checked already: slice the tensors out of one mapping
            # of the file instead of letting the library parse it again (several times faster
            # for 10**5-10**6 small tensors).
            tensors = _read_safetensors_data(path, entries)
        else:  # pragma: no cover - safetensors data is little-endian; the library swaps
            tensors = load_file(str(path), device="cpu")
        for name in widened:
            tensors[name] = tensors[name].to(torch.float32)
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        reason = _first_line(exc)
        what = (
            "truncated or corrupt"
            if "incomplete" in reason.lower()
            or "cover" in reason.lower()
            or "header" in reason.lower()
            else "unreadable"
        )
        raise ModelLoadError(
            f"the safetensors file is {what} ({reason})",
            path=path,
            hint="copy or download the file again",
        ) from None
    return tensors, header_meta, widened


#: safetensors dtype -> torch dtype (`SAFETENSORS_OPEN`).
_ST_TORCH = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


_ST_ITEMSIZE = {dtype: torch.empty(0, dtype=dtype).element_size() for dtype in _ST_TORCH.values()}
#: Tensors of at least this many bytes are kept as views of the file's mapping (not copied).
_MAPPED_MIN_BYTES = 1 << 20


def _read_safetensors_data(
    path: Path, entries: dict[str, SafetensorsEntry]
) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file whose header `safetensors_header` checked.

    Each tensor is a copy of exactly the bytes its ``data_offsets`` span (own storage, no
    alignment needed: the bytes are copied before they are reinterpreted), in file-offset
    order like ``safetensors.torch.load_file``. ``entries`` is emptied as the tensors are made.
    Tensors of `_MAPPED_MIN_BYTES` or more whose data is aligned are instead views of a private
    copy-on-write mapping of the file (writes never reach the file; 100M-1B weight models are
    read layer by layer as they are used instead of copied whole up front).
    """
    order = sorted(entries, key=lambda name: entries[name][2:])  # (start, end)
    with path.open("rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        base = 8 + n
        size = os.fstat(fh.fileno()).st_size
        tensors: dict[str, torch.Tensor] = {}
        if size <= base:  # no data section: every tensor is empty
            for name in order:
                dtype, shape, _, _ = entries[name]
                tensors[name] = torch.empty(shape, dtype=_ST_TORCH[dtype])
            return tensors
        # Copy-on-write mapping: writable for torch (a write to a large tensor viewing it
        # stays private to this process), and never more memory than the pages actually read.
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    kept = False
    try:
        empty, frombuffer = torch.empty, torch.frombuffer
        for name in order:
            # freed as its tensor is made: not both held at 10**6 tensors
            st_dtype, shape, start, end = entries.pop(name)
            dtype = _ST_TORCH[st_dtype]
            if end == start:
                tensors[name] = empty(shape, dtype=dtype)
                continue
            # A view of the mapped bytes, copied into the tensor's own storage: the fewest
            # temporary tensor objects (10**6 tensors). The copy reads unaligned data fine.
            raw = frombuffer(
                mapped, dtype=dtype, count=(end - start) // _ST_ITEMSIZE[dtype], offset=base + start
            )
            if len(shape) != 1:
                raw = raw.reshape(shape)
            if end - start >= _MAPPED_MIN_BYTES and (base + start) % _ST_ITEMSIZE[dtype] == 0:
                # Large tensors stay views of the (private, copy-on-write) mapping: pages are
                # read when a layer is used, and the load holds no second copy of the weights.
                tensors[name] = raw
                kept = True
            else:
                tensors[name] = raw.clone()
        raw = None  # the mapping cannot close while a tensor still points into it
    finally:
        if not kept:
            mapped.close()  # else it closes with the last tensor viewing it
    return tensors


def _is_packed_archive(path: Path) -> bool:
    """True for a `core.packed` archive (``model.packed.safetensors`` of `workbench compress`)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as fh:
            return (fh.metadata() or {}).get("format") == FORMAT_ID
    except (SafetensorError, OSError, ValueError):
        return False


# --------------------------------------------------------------------------- packed archives


def resolve_base(archive: Any, base: LoadedModel | str | Path | None, trust: bool) -> LoadedModel:
    """A fresh copy of the architecture to restore into (``base`` is never modified)."""
    if isinstance(base, LoadedModel):
        return clone_model(base)
    if base is None:
        source = archive.metadata.get("source", "")
        if not source.startswith("demo:"):
            # A file named inside the archive is never opened unasked: whoever wrote the archive
            # chose that path. Built-in demos are no file, so they are safe to follow.
            recorded = f"records its original model as {source!r}" if source else "names no model"
            raise ModelLoadError(
                f"the archive {recorded}; a model file is only opened when you name it",
                path=archive.path,
                hint="pass --base MODEL: the model file that was compressed (it gives the architecture)",
            )
        base = source
    loaded = load_model(base, trust=trust)
    architecture = archive.metadata.get("architecture")
    if loaded.weights_only and architecture:
        # A weights-only original was compressed with a demo architecture: rebuild it runnable.
        loaded = load_model(base, trust=trust, architecture=architecture)
    return loaded


def load_packed(
    path: str | Path, base: LoadedModel | str | Path | None = None, *, trust: bool = False
) -> LoadedModel:
    """Restore a runnable model from a packed archive.

    Parameters
    ----------
    path
        The ``model.packed.safetensors`` file.
    base
        Where the architecture comes from: the original model's path / demo name, or an opened
        `LoadedModel` (copied, never modified). Default: the source recorded in the archive.
    trust
        Allow unpickling when ``base`` is a pickled eager model.

    Returns
    -------
    LoadedModel
        The base's architecture with every parameter and buffer replaced by the archive's; the
        weights equal the compressed model's dequantized weights exactly.
    """
    archive = read_packed_spilled(path)
    return restore_into(archive, resolve_base(archive, base, trust))


def _open_packed(path: Path, *, trust: bool, base: Any = None) -> LoadedModel:
    """A packed archive opened as the compressed model it holds.

    The archive stores codes and masks, not an architecture. A forward pass needs the original
    model, which is only opened when the caller names it (``base``: a path, demo name or
    `LoadedModel`, opened with the same ``trust``) or when the archive records a built-in demo.
    A file path recorded in the archive is never followed: the dequantized weights open
    weights-only with a note saying how to get a runnable model.
    """
    archive = read_packed_spilled(path)
    meta: dict[str, Any] = {"detected": "packed", "packed": str(path)}
    source = archive.metadata.get("source", "")
    if base is not None or source.startswith("demo:"):
        restored = restore_into(archive, resolve_base(archive, base, trust))
        meta = {**restored.metadata, **meta, "packed_source": source}
        return dataclasses.replace(restored, source=str(path), name=path.stem, metadata=meta)
    meta["packed_source"] = source
    recorded = f" (recorded as {source})" if source else ""
    meta["opened_weights_only_reason"] = (
        "opened weights-only: a packed archive holds no architecture and the original model it "
        f"names{recorded} is never opened unasked; pass --base ORIGINAL (load_model(..., "
        "base=ORIGINAL)) for a runnable model"
    )
    module = WeightsOnlyModule(dict(archive.tensors), source=str(path))
    return LoadedModel(
        module, "safetensors", str(path), path.stem, weights_only=True, metadata=meta
    )


def _with_architecture(
    state: dict[str, torch.Tensor], architecture: str, path: Path
) -> tuple[nn.Module, str]:
    spec = demo_spec(architecture)
    module = build_demo(spec.name)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
        if unexpected:
            parts.append(
                f"unexpected {', '.join(unexpected[:6])}{' ...' if len(unexpected) > 6 else ''}"
            )
        if wrong:
            parts.append(f"shape mismatch {'; '.join(wrong[:4])}")
        raise ModelLoadError(
            f"the checkpoint does not fit architecture demo:{spec.name}: {'; '.join(parts)}",
            path=path,
            hint="give the architecture the weights were trained with, or open it weights-only",
        )
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    return module.eval(), spec.name


#: Dtypes numpy checks for NaN/Inf itself (`note_nonfinite`).
_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)
#: Tensors below this many elements are checked for NaN/Inf in batches of `_BATCH_TENSORS`.
_BATCH_NUMEL = 4096
_BATCH_TENSORS = 4096
#: Large tensors are checked in chunks of this many elements.
_CHUNK_NUMEL = 1 << 22


def note_nonfinite(loaded: LoadedModel) -> dict[str, int]:
    """Record every floating parameter holding NaN/Inf values in ``loaded.metadata``.

    Compression treats such values as 0 (pruning drops them, quantization codes them as zero),
    which silently inflates a layer's sparsity; the counts go to ``metadata["nonfinite"]``
    (tensor -> count) and one line per tensor to ``metadata["notes"]``, which the command line
    prints as warnings.

    Returns
    -------
    dict
        ``metadata["nonfinite"]`` (empty when every value is finite).
    """
    counts: dict[str, int] = {}
    # Small tensors are checked together: one isfinite per tiny tensor is all call overhead
    # for checkpoints with 100k of them.
    # Grouped by dtype, so the concatenation converts nothing; the per-tensor work stays a
    # few attribute reads (10**6 tiny tensors).
    small: dict[torch.dtype, list[tuple[str, torch.Tensor]]] = {}
    small_counts: dict[str, int] = {}
    pages = MappedPages()  # a mapped checkpoint's pages go back after each large tensor
    with torch.no_grad():
        for pname, param in loaded.module.named_parameters():
            if not param.is_floating_point():
                continue
            numel = param.numel()
            if not numel:
                continue
            if numel < _BATCH_NUMEL:
                small.setdefault(param.dtype, []).append((pname, param))
                continue
            # In chunks, counted with count_nonzero: ``isfinite(p).sum()`` makes a bool and an
            # int64 temporary of the whole tensor (9x its float32 bytes for an Embedding).
            flat = param.detach().reshape(-1)
            bad = numel - sum(
                int(torch.count_nonzero(torch.isfinite(flat[s : s + _CHUNK_NUMEL])))
                for s in range(0, numel, _CHUNK_NUMEL)
            )
            pages.release(flat)
            if bad:
                counts[pname] = bad
        for tensors in small.values():
            for start in range(0, len(tensors), _BATCH_TENSORS):
                group = tensors[start : start + _BATCH_TENSORS]
                flat = torch.cat([t.reshape(-1) for _, t in group])
                if flat.dtype in _NUMPY_FLOATS:
                    # numpy, single-threaded: torch's OpenMP workers make each such small
                    # call cost milliseconds on a busy machine (10**6 tensors: 245 calls).
                    if bool(np.isfinite(flat.numpy()).all()):
                        continue
                bad_mask = ~torch.isfinite(flat)
                if not bool(bad_mask.any()):
                    continue
                for (pname, _), n in zip(
                    group, bad_mask.split([t.numel() for _, t in group]), strict=True
                ):
                    bad = int(n.sum())
                    if bad:
                        small_counts[pname] = bad
        if len(small) > 1 and small_counts:
            # Small tensors in parameter order, as if checked in one list.
            rank = {pname: i for i, (pname, _) in enumerate(loaded.module.named_parameters())}
            small_counts = dict(sorted(small_counts.items(), key=lambda kv: rank[kv[0]]))
        counts.update(small_counts)
    if counts:
        loaded.metadata["nonfinite"] = counts
        notes = loaded.metadata.setdefault("notes", [])
        for pname, bad in counts.items():
            notes.append(
                f"{escape_name(pname)} has {bad:,} NaN/Inf weight{'s' if bad > 1 else ''}; "
                "compression treats them as 0 (pruned or quantized to zero), which counts "
                "towards the layer's sparsity"
            )
    return counts


def _demo(name: str) -> LoadedModel:
    spec = demo_spec(name)
    module = load_demo(spec.name)
    _, test = digits_split(spec.input_kind)
    return LoadedModel(
        module=module,
        format="demo",
        source=f"demo:{spec.name}",
        name=f"demo:{spec.name}",
        example_input=test.x[:8].clone(),
        weights_only=False,
        task="classification",
        num_classes=spec.num_classes,
        metadata={"demo": spec.name, "input_kind": spec.input_kind, "info": demo_info(spec.name)},
    )


def load_model(
    source: str | Path,
    *,
    trust: bool = False,
    architecture: str | None = None,
    base: Any = None,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
) -> LoadedModel:
    """Open a model file or a built-in demo (see `_load_model` for the parameters).

    Any damage a container reader trips over (bad CRC, broken deflate stream, undecodable
    member, short read) becomes a `ModelLoadError` naming the file: a hostile or damaged file
    is an expected input, never a traceback.
    """
    try:
        return _load_model(
            source,
            trust=trust,
            architecture=architecture,
            base=base,
            progress=progress,
            cancel=cancel,
        )
    except CORRUPT_CONTAINER_ERRORS as exc:
        raise ModelLoadError(
            f"the file is damaged or not a valid model container ({corrupt_reason(exc)})",
            path=str(source),
            hint="copy or save the model again; the workbench opens " + SUPPORTED,
        ) from None


def _open_demo(
    demo: str, source: str | Path, *, architecture: str | None, base: Any, progress: ProgressFn
) -> LoadedModel:
    """A built-in demo (neither a base model nor an architecture applies)."""
    if base is not None:
        raise ModelLoadError(
            "a base model only applies to packed archives",
            path=str(source),
            hint="drop the base option",
        )
    if architecture is not None:
        raise ModelLoadError(
            "an architecture only applies to weights-only files",
            path=str(source),
            hint="drop the architecture option for built-in demos",
        )
    loaded = _demo(demo)
    progress(1.0, f"opened {loaded.name}")
    return loaded


def _open_folder(
    path: Path,
    *,
    trust: bool,
    architecture: str | None,
    base: Any,
    progress: ProgressFn,
    cancel: CancelToken | None,
) -> LoadedModel:
    """A directory: a Hugging Face folder opens (it brings its own architecture), any other
    directory is refused."""
    if not is_hf_folder(path):
        raise ModelLoadError(
            "is a directory, not a model file (no config.json: not a Hugging Face folder)",
            path=path,
            hint=f"pick the model file itself: {SUPPORTED}",
        )
    if architecture is not None or base is not None:
        raise ModelLoadError(
            "a Hugging Face folder brings its own architecture (config.json)",
            path=path,
            hint="drop the architecture/base option",
        )
    loaded = load_hf_folder(path, trust=trust, progress=progress, cancel=cancel)
    note_nonfinite(loaded)
    return loaded


def _sniff_file(path: Path) -> str:
    """The content class of a non-empty, readable file (see `_sniff`)."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ModelLoadError(
            f"cannot be read ({exc.strerror})", path=path, hint="check permissions"
        ) from None
    if size == 0:
        raise ModelLoadError(
            "the file is empty (0 bytes)", path=path, hint="copy or save the model again"
        )
    try:
        return _sniff(path)
    except OSError as exc:
        raise ModelLoadError(
            f"cannot be read ({exc.strerror})", path=path, hint="check permissions"
        ) from None


def _load_model(
    source: str | Path,
    *,
    trust: bool = False,
    architecture: str | None = None,
    base: Any = None,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
) -> LoadedModel:
    """Open a model file or a built-in demo; the format is detected from the file's content.

    Parameters
    ----------
    source
        A path, or ``"demo:mlp"`` / ``"demo:cnn"``.
    trust
        Allow unpickling arbitrary Python objects (a pickled ``nn.Module``, pickled members of a
        ``.pt2``). Unpickling runs code from the file: only for files the user trusts.
    architecture
        ``"demo:mlp"``/``"demo:cnn"``: load a ``state_dict``/safetensors file into that
        architecture (strict key and shape check) so it has a forward pass.
    base
        Packed archives only: the original model (path, demo name or `LoadedModel`) that gives
        the architecture; it is opened with the same ``trust``. Without it a packed archive
        opens weights-only unless it records a built-in demo: a file path recorded in the
        archive is never opened.

    Returns
    -------
    LoadedModel
        ``metadata`` may hold ``demo``, ``input_kind``, ``info`` (demos); ``exported_program``,
        ``example_args``, ``example_kwargs``, ``fixed_batch`` (``.pt2`` with a static batch size: use
        `forward` to run other batch sizes); ``checkpoint_keys`` (other entries of a
        checkpoint dict), ``stripped_prefix``, ``safetensors_metadata``, ``architecture``;
        ``detected`` (the content class) and ``extension_mismatch`` (bool);
        ``opened_weights_only_reason`` (why a TorchScript file or packed archive opened
        weights-only); ``notes`` (lines to show the user as warnings), ``nonfinite`` (tensor ->
        NaN/Inf count, see `note_nonfinite`), ``float8_converted`` (safetensors float8
        tensors widened to float32).

    Raises
    ------
    ModelLoadError
        Missing, empty, truncated, corrupt or unsupported files, architecture mismatches.
    UntrustedPickleError
        The file needs general unpickling and ``trust`` is False. Nothing was executed.
    """
    _check(cancel)
    progress(0.0, f"opening {source}")
    demo = demo_name(source)
    if demo is not None:
        return _open_demo(demo, source, architecture=architecture, base=base, progress=progress)

    path = Path(source).expanduser()
    if not path.exists():
        raise ModelLoadError("no such file", path=path, hint="check the path to the model file")
    if path.is_dir():
        return _open_folder(
            path,
            trust=trust,
            architecture=architecture,
            base=base,
            progress=progress,
            cancel=cancel,
        )
    kind = _sniff_file(path)
    _check(cancel)
    progress(0.1, f"reading {kind.replace('_', ' ')}")

    meta: dict[str, Any] = {
        "detected": kind,
        "extension_mismatch": path.suffix.lower()
        not in _EXPECTED_EXT.get(kind, {path.suffix.lower()}),
    }
    packed = kind == "safetensors" and _is_packed_archive(path)
    _refuse_kind(path, kind, architecture=architecture, base=base, packed=packed)
    if kind == "torchscript":
        loaded = _open_torchscript(path, meta, trust)
    elif kind == "pt2":
        loaded = _open_pt2(path, meta, trust)
    elif packed:
        loaded = _open_packed(path, trust=trust, base=base)
    else:
        loaded = _open_weights(
            path, kind, meta, trust=trust, architecture=architecture, cancel=cancel
        )
    note_nonfinite(loaded)
    progress(1.0, f"opened {loaded.name}")
    return loaded


#: File extensions expected for each detected content class (a mismatch is only noted).
_EXPECTED_EXT = {
    "torchscript": {".pt", ".pth", ".ts", ".torchscript", ".jit", ".ptl", ".zip"},
    "pt2": {".pt2", ".pt", ".zip"},
    "torch_zip": {".pt", ".pth", ".bin", ".ckpt", ".tar", ".zip"},
    "pickle": {".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".tar"},
    "safetensors": {".safetensors", ".st"},
}


def _refuse_kind(
    path: Path, kind: str, *, architecture: str | None, base: Any, packed: bool
) -> None:
    """One-line errors for content the workbench does not open, or options that do not apply."""
    refused = {
        "zip_truncated": (
            "the zip archive is truncated or corrupt (no central directory)",
            "copy or download the file again",
        ),
        "onnx": ("ONNX models cannot be opened", f"open the PyTorch model instead: {SUPPORTED}"),
        "zip": (
            "a zip archive that is neither a TorchScript, torch.export nor torch.save file",
            f"the workbench opens {SUPPORTED}",
        ),
        "unknown": (
            "not a recognised model file (unknown content)",
            f"the workbench opens {SUPPORTED}",
        ),
    }
    if kind in refused:
        reason, hint = refused[kind]
        raise ModelLoadError(reason, path=path, hint=hint)
    if architecture is not None and kind in ("torchscript", "pt2"):
        raise ModelLoadError(
            "an architecture only applies to weights-only files; this file has its own",
            path=path,
            hint="drop the architecture option",
        )
    if base is not None and not packed:
        raise ModelLoadError(
            "a base model only applies to packed archives (model.packed.safetensors)",
            path=path,
            hint="drop the base option",
        )
    if kind in ("torchscript", "pt2"):
        # torch.jit and torch.export inflate members to their declared sizes: no zip bombs.
        check_torch_zip(
            path, what="the TorchScript archive" if kind == "torchscript" else "the .pt2 archive"
        )


def _open_torchscript(path: Path, meta: dict[str, Any], trust: bool) -> LoadedModel:
    module, why = _load_torchscript(path, trust)
    if why is not None:
        meta["opened_weights_only_reason"] = why
    return LoadedModel(
        module, "torchscript", str(path), path.stem, weights_only=why is not None, metadata=meta
    )


def _open_pt2(path: Path, meta: dict[str, Any], trust: bool) -> LoadedModel:
    module, extra = _load_pt2(path, _zip_names(path) or [], trust)
    meta.update(extra)
    args = extra.get("example_args")
    example = args[0] if args and len(args) == 1 and isinstance(args[0], torch.Tensor) else None
    return LoadedModel(module, "pt2", str(path), path.stem, example_input=example, metadata=meta)


def _read_state(
    path: Path, kind: str, meta: dict[str, Any], *, trust: bool, cancel: CancelToken | None
) -> tuple[dict[str, torch.Tensor] | nn.Module, str]:
    """(name -> tensor state, format) of a safetensors/torch file, or (module, "module") when a
    trusted file holds a whole module."""
    if kind == "safetensors":
        with _gc_paused():
            state, header_meta, widened = _load_safetensors(path)
        meta["safetensors_metadata"] = header_meta
        if widened:
            meta["float8_converted"] = widened
            meta.setdefault("notes", []).append(
                f"{len(widened)} float8 tensor{'s' if len(widened) > 1 else ''} "
                f"({escape_name(next(iter(widened)))}"
                f"{', ...' if len(widened) > 1 else ''}) converted to float32 for analysis"
            )
        return state, "safetensors"
    obj = _torch_load_weights_only(
        path,
        trust=trust,
        kind="torch zip file" if kind == "torch_zip" else "pickle file",
        sniffed=kind,
    )
    _check(cancel)
    if isinstance(obj, nn.Module):
        return obj, "module"
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), nn.Module):
        return obj["model"], "module"
    found = _tensor_mapping(obj)
    if not found:
        raise ModelLoadError(
            f"the file holds a {type(obj).__name__} without any tensors",
            path=path,
            hint="save model.state_dict() or the model itself",
        )
    if isinstance(obj, Mapping) and found is not obj:
        meta["checkpoint_keys"] = sorted(
            str(k) for k in obj if not isinstance(obj[k], torch.Tensor)
        )
    return found, "state_dict"


def _open_weights(
    path: Path,
    kind: str,
    meta: dict[str, Any],
    *,
    trust: bool,
    architecture: str | None,
    cancel: CancelToken | None,
) -> LoadedModel:
    """A state dict / safetensors / (trusted) pickled-module file."""
    state, fmt = _read_state(path, kind, meta, trust=trust, cancel=cancel)
    name = path.stem
    if isinstance(state, nn.Module):
        if architecture is not None:
            raise ModelLoadError(
                "an architecture only applies to weights-only files; this file holds a whole "
                "module",
                path=path,
                hint="drop the architecture option",
            )
        fmt = "torchscript" if isinstance(state, torch.jit.ScriptModule) else "eager"
        return LoadedModel(state.eval(), fmt, str(path), name, metadata=meta)
    state, prefix = _strip_wrapper_prefix(state)
    if prefix:
        meta["stripped_prefix"] = prefix
    _check(cancel)
    if architecture is None:
        with _gc_paused():
            module = WeightsOnlyModule(state, source=str(path), consume=True)
        return LoadedModel(module, fmt, str(path), name, weights_only=True, metadata=meta)
    module, arch = _with_architecture(state, architecture, path)
    spec = DEMOS[arch]
    _, test = digits_split(spec.input_kind)
    meta.update({"architecture": f"demo:{arch}", "input_kind": spec.input_kind})
    return LoadedModel(
        module,
        fmt,
        str(path),
        name,
        example_input=test.x[:8].clone(),
        weights_only=False,
        task="classification",
        num_classes=spec.num_classes,
        metadata=meta,
    )


# --------------------------------------------------------------------------- running


# --------------------------------------------------------------------------- copies and tensors


def copy_module(module: nn.Module) -> nn.Module:
    """``copy.deepcopy`` of an eager module or ``GraphModule`` without torch's internal warnings.

    Deep-copying a ``torch.export`` ``GraphModule`` makes torch warn about its own deprecated
    pytree internals (``FutureWarning: isinstance(treespec, LeafSpec)``); that is noise for the
    user, who did nothing wrong.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return copy.deepcopy(module)


def clone_model(loaded: LoadedModel) -> LoadedModel:
    """A deep copy whose module shares no storage with the original (works for every format)."""
    module = loaded.module
    if isinstance(module, torch.jit.ScriptModule):
        buf = io.BytesIO()
        torch.jit.save(module, buf)
        buf.seek(0)
        new_module = torch.jit.load(buf, map_location="cpu")
        if not module.training:
            new_module.eval()
    elif type(module) is WeightsOnlyModule:
        # Cloning the flat tensor maps is several times faster than deepcopy when a checkpoint
        # holds 10**5 tensors.
        new_module = _clone_weights_only(module)
    else:
        new_module = copy_module(module)
    example = loaded.example_input.clone() if loaded.example_input is not None else None
    meta = dict(loaded.metadata)
    for key in ("example_args",):
        if meta.get(key) is not None:
            meta[key] = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in meta[key])
    return dataclasses.replace(loaded, module=new_module, example_input=example, metadata=meta)


def _clone_weights_only(module: WeightsOnlyModule) -> WeightsOnlyModule:
    """A copy of ``module`` sharing no storage (same names, order, dtypes, requires_grad)."""
    new = WeightsOnlyModule(source=module._source)
    with torch.no_grad():
        new._parameters.update(
            (k, nn.Parameter(v.detach().clone(), requires_grad=v.requires_grad))
            for k, v in module._parameters.items()
        )
        new._buffers.update((k, v.detach().clone()) for k, v in module._buffers.items())
    new._order = list(module._order)
    new.train(module.training)
    return new


def _resolve(module: nn.Module, name: str) -> tuple[Any, str, torch.Tensor]:
    """(owner module, leaf attribute, tensor) for a dotted parameter/buffer name."""
    if type(module) is WeightsOnlyModule:
        # Flat: the full name is the key (one lookup, also for names like "half.weight").
        flat = module._parameters.get(name)
        if flat is None:
            flat = module._buffers.get(name)
        if flat is None:
            raise KeyError(f"the model has no parameter or buffer named {name!r}")
        return module, name, flat
    *path, leaf = name.split(".")
    owner: Any = module
    try:
        for part in path:
            owner = getattr(owner, part)
        tensor = getattr(owner, leaf)
    except AttributeError:
        tensor = None
    if not isinstance(tensor, torch.Tensor):
        named = dict(module.named_parameters())
        named.update(dict(module.named_buffers()))
        if name not in named:
            raise KeyError(f"the model has no parameter or buffer named {name!r}")
        return None, leaf, named[name]
    return owner, leaf, tensor


def get_tensor(module: nn.Module, name: str) -> torch.Tensor:
    """The parameter or buffer called ``name`` (``"fc1.weight"``); ``KeyError`` if absent."""
    return _resolve(module, name)[2]


def set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Write ``value`` into the parameter/buffer ``name`` of ``module`` (in place).

    Same shape: the values are copied into the existing tensor (dtype kept). A new shape
    (channels physically removed) replaces the tensor, keeping it a parameter/buffer.
    """
    owner, leaf, tensor = _resolve(module, name)
    value = value.detach()
    with torch.no_grad():
        if tuple(value.shape) == tuple(tensor.shape):
            tensor.copy_(value.to(tensor.dtype))
            return
        new = value.to(tensor.dtype).clone()
        if isinstance(owner, nn.Module) and not isinstance(owner, torch.jit.ScriptModule):
            if leaf in owner._parameters:
                owner._parameters[leaf] = nn.Parameter(new, requires_grad=tensor.requires_grad)
                return
            if leaf in owner._buffers:
                owner._buffers[leaf] = new
                return
        tensor.data = new


# --------------------------------------------------------------------------- saving


def _atomic_write(path: Path, write: Any) -> None:
    """Write via ``write(tmp_path)`` into a temp file beside ``path`` and rename it over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temp name keeps the real suffix: torch.export.save checks for ".pt2".
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _state_for_saving(module: nn.Module) -> dict[str, torch.Tensor]:
    # Clones break shared storage (tied weights), which safetensors refuses to write.
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def save_model(loaded: LoadedModel, path: str | Path) -> None:
    """Write ``loaded`` in its own format, atomically (temp file + rename).

    TorchScript -> ``torch.jit.save``; ``.pt2`` -> ``torch.export.save`` of the module
    re-exported with its example inputs (so edited or resized weights are what is saved);
    demo / eager / weights-only -> a state dict, as safetensors when ``path`` ends in
    ``.safetensors``, else ``torch.save``. Raises `ExportError` when nothing could be written.
    """
    path = Path(path)
    module = loaded.module
    try:
        if loaded.format == "torchscript" and isinstance(module, torch.jit.ScriptModule):
            _atomic_write(path, lambda tmp: torch.jit.save(module, str(tmp)))
        elif loaded.format == "pt2":
            args = loaded.metadata.get("example_args")
            if args is None:
                raise ExportError(
                    "the program has no example inputs to re-export it with",
                    path=path,
                    hint="save the weights as a state_dict (.pt or .safetensors) instead",
                )
            kwargs = loaded.metadata.get("example_kwargs") or {}
            ep = torch.export.export(module, tuple(args), kwargs=dict(kwargs))
            _atomic_write(path, lambda tmp: torch.export.save(ep, str(tmp)))
        else:
            state = _state_for_saving(module)
            if path.suffix.lower() == ".safetensors":
                from safetensors.torch import save_file

                header = {"format": loaded.format, "source": loaded.source}
                _atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=header))
            else:
                _atomic_write(path, lambda tmp: torch.save(state, tmp))
    except ExportError:
        raise
    except OSError as exc:
        raise ExportError(
            f"cannot write the model ({exc.strerror or exc})",
            path=path,
            hint="check that the folder exists and is writable",
        ) from None
    except Exception as exc:  # tracing/serialisation errors from torch
        raise ExportError(
            f"cannot save the model ({_first_line(exc)})",
            path=path,
            hint="try a state_dict (.pt) or .safetensors path instead",
        ) from None
