"""Restoring a decoded archive into a model: the base's architecture with every parameter
and buffer replaced (and physically removed channels removed again)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch

from core.base.errors import ModelLoadError, WorkbenchError
from core.base.limits import (
    escape_name,
)
from core.base.model import LoadedModel
from core.ops.pruning import remove_channels_

#: Value of ``__metadata__["format"]`` identifying our archives.
from core.packed.reader import PackedArchive, _recorded_input


def reapply_removal(loaded: LoadedModel, archive: PackedArchive) -> None:
    """Re-shape the freshly loaded base like the compressed model (channels physically removed)."""

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
