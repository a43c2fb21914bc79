"""Packed archive header, format version 2: the deflated recipe, reading version 1 files, and
the limits on inflating the recipe (hostile headers become one-line errors)."""

from __future__ import annotations

import base64
import json
import zlib
from pathlib import Path

import pytest
import torch

from core.base import limits
from core.base.errors import ModelLoadError
from core.packed import build_header, read_packed, write_packed
from core.packed.bytemodel import (
    FORMAT_VERSION,
    RECIPE_DICTIONARY,
    compact_recipe,
    pack_recipe,
)
from core.recipe.plan import (
    CompressionPlan,
    LayerConfig,
    PruneConfig,
    QuantConfig,
    RecoveryConfig,
    simple_plan,
)
from tests.core._fixtures import eager, make_result
from tests.models import make


def _planned_like() -> CompressionPlan:
    """A recipe of the shape the planner writes: per-layer overrides and recovery settings."""
    q = QuantConfig(bits=4, per_channel=True, bias_bits=8)
    default = LayerConfig(prune=PruneConfig("magnitude", sparsity=0.99), quant=q)
    layers = (
        ("conv1", LayerConfig(quant=QuantConfig(bits=6, per_channel=True, bias_bits=8))),
        ("conv2", LayerConfig(prune=PruneConfig("magnitude", sparsity=0.85), quant=q)),
        ("head", LayerConfig(prune=PruneConfig("magnitude", sparsity=0.685), quant=q)),
    )
    rec = RecoveryConfig(epochs=20, lr=0.002, distill=True, alpha=0.7, prune_steps=11)
    return CompressionPlan(default=default, overrides=layers, recovery=rec)


def _escaped_len(text: str) -> int:
    """Bytes ``text`` takes as a JSON string value (quotes escaped), without the quotes."""
    return len(json.dumps(text, ensure_ascii=False)) - 2


def _written(tmp_path: Path, plan: CompressionPlan | None = None) -> Path:
    model, x = make("lstm")
    result = make_result(eager(model, x, "lstm"), plan=plan)
    path = tmp_path / "model.packed.safetensors"
    write_packed(result, path)
    return path


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _rewrite(path: Path, dst: Path, **meta: str) -> Path:
    """A copy of the archive at ``path`` with some metadata values replaced."""
    header, blob = _header(path)
    md = {**header["__metadata__"], **meta}
    dst.write_bytes(build_header(md, len(blob)) + blob)
    return dst


@pytest.mark.parametrize(
    "plan",
    [
        CompressionPlan(),
        simple_plan(0.93, 5, symmetric=False, per_channel=False),
        _planned_like(),
        _planned_like().with_layer("blocks.0.attn.qkv", LayerConfig(skip=True)),
    ],
)
def test_packed_recipe_round_trips_and_is_smaller_than_the_escaped_json(plan):
    text = compact_recipe(plan)
    packed = pack_recipe(text)
    assert _escaped_len(packed) == len(packed)  # nothing to escape in the base85 alphabet
    assert len(packed) < _escaped_len(text)
    back = limits.inflate_text(
        packed, what="r", path=None, max_bytes=limits.MAX_RECIPE_BYTES, zdict=RECIPE_DICTIONARY
    )
    assert back == text and CompressionPlan.from_json(back) == plan


def test_planned_recipe_costs_a_fifth_of_its_json():
    text = compact_recipe(_planned_like())
    assert 5 * len(pack_recipe(text)) <= _escaped_len(text)


def test_written_archive_is_version_2_and_reads_back_its_recipe(tmp_path):
    plan = _planned_like()
    path = _written(tmp_path, plan)
    header, _ = _header(path)
    assert header["__metadata__"]["version"] == FORMAT_VERSION == "2"
    assert header["__metadata__"]["recipe"] == pack_recipe(compact_recipe(plan))
    archive = read_packed(path)
    assert archive.metadata["recipe"] == compact_recipe(plan)
    assert archive.plan == plan


def test_version_1_archives_are_still_read(tmp_path):
    plan = _planned_like()
    path = _written(tmp_path, plan)
    v1 = _rewrite(path, tmp_path / "v1.packed.safetensors", version="1",
                  recipe=compact_recipe(plan))  # fmt: skip
    old, new = read_packed(v1), read_packed(path)
    assert old.plan == new.plan == plan
    assert old.tensors.keys() == new.tensors.keys()
    assert all(torch.equal(old.tensors[k], new.tensors[k]) for k in new.tensors)


def _deflated(data: bytes, zdict: bytes = RECIPE_DICTIONARY) -> bytes:
    z = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zdict=zdict)
    return z.compress(data) + z.flush()


def _b85(data: bytes) -> str:
    return base64.b85encode(data).decode("ascii")


@pytest.mark.parametrize(
    ("recipe", "match"),
    [
        ("[[[[not base85", "recipe is corrupt"),
        (_b85(_deflated(b'{"version":1}')[:-3]), "recipe is corrupt"),
        (_b85(_deflated(b'{"version":1}') + b"tail"), "recipe is corrupt"),
        (_b85(_deflated(b"\xff\xfe{}")), "recipe is corrupt"),
        # refers back past the start of the preset dictionary
        (_b85(_deflated(b"z" * 9 + b"{}", zdict=b"z" * 9 + bytes(9000))), "recipe is corrupt"),
        (_b85(_deflated(b" " * 5000)), "inflates to more than"),
        ("0" * 10_000, "longer than"),
    ],
)
def test_hostile_packed_recipes_are_refused(tmp_path, monkeypatch, recipe, match):
    monkeypatch.setattr(limits, "MAX_RECIPE_BYTES", 4096)
    monkeypatch.setattr("core.packed.reader.MAX_RECIPE_BYTES", 4096)
    path = _written(tmp_path)
    bad = _rewrite(path, tmp_path / "bad.packed.safetensors", recipe=recipe)
    with pytest.raises(ModelLoadError, match=match) as err:
        read_packed(bad)
    assert "\n" not in str(err.value)


def test_deflate_bomb_stops_at_the_cap():
    bomb = _b85(_deflated(b"x" * (64 << 20)))  # ~64 MiB of output behind ~85 KB of text
    assert len(bomb) < 200_000
    with pytest.raises(ModelLoadError, match="inflates to more than 1.0 MB"):
        limits.inflate_text(bomb, what="the recipe", path=None, max_bytes=1 << 20)


def test_unknown_versions_are_refused(tmp_path):
    path = _written(tmp_path)
    bad = _rewrite(path, tmp_path / "v3.packed.safetensors", version="3")
    with pytest.raises(ModelLoadError, match="version '3' is not supported"):
        read_packed(bad)
