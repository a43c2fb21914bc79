"""Value objects describing an opened model and its layers (produced by model_io / inventory)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

#: Formats `LoadedModel.format` can take.
FORMATS = ("demo", "eager", "torchscript", "pt2", "state_dict", "safetensors", "hf")


@dataclass(frozen=True)
class LoadedModel:
    """An opened model.

    Attributes
    ----------
    module
        Always an ``nn.Module`` whose ``named_parameters()`` are the model's weights: an eager
        module (demo, trusted pickle), a ``torch.jit.ScriptModule``, the ``GraphModule`` of a
        ``torch.export`` program (``ExportedProgram.module()``), or, for weights-only files, a
        `core.model_io.WeightsOnlyModule` tree that mirrors the checkpoint's names and has no
        forward pass.
    format
        One of `FORMATS`.
    source
        The path the model came from, or the demo name (``"demo:mlp"``).
    example_input
        A small batch the model accepts, when known (demos, ``.pt2`` programs); else ``None``.
    weights_only
        True for ``state_dict``/``safetensors`` files: no forward pass is possible.
    task
        ``"classification"`` when outputs are class logits (demos; else decided from data),
        ``"unknown"`` otherwise.
    """

    module: torch.nn.Module
    format: str
    source: str
    name: str
    example_input: torch.Tensor | None = None
    weights_only: bool = False
    task: str = "unknown"
    num_classes: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def can_run(self) -> bool:
        return not self.weights_only


@dataclass(frozen=True)
class LayerInfo:
    """One row of the layer inventory.

    A layer is a module with parameters. Modules with several weight matrices (LSTM/GRU,
    ``MultiheadAttention.in_proj_weight``) get one row per weight matrix, named
    ``"<module>.<param>"`` (``"lstm.weight_ih_l0"``); otherwise ``name`` is the module path
    (``"features.0"``). ``tensor`` is the full parameter name of the compressible weight and is
    the key used by plans, stats, masks and quantization results.
    """

    name: str
    type: str
    tensor: str | None
    shape: tuple[int, ...]
    params: int
    bytes: int
    prunable: bool
    param_names: tuple[str, ...] = ()
    groups: int = 1
    dtype: str = "float32"
