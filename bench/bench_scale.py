"""Benchmark: many tiny tensors, and exact target sparsity on a 25M-weight model.

(a) A safetensors checkpoint of ``--tensors`` (default 10**5) tensors of 4x4 float32 is
    generated; ``workbench inspect --json`` and ``workbench compress --sparsity 0.5 --bits 8
    --format packed`` (report included) run on it as subprocesses, timed (wall clock) with their
    peak RSS (``ru_maxrss`` of the child's resource usage). A checkpoint of ``--huge`` (default
    10**6) such tensors is only inspected (``--skip-huge`` leaves it out).
(b) A 25.2M-weight two-layer Linear model (one 4096x4096 and one 2048x4096 weight) is analysed
    and compressed with magnitude pruning at a 0.9 target, global and per-layer scope; the
    applied masks' zero counts are compared with ``round(0.9 * n)``.

Writes its tables to the scale section of docs/benchmarks.md (between ``<!-- bench:scale -->``
and ``<!-- /bench:scale -->``; other sections are left alone).

Run: ``.venv/bin/python bench/bench_scale.py [--tensors N] [--huge N] [--no-write]
[--skip-large] [--skip-tiny] [--skip-huge]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from core.analysis.stats import analyze  # noqa: E402
from core.base.model import LoadedModel  # noqa: E402
from core.compress.engine import compress  # noqa: E402
from core.recipe.plan import simple_plan  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench:scale -->", "<!-- /bench:scale -->"
TARGET = 0.9


def _timed(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of a subprocess; raises if it fails."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err.strip()}")
    return elapsed, usage.ru_maxrss / 1024.0


def _write_tiny(path: Path, count: int) -> None:
    """A safetensors file of ``count`` 4x4 float32 tensors ``layer{i}.weight`` (randn, seed 0),
    written directly (``save_file`` takes over a minute for 10**6 tensors)."""
    g = torch.Generator().manual_seed(0)
    data = torch.randn(count, 4, 4, generator=g).numpy().astype("<f4").tobytes()
    header = {
        f"layer{i}.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [64 * i, 64 * i + 64]}
        for i in range(count)
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        fh.write(data)


def _inspect(path: Path) -> tuple[float, float]:
    return _timed([sys.executable, "-m", "core.cli.main", "inspect", str(path), "--json"])


def many_tensors(count: int, workdir: Path) -> dict[str, float]:
    """(a): inspect and compress a checkpoint of ``count`` 4x4 tensors."""
    path = workdir / f"tiny-{count}.safetensors"
    _write_tiny(path, count)
    inspect_s, inspect_mb = _inspect(path)
    out = workdir / "out"
    compress_s, compress_mb = _timed(
        [sys.executable, "-m", "core.cli.main", "compress", str(path), "--out", str(out),
         "--sparsity", "0.5", "--bits", "8", "--finetune-epochs", "0", "--format", "packed",
         "--quiet"]
    )  # fmt: skip
    return {
        "tensors": count,
        "inspect_s": inspect_s,
        "inspect_mb": inspect_mb,
        "compress_s": compress_s,
        "compress_mb": compress_mb,
        "packed_bytes": (out / "model.packed.safetensors").stat().st_size,
    }


def huge_inspect(count: int, workdir: Path) -> dict[str, float]:
    """(a) for ``count`` tensors, ``inspect --json`` only."""
    path = workdir / f"tiny-{count}.safetensors"
    _write_tiny(path, count)
    seconds, mb = _inspect(path)
    return {"tensors": count, "inspect_s": seconds, "inspect_mb": mb}


def exact_sparsity() -> list[dict[str, object]]:
    """(b): zeros applied for a 0.9 target on 25.2M weights, global and per-layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 2048)).eval()
    loaded = LoadedModel(module=model, format="eager", source="linear-25M", name="linear-25M")
    start = time.perf_counter()
    stats = analyze(loaded)
    analyze_s = time.perf_counter() - start
    rows = []
    for scope in ("global", "layer"):
        start = time.perf_counter()
        result = compress(loaded, simple_plan(TARGET, None, "magnitude", scope=scope), stats)
        seconds = time.perf_counter() - start
        per_layer = {
            r.tensor: (int((~result.masks[r.tensor]).sum()), r.numel) for r in result.layers
        }
        zeros = sum(z for z, _ in per_layer.values())
        n = sum(k for _, k in per_layer.values())
        if scope == "global":
            off = abs(zeros - round(TARGET * n))
        else:
            off = max(abs(z - round(TARGET * k)) for z, k in per_layer.values())
        rows.append(
            {
                "scope": scope,
                "weights": n,
                "zeros": zeros,
                "sparsity": zeros / n,
                "off": off,
                "compress_s": seconds,
                "analyze_s": analyze_s,
            }
        )
    return rows


def _tables(
    tiny: dict[str, float] | None,
    exact: list[dict[str, object]],
    huge: dict[str, float] | None = None,
) -> str:
    parts = []
    if tiny is not None or huge is not None:
        lines = [
            "Many tiny tensors (4x4 float32 each), `workbench` as a subprocess (wall clock, "
            "peak RSS): `inspect --json`, `compress --sparsity 0.5 --bits 8 --finetune-epochs 0 "
            "--format packed` (report included).",
            "",
            "| tensors | inspect s | inspect MiB | compress s | compress MiB | packed B |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        if tiny is not None:
            lines.append(
                f"| {tiny['tensors']:,} | {tiny['inspect_s']:.1f} | {tiny['inspect_mb']:.0f} | "
                f"{tiny['compress_s']:.1f} | {tiny['compress_mb']:.0f} | "
                f"{tiny['packed_bytes']:,} |"
            )
        if huge is not None:
            lines.append(
                f"| {huge['tensors']:,} | {huge['inspect_s']:.1f} | {huge['inspect_mb']:.0f} "
                "| - | - | - |"
            )
        parts.append("\n".join(lines))
    if exact:
        lines = [
            f"Exact target sparsity: magnitude pruning at {TARGET} on a 25.2M-weight model "
            "(4096x4096 + 2048x4096; both above the radix threshold). `off` is "
            f"`|zeros - round({TARGET} * n)|` (global: over the pool; per-layer: the worst layer).",
            "",
            "| scope | weights | zeros | sparsity | off | compress s |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in exact:
            lines.append(
                f"| {r['scope']} | {r['weights']:,} | {r['zeros']:,} | {r['sparsity']:.6%} | "
                f"{r['off']} | {r['compress_s']:.1f} |"
            )
        lines.append(f"\nAnalysis of the 25.2M-weight model: {exact[0]['analyze_s']:.1f} s.")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _write_section(body: str) -> None:
    section = f"{BEGIN}\n## Scale: many tensors, exact sparsity\n\n{body}\n\nProduced by `bench/bench_scale.py`.\n{END}"
    old = DOC.read_text(encoding="utf-8") if DOC.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if pattern.search(old):
        new = pattern.sub(lambda _: section, old)
    else:
        new = old.rstrip() + "\n\n" + section + "\n"
    tmp = DOC.with_name(f".{DOC.name}.tmp")
    tmp.write_text(new, encoding="utf-8")
    tmp.replace(DOC)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=100_000)
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--skip-large", action="store_true", help="skip the 25M-weight part")
    parser.add_argument("--skip-tiny", action="store_true", help="skip the many-tensor part")
    parser.add_argument("--huge", type=int, default=1_000_000, help="tensors for inspect only")
    parser.add_argument("--skip-huge", action="store_true", help="skip the --huge inspect")
    args = parser.parse_args()
    tiny = None
    if not args.skip_tiny:
        with tempfile.TemporaryDirectory(prefix="bench-scale-") as d:
            tiny = many_tensors(args.tensors, Path(d))
        print(
            f"{tiny['tensors']:,} tensors: inspect {tiny['inspect_s']:.1f} s "
            f"({tiny['inspect_mb']:.0f} MiB), compress {tiny['compress_s']:.1f} s "
            f"({tiny['compress_mb']:.0f} MiB)",
            flush=True,
        )
    huge = None
    if not args.skip_huge:
        with tempfile.TemporaryDirectory(prefix="bench-scale-") as d:
            huge = huge_inspect(args.huge, Path(d))
        print(
            f"{huge['tensors']:,} tensors: inspect {huge['inspect_s']:.1f} s "
            f"({huge['inspect_mb']:.0f} MiB)",
            flush=True,
        )
    exact = [] if args.skip_large else exact_sparsity()
    for r in exact:
        print(
            f"{r['scope']}: {r['zeros']:,} zeros of {r['weights']:,} "
            f"({r['sparsity']:.6%}), |zeros - round({TARGET}*n)| = {r['off']}",
            flush=True,
        )
    env = (
        f"Machine: {platform.machine()}, {os.cpu_count()} logical CPUs (shared), "
        f"Python {platform.python_version()}, torch {torch.__version__}; load average when "
        f"the run ended: {os.getloadavg()[0]:.1f} (other processes share the CPUs)."
    )
    body = _tables(tiny, exact, huge) + "\n\n" + env
    if not args.no_write:
        _write_section(body)


if __name__ == "__main__":
    main()
