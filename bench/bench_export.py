"""Benchmark: is the compressed model really smaller on disk, and is int8 ONNX really faster?

For ``demo:mlp``, ``demo:cnn``, a 25M-parameter Linear model and a small convolutional network
(the Conv-heavy case for int8), compressed with the plan in ``PLANS``:

* bytes on disk: fp32 ``torch.save`` of the original, gzip -9 of the pruned dense ``torch.save``
  file, our packed archive (and its preview estimate), the packed archive with zstd-coded
  codes, and the zero-order entropy bound of codes + masks;
* latency: fp32 vs int8 ONNX (``onnx-int8`` export) in onnxruntime with 1 and 2 intra-op
  threads, median of repeated runs on one batch, plus the max abs difference to PyTorch.

Writes the tables to the export section of docs/benchmarks.md (between
``<!-- bench:export -->`` and ``<!-- /bench:export -->``; other sections are left alone).

Run: ``.venv/bin/python bench/bench_export.py [--no-write] [--skip-large]``
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from core.analysis.estimate import preview  # noqa: E402
from core.analysis.stats import analyze  # noqa: E402
from core.base.model import LoadedModel  # noqa: E402
from core.compress.engine import compress  # noqa: E402
from core.export.formats import export, ort_latency, ort_session  # noqa: E402
from core.io.data import demo_data_for  # noqa: E402
from core.io.model_io import load_model  # noqa: E402
from core.packed import write_packed  # noqa: E402
from core.recipe.plan import simple_plan  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench:export -->", "<!-- /bench:export -->"

#: Plan per model: (sparsity, bits). Magnitude pruning, global scope, asymmetric per-tensor
#: codes (one scale per layer, as Deep Compression's per-layer codebooks).
PLANS = {
    "demo:mlp": (0.96, 4),
    "demo:cnn": (0.92, 5),
    "linear-25M": (0.95, 5),
    "conv-1.2M": (0.8, 8),
}
#: Batch used for the latency measurements.
BATCH = {"demo:mlp": 256, "demo:cnn": 256, "linear-25M": 64, "conv-1.2M": 32}


def linear_25m(seed: int = 0) -> nn.Module:
    """The same 25.2M-parameter model as the analysis benchmark."""
    from bench.bench_analysis import build_model

    return build_model(seed)


def conv_net(seed: int = 0) -> nn.Module:
    """A VGG-style CNN on 3x32x32 inputs (about 1.2M parameters, Conv-heavy compute)."""
    torch.manual_seed(seed)

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(
        *block(3, 64),
        *block(64, 128),
        *block(128, 256),
        nn.Conv2d(256, 256, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(256, 10),
    ).eval()


def _model(name: str) -> LoadedModel:
    if name.startswith("demo:"):
        return load_model(name)
    if name == "linear-25M":
        module, x = linear_25m(), torch.randn(BATCH[name], 1024)
    else:
        module, x = conv_net(), torch.randn(BATCH[name], 3, 32, 32)
    return LoadedModel(
        module=module, format="eager", source=f"bench:{name}", name=name, example_input=x
    )


def _saved_bytes(state: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def measure(name: str, tmp: Path) -> dict[str, object]:
    """Every number of one row."""
    loaded = _model(name)
    split = demo_data_for(loaded)
    train, test = split if split is not None else (None, None)
    sparsity, bits = PLANS[name]
    plan = simple_plan(sparsity, bits, per_channel=False)
    stats = analyze(loaded, train)
    estimate = preview(stats, plan)
    result = compress(loaded, plan, stats)

    fp32 = len(_saved_bytes(loaded.module.state_dict()))
    dense = _saved_bytes(result.compressed.module.state_dict())
    gz = len(gzip.compress(dense, compresslevel=9))
    t0 = time.perf_counter()
    info = write_packed(result, tmp / f"{name}.packed.safetensors".replace(":", "_"), force=True)
    t_pack = time.perf_counter() - t0
    zinfo = write_packed(
        result, tmp / f"{name}.z.packed.safetensors".replace(":", "_"), force=True, entropy=True
    )

    acc = None
    if test is not None:
        from core.evaluate import evaluate

        acc = (
            evaluate(loaded, test, latency=False).accuracy,
            evaluate(result.compressed, test, latency=False).accuracy,
        )
    x = test.x[: BATCH[name]] if test is not None else loaded.example_input
    fp = export(result, "onnx", tmp / f"{name}.onnx".replace(":", "_"), force=True, data=x)
    q = export(result, "onnx-int8", tmp / f"{name}.int8.onnx".replace(":", "_"), force=True, data=x)
    xn = x.numpy()
    lat = {}
    for label, rec in (("fp32", fp), ("int8", q)):
        for threads in (1, 2):
            sess = ort_session(rec.path, threads=threads)
            lat[(label, threads)] = ort_latency(sess, xn, warmup=5, repeats=30)
            del sess
    return {
        "name": name,
        "params": sum(p.numel() for p in loaded.module.parameters()),
        "plan": f"{int(round(sparsity * 100))}% / {bits} bit",
        "sparsity": result.sparsity,
        "fp32": fp32,
        "gzip": gz,
        "packed": info.bytes_on_disk,
        "estimate": estimate.packed_bytes,
        "zstd": zinfo.bytes_on_disk,
        "entropy": info.entropy_bound_bytes,
        "pack_s": t_pack,
        "onnx_fp32": fp.bytes_on_disk,
        "onnx_int8": q.bytes_on_disk,
        "int8_mode": "static QDQ" if "static" in q.note else "dynamic",
        "int8_diff": q.max_abs_diff,
        "fp32_diff": fp.max_abs_diff,
        "lat": lat,
        "batch": int(x.shape[0]),
        "accuracy": acc,
    }


def _tables(rows: list[dict[str, object]]) -> str:
    size = [
        "| model | params | plan (sparsity / bits) | fp32 torch.save | gzip -9 of pruned dense | "
        "packed (ours) | preview estimate | packed + zstd | entropy bound | ratio vs fp32 | "
        "digits accuracy (no fine-tuning) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        acc = r["accuracy"]
        acc_text = f"{100 * acc[0]:.2f}% -> {100 * acc[1]:.2f}%" if acc else "n/a (random weights)"
        size.append(
            f"| {r['name']} | {r['params']:,} | {r['plan']} | {r['fp32']:,} | {r['gzip']:,} | "
            f"**{r['packed']:,}** | {r['estimate']:,} "
            f"({100 * (r['packed'] - r['estimate']) / r['packed']:+.2f}%) | {r['zstd']:,} | "
            f"{r['entropy']:,} | {r['fp32'] / r['packed']:.1f}x | {acc_text} |"
        )
    lat = [
        "| model | batch | ONNX fp32 bytes | ONNX int8 bytes | int8 mode | fp32 1 thr (ms) | "
        "int8 1 thr (ms) | fp32 2 thr (ms) | int8 2 thr (ms) | int8 max abs diff |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        t = r["lat"]
        lat.append(
            f"| {r['name']} | {r['batch']} | {r['onnx_fp32']:,} | {r['onnx_int8']:,} | "
            f"{r['int8_mode']} | {t[('fp32', 1)]:.3f} | {t[('int8', 1)]:.3f} | "
            f"{t[('fp32', 2)]:.3f} | {t[('int8', 2)]:.3f} | {r['int8_diff']:.2e} |"
        )
    return "\n".join(size) + "\n\n" + "\n".join(lat)


def _write_section(body: str) -> None:
    section = f"{BEGIN}\n## Export: bytes on disk and ONNX latency\n\n{body}\n\nProduced by `bench/bench_export.py`.\n{END}"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    old = DOC.read_text(encoding="utf-8") if DOC.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if pattern.search(old):
        new = pattern.sub(lambda _: section, old)
    else:
        new = old.rstrip() + "\n\n" + section + "\n"
    tmp = DOC.with_name(f".{DOC.name}.tmp")
    tmp.write_text(new, encoding="utf-8")
    tmp.replace(DOC)


def run(*, write: bool, skip_large: bool) -> str:
    names = [n for n in PLANS if not (skip_large and n == "linear-25M")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-export-") as d:
        for name in names:
            rows.append(measure(name, Path(d)))
            r = rows[-1]
            print(
                f"{name}: fp32 {r['fp32']:,} B, gzip {r['gzip']:,} B, packed {r['packed']:,} B "
                f"(estimate {r['estimate']:,}), zstd {r['zstd']:,} B, entropy {r['entropy']:,} B; "
                f"packing took {r['pack_s']:.2f} s",
                flush=True,
            )
    body = _tables(rows)
    env = (
        f"Machine: {platform.machine()}, {os.cpu_count()} logical CPUs, "
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"onnxruntime {__import__('onnxruntime').__version__}. Sizes in bytes; latency is the "
        "median of 30 runs of one batch after 5 warm-up runs. The dense `torch.save` of the "
        "pruned model is as large as the original (zeros are stored); gzip recovers part of "
        "it, the packed archive stores only kept codes plus a relative index. The entropy "
        "bound is the zero-order entropy of the codes and the masks plus everything stored raw "
        "(biases, scales, header). int8 mode: static QDQ (calibrated) for convolutional "
        "models, dynamic otherwise. The plans are for size, without fine-tuning, so accuracy "
        "drops; `bench/` results of the engine show the fine-tuned accuracy. Load average when the run ended: "
        f"{os.getloadavg()[0]:.1f} (on a shared machine, 2-thread timings suffer most from "
        "other processes)."
    )
    text = env + "\n\n" + body
    print(body)
    if write:
        _write_section(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print only, leave docs/ alone")
    parser.add_argument("--skip-large", action="store_true", help="skip the 25M-parameter model")
    args = parser.parse_args()
    run(write=not args.no_write, skip_large=args.skip_large)


if __name__ == "__main__":
    main()
