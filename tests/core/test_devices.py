"""Device catalogue parsing, peak activations, fits / does not fit, cost arithmetic."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from core.base.errors import WorkbenchError
from core.export.deploy import cost_block, cost_per_million
from core.export.devices import (
    DEFAULT_DEVICES,
    DeviceProfileError,
    device_block,
    fits_line,
    get_device,
    load_devices,
    parse_devices,
    parse_size,
    peak_activation_bytes,
)
from tests.core._fixtures import eager, make_result


def _catalogue(**overrides) -> dict:
    dev = {
        "name": "tiny",
        "memory": "4 KiB",
        "storage": 10_000,
        "formats": ["onnx", "packed"],
        "dtypes": ["fp32"],
        "relative_compute": 0.5,
    }
    dev.update(overrides)
    return {"format": "workbench.devices", "version": 1, "devices": [dev]}


def test_shipped_catalogue_parses():
    devices = load_devices()
    assert {"rpi4", "jetson-nano", "phone", "mcu", "x86-server"} <= set(devices)
    mcu = devices["mcu"]
    assert mcu.memory == 256 * 1024 and mcu.weight_memory == 1024 * 1024
    assert all(d.relative_compute > 0 for d in devices.values())


@pytest.mark.parametrize(
    ("text", "expected"),
    [("256 KiB", 262144), ("1 MiB", 1 << 20), ("1.5 GB", 1_500_000_000), ("12", 12), (7, 7)],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ({"memory": "lots"}, "memory"),
        ({"memory": -3}, "memory"),
        ({"storage": "3 furlongs"}, "storage"),
        ({"formats": ["tflite"]}, "formats"),
        ({"formats": []}, "formats"),
        ({"dtypes": ["int3"]}, "dtypes"),
        ({"relative_compute": 0}, "relative_compute"),
        ({"relative_compute": True}, "relative_compute"),
        ({"name": "bad name!"}, "name"),
        ({"ram": "1 GiB"}, "unknown field 'ram'"),
    ],
)
def test_parse_errors_name_the_field(override, fragment):
    with pytest.raises(DeviceProfileError) as exc:
        parse_devices(_catalogue(**override), "cat.json")
    assert fragment in str(exc.value) and "cat.json" in str(exc.value)
    assert isinstance(exc.value, WorkbenchError)


def test_catalogue_level_errors(tmp_path):
    bad = tmp_path / "d.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(DeviceProfileError, match="invalid JSON at line 1"):
        load_devices(bad)
    with pytest.raises(DeviceProfileError, match="not a device catalogue"):
        parse_devices({"devices": []})
    cat = _catalogue()
    cat["devices"].append(dict(cat["devices"][0]))
    with pytest.raises(DeviceProfileError, match="listed twice"):
        parse_devices(cat)
    missing = _catalogue()
    del missing["devices"][0]["storage"]
    with pytest.raises(DeviceProfileError, match="missing field 'storage'"):
        parse_devices(missing)
    with pytest.raises(DeviceProfileError, match="choose from"):
        get_device("toaster")
    assert DEFAULT_DEVICES.is_file()


def test_peak_activation_is_largest_layer_in_plus_out():
    model = nn.Sequential(nn.Linear(8, 100), nn.ReLU(), nn.Linear(100, 3))
    x = torch.randn(1, 8)
    # ReLU: 100 in + 100 out floats is the largest pair.
    assert peak_activation_bytes(model, x) == 4 * 200
    assert peak_activation_bytes(model, torch.randn(5, 8)) == 5 * 4 * 200


@dataclass(frozen=True)
class _Rec:
    format: str
    bytes_on_disk: int
    deployed: dict | None = None


def _result(width: int):
    model = nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, 4))
    return make_result(eager(model, torch.randn(2, 16)), sparsity=0.5, bits=8)


@pytest.mark.parametrize(("width", "fits"), [(8, True), (400, False)])
def test_fits_and_does_not_fit(width, fits):
    profile = parse_devices(_catalogue())["tiny"]  # 4 KiB of memory
    result = _result(width)
    weights = 4 * sum(p.numel() for p in result.compressed.module.parameters())
    rec = _Rec("onnx", weights + 500)
    block = device_block(profile, result, [rec], torch.randn(3, 16))
    act = 4 * max(16 + width, 2 * width)  # first Linear vs ReLU, one sample
    assert block["peak_activation_bytes"] == act
    cand = block["candidates"][0]
    assert cand["memory_needed_bytes"] == weights + 500 + act
    assert block["fits"] is fits and (cand["reasons"] == []) is fits
    line = fits_line(block)
    assert ("does not fit" in line) is (not fits) and "tiny" in line


def test_unsupported_format_and_separate_weight_memory():
    profile = parse_devices(_catalogue(weight_memory="1 MiB", formats=["onnx-int8"],
                                       dtypes=["int8"]))["tiny"]  # fmt: skip
    result = _result(400)
    recs = [_Rec("onnx", 100), _Rec("onnx-int8", 9000)]
    block = device_block(profile, result, recs, torch.randn(1, 16))
    onnx_, int8 = block["candidates"]
    assert not onnx_["fits"] and "format onnx not supported" in onnx_["reasons"]
    # weights go to the 1 MiB store; activations (3200 B) fit the 4 KiB memory
    assert int8["fits"] and block["best"] == "onnx-int8"
    assert int8["memory_needed_bytes"] == 4 * 2 * 400
    small = parse_devices(_catalogue(weight_memory=8000, formats=["onnx-int8"],
                                     dtypes=["int8"]))["tiny"]  # fmt: skip
    block = device_block(small, result, recs[1:], torch.randn(1, 16))
    assert not block["fits"] and "weight memory" in block["candidates"][0]["reasons"][0]


def test_cost_arithmetic():
    # 10 ms per batch of 50 -> 5000/s; $3.60/h = $0.001/s -> $0.2 per million
    assert math.isclose(cost_per_million(10.0, 50, 3.6), 0.2)
    assert math.isclose(cost_per_million(10.0, 50, 3.6, concurrency=4), 0.05)
    assert cost_per_million(10.0, 50, 0.0) == 0.0
    with pytest.raises(ValueError):
        cost_per_million(0.0, 1, 1.0)
    evals = {
        "before": {"latency_ms_per_batch": 20.0, "latency_batch": 100},
        "after": {"latency_ms_per_batch": 10.0, "latency_batch": 100},
    }
    recs = [
        _Rec("onnx", 1, {"latency_ms": {"batch_1": {"median": 1.0}, "batch_64": {"median": 4.0}}}),
        _Rec(
            "packed", 1, {"latency_ms": {"batch_1": {"median": 1.0}, "batch_64": {"median": 8.0}}}
        ),
        _Rec("state_dict", 1),
    ]
    block = cost_block(7.2, evals, recs)
    assert math.isclose(block["before"]["usd_per_million"], 7.2 / 3600 / 5000 * 1e6)
    assert block["after"]["measured"] == "deployed onnx file"
    assert math.isclose(block["after"]["usd_per_million"], 7.2 / 3600 / 16000 * 1e6)
    assert math.isclose(block["saving_factor"], 16000 / 5000)
    assert set(block["per_export"]) == {"onnx", "packed"}
    assert json.dumps(block)
    # no deployed files: the simulated compressed model is "after"
    assert cost_block(7.2, evals, [])["after"]["measured"].startswith("compressed")
