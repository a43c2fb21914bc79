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
import gc
import itertools
import json
import math
import sys
from collections.abc import Callable, Iterator
from json.encoder import encode_basestring_ascii
from typing import Any

import numpy as np
import torch

from core.analysis.inventory import float_param_count, iter_inventory
from core.base.limits import escape_name
from core.base.memory import MappedPages
from core.base.model import LayerInfo, LoadedModel
from core.io.data import check_data, load_data
from core.io.model_io import get_tensor, load_model

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
        # (d * d).sum(), not np.dot: the same pairwise sum `_bulk_weight_stats` does per row.
        stats["std"] = math.sqrt(float((d * d).sum()) / values.size) if values.size > 1 else 0.0
    stats["nonfinite"] = nonfinite
    sparsity = (a.size - np.count_nonzero(a)) / a.size if a.size else 0.0
    return {"stats": stats, "sparsity": float(sparsity)}


#: Tensors up to this many elements are summarised together, one numpy call per group of the
#: same dtype and shape (checkpoints with 10**5-10**6 tiny tensors).
_BULK_MAX = 1024


def _bulk_weight_stats(tensors: list[torch.Tensor]) -> list[dict[str, Any]]:
    """`weight_stats` of every tensor in ``tensors``, equal to calling it one by one.

    Same-dtype, same-shape tensors of at most `_BULK_MAX` elements are stacked into one
    ``(k, n)`` float64 array and reduced per row: each row's sum is the same pairwise sum
    `_small_weight_stats` does on the tensor alone. Rows holding NaN/Inf, and everything else,
    go through `weight_stats`.
    """
    out: list[dict[str, Any] | None] = [None] * len(tensors)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, t in enumerate(tensors):
        n = t.numel()
        if 1 <= n <= _BULK_MAX:
            groups.setdefault((t.dtype, t.shape), []).append(i)
        else:
            out[i] = weight_stats(t)
    with torch.no_grad():
        for (_, shape), idx in groups.items():
            if len(idx) == 1:
                out[idx[0]] = weight_stats(tensors[idx[0]])
                continue
            n = math.prod(shape)
            stacked = torch.stack([tensors[i] for i in idx]).reshape(len(idx), n)
            # The float64 copy in numpy where it can: torch would hand the large conversion to
            # its OpenMP workers, which cost milliseconds per call on a busy machine.
            if stacked.dtype in (torch.float16, torch.float32, torch.float64):
                a = stacked.numpy().astype(np.float64)
            else:
                a = stacked.to(torch.float64).numpy()
            finite_rows = np.isfinite(a).all(axis=1)
            zeros = n - np.count_nonzero(a, axis=1)
            with np.errstate(invalid="ignore", over="ignore"):  # NaN rows are redone below
                lo, hi = a.min(axis=1), a.max(axis=1)
                mean = a.sum(axis=1) / n
                d = a - mean[:, None]
                var = (d * d).sum(axis=1) / n
                std = np.sqrt(var) if n > 1 else np.zeros(len(idx))
            for row, i in enumerate(idx):
                if not finite_rows[row]:
                    out[i] = weight_stats(tensors[i])
                    continue
                out[i] = {
                    "stats": {
                        "min": float(lo[row]),
                        "max": float(hi[row]),
                        "mean": float(mean[row]),
                        "std": float(std[row]),
                        "nonfinite": 0,
                    },
                    "sparsity": int(zeros[row]) / n,
                }
    return out  # type: ignore[return-value]


def weight_stats(t: torch.Tensor) -> dict[str, Any]:
    """min/max/mean/std over the finite values of ``t``, the non-finite count and sparsity."""
    x = t.detach()
    if x.numel() <= _NUMPY_MAX:
        return _small_weight_stats(x)
    if x.numel() > _STATS_CHUNK:
        return _chunked_weight_stats(x)
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


#: Tensors above this many elements are summarised chunk by chunk (`_chunked_weight_stats`).
_STATS_CHUNK = 1 << 22


def _chunked_weight_stats(x: torch.Tensor) -> dict[str, Any]:
    """`weight_stats` of a large tensor in chunks of `_STATS_CHUNK` elements: float64 and mask
    temporaries stay a few tens of MB instead of 2-3x the tensor (an Embedding of 10**8
    weights). Two passes (sum, then squared deviations from the mean), like ``torch.std``."""
    flat = x.reshape(-1)
    numel = flat.numel()
    bounds = range(0, numel, _STATS_CHUNK)

    def finite_chunk(start: int) -> tuple[torch.Tensor, int, int]:
        c = flat[start : start + _STATS_CHUNK]
        zeros = c.numel() - int(torch.count_nonzero(c))
        c = c.to(torch.float64)
        fin = torch.isfinite(c)
        bad = c.numel() - int(torch.count_nonzero(fin))
        return (c[fin] if bad else c), bad, zeros

    n = nonfinite = zeros = 0
    lo, hi, total = math.inf, -math.inf, 0.0
    for start in bounds:
        c, bad, z = finite_chunk(start)
        nonfinite += bad
        zeros += z
        if c.numel():
            n += c.numel()
            lo, hi = min(lo, float(c.min())), max(hi, float(c.max()))
            total += float(c.sum())
    stats: dict[str, Any] = {"min": None, "max": None, "mean": None, "std": None}
    if n:
        mean = total / n
        sq = 0.0
        if n > 1:
            for start in bounds:
                c = finite_chunk(start)[0]
                sq += float((c - mean).square_().sum())
        stats.update(min=lo, max=hi, mean=mean, std=math.sqrt(sq / n) if n > 1 else 0.0)
    stats["nonfinite"] = nonfinite
    return {"stats": stats, "sparsity": zeros / numel}


#: Layers summarised per step when streaming (`_LayerStream`).
_CHUNK = 16384


class _LayerStream:
    """The ``layers`` of `describe` as a re-iterable stream: each pass walks the inventory in
    chunks of `_CHUNK` rows and yields their layer objects, so printing 10**6 layers never
    holds them all (an iteration recomputes the statistics)."""

    def __init__(self, loaded: LoadedModel):
        self._loaded = loaded

    def __iter__(self) -> Iterator[dict[str, Any]]:
        module = self._loaded.module
        rows = iter_inventory(self._loaded)
        pages = MappedPages()
        while chunk := list(itertools.islice(rows, _CHUNK)):
            tensors = [
                get_tensor(module, r.tensor if r.tensor is not None else r.param_names[0])
                for r in chunk
            ]
            for row, ws in zip(chunk, _chunk_stats(tensors, pages), strict=True):
                yield _layer_json(row, ws)


#: Tensors of at least this many elements are summarised alone (`_chunk_stats`).
_ALONE_NUMEL = 1 << 16


def _chunk_stats(tensors: list[torch.Tensor], pages: MappedPages) -> list[dict[str, Any]]:
    """`_bulk_weight_stats` of ``tensors``; large ones one at a time, each one's pages of a
    mapped checkpoint given back after it (the pass never holds the whole file)."""
    alone = {i for i, t in enumerate(tensors) if t.numel() >= _ALONE_NUMEL}
    rest = [i for i in range(len(tensors)) if i not in alone]
    out = dict(zip(rest, _bulk_weight_stats([tensors[i] for i in rest]), strict=True))
    for i in sorted(alone):
        out[i] = weight_stats(tensors[i])
        pages.release(tensors[i])
    return [out[i] for i in range(len(tensors))]


def describe(loaded: LoadedModel, *, stream: bool = False) -> dict[str, Any]:
    """The ``--json`` object (without ``data``) for an opened model.

    ``stream=True``: ``layers`` is a re-iterable stream instead of a list (for printing
    models with 10**5-10**6 layers; see `_LayerStream`).
    """
    layers: Any = _LayerStream(loaded)
    if not stream:
        layers = list(layers)
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


#: Layers whose cells set the table's column widths.
_WIDTH_ROWS = 4096


def _table_lines(desc: dict[str, Any]) -> Iterator[str]:
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
    # Two passes over the layers (widths, then lines): a streamed ``layers`` is never held.
    # The widths come from the first `_WIDTH_ROWS` layers (a later, longer cell pushes its own
    # row wider): a full first pass would double the time for 10**6 layers.
    widths = [len(c) for c in cols]
    any_rows = False
    for k, layer in enumerate(desc["layers"]):
        if k >= _WIDTH_ROWS:
            break
        any_rows = True
        for i, cell in enumerate(_cells(layer)):
            if len(cell) > widths[i]:
                widths[i] = len(cell)
    right = {3, 5, 6, 7, 8, 9}

    def fmt(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    yield from head
    if any_rows:
        yield ""
        yield fmt(cols)
        yield fmt(tuple("-" * w for w in widths))
        for layer in desc["layers"]:
            yield fmt(_cells(layer))
    else:
        yield ""
        yield "layers  none: the model has 0 parameters"
    if "data" in desc:
        yield ""
        yield f"data    {desc['data']['summary']}"


def _table(desc: dict[str, Any]) -> str:
    return "\n".join(_table_lines(desc))


def _cells(layer: dict[str, Any]) -> tuple[str, ...]:
    s = layer["weight_stats"]
    return (
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


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def _scalar_json(v: Any) -> str:
    """One JSON scalar exactly as ``json.dumps`` writes it (non-finite floats as ``null``)."""
    t = type(v)
    if t is float:
        return float.__repr__(v) if math.isfinite(v) else "null"
    if t is str:
        return encode_basestring_ascii(v)
    if t is int:
        return int.__repr__(v)
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    raise TypeError(t.__name__)


_LAYER_KEYS = (
    "name", "type", "tensor", "shape", "params", "bytes", "dtype", "groups", "prunable",
    "sparsity", "weight_stats",
)  # fmt: skip
_STATS_KEYS = ("min", "max", "mean", "std", "nonfinite")
#: `_layer_json`'s layout as ``json.dumps(indent=2)`` writes it inside the ``layers`` list.
_LAYER_TEMPLATE = (
    "{\n      "
    + ",\n      ".join(f'"{k}": %s' for k in _LAYER_KEYS[:-1])
    + ',\n      "weight_stats": {\n        '
    + ",\n        ".join(f'"{k}": %s' for k in _STATS_KEYS)
    + "\n      }\n    }"
)


def _layer_text(layer: dict[str, Any]) -> str:
    """One layer object formatted exactly like ``json.dumps(..., indent=2)`` inside the
    top-level ``layers`` list.

    The pure-Python encoder that ``indent`` forces costs ~20 us per layer; this writes the
    fixed layer layout (scalars, lists and dicts of scalars) directly. Raises ``TypeError`` for
    anything else.
    """
    if tuple(layer) == _LAYER_KEYS:
        ws = layer["weight_stats"]
        shape = layer["shape"]
        if (
            type(ws) is dict
            and tuple(ws) == _STATS_KEYS
            and type(shape) is list
            and type(layer["prunable"]) is bool
        ):
            return _LAYER_TEMPLATE % (
                _scalar_json(layer["name"]),
                _scalar_json(layer["type"]),
                _scalar_json(layer["tensor"]),
                "[\n        " + ",\n        ".join(map(_scalar_json, shape)) + "\n      ]"
                if shape
                else "[]",
                _scalar_json(layer["params"]),
                _scalar_json(layer["bytes"]),
                _scalar_json(layer["dtype"]),
                _scalar_json(layer["groups"]),
                "true" if layer["prunable"] else "false",
                _scalar_json(layer["sparsity"]),
                _scalar_json(ws["min"]),
                _scalar_json(ws["max"]),
                _scalar_json(ws["mean"]),
                _scalar_json(ws["std"]),
                _scalar_json(ws["nonfinite"]),
            )
    i2, i3, i4 = "\n    ", "\n      ", "\n        "
    items = []
    for key, v in layer.items():
        if type(v) is list:
            body = f"[{i4}" + f",{i4}".join(map(_scalar_json, v)) + f"{i3}]" if v else "[]"
        elif type(v) is dict:
            body = (
                "{"
                + ",".join(
                    f"{i4}{encode_basestring_ascii(k)}: {_scalar_json(x)}" for k, x in v.items()
                )
                + f"{i3}}}"
                if v
                else "{}"
            )
        else:
            body = _scalar_json(v)
        items.append(f"{i3}{encode_basestring_ascii(key)}: {body}")
    return "{" + ",".join(items) + i2 + "}"


def _write_json(desc: dict[str, Any], write: Callable[[str], Any]) -> None:
    """Write ``json.dumps(_json_safe(desc), indent=2, allow_nan=False)`` through ``write``,
    with the ``layers`` (a list or a stream) formatted by `_layer_text` as they come."""
    marker = "\x00layers\x00"
    head = json.dumps(_json_safe({**desc, "layers": marker}), indent=2, allow_nan=False)
    before, found, after = head.partition(json.dumps(marker))
    if not found or json.dumps(marker) in after:
        layers = list(desc["layers"])  # the marker text occurs elsewhere: plain json
        write(json.dumps(_json_safe({**desc, "layers": layers}), indent=2, allow_nan=False))
        return
    write(before)
    sep = "[\n    "
    batch: list[str] = []
    for layer in desc["layers"]:
        try:
            text = _layer_text(layer)
        except TypeError:  # an unexpected value type: let json format this one
            text = json.dumps(_json_safe(layer), indent=2, allow_nan=False).replace("\n", "\n    ")
        batch.append(sep + text)
        sep = ",\n    "
        if len(batch) >= 4096:
            write("".join(batch))
            batch.clear()
    write("".join(batch) + ("\n  ]" if sep != "[\n    " else "[]"))
    write(after)


def _dumps(desc: dict[str, Any]) -> str:
    """``json.dumps(_json_safe(desc), indent=2, allow_nan=False)``, fast for 10**5+ layers."""
    parts: list[str] = []
    _write_json(desc, parts.append)
    return "".join(parts)


def run(args: argparse.Namespace) -> int:
    loaded = load_model(
        args.model, trust=args.trust, architecture=args.architecture, base=args.base
    )
    # The model lives until the command ends: keep the collector from walking its objects
    # (10**6 tensors) on every full collection while the layers stream out.
    gc.freeze()
    for note in loaded.metadata.get("notes", ()):
        # stderr: --json output on stdout stays one valid JSON object.
        print(f"workbench inspect: warning: {note}", file=sys.stderr)
    desc = describe(loaded, stream=True)
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
        _write_json(desc, sys.stdout.write)
        sys.stdout.write("\n")
    else:
        for line in _table_lines(desc):
            sys.stdout.write(line + "\n")
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
