"""One-shot (no fine-tuning) magnitude + round-to-nearest vs OBS + GPTQ at equal bytes.

Runs ``workbench compress`` on the digits demos with the same sparsity and bit-width for both
methods (so the packed archives are the same size, to a few bytes of index), reads
``report.json`` (bytes on disk, accuracy before/after on the 540-image held-out split) and the
wall time of each run, and rewrites the ``second-order`` section of ``docs/results.md``.

    python bench/bench_second_order.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results.md"
BEGIN, END = "<!-- second-order:begin -->", "<!-- second-order:end -->"

#: (model, sparsity, bits): the demos' Deep-Compression-like operating points, one shot.
POINTS = [
    ("demo:mlp", 0.9, 4),
    ("demo:mlp", 0.95, 4),
    ("demo:mlp", 0.97, 4),
    ("demo:mlp", 0.98, 3),
    ("demo:mlp", 0.985, 3),
    ("demo:cnn", 0.8, 4),
    ("demo:cnn", 0.9, 4),
]
METHODS = [("magnitude", "rtn"), ("obs", "gptq")]


def run(model: str, sparsity: float, bits: int, method: str, quant: str, out: Path) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "core.cli",
        "compress",
        model,
        "--out",
        str(out),
        "--force",
        "--quiet",
        "--sparsity",
        str(sparsity),
        "--bits",
        str(bits),
        "--method",
        method,
        "--quant",
        quant,
        "--finetune-epochs",
        "0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    report = json.loads((out / "report.json").read_text())
    return {
        "bytes": report["compressed_bytes"],
        "ratio": report["compression_ratio"],
        "before": report["accuracy_before"],
        "after": report["accuracy_after"],
        "seconds": seconds,
    }


def main() -> None:
    rows = [
        "| model | sparsity | bits | method | packed B | ratio | accuracy | drop (points) | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for model, sparsity, bits in POINTS:
            for method, quant in METHODS:
                r = run(model, sparsity, bits, method, quant, Path(tmp) / "out")
                drop = 100 * (r["before"] - r["after"])
                rows.append(
                    f"| {model} | {100 * sparsity:g}% | {bits} | {method} + {quant} | "
                    f"{r['bytes']:,} | {r['ratio']:.1f}x | {100 * r['after']:.2f}% | "
                    f"{drop:+.2f} | {r['seconds']:.1f} |"
                )
                print(rows[-1], flush=True)
    section = "\n".join(
        [
            BEGIN,
            "## One shot, no fine-tuning: magnitude + RTN vs OBS + GPTQ at equal bytes",
            "",
            "Made by `python bench/bench_second_order.py` (2 threads). Same sparsity and "
            "bit-width per row pair, so the archives differ by a few bytes of index; accuracy "
            "on the 540-image held-out digits split, calibration on the training split. Wall "
            "time is the whole `workbench compress` command (start-up, load, analysis, "
            "compression, evaluation, export). Second-order reconstruction recovers most of "
            "the one-shot loss at moderate rates (demo:cnn 80%/4 bit: 97.2% vs 47.2%); at 40x "
            "on demo:mlp both collapse without retraining (22.8% vs 9.6%): that rate needs the "
            "fine-tuned recipe above (40.9x at 1.11% error).",
            "",
            *rows,
            END,
        ]
    )
    text = RESULTS.read_text(encoding="utf-8")
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    RESULTS.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
