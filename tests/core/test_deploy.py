"""Deployed check: the exported files themselves on held-out data, latency statistics."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from core.analysis.stats import analyze
from core.compress.engine import compress
from core.export.deploy import check_file, latency_stats
from core.export.outputs import write_outputs
from core.io.data import digits_split
from core.io.model_io import load_model
from core.recipe.plan import simple_plan


@pytest.fixture(scope="module")
def mlp_result():
    model = load_model("demo:mlp")
    _, test = digits_split()
    plan = simple_plan(0.5, 8)
    return compress(model, plan, analyze(model)), test


def test_latency_stats_are_ordered_and_positive():
    stats = latency_stats(lambda: sum(range(2000)), warmup=1, repeats=15)
    assert set(stats) >= {"median", "p10", "p90"}
    assert 0 < stats["p10"] <= stats["median"] <= stats["p90"]
    with pytest.raises(ValueError):
        latency_stats(lambda: None, repeats=0)


def test_report_records_deployed_accuracy_and_latency(tmp_path, mlp_result):
    result, test = mlp_result
    formats = ["packed", "onnx", "onnx-int8", "torchscript", "pt2"]
    write_outputs(result, formats, tmp_path / "out", data=test)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    entries = {e["format"]: e for e in report["exports"]}
    assert set(entries) == set(formats)
    for fmt, entry in entries.items():
        dep = entry["deployed"]
        assert dep["samples"] == len(test)
        assert entry["accuracy"] == dep["accuracy"] and 0.5 < dep["accuracy"] <= 1.0
        assert set(dep["latency_ms"]) == {"batch_1", f"batch_{min(64, len(test))}"}
        for stats in dep["latency_ms"].values():
            assert 0 < stats["p10"] <= stats["median"] <= stats["p90"]
        if fmt != "onnx-int8":
            # Same weights, same arithmetic up to float rounding: same predictions.
            assert dep["max_abs_diff"] < 1e-3
            assert not entry["deployed_mismatch"]
    assert isinstance(report["warnings"], list)


def _break_onnx(path, factor: float = 10.0) -> None:
    """Multiply the largest weight initializer by ``factor`` (a wrong scale)."""
    model = onnx.load(str(path))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    arr = numpy_helper.to_array(init).copy() * factor
    init.CopyFrom(numpy_helper.from_array(arr.astype(arr.dtype), init.name))
    onnx.save(model, str(path))


@pytest.mark.parametrize(
    ("factor", "by_accuracy"),
    [(10.0, False), (-10.0, True)],
    ids=["scale-x10-caught-by-fidelity", "sign-flip-caught-by-accuracy"],
)
def test_broken_onnx_is_caught(tmp_path, mlp_result, factor, by_accuracy):
    result, test = mlp_result
    write_outputs(result, ["onnx"], tmp_path / "out", data=test, deployed=False)
    path = tmp_path / "out" / "model.onnx"
    good = check_file("onnx", path, result, test, latency=False)
    assert not good["deployed_mismatch"] and good["warning"] is None
    assert good["rel_l2"] < 1e-5
    _break_onnx(path, factor=factor)
    bad = check_file("onnx", path, result, test, latency=False)
    assert bad["deployed_mismatch"] and "model.onnx" in bad["warning"]
    assert bad["rel_l2"] > 1.0
    assert (bad["accuracy"] < bad["simulated_accuracy"] - 0.01) == by_accuracy
    assert ("simulated" in bad["warning"]) == by_accuracy
    assert bad["latency_ms"] == {}
