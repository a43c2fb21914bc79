"""Vetting of model archives before anything in them can run (see docs/formats.md, "Threat model").

Two archive formats carry more than tensors:

- ``torch.export`` programs (``.pt2``): ``torch.export.load`` discovers every ``models/*``
  member as a program (it strips five characters, so ``models/x.JSON`` is a program too),
  unpickles each program's sample inputs and any pickled weight/constant (falling back to a full
  unpickler when ``weights_only`` refuses), evaluates symbolic-shape strings with sympy and
  ``ExportedProgram.module()`` compiles ``guards_code`` with ``exec``. `vet_pt2` checks the
  archive against an allow-list of exactly the members ``torch.export.save`` writes for one
  program named ``model`` and refuses (`UntrustedPickleError`) anything else.
- TorchScript (``torch.jit.save``): ``torch.jit.load`` compiles the archive's ``code/`` and runs
  a class's ``__setstate__`` while loading; ``forward`` runs whatever ops the code calls
  (``torch.save`` writes files). `vet_torchscript` reads the code with ``ast`` and returns why it
  is not vetted-safe, or ``None``; `read_torchscript_tensors` then reads the tensors with a
  restricted unpickler that can only build tensors from the archive's storages.

Nothing here imports, unpickles with a general unpickler or executes anything from the file.

Why one module of this size: every check here guards the same boundary (bytes of an untrusted
archive before torch sees them) and the allow-lists must be read together to be audited;
splitting per format would scatter the shared pickle scanner and name rules.

Why one module of this size: it is the whole trust boundary (the .pt2 member allow-list, the
TorchScript code allow-list and the static pickle scanner); keeping every rule in one file makes
it reviewable in one reading.
"""

from __future__ import annotations

import ast
import io
import json
import pickle
import pickletools
import re
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from core.base.errors import ModelLoadError, UntrustedPickleError

TRUST_HINT = (
    "unpickling runs code stored in the file; pass --trust (trust=True) only for files you "
    "made yourself or fully trust, or save the weights instead: "
    "torch.save(model.state_dict(), path)"
)

#: Suffixes whose case variants are refused: a loader that ignores case would read them.
KNOWN_SUFFIXES = (".json", ".pt", ".pkl", ".py", ".debug_pkl", ".pt2", ".so", ".cpp")


# --------------------------------------------------------------------------- zip member names


def zip_name_problem(names: list[str]) -> str | None:
    """Why a zip's member names cannot be vetted exactly, or ``None`` when they can.

    torch's zip reader takes the first member's folder as the archive root and looks members up
    by exact name; Python's `zipfile` keeps the last of duplicate names. Refused: duplicates,
    absolute paths, ``..`` or ``.`` components, backslashes, empty components, members outside
    the one root folder, names whose lower-case forms collide and names ending in a case
    variant of a known suffix (``.JSON``).
    """
    if not names:
        return "is an empty zip archive"
    seen: set[str] = set()
    lowered: dict[str, str] = {}
    root = names[0].split("/", 1)[0]
    for name in names:
        shown = repr(name[:80])
        if name in seen:
            return f"has the member {shown} twice"
        seen.add(name)
        if "\\" in name:
            return f"has a member name with a backslash ({shown})"
        if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
            return f"has an absolute member path ({shown})"
        parts = name.split("/")
        if any(p in ("..", ".") for p in parts):
            return f"has a member path with '..' or '.' ({shown})"
        if any(p == "" for p in parts) or any(ord(c) < 32 for c in name):
            return f"has a malformed member name ({shown})"
        if len(parts) < 2 or parts[0] != root:
            return f"has a member outside the archive's root folder {root!r} ({shown})"
        low = name.lower()
        if low in lowered:
            return f"has members whose names differ only in case ({shown}, {lowered[low]!r})"
        lowered[low] = name
        for suffix in KNOWN_SUFFIXES:
            if low.endswith(suffix) and not name.endswith(suffix):
                return f"has a member with a case-variant suffix ({shown})"
    return None


def _root_of(names: list[str]) -> str:
    return names[0].split("/", 1)[0] + "/"


# --------------------------------------------------------------------------- static pickle scan

_STR_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING",
            "SHORT_BINSTRING"}  # fmt: skip
_STORAGE = re.compile(r"^torch\.[A-Za-z]*Storage$")
#: Globals of a pickle that holds only tensors and plain containers (torch.save of tensors).
TENSOR_GLOBALS = frozenset(
    {"torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter",
     "collections.OrderedDict"}
)  # fmt: skip
_TS_PICKLE_GLOBALS = frozenset(
    {"torch._utils._rebuild_tensor_v2", "collections.OrderedDict",
     "torch.jit._pickle.build_intlist", "torch.jit._pickle.build_tensorlist",
     "torch.jit._pickle.build_doublelist", "torch.jit._pickle.build_boollist",
     "torch.jit._pickle.restore_type_tag"}
)  # fmt: skip


_INT_OPS = {
    "PROTO",
    "FRAME",
    "LONG1",
    "LONG4",
    "LONG",
    "INT",
    "BININT",
    "BININT1",
    "BININT2",
    "STOP",
}
#: Modules whose globals torch's own state-dict pickles reference.
TORCH_GLOBAL_ROOTS = ("torch.", "collections.", "_codecs.", "numpy.core.multiarray._reconstruct")


def _scan_pickle(fh: Any) -> tuple[list[str], list[str]]:
    """(global names, opcode names) of ONE pickle stream, read statically with ``pickletools``
    (nothing is executed). Raises ``ValueError`` when the bytes are not a pickle stream."""
    names: list[str] = []
    ops: list[str] = []
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(fh):
            ops.append(op.name)
            if op.name in _STR_OPS and isinstance(arg, (str, bytes)):
                strings.append(arg if isinstance(arg, str) else arg.decode("latin-1"))
            elif op.name in ("GLOBAL", "INST") and isinstance(arg, str):
                names.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL":
                # Only resolvable when the two strings come right before it; "?" is never allowed.
                names.append(".".join(strings[-2:]) if len(strings) >= 2 else "?")
            elif op.name in ("EXT1", "EXT2", "EXT4"):
                names.append("?copyreg-extension")
    except Exception as exc:  # pickletools raises ValueError/EOFError/etc. on junk
        raise ValueError(str(exc)) from None
    return names, ops


def pickle_globals(path: Path, kind: str) -> list[str] | None:
    """Every global a torch file's pickles reference, read statically (nothing is executed).

    ``kind`` is ``"torch_zip"`` for zip containers (their ``data.pkl`` is scanned), anything
    else for pickle streams. Returns ``None`` when the bytes are not valid pickles.
    """
    try:
        if kind == "torch_zip":
            with zipfile.ZipFile(path) as zf:
                member = next(n for n in zf.namelist() if n.endswith("data.pkl"))
                with zf.open(member) as fh:
                    return _scan_pickle(fh)[0]
        found: list[str] = []
        with path.open("rb") as fh:
            for i in range(5):
                try:
                    names, ops = _scan_pickle(fh)
                except ValueError:
                    if i == 0:
                        return None
                    break
                found.extend(names)
                if i == 0 and not (set(ops) <= _INT_OPS):
                    break  # a plain pickle.dump stream, not torch's legacy multi-stream format
        return found
    except (OSError, StopIteration, zipfile.BadZipFile):
        return None


def is_plain_pickle(path: Path) -> bool:
    """True when the first pickle stream is an object, not the int magic of torch's legacy format."""
    with path.open("rb") as fh:
        try:
            _, ops = _scan_pickle(fh)
        except ValueError:
            return False
    return not set(ops) <= _INT_OPS


def pickle_globals_of(data: bytes) -> list[str]:
    """Every global one pickle stream references, read with ``pickletools`` (nothing runs).

    Raises ``ValueError`` when the bytes are not a single valid pickle stream.
    """
    return _scan_pickle(io.BytesIO(data))[0]


def _tensor_global(name: str) -> bool:
    return name in TENSOR_GLOBALS or bool(_STORAGE.match(name))


def torch_zip_tensor_problem(data: bytes) -> str | None:
    """Why a ``torch.save`` zip (in memory) is not just tensors and plain data, or ``None``."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            names = zf.namelist()
            problem = zip_name_problem(names)
            if problem:
                return problem
            pkls = [n for n in names if n == _root_of(names) + "data.pkl"]
            if len(pkls) != 1:
                return "is not a torch.save archive (no data.pkl)"
            found = pickle_globals_of(zf.read(pkls[0]))
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        return f"cannot be read ({str(exc)[:80]})"
    foreign = sorted({n for n in found if not _tensor_global(n)})
    if foreign:
        return f"references Python objects other than tensors ({', '.join(foreign)[:120]})"
    return None


def weights_only_load(data: bytes) -> Any:
    """``torch.load(weights_only=True)`` of in-memory bytes; raises on any refusal."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _only_tensors_and_plain_data(obj: Any, depth: int = 0) -> bool:
    """True for tensors, plain scalars/strings/None and tuples/lists/dicts of them."""
    if depth > 32:
        return False
    if isinstance(obj, torch.Tensor):
        return type(obj) in (torch.Tensor, torch.nn.Parameter)
    if obj is None or type(obj) in (bool, int, float, str):
        return True
    if type(obj) in (tuple, list):
        return all(_only_tensors_and_plain_data(v, depth + 1) for v in obj)
    if type(obj) in (dict, OrderedDict):
        return all(
            type(k) is str and _only_tensors_and_plain_data(v, depth + 1) for k, v in obj.items()
        )
    return False


# --------------------------------------------------------------------------- .pt2 expressions

_SYM_TOKEN = re.compile(r"\s*(\d+\.\d+|\d+|[A-Za-z_][A-Za-z0-9_]*|[-+*/%(),<>=!^&|~]+)")
_SYM_SAFE_NAMES = {
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt",
    "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv",
    "IntTrueDiv", "IsNonOverlappingAndDenseIndicator", "Max", "Min", "TruncToFloat",
    "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity", "BitwiseFn_bitwise_and",
    "BitwiseFn_bitwise_or", "OpaqueUnaryFn_sqrt", "oo", "zoo", "nan", "True", "False", "Abs",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "Integer", "Rational", "Float",
    "floor", "ceiling", "sqrt", "log", "exp",
}  # fmt: skip
_SYM_NAME = re.compile(r"^[a-z]\d+$")
# torch writes a dynamic dimension's symbol as ``Symbol('s77', positive=True, integer=True)``:
# a quoted shape-symbol name plus boolean assumptions, nothing else, is as harmless as ``s77``.
_SYM_DECL = re.compile(
    r"Symbol\(\s*'([a-z]\d+)'(?:\s*,\s*(?:positive|negative|nonnegative|nonpositive|integer|"
    r"real|finite|nonzero|zero|even|odd)\s*=\s*(?:True|False))*\s*\)"
)
# Sources in a program's guards: ``L['x']`` / ``L['flat_args'][0]`` with a size/stride lookup.
_GUARD_SOURCE = re.compile(
    r"L\['[A-Za-z_][A-Za-z0-9_]*'\](?:\[\d+\])*"
    r"(?:\.(?:size|stride)\(\)\[\d+\]|\.storage_offset\(\)|\.dim\(\)|\.numel\(\))?"
)
_GUARD_WORDS = re.compile(r"\b(?:and|or|not)\b")


def safe_guard(code: str) -> bool:
    """True when a ``guards_code`` entry is a plain comparison of input sizes.

    ``ExportedProgram.module()`` compiles these strings into Python with ``exec`` and runs
    them on every call, so anything else (a call, an attribute, a string) would run code from
    the file.
    """
    return safe_sym_expr(_GUARD_WORDS.sub(" ", _GUARD_SOURCE.sub(" s0 ", code)))


def safe_sym_expr(expr: str) -> bool:
    """True when ``expr`` is plain symbolic-shape arithmetic (no strings, attributes, calls to
    anything but sympy shape functions) and therefore harmless for ``sympy.sympify``."""
    expr = _SYM_DECL.sub(r" \1 ", expr)
    pos = 0
    while pos < len(expr):
        m = _SYM_TOKEN.match(expr, pos)
        if m is None:
            return expr[pos:].strip() == ""
        tok = m.group(1)
        if tok[0].isalpha() or tok[0] == "_":
            if tok not in _SYM_SAFE_NAMES and not _SYM_NAME.match(tok):
                return False
        pos = m.end()
    return True


def _iter_sym_strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "expr_str" and isinstance(v, str):
                yield v
            elif k == "range_constraints" and isinstance(v, dict):
                yield from (key for key in v if isinstance(key, str))
                yield from _iter_sym_strings(v)
            else:
                yield from _iter_sym_strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _iter_sym_strings(v)


def _constant_strings(obj: Any) -> Iterator[str]:
    """Every ``as_string`` value of a program's constant user inputs."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "constant_input" and isinstance(v, dict):
                value = v.get("value")
                if isinstance(value, dict) and isinstance(value.get("as_string"), str):
                    yield value["as_string"]
            yield from _constant_strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _constant_strings(v)


# --------------------------------------------------------------------------- .pt2 allow-list

#: The one program torch.export.load returns (``exported_programs["model"]``).
PT2_MODEL = "model"
#: Members torch.export.save always writes for one program (relative to the archive root).
PT2_REQUIRED = (
    "archive_format",
    f"models/{PT2_MODEL}.json",
    f"data/weights/{PT2_MODEL}_weights_config.json",
    f"data/constants/{PT2_MODEL}_constants_config.json",
)
#: Members it may write; the zip writer adds the last three.
PT2_OPTIONAL = (
    "archive_version",
    f"data/sample_inputs/{PT2_MODEL}.pt",
    "byteorder",
    ".data/version",
    ".data/serialization_id",
)
_PAYLOAD_KEYS = {"path_name", "is_param", "use_pickle", "tensor_meta"}
_TENSOR_META_KEYS = {"dtype", "sizes", "requires_grad", "device", "strides", "storage_offset",
                     "layout"}  # fmt: skip
_WEIGHT_FILE = re.compile(r"weight_\d+")
_CONSTANT_FILE = re.compile(r"tensor_\d+")


def _is_int(v: Any) -> bool:
    return type(v) is int


def _sym_int_ok(v: Any) -> bool:
    return isinstance(v, dict) and set(v) == {"as_int"} and _is_int(v["as_int"])


def _tensor_meta_ok(meta: Any) -> bool:
    if not (isinstance(meta, dict) and set(meta) == _TENSOR_META_KEYS):
        return False
    dev = meta["device"]
    return (
        _is_int(meta["dtype"])
        and _is_int(meta["layout"])
        and type(meta["requires_grad"]) is bool
        and isinstance(meta["sizes"], list)
        and all(_sym_int_ok(s) for s in meta["sizes"])
        and isinstance(meta["strides"], list)
        and all(_sym_int_ok(s) for s in meta["strides"])
        and len(meta["sizes"]) == len(meta["strides"])
        and _sym_int_ok(meta["storage_offset"])
        and isinstance(dev, dict)
        and set(dev) == {"type", "index"}
        and isinstance(dev["type"], str)
        and (dev["index"] is None or _is_int(dev["index"]))
    )


class _Pt2Vetter:
    def __init__(self, path: Path, zf: zipfile.ZipFile, names: list[str]):
        self.path = path
        self.zf = zf
        self.root = _root_of(names)
        self.rel = [n[len(self.root) :] for n in names]

    def refuse(self, what: str) -> UntrustedPickleError:
        return UntrustedPickleError(
            f"the torch.export archive {what}; it is only opened with trust",
            path=self.path,
            hint=TRUST_HINT,
        )

    def read(self, member: str) -> bytes:
        return self.zf.read(self.root + member)

    def json_member(self, member: str) -> Any:
        try:
            return json.loads(self.read(member))
        except (ValueError, UnicodeDecodeError):
            raise ModelLoadError(
                f"the torch.export archive's {member} is not valid JSON",
                path=self.path,
                hint="export and save the program again",
            ) from None

    def pickled_tensor_ok(self, member: str) -> bool:
        """A pickled weight/constant: only tensor globals, and it loads weights-only as a tensor
        (torch's own loader unpickles it with ``weights_only=False``)."""
        data = self.read(member)
        if torch_zip_tensor_problem(data) is not None:
            return False
        try:
            return isinstance(weights_only_load(data), torch.Tensor)
        except Exception:  # any refusal: the real loader would unpickle it fully
            return False

    def config(self, member: str, base: str, pattern: re.Pattern[str]) -> set[str]:
        """Check a weights/constants config's exact shape; the member files it names."""
        cfg = self.json_member(member)
        if not (
            isinstance(cfg, dict) and set(cfg) == {"config"} and isinstance(cfg["config"], dict)
        ):
            raise self.refuse(f"has a {member} that is not a {{'config': {{...}}}} object")
        files: set[str] = set()
        for fqn, entry in cfg["config"].items():
            if not (isinstance(entry, dict) and set(entry) == _PAYLOAD_KEYS):
                raise self.refuse(f"has an entry {str(fqn)[:60]!r} of unexpected shape in {member}")
            name = entry["path_name"]
            if not (
                isinstance(name, str)
                and type(entry["is_param"]) is bool
                and type(entry["use_pickle"]) is bool
            ):
                raise self.refuse(f"has an entry {str(fqn)[:60]!r} of unexpected shape in {member}")
            if name.startswith(("custom_obj_", "opaque_obj_")):
                raise self.refuse("holds opaque/custom Python objects, which load by unpickling")
            if not pattern.fullmatch(name):
                raise self.refuse(f"names an unexpected payload file {name[:60]!r} in {member}")
            if base + name not in self.rel:
                raise ModelLoadError(
                    f"the torch.export archive lacks {base + name}, named in {member}",
                    path=self.path,
                    hint="export and save the program again",
                )
            if entry["use_pickle"]:
                if not self.pickled_tensor_ok(base + name):
                    raise self.refuse(f"stores {base + name} as pickled Python objects")
            elif not _tensor_meta_ok(entry["tensor_meta"]):
                raise self.refuse(f"has tensor metadata of unexpected shape for {str(fqn)[:60]!r}")
            files.add(base + name)
        return files

    def sample_inputs(self, member: str) -> None:
        data = self.read(member)
        if not data:
            return  # torch treats empty sample inputs as none
        problem = torch_zip_tensor_problem(data)
        if problem is not None:
            raise self.refuse(f"stores example inputs that are not plain tensors: it {problem}")
        try:
            obj = weights_only_load(data)
        except Exception:  # torch.export.load would fall back to a full unpickler
            raise self.refuse("stores example inputs as pickled Python objects") from None
        if not (
            isinstance(obj, tuple)
            and len(obj) == 2
            and type(obj[0]) is tuple
            and type(obj[1]) is dict
            and _only_tensors_and_plain_data(obj)
        ):
            raise self.refuse("stores example inputs that are not (args, kwargs) of tensors")

    def program(self, member: str) -> None:
        program = self.json_member(member)
        if not isinstance(program, dict):
            raise self.refuse(f"has a {member} that is not a JSON object")
        for expr in _iter_sym_strings(program):
            if not safe_sym_expr(expr):
                raise self.refuse(
                    f"has a symbolic shape expression that is not arithmetic ({expr[:60]!r}), "
                    "which would run code from the file"
                )
        for text in _constant_strings(program):
            # Constant string inputs are spliced into the generated guard code in quotes.
            if not re.fullmatch(r"[\w .,:/+-]*", text):
                raise self.refuse(
                    f"has a constant string input that could escape its quotes ({text[:60]!r})"
                )
        guards = program.get("guards_code") or []
        if not isinstance(guards, list):
            raise self.refuse("has guard code that is not a list of expressions")
        for code in guards:
            if not (isinstance(code, str) and safe_guard(code)):
                raise self.refuse(
                    f"has guard code that is not a plain shape check ({str(code)[:60]!r}), "
                    "which would run code from the file"
                )

    def run(self) -> None:
        rel = self.rel
        native = [n for n in rel if n.startswith(("data/aotinductor/", "data/executorch/",
                                                   "data/mtia"))]  # fmt: skip
        if native:
            raise self.refuse("contains compiled native code (AOTInductor/ExecuTorch)")
        models = [n for n in rel if n.startswith("models/")]
        if f"models/{PT2_MODEL}.json" not in models:
            raise ModelLoadError(
                f"the torch.export archive holds no program models/{PT2_MODEL}.json",
                path=self.path,
                hint="save it with torch.export.save(exported_program, path)",
            )
        if len(models) > 1:
            extra = [m for m in models if m != f"models/{PT2_MODEL}.json"]
            raise self.refuse(
                f"holds more than one program ({', '.join(extra)[:80]}), which torch's loader "
                "would all load"
            )
        for legacy in (f"data/weights/{PT2_MODEL}.pt", f"data/constants/{PT2_MODEL}.pt"):
            if legacy in rel:
                raise self.refuse("stores weights in the legacy pickled layout")
        for member in PT2_REQUIRED:
            if member not in rel:
                raise ModelLoadError(
                    f"the torch.export archive lacks {member}",
                    path=self.path,
                    hint="export and save the program again",
                )
        if self.read("archive_format").strip() != b"pt2":
            raise ModelLoadError(
                "the archive's archive_format is not 'pt2'",
                path=self.path,
                hint="save it with torch.export.save(exported_program, path)",
            )
        allowed = set(PT2_REQUIRED) | set(PT2_OPTIONAL)
        allowed |= self.config(PT2_REQUIRED[2], "data/weights/", _WEIGHT_FILE)
        allowed |= self.config(PT2_REQUIRED[3], "data/constants/", _CONSTANT_FILE)
        unknown = [n for n in rel if n not in allowed and not n.startswith("extra/")]
        if unknown:
            raise self.refuse(
                f"has members torch.export.save does not write ({', '.join(unknown)[:100]})"
            )
        sample = f"data/sample_inputs/{PT2_MODEL}.pt"
        if sample in rel:
            self.sample_inputs(sample)
        self.program(PT2_REQUIRED[1])


def vet_pt2(path: Path) -> None:
    """Refuse a ``.pt2`` archive whose loading would run code from the file.

    The archive must hold exactly what ``torch.export.save`` writes for one program named
    ``model`` (see `PT2_REQUIRED`/`PT2_OPTIONAL`, the payload files its two configs name, and
    string-only ``extra/`` files), under exact, unique, relative member names; configs must have
    the exact shape torch writes; sample inputs and pickled payloads may only hold tensors (a
    static scan of their pickle, then a ``weights_only`` load); symbolic expressions, guards and
    constant strings must be plain shape arithmetic.

    Raises
    ------
    UntrustedPickleError
        Anything outside the allow-list (loading it needs ``trust=True``).
    ModelLoadError
        A damaged archive (missing members, invalid JSON).
    """
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            problem = zip_name_problem(names)
            if problem:
                raise UntrustedPickleError(
                    f"the torch.export archive {problem}; it is only opened with trust",
                    path=path,
                    hint=TRUST_HINT,
                )
            _Pt2Vetter(path, zf, names).run()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelLoadError(
            f"the torch.export archive cannot be read ({str(exc)[:120]})",
            path=path,
            hint="copy or download the file again",
        ) from None


# --------------------------------------------------------------------------- TorchScript code

#: aten ops that touch files, the process or global state; everything else in aten is allowed.
DENIED_ATEN = frozenset(
    {"save", "from_file", "load", "manual_seed", "seed", "_cufft_set_plan_cache_max_size",
     "_cufft_clear_plan_cache", "set_num_threads", "set_num_interop_threads",
     "record_stream", "_set_item"}
)  # fmt: skip
#: prim ops seen in scripted/traced programs plus other pure intrinsics (no Python, no RPC,
#: no profiling hooks, no interpreter-internal graph nodes).
ALLOWED_PRIM = frozenset(
    {"NumToTensor", "RaiseException", "device", "dtype", "is_nested", "requires_grad", "type",
     "unchecked_cast", "Uninitialized", "data", "grad", "layout", "is_cpu", "is_cuda",
     "is_ipu", "is_maia", "is_meta", "is_mkldnn", "is_mps", "is_mtia", "is_quantized",
     "is_sparse", "is_sparse_csr", "is_vulkan", "is_xla", "is_xpu", "itemsize", "nbytes",
     "min", "max", "abs", "tolist", "TupleIndex", "TupleUnpack", "StringIndex", "EnumName",
     "EnumValue", "index", "name", "rangelist", "unchecked_unwrap_optional", "Print",
     "ModuleContainerIndex"}
)  # fmt: skip
#: Names a serialized TorchScript program may call bare (TorchScript builtins).
_BUILTIN_CALLS = frozenset(
    {"annotate", "unchecked_cast", "uninitialized", "bool", "int", "float", "str", "complex",
     "len", "range", "getattr", "hasattr", "isinstance", "print", "min", "max", "abs", "round",
     "list", "dict", "tuple", "enumerate", "zip", "sorted", "any", "all", "sum", "divmod",
     "hash", "ord", "chr", "hex", "oct", "bin", "fork", "awaitable", "awaitable_wait",
     "awaitable_nowait", "isfinite", "isnan", "isinf", "reversed", "slice"}
)  # fmt: skip
_FORBIDDEN_DEFS = ("__setstate__", "__getstate__")
_FORBIDDEN_NODES = (ast.Import, ast.ImportFrom, ast.Global, ast.Nonlocal, ast.Lambda,
                    ast.Await, ast.Yield, ast.YieldFrom, ast.AsyncFunctionDef)  # fmt: skip


@lru_cache(maxsize=8)
def _registered(namespace: str) -> frozenset[str]:
    return frozenset(
        s.name.split("::", 1)[1]
        for s in torch._C._jit_get_all_schemas()
        if s.name.startswith(namespace + "::")
    )


def allowed_aten() -> frozenset[str]:
    """Every registered ``aten`` operator except `DENIED_ATEN` (pure tensor/list/str ops)."""
    return _registered("aten") - DENIED_ATEN


def _op_problem(namespace: str, op: str) -> str | None:
    if namespace == "aten":
        return None if op in allowed_aten() else f"calls torch.ops.aten.{op}"
    if namespace == "prim":
        return None if op in ALLOWED_PRIM else f"calls torch.ops.prim.{op}"
    if namespace == "quantized":
        return None if op in _registered("quantized") else f"calls torch.ops.quantized.{op}"
    return f"calls a custom operator namespace torch.ops.{namespace}"


def _chain(node: ast.AST) -> list[str] | None:
    """``a.b.c`` as ["a", "b", "c"]; ``None`` when the chain does not start at a name."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return parts[::-1]


def _chain_problem(parts: list[str]) -> str | None:
    root = parts[0]
    if root == "ops" or parts[:2] == ["torch", "ops"]:
        rest = parts[1:] if root == "ops" else parts[2:]
        if len(rest) != 2:
            return f"uses the operator table as a value ({'.'.join(parts)[:60]})"
        return _op_problem(rest[0], rest[1])
    if root == "torch":
        if len(parts) == 2 and parts[1] in allowed_aten():
            return None
        if len(parts) >= 2 and parts[1] == "classes":
            return f"uses a custom C++ class ({'.'.join(parts)[:60]})"
        return f"calls {'.'.join(parts)[:60]}"
    if root == "__torch__":
        if "classes" in parts[1:3]:
            return f"uses a custom C++ class ({'.'.join(parts)[:60]})"
        return None
    if root == "CONSTANTS":
        return None if len(parts) == 2 else f"uses {'.'.join(parts)[:60]}"
    return None


def _code_problem(tree: ast.Module, defined: set[str]) -> str | None:
    """Why one parsed TorchScript source file is not vetted-safe, or ``None``.

    ``defined``: every method name the archive's code defines (calls to them run vetted code).
    """
    denied = DENIED_ATEN | (_registered("prim") - ALLOWED_PRIM)
    chain_roots = {"torch", "ops", "__torch__", "CONSTANTS"}
    inside_chain: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, _FORBIDDEN_NODES):
            return f"has a {type(node).__name__} statement in its code"
        if isinstance(node, ast.FunctionDef) and node.name in _FORBIDDEN_DEFS:
            return f"defines {node.name}"
        if isinstance(node, ast.Attribute) and id(node) not in inside_chain:
            # The outermost attribute of a chain: check the chain once, skip its inner parts.
            inner = node.value
            while isinstance(inner, ast.Attribute):
                inside_chain.add(id(inner))
                inner = inner.value
            if isinstance(inner, ast.Name):
                inside_chain.add(id(inner))
            parts = _chain(node)
            if parts is not None and parts[0] in chain_roots:
                problem = _chain_problem(parts)
                if problem:
                    return problem
            elif node.attr in denied:
                # A method call on a value: on a tensor it is the aten op of that name.
                return f"calls the {node.attr} method"
        elif isinstance(node, ast.Name) and id(node) not in inside_chain:
            if node.id in ("torch", "ops"):
                return f"uses {node.id} as a value"
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in ("getattr", "hasattr"):
                attr = node.args[1] if len(node.args) > 1 else None
                if not (isinstance(attr, ast.Constant) and isinstance(attr.value, str)):
                    return "looks up an attribute by a computed name"
                if attr.value in denied or attr.value in _FORBIDDEN_DEFS:
                    return f"looks up {attr.value!r} by name"
            elif isinstance(func, ast.Attribute):
                parts = _chain(func)
                if (parts is None or parts[0] not in chain_roots) and not (
                    func.attr in defined or func.attr in allowed_aten()
                    or func.attr in ALLOWED_PRIM
                ):  # fmt: skip
                    return f"calls an unknown method {func.attr!r}"
    return None


#: TorchScript archive members (relative to the root) other than code/ and extra/.
_TS_MEMBERS = re.compile(
    r"(data|constants|traced_inputs)\.pkl|(data|constants|traced_inputs)/\d+"
    r"|version|byteorder|\.data/version|\.data/serialization_id"
)


def vet_torchscript(path: Path) -> str | None:
    """Why ``path``'s TorchScript is not vetted-safe to ``torch.jit.load`` and run, or ``None``.

    Vetted-safe: every member is one ``torch.jit.save`` writes; every ``code/`` file parses and
    only calls allowed ops (`allowed_aten`, `ALLOWED_PRIM`, registered ``quantized`` ops,
    TorchScript builtins, methods defined in the archive), defines no ``__setstate__`` /
    ``__getstate__``, uses no custom C++ class and no other operator namespace; its pickles
    reference only tensor, TorchScript-container and ``__torch__`` class globals (debug pickles
    none at all).

    Raises
    ------
    UntrustedPickleError
        Member names that cannot be vetted exactly (duplicates, absolute paths, ``..``...).
    """
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        problem = zip_name_problem(names)
        if problem:
            raise UntrustedPickleError(
                f"the TorchScript archive {problem}; it is only opened with trust",
                path=path,
                hint=TRUST_HINT,
            )
        root = _root_of(names)
        trees: list[ast.Module] = []
        for name in names:
            rel = name[len(root) :]
            if rel.startswith("extra/"):
                continue
            if rel.startswith("code/"):
                data = zf.read(name)
                if rel.endswith(".py.debug_pkl"):
                    # Source ranges: strings and ints, packed with TorchScript's list builders.
                    try:
                        found = pickle_globals_of(data)
                    except ValueError:
                        return f"has a debug pickle that cannot be read ({rel})"
                    if any(not g.startswith("torch.jit._pickle.build_") for g in found):
                        return f"has a debug pickle that references Python objects ({rel})"
                    continue
                if not rel.endswith(".py"):
                    return f"has an unexpected member {rel[:60]!r} in code/"
                try:
                    trees.append(ast.parse(data.decode("utf-8")))
                except (SyntaxError, ValueError):  # UnicodeDecodeError is a ValueError
                    return f"has code that cannot be checked ({rel})"
                continue
            if not _TS_MEMBERS.fullmatch(rel):
                return f"has a member torch.jit.save does not write ({rel[:60]!r})"
            if rel.endswith(".pkl"):
                try:
                    found = pickle_globals_of(zf.read(name))
                except ValueError:
                    return f"has a pickle that cannot be read ({rel})"
                for g in found:
                    ok = g in _TS_PICKLE_GLOBALS or _STORAGE.match(g) or (
                        g.startswith("__torch__.") and ".classes." not in g
                    )  # fmt: skip
                    if not ok:
                        return f"has a pickle referencing {g[:60]} ({rel})"
    defined = {n.name for tree in trees for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    for special in _FORBIDDEN_DEFS:  # __setstate__ first: it runs while loading
        if special in defined:
            return f"defines {special}"
    for tree in trees:
        problem = _code_problem(tree, defined)
        if problem:
            return problem
    return None


# --------------------------------------------------------------------------- TorchScript tensors


class _ScriptObject:
    """Stands in for a TorchScript class instance while reading tensors; it runs nothing."""

    qualname = "?"

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _identity(value: Any, *_: Any) -> Any:
    return value


class _TensorOnlyUnpickler(pickle.Unpickler):
    """Builds tensors from the archive's storages; every other global is refused."""

    def __init__(self, data: bytes, zf: zipfile.ZipFile, prefix: str, path: Path):
        super().__init__(io.BytesIO(data))
        self.zf = zf
        self.prefix = prefix
        self.path = path
        self.classes: dict[str, type] = {}
        self.storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full == "torch._utils._rebuild_tensor_v2":
            return self._rebuild_tensor
        if full == "collections.OrderedDict":
            return OrderedDict
        if module == "torch" and _STORAGE.match(full) and hasattr(torch, name):
            with warnings.catch_warnings():
                warnings.simplefilter(
                    "ignore"
                )  # TypedStorage is deprecated; only its dtype is read
                return getattr(torch, name).dtype
        if full in _TS_PICKLE_GLOBALS:
            return _identity
        if module.startswith("__torch__") and ".classes." not in full:
            if full not in self.classes:
                self.classes[full] = type(name, (_ScriptObject,), {"qualname": full})
            return self.classes[full]
        raise UntrustedPickleError(
            f"the TorchScript archive's pickle references {full[:80]}",
            path=self.path,
            hint=TRUST_HINT,
        )

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise ModelLoadError(
                "the TorchScript archive has a storage reference of unknown form",
                path=self.path,
                hint="save it again with torch.jit.save",
            )
        _, dtype, key, _location, numel = pid
        if not (isinstance(dtype, torch.dtype) and isinstance(key, str) and key.isdigit()):
            raise ModelLoadError(
                "the TorchScript archive has a malformed storage reference", path=self.path
            )
        if key not in self.storages:
            raw = bytearray(self.zf.read(self.prefix + key))
            itemsize = torch.empty((), dtype=dtype).element_size()
            if not isinstance(numel, int) or len(raw) < numel * itemsize:
                raise ModelLoadError(
                    f"the TorchScript archive's storage {key} is shorter than recorded",
                    path=self.path,
                    hint="copy or download the file again",
                )
            flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            self.storages[key] = flat
        return self.storages[key]

    def _rebuild_tensor(
        self, storage: Any, offset: Any, size: Any, stride: Any, *_rest: Any
    ) -> torch.Tensor:
        if not isinstance(storage, torch.Tensor):
            raise ModelLoadError("the TorchScript archive has a malformed tensor", path=self.path)
        # as_strided checks that the view stays inside the storage.
        return torch.as_strided(storage, tuple(size), tuple(stride), int(offset)).clone()


def read_torchscript_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a TorchScript archive's ``data.pkl``, by dotted attribute path.

    Read with `_TensorOnlyUnpickler`: only tensors are built, TorchScript class instances
    become inert placeholders, nothing from the archive is compiled or run. A tensor reachable
    several ways (an LSTM's ``_flat_weights``) keeps the name reached through attributes only.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            problem = zip_name_problem(names)
            if problem:
                raise UntrustedPickleError(
                    f"the TorchScript archive {problem}", path=path, hint=TRUST_HINT
                )
            root = _root_of(names)
            if root + "byteorder" in names and zf.read(root + "byteorder").strip() != b"little":
                raise ModelLoadError(
                    "the TorchScript archive stores big-endian tensors",
                    path=path,
                    hint="save it again on a little-endian machine, or pass --trust",
                )
            obj = _TensorOnlyUnpickler(zf.read(root + "data.pkl"), zf, root + "data/", path).load()
    except (zipfile.BadZipFile, KeyError, OSError, pickle.UnpicklingError, EOFError,
            ValueError, RuntimeError, TypeError) as exc:  # fmt: skip
        raise ModelLoadError(
            f"the TorchScript archive's weights cannot be read ({str(exc)[:120]})",
            path=path,
            hint="copy or download the file again",
        ) from None
    found: dict[int, tuple[bool, str, torch.Tensor]] = {}

    def walk(value: Any, prefix: str, via_sequence: bool, depth: int) -> None:
        if depth > 64:
            return
        if isinstance(value, torch.Tensor):
            best = found.get(id(value))
            if best is None or (best[0] and not via_sequence):
                found[id(value)] = (via_sequence, prefix, value)
            return
        if isinstance(value, _ScriptObject):
            value = getattr(value, "state", None)
        if isinstance(value, dict):
            for k, v in value.items():
                if isinstance(k, str):
                    walk(v, f"{prefix}.{k}" if prefix else k, via_sequence, depth + 1)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{prefix}.{i}" if prefix else str(i), True, depth + 1)

    walk(obj, "", False, 0)
    return {name: tensor for _, name, tensor in found.values()}
