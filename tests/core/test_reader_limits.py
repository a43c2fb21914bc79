"""Resource limits of every reader: bombs, hostile headers and odd values become one-line errors.

Each case builds its own hostile file. Caps are lowered with ``monkeypatch`` so the files stay a
few MB; one real bomb (about 1 GiB declared behind a ~1 MB file) runs the CLI in a subprocess
under an address-space limit and a timeout.
"""

from __future__ import annotations

import hashlib
import io
import json
import resource
import struct
import subprocess
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from core.base import limits
from core.base.errors import DataError, ModelLoadError, RecipeError
from core.cli.main import main as cli_main
from core.io.data import load_data
from core.io.model_io import load_model
from core.packed import (
    CHECKSUM_HEX,
    _zstd_codes,
    build_header,
    finalize_metadata,
    pack_bits,
    read_packed,
)
from core.recipe.plan import CompressionPlan, simple_plan

REPO = Path(__file__).resolve().parents[2]


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and "Traceback" not in text, text
    return text


# ---------------------------------------------------------------------------------------
# the shared policy
# ---------------------------------------------------------------------------------------
def test_available_memory_is_read_from_the_system():
    mem = limits.available_memory()
    assert mem is not None and mem > 0
    assert limits.max_decoded_bytes(10, limits.ZIP_RATIO) <= int(mem * limits.MEMORY_FRACTION)


def test_decoded_cap_is_ratio_plus_floor_and_never_above_memory(monkeypatch):
    monkeypatch.setattr(limits, "available_memory", lambda: 1 << 40)
    assert limits.max_decoded_bytes(1000, 50.0) == 50_000 + limits.FLOOR_BYTES
    monkeypatch.setenv(limits.EXPANSION_ENV, "2")
    assert limits.max_decoded_bytes(1000, 50.0) == 2_000 + limits.FLOOR_BYTES
    monkeypatch.delenv(limits.EXPANSION_ENV)
    monkeypatch.setattr(limits, "available_memory", lambda: 10 * limits.MiB)
    assert limits.max_decoded_bytes(1000, 50.0) == int(10 * limits.MiB * limits.MEMORY_FRACTION)
    with pytest.raises(ModelLoadError, match="more than the memory available"):
        limits.check_decoded(9 * limits.MiB, 1000, ratio=50.0, what="x", path="f")


def test_address_space_limit_lowers_the_available_memory():
    code = (
        "import resource; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30));"
        "from core.base.limits import available_memory; print(available_memory())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert 0 < int(out.stdout) < 3 << 30


def test_check_alloc_compares_declared_elements_with_bytes_present():
    assert limits.check_alloc(10, 4, 40, "t", "f") == 40
    with pytest.raises(ModelLoadError, match="declares 11 elements"):
        limits.check_alloc(11, 4, 40, "t", "f")
    with pytest.raises(ModelLoadError, match="negative"):
        limits.check_alloc(-1, 4, 40, "t", "f")


@pytest.mark.parametrize("shape", [[-1, 3], [2.5], ["3"], [True], "12", [2**63], [2**40, 2**40]])
def test_bad_shapes_are_refused(shape):
    with pytest.raises(ModelLoadError, match="shape|dimension"):
        limits.check_shape(shape, "t", "f")


def test_json_limits_depth_size_ints_and_duplicates():
    deep = "[" * 65 + "]" * 65
    with pytest.raises(ModelLoadError, match="nested more than 64"):
        limits.load_json(deep, what="doc", path="f", max_bytes=1000)
    assert limits.load_json("[" * 64 + "]" * 64, what="doc", path="f", max_bytes=1000)
    very_deep = "[" * 200_000 + "]" * 200_000  # beyond Python's own recursion limit
    with pytest.raises(ModelLoadError, match="nested more than"):
        limits.load_json(very_deep, what="doc", path="f", max_bytes=1 << 20)
    with pytest.raises(ModelLoadError, match="more than the"):
        limits.load_json("[1]" + " " * 100, what="doc", path="f", max_bytes=50)
    with pytest.raises(ModelLoadError, match="out of range"):
        limits.load_json(f"[{2**63}]", what="doc", path="f", max_bytes=1000)
    with pytest.raises(ModelLoadError, match="out of range"):
        limits.load_json("[" + "9" * 5000 + "]", what="doc", path="f", max_bytes=10_000)
    assert limits.load_json(f"[{2**63 - 1}, -5]", what="d", path="f", max_bytes=99) == [
        2**63 - 1,
        -5,
    ]
    with pytest.raises(ModelLoadError, match="appears twice"):
        limits.load_json('{"a": 1, "a": 2}', what="d", path="f", max_bytes=99, unique_keys=True)
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        limits.load_json("{", what="d", path="f", max_bytes=99)


def test_escape_name_shows_control_characters():
    assert limits.escape_name("fc1.weight") == "fc1.weight"
    assert limits.escape_name("a\nb\x1b[2J") == "a\\nb\\x1b[2J"


# ---------------------------------------------------------------------------------------
# torch zip files (models and data)
# ---------------------------------------------------------------------------------------
def _rezip(
    src: bytes,
    dest: Path,
    *,
    pad_pickle: int = 0,
    pad_storage: int = 0,
    deflate: bool = True,
) -> None:
    """Copy a torch.save zip, deflating members; optionally pad data.pkl (pickle ignores bytes
    after STOP) or the first storage (torch refuses a size mismatch, after inflating it)."""
    with zipfile.ZipFile(io.BytesIO(src)) as zin, zipfile.ZipFile(dest, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("data.pkl"):
                data += b"\0" * pad_pickle
            if info.filename.endswith("data/0"):
                data += b"\0" * pad_storage
            kind = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
            zout.writestr(info.filename, data, compress_type=kind)


def _torch_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_deflated_torch_zip_within_limits_still_opens(tmp_path):
    state = {"fc.weight": torch.randn(8, 4), "fc.bias": torch.zeros(8)}
    path = tmp_path / "deflated.pt"
    _rezip(_torch_bytes(state), path)
    loaded = load_model(path)
    assert torch.equal(dict(loaded.module.named_parameters())["fc.weight"], state["fc.weight"])


def test_pickle_bomb_in_torch_zip_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "MAX_PICKLE_BYTES", 1 * limits.MiB)
    path = tmp_path / "pkl_bomb.pt"
    _rezip(_torch_bytes({"w": torch.zeros(4)}), path, pad_pickle=4 * limits.MiB)
    assert path.stat().st_size < 100_000
    with pytest.raises(ModelLoadError, match=r"data\.pkl.*a pickle.*inflate") as err:
        load_model(path)
    _one_line(err.value)


def test_pickle_bomb_in_torchscript_archive_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "MAX_PICKLE_BYTES", 1 * limits.MiB)
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), buf)
    path = tmp_path / "ts_bomb.pt"
    _rezip(buf.getvalue(), path, pad_pickle=4 * limits.MiB)
    with pytest.raises(ModelLoadError, match="TorchScript archive.*a pickle"):
        load_model(path)


def test_storage_bomb_in_torch_zip_is_refused_for_models_and_data(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "FLOOR_BYTES", 1 * limits.MiB)
    path = tmp_path / "storage_bomb.pt"
    _rezip(_torch_bytes({"x": torch.zeros(4)}), path, pad_storage=8 * limits.MiB)
    with pytest.raises(ModelLoadError, match="decompression bomb") as err:
        load_model(path)
    _one_line(err.value)
    with pytest.raises(DataError, match="decompression bomb"):
        load_data(path)


def test_member_claiming_more_than_the_file_is_refused(tmp_path):
    path = tmp_path / "liar.pt"
    _rezip(_torch_bytes({"w": torch.zeros(4)}), path, deflate=False)
    raw = bytearray(path.read_bytes())
    # The first central-directory record: compressed/uncompressed sizes at offsets 20 and 24.
    first = raw.find(b"PK\x01\x02")
    raw[first + 20 : first + 28] = struct.pack("<II", 1 << 30, 1 << 30)
    path.write_bytes(bytes(raw))
    with pytest.raises(ModelLoadError, match="claims 1.0 GB") as err:
        load_model(path)
    _one_line(err.value)


# ---------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------
def _safetensors(path: Path, header: dict, data: bytes = b"", *, raw_header: bytes | None = None):
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def _entry(dtype: str, shape: list, start: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


@pytest.mark.parametrize(
    ("header", "data", "match"),
    [
        ({"w": _entry("F32", [-1, 4], 0, 16)}, bytes(16), "invalid dimension -1"),
        ({"w": _entry("F32", ["2"], 0, 8)}, bytes(8), "invalid dimension"),
        ({"w": _entry("F32", [2**62, 4], 0, 8)}, bytes(8), "impossibly large"),
        ({"w": _entry("F32", [2], 0, 80)}, bytes(8), "outside"),
        ({"w": _entry("F32", [3], 0, 8)}, bytes(8), "needs 12 bytes"),
        ({"w": _entry("F8_XYZ", [2], 0, 2)}, bytes(2), "F8_XYZ.*supported: .*F32"),
        ({"w": _entry("C64", [1], 0, 8)}, bytes(8), "'C64'.*not support"),
        ({"w": _entry("F4", [2], 0, 1)}, bytes(1), "'F4'.*not support"),
        (
            {"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 4, 12)},
            bytes(12),
            "overlap",
        ),
        ({"w": _entry("F32", [2], 0, 8), "__metadata__": {"k": 1}}, bytes(8), "map of strings"),
    ],
)
def test_hostile_safetensors_headers_are_refused(tmp_path, header, data, match):
    path = _safetensors(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(ModelLoadError, match=match) as err:
        load_model(path)
    _one_line(err.value)


def test_safetensors_header_structure_attacks(tmp_path):
    ok = _entry("F32", [2], 0, 8)
    deep = b'{"w":' + json.dumps(ok).encode()[:-1] + b',"x":' + b"[" * 100 + b"]" * 100 + b"}}"
    dup = b'{"w":' + json.dumps(ok).encode() + b',"w":' + json.dumps(ok).encode() + b"}"
    cases = {
        "nested more than": deep,
        "appears twice": dup,
        "not valid JSON": b"{" + b" " * 7,
    }
    for match, raw in cases.items():
        path = _safetensors(tmp_path / "h.safetensors", {}, bytes(8), raw_header=raw)
        with pytest.raises(ModelLoadError, match=match):
            load_model(path)
    liar = tmp_path / "liar.safetensors"
    liar.write_bytes(struct.pack("<Q", 1 << 40) + b'{"w": 1}')
    with pytest.raises(ModelLoadError, match="header claims"):
        load_model(liar)


def test_header_size_cap(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "MAX_HEADER_BYTES", 64)
    meta = {"__metadata__": {"note": "x" * 100}, "w": _entry("F32", [2], 0, 8)}
    path = _safetensors(tmp_path / "big.safetensors", meta, bytes(8))
    with pytest.raises(ModelLoadError, match="more than the 64 bytes allowed"):
        load_model(path)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_weights_open_as_float32_with_a_note(tmp_path, dtype):
    from safetensors.torch import save_file

    w = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.25, -3.0]]).to(dtype)
    path = tmp_path / "f8.safetensors"
    save_file({"fc.weight": w, "fc.bias": torch.zeros(2)}, str(path))
    loaded = load_model(path)
    got = dict(loaded.module.named_parameters())["fc.weight"]
    assert got.dtype == torch.float32
    assert torch.equal(got, w.to(torch.float32))
    expected = "F8_E4M3" if dtype == torch.float8_e4m3fn else "F8_E5M2"
    assert loaded.metadata["float8_converted"] == {"fc.weight": expected}
    assert any("float8" in n and "float32" in n for n in loaded.metadata["notes"])


# ---------------------------------------------------------------------------------------
# packed archives
# ---------------------------------------------------------------------------------------
def _archive(path: Path, layout: object, blob: bytes, **meta: str) -> Path:
    """A packed archive with a hand-made layout (checksum valid, so only the layout is bad)."""
    checksum = hashlib.sha256(blob).hexdigest()[:CHECKSUM_HEX]
    full = finalize_metadata({"source": "", **meta}, [], checksum)
    full["layout"] = layout if isinstance(layout, str) else json.dumps(layout)
    path.write_bytes(build_header(full, len(blob)) + blob)
    return path


def _codes_entry(shape: list, codes: np.ndarray, bits: int, zstd: bytes | None = None):
    """(entry, blob) of a dense per-tensor symmetric coded float32 tensor."""
    payload = zstd if zstd is not None else pack_bits(codes, bits)
    entry = ["w", shape, bits, 1, 0] + ([len(payload)] if zstd is not None else [])
    return entry, payload + struct.pack("<f", 0.5)


def test_hand_made_archives_decode(tmp_path):
    w = np.arange(6, dtype="<f4")
    arc = read_packed(_archive(tmp_path / "raw.packed.safetensors", [["w", [2, 3]]], w.tobytes()))
    assert torch.equal(arc.tensors["w"], torch.from_numpy(w).reshape(2, 3))
    codes = np.array([8, 9, 10, 7, 6, 8], dtype=np.int64)
    for z in (None, _zstd_codes(codes, 4)):
        entry, blob = _codes_entry([2, 3], codes, 4, z)
        arc = read_packed(_archive(tmp_path / "c.packed.safetensors", [entry], blob))
        assert arc.tensors["w"].flatten().tolist() == [0.0, 0.5, 1.0, -0.5, -1.0, 0.0]


@pytest.mark.parametrize(
    ("layout", "blob", "match"),
    [
        ([["w", [-2, 3]]], bytes(24), "invalid dimension -2"),
        ([["w", [2.0, 3]]], bytes(24), "invalid dimension 2.0"),
        ([["w", [2**70]]], bytes(4), "out of range"),
        ([["w", [3]], ["w", [3]]], bytes(24), "appears twice"),
        ([["w", [3], "C64"]], bytes(24), "unknown dtype"),
        ([["w", [3], 17, 1, 0]], bytes(16), "bits must be an integer in 2..16"),
        ([["w", [3], 4, 1 << 40, 0]], bytes(16), "flags"),
        ([["w", [3], 4, 1, 7]], bytes(16), "unknown pattern code '7'"),
        ([["w", [3], 4, 1, [40, 2]]], bytes(16), "index bits"),
        ([["w", [], 4, 1, 2]], bytes(16), "row mask needs"),
        ([["w", [3], 0, 0, 0, 5]], bytes(17), "only codes can be entropy coded"),
        ([["w", [1000]]], bytes(40), "needs at least 4,000 bytes"),
        ({"w": [3]}, bytes(12), "not a list"),
        ("[" * 100 + "]" * 100, b"", "nested more than"),
    ],
)
def test_hostile_packed_layouts_are_refused(tmp_path, layout, blob, match):
    path = _archive(tmp_path / "bad.packed.safetensors", layout, blob)
    with pytest.raises(ModelLoadError, match=match) as err:
        read_packed(path)
    _one_line(err.value)
    with pytest.raises(ModelLoadError):
        load_model(path)


def test_row_mask_bomb_is_refused_before_allocating(tmp_path):
    # 2**20 rows of 2**12 columns, every row pruned: 128 KB of pattern would decode to 4 GB of
    # weights plus a 4 GB mask.
    rows = 1 << 20
    layout = [["w", [rows, 1 << 12], 0, 0, 2]]
    path = _archive(tmp_path / "rows.packed.safetensors", layout, bytes(rows // 8))
    with pytest.raises(ModelLoadError, match="decompression bomb") as err:
        read_packed(path)
    _one_line(err.value)


def test_zstd_bombs_are_refused(tmp_path):
    import zstandard

    codes = np.full(6, 8, dtype=np.int64)
    # A frame declaring 64 MiB for six codes.
    declared = zstandard.ZstdCompressor(level=3).compress(bytes(64 * limits.MiB))
    entry, blob = _codes_entry([2, 3], codes, 4, declared)
    path = _archive(tmp_path / "z1.packed.safetensors", [entry], blob)
    with pytest.raises(ModelLoadError, match="declare 67108864 bytes, 6 expected"):
        read_packed(path)
    # The same without a declared size: streamed, and cut one byte past the expected end.
    cctx = zstandard.ZstdCompressor(level=3, write_content_size=False)
    stream = io.BytesIO()
    with cctx.stream_writer(stream, closefd=False) as writer:
        writer.write(bytes(64 * limits.MiB))
    entry, blob = _codes_entry([2, 3], codes, 4, stream.getvalue())
    path = _archive(tmp_path / "z2.packed.safetensors", [entry], blob)
    with pytest.raises(ModelLoadError, match="wrong length"):
        read_packed(path)
    # Garbage instead of a frame.
    entry, blob = _codes_entry([2, 3], codes, 4, b"not zstd at all")
    path = _archive(tmp_path / "z3.packed.safetensors", [entry], blob)
    with pytest.raises(ModelLoadError, match="corrupt"):
        read_packed(path)


def test_short_bitmask_is_not_padded_with_zeros(tmp_path):
    # Bitmask of 3x8 needs 3 bytes; the codes that follow would otherwise be read as mask bits.
    layout = [["w", [3, 8], 0, 0, 1]]
    path = _archive(tmp_path / "short.packed.safetensors", layout, bytes(2))
    with pytest.raises(ModelLoadError):
        read_packed(path)


@pytest.mark.parametrize(
    ("removed", "match"),
    [
        ("[1, 2]", "not a map"),
        ('{"fc": [1, "a"]}', "other than channel indices"),
        ('{"fc": [1, -1]}', "other than channel indices"),
        ('{"fc": 3}', "not a list"),
        ('{"fc": [1, 1]}', "twice"),
        ('{"fc": [' + "[" * 80 + "]" * 80 + "]}", "nested more than"),
    ],
)
def test_bad_removed_channels_are_refused(tmp_path, removed, match):
    w = np.zeros(4, dtype="<f4").tobytes()
    path = _archive(tmp_path / "rc.packed.safetensors", [["w", [4]]], w, removed_channels=removed)
    with pytest.raises(ModelLoadError, match=match) as err:
        read_packed(path)
    _one_line(err.value)


# ---------------------------------------------------------------------------------------
# recipes
# ---------------------------------------------------------------------------------------
def test_recipe_limits(tmp_path, monkeypatch):
    good = tmp_path / "recipe.json"
    simple_plan(0.5, 8).save(good)
    assert CompressionPlan.load(good) == simple_plan(0.5, 8)
    monkeypatch.setattr("core.recipe.plan.MAX_RECIPE_BYTES", good.stat().st_size - 1)
    with pytest.raises(RecipeError, match="a recipe is at most") as err:
        CompressionPlan.load(good)
    _one_line(err.value)
    monkeypatch.undo()
    deep = tmp_path / "deep.json"
    deep.write_text('{"layers": ' + "[" * 5000 + "]" * 5000 + "}")
    with pytest.raises(RecipeError, match="nested more than 64"):
        CompressionPlan.load(deep)
    big_int = tmp_path / "int.json"
    big_int.write_text('{"version": ' + "9" * 100 + "}")
    with pytest.raises(RecipeError, match="out of range"):
        CompressionPlan.load(big_int)


def test_large_recipe_at_the_cap_parses_quickly(tmp_path):
    import time

    # Overrides for many layers up to the size cap: must parse in seconds, not minutes.
    plan = simple_plan(0.5, 8)
    cfg = replace(plan.default, prune=replace(plan.default.prune, scope="layer"))
    layer = json.dumps(plan.with_layer("l", cfg).to_dict()["layers"]["l"])
    n = limits.MAX_RECIPE_BYTES // (len(layer) + 16)
    text = '{"version": 1, "layers": {' + ",".join(f'"l{i}": {layer}' for i in range(n)) + "}}"
    path = tmp_path / "big.json"
    path.write_text(text)
    assert path.stat().st_size <= limits.MAX_RECIPE_BYTES
    start = time.perf_counter()
    loaded = CompressionPlan.load(path)
    assert len(loaded.overrides) == n
    assert time.perf_counter() - start < 20


# ---------------------------------------------------------------------------------------
# data files
# ---------------------------------------------------------------------------------------
def test_npz_bomb_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "FLOOR_BYTES", 1 * limits.MiB)
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, x=np.zeros((1024, 2048), np.float32))  # 8 MiB -> ~8 KB
    with pytest.raises(DataError, match="decompression bomb") as err:
        load_data(path)
    _one_line(err.value)


def test_npy_header_declaring_more_than_present_is_refused(tmp_path):
    from numpy.lib import format as npformat

    buf = io.BytesIO()
    npformat.write_array_header_1_0(
        buf, {"descr": "<f4", "fortran_order": False, "shape": (1 << 28, 64)}
    )
    buf.write(bytes(64))
    path = tmp_path / "liar.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x.npy", buf.getvalue())
    with pytest.raises(DataError, match="declares 17,179,869,184 elements") as err:
        load_data(path)
    _one_line(err.value)
    neg = io.BytesIO()
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (-5, 2), }"
    neg.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", 118) + header.ljust(117).encode() + b"\n")
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x.npy", neg.getvalue())
    with pytest.raises(DataError) as err:
        load_data(path)
    _one_line(err.value)


def test_regular_data_files_still_load(tmp_path):
    x = np.random.default_rng(0).random((20, 4)).astype(np.float32)
    np.savez_compressed(tmp_path / "d.npz", x=x, y=np.arange(20) % 3)
    assert torch.equal(load_data(tmp_path / "d.npz").x, torch.from_numpy(x))
    torch.save({"x": torch.from_numpy(x)}, tmp_path / "d.pt")
    assert torch.equal(load_data(tmp_path / "d.pt").x, torch.from_numpy(x))


# ---------------------------------------------------------------------------------------
# non-finite weights and hostile names in the CLI output
# ---------------------------------------------------------------------------------------
def test_nonfinite_weights_are_reported(tmp_path, capsys):
    w = torch.randn(4, 6)
    w[0, :3] = float("nan")
    w[1, 0] = float("inf")
    path = tmp_path / "nan.pt"
    torch.save({"fc.weight": w, "fc.bias": torch.zeros(4), "ok.weight": torch.ones(2, 2)}, path)
    loaded = load_model(path)
    assert loaded.metadata["nonfinite"] == {"fc.weight": 4}
    assert len(loaded.metadata["notes"]) == 1
    assert cli_main(["inspect", str(path)]) == 0
    captured = capsys.readouterr()
    warnings = [ln for ln in captured.err.splitlines() if "warning" in ln]
    assert warnings == [
        "workbench inspect: warning: fc.weight has 4 NaN/Inf weights; compression treats them "
        "as 0 (pruned or quantized to zero), which counts towards the layer's sparsity"
    ]
    assert cli_main(["inspect", str(path), "--json"]) == 0
    desc = json.loads(capsys.readouterr().out)
    assert desc["notes"] == loaded.metadata["notes"]


def test_control_characters_in_names_cannot_forge_table_rows(tmp_path, capsys):
    path = tmp_path / "names.pt"
    evil = "evil\nfake   Linear  9x9"
    torch.save({f"{evil}.weight": torch.ones(3, 2), "real.weight": torch.ones(2, 2)}, path)
    assert cli_main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "evil\\nfake" in out
    assert not any(line.startswith("fake") for line in out.splitlines())


# ---------------------------------------------------------------------------------------
# a real bomb, end to end, under an address-space limit
# ---------------------------------------------------------------------------------------
def _limit_memory() -> None:
    cap = int(1.5 * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def test_real_gigabyte_bomb_fails_cleanly_in_the_cli(tmp_path):
    declared = 1 << 30
    path = tmp_path / "bomb.pt"
    src = _torch_bytes({"w": torch.zeros(4)})
    with (
        zipfile.ZipFile(io.BytesIO(src)) as zin,
        zipfile.ZipFile(path, "w") as zout,
    ):
        for info in zin.infolist():
            if info.filename.endswith("data/0"):
                # Stream 1 GiB of zeros through deflate (~1 MB on disk), never held in memory.
                member = zipfile.ZipInfo(info.filename)
                member.compress_type = zipfile.ZIP_DEFLATED
                with zout.open(member, "w", force_zip64=True) as fh:
                    chunk = bytes(16 << 20)
                    for _ in range(declared // len(chunk)):
                        fh.write(chunk)
                continue
            zout.writestr(info.filename, zin.read(info), compress_type=zipfile.ZIP_DEFLATED)
    size = path.stat().st_size
    out = subprocess.run(
        [sys.executable, "-m", "core.cli.main", "inspect", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=_limit_memory,
    )
    path.unlink()  # pytest keeps recent temp dirs; do not leave a bomb lying around
    assert size < 4 << 20
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr[-2000:]
    assert lines[0].startswith("workbench inspect: error: ")
    assert "decompression bomb" in lines[0] and "1.0 GB" in lines[0]
