"""The archive's byte-exact size model: per-tensor bytes, layout entries, header and overhead,
the whole-archive estimate the live preview shares with the writer."""

from __future__ import annotations

import base64
import functools
import json
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from core.ops.quantization import n_quant_params
from core.recipe.plan import (
    RECIPE_VERSION,
    CompressionPlan,
    LayerConfig,
)

#: Value of ``__metadata__["format"]`` identifying our archives.
FORMAT_ID = "workbench.packed"
#: Version the writer stores: 2 keeps the recipe deflated (`pack_recipe`), 1 kept it as JSON.
FORMAT_VERSION = "2"
#: Versions `core.packed.read_packed` reads.
READ_VERSIONS = ("1", "2")
#: Preset dictionary of the recipe's deflate stream (format version 2; changing a byte of it
#: is a new format version): the recipe's keys and common values, the most frequent last,
#: so a tiny model's recipe costs tens of bytes instead of hundreds of escaped JSON characters.
RECIPE_DICTIONARY = (
    '{"version":1,"default":{"prune":{"method":"gradient_stability","mode":"threshold",'
    '"threshold":0.01,"scope":"global","n":1,"m":8},"quant":{"bits":8,"symmetric":false,'
    '"method":"gptq","group_size":128,"bias_correction":true}},"recovery":{"epochs":10,'
    '"lr":0.001,"batch_size":64,"distill":true,"temperature":2.0,"alpha":0.7,'
    '"prune_steps":10},"remove_channels":true,"layers":{"features.0":{"skip":true},'
    '"classifier.":{"prune":{"method":"taylor","sparsity":0.5},"quant":{"bits":6,'
    '"per_channel":true,"bias_bits":8}},"layer1.0.conv":{"prune":{"method":"channel_l2",'
    '"sparsity":0.75}},"fc":{"prune":{"method":"magnitude","sparsity":0.9},'
    '"quant":{"bits":4,"per_channel":true,"bias_bits":8}},'
).encode("ascii")
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
    groups; see `core.ops.quantization` for group-wise scales); ``pattern`` is 0 (dense),
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
    text = _header_text(metadata, blob_bytes)
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _header_text(metadata: Mapping[str, str], blob_bytes: int) -> bytes:
    """The header's JSON (UTF-8), before padding."""
    if BLOB_NAME in metadata:
        raise ValueError(f"metadata key {BLOB_NAME!r} is reserved")
    header = {
        "__metadata__": dict(metadata),
        BLOB_NAME: {"dtype": "U8", "shape": [blob_bytes], "data_offsets": [0, blob_bytes]},
    }
    return _json(header).encode("utf-8")


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


def _tensor_part(s: TensorSpec) -> tuple[int, list, int]:
    """``(payload bytes, layout entry, bytes of the entry in the header)`` of one tensor in
    the archive (the entry's JSON as the header's ``layout`` string holds it, escaped)."""
    rows = s.shape[0] if (s.structured and len(s.shape) >= 1) else None
    itemsize = _spec_itemsize(s)
    choice = choose_pattern(s.numel, s.nnz, s.bits, structured_rows=rows, itemsize=itemsize)
    size = tensor_packed_bytes(
        s.numel,
        s.nnz,
        s.bits,
        s.n_params,
        structured_rows=rows,
        symmetric=s.symmetric,
        itemsize=itemsize,
    )
    entry = layout_entry(
        s.name,
        s.shape,
        s.dtype,
        bits=s.bits,
        symmetric=s.symmetric,
        per_channel=s.per_channel and s.bits is not None,
        pattern=choice,
        group_size=s.group_size if s.bits is not None else None,
    )
    return size, entry, _escaped_bytes(_json(entry))


def _escaped_bytes(text: str) -> int:
    """UTF-8 bytes of ``text`` written inside a JSON string (as `_json` escapes it)."""
    return len(_json(text).encode("utf-8")) - 2


def estimate_archive_bytes(
    specs: Sequence[TensorSpec],
    metadata: Mapping[str, str],
    *,
    parts: dict[TensorSpec, tuple[int, list, int]] | None = None,
) -> ArchiveEstimate:
    """Expected size of the archive the writer produces for these tensors and metadata.

    Uses `tensor_packed_bytes` per tensor and sizes the exact header JSON with the expected
    layout (only relative-index stream lengths are expectations). ``parts``: a dict the caller
    keeps between calls (`core.analysis.estimate.PreviewCache`); each spec's bytes and layout
    entry are looked up there and stored when missing (the entries are shared: read them,
    never edit).

    The header is not built: JSON escapes character by character, so the ``layout`` string
    (``[e1,e2,...]`` inside the header's JSON) takes the sum of its escaped entries plus its
    brackets and commas, added to the header written with an empty layout (`_header_bytes`).
    """
    sizes: dict[str, int] = {}
    layout_bytes = 2 + max(len(specs) - 1, 0)  # the brackets and commas
    for s in specs:
        part = None if parts is None else parts.get(s)
        if part is None:
            part = _tensor_part(s)
            if parts is not None:
                parts[s] = part
        sizes[s.name] = part[0]
        layout_bytes += part[2]
    blob = sum(sizes.values())
    header = _header_bytes(metadata, layout_bytes, blob)
    return ArchiveEstimate(total=header + blob, header=header, tensors=sizes)


def _header_bytes(metadata: Mapping[str, str], layout_bytes: int, blob_bytes: int) -> int:
    """`archive_overhead_bytes` for a layout whose string takes ``layout_bytes`` in the
    header: the header's JSON with an empty layout (``"[]"``, 2 bytes) grown by the
    difference, padded as `build_header` pads it, plus the 8-byte length."""
    empty = finalize_metadata(metadata, [], "0" * CHECKSUM_HEX)
    text = len(_header_text(empty, blob_bytes)) + layout_bytes - 2
    return 8 + text + (-text % 8)


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
    base = _default_plan_dict()
    full = {
        "default": asdict(plan.default),
        "recovery": asdict(plan.recovery),
        "remove_channels": plan.remove_channels,
    }
    out: dict[str, object] = {"version": RECIPE_VERSION}
    for key in ("default", "recovery", "remove_channels"):
        reduced = _non_default(full[key], base[key])
        if reduced is not _SAME:
            out[key] = reduced
    # the reduced form of each distinct layer config once: a live preview of a 200-layer
    # plan asks for this on every slider step, with few of the configs changed
    layers = {name: _reduced_layer(cfg) for name, cfg in plan.overrides}
    if layers:
        out["layers"] = layers
    return _json(out)


@functools.lru_cache(maxsize=1)
def _default_plan_dict() -> dict:
    return CompressionPlan().to_dict()


@functools.lru_cache(maxsize=4096)
def _reduced_layer(cfg: LayerConfig) -> dict:
    """`_non_default` of one override against the default `LayerConfig` (``{}`` when equal);
    shared, never modified: only serialised."""
    reduced = _non_default(asdict(cfg), asdict(LayerConfig()))
    return {} if reduced is _SAME else reduced  # type: ignore[return-value]


@functools.lru_cache(maxsize=8)  # previews of one plan repeat; a huge model's recipe is MBs
def pack_recipe(text: str) -> str:
    """The recipe JSON as format version 2 stores it: base85 (RFC 1924 alphabet, which has no
    character JSON must escape) of a raw deflate stream (level 9, preset dictionary
    `RECIPE_DICTIONARY`). The reader inflates it within `core.base.limits.MAX_RECIPE_BYTES`."""
    z = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zdict=RECIPE_DICTIONARY)
    raw = z.compress(text.encode("utf-8")) + z.flush()
    return base64.b85encode(raw).decode("ascii")


def archive_metadata(
    plan: CompressionPlan,
    *,
    source: str,
    source_format: str,
    architecture: str | None = None,
    removed_channels: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, str]:
    """The descriptive metadata the writer stores (pass it to `estimate_archive_bytes`); the
    recipe is `compact_recipe` packed by `pack_recipe`.

    ``architecture`` is the demo architecture a weights-only file was opened with
    (``LoadedModel.metadata["architecture"]``), so the loader can rebuild a runnable model.
    """
    if source and not source.startswith("demo:"):
        # Absolute, so `workbench export` finds the original from any working directory.
        source = str(Path(source).absolute())
    recipe = pack_recipe(compact_recipe(plan))
    meta = {"source": source, "source_format": source_format, "recipe": recipe}
    if architecture:
        meta["architecture"] = architecture
    if removed_channels:
        meta["removed_channels"] = _json(
            {k: [int(i) for i in v] for k, v in removed_channels.items()}
        )
    return meta
