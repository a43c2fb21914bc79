"""The method registry: one entry per pruning criterion and per quantizer.

Everything that depends on *which* criterion a layer uses — the score the engine thresholds,
whether the analysis needs gradients, whether the preview counts channels or weights, whether a
model-wide setting may pool layers globally, the menu label and the help text in the window and
in ``workbench compress --help`` — is read from here. Nothing else compares method names, so
a new criterion is one `register_prune_method` call plus its tests.

A score is a function ``score(weight_f32, grad) -> scores`` returning non-negative float32
scores (NaN where the weight or its gradient is NaN); a weight (or, for channel methods, an
output channel) is pruned when its score is below the threshold.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from core.base.errors import CompressionError, RecipeError

ScoreFn = Callable[[torch.Tensor, Any], torch.Tensor]


@dataclass(frozen=True)
class PruneMethod:
    """One pruning criterion.

    Attributes
    ----------
    name
        The recipe/CLI spelling (``"magnitude"``).
    label
        The menu label in the window.
    help
        One sentence: tooltips and ``--help``.
    score
        ``score(weight, grad)``; ``None`` for methods without a threshold (``none``, ``nm``).
    needs_gradients
        The score uses per-weight gradient statistics, so the analysis needs labelled data and
        a forward pass.
    structured
        Whole output channels (rows) are pruned; scores have shape ``(shape[0],)`` and the
        preview counts channels. Such layers can be physically shrunk.
    semi_structured
        A fixed pattern per group (N:M); the sparsity is ``n / m``, not a free target.
    layer_scope_only
        A model-wide setting of this method cannot pool layers into one global threshold.
    needs_calibration
        The mask is chosen and the kept weights are updated from calibration inputs
        (`core.compress.second_order`); ``score`` then only sizes the per-layer count for the preview.
    score_alias
        The method whose analysed score index this one shares (same score, no second index).
    """

    name: str
    label: str
    help: str
    score: ScoreFn | None = None
    needs_gradients: bool = False
    structured: bool = False
    semi_structured: bool = False
    layer_scope_only: bool = False
    needs_calibration: bool = False
    score_alias: str | None = None

    @property
    def has_score(self) -> bool:
        return self.score is not None

    @property
    def prunes(self) -> bool:
        """False only for the "keep every weight" entry."""
        return self.score is not None or self.semi_structured


@dataclass(frozen=True)
class Quantizer:
    """One quantization method (rounding rule onto the affine grid)."""

    name: str
    label: str
    help: str
    needs_data: bool = False


_PRUNE: dict[str, PruneMethod] = {}
_QUANT: dict[str, Quantizer] = {}


def register_prune_method(method: PruneMethod) -> PruneMethod:
    """Add ``method`` to the registry (its name must be new)."""
    if method.name in _PRUNE:
        raise ValueError(f"pruning method {method.name!r} is already registered")
    _PRUNE[method.name] = method
    return method


def register_quantizer(quantizer: Quantizer) -> Quantizer:
    """Add ``quantizer`` to the registry (its name must be new)."""
    if quantizer.name in _QUANT:
        raise ValueError(f"quantizer {quantizer.name!r} is already registered")
    _QUANT[quantizer.name] = quantizer
    return quantizer


def prune_method(name: str) -> PruneMethod:
    """The registry entry of ``name``; `RecipeError` naming the known methods otherwise."""
    try:
        return _PRUNE[name]
    except (KeyError, TypeError):
        raise RecipeError(
            f"unknown pruning method {name!r}",
            hint=f"use one of: {', '.join(_PRUNE)}",
        ) from None


def prune_methods() -> tuple[PruneMethod, ...]:
    """Every registered pruning criterion, in registration (menu) order."""
    return tuple(_PRUNE.values())


def prune_method_names(**flags: bool) -> tuple[str, ...]:
    """Names of the methods whose attributes equal ``flags`` (``structured=True`` ...)."""
    return tuple(
        m.name for m in _PRUNE.values() if all(getattr(m, k) == v for k, v in flags.items())
    )


def quantizer(name: str) -> Quantizer:
    try:
        return _QUANT[name]
    except (KeyError, TypeError):
        raise RecipeError(
            f"unknown quantizer {name!r}", hint=f"use one of: {', '.join(_QUANT)}"
        ) from None


def quantizers() -> tuple[Quantizer, ...]:
    return tuple(_QUANT.values())


# --------------------------------------------------------------------------- scores


def channel_rows(weight: torch.Tensor) -> torch.Tensor:
    """The ``(output channels, rest)`` view every channel statistic is taken over."""
    if weight.ndim == 0:
        return weight.reshape(1, 1)
    return weight.reshape(weight.shape[0], math.prod(weight.shape[1:]))


#: Values per block of the channel L1 pass (a reused 16 MiB buffer).
_NORM_BLOCK = 1 << 22


def _channel_l1(w: torch.Tensor, grad: Any = None) -> torch.Tensor:
    """Per-row L1 norm, block by block through a reused buffer (``vector_norm(ord=1)`` and a
    full-size ``abs()`` temporary are both several times slower on large tensors)."""
    rows = channel_rows(w.contiguous())
    out = torch.empty(rows.shape[0], dtype=rows.dtype)
    step = max(1, _NORM_BLOCK // max(rows.shape[1], 1))
    buf = torch.empty((min(step, rows.shape[0]), rows.shape[1]), dtype=rows.dtype)
    for i in range(0, rows.shape[0], step):
        part = rows[i : i + step]
        b = buf[: part.shape[0]]
        torch.abs(part, out=b)
        torch.sum(b, dim=1, out=out[i : i + step])
    return out


def _channel_l2(w: torch.Tensor, grad: Any = None) -> torch.Tensor:
    return torch.linalg.vector_norm(channel_rows(w.contiguous()), 2, dim=1)


def _magnitude(w: torch.Tensor, grad: Any = None) -> torch.Tensor:
    return w.abs()


def _checked_grad(name: str, w: torch.Tensor, grad: Any) -> Any:
    if grad is None:
        raise CompressionError(
            f"method {name!r} needs gradient statistics",
            hint="load data and run the analysis with gradients, or use magnitude pruning",
        )
    if tuple(grad.mean.shape) != tuple(w.shape):
        raise CompressionError(
            f"gradient statistics of shape {tuple(grad.mean.shape)} do not match the "
            f"weight's shape {tuple(w.shape)}",
            hint="analyze this model again",
        )
    return grad


def _gradient_stability(w: torch.Tensor, grad: Any) -> torch.Tensor:
    g = _checked_grad("gradient_stability", w, grad)
    return torch.maximum(g.mean.abs(), g.std)


def _taylor(w: torch.Tensor, grad: Any) -> torch.Tensor:
    g = _checked_grad("taylor", w, grad)
    return w.abs() * torch.hypot(g.mean, g.std)


register_prune_method(PruneMethod("none", "None", "Keep every weight."))
register_prune_method(
    PruneMethod(
        "magnitude",
        "Magnitude |w|",
        "Prune weights whose absolute value |w| is below the threshold.",
        score=_magnitude,
    )
)
register_prune_method(
    PruneMethod(
        "gradient_stability",
        "Gradient stability",
        "Prune weights whose gradient is consistently near zero: score = max(|mean g|, std g) "
        "over the recorded batches; a weight is pruned when both its gradient mean and its "
        "gradient spread are below the threshold.",
        score=_gradient_stability,
        needs_gradients=True,
    )
)
register_prune_method(
    PruneMethod(
        "taylor",
        "Taylor |w·g|",
        "First-order Taylor: prune weights whose estimated loss change "
        "|w| * sqrt(mean(g^2)) is below the threshold.",
        score=_taylor,
        needs_gradients=True,
    )
)
register_prune_method(
    PruneMethod(
        "channel_l1",
        "Channel L1",
        "Prune whole output channels/rows whose L1 norm is smallest.",
        score=_channel_l1,
        structured=True,
        layer_scope_only=True,
    )
)
register_prune_method(
    PruneMethod(
        "channel_l2",
        "Channel L2",
        "Prune whole output channels/rows whose L2 norm is smallest.",
        score=_channel_l2,
        structured=True,
        layer_scope_only=True,
    )
)
register_prune_method(
    PruneMethod(
        "nm",
        "N:M (2:4)",
        "N:M semi-structured: in every group of M consecutive input weights keep the M-N "
        "largest (2:4 keeps 2 of 4).",
        semi_structured=True,
        layer_scope_only=True,
    )
)

register_prune_method(
    PruneMethod(
        "obs",
        "OBS / SparseGPT",
        "Second-order one-shot pruning (SparseGPT): per layer, the mask is chosen by the OBS "
        "saliency w^2 / [H^-1]_qq of the inputs' Gram matrix H and the kept weights are updated "
        "to compensate; needs calibration data. Per-layer counts follow magnitude.",
        score=_magnitude,
        needs_calibration=True,
        score_alias="magnitude",
    )
)
register_prune_method(
    PruneMethod(
        "obs_nm",
        "OBS N:M (2:4)",
        "N:M semi-structured pattern chosen by the OBS saliency, kept weights updated to "
        "compensate (SparseGPT); needs calibration data.",
        semi_structured=True,
        layer_scope_only=True,
        needs_calibration=True,
    )
)

register_quantizer(
    Quantizer(
        "rtn",
        "Round to nearest",
        "Uniform affine quantization: each weight is rounded to the nearest grid level.",
    )
)
register_quantizer(
    Quantizer(
        "gptq",
        "GPTQ",
        "Columns are rounded one after another; each rounding error is compensated on the "
        "not yet rounded columns through the inverse Hessian of the layer's inputs (GPTQ); "
        "needs calibration data.",
        needs_data=True,
    )
)


def score_tensor(method: str, weight: torch.Tensor, grad: Any) -> torch.Tensor:
    """The importance score ``method`` thresholds (pruned iff ``score < threshold``).

    Returns float32 scores ``>= 0`` (NaN where the weight or its gradient is NaN): the
    weight's shape for per-weight methods, ``(shape[0],)`` for channel methods.
    """
    entry = prune_method(method)
    if entry.score is None:
        raise ValueError(
            f"method {method!r} has no score (methods with scores: "
            f"{prune_method_names(has_score=True)})"
        )
    w = weight.detach()
    if w.dtype != torch.float32:
        w = w.to(torch.float32)
    return entry.score(w, grad)
