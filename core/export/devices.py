"""Device profiles: will the compressed model fit on a Raspberry Pi, a phone, a microcontroller?

A profile (``resources/devices.json``, user-editable, or any file of the same shape) gives a
device class's memory for activations (and for weights: shared with activations unless
``weight_memory`` names a separate store such as a microcontroller's flash, from which weights
are read in place), its storage, the export formats and dtypes it runs, and a compute figure
relative to an x86 server (1.0).

`device_block` judges one compression result against a profile: for every export written in a
format the device runs, the weights as they sit in memory at run time plus the peak activation
memory of one forward pass at batch 1 against the memory, and the file against the storage.

Peak activations are measured with forward hooks as the largest ``input + output`` bytes of
any single leaf module (and of the whole model's input + output). That is the peak of a
runtime that executes one layer at a time and frees each tensor once it is consumed, exact
for a chain of layers; tensors kept alive across layers (skip connections, attention caches)
are not counted, so residual networks can need more. Activations are counted at the dtype
PyTorch computes them in (float32), an upper bound for int8 runtimes that keep them in int8.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core import RESOURCES
from core.base.errors import RecipeError
from core.evaluate import eval_mode
from core.export.formats import EXPORT_FORMATS

#: The catalogue shipped with the workbench.
DEFAULT_DEVICES = RESOURCES / "devices.json"
FORMAT_ID = "workbench.devices"
#: dtypes a profile may list; a format needs the one of its weights.
DTYPES = ("fp32", "fp16", "bf16", "int8", "int4")
#: The dtype a deployed export computes in (onnx-int8: int8 kernels; the rest fp32).
FORMAT_DTYPE = {"onnx-int8": "int8"}
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_KEYS = {
    "name",
    "description",
    "memory",
    "weight_memory",
    "storage",
    "formats",
    "dtypes",
    "relative_compute",
}


class DeviceProfileError(RecipeError):
    """A device catalogue is malformed (the message names the device and the field)."""


@dataclass(frozen=True)
class DeviceProfile:
    """One device class. Sizes in bytes; ``weight_memory`` None: weights share ``memory``."""

    name: str
    description: str
    memory: int
    storage: int
    formats: tuple[str, ...]
    dtypes: tuple[str, ...]
    relative_compute: float
    weight_memory: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "memory_bytes": self.memory,
            "weight_memory_bytes": self.weight_memory,
            "storage_bytes": self.storage,
            "formats": list(self.formats),
            "dtypes": list(self.dtypes),
            "relative_compute": self.relative_compute,
        }


def parse_size(value: Any, *, where: str = "size", path: str | Path | None = None) -> int:
    """Bytes from an int or a string such as ``"256 KiB"`` / ``"1.5 GB"`` (``DeviceProfileError``
    otherwise)."""
    if isinstance(value, bool):
        value = None
    if isinstance(value, int) and value > 0:
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        if m and (m.group(2).lower() or "b") in _UNITS:
            n = float(m.group(1)) * _UNITS[m.group(2).lower() or "b"]
            if n >= 1 and math.isfinite(n):
                return int(n)
    raise DeviceProfileError(
        f"{where}: {value!r} is not a positive size",
        path=path,
        hint="give bytes as an integer or a string such as '256 KiB', '1 MiB', '4 GB'",
    )


def _profile(entry: Any, i: int, path: str | Path | None) -> DeviceProfile:

    if not isinstance(entry, dict):
        raise DeviceProfileError(f"devices[{i}] is not an object", path=path)
    name = entry.get("name")
    if not (isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name)):
        raise DeviceProfileError(
            f"devices[{i}].name: {name!r} is not a name",
            path=path,
            hint="letters, digits, '.', '_' and '-', e.g. 'rpi4'",
        )
    where = f"device {name!r}"
    unknown = sorted(set(entry) - _KEYS)
    if unknown:
        raise DeviceProfileError(
            f"{where}: unknown field {unknown[0]!r}",
            path=path,
            hint=f"known fields: {', '.join(sorted(_KEYS))}",
        )
    for key in ("memory", "storage", "formats", "dtypes", "relative_compute"):
        if key not in entry:
            raise DeviceProfileError(f"{where}: missing field {key!r}", path=path)
    lists = {}
    for key, allowed in (("formats", EXPORT_FORMATS), ("dtypes", DTYPES)):
        items = entry[key]
        if not (isinstance(items, list) and items and all(isinstance(s, str) for s in items)):
            raise DeviceProfileError(
                f"{where}.{key}: expected a non-empty list of strings", path=path
            )
        bad = [s for s in items if s not in allowed]
        if bad:
            raise DeviceProfileError(
                f"{where}.{key}: {bad[0]!r} is not known",
                path=path,
                hint=f"choose from {', '.join(allowed)}",
            )
        lists[key] = tuple(dict.fromkeys(items))
    compute = entry["relative_compute"]
    if isinstance(compute, bool) or not isinstance(compute, int | float):
        compute = None
    if compute is None or not (math.isfinite(compute) and compute > 0):
        raise DeviceProfileError(
            f"{where}.relative_compute: {entry['relative_compute']!r} is not a positive number",
            path=path,
            hint="throughput relative to an x86 server (1.0), e.g. 0.05",
        )
    description = entry.get("description", "")
    if not isinstance(description, str):
        raise DeviceProfileError(f"{where}.description: expected a string", path=path)
    wm = entry.get("weight_memory")
    return DeviceProfile(
        name=name,
        description=description,
        memory=parse_size(entry["memory"], where=f"{where}.memory", path=path),
        storage=parse_size(entry["storage"], where=f"{where}.storage", path=path),
        formats=lists["formats"],
        dtypes=lists["dtypes"],
        relative_compute=float(compute),
        weight_memory=None
        if wm is None
        else parse_size(wm, where=f"{where}.weight_memory", path=path),
    )


def parse_devices(obj: Any, path: str | Path | None = None) -> dict[str, DeviceProfile]:
    """Validate a decoded catalogue; returns name -> profile (`DeviceProfileError` if bad)."""
    if not isinstance(obj, dict) or obj.get("format") != FORMAT_ID:
        raise DeviceProfileError(
            f'not a device catalogue (expected "format": "{FORMAT_ID}")',
            path=path,
            hint=f"start from {DEFAULT_DEVICES}",
        )
    if obj.get("version") != 1:
        raise DeviceProfileError(
            f"unsupported catalogue version {obj.get('version')!r}", path=path, hint="use 1"
        )
    entries = obj.get("devices")
    if not isinstance(entries, list) or not entries:
        raise DeviceProfileError('"devices" must be a non-empty list', path=path)
    out: dict[str, DeviceProfile] = {}
    for i, entry in enumerate(entries):
        prof = _profile(entry, i, path)
        if prof.name in out:
            raise DeviceProfileError(f"device {prof.name!r} is listed twice", path=path)
        out[prof.name] = prof
    return out


def load_devices(path: str | Path | None = None) -> dict[str, DeviceProfile]:
    """Read a device catalogue (default: the shipped ``resources/devices.json``)."""
    path = Path(path) if path is not None else DEFAULT_DEVICES
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DeviceProfileError(
            f"cannot read the device catalogue ({type(exc).__name__})",
            path=path,
            hint="give a readable UTF-8 JSON file",
        ) from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DeviceProfileError(
            f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}", path=path
        ) from None
    return parse_devices(obj, path)


def get_device(name: str, path: str | Path | None = None) -> DeviceProfile:
    """The profile ``name`` of the catalogue at ``path`` (`DeviceProfileError` if absent)."""
    devices = load_devices(path)
    if name not in devices:
        raise DeviceProfileError(
            f"no device {name!r} in the catalogue",
            path=path or DEFAULT_DEVICES,
            hint=f"choose from {', '.join(devices)}",
        )
    return devices[name]


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, tuple | list):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def peak_activation_bytes(module: torch.nn.Module, x: torch.Tensor) -> int:
    """Peak activation memory of one forward pass on ``x``: the largest ``input + output``
    bytes of any leaf module, or of the whole model (see the module docstring for what this
    bound covers)."""
    peak = 0
    handles = []
    # The window measures on the UI thread while a worker may run the same module (an
    # evaluation): only this thread's forward pass counts.
    owner = threading.get_ident()

    def hook(_mod: Any, inputs: Any, output: Any) -> None:
        nonlocal peak
        if threading.get_ident() == owner:
            peak = max(peak, _tensor_bytes(inputs) + _tensor_bytes(output))

    for mod in module.modules():
        if not any(True for _ in mod.children()):
            try:
                handles.append(mod.register_forward_hook(hook))
            except (RuntimeError, AttributeError):  # TorchScript modules take no Python hooks
                pass

    try:
        with torch.no_grad(), eval_mode(module):
            out = module(x)
    finally:
        for h in handles:
            h.remove()
    return max(peak, _tensor_bytes(x) + _tensor_bytes(out))


def runtime_weight_bytes(record: Any, result: Any) -> int:
    """Bytes of weights in memory when the export runs: the file's content, except the packed
    archive, which is restored into a dense PyTorch module (every tensor at its dtype)."""
    if record.format == "packed":
        m = result.compressed.module
        return sum(_tensor_bytes(t) for t in (*m.parameters(), *m.buffers()))
    return int(record.bytes_on_disk)


def device_block(
    profile: DeviceProfile, result: Any, records: Sequence[Any], sample: torch.Tensor | None
) -> dict[str, Any]:
    """The ``device`` block of ``report.json``: does the result fit ``profile``?

    Parameters
    ----------
    profile
        The device class.
    result
        The `core.compress.engine.CompressionResult`.
    records
        The `core.export.formats.ExportRecord`s written (their ``deployed`` latency scales to the
        device by ``relative_compute``).
    sample
        One or more inputs; the first sample measures peak activations at batch 1.

    Returns
    -------
    dict
        ``fits`` (some export fits), ``best`` (the smallest fitting export's format),
        ``peak_activation_bytes``, and per export ``candidates`` with ``weights_bytes``,
        ``memory_needed_bytes``, ``fits`` and the ``reasons`` it does not.
    """
    act = None
    if sample is not None and result.compressed.can_run:
        act = peak_activation_bytes(result.compressed.module, sample[:1])
    candidates = []
    for rec in records:
        reasons = []
        dtype = FORMAT_DTYPE.get(rec.format, "fp32")
        if rec.format not in profile.formats:
            reasons.append(f"format {rec.format} not supported")
        elif dtype not in profile.dtypes:
            reasons.append(f"dtype {dtype} not supported")
        weights = runtime_weight_bytes(rec, result)
        acts = act or 0
        if profile.weight_memory is None:
            need = weights + acts
            if need > profile.memory:
                reasons.append(f"weights + activations {need:,} B > memory {profile.memory:,} B")
        else:
            need = acts
            if weights > profile.weight_memory:
                reasons.append(f"weights {weights:,} B > weight memory {profile.weight_memory:,} B")
            if acts > profile.memory:
                reasons.append(f"activations {acts:,} B > memory {profile.memory:,} B")
        if rec.bytes_on_disk > profile.storage:
            reasons.append(f"file {rec.bytes_on_disk:,} B > storage {profile.storage:,} B")
        lat = None
        dep = getattr(rec, "deployed", None) or {}
        b1 = (dep.get("latency_ms") or {}).get("batch_1")
        if b1:
            lat = b1["median"] / profile.relative_compute
        candidates.append(
            {
                "format": rec.format,
                "file_bytes": rec.bytes_on_disk,
                "weights_bytes": weights,
                "memory_needed_bytes": need,
                "fits": not reasons,
                "reasons": reasons,
                "estimated_latency_ms_batch_1": lat,
            }
        )
    fitting = [c for c in candidates if c["fits"]]
    best = min(fitting, key=lambda c: c["weights_bytes"])["format"] if fitting else None
    return {
        "profile": profile.to_dict(),
        "peak_activation_bytes": act,
        "activation_measure": "max over leaf modules of input+output bytes, batch 1, float32",
        "fits": bool(fitting),
        "best": best,
        "candidates": candidates,
    }


def estimate_fit(
    profile: DeviceProfile, weights_bytes: int, activation_bytes: int | None
) -> dict[str, Any]:
    """Whether a plan's live estimate fits ``profile`` (the window's "fits / does not fit").

    ``weights_bytes``: the packed size the plan gives (the smallest file the workbench
    writes; stored on the device and, for runtimes reading weights in place, its memory).
    ``activation_bytes``: `peak_activation_bytes` at batch 1, None when it cannot be
    measured (weights-only model; only weights are judged then). The same rules as
    `device_block`: weights + activations against ``memory``, or weights against
    ``weight_memory`` and activations against ``memory`` when the profile has one; the file
    against ``storage``. Returns ``fits``, ``reasons``, ``memory_needed_bytes`` and
    ``memory_bytes`` (what the needed memory is compared with).
    """
    acts = activation_bytes or 0
    reasons = []
    if profile.weight_memory is None:
        need = weights_bytes + acts
        if need > profile.memory:
            reasons.append(f"weights + activations {need:,} B > memory {profile.memory:,} B")
    else:
        need = acts
        if weights_bytes > profile.weight_memory:
            reasons.append(
                f"weights {weights_bytes:,} B > weight memory {profile.weight_memory:,} B"
            )
        if acts > profile.memory:
            reasons.append(f"activations {acts:,} B > memory {profile.memory:,} B")
    if weights_bytes > profile.storage:
        reasons.append(f"file {weights_bytes:,} B > storage {profile.storage:,} B")
    return {
        "device": profile.name,
        "fits": not reasons,
        "reasons": reasons,
        "weights_bytes": int(weights_bytes),
        "activation_bytes": activation_bytes,
        "memory_needed_bytes": int(need),
        "memory_bytes": profile.memory,
        "weight_memory_bytes": profile.weight_memory,
        "storage_bytes": profile.storage,
    }


def fits_line(block: Mapping[str, Any]) -> str:
    """One terminal line: ``device rpi4: fits (onnx-int8, ...)`` or why not."""
    name = block["profile"]["name"]
    if block["fits"]:
        best = next(c for c in block["candidates"] if c["format"] == block["best"])
        return (
            f"device {name}: fits as {best['format']} ({best['weights_bytes']:,} B weights, "
            f"{block['peak_activation_bytes'] or 0:,} B peak activations)"
        )
    why = "; ".join(f"{c['format']}: {', '.join(c['reasons'])}" for c in block["candidates"])
    return f"device {name}: does not fit ({why or 'no export written'})"


__all__ = [
    "DEFAULT_DEVICES",
    "DeviceProfile",
    "DeviceProfileError",
    "device_block",
    "estimate_fit",
    "fits_line",
    "get_device",
    "load_devices",
    "parse_devices",
    "parse_size",
    "peak_activation_bytes",
]
