"""Writing a compression result as a packed archive (encode every tensor, then one atomic
safetensors file)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.errors import ExportError
from core.outdir import atomic_write

#: Value of ``__metadata__["format"]`` identifying our archives.
from core.packed.bytemodel import (
    CHECKSUM_HEX,
    CODED_DTYPES,
    ArchiveEstimate,
    TensorSpec,
    _json,
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
    scrambled_positions,
)
from core.progress import CancelToken, ProgressFn, no_progress, scaled
from core.quantization import QuantizedTensor, dequantize, expand_params, n_quant_params


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
