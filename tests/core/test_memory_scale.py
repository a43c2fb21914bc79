"""Peak memory of ``workbench inspect`` / ``compress`` / packed reload on a ~17M-weight file.

Each command runs in a fresh subprocess that first imports everything it needs, records its
RSS, runs the command, and reports its peak RSS (``VmHWM``) above that baseline; the test
divides by the model's fp32 weight bytes. The model has Embedding- and Linear-shaped tensors
above the chunk sizes of the streaming code (4M elements), so whole-tensor float64 / int64
temporaries, a second copy of the weights on load, int32 codes and a third copy of the
weights in the engine all show up; the chunk sizes are scaled down with the model (4M -> 256K
elements). Measured here above the post-import baseline: before the streaming changes inspect
peaked at 3.8x, compress at 8.5x and the reload at 5.2x the weight bytes; with chunked
statistics and mapped tensors 1.25x / 5.6x / 3.1x; since compress streams tensor by tensor
into the archive (`core.export.stream`) and the reader decodes codes and masks one tensor at a
time, 1.3x / 3.5x / 1.55x; with `count_mask`'s radix select and the packed codec's chunked
temporaries compress 2.9x (dominated by per-tensor work on the 8.4M-weight table, half of
this model; see docs/benchmarks.md "Memory at scale" for 0.2B and 1B weights); since mapped
pages are given back after each pass (`core.base.memory.MappedPages`), large archives restore
to a mapped file (`core.packed.read_packed_spilled`) and the per-tensor temporaries work in
1M-element steps, 0.74x / 1.69x / 1.07x.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

#: (name, shape): one 8.4M-weight Embedding table and two 4.2M-weight Linear layers.
SHAPES = [
    ("embed.weight", (4096, 2048)),
    ("layers.0.fc.weight", (2048, 2048)),
    ("layers.0.fc.bias", (2048,)),
    ("layers.1.fc.weight", (2048, 2048)),
    ("layers.1.fc.bias", (2048,)),
]

_HARNESS = r"""
import json, resource, sys
def kib(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1])
    return 0
import torch, numpy, safetensors  # noqa
import core.cli.main, core.cli.inspect, core.cli.compress, core.compress.engine, core.analysis.stats  # noqa
import core.packed.writer, core.packed.reader, core.export.report, core.export.formats  # noqa
import core.ops.quantization, core.io.model_io, core.packed.codec, core.analysis.selection  # noqa
# the streaming code's chunks scaled down with the model (4M elements -> 256K)
for mod, attr in [
    (core.cli.inspect, "_STATS_CHUNK"), (core.compress.engine, "_SQNR_CHUNK"),
    (core.export.report, "_PAIR_CHUNK"), (core.io.model_io, "_CHUNK_NUMEL"),
    (core.ops.quantization, "_DEQUANT_CHUNK"), (core.packed.codec, "_KEY_CHUNK"),
    (core.packed.reader, "_UNPACK_CHUNK"), (core.analysis.selection, "_SELECT_CHUNK"),
]:
    if hasattr(mod, attr):  # (absent before the streaming changes)
        setattr(mod, attr, 1 << 18)
# ... and the smaller steps and thresholds by the same factor 16
for mod, attr in [
    (core.compress.engine, "_SQNR_STEP"), (core.export.report, "_PAIR_STEP"),
    (core.packed.codec, "_TAIL_CHUNK"), (core.packed.codec, "_BUCKET"),
    (core.packed.reader, "SPILL_MIN_BYTES"), (core.cli.inspect, "_ALONE_NUMEL"),
]:
    if hasattr(mod, attr):
        setattr(mod, attr, getattr(mod, attr) // 16)
base = kib("VmRSS:")
code = core.cli.main.main(sys.argv[1:])
print(json.dumps({"code": code, "base_kib": base, "peak_kib": kib("VmHWM:")}), file=sys.stderr)
"""


def _write(path: Path) -> int:
    """A float32 safetensors file of `SHAPES`, written tensor by tensor; returns the weights."""
    header: dict[str, object] = {}
    offset = 0
    for name, shape in SHAPES:
        nbytes = 4 * int(torch.Size(shape).numel())
        header[name] = {
            "dtype": "F32",
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    g = torch.Generator().manual_seed(0)
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for _, shape in SHAPES:
            fh.write(torch.randn(shape, generator=g).mul_(0.02).numpy().tobytes())
    return offset // 4


def _peak_over_weights(args: list[str], weights: int) -> float:
    proc = subprocess.run(
        [sys.executable, "-c", _HARNESS, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    assert proc.returncode == 0 and last.startswith("{"), proc.stderr[-2000:]
    out = json.loads(last)
    assert out["code"] == 0, proc.stderr[-2000:]
    return (out["peak_kib"] - out["base_kib"]) * 1024 / (4 * weights)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_inspect_compress_reload_peak_memory(tmp_path):
    model = tmp_path / "linear.safetensors"
    weights = _write(model)
    out = tmp_path / "out"
    inspect = _peak_over_weights(["inspect", str(model), "--json"], weights)
    compress = _peak_over_weights(
        [
            "compress", str(model), "--sparsity", "0.5", "--bits", "8", "--format", "packed",
            "--out", str(out), "--quiet",
        ],
        weights,
    )  # fmt: skip
    packed = out / "model.packed.safetensors"
    assert packed.is_file()
    reload = _peak_over_weights(["inspect", str(packed), "--json"], weights)
    assert inspect < 1.2, f"inspect peaked at {inspect:.2f}x the fp32 weight bytes"
    assert compress < 2.3, f"compress peaked at {compress:.2f}x the fp32 weight bytes"
    assert reload < 1.5, f"packed reload peaked at {reload:.2f}x the fp32 weight bytes"
    print(f"inspect {inspect:.2f}x, compress {compress:.2f}x, reload {reload:.2f}x")
