"""``workbench inspect MODEL [--data FILE] [--trust] [--json]``: list every layer with weight stats.

The human output is a table; ``--json`` prints one object::

    {"format": "demo", "source": "demo:mlp", "weights_only": false, "total_params": 50610,
     "total_bytes": 202440,
     "layers": [{"name": "fc1", "type": "Linear", "tensor": "fc1.weight", "shape": [300, 64],
                 "params": 19500, "bytes": 78000, "prunable": true, "sparsity": 0.0,
                 "weight_stats": {"min": ..., "max": ..., "mean": ..., "std": ...,
                                  "nonfinite": 0}}, ...],
     "data": {...}}          # only with --data

``total_params`` counts floating-point parameter values (for weights-only files: every floating
tensor of the checkpoint). Statistics skip non-finite values and report how many there were;
``min``/``max``/``mean``/``std`` are ``null`` when a tensor has no finite value. A packed
archive (``model.packed.safetensors``) opens as the compressed model: ``format`` is ``packed``,
``base_format``/``base_source`` name the model it runs as, and the base's recorded
``test_accuracy`` is left out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

import numpy as np
import torch

from core.data import check_data, load_data
from core.inventory import float_param_count, inventory
from core.limits import escape_name
from core.model import LayerInfo, LoadedModel
from core.model_io import get_tensor, load_model

#: Tensors up to this size are summarised in numpy: with 10**5 tiny tensors torch's per-call
#: overhead, not the arithmetic, is the cost.
_NUMPY_MAX = 1 << 16


def _small_weight_stats(x: torch.Tensor) -> dict[str, Any]:
    """`weight_stats` of a small tensor, in numpy (float64)."""
    a = x.to(torch.float64).reshape(-1).numpy()
    finite = np.isfinite(a)
    nonfinite = int(a.size - np.count_nonzero(finite))
    values = a[finite] if nonfinite else a
    stats: dict[str, Any] = {"min": None, "max": None, "mean": None, "std": None}
    if values.size:
        stats["min"] = float(values.min())
        stats["max"] = float(values.max())
        mean = float(values.sum()) / values.size
        d = values - mean
        stats["mean"] = mean
        stats["std"] = math.sqrt(float(np.dot(d, d)) / values.size) if values.size > 1 else 0.0
    stats["nonfinite"] = nonfinite
    sparsity = (a.size - np.count_nonzero(a)) / a.size if a.size else 0.0
    return {"stats": stats, "sparsity": float(sparsity)}


def weight_stats(t: torch.Tensor) -> dict[str, Any]:
    """min/max/mean/std over the finite values of ``t``, the non-finite count and sparsity."""
    x = t.detach()
    if x.numel() <= _NUMPY_MAX:
        return _small_weight_stats(x)
    if not x.is_floating_point():
        x = x.to(torch.float64)
    finite = torch.isfinite(x)
    nonfinite = int(x.numel() - int(finite.sum()))
    values = x[finite] if nonfinite else x.reshape(-1)
    values = values.to(torch.float64)
    n = values.numel()
    stats: dict[str, Any] = {"min": None, "max": None, "mean": None, "std": None}
    if n:
        stats["min"] = float(values.min())
        stats["max"] = float(values.max())
        stats["mean"] = float(values.mean())
        stats["std"] = float(values.std(unbiased=False)) if n > 1 else 0.0
    stats["nonfinite"] = nonfinite
    sparsity = float((x == 0).sum()) / x.numel() if x.numel() else 0.0
    return {"stats": stats, "sparsity": sparsity}


def describe(loaded: LoadedModel) -> dict[str, Any]:
    """The ``--json`` object (without ``data``) for an opened model."""
    layers = []
    for row in inventory(loaded):
        name = row.tensor if row.tensor is not None else row.param_names[0]
        ws = weight_stats(get_tensor(loaded.module, name))
        layers.append(_layer_json(row, ws))
    out: dict[str, Any] = {
        "source": loaded.source,
        "name": loaded.name,
        "format": loaded.format,
        "weights_only": loaded.weights_only,
        "task": loaded.task,
        "num_classes": loaded.num_classes,
        "total_params": float_param_count(loaded.module),
        "total_bytes": sum(p.numel() * p.element_size() for p in loaded.module.parameters()),
        "layers": layers,
    }
    if loaded.metadata.get("notes"):
        out["notes"] = list(loaded.metadata["notes"])
    if loaded.metadata.get("opened_weights_only_reason"):
        # Why a file that can carry code (TorchScript, packed + base) opened without it.
        out["opened_weights_only_reason"] = str(loaded.metadata["opened_weights_only_reason"])
    if loaded.example_input is not None:
        out["input_shape"] = list(loaded.example_input.shape[1:])
    if isinstance(loaded.metadata.get("hf"), dict):
        # Hugging Face folders: architecture, head kind, pooling and what fidelity measures.
        out["hf"] = dict(loaded.metadata["hf"])
    if loaded.metadata.get("detected") == "packed":
        # A packed archive runs as its base model, so `format` is the base's; say what the file
        # is, and leave out the base's recorded accuracy, which is not the compressed model's.
        out["format"] = "packed"
        out["base_format"] = loaded.format
        out["base_source"] = loaded.metadata.get("packed_source", "")
        return out
    info = loaded.metadata.get("info")
    if isinstance(info, dict) and "test_accuracy" in info:
        out["test_accuracy"] = info["test_accuracy"]
    return out


def _layer_json(row: LayerInfo, ws: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": row.name,
        "type": row.type,
        "tensor": row.tensor,
        "shape": list(row.shape),
        "params": row.params,
        "bytes": row.bytes,
        "dtype": row.dtype,
        "groups": row.groups,
        "prunable": row.prunable,
        "sparsity": ws["sparsity"],
        "weight_stats": ws["stats"],
    }


def _num(v: float | None, fmt: str = "{:+.4f}") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def _table(desc: dict[str, Any]) -> str:
    head = [
        f"model   {escape_name(desc['source'])}",
        f"format  {desc['format']}"
        + (
            f"  (compressed {desc['base_format']} model from {desc['base_source'] or '?'})"
            if "base_format" in desc
            else ""
        )
        + ("  (weights only: no forward pass)" if desc["weights_only"] else ""),
        f"params  {desc['total_params']:,} floating-point values, {desc['total_bytes']:,} bytes",
    ]
    if "opened_weights_only_reason" in desc:
        head.append(f"note    {escape_name(desc['opened_weights_only_reason'])}")
    if "test_accuracy" in desc:
        head.append(f"test accuracy (recorded)  {desc['test_accuracy']:.4f}")
    if "hf" in desc:
        hf = desc["hf"]
        head.append(
            f"hf      {hf['architecture']} ({hf['kind']}); tokenizer "
            f"{'yes' if hf['tokenizer'] else 'no'}; fidelity: {hf['fidelity']}"
        )
    cols = (
        "layer",
        "type",
        "shape",
        "params",
        "prune",
        "sparsity",
        "min",
        "max",
        "std",
        "nonfinite",
    )
    rows = []
    for layer in desc["layers"]:
        s = layer["weight_stats"]
        rows.append(
            (
                # Names come from the file: a newline in one must not forge table rows.
                escape_name(layer["name"]),
                escape_name(layer["type"]) + (f" g={layer['groups']}" if layer["groups"] != 1 else ""),
                "x".join(map(str, layer["shape"])) or "scalar",
                f"{layer['params']:,}",
                "yes" if layer["prunable"] else "no",
                f"{layer['sparsity']:.1%}",
                _num(s["min"]),
                _num(s["max"]),
                _num(s["std"], "{:.4f}"),
                str(s["nonfinite"]),
            )
        )
    widths = [
        max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)
    ]
    right = {3, 5, 6, 7, 8, 9}

    def fmt(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    if rows:
        lines = head + ["", fmt(cols), fmt(tuple("-" * w for w in widths))]
        lines += [fmt(r) for r in rows]
    else:
        lines = head + ["", "layers  none: the model has 0 parameters"]
    if "data" in desc:
        lines += ["", f"data    {desc['data']['summary']}"]
    return "\n".join(lines)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def run(args: argparse.Namespace) -> int:
    loaded = load_model(
        args.model, trust=args.trust, architecture=args.architecture, base=args.base
    )
    for note in loaded.metadata.get("notes", ()):
        # stderr: --json output on stdout stays one valid JSON object.
        print(f"workbench inspect: warning: {note}", file=sys.stderr)
    desc = describe(loaded)
    if args.data is not None:
        data = load_data(args.data, loaded)
        check = check_data(loaded, data)
        desc["data"] = {
            "file": str(args.data),
            "samples": check.samples,
            "x_shape": list(check.x_shape),
            "x_dtype": check.x_dtype,
            "labelled": check.labelled,
            "label_classes": check.label_classes,
            "output_shape": list(check.output_shape) if check.output_shape else None,
            "validated_against_model": check.ran_model,
            "summary": check.summary(),
        }
    if args.json:
        json.dump(_json_safe(desc), sys.stdout, indent=2, allow_nan=False)
        sys.stdout.write("\n")
    else:
        print(_table(desc))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``inspect`` subcommand to the ``workbench`` parser."""
    p = subparsers.add_parser(
        "inspect",
        help="list every layer of a model with its weight statistics",
        description=(
            "Open a model (a file or demo:mlp / demo:cnn) and list every parameterised layer "
            "with its shape, parameter count, prunability, sparsity and weight statistics."
        ),
    )
    p.add_argument(
        "model", metavar="MODEL", help="model file, Hugging Face folder or demo:mlp / demo:cnn"
    )
    p.add_argument(
        "--data",
        metavar="FILE",
        help=".npz or .pt with 'x' and optional integer 'y' (.txt/.jsonl text for a Hugging Face "
        "folder); checked against the model",
    )
    p.add_argument(
        "--trust",
        action="store_true",
        help="allow unpickling a whole pickled nn.Module (runs code from the file: trusted files only)",
    )
    p.add_argument(
        "--arch",
        "--architecture",
        dest="architecture",
        metavar="DEMO",
        help="give a state_dict/safetensors file a demo architecture (demo:mlp or demo:cnn)",
    )
    p.add_argument(
        "--base",
        metavar="MODEL",
        help="packed archives only: the original model that was compressed (gives the "
        "architecture; opened with the same --trust). Without it a packed archive opens "
        "weights-only unless it records a built-in demo",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)
