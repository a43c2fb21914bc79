"""Writing a compression result as a packed archive (encode every tensor, then one atomic
safetensors file).

Why one module of this size: the one-tensor encoder, the batched encoder for groups of small
tensors and the streaming writer must produce the same bytes (tested byte for byte), so they
share the encoding helpers here; the byte model (`bytemodel`) and the bit codecs (`codec`) are
already their own modules."""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.base.errors import ExportError
from core.base.outdir import atomic_write
from core.base.progress import CancelToken, ProgressFn, no_progress, scaled
from core.ops.quantization import QuantizedTensor, dequantize, expand_params, n_quant_params

#: Value of ``__metadata__["format"]`` identifying our archives.
from core.packed.bytemodel import (
    CHECKSUM_HEX,
    CODED_DTYPES,
    INDEX_BITS,
    ArchiveEstimate,
    PatternChoice,
    TensorSpec,
    _ceil_bytes,
    _json,
    _value_bytes,
    archive_metadata,
    build_header,
    estimate_archive_bytes,
    finalize_metadata,
    layout_entry,
)
from core.packed.codec import (
    _entropy_bits,
    _pattern_entropy_bits,
    _raw_bytes,
    _row_structured,
    _st_dtype,
    _zstd_codes,
    actual_pattern,
    encode_pattern,
    pack_bits,
    relidx_may_win,
    scramble_order,
    scrambled_positions,
)


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


def _raw_tensor(
    name: str, value: torch.Tensor, shape: tuple[int, ...], dtype: str
) -> tuple[list, list[bytes], TensorRecord, TensorSpec]:
    """A tensor stored as it is (neither pruned nor quantized)."""
    raw = _raw_bytes(value)
    numel = value.numel()
    rec = TensorRecord(name, shape, dtype, None, "raw", numel, len(raw), len(raw))
    return layout_entry(name, shape, dtype), [raw], rec, TensorSpec(name, shape, numel, dtype=dtype)


def _kept_positions(
    mask: torch.Tensor | None, shape: tuple[int, ...], numel: int
) -> tuple[np.ndarray | None, int, np.ndarray | None]:
    """Mask as numpy, number of kept weights and, where a relative index can win, the
    scrambled positions (needed both to size and to write the index: computed once; the
    argsort behind them is 3x int64 of the tensor)."""
    m = _mask_np(mask, shape)
    nnz = numel if m is None else int(m.sum())
    spos = (
        scrambled_positions(m)
        if (m is not None and 0 < nnz < numel and relidx_may_win(m, nnz))
        else None
    )
    return m, nnz, spos


def _pruned_tensor(
    name: str,
    value: torch.Tensor,
    shape: tuple[int, ...],
    dtype: str,
    m: np.ndarray | None,
    nnz: int,
    spos: np.ndarray | None,
) -> tuple[list, list[bytes], TensorRecord, TensorSpec]:
    """A pruned, unquantized tensor: the sparsity pattern plus the kept values stored raw."""
    choice = actual_pattern(m, None, value.element_size(), spos)
    flat = value.detach().contiguous().reshape(-1)
    kept = flat if choice.kind == "d" else flat[torch.from_numpy(m.ravel())]
    parts = [encode_pattern(m, choice, spos) if m is not None else b"", _raw_bytes(kept)]
    values_raw = kept.detach().contiguous().view(torch.uint8).numpy() if kept.numel() else None
    ent = _entropy_bits(values_raw) if values_raw is not None else 0.0
    entry = layout_entry(name, shape, dtype, pattern=choice)
    spec = TensorSpec(name, shape, nnz, dtype=dtype, structured=_mask_structured(m))
    pat_ent = _pattern_entropy_bits(m, choice, parts[0])
    ent_bytes = math.ceil((ent + pat_ent) / 8)
    rec = TensorRecord(name, shape, dtype, None, choice.kind, nnz, sum(map(len, parts)), ent_bytes)
    return entry, parts, rec, spec


def _checked_codes(
    name: str, qt: QuantizedTensor, shape: tuple[int, ...], m: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Codes (pruned positions forced to the zero point, so a dense coding dequantizes them to
    exactly 0.0 as the mask would) and flat zero points of ``qt``, after checking it fits."""
    if tuple(qt.codes.shape) != shape:
        raise ExportError(
            f"tensor {name!r}: codes of shape {tuple(qt.codes.shape)} for a weight of shape {shape}",
            hint="the compression result is inconsistent; re-run the compression",
        )
    bits = int(qt.bits)
    n_params = int(qt.scale.numel())
    # the codes' own dtype (uint8 up to 8 bits): no int64 copy of a 10**8-weight tensor
    codes = qt.codes.detach().cpu().numpy()
    zp = qt.zero_point.detach().to(torch.int64).cpu().numpy().reshape(-1)
    group = qt.group_size
    if (qt.per_channel or group) and n_params != n_quant_params(
        shape, per_channel=qt.per_channel, group_size=group
    ):
        raise ExportError(f"tensor {name!r}: {n_params} scales do not fit its shape {shape}")
    if qt.symmetric and not (zp == 2 ** (bits - 1)).all():
        raise ExportError(f"tensor {name!r}: symmetric codes need zero point {2 ** (bits - 1)}")
    if m is not None:
        zfull = expand_params(torch.from_numpy(zp.astype(codes.dtype)), torch.Size(shape), group)
        codes = np.where(m, codes, np.broadcast_to(zfull.numpy(), shape))
    return codes, zp


def _coded_codes(flat_codes: np.ndarray, bits: int, *, entropy: bool) -> tuple[bytes, int | None]:
    """Bit-packed codes, or their zstd coding (and its size) where ``entropy`` and smaller."""
    packed_codes = pack_bits(flat_codes, bits)
    if entropy:
        z = _zstd_codes(flat_codes, bits)
        if len(z) < len(packed_codes):
            return z, len(z)
    return packed_codes, None


def _quantized_tensor(
    name: str,
    qt: QuantizedTensor,
    shape: tuple[int, ...],
    dtype: str,
    m: np.ndarray | None,
    nnz: int,
    spos: np.ndarray | None,
    *,
    entropy: bool,
) -> tuple[list, list[bytes], TensorRecord, TensorSpec]:
    """A quantized tensor: pattern, codes of the kept positions, scales and zero points."""
    codes, zp = _checked_codes(name, qt, shape, m)
    bits = int(qt.bits)
    choice = actual_pattern(m, bits, 0, spos)
    flat_codes = codes.reshape(-1) if choice.kind == "d" else codes.reshape(-1)[m.ravel()]
    packed_codes, zbytes = _coded_codes(flat_codes, bits, entropy=entropy)
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
        group_size=qt.group_size,
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
        group_size=qt.group_size,
    )
    pat_ent = _pattern_entropy_bits(m, choice, parts[0])
    ent_bytes = math.ceil((_entropy_bits(flat_codes) + pat_ent) / 8) + len(parts[2]) + len(parts[3])
    total = sum(map(len, parts))
    rec = TensorRecord(
        name, shape, dtype, bits, choice.kind, nnz, total, ent_bytes, zbytes is not None
    )
    return entry, parts, rec, spec


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
    if qt is None and (mask is None or not value.is_floating_point()):
        return _raw_tensor(name, value, shape, dtype)
    if dtype not in CODED_DTYPES:
        raise ExportError(f"tensor {name!r} of dtype {dtype} cannot be pruned or quantized")
    eff_mask = qt.mask if (qt is not None and qt.mask is not None) else mask
    m, nnz, spos = _kept_positions(eff_mask, shape, value.numel())
    if qt is None:
        return _pruned_tensor(name, value, shape, dtype, m, nnz, spos)
    return _quantized_tensor(name, qt, shape, dtype, m, nnz, spos, entropy=entropy)


#: Quantized tensors up to this many elements sharing shape and quantizer settings are
#: encoded together (checkpoints with 10**5 tiny tensors); at least `_GROUP_MIN` of them.
_GROUP_MAX = 4096
_GROUP_MIN = 8


def _group_key(value: torch.Tensor, qt: QuantizedTensor | None, mask: torch.Tensor | None):
    if qt is None or value.dtype != torch.float32 or value.ndim < 1:
        return None
    if not 0 < value.numel() <= _GROUP_MAX or tuple(qt.codes.shape) != tuple(value.shape):
        return None
    m = qt.mask if qt.mask is not None else mask
    if m is not None and tuple(m.shape) != tuple(value.shape):
        return None
    return (
        tuple(value.shape),
        int(qt.bits),
        bool(qt.symmetric),
        bool(qt.per_channel),
        qt.group_size,
        m is not None,
        int(qt.scale.numel()),
    )


def _relidx_costs(spos_rows: np.ndarray, cols: np.ndarray, b: int) -> list[tuple[int, int, int]]:
    """`relidx_cost` of each row's kept scrambled positions (``cols`` of rows ``spos_rows``)."""
    prev = np.empty_like(cols)
    if cols.size:
        prev[0] = -1
        prev[1:] = np.where(spos_rows[1:] == spos_rows[:-1], cols[:-1], -1)
    gaps = cols - prev - 1
    nnz = np.bincount(spos_rows, minlength=b)
    best_cost = np.full(b, np.iinfo(np.int64).max, dtype=np.int64)
    best_k = np.zeros(b, dtype=np.int64)
    best_entries = np.zeros(b, dtype=np.int64)
    for k in INDEX_BITS:
        entries = np.bincount(spos_rows, weights=gaps // ((1 << k) - 1), minlength=b)
        entries = entries.astype(np.int64) + nnz
        cost = (entries * k + 7) // 8
        better = cost < best_cost
        best_cost = np.where(better, cost, best_cost)
        best_k = np.where(better, k, best_k)
        best_entries = np.where(better, entries, best_entries)
    return [
        (int(c), int(k), int(e)) for c, k, e in zip(best_cost, best_k, best_entries, strict=True)
    ]


@dataclass
class _Group:
    """The stacked arrays of one `_encode_group` call (one row per tensor)."""

    names: list[str]
    shape: tuple[int, ...]
    numel: int
    qt: QuantizedTensor  # the first tensor's codes: bits, symmetry, groups (shared)
    codes: np.ndarray  # int64 (B, numel), pruned positions at the zero point
    zp: np.ndarray  # int64 (B, params)
    scale_bytes: np.ndarray  # "<f4" (B, params)
    m: np.ndarray | None  # bool (B, numel) keep masks, or None (dense)
    nnz: np.ndarray
    hist_all: np.ndarray  # code histograms over every position / the kept ones
    hist_kept: np.ndarray
    structured: np.ndarray | None = None
    costs: list[tuple[int, int, int]] | None = None  # `relidx_cost` per row
    spos: tuple[np.ndarray, np.ndarray] | None = None  # (row cuts, scrambled ranks)
    bitmaps: np.ndarray | None = None


def _stack_checked(
    names: list[str],
    values: list[torch.Tensor],
    qts: list[QuantizedTensor],
    masks: list[torch.Tensor | None],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, tuple[int, int]]:
    """``(codes, scales, zero points, masks, view)`` stacked, after `_check_restores` of every
    tensor (the stack dequantized with per-row parameters of the views `quantize_stack` uses)
    and the one-tensor checks of scale counts and symmetric zero points."""
    q0 = qts[0]
    b, numel = len(names), values[0].numel()
    shape = tuple(int(s) for s in values[0].shape)
    group = q0.group_size
    value2 = torch.stack([v.detach() for v in values]).reshape(b, numel)
    codes_t = torch.stack([q.codes for q in qts]).reshape(b, numel)
    scale_t = torch.stack([q.scale.reshape(-1) for q in qts]).to(torch.float32)
    zp_t = torch.stack([q.zero_point.reshape(-1) for q in qts])
    eff = [q.mask if q.mask is not None else m for q, m in zip(qts, masks, strict=True)]
    mask_t = None
    if eff[0] is not None:
        mask_t = torch.stack([m.to(torch.bool) for m in eff]).reshape(b, numel)  # type: ignore[union-attr]
    rows, cols = (shape[0], numel // shape[0])
    view = (b, numel) if (group is None and not q0.per_channel) else (b * rows, cols)
    stacked_qt = QuantizedTensor(
        codes=codes_t.reshape(view),
        scale=scale_t.reshape(-1),
        zero_point=zp_t.reshape(-1),
        bits=int(q0.bits),
        symmetric=q0.symmetric,
        per_channel=True,
        mask=None if mask_t is None else mask_t.reshape(view),
        group_size=group,
    )
    same = (dequantize(stacked_qt).reshape(b, numel) == value2).all(dim=1)
    if not bool(same.all()):
        i = int(torch.nonzero(~same)[0])
        _check_restores(names[i], values[i], qts[i], masks[i])  # raises the one-tensor error
    if (q0.per_channel or group) and int(scale_t.shape[1]) != n_quant_params(
        shape, per_channel=q0.per_channel, group_size=group
    ):
        raise ExportError(
            f"tensor {names[0]!r}: {int(scale_t.shape[1])} scales do not fit its shape {shape}"
        )
    half = 2 ** (int(q0.bits) - 1)
    if q0.symmetric and not bool((zp_t == half).all()):
        i = int(torch.nonzero(~(zp_t == half).all(dim=1))[0])
        raise ExportError(f"tensor {names[i]!r}: symmetric codes need zero point {half}")
    return codes_t, scale_t, zp_t, mask_t, view


def _group_arrays(
    names: list[str],
    values: list[torch.Tensor],
    qts: list[QuantizedTensor],
    masks: list[torch.Tensor | None],
) -> _Group:
    codes_t, scale_t, zp_t, mask_t, view = _stack_checked(names, values, qts, masks)
    q0 = qts[0]
    b, numel = len(names), values[0].numel()
    shape = tuple(int(s) for s in values[0].shape)
    codes = codes_t.to(torch.int64).numpy()
    m = mask_t.numpy() if mask_t is not None else None
    extra: dict[str, Any] = {}
    if m is not None:
        zfull = expand_params(zp_t.reshape(-1), torch.Size(view), q0.group_size).expand(view)
        codes = np.where(m, codes, zfull.reshape(b, numel).to(torch.int64).numpy())
        nnz = m.sum(axis=1)
        rows_m = m.reshape(b, shape[0], numel // shape[0])
        srow, scol = np.nonzero(m[:, scramble_order(numel)])
        extra = {
            "structured": (rows_m.all(axis=2) | ~rows_m.any(axis=2)).all(axis=1),
            "costs": _relidx_costs(srow, scol, b),
            "spos": (np.searchsorted(srow, np.arange(b + 1)), scol),
            "bitmaps": np.packbits(m, axis=1, bitorder="little"),
        }
    else:
        nnz = np.full(b, numel)
    levels = 1 << int(q0.bits)
    offs = (np.arange(b, dtype=np.int64) * levels)[:, None]
    hist_all = np.bincount((codes + offs).reshape(-1), minlength=b * levels).reshape(b, levels)
    hist_kept = (
        hist_all
        if m is None
        else np.bincount((codes + offs)[m], minlength=b * levels).reshape(b, levels)
    )
    return _Group(
        names=names,
        shape=shape,
        numel=numel,
        qt=q0,
        codes=codes,
        zp=zp_t.to(torch.int64).numpy(),
        scale_bytes=scale_t.contiguous().numpy().astype("<f4"),
        m=m,
        nnz=nnz,
        hist_all=hist_all,
        hist_kept=hist_kept,
        **extra,
    )


def _group_choice(g: _Group, i: int) -> PatternChoice:
    """`actual_pattern` of row ``i`` from the group's precomputed costs."""
    if g.m is None:
        return PatternChoice("d", 0, 0)
    k_nnz, numel = int(g.nnz[i]), g.numel
    cands = [PatternChoice("d", 0, numel)]
    if k_nnz < numel:
        cands.append(PatternChoice("b", _ceil_bytes(numel), k_nnz))
        if g.structured is not None and g.structured[i]:
            cands.append(PatternChoice("c", _ceil_bytes(g.shape[0]), k_nnz))
        cost, k, entries = g.costs[i]  # type: ignore[index]
        cands.append(PatternChoice("r", cost, k_nnz, k, entries))
    bits = int(g.qt.bits)
    return min(cands, key=lambda c: c.pattern_bytes + _value_bytes(c.values, bits, 0))


def _group_row(
    g: _Group, i: int, *, entropy: bool
) -> tuple[list, list[bytes], TensorRecord, TensorSpec]:
    """Layout entry, byte parts, record and spec of row ``i`` (as `_encode_tensor` makes)."""
    q0, bits, shape = g.qt, int(g.qt.bits), g.shape
    choice = _group_choice(g, i)
    mi = None if g.m is None else g.m[i].reshape(shape)
    pattern = b""
    if choice.kind == "d":
        flat_codes = g.codes[i]
    else:
        flat_codes = g.codes[i][g.m[i]]  # type: ignore[index]
        if choice.kind == "b":
            pattern = g.bitmaps[i].tobytes()  # type: ignore[index]
        elif choice.kind == "r":
            cuts, scol = g.spos  # type: ignore[misc]
            pattern = encode_pattern(mi, choice, scol[cuts[i] : cuts[i + 1]])  # type: ignore[arg-type]
        else:
            pattern = encode_pattern(mi, choice)  # type: ignore[arg-type]
    packed_codes = pack_bits(flat_codes, bits)
    zbytes = None
    if entropy:
        z = _zstd_codes(flat_codes, bits)
        if len(z) < len(packed_codes):
            packed_codes, zbytes = z, len(z)
    parts = [
        pattern,
        packed_codes,
        g.scale_bytes[i].tobytes(),
        b"" if q0.symmetric else pack_bits(g.zp[i], bits),
    ]
    flags = {"symmetric": q0.symmetric, "per_channel": q0.per_channel, "group_size": q0.group_size}
    entry = layout_entry(
        g.names[i], shape, "F32", bits=bits, pattern=choice, zstd_bytes=zbytes, **flags
    )
    structured = bool(g.structured is not None and g.structured[i])
    k_nnz = int(g.nnz[i])
    spec = TensorSpec(
        g.names[i], shape, k_nnz, bits=bits, structured=structured, dtype="F32", **flags
    )
    h = g.hist_all[i] if choice.kind == "d" else g.hist_kept[i]
    c = h[h > 0]
    ent = float(-(c * np.log2(c / flat_codes.size)).sum()) if flat_codes.size else 0.0
    pat_ent = _pattern_entropy_bits(mi, choice, parts[0])
    ent_bytes = math.ceil((ent + pat_ent) / 8) + len(parts[2]) + len(parts[3])
    rec = TensorRecord(
        g.names[i],
        shape,
        "F32",
        bits,
        choice.kind,
        k_nnz,
        sum(map(len, parts)),
        ent_bytes,
        zbytes is not None,
    )
    return entry, parts, rec, spec


def _encode_group(
    names: list[str],
    values: list[torch.Tensor],
    qts: list[QuantizedTensor],
    masks: list[torch.Tensor | None],
    *,
    entropy: bool,
) -> list[tuple[list, list[bytes], TensorRecord, TensorSpec]]:
    """`_check_restores` + `_encode_tensor` of quantized tensors sharing a `_group_key`, in
    one numpy pass: the same bytes, records and specs as one by one."""
    g = _group_arrays(names, values, qts, masks)
    return [_group_row(g, i, entropy=entropy) for i in range(len(names))]


def _mask_structured(m: np.ndarray | None) -> bool:
    return m is not None and _row_structured(m)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by state-dict name (detached, on CPU)."""
    return {
        k: v.detach().cpu() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)
    }


def _check_restores(name: str, value: torch.Tensor, qt: QuantizedTensor | None, mask) -> None:
    """The archive restores ``dequantize(codes)``; refuse to write if that is not the model's weight.

    A meta ``value`` (the streamed compress, `core.export.stream`: the weight *is* its codes
    dequantized, dropped before encoding) has nothing to compare with."""
    if value.is_meta:
        if qt is None:
            raise ExportError(f"tensor {name!r} has no values and no codes to store")
        return
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
    groups: dict[tuple, list[str]] = {}
    for name, value in state.items():
        key = _group_key(value, quantized.get(name), masks.get(name))
        if key is not None:
            groups.setdefault(key, []).append(name)
    encoded: dict[str, tuple[list, list[bytes], TensorRecord, TensorSpec]] = {}
    for members in groups.values():
        if len(members) < _GROUP_MIN:
            continue
        for s in range(0, len(members), 4096):
            if cancel is not None:
                cancel.check()
            chunk = members[s : s + 4096]
            progress(len(encoded) / max(len(state), 1), f"packing {chunk[0]} and others")
            got = _encode_group(
                chunk,
                [state[n] for n in chunk],
                [quantized[n] for n in chunk],
                [masks.get(n) for n in chunk],
                entropy=entropy,
            )
            encoded.update(zip(chunk, got, strict=True))
    for i, (name, value) in enumerate(state.items()):
        if name in encoded:
            entry, p, rec, spec = encoded[name]
            layout.append(entry)
            parts.extend(p)
            records.append(rec)
            specs.append(spec)
            continue
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
    checksum = hashlib.sha256(blob).hexdigest()[:CHECKSUM_HEX]
    full, estimate = _archive_meta(result, layout, specs, checksum)
    return blob, full, tuple(records), estimate


def _archive_meta(
    result: Any, layout: list, specs: list[TensorSpec], checksum: str
) -> tuple[dict[str, str], ArchiveEstimate]:
    """``(metadata, estimate)`` of an archive of ``result`` with this layout and blob checksum
    (shared by `pack_result` and `write_packed_stream`, so both write the same header)."""
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
    return finalize_metadata(meta, layout, checksum), estimate


def write_packed(
    result: Any,
    path: str | Path,
    *,
    force: bool = False,
    entropy: bool = False,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
) -> PackedInfo:
    """Write ``result`` (a `core.compress.engine.CompressionResult`) as a packed archive, atomically.

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
    return _packed_info(target, header, records, estimate)


def _packed_info(
    target: Path, header: bytes, records: Sequence[TensorRecord], estimate: ArchiveEstimate
) -> PackedInfo:
    bound = len(header) + sum(r.entropy_bytes for r in records)
    return PackedInfo(
        path=target,
        bytes_on_disk=target.stat().st_size,
        header_bytes=len(header),
        estimate_bytes=estimate.total,
        entropy_bound_bytes=bound,
        entropy_coded=any(r.zstd for r in records),
        tensors=tuple(records),
    )


#: One state tensor for `write_packed_stream`: ``(name, value, codes or None, mask or None)``.
StreamItem = tuple[str, torch.Tensor, QuantizedTensor | None, torch.Tensor | None]


def write_packed_stream(
    result: Any,
    items: Iterable[StreamItem],
    path: str | Path,
    *,
    force: bool = False,
    entropy: bool = False,
    cancel: CancelToken | None = None,
) -> PackedInfo:
    """`write_packed` of tensors that arrive one at a time: the same bytes, never the model.

    ``items`` yields every state tensor of the compressed model in state-dict order (what
    `pack_result` reads from ``result.compressed``); each is checked (`_check_restores`),
    encoded (`_encode_tensor`), appended to a temporary blob file in the target's folder and
    dropped before the next is asked for. ``result`` supplies what the header records
    (``original``, ``plan``, ``removed_channels``). The blob's checksum and the layout are
    known only at the end, so the header is written then and the blob copied behind it.
    """
    target = Path(path)
    if target.exists() and not force:
        raise ExportError("file already exists", path=target, hint="pass --force to overwrite it")
    fd, blob_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".blob", dir=target.parent)
    blob_path = Path(blob_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            layout, records, specs, digest, size = _stream_blob(fh, items, entropy, cancel)
        full, estimate = _archive_meta(result, layout, specs, digest.hexdigest()[:CHECKSUM_HEX])
        header = build_header(full, size)

        def append_blob(tmp: Path) -> None:
            with blob_path.open("rb") as src, tmp.open("ab") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)

        atomic_write(target, [header], force=force, writer=append_blob, cancel=cancel)
    finally:
        blob_path.unlink(missing_ok=True)
    return _packed_info(target, header, records, estimate)


def _stream_blob(
    fh: Any, items: Iterable[StreamItem], entropy: bool, cancel: CancelToken | None
) -> tuple[list, list[TensorRecord], list[TensorSpec], Any, int]:
    """Encode and append every item to ``fh``: ``(layout, records, specs, sha256, bytes)``."""
    layout: list = []
    records: list[TensorRecord] = []
    specs: list[TensorSpec] = []
    digest = hashlib.sha256()
    size = 0
    for name, value, qt, mask in items:
        if cancel is not None:
            cancel.check()
        _check_restores(name, value, qt, mask)
        entry, parts, rec, spec = _encode_tensor(name, value, qt, mask, entropy=entropy)
        for part in parts:
            fh.write(part)
            digest.update(part)
            size += len(part)
        layout.append(entry)
        records.append(rec)
        specs.append(spec)
        del value, qt, mask, parts
    return layout, records, specs, digest, size
