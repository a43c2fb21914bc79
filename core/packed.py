"""The packed archive ``model.packed.safetensors``: byte-exact size model, writer and loader.

The format is specified in ``docs/packed-format.md``. In short: a safetensors file whose only
tensor is one ``U8`` blob ``"packed"``; its ``__metadata__`` holds a minified JSON layout that
says, per state tensor, how its bytes in the blob are coded (raw, or sparsity pattern + codes
bit-packed at the chosen width + scales + zero points). No pickle anywhere.

The size model (`tensor_packed_bytes`, `archive_overhead_bytes`, `estimate_archive_bytes`) is
shared with the live preview (``core.estimate``) so the preview equals the file size on disk
within 1%: every byte the writer spends is one of the terms below, and the only estimated term
is the length of a relative-index stream (expected number of filler entries for uniformly random
positions at the tensor's density). The index visits positions in a fixed pseudo-random order
(`scramble_order`) so that real, structured masks behave like random ones.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.errors import ExportError, ModelLoadError, WorkbenchError
from core.limits import (
    MAX_EXAMPLE_BYTES,
    MAX_METADATA_JSON_BYTES,
    PACKED_RATIO,
    SAFETENSORS_ITEMSIZE,
    check_alloc,
    check_decoded,
    check_shape,
    escape_name,
    load_json,
    safetensors_header,
)
from core.model import LoadedModel
from core.outdir import atomic_write
from core.plan import (
    MAX_BITS,
    MAX_GROUP,
    MIN_BITS,
    MIN_GROUP,
    RECIPE_VERSION,
    CompressionPlan,
    LayerConfig,
)
from core.progress import CancelToken, ProgressFn, no_progress, scaled
from core.quantization import QuantizedTensor, dequantize, expand_params, n_quant_params

#: Value of ``__metadata__["format"]`` identifying our archives.
FORMAT_ID = "workbench.packed"
FORMAT_VERSION = "1"
#: Name of the single uint8 blob tensor in the safetensors file.
BLOB_NAME = "packed"
#: Relative-index widths the writer may choose from.
INDEX_BITS = tuple(range(1, 17))
#: Hex digits of the sha256 stored as a checksum (64 bits: detects corruption, not an attacker).
CHECKSUM_HEX = 16

#: safetensors dtype names for the torch dtypes we store raw, and their item sizes.
ST_DTYPES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


# ---------------------------------------------------------------------------------------
# size model
# ---------------------------------------------------------------------------------------
def _ceil_bytes(bits: int) -> int:
    return (bits + 7) // 8


def expected_index_entries(numel: int, nnz: int, index_bits: int) -> float:
    """Expected length of a relative-index stream for ``nnz`` random positions among ``numel``.

    Each kept weight stores the gap ``d`` (zeros skipped since the previous kept weight) in
    ``index_bits`` bits; the largest value ``M = 2**index_bits - 1`` is an escape meaning "skip
    M positions" (a filler entry without a code), so a gap costs ``floor(d / M)`` fillers plus
    one entry. For positions drawn independently with density ``p = nnz / numel`` the gap is
    geometric, ``P(d >= x) = (1 - p)**x``, hence

    ``E[floor(d / M)] = sum_{j>=1} P(d >= j M) = q**M / (1 - q**M)`` with ``q = 1 - p``,

    and the expected stream length is ``nnz * (1 + q**M / (1 - q**M)) = nnz / (1 - q**M)``.
    Zeros after the last kept weight need no entries (the shape is stored).
    """
    if nnz <= 0:
        return 0.0
    if nnz >= numel:
        return float(nnz)
    escape = 2**index_bits - 1
    # log1p/expm1 keep 1 - q**M accurate for tiny densities (where it tends to M * p).
    one_minus_qm = -math.expm1(escape * math.log1p(-nnz / numel))
    return nnz / one_minus_qm if one_minus_qm > 0.0 else float(numel)


def _relidx_estimate(numel: int, nnz: int) -> tuple[int, int, int]:
    """``(bytes, index_bits, entries)`` of the cheapest expected relative-index stream."""
    best: tuple[int, int, int] | None = None
    for k in INDEX_BITS:
        entries = round(expected_index_entries(numel, nnz, k))
        cost = _ceil_bytes(entries * k)
        if best is None or cost < best[0]:
            best = (cost, k, entries)
    assert best is not None
    return best


@dataclass(frozen=True)
class PatternChoice:
    """How a tensor's sparsity pattern is coded and what it costs.

    ``kind``: ``"d"`` dense (every position has a code/value; pruned ones hold the zero point /
    0.0), ``"b"`` bitmask (``numel`` bits), ``"c"`` row mask (one bit per output row, for whole
    pruned channels), ``"r"`` relative index (``entries`` gaps of ``index_bits`` bits).
    ``values``: how many codes/values follow the pattern.
    """

    kind: str
    pattern_bytes: int
    values: int
    index_bits: int = 0
    entries: int = 0


def _value_bytes(count: int, bits: int | None, itemsize: int) -> int:
    return count * itemsize if bits is None else _ceil_bytes(count * bits)


@functools.lru_cache(maxsize=1 << 16)
def choose_pattern(
    numel: int,
    nnz: int,
    bits: int | None,
    *,
    structured_rows: int | None = None,
    itemsize: int = 4,
) -> PatternChoice:
    """Cheapest expected coding of a sparsity pattern plus the values it implies.

    The writer makes the same choice from the real mask (real relative-index lengths); this is
    the estimate used when only ``numel`` and ``nnz`` are known.
    """
    if not 0 <= nnz <= numel:
        raise ValueError(f"nnz must be in 0..{numel}, got {nnz}")
    cands = [PatternChoice("d", 0, numel)]
    if nnz < numel:
        cands.append(PatternChoice("b", _ceil_bytes(numel), nnz))
        if structured_rows:
            cands.append(PatternChoice("c", _ceil_bytes(structured_rows), nnz))
        cost, k, entries = _relidx_estimate(numel, nnz)
        cands.append(PatternChoice("r", cost, nnz, k, entries))
    return min(cands, key=lambda c: c.pattern_bytes + _value_bytes(c.values, bits, itemsize))


def quant_param_bytes(bits: int | None, n_params: int, *, symmetric: bool = False) -> int:
    """Bytes of the scales (float32) and zero points (bit-packed at ``bits``, absent if symmetric)."""
    if bits is None:
        return 0
    zp = 0 if symmetric else _ceil_bytes(n_params * bits)
    return 4 * n_params + zp


def tensor_packed_bytes(
    numel: int,
    nnz: int,
    bits: int | None,
    n_params: int,
    *,
    structured_rows: int | None = None,
    symmetric: bool = False,
    itemsize: int = 4,
) -> int:
    """Bytes the archive's blob spends on one tensor's payload.

    Parameters
    ----------
    numel, nnz
        Elements of the tensor and how many are kept (not pruned).
    bits
        Code width 2..16, or ``None`` for unquantized values stored raw (``itemsize`` bytes
        each, float32 by default).
    n_params
        Number of (scale, zero point) pairs: 1 per-tensor, ``shape[0]`` per-channel. Ignored
        when ``bits`` is None.
    structured_rows
        Number of output rows when the mask prunes whole rows (channel methods); enables the
        one-bit-per-row pattern.
    symmetric
        Symmetric quantization stores no zero points (they are ``2**(bits-1)``).
    itemsize
        Bytes per raw value when ``bits`` is None.

    Returns
    -------
    int
        pattern + codes/values + scales + zero points, each part padded to a whole byte. The
        relative-index pattern uses the expected length for uniformly random positions (see
        `expected_index_entries`); everything else is exact.
    """
    choice = choose_pattern(numel, nnz, bits, structured_rows=structured_rows, itemsize=itemsize)
    return (
        choice.pattern_bytes
        + _value_bytes(choice.values, bits, itemsize)
        + quant_param_bytes(bits, n_params, symmetric=symmetric)
    )


# -- header ------------------------------------------------------------------------------
def _json(obj: object) -> str:
    """Minified JSON exactly as written into the archive (UTF-8, no ASCII escaping)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


#: Float dtypes a coded (pruned/quantized) tensor may have; index = ``flags >> 2``.
CODED_DTYPES = ("F32", "F64", "F16", "BF16")
#: Layout codes of the pattern kinds (relative index is written as ``[index_bits, entries]``).
PATTERN_CODES = {"d": 0, "b": 1, "c": 2}


def layout_entry(
    name: str,
    shape: Sequence[int],
    dtype: str = "F32",
    *,
    bits: int | None = None,
    symmetric: bool = False,
    per_channel: bool = False,
    pattern: PatternChoice | None = None,
    zstd_bytes: int | None = None,
    group_size: int | None = None,
) -> list:
    """One element of the metadata ``layout`` list (see docs/packed-format.md).

    Raw dense tensors: ``[name, shape]`` (float32) or ``[name, shape, dtype]``. Coded tensors:
    ``[name, shape, bits, flags, pattern]`` plus ``zstd_bytes`` when the codes are entropy
    coded; ``bits`` 0 means raw values (no quantization), ``flags`` = 1 (symmetric) +
    2 (per-channel) + 4 * index of the dtype in `CODED_DTYPES` + 16 * group size (0: no
    groups; see `core.quantization` for group-wise scales); ``pattern`` is 0 (dense),
    1 (bitmask), 2 (row mask) or ``[index_bits, entries]`` (relative index).
    """
    shape = [int(s) for s in shape]
    if bits is None and (pattern is None or pattern.kind == "d") and zstd_bytes is None:
        return [name, shape] if dtype == "F32" else [name, shape, dtype]
    if dtype not in CODED_DTYPES:
        raise ValueError(f"{name}: cannot prune/quantize a {dtype} tensor")
    pat: object
    if pattern is None:
        pat = 0
    elif pattern.kind == "r":
        pat = [pattern.index_bits, pattern.entries]
    else:
        pat = PATTERN_CODES[pattern.kind]
    flags = int(symmetric) + 2 * int(per_channel) + 4 * CODED_DTYPES.index(dtype)
    flags += 16 * int(group_size or 0)
    entry = [name, shape, bits or 0, flags, pat]
    if zstd_bytes is not None:
        entry.append(int(zstd_bytes))
    return entry


def build_header(metadata: Mapping[str, str], blob_bytes: int) -> bytes:
    """The safetensors header (8-byte length + JSON padded with spaces to a multiple of 8)."""
    if BLOB_NAME in metadata:
        raise ValueError(f"metadata key {BLOB_NAME!r} is reserved")
    header = {
        "__metadata__": dict(metadata),
        BLOB_NAME: {"dtype": "U8", "shape": [blob_bytes], "data_offsets": [0, blob_bytes]},
    }
    text = _json(header).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _typical_entry(name: str) -> list:
    """Layout entry with representative numbers, for when only the tensor's name is known."""
    return layout_entry(name, [1000, 100], bits=4, pattern=PatternChoice("r", 0, 0, 6, 10000))


def archive_overhead_bytes(
    tensor_names: Sequence[str],
    metadata: Mapping[str, str],
    *,
    layout: Sequence[list] | None = None,
    blob_bytes: int = 100_000,
) -> int:
    """Bytes of the archive outside the blob: the safetensors header with our metadata.

    Parameters
    ----------
    tensor_names
        Names of every stored state tensor (parameters and buffers).
    metadata
        The descriptive metadata the writer stores (see `archive_metadata`): recipe, source...
        The writer adds ``format``, ``version``, ``sha256`` and ``layout`` itself.
    layout
        Exact layout entries (`layout_entry`) when known; `estimate_archive_bytes` passes them.
        Without it each tensor's entry is sized with representative numbers (a few bytes off
        per tensor).
    blob_bytes
        Size of the blob (only its digit count matters).
    """
    entries = list(layout) if layout is not None else [_typical_entry(n) for n in tensor_names]
    full = finalize_metadata(metadata, entries, "0" * CHECKSUM_HEX)
    return len(build_header(full, blob_bytes))


def finalize_metadata(
    metadata: Mapping[str, str], layout: Sequence[list], checksum: str
) -> dict[str, str]:
    """Descriptive metadata plus the keys the format itself needs."""
    reserved = {"format", "version", "sha256", "layout"}
    clash = reserved & set(metadata)
    if clash:
        raise ValueError(f"metadata keys {sorted(clash)} are reserved")
    return {
        "format": FORMAT_ID,
        "version": FORMAT_VERSION,
        **{k: str(v) for k, v in metadata.items()},
        "sha256": checksum,
        "layout": _json(list(layout)),
    }


@dataclass(frozen=True)
class TensorSpec:
    """What the size model needs to know about one state tensor.

    ``bits`` None and ``nnz == numel`` is a raw dense tensor (biases, norms, buffers).
    ``dtype`` is the safetensors name of the stored values (``"F32"``...).
    """

    name: str
    shape: tuple[int, ...]
    nnz: int
    bits: int | None = None
    symmetric: bool = False
    per_channel: bool = False
    structured: bool = False
    dtype: str = "F32"
    group_size: int | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_params(self) -> int:
        if self.bits is None:
            return 0
        return n_quant_params(self.shape, per_channel=self.per_channel, group_size=self.group_size)


@dataclass(frozen=True)
class ArchiveEstimate:
    """Expected archive size: ``total = header + sum(tensors.values())``."""

    total: int
    header: int
    tensors: Mapping[str, int]


def _spec_itemsize(spec: TensorSpec) -> int:
    return ST_DTYPES.get(spec.dtype, 4)


def estimate_archive_bytes(
    specs: Sequence[TensorSpec], metadata: Mapping[str, str]
) -> ArchiveEstimate:
    """Expected size of the archive the writer produces for these tensors and metadata.

    Uses `tensor_packed_bytes` per tensor and builds the exact header JSON with the expected
    layout (only relative-index stream lengths are expectations).
    """
    sizes: dict[str, int] = {}
    layout = []
    for s in specs:
        rows = s.shape[0] if (s.structured and len(s.shape) >= 1) else None
        itemsize = _spec_itemsize(s)
        choice = choose_pattern(s.numel, s.nnz, s.bits, structured_rows=rows, itemsize=itemsize)
        sizes[s.name] = tensor_packed_bytes(
            s.numel,
            s.nnz,
            s.bits,
            s.n_params,
            structured_rows=rows,
            symmetric=s.symmetric,
            itemsize=itemsize,
        )
        layout.append(
            layout_entry(
                s.name,
                s.shape,
                s.dtype,
                bits=s.bits,
                symmetric=s.symmetric,
                per_channel=s.per_channel and s.bits is not None,
                pattern=choice,
                group_size=s.group_size if s.bits is not None else None,
            )
        )
    blob = sum(sizes.values())
    header = archive_overhead_bytes(
        [s.name for s in specs], metadata, layout=layout, blob_bytes=blob
    )
    return ArchiveEstimate(total=header + blob, header=header, tensors=sizes)


def _non_default(value: object, default: object) -> object:
    """``value`` with every key equal to ``default``'s dropped (recursively)."""
    if isinstance(value, dict) and isinstance(default, dict):
        out = {}
        for key, v in value.items():
            if key in default:
                reduced = _non_default(v, default[key])
                if reduced is not _SAME:
                    out[key] = reduced
            else:
                out[key] = v
        return out if out else _SAME
    return _SAME if value == default else value


_SAME = object()


def compact_recipe(plan: CompressionPlan) -> str:
    """Minified recipe JSON holding only the settings that differ from the defaults.

    ``CompressionPlan.from_json`` fills the rest with defaults, so this round-trips exactly
    while costing a third of the full recipe in a header that may be most of a tiny archive.
    Per-layer overrides are reduced against the default `LayerConfig` (not the plan's default),
    which is what ``from_dict`` fills them with.
    """
    full = plan.to_dict()
    base = CompressionPlan().to_dict()
    out: dict[str, object] = {"version": RECIPE_VERSION}
    for key in ("default", "recovery", "remove_channels"):
        reduced = _non_default(full[key], base[key])
        if reduced is not _SAME:
            out[key] = reduced
    layer_default = asdict(LayerConfig())
    layers = {}
    for name, cfg in full["layers"].items():
        reduced = _non_default(cfg, layer_default)
        layers[name] = {} if reduced is _SAME else reduced
    if layers:
        out["layers"] = layers
    return _json(out)


def archive_metadata(
    plan: CompressionPlan,
    *,
    source: str,
    source_format: str,
    architecture: str | None = None,
    removed_channels: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, str]:
    """The descriptive metadata the writer stores (pass it to `estimate_archive_bytes`).

    ``architecture`` is the demo architecture a weights-only file was opened with
    (``LoadedModel.metadata["architecture"]``), so the loader can rebuild a runnable model.
    """
    if source and not source.startswith("demo:"):
        # Absolute, so `workbench export` finds the original from any working directory.
        source = str(Path(source).absolute())
    meta = {"source": source, "source_format": source_format, "recipe": compact_recipe(plan)}
    if architecture:
        meta["architecture"] = architecture
    if removed_channels:
        meta["removed_channels"] = _json(
            {k: [int(i) for i in v] for k, v in removed_channels.items()}
        )
    return meta


# ---------------------------------------------------------------------------------------
# bit-level codecs (numpy; little-endian bit order: value i occupies bits [i*b, (i+1)*b))
# ---------------------------------------------------------------------------------------
_CHUNK = 1 << 20  # values per chunk: a multiple of 8, so every chunk starts on a byte


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Pack unsigned integers ``< 2**bits`` into a little-endian bit stream."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")
    values = np.asarray(values, dtype=np.uint32).ravel()
    if values.size and int(values.max()) >> bits:
        raise ValueError(f"a value does not fit in {bits} bits")
    shifts = np.arange(bits, dtype=np.uint32)
    out = []
    for start in range(0, values.size, _CHUNK):
        v = values[start : start + _CHUNK]
        bitmat = ((v[:, None] >> shifts) & 1).astype(np.uint8)
        out.append(np.packbits(bitmat.ravel(), bitorder="little").tobytes())
    return b"".join(out)


def unpack_bits(buf: bytes | np.ndarray, count: int, bits: int) -> np.ndarray:
    """Inverse of `pack_bits`: the first ``count`` values as int64."""
    raw = np.frombuffer(buf, dtype=np.uint8) if isinstance(buf, bytes) else buf
    if raw.size * 8 < count * bits:
        raise ValueError(f"stream holds {raw.size * 8} bits, {count * bits} needed")
    weights = (1 << np.arange(bits, dtype=np.int64)).astype(np.int64)
    out = np.empty(count, dtype=np.int64)
    step = _CHUNK * bits // 8
    for i, start in enumerate(range(0, count, _CHUNK)):
        n = min(_CHUNK, count - start)
        chunk = raw[i * step : i * step + _ceil_bytes(n * bits)]
        b = np.unpackbits(chunk, bitorder="little", count=n * bits).reshape(n, bits)
        out[start : start + n] = b.astype(np.int64) @ weights
    return out


def relidx_encode(positions: np.ndarray, index_bits: int) -> np.ndarray:
    """Relative-index entries for sorted ``positions`` (see `expected_index_entries`)."""
    escape = (1 << index_bits) - 1
    pos = np.asarray(positions, dtype=np.int64)
    if pos.size == 0:
        return np.zeros(0, dtype=np.int64)
    gaps = np.diff(pos, prepend=-1) - 1
    fillers = gaps // escape
    entries = np.full(int(fillers.sum()) + pos.size, escape, dtype=np.int64)
    entries[np.cumsum(fillers + 1) - 1] = gaps % escape
    return entries


def relidx_decode(entries: np.ndarray, index_bits: int) -> np.ndarray:
    """Positions coded by `relidx_encode`."""
    escape = (1 << index_bits) - 1
    e = np.asarray(entries, dtype=np.int64)
    real = e != escape
    advance = np.where(real, e + 1, escape)
    return (np.cumsum(advance) - 1)[real]


def relidx_cost(positions: np.ndarray) -> tuple[int, int, int]:
    """``(bytes, index_bits, entries)`` of the cheapest real relative-index stream."""
    pos = np.asarray(positions, dtype=np.int64)
    gaps = np.diff(pos, prepend=-1) - 1
    best: tuple[int, int, int] | None = None
    for k in INDEX_BITS:
        entries = int((gaps // ((1 << k) - 1)).sum()) + pos.size
        cost = _ceil_bytes(entries * k)
        if best is None or cost < best[0]:
            best = (cost, k, entries)
    assert best is not None
    return best


def _row_structured(mask: np.ndarray) -> bool:
    """True when every output row is entirely kept or entirely pruned."""
    if mask.ndim < 1 or mask.shape[0] == 0:
        return False
    rows = mask.reshape(mask.shape[0], -1)
    return bool((rows.all(axis=1) | ~rows.any(axis=1)).all())


def actual_pattern(
    mask: np.ndarray | None,
    bits: int | None,
    itemsize: int,
    scrambled: np.ndarray | None = None,
) -> PatternChoice:
    """The cheapest real coding of ``mask`` (None = dense) with the same rules as `choose_pattern`.

    ``scrambled``: `scrambled_positions(mask)` when the caller already has it.
    """
    if mask is None:
        return PatternChoice("d", 0, 0)
    numel = int(mask.size)
    nnz = int(mask.sum())
    cands = [PatternChoice("d", 0, numel)]
    if nnz < numel:
        cands.append(PatternChoice("b", _ceil_bytes(numel), nnz))
        if _row_structured(mask):
            cands.append(PatternChoice("c", _ceil_bytes(mask.shape[0]), nnz))
        if scrambled is None:
            scrambled = scrambled_positions(mask)
        cost, k, entries = relidx_cost(scrambled)
        cands.append(PatternChoice("r", cost, nnz, k, entries))
    return min(cands, key=lambda c: c.pattern_bytes + _value_bytes(c.values, bits, itemsize))


_MIX = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


def scramble_order(numel: int) -> np.ndarray:
    """The fixed pseudo-random order in which relative indices visit a tensor's positions.

    ``order[i]`` is the flat position visited ``i``-th: positions sorted by the splitmix64
    finalizer of their index (a bijection on 64-bit integers, so there are no ties). Pruning
    leaves structure (dead rows, dead input columns) whose gaps are far from geometric; in this
    order any mask looks like a uniformly random subset, so the index length is what
    `expected_index_entries` predicts whatever the mask's structure.
    """
    with np.errstate(over="ignore"):
        z = np.arange(numel, dtype=np.uint64) + _MIX[0]
        z = (z ^ (z >> np.uint64(30))) * _MIX[1]
        z = (z ^ (z >> np.uint64(27))) * _MIX[2]
        z ^= z >> np.uint64(31)
    # The keys are distinct, so any sort gives the same order; quicksort is the fastest.
    return np.argsort(z, kind="quicksort")


def scrambled_positions(mask: np.ndarray) -> np.ndarray:
    """Sorted ranks, in `scramble_order`, of the kept positions of ``mask``."""
    order = scramble_order(int(mask.size))
    return np.flatnonzero(mask.ravel()[order])


def encode_pattern(
    mask: np.ndarray, choice: PatternChoice, scrambled: np.ndarray | None = None
) -> bytes:
    """Bytes of ``mask`` coded as ``choice`` (see docs/packed-format.md)."""
    flat = mask.ravel()
    if choice.kind == "d":
        return b""
    if choice.kind == "b":
        return np.packbits(flat, bitorder="little").tobytes()
    if choice.kind == "c":
        rows = mask.reshape(mask.shape[0], -1)[:, 0] if mask.size else np.zeros(0, bool)
        return np.packbits(rows, bitorder="little").tobytes()
    if scrambled is None:
        scrambled = scrambled_positions(mask)
    entries = relidx_encode(scrambled, choice.index_bits)
    if entries.size != choice.entries:
        raise AssertionError("relative index length changed between sizing and encoding")
    return pack_bits(entries, choice.index_bits)


def pattern_nbytes(kind: object, shape: Sequence[int]) -> int:
    """Bytes of a stored pattern from its layout code (relative index: ``[bits, entries]``)."""
    numel = math.prod(shape)
    if isinstance(kind, list):
        return _ceil_bytes(int(kind[0]) * int(kind[1]))
    if kind == 0:
        return 0
    if kind == 1:
        return _ceil_bytes(numel)
    if kind == 2:
        return _ceil_bytes(shape[0] if shape else 0)
    raise ValueError(f"unknown pattern code {kind!r}")


def decode_pattern(kind: object, shape: Sequence[int], buf: bytes) -> np.ndarray | None:
    """Bool keep-mask of ``shape`` (None for dense)."""
    numel = math.prod(shape)
    if kind == 0:
        return None
    raw = np.frombuffer(buf, dtype=np.uint8)
    # np.unpackbits pads a short buffer with zeros: insist that every bit is really there.
    needed = numel if kind == 1 else (shape[0] if kind == 2 and len(shape) else None)
    if kind == 2 and needed is None:
        raise ValueError("a row mask needs a tensor with at least one dimension")
    if needed is not None and raw.size * 8 < needed:
        raise ValueError(f"the pattern holds {raw.size * 8} bits, {needed} needed")
    if kind == 1:
        return np.unpackbits(raw, bitorder="little", count=numel).astype(bool).reshape(shape)
    if kind == 2:
        rows = np.unpackbits(raw, bitorder="little", count=shape[0]).astype(bool)
        return np.repeat(rows, numel // shape[0] if shape[0] else 0).reshape(shape)
    k, entries = int(kind[0]), int(kind[1])
    pos = relidx_decode(unpack_bits(raw, entries, k), k)
    if pos.size and (pos[-1] >= numel or pos[0] < 0):
        raise ValueError("relative index points outside the tensor")
    mask = np.zeros(numel, dtype=bool)
    mask[scramble_order(numel)[pos]] = True
    return mask.reshape(shape)


# ---------------------------------------------------------------------------------------
# writer
# ---------------------------------------------------------------------------------------
#: torch dtype <-> safetensors dtype name (the size model and the statistics key on these).
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_ST_TO_TORCH = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def _st_dtype(t: torch.Tensor, name: str) -> str:
    try:
        return SAFETENSORS_DTYPES[t.dtype]
    except KeyError:
        raise ExportError(
            f"tensor {name!r} has dtype {t.dtype}, which the packed format cannot store",
            hint="export a dense format (state_dict, onnx) instead",
        ) from None


def _raw_bytes(t: torch.Tensor) -> bytes:
    """Little-endian bytes of a contiguous tensor (any dtype, bfloat16 included)."""
    flat = t.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def _from_raw(buf: bytes, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    if not buf:
        return torch.zeros(tuple(shape), dtype=dtype)
    return torch.frombuffer(bytearray(buf), dtype=dtype).reshape(tuple(shape)).clone()


def _zstd_codes(codes: np.ndarray, bits: int) -> bytes:
    """Codes one per byte (two above 8 bits) compressed with zstd: its entropy stage sees symbols."""
    import zstandard

    width = np.uint8 if bits <= 8 else np.dtype("<u2")
    return zstandard.ZstdCompressor(level=19).compress(codes.astype(width).tobytes())


def _unzstd_codes(buf: bytes, count: int, bits: int) -> np.ndarray:
    """Inverse of `_zstd_codes`; never produces more than the ``count`` codes expected.

    ``ZstdDecompressor.decompress`` allocates whatever a frame declares (``max_output_size``
    only applies to frames without a declared size), so a frame declaring another size is
    refused from its header and the rest is streamed with a cap of one byte past the end.
    """
    import io

    import zstandard

    width = np.uint8 if bits <= 8 else np.dtype("<u2")
    size = count * np.dtype(width).itemsize
    try:
        declared = zstandard.get_frame_parameters(buf).content_size
        if declared not in (size, zstandard.CONTENTSIZE_UNKNOWN):
            raise ValueError(f"entropy-coded codes declare {declared} bytes, {size} expected")
        parts = []
        got = 0
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(buf)) as reader:
            while got <= size:
                chunk = reader.read(min(size + 1 - got, 1 << 24))
                if not chunk:
                    break
                parts.append(chunk)
                got += len(chunk)
    except zstandard.ZstdError as exc:
        raise ValueError(f"entropy-coded codes are corrupt ({exc})") from None
    if got != size:
        raise ValueError("entropy-coded codes have the wrong length")
    raw = b"".join(parts)
    return np.frombuffer(raw, dtype=width).astype(np.int64)


def _entropy_bits(values: np.ndarray) -> float:
    """Empirical (zero-order) entropy of ``values`` times their count, in bits."""
    if values.size == 0:
        return 0.0
    _, counts = np.unique(values, return_counts=True)
    p = counts / values.size
    return float(-(counts * np.log2(p)).sum())


def _binary_entropy_bits(numel: int, nnz: int) -> float:
    if nnz in (0, numel):
        return 0.0
    p = nnz / numel
    return numel * float(-(p * math.log2(p) + (1 - p) * math.log2(1 - p)))


def _pattern_entropy_bits(mask: np.ndarray | None, choice: PatternChoice, coded: bytes) -> float:
    """Zero-order entropy of the keep mask (per row for row masks), capped by what was stored."""
    if mask is None or choice.kind == "d":
        return 0.0
    if choice.kind == "c":
        rows = mask.reshape(mask.shape[0], -1)[:, 0]
        bound = _binary_entropy_bits(int(rows.size), int(rows.sum()))
    else:
        bound = _binary_entropy_bits(int(mask.size), int(mask.sum()))
    return min(bound, 8.0 * len(coded))


@dataclass(frozen=True)
class TensorRecord:
    """How one tensor was stored: bytes in the blob, the coding, and its entropy bound."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    bits: int | None
    pattern: str
    nnz: int
    bytes: int
    entropy_bytes: int
    zstd: bool = False


@dataclass(frozen=True)
class PackedInfo:
    """What `write_packed` wrote.

    ``bytes_on_disk`` is the file size; ``estimate_bytes`` what `estimate_archive_bytes` predicts
    for the same tensors without entropy coding; ``entropy_bound_bytes`` the zero-order entropy
    of codes and patterns plus everything stored raw (header included).
    """

    path: Path
    bytes_on_disk: int
    header_bytes: int
    estimate_bytes: int
    entropy_bound_bytes: int
    entropy_coded: bool
    tensors: tuple[TensorRecord, ...]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def _mask_np(mask: torch.Tensor | None, shape: Sequence[int]) -> np.ndarray | None:
    if mask is None:
        return None
    m = mask.detach().to(torch.bool).cpu()
    if tuple(m.shape) != tuple(shape):
        raise ExportError(
            f"mask of shape {tuple(m.shape)} does not match tensor of shape {tuple(shape)}",
            hint="the compression result is inconsistent; re-run the compression",
        )
    return m.numpy()


def _encode_tensor(
    name: str,
    value: torch.Tensor,
    qt: QuantizedTensor | None,
    mask: torch.Tensor | None,
    *,
    entropy: bool,
) -> tuple[list, list[bytes], TensorRecord, TensorSpec]:
    """Layout entry, byte parts, record and size-model spec of one state tensor."""
    shape = tuple(int(s) for s in value.shape)
    dtype = _st_dtype(value, name)
    numel = value.numel()
    floating = value.is_floating_point()
    if qt is None and (mask is None or not floating):
        raw = _raw_bytes(value)
        rec = TensorRecord(name, shape, dtype, None, "raw", numel, len(raw), len(raw))
        return (
            layout_entry(name, shape, dtype),
            [raw],
            rec,
            TensorSpec(name, shape, numel, dtype=dtype),
        )
    if dtype not in CODED_DTYPES:
        raise ExportError(f"tensor {name!r} of dtype {dtype} cannot be pruned or quantized")
    m = _mask_np(qt.mask if (qt is not None and qt.mask is not None) else mask, shape)
    nnz = numel if m is None else int(m.sum())
    # the scrambled positions are needed to size and to write the index: compute them once
    spos = scrambled_positions(m) if (m is not None and 0 < nnz < numel) else None
    if qt is None:
        itemsize = value.element_size()
        choice = actual_pattern(m, None, itemsize, spos)
        flat = value.detach().contiguous().reshape(-1)
        kept = flat if choice.kind == "d" else flat[torch.from_numpy(m.ravel())]
        parts = [encode_pattern(m, choice, spos) if m is not None else b"", _raw_bytes(kept)]
        values_raw = kept.detach().contiguous().view(torch.uint8).numpy() if kept.numel() else None
        ent = _entropy_bits(values_raw) if values_raw is not None else 0.0
        entry = layout_entry(name, shape, dtype, pattern=choice)
        spec = TensorSpec(name, shape, nnz, dtype=dtype, structured=_mask_structured(m))
        pat_ent = _pattern_entropy_bits(m, choice, parts[0])
        rec = TensorRecord(
            name,
            shape,
            dtype,
            None,
            choice.kind,
            nnz,
            sum(map(len, parts)),
            math.ceil((ent + pat_ent) / 8),
        )
        return entry, parts, rec, spec
    # quantized: codes of the kept positions, pruned positions forced to the zero point so a
    # dense coding dequantizes them to exactly 0.0 as the mask would.
    if tuple(qt.codes.shape) != shape:
        raise ExportError(
            f"tensor {name!r}: codes of shape {tuple(qt.codes.shape)} for a weight of shape {shape}",
            hint="the compression result is inconsistent; re-run the compression",
        )
    bits = int(qt.bits)
    n_params = int(qt.scale.numel())
    codes = qt.codes.detach().to(torch.int64).cpu().numpy()
    zp = qt.zero_point.detach().to(torch.int64).cpu().numpy().reshape(-1)
    group = qt.group_size
    if (qt.per_channel or group) and n_params != n_quant_params(
        shape, per_channel=qt.per_channel, group_size=group
    ):
        raise ExportError(f"tensor {name!r}: {n_params} scales do not fit its shape {shape}")
    if qt.symmetric and not (zp == 2 ** (bits - 1)).all():
        raise ExportError(f"tensor {name!r}: symmetric codes need zero point {2 ** (bits - 1)}")
    if m is not None:
        zfull = expand_params(torch.from_numpy(zp), torch.Size(shape), group).numpy()
        codes = np.where(m, codes, np.broadcast_to(zfull, shape))
    choice = actual_pattern(m, bits, 0, spos)
    flat_codes = codes.reshape(-1) if choice.kind == "d" else codes.reshape(-1)[m.ravel()]
    packed_codes = pack_bits(flat_codes, bits)
    zbytes = None
    if entropy:
        z = _zstd_codes(flat_codes, bits)
        if len(z) < len(packed_codes):
            packed_codes, zbytes = z, len(z)
    parts = [
        encode_pattern(m, choice, spos) if m is not None else b"",
        packed_codes,
        qt.scale.detach().to(torch.float32).contiguous().numpy().astype("<f4").tobytes(),
        b"" if qt.symmetric else pack_bits(zp, bits),
    ]
    entry = layout_entry(
        name,
        shape,
        dtype,
        bits=bits,
        symmetric=qt.symmetric,
        per_channel=qt.per_channel,
        pattern=choice,
        zstd_bytes=zbytes,
        group_size=group,
    )
    spec = TensorSpec(
        name,
        shape,
        nnz,
        bits=bits,
        symmetric=qt.symmetric,
        per_channel=qt.per_channel,
        structured=_mask_structured(m),
        dtype=dtype,
        group_size=group,
    )
    pat_ent = _pattern_entropy_bits(m, choice, parts[0])
    ent_bytes = math.ceil((_entropy_bits(flat_codes) + pat_ent) / 8) + len(parts[2]) + len(parts[3])
    rec = TensorRecord(
        name,
        shape,
        dtype,
        bits,
        choice.kind,
        nnz,
        sum(map(len, parts)),
        ent_bytes,
        zbytes is not None,
    )
    return entry, parts, rec, spec


def _mask_structured(m: np.ndarray | None) -> bool:
    return m is not None and _row_structured(m)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by state-dict name (detached, on CPU)."""
    return {
        k: v.detach().cpu() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)
    }


def _check_restores(name: str, value: torch.Tensor, qt: QuantizedTensor | None, mask) -> None:
    """The archive restores ``dequantize(codes)``; refuse to write if that is not the model's weight."""
    if qt is not None:
        restored = dequantize(qt).to(value.dtype)
    elif mask is not None and value.is_floating_point():
        restored = torch.where(mask.to(torch.bool), value, torch.zeros_like(value))
    else:
        return
    if not torch.equal(restored, value):
        diff = (restored.to(torch.float64) - value.to(torch.float64)).abs().max().item()
        raise ExportError(
            f"tensor {name!r}: the compressed model's weights differ from its codes/mask "
            f"(max abs difference {diff:.3g}), so the archive would not restore this model",
            hint="re-run the compression (codes must be re-quantized after fine-tuning)",
        )


def pack_result(
    result: Any,
    *,
    entropy: bool = False,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
) -> tuple[bytes, dict[str, str], tuple[TensorRecord, ...], ArchiveEstimate]:
    """Encode a compression result: ``(blob, metadata, records, estimate)``."""
    state = _state(result.compressed.module)
    quantized = dict(getattr(result, "quantized", {}) or {})
    masks = dict(getattr(result, "masks", {}) or {})
    unknown = sorted((set(quantized) | set(masks)) - set(state))
    if unknown:
        raise ExportError(
            f"codes/masks for {unknown[0]!r}, which is not a tensor of the compressed model",
            hint="the compression result is inconsistent; re-run the compression",
        )
    layout, parts, records, specs = [], [], [], []
    for i, (name, value) in enumerate(state.items()):
        if cancel is not None:
            cancel.check()
        progress(i / max(len(state), 1), f"packing {name}")
        qt, mask = quantized.get(name), masks.get(name)
        _check_restores(name, value, qt, mask)
        entry, p, rec, spec = _encode_tensor(name, value, qt, mask, entropy=entropy)
        layout.append(entry)
        parts.extend(p)
        records.append(rec)
        specs.append(spec)
    blob = b"".join(parts)
    original = result.original
    meta = archive_metadata(
        result.plan,
        source=str(original.source),
        source_format=str(original.format),
        architecture=original.metadata.get("architecture"),
        removed_channels=getattr(result, "removed_channels", None),
    )
    if getattr(result, "removed_channels", None) and original.example_input is not None:
        ex = original.example_input
        meta["input"] = _json([list(ex.shape), str(ex.dtype).removeprefix("torch.")])
    estimate = estimate_archive_bytes(specs, meta)
    checksum = hashlib.sha256(blob).hexdigest()[:CHECKSUM_HEX]
    full = finalize_metadata(meta, layout, checksum)
    return blob, full, tuple(records), estimate


def write_packed(
    result: Any,
    path: str | Path,
    *,
    force: bool = False,
    entropy: bool = False,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
) -> PackedInfo:
    """Write ``result`` (a `core.engine.CompressionResult`) as a packed archive, atomically.

    Parameters
    ----------
    result
        Needs ``original``, ``compressed``, ``plan``, ``masks``, ``quantized`` and
        ``removed_channels`` as in the engine's ``CompressionResult``.
    path
        Target file (``model.packed.safetensors`` by convention).
    force
        Replace an existing file; otherwise `ExportError`.
    entropy
        Entropy-code the codes with zstd where that is smaller (the size model does not cover
        this option; ``estimate_bytes`` stays the estimate without it).

    Raises
    ------
    ExportError
        The file exists (without ``force``), the result is inconsistent, or writing failed.
        Nothing partial is left behind.
    """
    target = Path(path)
    blob, meta, records, estimate = pack_result(
        result, entropy=entropy, progress=scaled(progress, 0.0, 0.95), cancel=cancel
    )
    header = build_header(meta, len(blob))
    atomic_write(target, [header, blob], force=force, cancel=cancel)
    size = target.stat().st_size
    bound = len(header) + sum(r.entropy_bytes for r in records)
    return PackedInfo(
        path=target,
        bytes_on_disk=size,
        header_bytes=len(header),
        estimate_bytes=estimate.total,
        entropy_bound_bytes=bound,
        entropy_coded=any(r.zstd for r in records),
        tensors=records,
    )


# ---------------------------------------------------------------------------------------
# reader / loader
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PackedArchive:
    """A decoded archive: every state tensor restored, plus codes and masks of coded ones."""

    path: Path
    metadata: Mapping[str, str]
    tensors: Mapping[str, torch.Tensor]
    quantized: Mapping[str, QuantizedTensor]
    masks: Mapping[str, torch.Tensor]

    @property
    def plan(self) -> CompressionPlan:
        return CompressionPlan.from_json(self.metadata["recipe"], path=self.path)

    @property
    def removed_channels(self) -> dict[str, list[int]]:
        return _removed_channels(self.metadata, self.path)


class _Cursor:
    def __init__(self, blob: np.ndarray, path: Path):
        self.blob, self.pos, self.path = blob, 0, path

    @property
    def left(self) -> int:
        return int(self.blob.size) - self.pos

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.blob.size:
            raise ModelLoadError(
                "packed archive is truncated or its layout is corrupt",
                path=self.path,
                hint="re-export the model",
            )
        out = self.blob[self.pos : self.pos + n].tobytes()
        self.pos += n
        return out


def _int_field(value: object, lo: int, hi: int, what: str) -> int:
    """``value`` when it is an int (not a bool) in ``lo..hi``, else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{what} must be an integer in {lo}..{hi}, got {str(value)[:40]}")
    return value


def _check_layout(layout: object, blob_size: int, file_bytes: int, path: Path) -> None:
    """Validate every layout entry before anything is decoded.

    Refuses malformed entries (types, ranges, unknown pattern codes), duplicate tensor names,
    layouts whose fixed-size parts alone need more bytes than the blob holds, and layouts whose
    decoded tensors (values, codes and masks) would exceed `core.limits.PACKED_RATIO` times the
    file or the available memory. Raises ``ValueError`` (turned into `ModelLoadError`) or
    `ModelLoadError`.
    """
    if not isinstance(layout, list):
        raise ValueError("the layout is not a list")
    seen: set[str] = set()
    fixed = 0  # bytes every entry needs whatever its mask holds
    decoded = 0  # bytes of the decoded tensors, codes and masks
    for i, entry in enumerate(layout):
        if not isinstance(entry, list) or len(entry) not in (2, 3, 5, 6):
            raise ValueError(f"layout entry {i} is not a list of 2, 3, 5 or 6 fields")
        name = entry[0]
        if not isinstance(name, str) or not name:
            raise ValueError(f"layout entry {i} has no tensor name")
        shown = escape_name(name)[:80]
        if name in seen:
            raise ModelLoadError(
                f"tensor {shown!r} appears twice in the layout",
                path=path,
                hint="the archive is corrupt or was tampered with; re-export the model",
            )
        seen.add(name)
        shape = check_shape(entry[1], f"tensor {shown!r}", path)
        numel = math.prod(shape)
        if len(entry) <= 3:
            dtype = entry[2] if len(entry) == 3 else "F32"
            if not isinstance(dtype, str) or dtype not in _ST_TO_TORCH:
                raise ValueError(f"tensor {shown!r} has unknown dtype {str(dtype)[:20]!r}")
            fixed += numel * ST_DTYPES[dtype]
            decoded += numel * ST_DTYPES[dtype]
            continue
        bits = entry[2]
        if bits != 0:
            bits = _int_field(bits, MIN_BITS, MAX_BITS, f"tensor {shown!r}: bits")
        flags = _int_field(entry[3], 0, 16 * (MAX_GROUP + 1) - 1, f"tensor {shown!r}: flags")
        group = _layout_group(flags, bits, shown)
        pat = entry[4]
        if isinstance(pat, list):
            if len(pat) != 2:
                raise ValueError(f"tensor {shown!r}: a relative index is [index_bits, entries]")
            _int_field(pat[0], INDEX_BITS[0], INDEX_BITS[-1], f"tensor {shown!r}: index bits")
            _int_field(pat[1], 0, 8 * blob_size, f"tensor {shown!r}: index entries")
        elif isinstance(pat, bool) or pat not in PATTERN_CODES.values():
            raise ValueError(f"tensor {shown!r} has unknown pattern code {str(pat)[:20]!r}")
        if pat == PATTERN_CODES["c"] and not shape:
            raise ValueError(f"tensor {shown!r}: a row mask needs at least one dimension")
        itemsize = ST_DTYPES[CODED_DTYPES[(flags >> 2) & 3]]
        fixed += pattern_nbytes(pat, shape)
        decoded += numel * itemsize + (0 if pat == 0 else numel)
        if len(entry) == 6:
            if bits == 0:
                raise ValueError(f"tensor {shown!r}: only codes can be entropy coded")
            fixed += _int_field(entry[5], 0, blob_size, f"tensor {shown!r}: zstd bytes")
        if bits:
            n_params = n_quant_params(shape, per_channel=bool(flags & 2), group_size=group)
            fixed += 4 * n_params + (0 if flags & 1 else _ceil_bytes(n_params * bits))
            decoded += 4 * numel  # int32 codes kept beside the dequantized values
            if pat == 0 and len(entry) == 5:
                fixed += _ceil_bytes(numel * bits)
        elif pat == 0:
            fixed += numel * itemsize
    if fixed > blob_size:
        raise ModelLoadError(
            f"the layout needs at least {fixed:,} bytes but the blob holds {blob_size:,}",
            path=path,
            hint="the archive is truncated or corrupt; re-export the model",
        )
    check_decoded(decoded, file_bytes, ratio=PACKED_RATIO, what="the archive's tensors", path=path)


def _layout_group(flags: int, bits: int, shown: str) -> int | None:
    """The group size a layout entry's flags carry (``flags >> 4``), checked."""
    group = flags >> 4
    if not group:
        return None
    if bits == 0 or not flags & 2 or group < MIN_GROUP:
        raise ValueError(
            f"tensor {shown!r}: group size {group} needs codes, per-channel scales and "
            f"at least {MIN_GROUP} inputs per group"
        )
    return group


def _decode_entry(
    entry: list, cur: _Cursor
) -> tuple[str, torch.Tensor, QuantizedTensor | None, torch.Tensor | None]:
    """One tensor of a layout already checked by `_check_layout`."""
    name, shape = str(entry[0]), tuple(int(s) for s in entry[1])
    shown = f"tensor {escape_name(name)[:80]!r}"
    numel = math.prod(shape)
    if len(entry) <= 3:
        dtype = _ST_TO_TORCH[entry[2] if len(entry) == 3 else "F32"]
        size = numel * torch.empty(0, dtype=dtype).element_size()
        return name, _from_raw(cur.take(size), dtype, shape), None, None
    bits, flags, pat = int(entry[2]), int(entry[3]), entry[4]
    zlen = int(entry[5]) if len(entry) > 5 else None
    dtype = _ST_TO_TORCH[CODED_DTYPES[(flags >> 2) & 3]]
    symmetric, per_channel = bool(flags & 1), bool(flags & 2)
    group = (flags >> 4) or None
    mask_np = decode_pattern(pat, shape, cur.take(pattern_nbytes(pat, shape)))
    count = numel if mask_np is None else int(mask_np.sum())
    mask = None if mask_np is None else torch.from_numpy(mask_np.copy())
    if bits == 0:
        itemsize = torch.empty(0, dtype=dtype).element_size()
        check_alloc(count, itemsize, cur.left, shown, cur.path)
        kept = _from_raw(cur.take(count * itemsize), dtype, (count,))
        if mask is None:
            return name, kept.reshape(shape), None, None
        value = torch.zeros(shape, dtype=dtype)
        value[mask] = kept
        return name, value, None, mask
    if zlen is not None:
        values = _unzstd_codes(cur.take(zlen), count, bits)
        if values.size and int(values.max()) >> bits:
            raise ValueError(f"{shown}: an entropy-coded code does not fit in {bits} bits")
    else:
        # Packed codes: the bits must be in the blob before the int64 array is allocated.
        if _ceil_bytes(count * bits) > cur.left:
            check_alloc(count, 1, cur.left * 8 // bits, shown, cur.path)
        values = unpack_bits(cur.take(_ceil_bytes(count * bits)), count, bits)
    n_params = n_quant_params(shape, per_channel=per_channel, group_size=group)
    scale = torch.from_numpy(np.frombuffer(cur.take(4 * n_params), dtype="<f4").astype(np.float32))
    if symmetric:
        zp = np.full(n_params, 2 ** (bits - 1), dtype=np.int64)
    else:
        zp = unpack_bits(cur.take(_ceil_bytes(n_params * bits)), n_params, bits)
    zfull = expand_params(torch.from_numpy(zp), torch.Size(shape), group).numpy()
    codes = np.array(np.broadcast_to(zfull, shape), dtype=np.int64)
    if mask_np is None:
        codes = values.reshape(shape)
    else:
        codes[mask_np] = values
    qt = QuantizedTensor(
        codes=torch.from_numpy(np.ascontiguousarray(codes)).to(torch.int32),
        scale=scale,
        zero_point=torch.from_numpy(zp).to(torch.int32),
        bits=bits,
        symmetric=symmetric,
        per_channel=per_channel,
        mask=mask,
        group_size=group,
    )
    return name, dequantize(qt).to(dtype), qt, mask


def _removed_channels(meta: Mapping[str, str], path: Path) -> dict[str, list[int]]:
    """The archive's ``removed_channels`` map (layer -> kept output channels), validated."""
    raw = meta.get("removed_channels")
    if not raw:
        return {}
    data = load_json(
        raw,
        what="the archive's removed_channels",
        path=path,
        max_bytes=MAX_METADATA_JSON_BYTES,
        unique_keys=True,
        hint="the archive is corrupt; re-export the model",
    )

    def bad(why: str) -> ModelLoadError:
        return ModelLoadError(
            f"the archive's removed_channels {why}",
            path=path,
            hint="the archive is corrupt; re-export the model",
        )

    if not isinstance(data, dict):
        raise bad("is not a map of layer names to channel lists")
    out: dict[str, list[int]] = {}
    for layer, keep in data.items():
        shown = escape_name(layer)[:80]
        if not isinstance(keep, list):
            raise bad(f"entry {shown!r} is not a list of channel indices")
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in keep):
            raise bad(f"entry {shown!r} holds something other than channel indices >= 0")
        if len(set(keep)) != len(keep):
            raise bad(f"entry {shown!r} lists a channel twice")
        out[layer] = [int(i) for i in keep]
    return out


def read_packed(path: str | Path) -> PackedArchive:
    """Decode a packed archive with safetensors (no pickle): tensors, codes, masks, metadata.

    Every size the archive declares is checked before it is used (`_check_layout`,
    `core.limits`): a corrupt or hostile archive fails with one `ModelLoadError` line, within
    bounded time and memory.

    Raises
    ------
    ModelLoadError
        Missing file, not a safetensors file, not our format, checksum mismatch, corrupt
        layout, or declared sizes beyond the limits of `core.limits`.
    """
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_file():
        raise ModelLoadError("packed archive not found", path=p, hint="check the path")
    entries, _ = safetensors_header(p, supported=SAFETENSORS_ITEMSIZE)
    if set(entries) - {BLOB_NAME} or entries.get(BLOB_NAME, {}).get("dtype", "U8") != "U8":
        raise ModelLoadError(
            f"not a workbench packed archive (it holds tensors other than {BLOB_NAME!r})",
            path=p,
            hint="open it as a model instead, or export it again with --format packed",
        )
    try:
        with safe_open(str(p), framework="np") as fh:
            meta = dict(fh.metadata() or {})
            names = list(fh.keys())
            blob = fh.get_tensor(BLOB_NAME) if BLOB_NAME in names else None
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(
            f"not a readable safetensors file ({exc})", path=p, hint="re-export the model"
        ) from None
    if meta.get("format") != FORMAT_ID or blob is None:
        raise ModelLoadError(
            "not a workbench packed archive (no 'format: workbench.packed' metadata)",
            path=p,
            hint="open it as a model instead, or export it again with --format packed",
        )
    if meta.get("version") != FORMAT_VERSION:
        raise ModelLoadError(
            f"packed format version {meta.get('version')!r} is not supported",
            path=p,
            hint=f"this workbench reads version {FORMAT_VERSION}",
        )
    blob = np.ascontiguousarray(blob, dtype=np.uint8).reshape(-1)
    if hashlib.sha256(blob.tobytes()).hexdigest()[:CHECKSUM_HEX] != meta.get("sha256"):
        raise ModelLoadError(
            "checksum mismatch: the archive is corrupt", path=p, hint="re-export the model"
        )
    layout = load_json(
        meta.get("layout", ""),
        what="the archive's layout",
        path=p,
        max_bytes=MAX_METADATA_JSON_BYTES,
        hint="the archive is corrupt; re-export the model",
    )
    _removed_channels(meta, p)
    try:
        _check_layout(layout, int(blob.size), p.stat().st_size, p)
        cur = _Cursor(blob, p)
        tensors, quantized, masks = {}, {}, {}
        for entry in layout:
            name, value, qt, mask = _decode_entry(entry, cur)
            tensors[name] = value
            if qt is not None:
                quantized[name] = qt
            if mask is not None:
                masks[name] = mask
    except ModelLoadError:
        raise
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        raise ModelLoadError(
            f"corrupt layout ({type(exc).__name__}: {str(exc)[:160]})",
            path=p,
            hint="re-export the model",
        ) from None
    if cur.pos != blob.size:
        raise ModelLoadError(
            f"{blob.size - cur.pos} bytes of the blob are not described by the layout", path=p
        )
    return PackedArchive(path=p, metadata=meta, tensors=tensors, quantized=quantized, masks=masks)


def _recorded_input(archive: PackedArchive) -> torch.Tensor:
    """The zero example input ``[shape, dtype]`` recorded in the archive, validated."""
    hint = "the archive is corrupt; pass --base with the original model instead"
    spec = load_json(
        archive.metadata["input"],
        what="the archive's example input",
        path=archive.path,
        max_bytes=MAX_METADATA_JSON_BYTES,
        hint=hint,
    )
    ok = isinstance(spec, list) and len(spec) == 2 and isinstance(spec[1], str)
    dtype = getattr(torch, spec[1], None) if ok else None
    if not isinstance(dtype, torch.dtype):
        raise ModelLoadError(
            "the archive's example input is not [shape, dtype name]", path=archive.path, hint=hint
        )
    shape = check_shape(spec[0], "the archive's example input", archive.path)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    check_alloc(math.prod(shape), itemsize, MAX_EXAMPLE_BYTES, "the example input", archive.path)
    return torch.zeros(shape, dtype=dtype)


def reapply_removal(loaded: LoadedModel, archive: PackedArchive) -> None:
    """Re-shape the freshly loaded base like the compressed model (channels physically removed)."""
    from core.pruning import remove_channels_

    kept = archive.removed_channels
    if loaded.format not in ("demo", "eager"):
        raise ModelLoadError(
            f"the archive's channels were physically removed, which needs an eager model; "
            f"the base is {loaded.format}",
            path=archive.path,
            hint="pass --base with the original eager model (.pt pickle with --trust, or demo)",
        )
    example = loaded.example_input
    if example is None and "input" in archive.metadata:
        example = _recorded_input(archive)
    if example is None:
        raise ModelLoadError("no example input to trace the channel removal", path=archive.path)
    modules = dict(loaded.module.named_modules())
    pruned = {}
    for layer, keep in kept.items():
        mod = modules.get(layer)
        if mod is None or getattr(mod, "weight", None) is None:
            raise ModelLoadError(
                f"layer {layer!r} of the archive is not in the base model",
                path=archive.path,
                hint="pass --base with the model that was compressed",
            )
        # Grouped (depthwise) convolutions never lead a removal: they follow the layer that
        # feeds them, which is in the map too, so the dependency graph shrinks them again.
        if getattr(mod, "groups", 1) != 1:
            continue
        n = int(mod.weight.shape[0])
        outside = [i for i in keep if i >= n]
        if outside:
            raise ModelLoadError(
                f"the archive keeps channel {outside[0]} of layer {escape_name(layer)!r}, "
                f"which has only {n}",
                path=archive.path,
                hint="pass --base with the model that was compressed",
            )
        pruned[layer] = sorted(set(range(n)) - set(keep))
    try:
        remove_channels_(loaded.module, example, pruned)
    except WorkbenchError as exc:
        raise ModelLoadError(
            f"could not remove the channels again on the base model ({exc.reason})",
            path=archive.path,
            hint="pass --base with the model that was compressed",
        ) from None


def _assign_state(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    targets = module.state_dict(keep_vars=True)
    missing = sorted(set(targets) - set(tensors))
    extra = sorted(set(tensors) - set(targets))
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise ModelLoadError(
            f"the archive does not match the base model's tensors ({what})",
            path=path,
            hint="pass --base with the model that was compressed",
        )
    with torch.no_grad():
        for name, target in targets.items():
            value = tensors[name]
            if tuple(target.shape) != tuple(value.shape) or target.dtype != value.dtype:
                raise ModelLoadError(
                    f"tensor {name!r}: archive has {tuple(value.shape)} {value.dtype}, base model "
                    f"{tuple(target.shape)} {target.dtype}",
                    path=path,
                    hint="pass --base with the model that was compressed",
                )
            target.copy_(value)


def restore_into(archive: PackedArchive, loaded: LoadedModel) -> LoadedModel:
    """Put the archive's tensors into ``loaded`` (modified in place; pass a fresh copy)."""
    if archive.removed_channels:
        reapply_removal(loaded, archive)
    _assign_state(loaded.module, archive.tensors, archive.path)
    meta = dict(loaded.metadata)
    meta["packed"] = str(archive.path)
    return replace(loaded, metadata=meta)
