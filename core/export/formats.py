"""Exports of a compression result: the packed archive and dense PyTorch / ONNX files.

Every export is written atomically (temporary file in the target directory, then rename; the
temporary file is removed on any failure or cancel), never overwrites an existing file without
``force``, and is verified after writing: the file is loaded back and run on data next to the
compressed PyTorch model (max abs difference of the outputs) and its latency is measured
(onnxruntime for ONNX files, PyTorch otherwise).

Dense exports hold the compressed weights as they are in the compressed model: pruned weights
are zeros, quantized ones their dequantized float values. ``onnx-int8`` re-quantizes the fp32
ONNX graph with onnxruntime's quantization tools so it is smaller and faster in onnxruntime.

Why one module of this size: one writer per format plus the shared verification (run the
written file, compare outputs) and the all-formats-first check; each writer is short, the
shared parts would otherwise be imported back and forth.

Why one module of this size: every export format follows the same write-atomically / reload /
compare / time protocol; the per-format writers are short and share that protocol's helpers.
"""

from __future__ import annotations

import contextvars
import math
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.analysis.inventory import prunable_layers
from core.base.errors import ExportError, WorkbenchError
from core.base.outdir import atomic_write
from core.base.progress import CancelToken, ProgressFn, no_progress, scaled
from core.compress.engine import CompressionResult, LayerReport, measure_result, named_tensors
from core.evaluate import eval_mode, first_tensor, measure_latency
from core.io.hf import HFForward, write_hf_folder
from core.io.model_io import clone_model, copy_module, load_packed, resolve_base
from core.packed import _assign_state, read_packed, reapply_removal, restore_into, write_packed

EXPORT_FORMATS = (
    "packed", "onnx", "onnx-int8", "torchscript", "state_dict", "safetensors", "pt2", "hf",
)  # fmt: skip

#: File name written into the output directory per format.
FILE_NAMES = {
    "packed": "model.packed.safetensors",
    "onnx": "model.onnx",
    "onnx-int8": "model.int8.onnx",
    "torchscript": "model.torchscript.pt",
    "state_dict": "model.pt",
    "safetensors": "model.safetensors",
    "pt2": "model.pt2",
    # A folder: config.json + tokenizer files + compressed model.safetensors (core.io.hf).
    "hf": "hf_model",
}

#: Samples used to verify an export against the PyTorch model and to time it.
VERIFY_SAMPLES = 256
#: ONNX opset for the legacy (TorchScript-based) exporter.
ONNX_OPSET = 17


@dataclass(frozen=True)
class ExportRecord:
    """One written export.

    ``max_abs_diff``: largest absolute difference between the exported file's outputs and the
    compressed PyTorch model's on the verification data (None when the model cannot run).
    ``latency_ms``: median time of one forward pass on that batch (onnxruntime for ONNX files,
    PyTorch otherwise). ``extra``: format-specific numbers (packed: estimate and entropy bound).
    """

    format: str
    path: Path
    bytes_on_disk: int
    max_abs_diff: float | None
    latency_ms: float | None
    note: str = ""
    batch: int | None = None
    extra: dict[str, Any] | None = None
    #: The deployed check of the written file (`core.export.deploy.check_file`): accuracy or
    #: fidelity on the held-out data, latency ``{"median", "p10", "p90"}`` per batch size.
    deployed: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        if self.deployed is not None:
            d["accuracy"] = self.deployed.get("accuracy")
            d["deployed_mismatch"] = bool(self.deployed.get("deployed_mismatch"))
        return d


def file_name(fmt: str) -> str:
    """``model.<ext>`` for ``fmt``; `ExportError` for an unknown format."""
    try:
        return FILE_NAMES[fmt]
    except KeyError:
        raise ExportError(
            f"unknown export format {fmt!r}", hint=f"choose from {', '.join(EXPORT_FORMATS)}"
        ) from None


def parse_formats(text: str) -> list[str]:
    """``"packed,onnx"`` -> ``["packed", "onnx"]`` (validated, duplicates dropped, order kept)."""
    out: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        file_name(part)
        if part not in out:
            out.append(part)
    if not out:
        raise ExportError("no export format given", hint=f"choose from {', '.join(EXPORT_FORMATS)}")
    return out


# ---------------------------------------------------------------------------------------
# verification helpers
# ---------------------------------------------------------------------------------------
def _verify_input(result: Any, data: Any) -> torch.Tensor | None:
    """A batch to run the exports on: the data's first samples, else the example input.

    A ``.pt2`` program exported with a static batch size only accepts exactly that many
    samples (its guards raise otherwise), so the batch is cut, or padded by repeating its last
    sample, to that size.
    """
    x: torch.Tensor | None = None
    if data is not None:
        x = data if isinstance(data, torch.Tensor) else getattr(data, "x", None)
        if not (isinstance(x, torch.Tensor) and x.shape[0] > 0):
            x = None
    if x is None:
        x = next(
            (
                m.example_input
                for m in (result.compressed, result.original)
                if m.example_input is not None
            ),
            None,
        )
    if x is None:
        return None
    fixed = _fixed_batch(result)
    if fixed:
        x = x[:fixed]
        if x.shape[0] < fixed:
            x = torch.cat([x, x[-1:].expand(fixed - x.shape[0], *x.shape[1:])])
        return x
    return x[:VERIFY_SAMPLES]


def _fixed_batch(result: Any) -> int | None:
    """The only batch size the source program accepts (static-batch ``.pt2``), else None."""
    return result.compressed.metadata.get("fixed_batch") or result.original.metadata.get(
        "fixed_batch"
    )


def _batch_note(result: Any) -> str:
    fixed = _fixed_batch(result)
    return f"; batch size fixed at {fixed} like the source program" if fixed else ""


def _forward(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:

    with torch.no_grad(), eval_mode(module):
        return first_tensor(module(x)).detach()


def _max_abs_diff(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    # Tensors are widened by torch (numpy has no bfloat16); arrays (onnxruntime) by numpy.
    ta = (a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))).double()
    tb = (b if isinstance(b, torch.Tensor) else torch.as_tensor(np.asarray(b))).double()
    if ta.shape != tb.shape:
        raise ExportError(
            f"the exported model's output has shape {tuple(ta.shape)}, PyTorch's {tuple(tb.shape)}"
        )
    return float((ta - tb).abs().max()) if ta.numel() else 0.0


#: Whether the export being written measures latency (set per `export` call).
_MEASURE: contextvars.ContextVar[bool] = contextvars.ContextVar("measure_latency", default=True)


def _torch_latency(module: torch.nn.Module, x: torch.Tensor) -> float | None:

    if not _MEASURE.get():
        return None
    return measure_latency(module, x, warmup=2, repeats=10)


def ort_session(path: Path, threads: int | None = None):
    """An onnxruntime CPU session (``threads`` intra-op threads, default: onnxruntime's)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_latency(session, x: np.ndarray, *, warmup: int = 3, repeats: int = 15) -> float:
    """Median milliseconds of one ``session.run`` on ``x``."""
    name = session.get_inputs()[0].name
    for _ in range(warmup):
        session.run(None, {name: x})
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, {name: x})
        times.append((time.perf_counter() - t0) * 1000.0)
    return float(statistics.median(times))


def _require_runnable(result: Any, fmt: str) -> None:
    if not result.compressed.can_run:
        raise ExportError(
            f"{fmt} export needs a model with a forward pass; this is a weights-only checkpoint",
            path=result.original.source,
            hint="open the model with an architecture, or export state_dict/safetensors/packed",
        )


def _example(result: Any, x: torch.Tensor | None, fmt: str) -> torch.Tensor:
    _require_runnable(result, fmt)
    if x is None:
        raise ExportError(
            f"{fmt} export traces the model and needs an example input",
            path=result.original.source,
            hint="give sample data (--data FILE)",
        )
    return x


# ---------------------------------------------------------------------------------------
# one writer per format: each returns (max_abs_diff, latency_ms, note[, extra])
# ---------------------------------------------------------------------------------------
def _state(result: Any) -> dict[str, torch.Tensor]:
    """The compressed state with every tensor its own contiguous copy (no shared storage)."""
    return {
        k: v.detach().cpu().contiguous().clone()
        for k, v in result.compressed.module.state_dict().items()
        if isinstance(v, torch.Tensor)
    }


def _verify_state(result: Any, state: dict[str, torch.Tensor], x: torch.Tensor | None):
    """Load a dense state into a copy of the compressed model and compare outputs."""

    if x is None or not result.compressed.can_run:
        return None, None
    module = copy_module(result.compressed.module)
    _assign_state(module, state, Path(result.compressed.source))
    ref = _forward(result.compressed.module, x)
    return _max_abs_diff(_forward(module, x), ref), _torch_latency(module, x)


def _export_state_dict(result, path, x, force, cancel):
    state = _state(result)
    atomic_write(path, force=force, cancel=cancel, writer=lambda tmp: torch.save(state, tmp))
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    diff, lat = _verify_state(result, loaded, x)
    return (
        diff,
        lat,
        "dense state_dict (pruned zeros, dequantized values); torch.load(weights_only=True)",
    )


def _export_safetensors(result, path, x, force, cancel):
    from safetensors.torch import load_file, save_file

    state = _state(result)
    meta = {"format": "pt", "source": str(result.original.source)}
    atomic_write(
        path,
        force=force,
        cancel=cancel,
        writer=lambda tmp: save_file(state, str(tmp), metadata=meta),
    )
    diff, lat = _verify_state(result, load_file(str(path)), x)
    return diff, lat, "dense safetensors (pruned zeros, dequantized values)"


def _export_packed(result, path, x, force, cancel, entropy: bool = False, progress=no_progress):
    info = write_packed(
        result, path, force=force, entropy=entropy, progress=scaled(progress, 0, 0.8), cancel=cancel
    )
    diff = lat = None
    if x is not None and result.compressed.can_run:
        restored = load_packed(path, base=result.original)
        diff = _max_abs_diff(_forward(restored.module, x), _forward(result.compressed.module, x))
        lat = _torch_latency(restored.module, x)
    note, extra = packed_note(info)
    return diff, lat, note, extra


def packed_note(info: Any) -> tuple[str, dict[str, Any]]:
    """The export record's note and extra numbers for a written archive (`PackedInfo`)."""
    err = 100.0 * (info.bytes_on_disk - info.estimate_bytes) / max(info.estimate_bytes, 1)
    if info.entropy_coded:
        note = (
            f"codes entropy-coded with zstd; entropy bound {info.entropy_bound_bytes} B; "
            f"the uncoded archive would be {info.estimate_bytes} B (estimate)"
        )
    else:
        note = (
            f"estimate {info.estimate_bytes} B ({err:+.2f}%), entropy bound "
            f"{info.entropy_bound_bytes} B"
        )
    extra = {
        "estimate_bytes": info.estimate_bytes,
        "entropy_bound_bytes": info.entropy_bound_bytes,
        "header_bytes": info.header_bytes,
        "entropy_coded": info.entropy_coded,
    }
    return note, extra


def _scripted(result: Any, x: torch.Tensor | None) -> tuple[torch.jit.ScriptModule, str]:
    """A TorchScript module of the compressed model: itself, scripted, or traced."""
    module = result.compressed.module
    fmt = result.compressed.format
    if isinstance(module, torch.jit.ScriptModule):
        return module, "re-saved TorchScript"
    _require_runnable(result, "TorchScript")
    copy_ = copy_module(module).eval()
    if fmt != "pt2":
        try:
            return torch.jit.script(copy_), "scripted (torch.jit.script)"
        except Exception as exc:  # noqa: BLE001 - scripting fails on arbitrary Python in many ways
            script_error = f"{type(exc).__name__}"
    else:
        script_error = "a torch.export graph is not scriptable"
    if x is None:
        raise ExportError(
            f"the model cannot be scripted ({script_error}) and tracing needs an example input",
            hint="give sample data (--data FILE)",
        )
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(copy_, (x,), check_trace=False)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(
            f"the model can be neither scripted ({script_error}) nor traced "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
            hint="export onnx, state_dict or packed instead",
        ) from None
    return traced, f"traced (torch.jit.trace; scripting failed: {script_error})"


def _export_torchscript(result, path, x, force, cancel):
    scripted, how = _scripted(result, x)
    atomic_write(
        path, force=force, cancel=cancel, writer=lambda tmp: torch.jit.save(scripted, str(tmp))
    )
    diff = lat = None
    if x is not None:
        reloaded = torch.jit.load(str(path), map_location="cpu")
        diff = _max_abs_diff(_forward(reloaded, x), _forward(result.compressed.module, x))
        lat = _torch_latency(reloaded, x)
    return diff, lat, how + _batch_note(result)


def _export_pt2(result, path, x, force, cancel):
    module = result.compressed.module
    if isinstance(module, torch.jit.ScriptModule):
        raise ExportError(
            "a TorchScript model cannot be converted to a torch.export program",
            path=result.original.source,
            hint="export torchscript, onnx or packed instead",
        )
    x = _example(result, x, "pt2")
    # Keep the batch dimension dynamic, as users expect of a model file, unless the source
    # program itself only takes one batch size or the model specialises on it.
    attempts: list[Any] = [None] if _fixed_batch(result) else [({0: torch.export.Dim.AUTO},), None]
    ep = None
    for dynamic in attempts:
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ep = torch.export.export(copy_module(module).eval(), (x,), dynamic_shapes=dynamic)
            break
        except Exception as exc:  # noqa: BLE001 - export fails on arbitrary Python in many ways
            if dynamic is None:
                raise ExportError(
                    f"torch.export could not capture the model ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''})",
                    hint="export torchscript, onnx or packed instead",
                ) from None
    batch_dynamic = _accepts_batch(ep, int(x.shape[0]) + 1, x)
    atomic_write(
        path, force=force, cancel=cancel, writer=lambda tmp: torch.export.save(ep, str(tmp))
    )
    reloaded = torch.export.load(str(path)).module()
    diff = _max_abs_diff(_forward(reloaded, x), _forward(module, x))
    note = (
        "torch.export program (dynamic batch size)"
        if batch_dynamic
        else f"torch.export program (batch size fixed at {int(x.shape[0])})"
    )
    return diff, _torch_latency(reloaded, x), note


def _accepts_batch(ep: Any, n: int, x: torch.Tensor) -> bool:
    """Whether the exported program runs on a batch of ``n`` samples (not only ``len(x)``)."""
    probe = torch.cat([x, x[-1:].expand(n - x.shape[0], *x.shape[1:])])
    try:
        with torch.no_grad():
            ep.module()(probe)
    except Exception:  # noqa: BLE001 - a shape guard raises AssertionError/RuntimeError
        return False
    return True


def _onnx_fp32(result: Any, x: torch.Tensor, target: Path) -> None:
    """Write the fp32 ONNX graph of the compressed model to ``target`` (legacy exporter)."""
    module = result.compressed.module
    model = module if isinstance(module, torch.jit.ScriptModule) else copy_module(module).eval()
    if not isinstance(model, torch.jit.ScriptModule) and _narrow_floats(model):
        # fp32 as the description says: bfloat16 does not export (nor run in onnxruntime on
        # CPU) and float16 graphs run slowly there; the verification shows the difference.
        model = model.float()
    # Gradients stay enabled while tracing: under no_grad, nn.TransformerEncoderLayer takes
    # its fused fast path (aten::_transformer_encoder_layer_fwd), which ONNX cannot express.
    try:
        # TracerWarnings about Python control flow are the exporter's internal business;
        # the graph is checked against PyTorch in onnxruntime right after.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (x,),
                str(target),
                input_names=["input"],
                output_names=["output"],
                # A static-batch program bakes its batch size into reshapes: declaring the
                # axis dynamic would promise what the graph cannot do.
                dynamic_axes=None
                if _fixed_batch(result)
                else {"input": {0: "batch"}, "output": {0: "batch"}},
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
    except Exception as exc:  # noqa: BLE001 - the exporter fails on unsupported ops in many ways
        raise ExportError(
            f"ONNX export failed ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})",
            hint="export torchscript, state_dict or packed instead",
        ) from None


def _narrow_floats(module: torch.nn.Module) -> bool:
    """Whether ``module`` holds float16/bfloat16 parameters or buffers."""
    narrow = (torch.float16, torch.bfloat16)
    tensors = list(module.parameters()) + list(module.buffers())
    return any(t.dtype in narrow for t in tensors)


def _onnx_verify(path: Path, result: Any, x: torch.Tensor) -> tuple[float, float | None]:
    sess = ort_session(path)
    xn = x.detach().cpu().numpy()
    out = sess.run(None, {sess.get_inputs()[0].name: xn})[0]
    diff = _max_abs_diff(out, _forward(result.compressed.module, x))
    return diff, (ort_latency(sess, xn) if _MEASURE.get() else None)


def _export_onnx(result, path, x, force, cancel):
    x = _example(result, x, "onnx")
    atomic_write(path, force=force, cancel=cancel, writer=lambda tmp: _onnx_fp32(result, x, tmp))
    diff, lat = _onnx_verify(path, result, x)
    return diff, lat, f"fp32 ONNX opset {ONNX_OPSET}, checked in onnxruntime" + _batch_note(result)


class _Calibration:
    """onnxruntime `CalibrationDataReader` over a few batches of the verification data."""

    def __init__(self, name: str, x: np.ndarray, batch: int = 32):
        self._batches = iter([{name: x[i : i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self._batches, None)


def _has_conv(onnx_path: Path) -> bool:
    """True when the graph convolves (decided on the ONNX graph: works for every source format)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return any(node.op_type == "Conv" for node in graph.node)


def _quantize_onnx(src: Path, dst: Path, x: np.ndarray, static: bool) -> None:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = src.with_name(src.stem + ".pre.onnx")
    try:
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    except Exception:  # noqa: BLE001 - pre-processing is an optimisation; quantize the raw graph
        pre = src
    if static:
        quantize_static(
            str(pre),
            str(dst),
            _Calibration("input", x),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    else:
        quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8, per_channel=False)


INT8_MODES = ("auto", "static", "dynamic")


def _export_onnx_int8(result, path, x, force, cancel, int8_mode: str = "auto"):
    if int8_mode not in INT8_MODES:
        raise ExportError(
            f"unknown int8 mode {int8_mode!r}", hint=f"choose from {', '.join(INT8_MODES)}"
        )
    x = _example(result, x, "onnx-int8")
    xn = x.detach().cpu().numpy()
    floating = np.issubdtype(xn.dtype, np.floating)
    with tempfile.TemporaryDirectory(prefix="workbench-onnx-") as tmpdir:
        fp32 = Path(tmpdir) / "model.fp32.onnx"
        _onnx_fp32(result, x, fp32)
        # Static QDQ pays off where convolutions dominate (QLinearConv); dynamic quantization
        # suits MatMul/LSTM graphs and needs no calibration.
        static = int8_mode == "static" or (int8_mode == "auto" and floating and _has_conv(fp32))
        if cancel is not None:
            cancel.check()
        try:
            atomic_write(
                path,
                force=force,
                cancel=cancel,
                writer=lambda tmp: _quantize_onnx(fp32, tmp, xn, static),
            )
        except WorkbenchError:
            raise
        except Exception as exc:  # noqa: BLE001 - onnxruntime's quantizer raises many kinds
            raise ExportError(
                f"onnxruntime could not quantize the graph ({type(exc).__name__}: {exc})",
                path=path,
                hint="export fp32 onnx instead",
            ) from None
    diff, lat = _onnx_verify(path, result, x)
    how = (
        "static QDQ int8 (per-channel weights, activations calibrated on the data)"
        if static
        else "dynamic int8 (int8 weights, activations quantized at run time)"
    )
    return diff, lat, how + _batch_note(result)


def _export_hf(result, path, x, force, cancel):

    if result.removed_channels:
        raise ExportError(
            "removed channels change layer shapes, which the model's config.json cannot describe",
            path=result.original.source,
            hint="export packed/onnx instead, or compress without channel removal",
        )
    if cancel is not None:
        cancel.check()
    write_hf_folder(result.compressed, path, force=force)
    diff = lat = None
    if x is not None:
        # Reopened the way a user would: the class from_pretrained on the local folder.
        wrapper = result.compressed.module
        reloaded = type(wrapper.hf).from_pretrained(
            str(path), local_files_only=True, trust_remote_code=False
        )
        module = HFForward(reloaded.eval(), wrapper.kind, wrapper.pooling, wrapper.normalize)
        diff = _max_abs_diff(_forward(module, x), _forward(wrapper, x))
        lat = _torch_latency(module, x)
    return diff, lat, "Hugging Face folder (config, tokenizer, compressed model.safetensors)"


_WRITERS = {
    "packed": _export_packed,
    "onnx": _export_onnx,
    "onnx-int8": _export_onnx_int8,
    "torchscript": _export_torchscript,
    "state_dict": _export_state_dict,
    "safetensors": _export_safetensors,
    "pt2": _export_pt2,
    "hf": _export_hf,
}


def export(
    result: Any,
    fmt: str,
    path: str | Path,
    *,
    force: bool = False,
    data: Any = None,
    entropy: bool = False,
    int8_mode: str = "auto",
    latency: bool = True,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
) -> ExportRecord:
    """Write one export of ``result`` and verify it.

    Parameters
    ----------
    result
        A `core.compress.engine.CompressionResult` (or `result_from_packed`'s equivalent).
    fmt
        One of `EXPORT_FORMATS`.
    path
        Target file; its directory must exist.
    force
        Replace an existing file.
    data
        A `core.io.data.Dataset` or input tensor: the first samples verify the export, calibrate
        ``onnx-int8`` and time it. Default: the model's example input.
    entropy
        ``packed`` only: entropy-code the codes with zstd where smaller.
    int8_mode
        ``onnx-int8``: ``"dynamic"``, ``"static"`` (QDQ, calibrated on ``data``) or ``"auto"``
        (static for convolutional models with float inputs, else dynamic).
    latency
        Measure the latency of the written file (``latency_ms`` is None otherwise).

    Raises
    ------
    ExportError
        The format does not apply to this model, the file exists without ``force``, or writing
        failed. No partial file is left.
    Cancelled
        ``cancel`` fired; no partial file is left.
    """
    file_name(fmt)
    target = Path(path)
    if target.exists() and not force:
        raise ExportError("file already exists", path=target, hint="pass --force to overwrite it")
    if cancel is not None:
        cancel.check()
    progress(0.0, f"exporting {fmt}")
    x = _verify_input(result, data)
    writer = _WRITERS[fmt]
    kwargs: dict[str, Any] = {}
    if fmt == "packed":
        kwargs["entropy"] = entropy
        kwargs["progress"] = progress
    if fmt == "onnx-int8":
        kwargs["int8_mode"] = int8_mode
    token = _MEASURE.set(latency)
    try:
        out = writer(result, target, x, force, cancel, **kwargs)
    finally:
        _MEASURE.reset(token)
    diff, lat, note = out[:3]
    extra = out[3] if len(out) > 3 else None
    progress(1.0, f"exported {fmt}")
    return ExportRecord(
        format=fmt,
        path=target,
        bytes_on_disk=_disk_bytes(target),
        max_abs_diff=diff,
        latency_ms=lat,
        note=note,
        batch=None if (x is None or lat is None) else int(x.shape[0]),
        extra=extra,
    )


def _disk_bytes(target: Path) -> int:
    """Size of an export: the file, or every file in an exported folder."""
    if target.is_dir():
        return sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    return target.stat().st_size


#: Formats that run or trace the model, so they need a forward pass.
RUNNABLE_FORMATS = ("onnx", "onnx-int8", "torchscript", "pt2")


def check_formats(loaded: Any, formats: Sequence[str], *, has_input: bool = True) -> None:
    """Raise `ExportError` for the first format that cannot be written for ``loaded``.

    Cheap (nothing runs): callers check before spending minutes on compression, and
    `export_all` checks before writing anything, so an impossible format never leaves the
    output directory half-written.

    Parameters
    ----------
    loaded
        The model to export (a `LoadedModel`: the original or the compressed one).
    formats
        Export formats (validated names).
    has_input
        Whether sample inputs (data or the model's example input) are available: ONNX and
        ``.pt2`` exports trace the model on them.
    """
    for fmt in formats:
        file_name(fmt)
        if fmt in RUNNABLE_FORMATS and not loaded.can_run:
            raise ExportError(
                f"{fmt} export needs a model with a forward pass; this is a weights-only "
                "checkpoint",
                path=loaded.source,
                hint="export packed/state_dict/safetensors only, or compress the model's "
                "TorchScript or .pt2 file instead",
            )
        if fmt == "hf" and not isinstance(loaded.metadata.get("hf"), dict):
            raise ExportError(
                "the hf export needs a model opened from a Hugging Face folder",
                path=loaded.source,
                hint="open the model's folder (config.json + weights), or choose another format",
            )
        if fmt == "pt2" and isinstance(loaded.module, torch.jit.ScriptModule):
            raise ExportError(
                "a TorchScript model cannot be converted to a torch.export program",
                path=loaded.source,
                hint="export torchscript, onnx or packed instead",
            )
        # TorchScript is not listed: an eager model may script without any input, and the
        # writer says so clearly when it would have to trace instead.
        needs_input = fmt in ("onnx", "onnx-int8", "pt2")
        if needs_input and not has_input and loaded.example_input is None:
            raise ExportError(
                f"{fmt} export traces the model and needs an example input",
                path=loaded.source,
                hint="give sample data (--data FILE)",
            )


def export_all(
    result: Any,
    formats: Sequence[str],
    out_dir: str | Path,
    *,
    force: bool = False,
    data: Any = None,
    entropy: bool = False,
    latency: bool = True,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
) -> list[ExportRecord]:
    """Write ``model.<ext>`` for every format into ``out_dir`` (created if missing).

    All targets and formats are checked before anything is written, so an existing file
    (without ``force``) or a format the model cannot take fails the whole call up front. When
    an export fails or is cancelled later on, the files this call created are removed again:
    the directory holds either every requested export or none of the new ones.
    """
    out = Path(out_dir)
    fmts = list(dict.fromkeys(formats))
    targets = {fmt: out / file_name(fmt) for fmt in fmts}
    if not force:
        for target in targets.values():
            if target.exists():
                raise ExportError(
                    "file already exists", path=target, hint="pass --force to overwrite it"
                )
    check_formats(result.compressed, fmts, has_input=_verify_input(result, data) is not None)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    # Files this call brings into existence; the current one is listed before it is written,
    # because an interrupt can land after its rename, while it is being verified.
    created: list[Path] = []
    try:
        for i, fmt in enumerate(fmts):
            if cancel is not None:
                cancel.check()
            sub = scaled(progress, i / max(len(fmts), 1), (i + 1) / max(len(fmts), 1))
            if not targets[fmt].exists():
                created.append(targets[fmt])
            records.append(
                export(
                    result,
                    fmt,
                    targets[fmt],
                    force=force,
                    data=data,
                    entropy=entropy,
                    latency=latency,
                    progress=sub,
                    cancel=cancel,
                )
            )
    except BaseException:
        for path in created:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        raise
    return records


def result_from_packed(path: str | Path, base: Any = None, *, trust: bool = False) -> Any:
    """Rebuild a `core.compress.engine.CompressionResult` from a packed archive (for re-exporting).

    Parameters
    ----------
    path
        The ``model.packed.safetensors`` file.
    base
        The original model (path, demo name or `LoadedModel`); default: the source recorded in
        the archive. It becomes ``result.original``.
    trust
        Allow unpickling a pickled eager base.

    Returns
    -------
    CompressionResult
        ``compressed`` restored from the archive, codes and masks as stored, the plan from the
        stored recipe and per-layer reports measured again (thresholds are not stored: None).
    """

    archive = read_packed(path)
    original = resolve_base(archive, base, trust)
    compressed = restore_into(archive, clone_model(original))
    aligned: dict[str, torch.Tensor] = {}
    if archive.removed_channels:
        ref = clone_model(original)
        reapply_removal(ref, archive)
        before = named_tensors(original.module)
        aligned = {
            n: t.detach().clone()
            for n, t in named_tensors(ref.module).items()
            if tuple(t.shape) != tuple(before[n].shape)
        }
    plan = archive.plan
    current = named_tensors(compressed.module)
    layers = []
    for info in prunable_layers(original):
        if info.tensor is None or info.tensor not in current:
            continue
        cfg = plan.config_for(info.name)
        pruned = not cfg.skip and cfg.prune.active
        numel = math.prod(info.shape)
        layers.append(
            LayerReport(
                name=info.name,
                tensor=info.tensor,
                type=info.type,
                shape=tuple(current[info.tensor].shape),
                numel=numel,
                nnz=0,
                sparsity=0.0,
                method=cfg.prune.method if pruned else "none",
                threshold=None,
                bits=None,
                symmetric=False,
                per_channel=False,
                sqnr_db=math.inf,
                dense_bytes=4 * numel,
                packed_bytes=0,
                original_numel=numel,
                skipped=cfg.skip,
            )
        )
    result = CompressionResult(
        original=original,
        compressed=compressed,
        plan=plan,
        masks=dict(archive.masks),
        quantized=dict(archive.quantized),
        layers=tuple(layers),
        removed_channels=archive.removed_channels,
        aligned_original=aligned,
    )
    return measure_result(result)


__all__ = [
    "EXPORT_FORMATS",
    "FILE_NAMES",
    "ExportRecord",
    "check_formats",
    "export",
    "export_all",
    "file_name",
    "load_packed",
    "parse_formats",
    "result_from_packed",
]
