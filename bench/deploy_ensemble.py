"""Deployed-vs-simulated accuracy per export format, and ensembles vs one model at equal bytes.

Runs ``workbench compress`` on the digits demos with every runnable export format (the
report's deployed check) and ``workbench ensemble`` at a few settings, then writes the section
between ``<!-- deploy:begin -->`` and ``<!-- deploy:end -->`` of docs/results.md (appended when
the markers are missing). ``--no-write`` only prints. Single-threaded (OMP_NUM_THREADS=1):
on a shared 2-core machine two intra-op threads make PyTorch latencies erratic.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results.md"
BEGIN, END = "<!-- deploy:begin -->", "<!-- deploy:end -->"
FORMATS = "packed,onnx,onnx-int8,torchscript,pt2"
DEPLOY_RUNS = (("demo:mlp", "0.5", "8"), ("demo:cnn", "0.5", "8"), ("demo:mlp", "0.8", "4"))
#: model, members, sparsity, bits, epochs
ENSEMBLE_RUNS = (
    ("demo:mlp", 2, "0.9", "4", "2"),
    ("demo:mlp", 2, "0.9", "3", "5"),
    ("demo:mlp", 2, "0.8", "4", "5"),
    ("demo:cnn", 2, "0.8", "4", "3"),
)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _cli(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "core.cli.main", *args, "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=ENV,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr}")
    return proc


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def deploy_rows(tmp: Path) -> list[str]:
    rows = [
        "| model | sparsity / bits | format | bytes | deployed acc. | simulated acc. | "
        "agreement | rel. L2 | batch 1 ms, median [p10-p90] | batch 64 ms | flagged |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for model, s, b in DEPLOY_RUNS:
        out = tmp / f"{model.replace(':', '_')}_{s}_{b}"
        _cli("compress", model, "--out", str(out), "--sparsity", s, "--bits", b,
             "--format", FORMATS)  # fmt: skip
        report = json.loads((out / "report.json").read_text())
        for e in report["exports"]:
            d = e["deployed"]
            lat = d["latency_ms"]

            def cell(key: str, lat=lat) -> str:
                v = lat.get(key)
                return "–" if v is None else f"{v['median']:.3f} [{v['p10']:.3f}-{v['p90']:.3f}]"

            rows.append(
                f"| {model} | {s} / {b} | {e['format']} | {e['bytes_on_disk']:,} | "
                f"{_pct(d['accuracy'])} | {_pct(d['simulated_accuracy'])} | "
                f"{_pct(d['agreement'])} | {d['rel_l2']:.1e} | {cell('batch_1')} | "
                f"{cell('batch_64')} | {'yes' if d['deployed_mismatch'] else 'no'} |"
            )
    return rows


def ensemble_rows(tmp: Path) -> tuple[list[str], list[str]]:
    rows = [
        "| model | members x (sparsity, bits), epochs | ensemble bytes | ensemble acc. | "
        "member accs. | single (sparsity) bytes | single acc. | ensemble / single latency ms "
        "| winner |",
        "|---|---|---:|---:|---|---:|---:|---:|---|",
    ]
    winners = []
    for model, k, s, b, ep in ENSEMBLE_RUNS:
        out = tmp / f"ens_{model.replace(':', '_')}_{s}_{b}_{ep}"
        _cli("ensemble", model, "--out", str(out), "--members", str(k), "--sparsity", s,
             "--bits", b, "--finetune-epochs", ep)  # fmt: skip
        r = json.loads((out / "ensemble.json").read_text())
        members = ", ".join(_pct(m["accuracy"]) for m in r["members"])
        rows.append(
            f"| {model} | {k} x ({s}, {b}), {ep} | {r['ensemble']['bytes']:,} | "
            f"{_pct(r['ensemble']['accuracy'])} | {members} | "
            f"({r['single']['sparsity']:.3f}) {r['single']['bytes']:,} | "
            f"{_pct(r['single']['accuracy'])} | {r['ensemble']['latency_ms']:.3f} / "
            f"{r['single']['latency_ms']:.3f} | {r['winner']} |"
        )
        winners.append(r["winner"])
    return rows, winners


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dep = deploy_rows(Path(tmp))
        ens, winners = ensemble_rows(Path(tmp))
    counts = {w: winners.count(w) for w in ("ensemble", "single", "tie")}
    head = (
        f"Produced by `bench/deploy_ensemble.py` ({date.today().isoformat()}, torch "
        f"{torch.__version__}, {platform.machine()}, 1 intra-op thread)."
    )
    text = "\n".join(
        [
            BEGIN,
            "## Deployed files vs the in-app simulation",
            "",
            head + " `workbench compress MODEL --sparsity S --bits B --format "
            f"{FORMATS}` without fine-tuning; each written file is loaded as a deployment "
            "would (onnxruntime, `torch.jit.load`, `torch.export.load`, packed restored) and run "
            "on the 540-image digits test split. Simulated accuracy is the compressed PyTorch "
            "model's on the same samples; a file is flagged when they differ by more than one "
            "point or its outputs' relative L2 error exceeds 0.25.",
            "",
            *dep,
            "",
            "## Ensembles of compressed models vs one model at equal bytes",
            "",
            head + " `workbench ensemble MODEL --members K --sparsity S --bits B "
            "--finetune-epochs N`: each member pruned by magnitude and fine-tuned on its own "
            "bootstrap sample of the training split; the single model has the same bits and "
            "fine-tuning and the lowest sparsity whose packed size fits the members' total "
            "(so it is never larger; each member also pays its own archive header). Accuracy "
            "on the digits test split; latency at batch 64 (the ensemble runs every member).",
            "",
            *ens,
            "",
            f"Measured winners at equal bytes: ensemble {counts['ensemble']}, single "
            f"{counts['single']}, tie {counts['tie']} of {len(winners)} settings. Where the "
            "single model wins, each member, pruned harder to share the budget, loses more "
            "than averaging two of them wins back; the ensemble also costs K forward passes.",
            END,
        ]
    )
    print(text)
    if not args.no_write:
        old = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else ""
        if BEGIN in old and END in old:
            new = old[: old.index(BEGIN)] + text + old[old.index(END) + len(END) :]
        else:
            new = old.rstrip("\n") + "\n\n" + text + "\n"
        RESULTS.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
