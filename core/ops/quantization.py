"""Uniform affine quantization with scale and zero point, 2..16 bits.

Convention (shared by the engine, the estimates and the packed archive): codes are unsigned
integers ``q`` in ``[qmin, qmax]`` and the dequantized value is ``(q - zero_point) * scale``.

- asymmetric: ``qmin = 0, qmax = 2**bits - 1``; the range ``[min(w, 0), max(w, 0)]`` is
  mapped onto it, so ``0.0`` is exactly representable (``q == zero_point``).
- symmetric: ``zero_point = 2**(bits-1)`` and ``q`` in ``[1, 2**bits - 1]`` so the grid is
  ``scale * [-(2**(bits-1) - 1) .. 2**(bits-1) - 1]`` around an exact zero.

Per-channel quantization uses one scale/zero point per slice along axis 0 (output channel /
row). Group-wise quantization (``group_size``) refines that: every row (the weight viewed as
``(shape[0], prod(shape[1:]))``, i.e. output channel x flattened inputs) is cut into runs of
``group_size`` consecutive inputs, the last run possibly shorter, and each run gets its own
scale/zero point; the parameters are stored row-major, ``shape[0] * ceil(cols / group_size)``. Pruned weights (``mask == False``) are excluded from the range and dequantize to exactly
``0.0``; kept weights whose code equals the zero point also become exactly zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from core.recipe.plan import MAX_BITS, MIN_BITS, QuantConfig


@dataclass(frozen=True)
class QuantizedTensor:
    """Integer codes plus the affine parameters to restore a float tensor.

    ``codes`` has the weight's shape, dtype `code_dtype` (uint8 up to 8 bits, else int32: a
    10**9-weight model's 8-bit codes take 1 GB, not 4). ``scale`` (float32) and ``zero_point``
    (int32) have shape ``(1,)`` per-tensor, ``(shape[0],)`` per-channel or
    ``(shape[0] * n_groups(shape, group_size),)`` group-wise. ``mask`` (bool, same
    shape) marks kept weights; ``None`` means dense.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    symmetric: bool
    per_channel: bool
    mask: torch.Tensor | None = None
    group_size: int | None = None

    @property
    def qmin(self) -> int:
        return 1 if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    def dequantize(self) -> torch.Tensor:
        return dequantize(self)


def code_dtype(bits: int) -> torch.dtype:
    """Dtype `quantize` stores ``bits``-bit codes in (unsigned, ``< 2**bits``)."""
    return torch.uint8 if bits <= 8 else torch.int32


def _broadcast(p: torch.Tensor, ndim: int) -> torch.Tensor:
    return p.reshape((-1,) + (1,) * (ndim - 1)) if p.numel() > 1 else p.reshape(())


def _rows_cols(shape: tuple[int, ...] | torch.Size) -> tuple[int, int]:
    """The ``(output channels, flattened inputs)`` matrix view group-wise scales work on."""
    if len(shape) == 0:
        return 1, 1
    return int(shape[0]), math.prod(int(s) for s in shape[1:])


def n_groups(shape: tuple[int, ...] | torch.Size, group_size: int) -> int:
    """Groups per row: ``ceil(cols / group_size)`` (at least 1)."""
    return max(1, -(-_rows_cols(shape)[1] // group_size))


def n_quant_params(
    shape: tuple[int, ...] | torch.Size, *, per_channel: bool, group_size: int | None = None
) -> int:
    """Number of (scale, zero point) pairs a tensor of ``shape`` is quantized with."""
    if group_size is not None:
        return _rows_cols(shape)[0] * n_groups(shape, group_size)
    return int(shape[0]) if (per_channel and len(shape) >= 1) else 1


def expand_params(p: torch.Tensor, shape: torch.Size, group_size: int | None) -> torch.Tensor:
    """``p`` (one value per tensor/channel/group) broadcastable against a tensor of ``shape``."""
    if group_size is None:
        return _broadcast(p, len(shape))
    rows, cols = _rows_cols(shape)
    per_row = p.reshape(rows, n_groups(shape, group_size))
    return per_row.repeat_interleave(group_size, dim=1)[:, :cols].reshape(shape)


def _grouped(t: torch.Tensor, group_size: int, fill: float | bool) -> torch.Tensor:
    """``t`` as ``(rows * n_groups, group_size)``, the last group of each row padded."""
    rows, cols = _rows_cols(t.shape)
    g = n_groups(t.shape, group_size)
    flat = t.reshape(rows, cols)
    pad = g * group_size - cols
    if pad:
        flat = torch.cat([flat, torch.full((rows, pad), fill, dtype=t.dtype)], dim=1)
    return flat.reshape(rows * g, group_size)


def quant_params(
    w: torch.Tensor,
    bits: int,
    *,
    symmetric: bool,
    per_channel: bool,
    mask: torch.Tensor | None,
    group_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (int32) for ``w`` restricted to ``mask``.

    With ``group_size`` one pair per (row, group of ``group_size`` inputs), row-major.
    """
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in {MIN_BITS}..{MAX_BITS}, got {bits}")
    w = w.detach().to(torch.float32)
    if group_size is not None:
        keep = torch.ones_like(w, dtype=torch.bool) if mask is None else mask.to(torch.bool)
        # padding is excluded like pruned weights, so short last groups get their own range
        return quant_params(
            _grouped(w, group_size, 0.0),
            bits,
            symmetric=symmetric,
            per_channel=True,
            mask=_grouped(keep, group_size, False),
        )
    if per_channel and w.ndim >= 1 and w.shape[0] > 0:
        rows = int(w.shape[0])
        flat_all = w.reshape(rows, -1)
        mask_all = None if mask is None else mask.reshape(rows, -1)
        # blocks of rows (each row's range alone): bounded temporaries at 10**8 weights
        step = max(1, _DEQUANT_CHUNK // max(1, int(flat_all.shape[1])))
        big = torch.finfo(torch.float32).max
        los, his = [], []
        for r0 in range(0, rows, step):
            flat = flat_all[r0 : r0 + step]
            finite = torch.isfinite(flat)
            k = finite if mask_all is None else (finite & mask_all[r0 : r0 + step])
            lo = torch.where(k, flat, torch.full_like(flat, big)).amin(dim=1)
            hi = torch.where(k, flat, torch.full_like(flat, -big)).amax(dim=1)
            empty = ~k.any(dim=1)
            los.append(torch.where(empty, torch.zeros_like(lo), lo))
            his.append(torch.where(empty, torch.zeros_like(hi), hi))
        lo = los[0] if len(los) == 1 else torch.cat(los)
        hi = his[0] if len(his) == 1 else torch.cat(his)
    else:
        finite = torch.isfinite(w)
        keep = finite if mask is None else (finite & mask)
        vals = w[keep]
        lo = vals.min().reshape(1) if vals.numel() else torch.zeros(1)
        hi = vals.max().reshape(1) if vals.numel() else torch.zeros(1)
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    if symmetric:
        half = 2 ** (bits - 1) - 1
        absmax = torch.maximum(-lo, hi)
        scale = absmax / half
        zp = torch.full_like(scale, 2 ** (bits - 1), dtype=torch.int32)
    else:
        qmax = 2**bits - 1
        scale = (hi - lo) / qmax
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        zp = torch.clamp(torch.round(-lo / safe), 0, qmax).to(torch.int32)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(torch.float32)
    return scale, zp


def quantize(
    w: torch.Tensor,
    bits: int,
    *,
    symmetric: bool = True,
    per_channel: bool = False,
    mask: torch.Tensor | None = None,
    group_size: int | None = None,
) -> QuantizedTensor:
    """Quantize ``w`` (after pruning: pass the keep ``mask``) to ``bits``-bit codes.

    ``group_size``: one scale/zero point per run of that many inputs of each row (see the
    module docstring); ``None`` keeps per-tensor/per-channel.
    """
    scale, zp = quant_params(
        w, bits, symmetric=symmetric, per_channel=per_channel, mask=mask, group_size=group_size
    )
    s = expand_params(scale, w.shape, group_size)
    z = expand_params(zp, w.shape, group_size)
    qmin = 1 if symmetric else 0
    dtype = code_dtype(bits)

    def codes(wp: torch.Tensor, sp: torch.Tensor, zp_: torch.Tensor, mp: torch.Tensor | None):
        w32 = torch.nan_to_num(wp.detach().to(torch.float32), nan=0.0, posinf=0.0, neginf=0.0)
        q = torch.clamp(torch.round(w32 / sp) + zp_, qmin, 2**bits - 1).to(dtype)
        if mp is not None:
            q = torch.where(mp, q, zp_.to(dtype).expand_as(q))
        return q

    if w.numel() > _DEQUANT_CHUNK and w.ndim >= 1 and w.shape[0] > 1:
        # Block of rows by block of rows (the same values): a few tens of MB of float
        # temporaries instead of five tensor-sized ones at 10**8 weights.
        q = torch.empty(w.shape, dtype=dtype)
        step = max(1, _DEQUANT_CHUNK // max(1, w[0].numel()))
        for r0 in range(0, int(w.shape[0]), step):
            rs = slice(r0, r0 + step)
            q[rs] = codes(
                w[rs],
                s if s.ndim == 0 else s[rs],
                z if z.ndim == 0 else z[rs],
                None if mask is None else mask[rs],
            )
    else:
        q = codes(w, s, z, mask)
    return QuantizedTensor(
        codes=q,
        scale=scale,
        zero_point=zp,
        bits=bits,
        symmetric=symmetric,
        per_channel=per_channel,
        mask=None if mask is None else mask.clone(),
        group_size=group_size,
    )


def quantize_stack(
    w: torch.Tensor,
    bits: int,
    *,
    symmetric: bool = True,
    per_channel: bool = False,
    mask: torch.Tensor | None = None,
    group_size: int | None = None,
) -> tuple[list[QuantizedTensor], torch.Tensor]:
    """`quantize` of each ``w[i]`` of a stack of same-shape tensors (``w.ndim >= 2``), equal
    to calling it one by one, and the stack dequantized.

    One pass for a group of small tensors (a checkpoint may hold 10**5 of them): per-tensor
    parameters are per-row parameters of the ``(B, numel)`` view, per-channel ones of the
    ``(B * rows, rest)`` view, and groups are groups of the same rows.
    """
    b = w.shape[0]
    shape = w.shape[1:]
    rows, cols = _rows_cols(shape)
    if group_size is None and not per_channel:
        view = (b, rows * cols)
    else:
        view = (b * rows, cols)
    w2 = w.reshape(view)
    m2 = None if mask is None else mask.reshape(view)
    q = quantize(
        w2,
        bits,
        symmetric=symmetric,
        per_channel=True,
        mask=m2,
        group_size=group_size,
    )
    codes = q.codes.reshape(w.shape).unbind(0)
    scale = q.scale.reshape(b, -1).unbind(0)
    zp = q.zero_point.reshape(b, -1).unbind(0)
    masks = [None] * b if mask is None else mask.unbind(0)
    out = [
        QuantizedTensor(
            codes=codes[i],
            scale=scale[i],
            zero_point=zp[i],
            bits=bits,
            symmetric=symmetric,
            per_channel=per_channel,
            mask=masks[i],
            group_size=group_size,
        )
        for i in range(b)
    ]
    return out, dequantize(q).reshape(w.shape)


#: Tensors above this many elements are dequantized in blocks of rows (`_dequantize_rows`).
_DEQUANT_CHUNK = 1 << 22


def _dequantize_rows(qt: QuantizedTensor) -> torch.Tensor:
    """`dequantize` block of rows by block of rows, into one float32 output: the same values
    (every element is computed alike), with a few tens of MB of temporaries instead of five
    tensor-sized ones (10**8-weight Embeddings)."""
    shape = qt.codes.shape
    rows = int(shape[0])
    step = max(1, _DEQUANT_CHUNK // max(1, math.prod(int(s) for s in shape[1:])))
    out = torch.empty(shape, dtype=torch.float32)

    def params(p: torch.Tensor, r0: int) -> torch.Tensor:
        # one value per tensor, or per row / per row's groups, in row-major order
        return p if p.numel() == 1 else p.reshape(rows, -1)[r0 : r0 + step].reshape(-1)

    for r0 in range(0, rows, step):
        part = QuantizedTensor(
            codes=qt.codes[r0 : r0 + step],
            scale=params(qt.scale, r0),
            zero_point=params(qt.zero_point, r0),
            bits=qt.bits,
            symmetric=qt.symmetric,
            per_channel=qt.per_channel,
            mask=None if qt.mask is None else qt.mask[r0 : r0 + step],
            group_size=qt.group_size,
        )
        out[r0 : r0 + step] = dequantize(part)
    return out


def dequantize(qt: QuantizedTensor) -> torch.Tensor:
    """Float32 tensor ``(codes - zero_point) * scale``; masked-out positions are exactly 0."""
    shape = qt.codes.shape
    if qt.codes.numel() > _DEQUANT_CHUNK and len(shape) >= 1 and shape[0] > 1:
        return _dequantize_rows(qt)
    s = expand_params(qt.scale, qt.codes.shape, qt.group_size)
    z = expand_params(qt.zero_point, qt.codes.shape, qt.group_size)
    # int32 first: uint8 codes minus a 0-d zero point would stay uint8 and wrap around
    w = (qt.codes.to(torch.int32) - z).to(torch.float32) * s
    if qt.mask is not None:
        w = torch.where(qt.mask, w, torch.zeros_like(w))
    return w


def fake_quantize(
    w: torch.Tensor, cfg: QuantConfig, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Quantize-dequantize ``w`` with a straight-through gradient (for quantization-aware tuning)."""
    if cfg.bits is None:
        return w if mask is None else w * mask
    with torch.no_grad():
        qt = quantize(
            w,
            cfg.bits,
            symmetric=cfg.symmetric,
            per_channel=cfg.per_channel,
            mask=mask,
            group_size=cfg.group_size,
        )
        deq = dequantize(qt)
    out = w + (deq - w).detach()
    return out if mask is None else out * mask


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (``inf`` when identical)."""
    ref = reference.detach().to(torch.float64)
    err = (approx.detach().to(torch.float64) - ref).pow(2).sum().item()
    sig = ref.pow(2).sum().item()
    if err == 0.0:
        return math.inf
    if sig == 0.0:
        return -math.inf
    return 10.0 * math.log10(sig / err)
