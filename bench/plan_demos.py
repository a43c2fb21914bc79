"""Benchmark: the digits demos compressed with *no hand-written recipe* (issue: "Done means").

Runs, each in a subprocess exactly as a user would::

    workbench compress demo:mlp --target-ratio 40 --max-drop 0.5 --finetune-epochs 20
    workbench compress demo:cnn --target-ratio 39 --max-drop 1 --finetune-epochs 20

reads each run's report.json (its ``planning`` record: target, prediction, measurement) and
writes a "Planned automatically" section into docs/results.md (between its markers; the
hand-made tables above it are left alone). Prints the same table.

Run: ``.venv/bin/python bench/plan_demos.py [--no-write]``
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
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results.md"
BEGIN, END = "<!-- planned:begin -->", "<!-- planned:end -->"
RUNS = (("demo:mlp", "40", "0.5"), ("demo:cnn", "39", "1"))


def run_one(model: str, ratio: str, drop: str, out: Path) -> tuple[dict, float]:
    cmd = [
        sys.executable, "-m", "core.cli.main", "compress", model, "--target-ratio", ratio,
        "--max-drop", drop, "--finetune-epochs", "20", "--out", str(out), "--quiet",
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return json.loads((out / "report.json").read_text()), time.perf_counter() - start


def section(rows: list[tuple[str, str, str, dict, float]]) -> str:
    lines = [
        BEGIN,
        "## Planned automatically (no hand-written recipe)",
        "",
        f"Produced by `bench/plan_demos.py` ({date.today().isoformat()}, torch "
        f"{torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads). "
        "`workbench compress MODEL --target-ratio R --max-drop P --finetune-epochs 20`: a "
        "sensitivity scan on the validation part of the training split, the budget solver "
        "(per-layer sparsity, bits 4..16, scales, 8-bit biases) at the ratio's byte budget, then "
        "the shipped recipes' recovery (11 pruning steps with distillation). Drop and size are "
        "measured on the test split and on disk. Before the real run the drop target is "
        "checked after fine-tuning on the validation part of the training split; a plan that "
        "misses it is re-solved at the same bytes with another damage model (output error "
        "energy, then the weights' own error energy) and the plan with the smallest "
        "validation drop is used. The archive header (format version 2) stores the recipe "
        "deflated with a preset dictionary.",
        "",
        "| Command | Target | Size on disk | Compression | Accuracy before -> after | Drop "
        "(points) | Met | Time |",
        "|---|---|---:|---:|---|---:|---|---:|",
    ]
    for model, ratio, drop, report, seconds in rows:
        plan = report["planning"]
        meas = plan["measured"]
        met = plan["met"]
        ok = (
            "yes"
            if all(met.values())
            else "no ("
            + ", ".join(k.replace("_within_target", "") for k, v in met.items() if not v)
            + ")"
        )
        lines.append(
            f"| `compress {model} --target-ratio {ratio} --max-drop {drop} --finetune-epochs 20`"
            f" | >= {ratio}x, <= {drop} pt | {meas['bytes']:,} B | {meas['ratio']:.1f}x | "
            f"{100 * report['accuracy_before']:.2f}% -> {100 * report['accuracy_after']:.2f}% | "
            f"{meas['accuracy_drop']:.2f} | {ok} | {seconds:.0f} s |"
        )
    lines.append("")
    lines.append("Per-layer choices:")
    lines.append("")
    for model, _, _, report, _ in rows:
        layers = ", ".join(
            f"{c['layer']} {100 * c['sparsity']:.1f}% @ {c['bits']}b"
            + (" per-channel" if c["per_channel"] else "")
            for c in report["planning"]["layers"]
        )
        lines.append(f"- {model}: {layers}")
    lines.append("")
    lines.append(
        "Checked after fine-tuning (validation part of the training split, before the real "
        "run; the plan with the smallest drop is used):"
    )
    lines.append("")
    for model, _, _, report, _ in rows:
        checked = report["planning"].get("checked_after_finetune") or []
        text = "; ".join(
            f"{r['damage_model']} plan {r['predicted_bytes']:,} B: "
            f"{r['validation_drop']:.2f} points" + (" (used)" if r.get("chosen") else "")
            for r in checked
        )
        lines.append(f"- {model}: {text or 'not checked'}")
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model, ratio, drop in RUNS:
            report, seconds = run_one(model, ratio, drop, Path(tmp) / model.replace(":", "_"))
            rows.append((model, ratio, drop, report, seconds))
    text = section(rows)
    print(text)
    if args.no_write:
        return
    doc = RESULTS.read_text(encoding="utf-8")
    if BEGIN in doc:
        doc = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: text, doc, flags=re.S)
    else:
        doc = doc.rstrip("\n") + "\n\n" + text + "\n"
    RESULTS.write_text(doc, encoding="utf-8")


if __name__ == "__main__":
    main()
