"""One-shot (no fine-tuning) magnitude + round-to-nearest vs OBS + GPTQ at equal bytes.

Runs ``workbench compress`` on the digits demos and on a generated transformer (the tests'
TinyTransformer: embedding + 2 encoder layers, trained here for a few epochs on a synthetic
counting task, saved as a full pickled model with its data) with the same sparsity and
bit-width for both methods (so the packed archives are the same size, to a few bytes of index),
reads ``report.json`` (bytes on disk, accuracy before/after on the held-out split) and the wall
time of each run, and rewrites the ``second-order`` section of ``docs/results.md``. The
compression step alone is also timed in-process (`core.compress.engine.compress` with the training
split as calibration data) and given as a ratio to one forward pass over that data.

    python bench/bench_second_order.py
"""

from __future__ import annotations

import json
import math
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
#: Operating points of the generated transformer (its file is made by `_transformer`).
TRANSFORMER_POINTS = [(0.5, 4), (0.7, 4)]


def _transformer(folder: Path) -> tuple[str, list[str]]:
    """Train the tests' TinyTransformer briefly (so its weights are not random) and save it
    with its data; returns the model path and the extra CLI arguments."""
    import numpy as np
    import torch
    from torch import nn

    sys.path.insert(0, str(ROOT))
    from tests.models import TinyTransformer

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 100, (1280, 16), generator=g)
    y = ((x < 50).sum(1) - 6).clamp(0, 4)
    model = TinyTransformer()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    model.train()
    for _ in range(8):
        for i in range(0, 1024, 64):
            loss = nn.functional.cross_entropy(model(x[i : i + 64]), y[i : i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    path = folder / "transformer.pt"
    torch.save(model, path)
    np.savez(folder / "transformer-data.npz", x=x.numpy(), y=y.numpy())
    return str(path), ["--trust", "--data", str(folder / "transformer-data.npz")]


def compress_over_forward(
    model: str, extra: list[str], sparsity: float, bits: int, method: str, quant: str
) -> float:
    """In-process: seconds of `core.compress.engine.compress` (calibration = the training split) over
    the seconds of one forward pass of the model over that same data."""
    import torch

    sys.path.insert(0, str(ROOT))
    from dataclasses import replace

    from core.analysis.stats import analyze
    from core.compress.engine import compress
    from core.io.data import demo_data_for, load_data, split_dataset
    from core.io.model_io import load_model
    from core.recipe.plan import simple_plan

    torch.set_num_threads(2)
    loaded = load_model(model, trust="--trust" in extra)
    if "--data" in extra:
        train, _ = split_dataset(load_data(extra[extra.index("--data") + 1]))
    else:
        train, _ = demo_data_for(loaded)
    stats = analyze(loaded)
    plan = simple_plan(sparsity, bits, method)
    plan = plan.with_default(replace(plan.default, quant=replace(plan.default.quant, method=quant)))
    # the best of several runs of each (a shared machine adds noise, never removes work)
    fwd = math.inf
    with torch.no_grad():
        loaded.module(train.x)  # warm-up
        for _ in range(7):
            start = time.perf_counter()
            loaded.module(train.x)
            fwd = min(fwd, time.perf_counter() - start)
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        compress(loaded, plan, stats, calibration=train)
        best = min(best, time.perf_counter() - start)
    return best / fwd


def run(
    model: str, sparsity: float, bits: int, method: str, quant: str, out: Path, extra=()
) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "core.cli.main",
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
        *extra,
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
        "| model | sparsity | bits | method | packed B | ratio | accuracy | drop (points) "
        "| wall s | compress / forward |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        tpath, textra = _transformer(Path(tmp))
        points = [(m, s, b, [], m) for m, s, b in POINTS] + [
            (tpath, s, b, textra, "transformer") for s, b in TRANSFORMER_POINTS
        ]
        for model, sparsity, bits, extra, label in points:
            for method, quant in METHODS:
                r = run(model, sparsity, bits, method, quant, Path(tmp) / "out", extra)
                over = compress_over_forward(model, extra, sparsity, bits, method, quant)
                drop = 100 * (r["before"] - r["after"])
                rows.append(
                    f"| {label} | {100 * sparsity:g}% | {bits} | {method} + {quant} | "
                    f"{r['bytes']:,} | {r['ratio']:.1f}x | {100 * r['after']:.2f}% | "
                    f"{drop:+.2f} | {r['seconds']:.1f} | {over:.1f}x |"
                )
                print(rows[-1], flush=True)
    section = "\n".join(
        [
            BEGIN,
            "## One shot, no fine-tuning: magnitude + RTN vs OBS + GPTQ at equal bytes",
            "",
            "Made by `python bench/bench_second_order.py` (2 threads). Same sparsity and "
            "bit-width per row pair, so the archives differ by a few bytes of index; accuracy "
            "on the held-out split (540 digits images; 256 sequences for the transformer), "
            "calibration on the training split. Wall time is the whole `workbench compress` "
            "command (start-up, load, analysis, compression, evaluation, export); *compress / "
            "forward* is the compression step alone (in-process) over one forward pass of the "
            "model over the calibration data. The transformer is the tests' TinyTransformer "
            "(embedding, two encoder layers, 26k weights) trained for 8 epochs on a synthetic "
            "counting task. Second-order reconstruction recovers most of "
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
