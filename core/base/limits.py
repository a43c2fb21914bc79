"""Resource limits shared by every reader: nothing a file declares may blow up time or memory.

A file can declare far more than it holds: a zip member that inflates 1000x, a zstd frame that
announces gigabytes, a tensor shape whose product dwarfs the bytes behind it, JSON nested a
million levels deep. Every reader asks this module before it allocates or decodes, and a file
that asks for too much becomes a one-line `WorkbenchError` instead of a hang, a traceback or
an out-of-memory kill.

The policy (the numbers are module constants; tests lower them with ``monkeypatch``):

Decoded bytes
    What a container may expand to is ``min(ratio * file_size + FLOOR_BYTES,
    MEMORY_FRACTION * available memory)``. The ratio depends on the container:

    - `ZIP_RATIO` (50x) for deflated zip members (torch zip files, ``.npz``): ``torch.save``
      stores members uncompressed (1.0x) and deflate squeezes real fp32 weights ~1.1x, images
      and heavily pruned tensors ~5-10x; 50x leaves room for both while a zip bomb (1000x and
      more) is refused.
    - `PACKED_RATIO` (256x) for our packed archives: their blob is codes, masks and zstd
      streams, so a tensor legitimately decodes to many more bytes than it occupies (a 99%
      pruned layer with a relative index and 4-bit codes is ~270x); a header that declares
      gigabytes of zeros behind a few bytes is still refused.

    `FLOOR_BYTES` (64 MiB) keeps small files from being judged by their ratio alone. The
    environment variable ``WORKBENCH_MAX_EXPANSION`` (a number) replaces both ratios for a
    user who trusts an unusual file; the memory bound always applies.
Available memory
    ``MemAvailable`` from ``/proc/meminfo`` (fallback: ``os.sysconf`` free pages), lowered to
    what an address-space limit (``RLIMIT_AS``) still allows this process.
Single members
    A pickle (``data.pkl``) may be at most `MAX_PICKLE_BYTES` once inflated: a state dict's
    pickle is ~200 bytes per tensor, so 64 MiB is ~300k tensors.
JSON
    `load_json` refuses text longer than its ``max_bytes`` (recipes `MAX_RECIPE_BYTES`, packed
    metadata `MAX_METADATA_JSON_BYTES`, safetensors headers `MAX_HEADER_BYTES`), nesting deeper
    than `MAX_JSON_DEPTH` levels, integers beyond ``2**63 - 1`` and, where asked, duplicate keys.
    `inflate_text` unpacks a deflated text (a packed archive's recipe, format version 2) and
    stops one byte past its cap (`MAX_RECIPE_BYTES` for recipes), whatever the stream says.
Element counts
    `check_alloc` compares ``numel * itemsize`` with the bytes actually present before anything
    is allocated, and `check_shape` accepts only non-negative integer dimensions whose product
    fits in 63 bits.

Why one module of this size: the caps of every reader (zip members, safetensors headers, packed
layouts, JSON depth, npz members) come from one policy (ratio to the file and free memory) that
must stay consistent across them.

Why one module of this size: every reader's resource limits (zip, zstd, safetensors headers,
JSON, shapes) live together so a limit is defined once and the hostile-file tests have one place
to point at.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from core.base.errors import ModelLoadError, WorkbenchError

MiB = 1 << 20
#: Expansion allowed for deflated zip members (torch zip files, .npz); see module docstring.
ZIP_RATIO = 50.0
#: Expansion allowed for a packed archive's blob (codes, masks, zstd streams).
PACKED_RATIO = 256.0
#: Every file may decode to at least this much, whatever its size (bounded by memory).
FLOOR_BYTES = 64 * MiB
#: Share of the available memory one file may take once decoded.
MEMORY_FRACTION = 0.8
#: Largest inflated pickle member (``data.pkl``) of a torch zip file.
MAX_PICKLE_BYTES = 64 * MiB
#: Largest safetensors header (the format's own reference implementation uses the same).
MAX_HEADER_BYTES = 100 * MiB
#: Largest JSON string inside a packed archive's metadata (layout, removed channels...).
MAX_METADATA_JSON_BYTES = 32 * MiB
#: Largest recipe file: a recipe is a few hundred bytes per overridden layer.
MAX_RECIPE_BYTES = 8 * MiB
#: Largest example input rebuilt from a packed archive's metadata: it is one small batch.
MAX_EXAMPLE_BYTES = 256 * MiB
#: Deepest JSON nesting any of our formats uses is 4; 64 is generous and stays far from
#: Python's recursion limit.
MAX_JSON_DEPTH = 64
#: Largest integer accepted in JSON (int64): sizes, offsets and shapes all fit.
MAX_JSON_INT = 2**63 - 1
#: Environment variable replacing the expansion ratios (see module docstring).
EXPANSION_ENV = "WORKBENCH_MAX_EXPANSION"

ErrorType = type[WorkbenchError]


# ---------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------
def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def _address_space_left() -> int | None:
    """Bytes an ``RLIMIT_AS`` soft limit still allows this process to map, if one is set."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    used = 0
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            used = int(fh.read().split()[0]) * int(os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        pass
    return max(0, soft - used)


def available_memory() -> int | None:
    """Bytes this process can still allocate: ``MemAvailable``, lowered by ``RLIMIT_AS``.

    ``None`` when neither can be determined (then only the ratio caps apply).
    """
    values = [v for v in (_meminfo_available(), _address_space_left()) if v is not None]
    return min(values) if values else None


def _ratio(default: float) -> float:
    raw = os.environ.get(EXPANSION_ENV, "").strip()
    if raw:
        try:
            value = float(raw)
        except ValueError:
            return default
        if math.isfinite(value) and value > 0:
            return value
    return default


def max_decoded_bytes(file_bytes: int, ratio: float) -> int:
    """The most a file of ``file_bytes`` may decode to (see the module docstring)."""
    cap = int(_ratio(ratio) * max(0, file_bytes)) + FLOOR_BYTES
    mem = available_memory()
    if mem is not None:
        cap = min(cap, int(mem * MEMORY_FRACTION))
    return cap


def _fmt_bytes(n: int) -> str:
    for unit, size in (("GB", 1 << 30), ("MB", MiB), ("KB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def check_decoded(
    total: int,
    file_bytes: int,
    *,
    ratio: float,
    what: str,
    path: str | Path | None,
    error: ErrorType = ModelLoadError,
) -> None:
    """Refuse when ``total`` decoded bytes exceed `max_decoded_bytes` for the file.

    Parameters
    ----------
    total
        Bytes the file's content would occupy once decoded (declared sizes, shapes).
    file_bytes
        Size of the file on disk.
    ratio
        The container's expansion cap (`ZIP_RATIO`, `PACKED_RATIO`).
    what
        Names the content in the message (``"its zip members"``).
    """
    cap = max_decoded_bytes(file_bytes, ratio)
    if total > cap:
        mem = available_memory()
        by_memory = mem is not None and cap == int(mem * MEMORY_FRACTION)
        reason = (
            "more than the memory available"
            if by_memory
            else f"more than {_ratio(ratio):g}x the file size"
        )
        raise error(
            f"{what} would decode to {_fmt_bytes(total)} from a {_fmt_bytes(file_bytes)} file, "
            f"{reason} (a decompression bomb or a corrupt header)",
            path=path,
            hint=(
                "free memory or use a smaller model"
                if by_memory
                else f"if you trust this file, set {EXPANSION_ENV} to a larger ratio"
            ),
        )


def check_alloc(
    numel: int,
    dtype_size: int,
    bytes_present: int,
    what: str,
    path: str | Path | None,
    *,
    error: ErrorType = ModelLoadError,
) -> int:
    """Bytes of ``numel`` elements of ``dtype_size`` bytes, refused unless they are present.

    Call it before allocating an array whose size comes from a file: ``bytes_present`` is what
    the file really holds for it (a member's size, the rest of a blob). The result is also
    checked against the available memory.
    """
    if numel < 0 or dtype_size < 0:
        raise error(f"{what} has a negative size", path=path, hint="the file is corrupt")
    need = numel * dtype_size
    if need > bytes_present:
        raise error(
            f"{what} declares {numel:,} elements ({_fmt_bytes(need)}) but only "
            f"{_fmt_bytes(max(0, bytes_present))} are present",
            path=path,
            hint="the file is truncated or its header is corrupt",
        )
    mem = available_memory()
    if mem is not None and need > mem * MEMORY_FRACTION:
        raise error(
            f"{what} needs {_fmt_bytes(need)}, more than the memory available",
            path=path,
            hint="free memory or use a smaller model",
        )
    return need


def check_shape(
    shape: Any, what: str, path: str | Path | None, *, error: ErrorType = ModelLoadError
) -> tuple[int, ...]:
    """``shape`` as a tuple of ints, refused unless every entry is an int ``>= 0`` (no bools)
    and the element count fits in 63 bits."""
    if not isinstance(shape, (list, tuple)):
        raise error(
            f"{what} has shape {str(shape)[:60]!r}, not a list of sizes",
            path=path,
            hint="the file is corrupt",
        )
    dims = []
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= MAX_JSON_INT:
            raise error(
                f"{what} has an invalid dimension {str(d)[:40]} in its shape "
                "(sizes are integers >= 0)",
                path=path,
                hint="the file is corrupt",
            )
        dims.append(int(d))
    if math.prod(dims) > MAX_JSON_INT:
        raise error(f"{what} has an impossibly large shape", path=path, hint="the file is corrupt")
    return tuple(dims)


# ---------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------
#: A JSON string literal (unrolled so the regex engine does not backtrack per character).
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
#: Digit runs that may be an integer beyond int64 (``2**63 - 1`` has 19 digits).
_LONG_DIGITS = re.compile(rb"\d{19,}")


_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def _scan(text: str | bytes) -> tuple[int, bool]:
    """(deepest nesting, may hold a huge integer) of JSON text, without parsing it.

    Strings are cut out first so brackets and digits inside them do not count; the nesting is
    then a running sum over the remaining bracket characters, computed by numpy in one pass.
    """
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    bare = _JSON_STRING.sub(b'""', raw)
    del raw
    # Only the brackets matter for the depth: a header of 10**6 tensors is ~80 MB of text but
    # a few MB of brackets, so the running sum stays small.
    arr = np.frombuffer(bare.translate(None, _NOT_BRACKETS), dtype=np.uint8)
    step = np.where((arr == ord("[")) | (arr == ord("{")), 1, -1).astype(np.int32)
    depth = int(np.cumsum(step, dtype=np.int32).max()) if arr.size else 0
    return depth, _LONG_DIGITS.search(bare) is not None


def unique_pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's pairs as a dict; ``ValueError`` when a key repeats."""
    out = dict(items)
    if len(out) != len(items):
        seen: set[str] = set()
        dup = next(k for k, _ in items if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"key {dup[:60]!r} appears twice")
    return out


def load_json(
    text: str | bytes,
    *,
    what: str,
    path: str | Path | None,
    max_bytes: int,
    max_depth: int = MAX_JSON_DEPTH,
    unique_keys: bool = False,
    error: ErrorType = ModelLoadError,
    hint: str = "the file is corrupt",
    object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None,
) -> Any:
    """``json.loads`` with limits on size, nesting depth and integer size.

    Parameters
    ----------
    text
        The JSON document.
    what
        Names it in messages (``"the recipe"``, ``"the packed layout"``).
    max_bytes
        Longest accepted text (characters for ``str``, bytes for ``bytes``).
    max_depth
        Deepest accepted nesting of arrays/objects.
    unique_keys
        Refuse an object that repeats a key (``json`` would silently keep the last).
    object_pairs_hook
        Builds each object from its ``(key, value)`` pairs instead of `unique_pairs` (with
        ``unique_keys``) or ``dict``; it raises ``ValueError`` for an invalid object.
    error, hint
        The exception type raised and its hint.

    Raises
    ------
    WorkbenchError
        ``error`` with a one-line message for every violation and for invalid JSON.
    """
    if len(text) > max_bytes:
        raise error(
            f"{what} is {_fmt_bytes(len(text))}, more than the {_fmt_bytes(max_bytes)} allowed",
            path=path,
            hint=hint,
        )

    depth, long_ints = _scan(text)
    if depth > max_depth:
        raise error(f"{what} is nested more than {max_depth} levels deep", path=path, hint=hint)

    def parse_int(s: str) -> int:
        # Compare lengths first: converting a million-digit literal is itself slow.
        value = int(s) if len(s) <= 21 else None
        if value is None or abs(value) > MAX_JSON_INT:
            raise ValueError(f"integer {s[:24]}{'...' if len(s) > 24 else ''} is out of range")
        return value

    try:
        # The integer hook costs a call per number: only needed when a long digit run exists.
        obj = json.loads(
            text,
            parse_int=parse_int if long_ints else None,
            object_pairs_hook=object_pairs_hook or (unique_pairs if unique_keys else None),
        )
    except RecursionError:  # unbalanced brackets can fool the scan; the parser still stops
        raise error(
            f"{what} is nested more than {max_depth} levels deep", path=path, hint=hint
        ) from None
    except json.JSONDecodeError as exc:
        raise error(
            f"{what} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})",
            path=path,
            hint=hint,
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise error(f"{what} is invalid ({str(exc)[:120]})", path=path, hint=hint) from None
    return obj


# ---------------------------------------------------------------------------------------
# zip containers
# ---------------------------------------------------------------------------------------
def check_zip(
    path: str | Path,
    *,
    what: str,
    ratio: float = ZIP_RATIO,
    member_caps: Sequence[tuple[Callable[[str], bool], int, str]] = (),
    error: ErrorType = ModelLoadError,
) -> list[zipfile.ZipInfo]:
    """Check a zip's declared member sizes before anything inflates them.

    Every member's declared (inflated) size is what the readers (Python's ``zipfile``, torch's
    ``miniz``) allocate; the sum must stay within `max_decoded_bytes` for ``ratio``, and a
    member matched by a ``member_caps`` predicate must not exceed its cap (e.g. ``data.pkl``).
    Stored (uncompressed) members need no check: the file holds every byte of them.

    Returns
    -------
    list of zipfile.ZipInfo
        The members, for callers that look further.
    """
    p = Path(path)
    file_bytes = p.stat().st_size
    try:
        with zipfile.ZipFile(p) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise error(f"{what} is not a readable zip archive ({exc})", path=p) from None
    total = 0
    for info in infos:
        size = int(info.file_size)
        if info.compress_size > file_bytes:
            raise error(
                f"{what}: member {escape_name(info.filename)!r} claims {_fmt_bytes(info.compress_size)}"
                f" in a {_fmt_bytes(file_bytes)} file",
                path=p,
                hint="the file is truncated or corrupt; copy or save it again",
            )
        if info.compress_type != zipfile.ZIP_STORED or size != info.compress_size:
            for matches, cap, label in member_caps:
                if matches(info.filename) and size > cap:
                    raise error(
                        f"{what}: member {escape_name(info.filename)!r} ({label}) would inflate to "
                        f"{_fmt_bytes(size)}, more than the {_fmt_bytes(cap)} allowed",
                        path=p,
                        hint="the file is a decompression bomb or corrupt; save it again",
                    )
        total += size
    check_decoded(total, file_bytes, ratio=ratio, what=what, path=p, error=error)
    return infos


def inflate_text(
    text: str,
    *,
    what: str,
    path: str | Path | None,
    max_bytes: int,
    zdict: bytes = b"",
    error: ErrorType = ModelLoadError,
    hint: str = "the file is corrupt",
) -> str:
    """The UTF-8 text behind ``base85(raw deflate)`` (`core.packed.bytemodel.pack_recipe`).

    Never inflates past ``max_bytes``: the encoded text is refused when it is longer than a
    stream of that output could be (deflate expands incompressible input by ~0.03%, base85 by
    25%), and the stream is inflated with ``max_length`` set one byte past the cap, so a
    deflate bomb (~1000x) stops there. Truncated streams, bytes after the stream's end, bad
    base85 and invalid UTF-8 are refused too.
    """
    if len(text) > (5 * (max_bytes + max_bytes // 512 + 64)) // 4 + 5:
        raise error(f"{what} is longer than {_fmt_bytes(max_bytes)} could pack to", path=path,
                    hint=hint)  # fmt: skip
    try:
        raw = base64.b85decode(text)
        z = zlib.decompressobj(-15, zdict=zdict)
        out = z.decompress(raw, max_bytes + 1)
        if len(out) > max_bytes:
            raise error(f"{what} inflates to more than {_fmt_bytes(max_bytes)}", path=path,
                        hint=hint)  # fmt: skip
        if not z.eof or z.unused_data or z.unconsumed_tail:
            raise ValueError("the deflate stream is truncated or followed by other bytes")
        return out.decode("utf-8")
    except (ValueError, zlib.error) as exc:
        raise error(f"{what} is corrupt ({str(exc)[:120]})", path=path, hint=hint) from None


def escape_name(name: str) -> str:
    """``name`` with control characters (newlines, tabs, escapes) shown as ``\\n``-style escapes,
    so a hostile tensor name cannot break a table or fake extra lines of output."""
    if name.isprintable():
        return name
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in name)


def _is_pickle_member(name: str) -> bool:
    return name.endswith(".pkl")


def check_torch_zip(path: str | Path, *, what: str, error: ErrorType = ModelLoadError) -> None:
    """`check_zip` for a ``torch.save`` zip: members within `ZIP_RATIO`, pickles within
    `MAX_PICKLE_BYTES`. Storage records need no more: torch itself refuses a tensor whose
    declared element count does not match its record's size."""
    check_zip(
        path,
        what=what,
        member_caps=((_is_pickle_member, MAX_PICKLE_BYTES, "a pickle"),),
        error=error,
    )


# ---------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------
#: Item size of every safetensors dtype with whole-byte elements (the sub-byte F4/F6 types
#: have none and are refused like any unsupported dtype).
SAFETENSORS_ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "C64": 8,
    "F64": 8,
    "I64": 8,
    "U64": 8,
}


class SafetensorsEntry(NamedTuple):
    """One checked tensor entry of a safetensors header: a small tuple (headers can list 10**6
    tensors), also readable like the header's dict (``e["dtype"]``, ``e["data_offsets"]``)."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def data_offsets(self) -> tuple[int, int]:
        return (self.start, self.end)

    def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
        if isinstance(key, str):
            if key in ("dtype", "shape", "data_offsets"):
                return getattr(self, key)
            raise KeyError(key)
        return tuple.__getitem__(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        """``dict.get`` for the three header keys."""
        try:
            return self[key]
        except KeyError:
            return default


def _read_header_text(path: Path, error: ErrorType, hint: str) -> tuple[str, int]:
    """``(header JSON text, bytes of the data section)`` of a safetensors file."""
    try:
        file_bytes = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise error("the safetensors file is truncated (no header)", path=path, hint=hint)
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER_BYTES or 8 + n > file_bytes:
                raise error(
                    f"the safetensors header claims {_fmt_bytes(n)}"
                    + (
                        f", more than the {_fmt_bytes(MAX_HEADER_BYTES)} allowed"
                        if n > MAX_HEADER_BYTES
                        else f" in a {_fmt_bytes(file_bytes)} file (truncated or corrupt)"
                    ),
                    path=path,
                    hint=hint,
                )
            raw = fh.read(n)
    except OSError as exc:
        raise error(f"cannot be read ({exc.strerror or exc})", path=path, hint=hint) from None
    try:
        return raw.decode("utf-8"), file_bytes - 8 - n
    except UnicodeDecodeError:
        raise error("the safetensors header is not UTF-8 text", path=path, hint=hint) from None


def _entry_builder(allowed: set[str], data_bytes: int) -> Callable[[list[tuple[str, Any]]], Any]:
    """The JSON parser's ``object_pairs_hook``: a well-formed tensor entry becomes a
    `SafetensorsEntry` at once (a header can list 10**6 tensors; dicts of lists would cost
    ~700 B each). Anything else stays a dict and gets the full checks of `_checked_entry`."""
    itemsize = SAFETENSORS_ITEMSIZE
    dtype_names = {d: d for d in allowed}  # one shared string per dtype, not one per tensor
    shapes: dict[tuple[int, ...], tuple[int, ...]] = {}  # one shared tuple per shape
    entry_keys = {"dtype", "shape", "data_offsets"}

    def compact(items: list[tuple[str, Any]]) -> Any:
        if len(items) == 3:
            d = dict(items)
            if d.keys() == entry_keys:
                dtype, shape, offsets = d["dtype"], d["shape"], d["data_offsets"]
                if (
                    type(dtype) is str
                    and dtype in allowed
                    and type(shape) is list
                    and len(shape) <= 8
                    and all(type(x) is int and 0 <= x <= MAX_JSON_INT for x in shape)
                    and type(offsets) is list
                    and len(offsets) == 2
                    and type(offsets[0]) is int
                    and type(offsets[1]) is int
                ):
                    start, end = offsets
                    key = tuple(shape)
                    numel = math.prod(key)
                    if (
                        numel <= MAX_JSON_INT
                        and 0 <= start <= end <= data_bytes
                        and end - start == numel * itemsize[dtype]
                    ):
                        return SafetensorsEntry(
                            dtype_names[dtype], shapes.setdefault(key, key), start, end
                        )
        return unique_pairs(items)

    return compact


def _checked_entry(
    name: str,
    info: Any,
    allowed: set[str],
    data_bytes: int,
    p: Path,
    error: ErrorType,
    hint: str,
) -> SafetensorsEntry:
    """The full checks of one header entry the fast path did not accept; names the problem."""
    shown = escape_name(name)[:80]
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise error(
            f"tensor {shown!r} has no dtype/shape/data_offsets in the header",
            path=p,
            hint=hint,
        )
    dtype = info["dtype"]
    if dtype not in allowed:
        raise error(
            f"tensor {shown!r} has dtype {str(dtype)[:20]!r}, which the workbench does not "
            f"support (supported: {', '.join(sorted(allowed))})",
            path=p,
            hint="convert the tensors to one of these dtypes (e.g. float32) and save again",
        )
    shape = check_shape(info["shape"], f"tensor {shown!r}", p, error=error)
    offsets = info["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_bytes
    ):
        raise error(
            f"tensor {shown!r} has data_offsets {str(offsets)[:60]} outside the "
            f"{_fmt_bytes(data_bytes)} data section",
            path=p,
            hint=hint,
        )
    start, end = offsets
    need = math.prod(shape) * SAFETENSORS_ITEMSIZE[dtype]
    if end - start != need:
        raise error(
            f"tensor {shown!r} of shape {list(shape)} {dtype} needs {need:,} bytes but its "
            f"data_offsets span {end - start:,}",
            path=p,
            hint=hint,
        )
    # Valid after all (e.g. a dimension too large for the fast checks).
    return SafetensorsEntry(dtype, shape, start, end)


def safetensors_header(
    path: str | Path,
    *,
    supported: Iterable[str],
    error: ErrorType = ModelLoadError,
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Read and check a safetensors header before any tensor is touched.

    Checks: the 8-byte length (at most `MAX_HEADER_BYTES` and inside the file), JSON limits
    (`load_json`, duplicate keys refused), string-only ``__metadata__``, and per tensor a
    ``supported`` dtype, a valid shape (`check_shape`) and ``data_offsets`` that lie inside the
    data section, match ``numel * itemsize`` and do not overlap another tensor's.

    Returns
    -------
    (entries, metadata)
        ``name -> SafetensorsEntry`` (read like a dict: ``e["dtype"]``, ``e["shape"]`` (tuple),
        ``e["data_offsets"]`` (tuple)) and ``__metadata__``.
    """
    p = Path(path)
    allowed = {d for d in supported if d in SAFETENSORS_ITEMSIZE}
    hint = "copy or download the file again"
    text, data_bytes = _read_header_text(p, error, hint)
    header = load_json(
        text,
        what="the safetensors header",
        path=p,
        max_bytes=MAX_HEADER_BYTES,
        unique_keys=True,
        error=error,
        hint=hint,
        object_pairs_hook=_entry_builder(allowed, data_bytes),
    )
    del text
    if not isinstance(header, dict):
        raise error("the safetensors header is not a JSON object", path=p, hint=hint)
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise error(
            "the safetensors __metadata__ is not a map of strings to strings", path=p, hint=hint
        )
    entries: dict[str, SafetensorsEntry] = header
    # Offsets of the non-empty tensors, for the overlap check (plain ints: 10**6 entries).
    starts: list[int] = []
    ends: list[int] = []
    for name, info in header.items():
        if type(info) is not SafetensorsEntry:  # not accepted by the fast path
            info = header[name] = _checked_entry(name, info, allowed, data_bytes, p, error, hint)
        if info.end > info.start:
            starts.append(info.start)
            ends.append(info.end)
    if len(starts) > 1:
        # Sorted by (start, end), no span may begin before the previous one ends.
        s_arr = np.asarray(starts, dtype=np.int64)
        e_arr = np.asarray(ends, dtype=np.int64)
        order = np.lexsort((e_arr, s_arr))
        if bool((s_arr[order[1:]] < e_arr[order[:-1]]).any()):
            _raise_overlap(entries, p, error, hint)
    return entries, {str(k): v for k, v in meta.items()}


def _raise_overlap(
    entries: dict[str, SafetensorsEntry], p: Path, error: ErrorType, hint: str
) -> None:
    """Raise the error naming the first two overlapping tensors (in offset order)."""
    spans = sorted(
        (e.start, e.end, escape_name(name)[:80]) for name, e in entries.items() if e.end > e.start
    )
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:], strict=False):
        if start_b < end_a:
            raise error(f"tensors {a!r} and {b!r} overlap in the file", path=p, hint=hint)


def check_npz(path: str | Path, *, what: str, error: ErrorType = ModelLoadError) -> None:
    """`check_zip` for an ``.npz`` plus, per ``.npy`` member, the element count its header
    declares against the bytes the member holds (numpy allocates the declared array first)."""
    from numpy.lib import format as npformat

    infos = check_zip(path, what=what, error=error)
    with zipfile.ZipFile(path) as zf:
        for info in infos:
            if not info.filename.endswith(".npy"):
                continue
            shown = escape_name(info.filename)[:80]
            with zf.open(info) as fh:
                try:
                    version = npformat.read_magic(fh)
                    read = (
                        npformat.read_array_header_1_0
                        if version == (1, 0)
                        else npformat.read_array_header_2_0
                    )
                    shape, _, dtype = read(fh)
                except (ValueError, OSError, EOFError, SyntaxError, zipfile.BadZipFile) as exc:
                    raise error(
                        f"{what}: member {shown!r} is not a valid .npy array "
                        f"({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})",
                        path=path,
                        hint="save the arrays again with numpy.savez",
                    ) from None
                header_bytes = fh.tell()
            if dtype.hasobject:
                continue  # np.load(allow_pickle=False) refuses it with its own message
            dims = check_shape(list(shape), f"array {shown!r}", path, error=error)
            check_alloc(
                math.prod(dims),
                dtype.itemsize,
                int(info.file_size) - header_bytes,
                f"array {shown!r}",
                path,
                error=error,
            )


#: What Python's and torch's container readers raise on damaged bytes (bad CRC, truncated
#: deflate stream, undecodable member name, unsupported zip feature, short struct read...).
CORRUPT_CONTAINER_ERRORS: tuple[type[BaseException], ...] = (
    zlib.error,
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    UnicodeDecodeError,
    NotImplementedError,
    EOFError,
    struct.error,
    ValueError,
    OSError,
)


def corrupt_reason(exc: BaseException) -> str:
    """A short reason for a `CORRUPT_CONTAINER_ERRORS` exception (one line, <= 160 chars)."""
    if isinstance(exc, PermissionError):
        return "permission denied: check the file's permissions"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:140]}" if text else type(exc).__name__
