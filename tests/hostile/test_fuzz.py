"""Fuzzed recipes and data files through the in-process loaders.

A recipe either loads or raises `RecipeError`; a data file either loads or raises `DataError`.
Any other exception (RecursionError, ValueError, TypeError, MemoryError...) is a bug: the
CLI would print a traceback and the GUI would crash.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from core.base.errors import DataError, RecipeError
from core.io.data import load_data
from core.recipe.plan import CompressionPlan, simple_plan

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
    # No shrinking: a failure reports its first example at once, keeping re-runs bounded.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.sampled_from([0, 1, -1, 2, 16, 17, 2**31, 2**63, -(2**63), 10**300])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["none", "magnitude", "nm", "global", "layer", "sparsity", "threshold"])
)
json_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),  # fmt: skip
    max_leaves=20,
)


def _load_recipe_text(text: str) -> None:
    try:
        CompressionPlan.from_json(text, path="fuzz.json")
    except RecipeError:
        pass


def _leaves(obj: Any, path: tuple = ()) -> list[tuple]:
    if isinstance(obj, dict):
        out = [path] if path else []
        for k, v in obj.items():
            out += _leaves(v, (*path, k))
        return out
    return [path]


def _set(obj: Any, path: tuple, value: Any) -> None:
    for k in path[:-1]:
        obj = obj.get(k) if isinstance(obj, dict) else None
    if isinstance(obj, dict):  # an earlier mutation may have replaced the parent
        obj[path[-1]] = value


def _bases() -> list[dict[str, Any]]:
    plans = [
        CompressionPlan(),
        simple_plan(0.5, 4, "magnitude"),
        simple_plan(0.0, 8, "none"),
        simple_plan(0.5, None, "nm"),
    ]
    out = [p.to_dict() for p in plans]
    with_layer = simple_plan(0.3, 6, "magnitude").to_dict()
    with_layer["layers"] = {"fc1": json.loads(json.dumps(with_layer["default"]))}
    out.append(with_layer)
    return out


@FUZZ
@given(json_values)
def test_random_json_is_a_recipe_or_a_recipe_error(value: Any) -> None:
    _load_recipe_text(json.dumps(value))


@FUZZ
@given(st.data())
def test_valid_ish_recipes_with_random_fields(data: st.DataObject) -> None:
    recipe = json.loads(json.dumps(data.draw(st.sampled_from(_bases()))))
    paths = _leaves(recipe)
    for _ in range(data.draw(st.integers(1, 4))):
        path = data.draw(st.sampled_from(paths))
        _set(recipe, path, data.draw(json_values))
    if data.draw(st.booleans()):
        recipe[data.draw(st.text(max_size=6))] = data.draw(json_values)
    _load_recipe_text(json.dumps(recipe))


@FUZZ
@given(st.text(max_size=200))
def test_random_text_is_a_recipe_or_a_recipe_error(text: str) -> None:
    _load_recipe_text(text)


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000 + "]" * 100_000,
        '{"default": ' * 50_000 + "{}" + "}" * 50_000,
        '{"version": ' + "9" * 5000 + "}",
        '{"default": {"prune": {"sparsity": ' + "1" * 5000 + "}}}",
        '{"default": {"prune": {"sparsity": 1e999}}}',
        '{"default": {"quant": {"bits": 1e400}}}',
        '{"default": {"prune": {"n": 2, "m": 340282366920938463463374607431768211456}}}',
        '{"layers": {"\\u0000\\n": {}}}',
        '{"version": 1, "version": "x"}',
        "\ufeff{}",
        '"' + "\\ud800" * 10 + '"',
    ],
    ids=["deep-list", "deep-object", "huge-version", "huge-sparsity", "inf-literal",
         "inf-bits", "huge-m", "nul-layer-name", "duplicate-key", "bom", "lone-surrogates"],
)  # fmt: skip
def test_crafted_recipe_text(text: str) -> None:
    _load_recipe_text(text)


def test_recipe_file_that_is_not_utf8_or_a_directory(tmp_path: Path) -> None:
    bad = tmp_path / "r.json"
    bad.write_bytes(b"\xff\xfe{\x00}\x00")
    for path in (bad, tmp_path):
        with pytest.raises(RecipeError):
            CompressionPlan.load(path)


def test_big_recipe_file_is_refused_quickly(tmp_path: Path) -> None:
    """A ~70 MB recipe (a valid shape: many layer overrides) is refused before parsing."""
    path = tmp_path / "big.json"
    layer = json.dumps(simple_plan(0.5, 4, "magnitude").to_dict()["default"])
    with path.open("w") as fh:
        fh.write('{"version": 1, "layers": {')
        n = 70_000_000 // (len(layer) + 16)
        fh.write(",".join(f'"layer{i}": {layer}' for i in range(n)))
        fh.write("}}")
    assert path.stat().st_size > 60_000_000
    start = time.monotonic()
    with pytest.raises(RecipeError):
        CompressionPlan.load(path)
    assert time.monotonic() - start < 3.0, "a 70 MB recipe should be refused by its size"


# --------------------------------------------------------------------------- data files

_NP_DTYPES = [
    "bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
    "float16", "float32", "float64", "complex64", "complex128", "datetime64[s]",
    "timedelta64[ms]", "U3", "S2", "V4", [("a", "<f4"), ("b", "<i2")],
]  # fmt: skip
_shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4)


@st.composite
def _arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(_NP_DTYPES)))
    shape = tuple(draw(_shapes))
    n = int(np.prod(shape)) if shape else 1
    raw = draw(st.binary(min_size=n * dtype.itemsize, max_size=n * dtype.itemsize))
    arr = np.frombuffer(raw, dtype=dtype, count=n).reshape(shape) if n else np.zeros(shape, dtype)
    return arr.copy()


def _load_data_file(path: Path) -> None:
    try:
        ds = load_data(path)
    except DataError:
        return
    assert ds.x.shape[0] >= 1 and (ds.y is None or ds.y.shape[0] == ds.x.shape[0])


@FUZZ
@given(st.dictionaries(st.sampled_from(["x", "y", "X", "labels", "x.npy"]), _arrays(),
                       max_size=3))  # fmt: skip
def test_fuzzed_npz_is_data_or_a_data_error(arrays: dict[str, np.ndarray]) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "data.npz"
        np.savez(path, **{k.replace(".npy", ""): v for k, v in arrays.items()})
        _load_data_file(path)


_torch_values = st.recursive(
    _arrays().map(lambda a: torch.from_numpy(a) if a.dtype.kind in "biufc" else a.tolist())
    | _scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),  # fmt: skip
    max_leaves=6,
)


@FUZZ
@given(st.dictionaries(st.sampled_from(["x", "y", "z"]), _torch_values, max_size=3) | _torch_values)
def test_fuzzed_pt_is_data_or_a_data_error(obj: Any) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "data.pt"
        try:
            torch.save(obj, path)
        except Exception:  # noqa: BLE001 - objects torch cannot save are not inputs here
            return
        _load_data_file(path)


@FUZZ
@given(st.binary(max_size=300), st.sampled_from([b"", b"PK\x03\x04", b"\x80\x02", b"\x93NUMPY"]))
def test_random_bytes_are_a_data_error(raw: bytes, magic: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "data.pt"
        path.write_bytes(magic + raw)
        _load_data_file(path)


def test_npz_with_lying_header_is_a_data_error(tmp_path: Path) -> None:
    """An .npy member whose header promises more data than it holds."""
    import zipfile

    head = b"{'descr': '<f4', 'fortran_order': False, 'shape': (1000000, 64), }"
    head += b" " * (-(len(head) + 11) % 64) + b"\n"
    npy = b"\x93NUMPY\x01\x00" + len(head).to_bytes(2, "little") + head + bytes(64)
    path = tmp_path / "lying.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", npy)
    with pytest.raises(DataError):
        load_data(path)
