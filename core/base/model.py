"""Value objects describing an opened model and its layers (produced by model_io / inventory)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from core.base.errors import CompressionError

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
        `core.io.model_io.WeightsOnlyModule` tree that mirrors the checkpoint's names and has no
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


def forward(loaded: LoadedModel, x: torch.Tensor) -> torch.Tensor:
    """Run ``loaded`` on a batch of any size and return its (first) output tensor.

    ``.pt2`` programs exported with a static batch size (``metadata["fixed_batch"]``) only
    accept that many samples; the batch is cut into such chunks, the last one padded by
    repeating its final sample, and the padding's outputs are dropped. Gradient mode is the
    caller's choice (padding repeats a real sample, so gradient users should weight the loss of
    padded rows by zero or pick batch sizes that are multiples of ``fixed_batch``).
    """
    fixed = loaded.metadata.get("fixed_batch")
    n = int(x.shape[0])
    if not fixed or n == fixed:
        return first_tensor(loaded.module(x))
    outs = []
    for start in range(0, n, fixed):
        chunk = x[start : start + fixed]
        real = int(chunk.shape[0])
        if real < fixed:
            pad = chunk[-1:].expand(fixed - real, *chunk.shape[1:])
            chunk = torch.cat([chunk, pad])
        outs.append(first_tensor(loaded.module(chunk))[:real])
    return torch.cat(outs)


def first_tensor(out: Any) -> torch.Tensor:
    """The primary tensor of a model output (tensors, tuples/lists, dicts, namedtuples)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, tuple | list):
        for item in out:
            if isinstance(item, torch.Tensor | tuple | list | dict):
                try:
                    return first_tensor(item)
                except CompressionError:
                    continue
    raise CompressionError(
        f"the model returned {type(out).__name__}, not a tensor",
        hint="evaluation and fine-tuning need a model whose output is a tensor",
    )
