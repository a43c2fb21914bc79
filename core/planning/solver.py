"""Budget solver: per-layer settings that minimise predicted damage within a byte budget.

Input: a `core.planning.sensitivity.SensitivityScan` (per layer, per level: damage, accuracy delta,
cosine) and the model's `core.analysis.stats.ModelStats`. Each (layer, level) gets its bytes from the
archive's own size model (`core.analysis.estimate.preview`, i.e. `core.packed.tensor_packed_bytes`:
codes + sparsity pattern + scales, plus the bias at its width); everything outside the
scanned layers (other tensors, the header with the recipe) is the *overhead*, measured from a
preview of the whole candidate plan, so the total is what the writer puts on disk.

The choice is a multiple-choice knapsack: one level per layer, minimise the summed damage
(times a correction factor refitted after verification; damage is assumed additive) subject to
the byte budget, or minimise bytes subject to a damage limit (``--max-drop`` / ``--min-cosine``
alone). Small problems are solved exactly by merging per-layer Pareto frontiers; large ones by
Lagrangian relaxation (bisection on the multiplier) followed by a greedy upgrade pass that
spends the remaining budget. The result is then fine-tuned continuously: sparsity is a real
number, so the solver lowers the sparsity of the layers where bytes buy the most damage until
the predicted archive sits just under the budget (within `FILL_TOLERANCE`).

Why one module of this size: the byte model per level, the exact and Lagrangian searches, the
frontier and the verify loop share the same problem representation; they are one algorithm with
its checks.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from core.analysis.estimate import preview
from core.base.errors import CompressionError, RecipeError
from core.base.progress import CancelToken, ProgressFn, no_progress
from core.compress.engine import compress
from core.evaluate import eval_mode, first_tensor
from core.packed import ST_DTYPES, choose_pattern, tensor_packed_bytes, write_packed
from core.planning.sensitivity import Level, SensitivityScan, _metrics
from core.recipe.plan import CompressionPlan, LayerConfig

#: The planned archive aims this close under the byte budget (fraction of the budget).
FILL_TOLERANCE = 0.004
#: Safety margin kept free under the budget for relative-index streams, whose predicted
#: length is an expectation (fraction of the budget).
MARGIN = 0.001
#: `plan_and_verify` re-solves while the archive on disk is more than this under the budget.
VERIFY_TOLERANCE = 0.01
#: Weight of the squared relative output error added to loss-delta damage (tie-breaker).
TIE_WEIGHT = 1e-3
#: Largest Pareto frontier the exact solver keeps before switching to the Lagrangian one.
EXACT_FRONTIER_CAP = 50_000


@dataclass(frozen=True)
class Target:
    """What the user asks for: a size (bytes or ratio) and/or a quality floor.

    ``max_drop`` is in accuracy points (0.5 = half a percentage point); ``min_cosine`` the
    lowest acceptable mean output cosine.
    """

    bytes: int | None = None
    ratio: float | None = None
    max_drop: float | None = None
    min_cosine: float | None = None

    def __post_init__(self) -> None:
        if self.bytes is not None and self.ratio is not None:
            raise RecipeError("give a byte target or a ratio target, not both")
        if self.max_drop is not None and self.min_cosine is not None:
            raise RecipeError("give --max-drop or --min-cosine, not both")
        if self.bytes is not None and not (isinstance(self.bytes, int) and self.bytes > 0):
            raise RecipeError(f"target bytes: {self.bytes!r} must be a positive integer")
        if self.ratio is not None and not (math.isfinite(self.ratio) and self.ratio >= 1.0):
            raise RecipeError(f"target ratio: {self.ratio!r} must be a number >= 1")
        if self.max_drop is not None and not (
            math.isfinite(self.max_drop) and 0.0 <= self.max_drop <= 100.0
        ):
            raise RecipeError(f"max drop: {self.max_drop!r} is out of range 0..100 points")
        if self.min_cosine is not None and not (
            math.isfinite(self.min_cosine) and -1.0 <= self.min_cosine <= 1.0
        ):
            raise RecipeError(f"min cosine: {self.min_cosine!r} is out of range -1..1")
        if (
            self.bytes is None
            and self.ratio is None
            and self.max_drop is None
            and (self.min_cosine is None)
        ):
            raise RecipeError(
                "no target given",
                hint="pass --target-bytes, --target-ratio, --max-drop or --min-cosine",
            )

    def budget(self, dense_bytes: int) -> int | None:
        """The byte budget (``dense_bytes / ratio`` rounded down), or None."""
        if self.bytes is not None:
            return int(self.bytes)
        if self.ratio is not None:
            return int(math.floor(dense_bytes / self.ratio))
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "bytes": self.bytes,
            "ratio": self.ratio,
            "max_drop": self.max_drop,
            "min_cosine": self.min_cosine,
        }


@dataclass(frozen=True)
class Problem:
    """Per-layer option tables (rows: layers, columns: the scan's levels; ``inf`` cost where a
    level was not scanned for a layer)."""

    names: tuple[str, ...]
    levels: tuple[Level, ...]
    method: str
    cost: np.ndarray
    damage: np.ndarray
    acc_drop: np.ndarray
    cos_loss: np.ndarray
    sparsity: np.ndarray
    pinned: Mapping[str, LayerConfig]
    dense_bytes: int
    #: Rounding rule / group size every quantized level uses (``quant_template``).
    quant: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Solution:
    """A plan with what it predicts.

    ``predicted``: ``bytes`` (the archive, header included), ``damage`` (solver units),
    ``loss_delta``, ``accuracy_drop`` (points), ``cosine``, ``ratio``. ``choices``: per layer
    the chosen sparsity, bits, per-channel flag, bytes and damage.
    """

    plan: CompressionPlan
    predicted: dict[str, float | None]
    choices: tuple[dict[str, Any], ...]
    target: Target | None = None
    budget: int | None = None
    factors: dict[str, float] = field(default_factory=dict)
    solver: str = ""
    seconds: float = 0.0
    rounds: tuple[dict[str, Any], ...] = ()
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target.to_dict() if self.target else None,
            "budget_bytes": self.budget,
            "predicted": dict(self.predicted),
            "factors": dict(self.factors),
            "solver": self.solver,
            "seconds": self.seconds,
            "layers": [dict(c) for c in self.choices],
            "verify_rounds": [dict(r) for r in self.rounds],
            "warnings": list(self.warnings),
        }


# ---------------------------------------------------------------------------------------
# option tables
# ---------------------------------------------------------------------------------------
def _bias_bytes(
    layer: Any, shapes: Mapping[str, tuple[tuple[int, ...], str]], bits: int | None
) -> int:
    """Archive bytes of the layer's bias (1-D float parameter) at ``bits`` (None: raw)."""
    for name in layer.param_names:
        entry = shapes.get(name)
        if name == layer.tensor or entry is None:
            continue
        shape, dtype = entry
        if len(shape) == 1 and dtype in ("F32", "F64", "F16", "BF16"):
            n = int(shape[0])
            if bits is None:
                return n * ST_DTYPES.get(dtype, 4)
            return tensor_packed_bytes(n, n, bits, 1, symmetric=True)
    return 0


def quant_template(cfg: LayerConfig, quant: Mapping[str, Any] | None) -> LayerConfig:
    """``cfg`` with the user's rounding rule and group size (``{"method": "gptq",
    "group_size": 64}``) on its quantizer, when it quantizes. A group size implies scales per
    output channel and group, so per-tensor levels become grouped ones (same bytes as the
    per-channel level of that width; their scanned damage, measured with one scale, is the
    more pessimistic of the two)."""
    if not quant or not cfg.quant.active:
        return cfg
    fields = dict(quant)
    if fields.get("group_size") is not None:
        fields["per_channel"] = True
    return replace(cfg, quant=replace(cfg.quant, **fields))


def build_problem(
    stats: Any,
    scan: SensitivityScan,
    *,
    pinned: Mapping[str, LayerConfig] | None = None,
    min_bits: int | None = None,
    quant: Mapping[str, Any] | None = None,
) -> Problem:
    """Cost (archive bytes of weight + bias) and damage of every (layer, level).

    One `core.analysis.estimate.preview` per level (every layer at that level) gives all layers' weight
    bytes at once; biases are sized with `core.packed.tensor_packed_bytes`. ``min_bits`` leaves
    out the levels with narrower codes (their cost becomes ``inf``).
    """

    pinned = dict(pinned or {})
    known = {layer.name: layer for layer in stats.layers}
    for name in pinned:
        if name not in known:
            raise RecipeError(
                f"pinned layer {name!r}: the model has no layer of that name",
                hint="`workbench inspect MODEL` lists the layer names",
            )
    curves = [c for c in scan.layers if c.name not in pinned and c.name in known]
    levels = scan.levels
    index = {lv: j for j, lv in enumerate(levels)}
    shapes = {st.name: (tuple(st.shape), st.dtype) for st in stats.state}
    n, k = len(curves), len(levels)
    cost = np.full((n, k), np.inf)
    damage = np.zeros((n, k))
    acc = np.zeros((n, k))
    cos = np.zeros((n, k))
    for j, level in enumerate(levels):
        cfg = quant_template(level.config(scan.method), quant)
        pv = preview(stats, CompressionPlan(default=cfg))
        weight = {lp.name: lp.packed_bytes for lp in pv.layers}
        bias_bits = cfg.quant.bias_bits
        narrow = min_bits is not None and level.bits is not None and level.bits < min_bits
        for i, curve in enumerate(curves):
            if narrow or curve.point(level) is None:
                continue
            cost[i, j] = weight[curve.name] + _bias_bytes(known[curve.name], shapes, bias_bits)
    for i, curve in enumerate(curves):
        for p in curve.points:
            j = index[p.level]
            # Loss deltas clipped at zero tie many levels; the output error energy (tiny
            # weight) breaks the ties towards the more faithful setting.
            tie = TIE_WEIGHT * p.rel_l2**2 if scan.metric in ("loss", "lm_loss") else 0.0
            damage[i, j] = p.damage + tie
            acc[i, j] = p.acc_drop
            cos[i, j] = p.cos_loss
    for arr in (damage, acc, cos):
        _monotone_(arr, levels)
    sparsity = np.array([lv.sparsity for lv in levels])
    return Problem(
        names=tuple(c.name for c in curves),
        levels=levels,
        method=scan.method,
        cost=cost,
        damage=damage,
        acc_drop=acc,
        cos_loss=cos,
        sparsity=sparsity,
        pinned=pinned,
        dense_bytes=4 * int(stats.total_params),
        quant=tuple(sorted((quant or {}).items())),
    )


def _monotone_(arr: np.ndarray, levels: Sequence[Level]) -> None:
    """Make every row's curves monotone in place: more sparsity or a narrower code (same
    scales) never counts as less damage. Measured points are noisy at the bottom of the
    curves; without this the solver would pay bytes for a *worse* setting that happened to
    measure better, or refuse bytes that buy nothing on paper."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for j, lv in enumerate(levels):
        groups.setdefault(("s", lv.bits, lv.per_channel), []).append(j)
        groups.setdefault(("b", lv.sparsity, lv.per_channel), []).append(j)
    for key, cols in sorted(groups.items(), key=lambda kv: kv[0][0] == "b"):
        if key[0] == "s":
            cols.sort(key=lambda j: levels[j].sparsity)
        else:
            cols.sort(key=lambda j: -(levels[j].bits or 64))
        arr[:, cols] = np.maximum.accumulate(arr[:, cols], axis=1)


# ---------------------------------------------------------------------------------------
# multiple-choice knapsack
# ---------------------------------------------------------------------------------------
def solve_exact(
    primary: np.ndarray, secondary: np.ndarray, limit: float, *, cap: int = EXACT_FRONTIER_CAP
) -> np.ndarray | None:
    """Minimise ``sum primary[i, c_i]`` s.t. ``sum secondary[i, c_i] <= limit``, exactly.

    Merges the per-layer options into the Pareto frontier of partial sums layer by layer.
    Returns the chosen column per row, ``None`` when nothing fits, and raises `OverflowError`
    when the frontier grows beyond ``cap`` points (use `solve_lagrangian`).
    """
    fs = np.zeros(1)
    fp = np.zeros(1)
    back: list[tuple[np.ndarray, np.ndarray]] = []
    for i in range(primary.shape[0]):
        ok = np.isfinite(secondary[i]) & np.isfinite(primary[i])
        cols = np.nonzero(ok)[0]
        s = (fs[:, None] + secondary[i, cols][None, :]).ravel()
        p = (fp[:, None] + primary[i, cols][None, :]).ravel()
        keep = s <= limit + 1e-12 * max(1.0, abs(limit))
        flat = np.nonzero(keep)[0]
        if flat.size == 0:
            return None
        s, p = s[flat], p[flat]
        order = np.lexsort((p, s))
        s, p, flat = s[order], p[order], flat[order]
        best = np.minimum.accumulate(p)
        pareto = np.ones(p.size, dtype=bool)
        pareto[1:] = p[1:] < best[:-1]
        s, p, flat = s[pareto], p[pareto], flat[pareto]
        if s.size > cap:
            raise OverflowError("Pareto frontier too large")
        back.append((flat // cols.size, cols[flat % cols.size]))
        fs, fp = s, p
    pos = int(np.argmin(fp))
    out = np.zeros(primary.shape[0], dtype=int)
    for i in range(primary.shape[0] - 1, -1, -1):
        parent, col = back[i]
        out[i] = col[pos]
        pos = int(parent[pos])
    return out


def solve_lagrangian(
    primary: np.ndarray, secondary: np.ndarray, limit: float, *, iterations: int = 40
) -> np.ndarray | None:
    """Minimise ``sum primary`` s.t. ``sum secondary <= limit``: Lagrangian relaxation.

    Bisection finds the smallest multiplier ``lam`` whose per-row ``argmin(primary + lam *
    secondary)`` fits; a greedy pass then upgrades rows (best primary saved per unit of
    secondary) while the remaining slack allows. Near-optimal; exact on the convex hull.
    """
    sec = np.where(np.isfinite(secondary) & np.isfinite(primary), secondary, np.inf)
    prim = np.where(np.isfinite(sec), primary, np.inf)
    rows = np.arange(prim.shape[0])
    floor = np.nanmin(sec, axis=1)
    if float(floor.sum()) > limit:
        return None

    finite = np.isfinite(sec)
    # lam == 0: ties broken by the smaller secondary (a tiny weight on it)
    tie_break = prim + 1e-12 * np.where(finite, sec, 0)
    tie_break[~finite] = np.inf

    def pick(lam: float) -> np.ndarray:
        # lam > 0: where sec is inf, prim is inf too (and prim + lam * sec is inf)
        return (prim + lam * sec if lam > 0 else tie_break).argmin(axis=1)

    choice = pick(0.0)
    if float(sec[rows, choice].sum()) > limit:
        span = np.nanmax(np.where(np.isfinite(prim), prim, np.nan)) - np.nanmin(prim)
        dsec = np.nanmin(np.where(sec > floor[:, None], sec - floor[:, None], np.nan))
        hi = max(float(span) / max(float(dsec), 1e-300), 1e-300) * 4.0
        while float(sec[rows, pick(hi)].sum()) > limit:
            hi *= 16.0
        # Bisection in log space: multipliers span many decades (bytes vs loss units).
        lo = hi * 1e-12
        for _ in range(iterations):
            mid = math.sqrt(lo * hi)
            if float(sec[rows, pick(mid)].sum()) <= limit:
                hi = mid
            else:
                lo = mid
        choice = pick(hi)
    # Greedy upgrades with the slack left: per round, every row's best affordable upgrade
    # (primary saved per unit of secondary), applied best first while they still fit.
    for _ in range(8):
        slack = limit - float(sec[rows, choice].sum())
        dp = prim[rows, choice][:, None] - prim
        ds = sec - sec[rows, choice][:, None]
        ok = (dp > 0) & (ds <= slack) & np.isfinite(sec)
        if not ok.any():
            break
        with np.errstate(invalid="ignore", divide="ignore"):
            gain = np.where(ok, dp / np.maximum(ds, 1e-12), -np.inf)
        best = np.argmax(gain, axis=1)
        order = np.argsort(-gain[rows, best])
        changed = False
        for i in order:
            j = best[i]
            if not ok[i, j] or ds[i, j] > slack:
                continue
            choice[i] = j
            slack -= ds[i, j]
            changed = True
        if not changed:
            break
    return choice


def solve(
    primary: np.ndarray, secondary: np.ndarray, limit: float
) -> tuple[np.ndarray | None, str]:
    """`solve_exact` when the frontier stays small, else `solve_lagrangian`."""
    if primary.shape[0] <= 24:
        try:
            return solve_exact(primary, secondary, limit), "exact"
        except OverflowError:
            pass
    return solve_lagrangian(primary, secondary, limit), "lagrangian"


# ---------------------------------------------------------------------------------------
# plans and predictions
# ---------------------------------------------------------------------------------------
def _config(problem: Problem, j: int, sparsity: float | None = None) -> LayerConfig:
    level = problem.levels[j]
    if sparsity is not None:
        level = replace(level, sparsity=round(float(sparsity), 4))
    return quant_template(level.config(problem.method), dict(problem.quant))


def make_plan(
    problem: Problem,
    choice: Sequence[int],
    *,
    sparsities: Mapping[int, float] | None = None,
    base: CompressionPlan | None = None,
) -> CompressionPlan:
    """The plan for one choice per layer: the most common setting becomes the default (a short
    recipe keeps the archive header small), the others and the pinned layers are overrides."""
    sparsities = sparsities or {}
    configs = {
        name: _config(problem, int(j), sparsities.get(i))
        for i, (name, j) in enumerate(zip(problem.names, choice, strict=True))
    }
    common = Counter(configs.values()).most_common(1)
    default = common[0][0] if common else LayerConfig()
    overrides = [(n, c) for n, c in configs.items() if c != default]
    overrides.extend(problem.pinned.items())
    plan = CompressionPlan(default=default, overrides=tuple(overrides))
    if base is not None:
        plan = replace(plan, recovery=base.recovery)
    return plan


def _interp(problem: Problem, arr: np.ndarray, i: int, j: int, s: float | None) -> float:
    """``arr[i, j]``, linearly interpolated in sparsity towards the next lower grid level."""
    value = float(arr[i, j])
    if s is None:
        return value
    lo = _lower(problem, i, j)
    if lo is None:
        return value
    s_hi, s_lo = problem.levels[j].sparsity, problem.levels[lo].sparsity
    t = (s_hi - s) / (s_hi - s_lo) if s_hi > s_lo else 0.0
    return value + (float(arr[i, lo]) - value) * t


def _lower_levels(levels: Sequence[Level]) -> list[int | None]:
    """Per level, the level with the same width and scales one sparsity step lower."""
    groups: dict[tuple[Any, bool], list[int]] = {}
    for j, lv in enumerate(levels):
        groups.setdefault((lv.bits, lv.per_channel), []).append(j)
    out: list[int | None] = [None] * len(levels)
    for members in groups.values():
        members.sort(key=lambda j: levels[j].sparsity)
        for prev, j in zip(members, members[1:], strict=False):
            out[j] = prev
    return out


def _lower(problem: Problem, i: int, j: int) -> int | None:
    """The column of the same width/scales one sparsity step lower, if scanned for row ``i``."""
    lower = _lower_levels(problem.levels)[j]
    if lower is None or not np.isfinite(problem.cost[i, lower]):
        return None
    return lower


def _predict(
    problem: Problem,
    choice: Sequence[int],
    sparsities: Mapping[int, float],
    total: int,
    factors: Mapping[str, float],
    metric: str,
    acc_base: float = 1.0,
) -> tuple[dict[str, float | None], list[dict[str, Any]]]:
    d = a = c = 0.0
    rows = []
    for i, j in enumerate(choice):
        s = sparsities.get(i)
        di = _interp(problem, problem.damage, i, int(j), s)
        d += di
        a += _interp(problem, problem.acc_drop, i, int(j), s)
        c += _interp(problem, problem.cos_loss, i, int(j), s)
        lv = problem.levels[int(j)]
        rows.append(
            {
                "layer": problem.names[i],
                "sparsity": round(s, 4) if s is not None else lv.sparsity,
                "bits": lv.bits,
                "per_channel": lv.per_channel,
                "damage": di,
            }
        )
    for name, cfg in problem.pinned.items():
        rows.append(
            {
                "layer": name,
                "sparsity": cfg.prune.sparsity if cfg.prune.active else 0.0,
                "bits": cfg.quant.bits,
                "per_channel": cfg.quant.per_channel,
                "damage": None,
                "pinned": True,
            }
        )
    fd, fa, fc = (factors.get(k, 1.0) for k in ("damage", "acc", "cos"))
    predicted: dict[str, float | None] = {
        "bytes": int(total),
        "ratio": problem.dense_bytes / total if total else math.inf,
        "damage": fd * d,
        "loss_delta": fd * d if metric in ("loss", "lm_loss") else None,
        # Additive drops can sum past what there is to lose: cap them at the whole accuracy.
        "accuracy_drop": min(100.0 * fa * a, 100.0 * acc_base) if metric == "loss" else None,
        "cosine": max(-1.0, 1.0 - fc * c),
    }
    return predicted, rows


def index_uncertainty(stats: Any, plan: CompressionPlan) -> float:
    """Three standard deviations (bytes) of the archive size around its prediction.

    Only relative-index streams are predicted as expectations (`core.packed`): with kept
    positions at density ``p`` each gap costs ``floor(d / M)`` filler entries, a geometric
    count with ratio ``r = (1 - p)**M`` and variance ``r / (1 - r)**2``; ``nnz`` of them add
    up. Iterative pruning picks other positions than the one-shot masks, so this spread is
    what a fine-tuned archive can move by.
    """

    var = 0.0
    for lp in preview(stats, plan).layers:
        if lp.nnz >= lp.numel or lp.nnz <= 0:
            continue
        choice = choose_pattern(lp.numel, lp.nnz, lp.bits)
        if choice.kind != "r":
            continue
        k = int(choice.index_bits)
        r = math.exp((2**k - 1) * math.log1p(-lp.nnz / lp.numel))
        if r >= 1.0:
            continue
        std_entries = math.sqrt(lp.nnz * r) / (1.0 - r)
        var += (std_entries * k / 8.0) ** 2
    return 3.0 * math.sqrt(var)


def _total(stats: Any, plan: CompressionPlan) -> int:

    return int(preview(stats, plan).packed_bytes)


def smallest_plan(stats: Any, problem: Problem) -> tuple[CompressionPlan, int]:
    """The cheapest plan the scanned levels allow, and its predicted archive bytes."""
    cheapest = np.argmin(problem.cost, axis=1)
    plan = make_plan(problem, cheapest)
    return plan, _total(stats, plan)


def _fill(
    stats: Any,
    problem: Problem,
    choice: np.ndarray,
    budget: int,
    total: int,
    base: CompressionPlan | None,
) -> tuple[np.ndarray, dict[int, float], int]:
    """Spend the slack under ``budget`` with continuous sparsity.

    Between two grid levels of one width, bytes and damage are taken as linear in sparsity.
    Each pass moves the one layer whose best such segment, at exactly the bytes it could
    afford, saves the most damage; bisection on the predicted archive bytes then places its
    sparsity so the whole archive fits. Stops within `FILL_TOLERANCE` of the budget.
    """
    choice = np.array(choice, copy=True)
    sparsities: dict[int, float] = {}
    lower = _lower_levels(problem.levels)
    cost, damage = problem.cost, problem.damage
    tried: set[tuple[int, int]] = set()
    for _ in range(min(4 * len(choice), 40)):
        slack = budget - total
        if slack <= FILL_TOLERANCE * budget:
            break
        best = None
        for i in range(len(choice)):
            j = int(choice[i])
            s = sparsities.get(i)
            room = _interp(problem, cost, i, j, s) + slack
            d_now = _interp(problem, damage, i, j, s)
            for hi, lo in enumerate(lower):
                if lo is None or (i, hi) in tried:
                    continue
                c_hi, c_lo = cost[i, hi], cost[i, lo]
                if not (np.isfinite(c_lo) and np.isfinite(c_hi)) or not c_hi <= room:
                    continue
                t = max(0.0, (c_lo - room) / (c_lo - c_hi)) if c_lo > c_hi else 0.0
                gain = d_now - (damage[i, lo] + t * (damage[i, hi] - damage[i, lo]))
                if gain > 1e-12 and (best is None or gain > best[0]):
                    best = (gain, i, hi, lo)
        if best is None:
            break
        _, i, hi, lo = best
        tried.add((i, hi))
        s_lo, s_hi = problem.levels[lo].sparsity, problem.levels[hi].sparsity
        trial_choice = choice.copy()
        trial_choice[i] = hi
        found = None
        a, b = s_lo, s_hi
        for _ in range(18):
            mid = 0.5 * (a + b) if found is not None or b < s_hi else s_hi
            trial = dict(sparsities)
            trial[i] = mid
            t = _total(stats, make_plan(problem, trial_choice, sparsities=trial, base=base))
            if t <= budget:
                found = (mid, t)
                b = mid
            elif mid == s_hi:
                break
            else:
                a = mid
            if b - a < 1e-4:
                break
        if found is not None and found[1] > total:
            choice = trial_choice
            sparsities[i] = found[0]
            total = found[1]
    return choice, sparsities, total


def plan_for_target(
    stats: Any,
    scan: SensitivityScan,
    target: Target,
    *,
    pinned: Mapping[str, LayerConfig] | None = None,
    base: CompressionPlan | None = None,
    factors: Mapping[str, float] | None = None,
    budget: int | None = None,
    problem: Problem | None = None,
    min_bits: int | None = None,
    quant: Mapping[str, Any] | None = None,
) -> Solution:
    """Solve for ``target`` (see module docstring).

    Parameters
    ----------
    stats, scan
        The model's statistics and its sensitivity scan.
    target
        Byte/ratio budget and/or quality floor.
    pinned
        Layers with fixed settings (left out of the search, counted in the bytes).
    base
        Plan whose recovery settings the result keeps.
    factors
        Correction factors (``damage``, ``acc``, ``cos``) from earlier verification rounds.
    budget
        Byte budget to solve for instead of the target's (verification rounds shrink it when
        the archive on disk came out larger than predicted).
    quant
        Rounding rule / group size for every quantized level (`quant_template`, e.g.
        ``{"method": "gptq", "group_size": 64}``); the byte model counts the group scales.

    Raises
    ------
    CompressionError
        The target cannot be met: the message names the smallest reachable size.
    """
    t0 = time.perf_counter()
    factors = dict(factors or {})
    problem = problem or build_problem(stats, scan, pinned=pinned, min_bits=min_bits, quant=quant)
    goal = target.budget(problem.dense_bytes)
    solve_for = budget if budget is not None else goal
    if solve_for is not None:
        choice, sparsities, total, how = _solve_budget(stats, problem, target, solve_for, base)
    else:
        choice, how = _solve_quality(problem, scan, target, factors)
        sparsities = {}
        total = _total(stats, make_plan(problem, choice, base=base))
    plan = make_plan(problem, choice, sparsities=sparsities, base=base)
    return _solution(
        problem,
        scan,
        target,
        plan,
        choice,
        sparsities,
        total,
        factors=factors,
        how=how,
        goal=goal,
        t0=t0,
        check_quality=True,
    )


def _unreachable(solve_for: int, small: int, dense_bytes: int, flag: str) -> CompressionError:
    """The error for a budget below the smallest plan the scanned levels allow."""
    return CompressionError(
        f"a {solve_for:,}-byte archive is not reachable: the smallest plan the scanned "
        f"levels allow is {small:,} bytes ({dense_bytes / small:.1f}x)",
        hint=f"ask for at least {small:,} bytes ({flag}"
        f"{math.floor(10 * dense_bytes / small) / 10:g} or less)",
    )


def _solve_budget(
    stats: Any,
    problem: Problem,
    target: Target,
    solve_for: int,
    base: CompressionPlan | None,
) -> tuple[np.ndarray, dict[int, float], int, str]:
    """``(choice, sparsities, predicted bytes, solver)`` for a byte budget: the knapsack on the
    grid with the bytes outside the scanned layers measured on the candidate (re-solved while
    the candidate's preview, plus the spread of its relative indices, does not fit), then the
    continuous sparsity fill (`_fill`)."""
    _, small = smallest_plan(stats, problem)
    if small > solve_for:
        raise _unreachable(solve_for, small, problem.dense_bytes, "--target-ratio ")
    margin = max(1, int(MARGIN * solve_for))
    rows = np.arange(len(problem.names))
    overhead = small - int(problem.cost[rows, np.argmin(problem.cost, 1)].sum())
    primary = problem.damage if target.min_cosine is None else problem.cos_loss
    choice, how = None, ""
    total = small
    for _ in range(10):
        limit = solve_for - margin - overhead
        choice, how = solve(primary, problem.cost, limit)
        if choice is None:
            choice = np.argmin(problem.cost, axis=1)
        candidate = make_plan(problem, choice, base=base)
        total = _total(stats, candidate)
        spread = max(int(MARGIN * solve_for), math.ceil(index_uncertainty(stats, candidate)))
        if total <= solve_for - spread:
            margin = max(margin, spread)
            break
        layer_bytes = float(problem.cost[rows, choice].sum())
        overhead = max(overhead + 1, int(total - layer_bytes))
        margin = max(margin, spread)
    if total > solve_for - margin:
        choice = np.argmin(problem.cost, axis=1)
        total = small
    choice, sparsities, total = _fill(stats, problem, choice, solve_for - margin, total, base)
    return choice, sparsities, total, how


def _solve_quality(
    problem: Problem, scan: SensitivityScan, target: Target, factors: Mapping[str, float]
) -> tuple[np.ndarray, str]:
    """The smallest grid plan meeting a quality target alone (``--max-drop``/``--min-cosine``)."""
    if target.max_drop is not None:
        if scan.metric != "loss":
            raise CompressionError(
                "--max-drop needs labelled data (accuracy); these curves have none",
                hint="give labelled --data, or use --min-cosine",
            )
        secondary = problem.acc_drop * factors.get("acc", 1.0)
        limit = target.max_drop / 100.0
    else:
        secondary = problem.cos_loss * factors.get("cos", 1.0)
        limit = 1.0 - float(target.min_cosine)
    choice, how = solve(problem.cost, secondary, limit)
    if choice is None:
        raise CompressionError("no plan meets the quality target even without compression")
    return choice, how


def _quality_warnings(predicted: Mapping[str, float | None], target: Target) -> list[str]:
    """Warnings for a prediction that misses the target's quality floor."""
    warnings = []
    drop = predicted["accuracy_drop"]
    if target.max_drop is not None and drop is not None and drop > target.max_drop + 1e-9:
        warnings.append(
            f"predicted accuracy drop {drop:.2f} points exceeds "
            f"--max-drop {target.max_drop:g} (before any fine-tuning)"
        )
    cosine = predicted["cosine"]
    if target.min_cosine is not None and cosine is not None and cosine < target.min_cosine - 1e-12:
        warnings.append(
            f"predicted cosine {cosine:.4f} is below --min-cosine {target.min_cosine:g}"
        )
    return warnings


def _solution(
    problem: Problem,
    scan: SensitivityScan,
    target: Target,
    plan: CompressionPlan,
    choice: Sequence[int],
    sparsities: Mapping[int, float],
    total: int,
    *,
    factors: dict[str, float],
    how: str,
    goal: int | None,
    t0: float,
    check_quality: bool,
) -> Solution:
    """The `Solution` of a chosen plan: its prediction, per-layer table and warnings
    (``check_quality``: also warn when the prediction misses the target's quality floor)."""
    acc_base = scan.baseline.get("acc")
    predicted, rows = _predict(
        problem,
        choice,
        sparsities,
        total,
        factors,
        scan.metric,
        1.0 if acc_base is None else float(acc_base),
    )
    warnings = _quality_warnings(predicted, target) if check_quality else []
    if scan.estimate:
        warnings.append("damage is a data-free estimate (weights-only curves)")
    return Solution(
        plan=plan,
        predicted=predicted,
        choices=tuple(rows),
        target=target,
        budget=goal,
        factors=factors,
        solver=how,
        seconds=time.perf_counter() - t0,
        warnings=tuple(warnings),
    )


def _frontier_budgets(stats: Any, problem: Problem, small: int, points: int) -> np.ndarray:
    """``points`` byte budgets spaced geometrically from ``small`` (the smallest reachable
    archive) to the least damaged plan's archive, duplicates dropped."""
    dense_choice = np.argmin(
        np.where(np.isfinite(problem.cost), problem.damage + 1e-12 * problem.cost, np.inf), axis=1
    )
    big = _total(stats, make_plan(problem, dense_choice))
    return np.unique(np.geomspace(small, max(big, small + 1), points).astype(int))


def frontier(
    stats: Any,
    scan: SensitivityScan,
    *,
    points: int = 15,
    pinned: Mapping[str, LayerConfig] | None = None,
    base: CompressionPlan | None = None,
    min_bits: int | None = None,
    quant: Mapping[str, Any] | None = None,
) -> list[Solution]:
    """Predicted size/damage trade-off: ``points`` plans at budgets spaced geometrically from
    the smallest reachable archive to the dense one (duplicates dropped)."""
    problem = build_problem(stats, scan, pinned=pinned, min_bits=min_bits, quant=quant)
    _, small = smallest_plan(stats, problem)
    budgets = _frontier_budgets(stats, problem, small, points)
    out: list[Solution] = []
    seen = set()
    for b in budgets:
        sol = plan_for_target(stats, scan, Target(bytes=int(b)), base=base, problem=problem)
        key = sol.plan
        if key in seen:
            continue
        seen.add(key)
        out.append(sol)
    return out


# ---------------------------------------------------------------------------------------
# verification
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Measurement:
    """What a plan really gives: archive bytes on disk and the measured damage."""

    bytes: int
    damage: float
    loss_delta: float | None
    accuracy_drop: float | None
    cosine: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "bytes": self.bytes,
            "damage": self.damage,
            "loss_delta": self.loss_delta,
            "accuracy_drop": self.accuracy_drop,
            "cosine": self.cosine,
        }


def measure(
    loaded: Any,
    stats: Any,
    plan: CompressionPlan,
    data: Any,
    scan: SensitivityScan,
    *,
    cancel: CancelToken | None = None,
) -> Measurement:
    """Compress with ``plan`` (no fine-tuning), write the packed archive to a temporary folder
    and measure its size and the damage on ``data`` (same samples and metric as the scan)."""

    result = compress(
        loaded, replace(plan, recovery=replace(plan.recovery, epochs=0)), stats, cancel=cancel
    )
    with tempfile.TemporaryDirectory(prefix="wb-verify-") as tmp:
        path = Path(tmp) / "model.packed.safetensors"
        write_packed(result, path, cancel=cancel)
        size = path.stat().st_size
    if data is None or not loaded.can_run:
        return Measurement(size, math.nan, None, None, math.nan)
    n = min(len(data), scan.samples or len(data))
    x = data.x[:n]
    y = data.y[:n] if data.y is not None else None
    import torch

    with torch.no_grad(), eval_mode(loaded.module), eval_mode(result.compressed.module):
        base = first_tensor(loaded.module(x)).detach().float()
        out = result.compressed.module(x)
    classifier = scan.metric == "loss"
    lm_x = x if scan.metric == "lm_loss" else None  # a language model: its next-token loss
    b = _metrics([base], base, y, n, classifier, lm_x)
    m = _metrics([out], base, y, n, classifier, lm_x)
    if (classifier or lm_x is not None) and m["loss"] is not None:
        loss = float(m["loss"]) - float(b["loss"])
        drop = 100.0 * max(0.0, float(b["acc"]) - float(m["acc"])) if classifier else None
        damage = max(0.0, loss)
    else:
        loss = drop = None
        damage = float(m["rel_l2"]) ** 2
    return Measurement(size, damage, loss, drop, float(m["cosine"]))


def _better(new: Measurement, old: Measurement) -> bool:
    """Under a byte budget: prefer the archive closer to it (bytes buy less damage), then
    the smaller measured damage."""
    if new.bytes != old.bytes:
        return new.bytes > old.bytes
    return new.damage < old.damage


def _refit(old: float, predicted: float, measured: float | None) -> float:
    """New correction factor: measured / (prediction without the old factor)."""
    if measured is None or not math.isfinite(measured):
        return old
    raw = predicted / old if old > 0 else predicted
    if raw <= 1e-12:
        return old
    return float(min(max(measured / raw, 0.05), 50.0))


def plan_and_verify(
    loaded: Any,
    stats: Any,
    scan: SensitivityScan,
    target: Target,
    data: Any,
    *,
    pinned: Mapping[str, LayerConfig] | None = None,
    base: CompressionPlan | None = None,
    rounds: int = 3,
    min_bits: int | None = None,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
    quant: Mapping[str, Any] | None = None,
) -> tuple[Solution, Measurement]:
    """Solve, compress, measure; refit the damage factors (and shrink the byte budget when the
    archive on disk came out over it) and re-solve, at most ``rounds`` times."""
    problem = build_problem(stats, scan, pinned=pinned, min_bits=min_bits, quant=quant)
    factors: dict[str, float] = {}
    goal = target.budget(problem.dense_bytes)
    budget = goal
    history: list[dict[str, Any]] = []
    best: tuple[Solution, Measurement] | None = None
    for r in range(max(1, rounds)):
        progress(r / rounds, f"verify round {r + 1}/{rounds}: solving")
        sol = plan_for_target(
            stats, scan, target, base=base, factors=factors, budget=budget, problem=problem
        )
        progress((r + 0.3) / rounds, f"verify round {r + 1}/{rounds}: compressing and measuring")
        meas = measure(loaded, stats, sol.plan, data, scan, cancel=cancel)
        history.append(
            {"round": r + 1, "predicted": dict(sol.predicted), "measured": meas.to_dict()}
        )
        over = goal is not None and meas.bytes > goal
        quality_ok = (
            target.max_drop is None or (meas.accuracy_drop or 0.0) <= target.max_drop
        ) and (target.min_cosine is None or meas.cosine >= target.min_cosine)
        if goal is None:
            # quality target alone: the last round that meets it (factors refitted), else any
            if quality_ok or best is None:
                best = (sol, meas)
        elif not over and (best is None or _better(meas, best[1])):
            best = (sol, meas)
        p = sol.predicted
        factors = {
            "damage": _refit(factors.get("damage", 1.0), float(p["damage"] or 0.0), meas.damage),
            "acc": _refit(
                factors.get("acc", 1.0), float(p["accuracy_drop"] or 0.0), meas.accuracy_drop
            ),
            "cos": _refit(
                factors.get("cos", 1.0), 1.0 - float(p["cosine"] or 1.0), 1.0 - meas.cosine
            ),
        }
        if goal is not None and over:
            budget = int((budget or goal) - (meas.bytes - goal) - max(8, MARGIN * goal))
            continue
        if goal is not None and meas.bytes < (1.0 - VERIFY_TOLERANCE) * goal:
            # The measured archive is exact for this recipe: hand the unused bytes (the
            # prediction's safety margin) back to the solver.
            budget = int((budget or goal) + (goal - meas.bytes) - 1)
            continue
        if goal is not None or quality_ok:
            break
    if best is None:
        raise CompressionError(
            f"the archive came out over the {goal:,}-byte target in every verification round",
            hint="raise the target a little",
        )
    sol, meas = best
    sol = replace(sol, factors=factors, rounds=tuple(history))
    progress(1.0, "verified")
    return sol, meas


# ---------------------------------------------------------------------------------------
# the live path (the window's target slider)
# ---------------------------------------------------------------------------------------
def _quick_configs(problem: Problem, memo: dict[str, Any]) -> list[LayerConfig]:
    """One `LayerConfig` per level of ``problem`` (built once per problem, kept in ``memo``)."""
    if "configs" not in memo:
        memo["configs"] = [_config(problem, j) for j in range(len(problem.levels))]
    return memo["configs"]


def level_configs(problem: Problem, memo: dict[str, Any] | None = None) -> list[LayerConfig]:
    """The `LayerConfig` of each of ``problem``'s levels: the settings `quick_plan` gives the
    layers (``memo``: the one `quick_plan` is given, so they are built once)."""
    return list(_quick_configs(problem, {} if memo is None else memo))


def _quick_make_plan(
    problem: Problem, choice: np.ndarray, memo: dict[str, Any], base: CompressionPlan | None
) -> CompressionPlan:
    """`make_plan` for grid levels only, with the per-level configs built once: the most
    chosen level is the default, the other layers and the pinned ones are overrides."""
    configs = _quick_configs(problem, memo)
    common = int(np.argmax(np.bincount(choice, minlength=len(configs))))
    overrides = [
        (name, configs[j])
        for name, j in zip(problem.names, choice.tolist(), strict=True)
        if j != common
    ]
    overrides.extend(problem.pinned.items())
    plan = CompressionPlan(default=configs[common], overrides=tuple(overrides))
    if base is not None:
        plan = replace(plan, recovery=base.recovery)
    return plan


def quick_plan(
    stats: Any,
    scan: SensitivityScan,
    target: Target,
    *,
    problem: Problem,
    base: CompressionPlan | None = None,
    factors: Mapping[str, float] | None = None,
    memo: dict[str, Any] | None = None,
    verify: bool = True,
) -> Solution:
    """`plan_for_target` for one step of a slider drag: grid levels only.

    The knapsack is solved on the prebuilt ``problem``. With ``verify`` the candidate's
    archive is sized with `core.analysis.estimate.preview`; when it comes out over the budget the limit
    drops below the candidate's layer bytes by the excess and the knapsack is solved again
    (at most 6 rounds); if none fits, the smallest plan is returned. Without ``verify`` (drag
    steps) no preview runs: the archive is predicted as the chosen levels' bytes plus the
    bytes outside them measured on the last verified plan (kept in ``memo``, one dict per
    problem) plus a safety margin, so a step costs a knapsack solve; the release verifies.
    The continuous sparsity fill of `plan_for_target` (dozens of previews) is left out, so
    the plan may sit a little further under the budget. A quality target alone goes to
    `plan_for_target` (no fill there).
    """
    t0 = time.perf_counter()
    memo = {} if memo is None else memo
    goal = target.budget(problem.dense_bytes)
    if goal is None:
        return plan_for_target(stats, scan, target, base=base, problem=problem, factors=factors)
    small = _quick_smallest(stats, problem, memo, base)
    if small > goal:
        raise _unreachable(goal, small, problem.dense_bytes, "ratio ")
    primary = problem.damage if target.min_cosine is None else problem.cos_loss
    if verify:
        choice, how, total, plan = _quick_verified(stats, problem, primary, goal, memo, base)
    else:
        choice, how, total = _quick_predicted(problem, primary, goal, memo)
        plan = _quick_make_plan(problem, choice, memo, base)
    return _solution(
        problem,
        scan,
        target,
        plan,
        choice,
        {},
        total,
        factors=dict(factors or {}),
        how=how,
        goal=goal,
        t0=t0,
        check_quality=False,
    )


def _quick_smallest(
    stats: Any, problem: Problem, memo: dict[str, Any], base: CompressionPlan | None
) -> int:
    """Predicted bytes of the smallest grid plan (kept in ``memo`` with the bytes outside the
    scanned layers' options: the rest of the archive and its header, which grows with the
    overrides in the recipe and the layout of pruned tensors, 14.4-22.6 KB over 1.5-40x on
    200 layers). Drag steps assume the largest outside bytes seen on a verified plan, so they
    err towards smaller archives."""
    if "small" not in memo:
        rows = np.arange(len(problem.names))
        cheapest = np.argmin(problem.cost, axis=1)
        small_plan = _quick_make_plan(problem, cheapest, memo, base)
        memo["small"] = small = _total(stats, small_plan)
        memo["outside"] = memo["outside0"] = small - int(problem.cost[rows, cheapest].sum())
    return int(memo["small"])


def _quick_predicted(
    problem: Problem, primary: np.ndarray, goal: int, memo: dict[str, Any]
) -> tuple[np.ndarray, str, int]:
    """``(choice, solver, predicted bytes)`` of a drag step: no preview; the archive is the
    chosen levels' bytes plus the largest outside bytes seen (``memo``) plus the margin."""
    rows = np.arange(len(problem.names))
    margin = max(1, int(MARGIN * goal))
    outside = int(memo["outside"])
    choice, how, total = np.argmin(problem.cost, axis=1), "smallest", int(memo["small"])
    limit = goal - margin - outside
    for _ in range(4):
        found, solver = solve(primary, problem.cost, limit)
        if found is None:
            break
        layer_bytes = int(problem.cost[rows, found].sum())
        size = layer_bytes + outside
        if size <= goal - margin:
            choice, how, total = found, f"{solver}, predicted size", size
            break
        limit = min(limit, layer_bytes) - (size - goal) - margin
    return choice, how, total


def _quick_verified(
    stats: Any,
    problem: Problem,
    primary: np.ndarray,
    goal: int,
    memo: dict[str, Any],
    base: CompressionPlan | None,
) -> tuple[np.ndarray, str, int, CompressionPlan]:
    """``(choice, solver, bytes, plan)`` sized with `core.analysis.estimate.preview`: from the
    smallest plan's outside bytes (as `plan_for_target` does), the limit drops below an
    over-budget candidate's layer bytes by the excess (at most 6 rounds); if none fits, the
    smallest plan."""
    rows = np.arange(len(problem.names))
    margin = max(1, int(MARGIN * goal))
    limit = goal - margin - int(memo["outside0"])
    for _ in range(6):
        found, solver = solve(primary, problem.cost, limit)
        if found is None:
            break
        candidate = _quick_make_plan(problem, found, memo, base)
        size = _total(stats, candidate)
        layer_bytes = int(problem.cost[rows, found].sum())
        memo["outside"] = max(int(memo["outside"]), size - layer_bytes)
        if size <= goal:
            return found, solver, size, candidate
        # Below this candidate's own layer bytes by the excess: the next one differs.
        limit = min(limit, layer_bytes) - (size - goal) - margin
    cheapest = np.argmin(problem.cost, axis=1)
    return cheapest, "smallest", int(memo["small"]), _quick_make_plan(problem, cheapest, memo, base)


def quick_frontier(
    stats: Any,
    scan: SensitivityScan,
    problem: Problem,
    *,
    points: int = 12,
    base: CompressionPlan | None = None,
    memo: dict[str, Any] | None = None,
) -> list[Solution]:
    """`frontier` from verified `quick_plan` solutions (grid levels, no continuous fill):
    the predicted size/damage trade-off at ``points`` budgets spaced geometrically from the
    smallest reachable archive to the least damaged one, duplicates dropped."""
    memo = {} if memo is None else memo
    # `quick_plan` sizes the smallest plan with its own recipe (its overrides), which can be a
    # few bytes over `smallest_plan`'s: start from the larger so the first point is reachable.
    small = max(smallest_plan(stats, problem)[1], _quick_smallest(stats, problem, memo, base))
    budgets = _frontier_budgets(stats, problem, small, points)
    out: list[Solution] = []
    seen = set()
    for b in budgets:
        sol = quick_plan(stats, scan, Target(bytes=int(b)), problem=problem, base=base, memo=memo)
        if sol.plan in seen:
            continue
        seen.add(sol.plan)
        out.append(sol)
    return out
