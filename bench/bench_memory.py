"""Benchmark: peak memory and wall time at 100M-1B weights.

Two models are generated into a work folder (``--workdir``, default a temporary folder; deleted
afterwards unless ``--keep``):

(a) a weights-only safetensors file of ``--weights`` (default 1e9) float32 weights made of an
    Embedding-shaped table (32000 x D) and Linear-shaped weight/bias pairs (D x D, D = 4096
    unless the model is too small for that); written tensor by tensor, never whole in memory;
(b) a Hugging Face style BERT folder (transformers ``BertConfig``, ``--bert-layers`` encoder
    layers, default 12 = bert-base, ~110M weights, random init, ``save_pretrained`` as
    safetensors). ``--skip-bert`` leaves it out.

On each model ``workbench inspect --json``, ``workbench compress --sparsity 0.5 --bits 8
--format packed --out ...`` (weights only, no data) and ``workbench inspect --json`` of the
packed archive (which reloads and restores it) run as subprocesses. For each step the bench
prints the wall time and the child's peak RSS (``ru_maxrss`` from ``wait4``), also as a multiple
of the model's fp32 weight bytes. ``--trace`` also prints the RSS (polled from ``/proc``) at
each progress line the command writes, to see which phase holds the memory.

``--write`` puts the table into docs/benchmarks.md between ``<!-- bench:memory -->`` and
``<!-- /bench:memory -->`` (other sections are left alone).

Run: ``.venv/bin/python bench/bench_memory.py [--weights 2e8] [--skip-bert] [--trace] [--write]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench:memory -->", "<!-- /bench:memory -->"
#: ``workbench`` run in a child that reports its own peak RSS (``VmHWM``, which starts
#: afresh at exec) as its last stderr line: ``ru_maxrss`` of a child counts the parent's
#: pages at fork, so after generating a 1B-weight file every child "peaked" at >= 1.2 GiB.
_PEAK_HARNESS = (
    "import sys, runpy\n"
    "def hwm():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmHWM:'):\n"
    "            return int(line.split()[1]) * 1024\n"
    "    return 0\n"
    "sys.argv = ['workbench', *sys.argv[1:]]\n"
    "try:\n"
    "    runpy.run_module('core.cli.main', run_name='__main__')\n"
    "except SystemExit as exc:\n"
    "    code = exc.code\n"
    "else:\n"
    "    code = 0\n"
    "print(f'PEAK_RSS {hwm()}', file=sys.stderr, flush=True)\n"
    "sys.exit(code)\n"
)
WORKBENCH = [sys.executable, "-c", _PEAK_HARNESS]


# --------------------------------------------------------------------------- models


def layer_shapes(weights: float, dim: int = 4096, vocab: int = 32000) -> list[tuple[str, tuple]]:
    """(name, shape) of an Embedding table plus Linear weight/bias pairs totalling ~``weights``."""
    n = int(weights)
    while dim > 64 and vocab * dim + dim * dim > n:
        dim //= 2
    shapes: list[tuple[str, tuple]] = [("embed.weight", (vocab, dim))]
    for i in range(max(1, (n - vocab * dim) // (dim * dim + dim))):
        shapes.append((f"layers.{i}.fc.weight", (dim, dim)))
        shapes.append((f"layers.{i}.fc.bias", (dim,)))
    shapes.append(("head.weight", (16, dim)))
    shapes.append(("head.bias", (16,)))
    return shapes


def write_safetensors(path: Path, shapes: list[tuple[str, tuple]], seed: int = 0) -> int:
    """Write a float32 safetensors file tensor by tensor (random normal * 0.02); returns the
    number of weights."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes:
        nbytes = 4 * int(torch.Size(shape).numel())
        header[name] = {
            "dtype": "F32",
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    g = torch.Generator().manual_seed(seed)
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for _, shape in shapes:
            t = torch.randn(shape, generator=g).mul_(0.02)
            fh.write(t.numpy().tobytes())
            del t
    return offset // 4


def write_bert(folder: Path, layers: int) -> int:
    """A random-init BERT folder (config.json + model.safetensors); returns its weight count."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(num_hidden_layers=layers)
    model = BertModel(config)
    model.save_pretrained(folder, safe_serialization=True)
    n = sum(p.numel() for p in model.state_dict().values())
    del model
    return n


# --------------------------------------------------------------------------- measuring


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_step(cmd: list[str], trace: bool) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, stdout) of a subprocess; raises if it fails."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
    )
    errs: list[str] = []
    outs: list[str] = []

    def read_err() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            errs.append(line)
            if trace:
                rss = _rss_kib(proc.pid) / 2**20
                t = time.perf_counter() - start
                print(f"      [{t:7.1f}s {rss:6.2f} GiB] {line.rstrip()[:100]}", flush=True)

    def read_out() -> None:
        assert proc.stdout is not None
        outs.append(proc.stdout.read())

    threads = [threading.Thread(target=read_err), threading.Thread(target=read_out)]
    for th in threads:
        th.start()
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    for th in threads:
        th.join()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd[-6:])} failed ({code}): {''.join(errs)[-2000:]}")
    peaks = [int(line.split()[1]) for line in errs if line.startswith("PEAK_RSS ")]
    # the child's own high-water mark where it reports one (`_PEAK_HARNESS`), else ru_maxrss
    return elapsed, peaks[-1] if peaks else usage.ru_maxrss * 1024, "".join(outs)


def bench_model(label: str, model: Path, weights: int, work: Path, trace: bool) -> list[dict]:
    out = work / f"out-{label}"
    steps = [
        ("inspect", [*WORKBENCH, "inspect", str(model), "--json"]),
        (
            "compress",
            [
                *WORKBENCH,
                "compress",
                str(model),
                "--sparsity",
                "0.5",
                "--bits",
                "8",
                "--format",
                "packed",
                "--out",
                str(out),
                "--force",
            ],
        ),  # fmt: skip
        ("inspect packed (reload)", None),
    ]
    rows = []
    fp32 = 4 * weights
    # What the interpreter holds before any model: the same imports as the command
    # (transformers too for a Hugging Face folder); the last column is over this.
    imports = "import core.cli.main"
    if model.is_dir():  # transformers and the folder's model class (imported lazily)
        imports += (
            "\nimport transformers\n"
            f"arch = transformers.AutoConfig.from_pretrained({str(model)!r}).architectures[0]\n"
            "getattr(transformers, arch)"
        )
    probe = (
        f"{imports}\nimport sys\nfor line in open('/proc/self/status'):\n"
        "    if line.startswith('VmHWM:'):\n"
        "        print('PEAK_RSS', int(line.split()[1]) * 1024, file=sys.stderr)\n"
    )
    _, baseline, _ = run_step([sys.executable, "-c", probe], False)
    shown = imports.splitlines()[0] + (" + transformers, model class" if model.is_dir() else "")
    print(f"  {label}: interpreter baseline ({shown}) {baseline / 2**30:.2f} GiB", flush=True)
    for step, cmd in steps:
        if cmd is None:
            packed = out / "model.packed.safetensors"
            cmd = [*WORKBENCH, "inspect", str(packed), "--json"]
        print(f"  {label}: {step} ...", flush=True)
        try:
            wall, peak, stdout = run_step(cmd, trace)
        except RuntimeError as exc:  # report the failure, keep the other figures
            print(f"  {label}: {step} FAILED: {str(exc).strip().splitlines()[-1][:300]}")
            rows.append({"model": label, "step": f"{step} (failed)", "wall_s": 0.0,
                         "peak_rss": 0, "ratio": 0.0})  # fmt: skip
            if step == "compress":
                break
            continue
        if step.startswith("inspect"):
            info = json.loads(stdout)
            seen = int(info.get("total_params") or 0)
            if seen < weights * 0.9:
                raise RuntimeError(f"{step} listed {seen:,} weights of {weights:,}")
        row = {
            "model": label,
            "step": step,
            "wall_s": wall,
            "peak_rss": peak,
            "ratio": peak / fp32,
            "baseline": baseline,
            "above": (peak - baseline) / fp32,
        }
        print(
            f"  {label}: {step:<24} {wall:8.1f} s  peak RSS {peak / 2**30:6.2f} GiB  "
            f"= {row['ratio']:.2f}x fp32 weights ({row['above']:.2f}x above the baseline)",
            flush=True,
        )
        rows.append(row)
    if (out / "model.packed.safetensors").exists():
        rows[-1]["packed_bytes"] = (out / "model.packed.safetensors").stat().st_size
    shutil.rmtree(out, ignore_errors=True)
    return rows


# --------------------------------------------------------------------------- report


def table(models: list[tuple[str, int, list[dict]]]) -> str:
    lines = [
        "## Memory at scale (`bench/bench_memory.py`)",
        "",
        f"Measured by `bench/bench_memory.py` on {platform.machine()} "
        f"({os.cpu_count()} cores, {_mem_gib():.0f} GiB RAM), torch {torch.__version__}. "
        "Peak RSS is the child's own high-water mark (`VmHWM` at exit); the ratio is over the "
        "model's fp32 weight bytes "
        "(target <= 1.5x, aim 1.2x). The last column leaves out the interpreter's own peak "
        "with the command's imports and no model (`python -c 'import core.cli.main'`, plus "
        "transformers and the folder's model class for a folder), measured the same way in the same run. Compress is "
        "`--sparsity 0.5 --bits 8 --format packed` (no data); the reload step is "
        "`workbench inspect` of the packed archive.",
        "",
    ]
    for label, weights, rows in models:
        lines += [
            f"**{label}** ({weights:,} weights, {4 * weights / 2**30:.2f} GiB fp32)",
            "",
            "| step | peak RSS | RSS / fp32 weight bytes | (RSS - baseline) / fp32 | wall time |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in rows:
            base = f"{r['above']:.2f}x ({r['baseline'] / 2**30:.2f} GiB)" if "above" in r else "-"
            lines.append(
                f"| {r['step']} | {r['peak_rss'] / 2**30:.2f} GiB | {r['ratio']:.2f}x | {base} | "
                f"{r['wall_s']:.1f} s |"
            )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _mem_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        return 0.0


def write_doc(text: str) -> None:
    doc = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    block = f"{BEGIN}\n{text}{END}"
    if BEGIN in doc and END in doc:
        doc = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: block, doc, flags=re.S)
    else:
        doc = doc.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(doc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", type=float, default=1e9, help="weights of the safetensors model")
    ap.add_argument("--bert-layers", type=int, default=12, help="encoder layers of the BERT")
    ap.add_argument("--skip-bert", action="store_true")
    ap.add_argument("--skip-linear", action="store_true")
    ap.add_argument("--workdir", type=Path, help="where to generate the models (default: tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the generated models")
    ap.add_argument("--trace", action="store_true", help="RSS at each progress line")
    ap.add_argument("--write", action="store_true", help="write docs/benchmarks.md")
    args = ap.parse_args()

    shapes = layer_shapes(args.weights)
    n = sum(int(torch.Size(s).numel()) for _, s in shapes)
    base = args.workdir or Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    need = 4 * n * 2.2 + (0 if args.skip_bert else 1.2e9)  # model + packed + output staging
    free = shutil.disk_usage(base).free
    if free < need:
        print(f"not enough disk in {base}: {free / 2**30:.1f} GiB free, {need / 2**30:.1f} needed")
        return 2
    work = Path(tempfile.mkdtemp(prefix="wb-bench-memory-", dir=base))
    models = []
    try:
        if not args.skip_linear:
            path = work / "linear.safetensors"
            t0 = time.perf_counter()
            n = write_safetensors(path, shapes)
            print(f"generated {path.name}: {n:,} weights, {len(shapes)} tensors "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
            label = f"safetensors, {n / 1e9:.2g}B weights"
            models.append((label, n, bench_model("linear", path, n, work, args.trace)))
            models[-1] = (label, n, models[-1][2])
            path.unlink()
        if not args.skip_bert:
            folder = work / "bert"
            nb = write_bert(folder, args.bert_layers)
            print(f"generated BERT folder: {nb:,} weights", flush=True)
            label = f"HF BERT folder, {nb / 1e6:.0f}M weights"
            models.append((label, nb, bench_model("bert", folder, nb, work, args.trace)))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    text = table(models)
    print()
    print(text)
    if args.write:
        write_doc(text)
        print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
