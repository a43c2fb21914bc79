"""Bit-level and byte-level codecs of the packed archive: bit packing, relative index,
sparsity patterns in a pinned pseudo-random order, raw dtype bytes, zstd code streams."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from core.base.errors import ExportError

#: Value of ``__metadata__["format"]`` identifying our archives.
from core.packed.bytemodel import INDEX_BITS, PatternChoice, _ceil_bytes, _value_bytes

# ---------------------------------------------------------------------------------------
# bit-level codecs (numpy; little-endian bit order: value i occupies bits [i*b, (i+1)*b))
# ---------------------------------------------------------------------------------------
_CHUNK = 1 << 20  # values per chunk: a multiple of 8, so every chunk starts on a byte


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Pack unsigned integers ``< 2**bits`` into a little-endian bit stream."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")
    values = np.asarray(values)
    if values.dtype.kind not in "ui" or values.dtype.itemsize > 4:
        values = values.astype(np.uint32)  # floats, int64: as before (small arrays)
    values = values.ravel()
    # chunk by chunk in the values' own dtype (uint8 codes of a 10**8-weight tensor are not
    # widened whole)
    for start in range(0, values.size, _CHUNK):
        v = values[start : start + _CHUNK]
        if int(v.min()) < 0 or int(v.max()) >> bits:
            raise ValueError(f"a value does not fit in {bits} bits")
    if bits == 8 and values.dtype.itemsize == 1:
        return values.astype(np.uint8, copy=False).tobytes()
    if bits in (8, 16):  # whole bytes, little-endian: the bit stream is the array's bytes
        dt = np.uint8 if bits == 8 else np.dtype("<u2")
        return b"".join(
            values[s : s + _CHUNK].astype(dt).tobytes() for s in range(0, values.size, _CHUNK)
        )
    shifts = np.arange(bits, dtype=np.uint32)
    out = []
    for start in range(0, values.size, _CHUNK):
        v = values[start : start + _CHUNK].astype(np.uint32)
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
    # the escapes each width needs, summed over `_TAIL_CHUNK` gaps at a time (not the gaps
    # and their quotients as whole-tensor int64 arrays)
    escapes = dict.fromkeys(INDEX_BITS, 0)
    for start in range(0, pos.size, _TAIL_CHUNK):
        chunk = pos[start : start + _TAIL_CHUNK]
        gaps = np.diff(chunk, prepend=pos[start - 1] if start else -1)
        gaps -= 1
        for k in INDEX_BITS:
            escapes[k] += int((gaps // ((1 << k) - 1)).sum())
    best: tuple[int, int, int] | None = None
    for k in INDEX_BITS:
        entries = escapes[k] + pos.size
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
        if scrambled is not None or relidx_may_win(mask, nnz):
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
    z = scramble_keys(numel)
    # The keys are distinct, so any sort gives the same order; quicksort is the fastest.
    return np.argsort(z, kind="quicksort")


def scramble_keys(numel: int) -> np.ndarray:
    """The splitmix64 keys `scramble_order` sorts positions by, hashed in place chunk by chunk
    (8 bytes per position; not three temporaries of that size at 10**8 positions)."""
    z = np.arange(numel, dtype=np.uint64)
    t = np.empty(min(numel, _KEY_CHUNK), dtype=np.uint64)
    for start in range(0, numel, _KEY_CHUNK):
        c = z[start : start + _KEY_CHUNK]
        _hash_in_place(c, t[: c.size])
    return z


def _hash_in_place(c: np.ndarray, tmp: np.ndarray) -> None:
    """The splitmix64 finalizer of the indices in ``c`` (uint64), in place (``tmp``: scratch)."""
    with np.errstate(over="ignore"):
        c += _MIX[0]
        np.right_shift(c, np.uint64(30), out=tmp)
        c ^= tmp
        c *= _MIX[1]
        np.right_shift(c, np.uint64(27), out=tmp)
        c ^= tmp
        c *= _MIX[2]
        np.right_shift(c, np.uint64(31), out=tmp)
        c ^= tmp


#: Positions hashed per step by `relidx_may_win`.
_KEY_CHUNK = 1 << 22
#: Keys hashed (`relidx_may_win`, `_hashed_chunks`) or gaps summed (`relidx_cost`) at a time.
_TAIL_CHUNK = 1 << 20


def relidx_may_win(mask: np.ndarray, nnz: int) -> bool:
    """False when a relative index cannot be strictly smaller than the bitmap of ``mask``.

    With ``k >= 2`` index bits a stream holds at least ``nnz`` entries, so at half density or
    more it is never below the bitmap's ``ceil(numel / 8)`` bytes; with ``k = 1`` it has one
    entry per position up to the last kept one in `scramble_order`, so it only wins when every
    position of the bitmap's last byte is visited after the last kept one, i.e. all positions
    with the largest scramble keys are pruned. Deciding that needs the largest keys, hashed in
    chunks: not the full argsort of `scrambled_positions` (three int64 arrays of the tensor's
    size: 4 GB for an Embedding of 1.3e8 weights). ``actual_pattern`` picks the bitmap on ties.
    """
    numel = int(mask.size)
    if 2 * nnz < numel:
        return True
    tail = numel - 8 * (_ceil_bytes(numel) - 1)  # positions coded by the bitmap's last byte
    keys, where = np.empty(0, np.uint64), np.empty(0, np.int64)
    for start, z in _hashed_chunks(numel):
        top = np.argpartition(z, z.size - min(tail, z.size))[z.size - min(tail, z.size) :]
        keys = np.concatenate([keys, z[top]])
        where = np.concatenate([where, top.astype(np.int64) + start])
        if keys.size > tail:
            best = np.argpartition(keys, keys.size - tail)[keys.size - tail :]
            keys, where = keys[best], where[best]
    return not bool(mask.ravel()[where].any())


def scrambled_positions(mask: np.ndarray) -> np.ndarray:
    """Sorted ranks, in `scramble_order`, of the kept positions of ``mask``.

    The rank of a position is the number of keys below its key. Up to `_BUCKET` * 2
    positions: the keys sorted in place and the kept ones looked up (in ascending order, so
    the ranks come out sorted), which needs no int64 permutation of the whole tensor besides
    the keys; the ranks are written over the kept keys, `_KEY_CHUNK` at a time. Larger
    tensors go range of keys by range of keys (`_scrambled_positions_by_range`): the same
    ranks without the keys of the whole tensor in memory.
    """
    if mask.size > 2 * _BUCKET:
        return _scrambled_positions_by_range(mask)
    keys = scramble_keys(int(mask.size))
    kept = keys[mask.ravel()]
    keys.sort()
    kept.sort()
    ranks = kept.view(np.int64)
    for start in range(0, kept.size, _KEY_CHUNK):
        stop = start + _KEY_CHUNK
        ranks[start:stop] = np.searchsorted(keys, kept[start:stop])
    return ranks


#: Keys sorted at once by `_scrambled_positions_by_range` (about).
_BUCKET = 1 << 21


def _hashed_chunks(numel: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, keys)`` of `scramble_keys`, `_TAIL_CHUNK` positions at a time."""
    tmp = np.empty(min(numel, _TAIL_CHUNK), dtype=np.uint64)
    for start in range(0, numel, _TAIL_CHUNK):
        z = np.arange(start, min(numel, start + _TAIL_CHUNK), dtype=np.uint64)
        _hash_in_place(z, tmp[: z.size])
        yield start, z


def _scrambled_positions_by_range(mask: np.ndarray) -> np.ndarray:
    """`scrambled_positions` of a large mask, one range of key values at a time.

    The keys are uniform over 64 bits, so their top bits split the positions into buckets of
    about equal size; a first pass counts each bucket, then consecutive buckets are taken
    together up to about `_BUCKET` keys: their keys (and kept keys) are gathered by hashing
    the positions again, sorted, and the kept ones' ranks are the keys below all earlier
    ranges plus their place in the range. Memory: the int64 ranks of the kept positions
    plus two ranges' keys, instead of the keys of every position, a sorted copy of the kept
    ones and the ranks (3.4x the float32 tensor at density 0.5). Time: one hashing pass per
    range.
    """
    flat = mask.ravel()
    numel = int(flat.size)
    top = max(1, math.ceil(math.log2(4 * numel / _BUCKET)))
    shift = np.uint64(64 - top)
    counts = np.zeros(1 << top, dtype=np.int64)
    for _, z in _hashed_chunks(numel):
        counts += np.bincount((z >> shift).astype(np.int64), minlength=1 << top)
    out = np.empty(int(np.count_nonzero(flat)), dtype=np.int64)
    below = filled = 0
    lo = 0
    while lo < counts.size:
        hi, size = lo, 0
        while hi < counts.size and (hi == lo or size + counts[hi] <= _BUCKET):
            size += int(counts[hi])
            hi += 1
        keys, kept = [], []
        for start, z in _hashed_chunks(numel):
            b = z >> shift
            sel = (b >= np.uint64(lo)) & (b < np.uint64(hi))
            keys.append(z[sel])
            kept.append(z[sel & flat[start : start + z.size]])
        k_all, k_kept = np.concatenate(keys), np.concatenate(kept)
        del keys, kept
        k_all.sort()
        k_kept.sort()
        out[filled : filled + k_kept.size] = below + np.searchsorted(k_all, k_kept)
        filled += k_kept.size
        below += k_all.size
        lo = hi
    return out


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
    if values.dtype.kind in "iu" and values.size > 1 << 16:
        lo, hi = int(values.min()), int(values.max())
        if 0 <= lo and hi < 1 << 17:
            # the counts of `np.unique` (same order: by value) without sorting 10**8 codes;
            # in chunks (bincount widens its input to int64)
            flat = values.ravel()
            counts = np.zeros(hi + 1, dtype=np.int64)
            for start in range(0, flat.size, _CHUNK):
                counts += np.bincount(flat[start : start + _CHUNK], minlength=hi + 1)
            counts = counts[counts > 0]
            p = counts / values.size
            return float(-(counts * np.log2(p)).sum())
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
