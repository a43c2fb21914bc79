"""Reading a packed archive back: every field of the layout is checked against the bytes
present and the limits before anything is decoded.

Why one module of this size: the in-memory restore (`read_packed`), the restore to a mapped
file (`restore_to_file`, `read_packed_spilled`) and the on-demand decoding of codes and masks
(`_Coded`) all walk the same checked layout with the same per-tensor decoder, so a check added
to one cannot be missed by the others; the bit codecs live in `codec` already."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.base.errors import ModelLoadError
from core.base.limits import (
    MAX_EXAMPLE_BYTES,
    MAX_METADATA_JSON_BYTES,
    MAX_RECIPE_BYTES,
    PACKED_RATIO,
    SAFETENSORS_ITEMSIZE,
    check_alloc,
    check_decoded,
    check_shape,
    escape_name,
    inflate_text,
    load_json,
    safetensors_header,
)
from core.base.memory import release_pages, trim_heap
from core.ops.quantization import (
    QuantizedTensor,
    code_dtype,
    dequantize,
    expand_params,
    n_quant_params,
)

#: Value of ``__metadata__["format"]`` identifying our archives.
from core.packed.bytemodel import (
    BLOB_NAME,
    CHECKSUM_HEX,
    CODED_DTYPES,
    FORMAT_ID,
    INDEX_BITS,
    PATTERN_CODES,
    READ_VERSIONS,
    RECIPE_DICTIONARY,
    ST_DTYPES,
    _ceil_bytes,
)
from core.packed.codec import (
    _ST_TO_TORCH,
    _from_raw,
    _unzstd_codes,
    decode_pattern,
    pattern_nbytes,
    unpack_bits,
)
from core.recipe.plan import (
    MAX_BITS,
    MAX_GROUP,
    MIN_BITS,
    MIN_GROUP,
    CompressionPlan,
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
    decoded tensors (values, codes and masks) would exceed `core.base.limits.PACKED_RATIO` times the
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


#: Codes are unpacked this many at a time (a multiple of 8: every chunk starts on a byte).
_UNPACK_CHUNK = 1 << 22


def _unpack_codes(buf: bytes, count: int, bits: int) -> np.ndarray:
    """`unpack_bits` into the codes' own dtype (`code_dtype`), chunk by chunk: no int64 array
    of a whole 10**8-weight tensor."""
    out = np.empty(count, dtype=np.uint8 if code_dtype(bits) == torch.uint8 else np.int32)
    raw = np.frombuffer(buf, dtype=np.uint8)
    for start in range(0, count, _UNPACK_CHUNK):
        n = min(_UNPACK_CHUNK, count - start)
        first = start * bits // 8
        out[start : start + n] = unpack_bits(raw[first : first + _ceil_bytes(n * bits)], n, bits)
    return out


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
        values = _unpack_codes(cur.take(_ceil_bytes(count * bits)), count, bits)
    n_params = n_quant_params(shape, per_channel=per_channel, group_size=group)
    scale = torch.from_numpy(np.frombuffer(cur.take(4 * n_params), dtype="<f4").astype(np.float32))
    if symmetric:
        zp = np.full(n_params, 2 ** (bits - 1), dtype=np.int64)
    else:
        zp = unpack_bits(cur.take(_ceil_bytes(n_params * bits)), n_params, bits)
    # in the codes' own dtype throughout: no int64 copies of a 10**8-weight tensor
    cdt = np.uint8 if code_dtype(bits) == torch.uint8 else np.int32
    if mask_np is None:
        codes = values.reshape(shape).astype(cdt, copy=False)
    else:
        zfull = expand_params(torch.from_numpy(zp.astype(cdt)), torch.Size(shape), group)
        codes = np.array(np.broadcast_to(zfull.numpy(), shape), dtype=cdt)
        codes[mask_np] = values
    del values
    qt = QuantizedTensor(
        codes=torch.from_numpy(np.ascontiguousarray(codes)),
        scale=scale,
        zero_point=torch.from_numpy(zp).to(torch.int32),
        bits=bits,
        symmetric=symmetric,
        per_channel=per_channel,
        mask=mask,
        group_size=group,
    )
    return name, dequantize(qt).to(dtype), qt, mask


#: After decoding a tensor of at least this many elements the C heap is trimmed (`trim_heap`).
_TRIM_NUMEL = 1 << 20


class _Coded(Mapping):
    """The codes (or masks) of an archive's coded tensors, decoded from the blob on access.

    `read_packed` restores every tensor in one pass and keeps only the dense values: holding
    the codes and masks of all of them too would add up to half the weights' float32 bytes
    again at 10**8-10**9 weights. Each access decodes that one tensor anew (nothing cached).
    """

    def __init__(self, cur: _Cursor, at: dict[str, tuple[list, int]], index: int):
        self._cur, self._at, self._index = cur, at, index

    def __getitem__(self, name: str) -> Any:
        entry, pos = self._at[name]
        cur = _Cursor(self._cur.blob, self._cur.path)
        cur.pos = pos
        return _decode_entry(entry, cur)[self._index]

    def __iter__(self) -> Iterator[str]:
        return iter(self._at)

    def __len__(self) -> int:
        return len(self._at)


class _FileSink:
    """Restored tensors written one after another to an open file (each at a
    `_FILE_ALIGN`-byte offset), then mapped copy-on-write (`views`)."""

    def __init__(self, fh: Any):
        self.fh, self.offset = fh, 0
        self.spans: list[tuple[str, int, torch.dtype, tuple[int, ...]]] = []

    def put(self, name: str, value: torch.Tensor) -> None:
        raw = value.contiguous().reshape(-1).view(torch.uint8).numpy()
        pad = -self.offset % _FILE_ALIGN
        self.fh.write(b"\0" * pad)
        self.offset += pad
        self.spans.append((name, self.offset, value.dtype, tuple(value.shape)))
        self.fh.write(raw.data)
        self.offset += raw.nbytes

    def views(self, path: Path) -> dict[str, torch.Tensor]:
        mapped = np.memmap(path, dtype=np.uint8, mode="c") if self.offset else np.zeros(0, np.uint8)
        out: dict[str, torch.Tensor] = {}
        for name, at, dtype, shape in self.spans:
            nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
            out[name] = torch.from_numpy(mapped[at : at + nbytes]).view(dtype).reshape(shape)
        return out


def _decode_all(
    layout: list, cur: _Cursor, sink: _FileSink | None = None
) -> tuple[dict[str, torch.Tensor], _Coded, _Coded]:
    """``(tensors, codes, masks)`` of a checked layout: tensor by tensor, each one's codes
    and mask dropped once its value is restored (`_Coded` decodes them again on demand).
    With a ``sink`` each value goes to its file instead (``tensors`` is then empty)."""
    tensors: dict[str, torch.Tensor] = {}
    coded: dict[str, tuple[list, int]] = {}
    q_names, m_names = [], []
    for entry in layout:
        start = cur.pos
        name, value, qt, mask = _decode_entry(entry, cur)
        numel = value.numel()
        if sink is None:
            tensors[name] = value
        else:
            sink.put(name, value)
        if qt is not None:
            q_names.append(name)
        if mask is not None:
            m_names.append(name)
        if qt is not None or mask is not None:
            coded[name] = (entry, start)
        del value, qt, mask
        release_pages(cur.blob[start : cur.pos])
        if numel >= _TRIM_NUMEL:
            trim_heap()  # the freed temporaries of a large tensor back to the system
    quantized = _Coded(cur, {n: coded[n] for n in q_names}, 2)
    return tensors, quantized, _Coded(cur, {n: coded[n] for n in m_names}, 3)


def _readable_metadata(meta: dict[str, str], path: Path) -> dict[str, str]:
    """The metadata as version 1 stores it: a version 2 recipe (`pack_recipe`) inflated back to
    its JSON (within `core.base.limits.MAX_RECIPE_BYTES`), so `PackedArchive.metadata` reads
    the same whatever version wrote the file."""
    version = meta.get("version")
    if version not in READ_VERSIONS:
        raise ModelLoadError(
            f"packed format version {str(version)[:20]!r} is not supported",
            path=path,
            hint=f"this workbench reads versions {', '.join(READ_VERSIONS)}",
        )
    if version != "1" and "recipe" in meta:
        meta = dict(meta)
        meta["recipe"] = inflate_text(
            meta["recipe"],
            what="the archive's recipe",
            path=path,
            max_bytes=MAX_RECIPE_BYTES,
            zdict=RECIPE_DICTIONARY,
            hint="the archive is corrupt; re-export the model",
        )
    return meta


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


def _open_checked(p: Path) -> tuple[dict[str, str], list, _Cursor]:
    """``(metadata, layout, cursor at the blob's start)`` of an archive whose header,
    checksum and layout are checked (`read_packed`'s errors)."""
    from safetensors import SafetensorError, safe_open

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
            has_blob = BLOB_NAME in names
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(
            f"not a readable safetensors file ({exc})", path=p, hint="re-export the model"
        ) from None
    if meta.get("format") != FORMAT_ID or not has_blob:
        raise ModelLoadError(
            "not a workbench packed archive (no 'format: workbench.packed' metadata)",
            path=p,
            hint="open it as a model instead, or export it again with --format packed",
        )
    meta = _readable_metadata(meta, p)
    blob = _mapped_blob(p, entries[BLOB_NAME]["data_offsets"])
    # hashed in place (a contiguous uint8 array): no copy of the whole blob
    digest = hashlib.sha256(blob).hexdigest()[:CHECKSUM_HEX]
    release_pages(blob)
    if digest != meta.get("sha256"):
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
    except ModelLoadError:
        raise
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        raise _corrupt(exc, p) from None
    return meta, layout, _Cursor(blob, p)


def _corrupt(exc: BaseException, path: Path) -> ModelLoadError:
    return ModelLoadError(
        f"corrupt layout ({type(exc).__name__}: {str(exc)[:160]})",
        path=path,
        hint="re-export the model",
    )


def _check_consumed(cur: _Cursor) -> None:
    if cur.pos != cur.blob.size:
        raise ModelLoadError(
            f"{cur.blob.size - cur.pos} bytes of the blob are not described by the layout",
            path=cur.path,
        )


def read_packed(path: str | Path, *, restore_to: Path | None = None) -> PackedArchive:
    """Decode a packed archive with safetensors (no pickle): tensors, codes, masks, metadata.

    ``restore_to``: write the restored tensors to this file, one at a time, and return them
    as views of its copy-on-write mapping (`restore_to_file`, `read_packed_spilled`).

    Every size the archive declares is checked before it is used (`_check_layout`,
    `core.base.limits`): a corrupt or hostile archive fails with one `ModelLoadError` line, within
    bounded time and memory.

    Raises
    ------
    ModelLoadError
        Missing file, not a safetensors file, not our format, checksum mismatch, corrupt
        layout, or declared sizes beyond the limits of `core.base.limits`.
    """
    p = Path(path)
    meta, layout, cur = _open_checked(p)
    try:
        if restore_to is None:
            tensors, quantized, masks = _decode_all(layout, cur)
        else:
            with restore_to.open("wb") as fh:
                sink = _FileSink(fh)
                _, quantized, masks = _decode_all(layout, cur, sink)
    except ModelLoadError:
        raise
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        raise _corrupt(exc, p) from None
    _check_consumed(cur)
    if restore_to is not None:
        tensors = sink.views(restore_to)
    return PackedArchive(path=p, metadata=meta, tensors=tensors, quantized=quantized, masks=masks)


#: Byte alignment of each tensor in `restore_to_file`'s file.
_FILE_ALIGN = 64


def restore_to_file(path: str | Path, target: Path) -> dict[str, torch.Tensor]:
    """The tensors `read_packed` restores, as views of a memory-mapped file ``target``.

    Each tensor is decoded, written to ``target`` and dropped before the next, so the
    restored weights never sit whole in the process's own memory: their pages belong to the
    file, are read when used and can be given back (`core.base.memory.paged_forward`). The
    file is mapped copy-on-write (writes to the tensors never reach it); the caller deletes
    it (the mapping stays valid). Same checks and errors as `read_packed`.
    """
    return dict(read_packed(path, restore_to=target).tensors)


#: Archives of at least this many bytes restore to a temporary file (`read_packed_spilled`).
SPILL_MIN_BYTES = 1 << 24


def read_packed_spilled(path: str | Path) -> PackedArchive:
    """`read_packed`; an archive of `SPILL_MIN_BYTES` or more restores its tensors to an
    unlinked temporary file and maps them (`restore_to_file`): the kernel can page the
    restored weights out and read them back like a memory-mapped checkpoint's, and passes
    over them give their pages back (`core.base.memory.MappedPages`). Where the temporary
    folder cannot take the file the tensors are restored in memory as usual."""
    p = Path(path)
    try:
        small = p.stat().st_size < SPILL_MIN_BYTES
    except OSError:
        small = True  # read_packed says what is wrong
    if small:
        return read_packed(p)
    try:
        fd, name = tempfile.mkstemp(prefix="workbench-restored-", suffix=".bin")
        os.close(fd)
    except OSError:  # no usable temporary folder: in memory instead
        return read_packed(p)
    target = Path(name)
    try:
        return read_packed(p, restore_to=target)
    except OSError:  # no room for the file: in memory instead
        return read_packed(p)
    finally:
        with contextlib.suppress(OSError):
            target.unlink()  # the mapping stays valid; nothing is left behind


def _mapped_blob(path: Path, offsets: Any) -> np.ndarray:
    """The blob's bytes as a read-only memory map of the file (header checked already): its
    pages are read as tensors are decoded and given back after (`release_pages`), instead
    of a copy of the whole blob held next to the restored weights."""
    start, end = (int(x) for x in offsets)
    with path.open("rb") as fh:
        base = 8 + int.from_bytes(fh.read(8), "little")
    if end <= start:
        return np.zeros(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r", offset=base + start, shape=(end - start,))


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
