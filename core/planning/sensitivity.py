"""Sensitivity scans: what compressing one layer alone does to the model's output.

For every prunable layer and every *level* of a grid (sparsity for the chosen criterion x
bit-width x per-tensor/per-channel scales), the layer is compressed exactly as the engine would
(`core.compress.engine.layer_mask`, `core.ops.quantization.quantize`, bias at 8 bits with quantized
weights), every other layer kept, and the model is run on the held-out split:

* with labels and class scores: task-loss (cross-entropy) delta and accuracy delta;
* for a causal language model on text: its next-token loss delta (nats per token, the log
  of the perplexity ratio; `core.io.hf.next_token_loss`), metric ``"lm_loss"``;
* always: output fidelity against the uncompressed outputs (mean per-sample cosine, relative
  L2 error).

The *damage* a point carries (the number the budget solver adds up) is the loss delta for
labelled classifiers and causal language models, else the squared relative L2 error (an error energy, which adds up over
layers with independent errors). Negative deltas (noise) are clipped to zero.

Weights-only checkpoints (no forward pass) or scans without data get a data-free proxy: the
layer's relative error energy ``noise / signal`` (1 / SQNR, from `core.analysis.estimate.preview`),
assumed to reach the output undamped; such scans say ``estimate: true``.

What makes a scan cheap
-----------------------
* The baseline outputs are computed once and reused by every level.
* Eager models that ``torch.fx`` can trace (and ``torch.export`` graphs) are run as graphs:
  one baseline pass records every node's value on the evaluation batch (including each
  layer's input activation), and a level re-runs only the nodes from the first one that
  reads the layer's weight (the suffix), the prefix coming from that record
  (``torch.fx.Interpreter.run(initial_env=...)``). Models that cannot be traced
  (TorchScript) run the whole forward pass per level.
* Only the scanned layer's tensors are swapped (in place on one private copy), and restored.
* Evaluation uses at most ``max_samples`` held-out samples.

Cache: one folder per (model content hash, data hash, criterion, level grid, sample count)
under ``$WORKBENCH_CACHE`` (default ``~/.cache/compression-workbench/sensitivity``), with one
JSON file per finished layer, written atomically; a second scan reads them back at once and
an interrupted scan resumes with the layers still missing.

Why one module of this size: the level grid, activation caching and suffix replay, the data-
free proxy and the on-disk cache are one measurement and are tested as one.

Why one module of this size: the scan, its on-disk cache (keys, resume) and the data-free proxy
produce the same `SensitivityScan` and share the level grid and cache layout.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.analysis.estimate import preview
from core.base.errors import CompressionError, DataError
from core.base.methods import prune_method
from core.base.outdir import atomic_write
from core.base.progress import CancelToken, ProgressFn, no_progress
from core.compress.engine import bias_name, layer_mask, named_tensors, output_layer
from core.evaluate import eval_mode, first_tensor, fixed_batch, is_classifier_output
from core.io.hf import language_model, next_token_loss
from core.io.model_io import clone_model
from core.ops.quantization import dequantize, quantize
from core.recipe.plan import (
    STRUCTURED_METHODS,
    CompressionPlan,
    LayerConfig,
    PruneConfig,
    QuantConfig,
)

#: Bump when the measurement changes: old cache entries are then ignored.
SCAN_VERSION = 1
#: Sparsity levels of the default grid (finer towards the top, where curves bend).
DEFAULT_SPARSITIES = (0.0, 0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.99)
#: Bit-widths of the default grid (``None``: float32 values).
DEFAULT_BITS: tuple[int | None, ...] = (2, 3, 4, 5, 6, 8, 16, None)
#: Bias width used whenever a layer's weights are quantized to at most this many bits.
BIAS_BITS = 8
#: Held-out samples a scan evaluates on at most.
MAX_SAMPLES = 512


@dataclass(frozen=True)
class Level:
    """One setting of one layer: sparsity (criterion from the scan), code width, scales.

    ``bits=None`` keeps float32 values; ``per_channel`` uses one scale per output channel
    (symmetric codes, no zero points). Biases go to `BIAS_BITS` when the weights are coded at
    that width or below, else they keep the weights' width.
    """

    sparsity: float
    bits: int | None = None
    per_channel: bool = False

    @property
    def key(self) -> str:
        bits = "f32" if self.bits is None else f"{self.bits}b"
        return f"s{self.sparsity:g}-{bits}{'-pc' if self.per_channel else ''}"

    def config(self, method: str) -> LayerConfig:
        """The `LayerConfig` that applies this level with pruning criterion ``method``."""
        if method == "nm":
            prune = PruneConfig(method="nm", sparsity=0.5) if self.sparsity > 0 else PruneConfig()
        elif self.sparsity > 0 and method != "none":
            prune = PruneConfig(method=method, mode="sparsity", sparsity=float(self.sparsity))
        else:
            prune = PruneConfig()
        if self.bits is None:
            quant = QuantConfig()
        else:
            bias = BIAS_BITS if self.bits <= BIAS_BITS else self.bits
            quant = QuantConfig(
                bits=self.bits, symmetric=True, per_channel=self.per_channel, bias_bits=bias
            )
        return LayerConfig(prune=prune, quant=quant)

    def to_list(self) -> list[Any]:
        return [self.sparsity, self.bits, self.per_channel]

    @classmethod
    def from_list(cls, value: Sequence[Any]) -> Level:
        s, b, pc = value
        return cls(float(s), None if b is None else int(b), bool(pc))


def default_levels(
    method: str = "magnitude",
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    bits: Sequence[int | None] = DEFAULT_BITS,
) -> tuple[Level, ...]:
    """The grid: every sparsity x every width; per-channel scales as a second option for
    widths up to 8 (where one scale per row can matter). N:M knows only off / on."""
    if method == "nm":
        sparsities = (0.0, 0.5)
    elif method == "none":
        sparsities = (0.0,)
    out = []
    for s in sparsities:
        for b in bits:
            out.append(Level(float(s), b, False))
            if b is not None and b <= 8:
                out.append(Level(float(s), b, True))
    return tuple(sorted(set(out), key=lambda lv: (lv.sparsity, lv.bits or 99, lv.per_channel)))


@dataclass(frozen=True)
class Point:
    """The measured (or estimated) effect of one level on one layer.

    ``loss_delta``/``acc_delta`` are ``None`` without labels; ``acc_delta`` is negative when
    accuracy drops. ``damage`` is what the solver adds up (see module docstring).
    """

    level: Level
    damage: float
    loss_delta: float | None
    acc_delta: float | None
    cosine: float
    rel_l2: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "level": self.level.to_list(),
            "damage": self.damage,
            "loss_delta": self.loss_delta,
            "acc_delta": self.acc_delta,
            "cosine": self.cosine,
            "rel_l2": self.rel_l2,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Point:
        return cls(
            level=Level.from_list(d["level"]),
            damage=float(d["damage"]),
            loss_delta=None if d["loss_delta"] is None else float(d["loss_delta"]),
            acc_delta=None if d["acc_delta"] is None else float(d["acc_delta"]),
            cosine=float(d["cosine"]),
            rel_l2=float(d["rel_l2"]),
        )

    @property
    def acc_drop(self) -> float:
        """Accuracy lost (fraction, >= 0); 0 without labels."""
        return max(0.0, -(self.acc_delta or 0.0))

    @property
    def cos_loss(self) -> float:
        """``1 - cosine`` (>= 0)."""
        return max(0.0, 1.0 - self.cosine)


@dataclass(frozen=True)
class LayerCurve:
    """Every scanned level of one layer."""

    name: str
    tensor: str
    numel: int
    points: tuple[Point, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tensor": self.tensor,
            "numel": self.numel,
            "points": [p.to_dict() for p in self.points],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerCurve:
        return cls(
            name=str(d["name"]),
            tensor=str(d["tensor"]),
            numel=int(d["numel"]),
            points=tuple(Point.from_dict(p) for p in d["points"]),
        )

    def point(self, level: Level) -> Point | None:
        for p in self.points:
            if p.level == level:
                return p
        return None


@dataclass(frozen=True)
class SensitivityScan:
    """A whole scan: per-layer curves plus what they were measured on.

    ``metric``: ``"loss"`` (labelled classifier), ``"lm_loss"`` (a causal language model's
    next-token loss on its text; no accuracy), ``"fidelity"`` (outputs only) or
    ``"proxy"`` (data-free estimate, ``estimate`` True). ``baseline``: the uncompressed
    model's loss/accuracy on the scan data. ``cached_layers``: layers read from the cache
    rather than measured now.
    """

    method: str
    metric: str
    estimate: bool
    levels: tuple[Level, ...]
    layers: tuple[LayerCurve, ...]
    baseline: dict[str, float | None]
    model_hash: str
    data_hash: str
    samples: int
    seconds: float
    eval_seconds: float
    cached_layers: int = 0
    notes: tuple[str, ...] = field(default=())

    def layer(self, name: str) -> LayerCurve:
        for c in self.layers:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": SCAN_VERSION,
            "method": self.method,
            "metric": self.metric,
            "estimate": self.estimate,
            "levels": [lv.to_list() for lv in self.levels],
            "baseline": dict(self.baseline),
            "model_hash": self.model_hash,
            "data_hash": self.data_hash,
            "samples": self.samples,
            "seconds": self.seconds,
            "eval_seconds": self.eval_seconds,
            "cached_layers": self.cached_layers,
            "notes": list(self.notes),
            "layers": [c.to_dict() for c in self.layers],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SensitivityScan:
        return cls(
            method=str(d["method"]),
            metric=str(d["metric"]),
            estimate=bool(d["estimate"]),
            levels=tuple(Level.from_list(v) for v in d["levels"]),
            layers=tuple(LayerCurve.from_dict(c) for c in d["layers"]),
            baseline=dict(d["baseline"]),
            model_hash=str(d["model_hash"]),
            data_hash=str(d["data_hash"]),
            samples=int(d["samples"]),
            seconds=float(d["seconds"]),
            eval_seconds=float(d["eval_seconds"]),
            cached_layers=int(d.get("cached_layers", 0)),
            notes=tuple(d.get("notes", ())),
        )


# ---------------------------------------------------------------------------------------
# hashing and cache
# ---------------------------------------------------------------------------------------
def _hash_tensor(h: Any, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.dtype == torch.bfloat16:
        t = t.float()
    h.update(t.numpy().tobytes())


def model_hash(module: torch.nn.Module) -> str:
    """SHA-256 over every state tensor's name, dtype, shape and bytes (content, not path)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        if isinstance(t, torch.Tensor):
            h.update(name.encode())
            _hash_tensor(h, t)
    return h.hexdigest()


def data_hash(x: torch.Tensor | None, y: torch.Tensor | None) -> str:
    """SHA-256 of the evaluation inputs and labels (``"none"`` without data)."""
    if x is None:
        return "none"
    h = hashlib.sha256()
    _hash_tensor(h, x)
    if y is not None:
        _hash_tensor(h, y)
    return h.hexdigest()


def cache_root() -> Path:
    """``$WORKBENCH_CACHE`` or ``~/.cache/compression-workbench/sensitivity``."""
    env = os.environ.get("WORKBENCH_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "compression-workbench" / "sensitivity"


def scan_key(mhash: str, dhash: str, method: str, levels: Sequence[Level], samples: int) -> str:
    """The cache key of a scan: everything its numbers depend on."""
    spec = json.dumps(
        [SCAN_VERSION, mhash, dhash, method, [lv.to_list() for lv in levels], samples, BIAS_BITS]
    )
    return hashlib.sha256(spec.encode()).hexdigest()[:32]


def _write_json(path: Path, obj: Any) -> None:
    data = (json.dumps(obj) + "\n").encode("utf-8")
    atomic_write(path, [data], force=True)


def _layer_file(folder: Path, index: int, name: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:80]
    return folder / f"layer-{index:04d}-{safe}.json"


def _read_cached(path: Path, name: str, levels: Sequence[Level]) -> LayerCurve | None:
    """A cached layer curve, or None when missing, unreadable or for another grid."""
    try:
        curve = LayerCurve.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if curve.name != name or [p.level for p in curve.points] != list(levels):
        return None
    return curve


# ---------------------------------------------------------------------------------------
# compressing one layer
# ---------------------------------------------------------------------------------------
def _level_tensors(
    layer: Any, ts: Any, method: str, level: Level, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight (and bias) this level gives, computed as `core.compress.engine.compress` does."""

    cfg = level.config(method)
    mask = None
    if cfg.prune.active:
        threshold = None
        if cfg.prune.method != "nm":
            threshold = ts.scores[cfg.prune.method].threshold_for_sparsity(cfg.prune.sparsity)
        mask = layer_mask(layer, cfg, weight, threshold, ts.grad)
    w = weight.detach()
    new_b = None
    if cfg.quant.active:
        qt = quantize(
            w, cfg.quant.bits, symmetric=True, per_channel=cfg.quant.per_channel, mask=mask
        )
        new_w = dequantize(qt).to(w.dtype)
        if bias is not None and cfg.quant.bias_bits is not None:
            new_b = dequantize(quantize(bias.detach(), cfg.quant.bias_bits, symmetric=True)).to(
                bias.dtype
            )
    else:
        new_w = w * mask.to(w.dtype) if mask is not None else w.clone()
    return new_w, new_b


# ---------------------------------------------------------------------------------------
# running the model
# ---------------------------------------------------------------------------------------
class _Runner:
    """Runs the model on fixed batches, re-running only the suffix after a layer when the
    module is an fx graph (traced here for eager modules)."""

    def __init__(self, module: torch.nn.Module, batches: list[torch.Tensor]):
        self.module = module
        self.batches = batches
        self.graph: torch.fx.GraphModule | None = None
        self.envs: list[dict[Any, Any]] = []
        self.nodes: list[Any] = []
        self._start: dict[str, int] = {}
        self.note = "whole forward pass per level"
        if isinstance(module, torch.jit.ScriptModule):
            return
        try:
            gm = (
                module
                if isinstance(module, torch.fx.GraphModule)
                else torch.fx.symbolic_trace(module)
            )
            own = dict(module.named_parameters())
            same = all(own.get(n) is p for n, p in gm.named_parameters())
            if not same:
                return
            for x in batches:
                interp = torch.fx.Interpreter(gm, garbage_collect_values=False)
                interp.run(x)
                self.envs.append(dict(interp.env))
        except Exception:  # noqa: BLE001 - untraceable code: fall back to plain forward passes
            self.envs = []
            return
        self.graph = gm
        self.nodes = list(gm.graph.nodes)
        self.note = "suffix re-run from cached activations (torch.fx)"

    def _start_for(self, tensor: str) -> int:
        if tensor in self._start:
            return self._start[tensor]
        owner = tensor.rsplit(".", 1)[0] if "." in tensor else ""
        start = 0
        for i, node in enumerate(self.nodes):
            target = node.target if isinstance(node.target, str) else None
            if target is None:
                continue
            if node.op == "get_attr" and (target == tensor or tensor.startswith(target + ".")):
                start = i
                break
            if node.op == "call_module" and (
                target == owner or owner.startswith(target + ".") or target == ""
            ):
                start = i
                break
        self._start[tensor] = start
        return start

    def run(self, tensor: str | None = None) -> list[Any]:
        """Outputs per batch (``tensor``: the layer whose weight changed; None = all)."""
        outs = []
        if self.graph is None or tensor is None:
            for x in self.batches:
                outs.append(self.module(x))
            return outs
        start = self._start_for(tensor)
        prefix = self.nodes[:start]
        for x, env in zip(self.batches, self.envs, strict=True):
            init = {n: env[n] for n in prefix}
            outs.append(torch.fx.Interpreter(self.graph).run(x, initial_env=init))
        return outs


def _metrics(
    outs: list[Any],
    base: torch.Tensor,
    y: torch.Tensor | None,
    real: int,
    classifier: bool,
    lm_x: torch.Tensor | None = None,
) -> dict[str, float | None]:
    """Loss, accuracy, cosine and relative L2 error of ``outs`` against ``base``; ``lm_x``:
    the scanned text of a causal language model (its loss is the next-token loss)."""

    out = torch.cat([first_tensor(o).detach().float() for o in outs])[:real]
    a = out.reshape(real, -1).double()
    b = base.reshape(real, -1).double()
    ref = float(b.pow(2).sum())
    err = float((a - b).pow(2).sum())
    rel = math.sqrt(err / ref) if ref > 0 else (0.0 if err == 0 else math.inf)
    cos = float(torch.nn.functional.cosine_similarity(a, b, dim=1).mean())
    loss = acc = None
    if classifier and y is not None:
        yy = y.reshape(-1)[:real].long()
        logits = torch.nan_to_num(out, nan=0.0, posinf=1e4, neginf=-1e4)
        loss = float(torch.nn.functional.cross_entropy(logits, yy))
        acc = float((out.argmax(dim=1) == yy).float().mean())
    elif lm_x is not None:
        logits = torch.nan_to_num(out, nan=0.0, posinf=1e4, neginf=-1e4)
        loss = float(next_token_loss(logits, lm_x[:real]))
    return {"loss": loss, "acc": acc, "cosine": cos, "rel_l2": rel}


def _point(level: Level, m: dict[str, float | None], base: dict[str, float | None]) -> Point:
    loss_delta = None if m["loss"] is None else float(m["loss"]) - float(base["loss"])
    acc_delta = None if m["acc"] is None else float(m["acc"]) - float(base["acc"])
    rel = float(m["rel_l2"])
    cos = float(m["cosine"])
    if not math.isfinite(cos):
        cos = -1.0
    if loss_delta is not None:
        damage = max(0.0, loss_delta) if math.isfinite(loss_delta) else 1e6
    else:
        damage = rel * rel if math.isfinite(rel) else 1e6
    return Point(level, damage, loss_delta, acc_delta, cos, rel if math.isfinite(rel) else 1e6)


# ---------------------------------------------------------------------------------------
# the scan
# ---------------------------------------------------------------------------------------
def _scan_layers(stats: Any, method: str, output: str | None) -> list[Any]:
    layers = [
        layer
        for layer in stats.layers
        if layer.prunable and layer.tensor is not None and layer.name in stats.tensors
    ]
    if not layers:
        raise CompressionError("the model has no prunable layers to scan")
    return layers


def _levels_for(
    layer: Any, levels: Sequence[Level], method: str, output: str | None
) -> list[Level]:
    # Channel pruning of the logits layer deletes classes: it only gets unpruned levels.
    if method in STRUCTURED_METHODS and layer.name == output:
        return [lv for lv in levels if lv.sparsity == 0.0]
    return list(levels)


def proxy_scan(
    stats: Any,
    method: str = "magnitude",
    levels: Sequence[Level] | None = None,
    *,
    notes: Sequence[str] = (),
) -> SensitivityScan:
    """Data-free curves from the weight statistics alone (marked ``estimate: true``).

    Per level one `core.analysis.estimate.preview` with every layer at that level gives each layer's
    error energy relative to its weights (``noise / signal`` = 1 / SQNR); that ratio is the
    damage, ``sqrt`` of it the relative L2 error and ``1 - ratio / 2`` the cosine.
    """

    start = time.perf_counter()
    levels = tuple(levels or default_levels(method))
    layers = _scan_layers(stats, method, None)
    ratios: dict[str, dict[Level, float]] = {layer.name: {} for layer in layers}
    for level in levels:
        pv = preview(stats, CompressionPlan(default=level.config(method)))
        for lp in pv.layers:
            if lp.name in ratios:
                ratios[lp.name][level] = lp.noise / lp.signal if lp.signal > 0 else 0.0
    curves = []
    for layer in layers:
        points = []
        for level in levels:
            r = ratios[layer.name][level]
            points.append(Point(level, r, None, None, 1.0 - r / 2.0, math.sqrt(r)))
        curves.append(
            LayerCurve(
                layer.name, str(layer.tensor), stats.tensors[layer.name].numel, tuple(points)
            )
        )
    return SensitivityScan(
        method=method,
        metric="proxy",
        estimate=True,
        levels=levels,
        layers=tuple(curves),
        baseline={"loss": None, "acc": None},
        model_hash="",
        data_hash="none",
        samples=0,
        seconds=time.perf_counter() - start,
        eval_seconds=0.0,
        notes=tuple(notes) + ("data-free estimate from weight statistics (1/SQNR per layer)",),
    )


@dataclass
class _ScanProgress:
    """Level counts and measured time behind the per-layer progress messages and the ETA."""

    progress: ProgressFn
    todo: int
    n_layers: int
    done: int = 0
    measured_time: float = 0.0
    measured_levels: int = 0

    def from_cache(self, index: int, name: str, n_levels: int) -> None:
        self.done += n_levels
        self.progress(self.done / self.todo, f"{name}: from cache ({index + 1}/{self.n_layers})")

    def measured(self, index: int, name: str, seconds: float) -> None:
        self.measured_time += seconds
        self.measured_levels += 1
        self.done += 1
        eta = (self.todo - self.done) * self.measured_time / max(self.measured_levels, 1)
        self.progress(
            self.done / self.todo,
            f"{name} ({index + 1}/{self.n_layers}), ETA {eta:.0f} s",
        )


@dataclass
class _Reference:
    """The uncompressed run every level is compared against."""

    runner: _Runner
    out: torch.Tensor
    y: torch.Tensor | None
    n: int
    classifier: bool
    metrics: dict[str, float | None]
    #: A causal language model's scanned text (its loss is the next-token loss), else None.
    lm_x: torch.Tensor | None = None


def _reference(
    loaded: Any,
    module: torch.nn.Module,
    batches: list[torch.Tensor],
    y: torch.Tensor | None,
    n: int,
) -> tuple[_Reference, float]:
    """Run the uncompressed model once (under ``no_grad``/eval mode); also its wall time."""

    t0 = time.perf_counter()
    runner = _Runner(module, batches)
    base_out = torch.cat([first_tensor(o).detach().float() for o in runner.run()])[:n]
    eval_seconds = time.perf_counter() - t0
    classifier = y is not None and is_classifier_output(loaded, base_out, True)
    lm_x = torch.cat(batches)[:n] if language_model(loaded) and not classifier else None
    base = _metrics([base_out], base_out, y, n, classifier, lm_x)
    return _Reference(runner, base_out, y, n, classifier, base, lm_x), eval_seconds


def _require_gradients(method: str, stats: Any) -> None:
    """Refuse a gradient criterion when the analysis has no gradient statistics."""

    if prune_method(method).needs_gradients and not getattr(stats, "has_gradients", False):
        raise CompressionError(
            f"the {method!r} criterion needs gradient statistics; the analysis ran without data",
            hint="analyze with labelled data, or scan with --method magnitude",
        )


def _eval_batches(loaded: Any, x: torch.Tensor, n: int) -> list[torch.Tensor]:
    """The first ``n`` inputs as the batches the model runs (padded to its fixed batch size)."""

    x_all = x[:n]
    fixed = fixed_batch(loaded)
    if fixed is None:
        return [x_all]
    pad = (-n) % fixed
    if pad:
        x_all = torch.cat([x_all, x_all[:1].expand(pad, *x_all.shape[1:])])
    return list(x_all.split(fixed))


def _cache_folder(cache: bool, cache_dir: str | Path | None, key: str) -> tuple[Path, bool]:
    """The scan's cache folder, and whether the cache is usable (``False`` if not creatable)."""

    folder = Path(cache_dir) if cache_dir is not None else cache_root()
    folder = folder / key
    if cache:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            cache = False
    return folder, cache


def _measure_layer(
    layer: Any,
    index: int,
    ts: Any,
    tensors: dict[str, torch.Tensor],
    method: str,
    levels: Sequence[Level],
    ref: _Reference,
    tracker: _ScanProgress,
    cancel: CancelToken | None,
) -> LayerCurve:
    """Compress one layer at each level in place, measure, and restore its tensors."""

    weight = tensors[layer.tensor]
    bias_n = _bias_name(layer, tensors)
    bias = tensors[bias_n] if bias_n is not None else None
    w0 = weight.detach().clone()
    b0 = bias.detach().clone() if bias is not None else None
    points = []
    try:
        for level in levels:
            if cancel is not None:
                cancel.check()
            t1 = time.perf_counter()
            new_w, new_b = _level_tensors(layer, ts, method, level, w0, b0)
            weight.copy_(new_w)
            if bias is not None:
                bias.copy_(new_b if new_b is not None else b0)
            m = _metrics(
                ref.runner.run(layer.tensor), ref.out, ref.y, ref.n, ref.classifier, ref.lm_x
            )
            points.append(_point(level, m, ref.metrics))
            tracker.measured(index, layer.name, time.perf_counter() - t1)
    finally:
        weight.copy_(w0)
        if bias is not None:
            bias.copy_(b0)
    return LayerCurve(layer.name, str(layer.tensor), ts.numel, tuple(points))


def scan(
    loaded: Any,
    stats: Any,
    data: Any = None,
    *,
    method: str = "magnitude",
    levels: Sequence[Level] | None = None,
    max_samples: int = MAX_SAMPLES,
    cache: bool = True,
    cache_dir: str | Path | None = None,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
) -> SensitivityScan:
    """Measure every prunable layer at every level (see module docstring).

    Parameters
    ----------
    loaded
        The model (`core.base.model.LoadedModel`); never modified (a private copy is used).
    stats
        `core.analysis.stats.analyze` output (score indices for the thresholds; gradients for the
        gradient criteria).
    data
        Held-out `core.io.data.Dataset`; ``None`` (or a weights-only model) gives `proxy_scan`.
    method
        Pruning criterion of the sparsity axis (`core.base.methods` registry name).
    levels
        The grid (default `default_levels`).
    max_samples
        Held-out samples used at most (the first ones).
    cache, cache_dir
        Read/write the per-layer cache (default folder `cache_root`).
    progress, cancel
        Progress with ETA per layer; cancel is checked between levels. A cancelled scan keeps
        its finished layers in the cache.

    Returns
    -------
    SensitivityScan
    """

    levels = tuple(levels or default_levels(method))
    _require_gradients(method, stats)
    if not loaded.can_run or data is None:
        why = "weights-only checkpoint" if not loaded.can_run else "no data given"
        return proxy_scan(stats, method, levels, notes=(why,))
    if len(data) == 0:
        raise DataError("the evaluation data set is empty", path=getattr(data, "name", None))
    start = time.perf_counter()
    layers = _scan_layers(stats, method, None)
    head = output_layer(loaded, stats.layers) if method in STRUCTURED_METHODS else None

    n = min(len(data), max_samples)
    y_all = data.y[:n] if data.y is not None else None
    batches = _eval_batches(loaded, data.x, n)
    mhash = model_hash(loaded.module)
    dhash = data_hash(data.x[:n], y_all)
    # (a language model's curves measure its next-token loss: another cache entry than the
    # fidelity curves an older version measured on the same model and text)
    key_method = f"{method}/lm_loss" if language_model(loaded) else method
    folder, cache = _cache_folder(cache, cache_dir, scan_key(mhash, dhash, key_method, levels, n))

    work = clone_model(loaded)
    module = work.module
    tensors = named_tensors(module)
    curves: list[LayerCurve] = []
    cached = 0
    with torch.no_grad(), eval_mode(module):
        ref, eval_seconds = _reference(loaded, module, batches, y_all, n)
        todo = sum(len(_levels_for(layer, levels, method, head)) for layer in layers)
        tracker = _ScanProgress(progress, todo, len(layers))
        for li, layer in enumerate(layers):
            lv_here = _levels_for(layer, levels, method, head)
            path = _layer_file(folder, li, layer.name)
            curve = _read_cached(path, layer.name, lv_here) if cache else None
            if curve is not None:
                curves.append(curve)
                cached += 1
                tracker.from_cache(li, layer.name, len(lv_here))
                continue
            ts = stats.tensors[layer.name]
            curve = _measure_layer(layer, li, ts, tensors, method, lv_here, ref, tracker, cancel)
            if cache:
                _write_json(path, curve.to_dict())
            curves.append(curve)
    progress(1.0, "scan finished")
    return SensitivityScan(
        method=method,
        metric="loss" if ref.classifier else ("lm_loss" if ref.lm_x is not None else "fidelity"),
        estimate=False,
        levels=levels,
        layers=tuple(curves),
        baseline={"loss": ref.metrics["loss"], "acc": ref.metrics["acc"]},
        model_hash=mhash,
        data_hash=dhash,
        samples=n,
        seconds=time.perf_counter() - start,
        eval_seconds=eval_seconds,
        cached_layers=cached,
        notes=(ref.runner.note,),
    )


def _bias_name(layer: Any, tensors: dict[str, torch.Tensor]) -> str | None:

    return bias_name(layer, tensors)
