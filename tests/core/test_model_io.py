"""Opening and saving every model format: round-trips, refusals, damaged files."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from core.base.errors import Cancelled, ExportError, ModelLoadError, UntrustedPickleError
from core.base.model import forward
from core.base.progress import CancelToken
from core.io.data import digits_split
from core.io.model_io import (
    WeightsOnlyModule,
    _safe_sym_expr,
    clone_model,
    get_tensor,
    load_model,
    save_model,
    set_tensor,
)
from core.io.zoo import demo_info
from tests.models import make

MODELS = ("resnet", "transformer", "lstm")
FORMATS = ("torchscript", "pt2", "state_dict", "safetensors", "pickle")
SIDE_EFFECT_NAME = "PWNED"


def _write(name: str, fmt: str, model: torch.nn.Module, x: torch.Tensor, folder: Path) -> Path:
    if fmt == "torchscript":
        path = folder / f"{name}.ts.pt"
        torch.jit.save(torch.jit.script(model), str(path))
    elif fmt == "pt2":
        path = folder / f"{name}.pt2"
        torch.export.save(torch.export.export(model, (x,)), str(path))
    elif fmt == "state_dict":
        path = folder / f"{name}.pth"
        torch.save(model.state_dict(), path)
    elif fmt == "safetensors":
        path = folder / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:
        path = folder / f"{name}.module.pt"
        torch.save(model, path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[tuple[str, str], tuple[Path, torch.nn.Module, torch.Tensor]]:
    folder = tmp_path_factory.mktemp("models")
    out = {}
    for name in MODELS:
        model, x = make(name)
        for fmt in FORMATS:
            out[(name, fmt)] = (_write(name, fmt, model, x, folder), model, x)
    return out


def _assert_same_params(module: torch.nn.Module, reference: dict[str, torch.Tensor]) -> None:
    got = dict(module.named_parameters())
    assert set(got) == set(reference)
    for k, v in reference.items():
        assert torch.equal(got[k].detach(), v.detach()), k


def _float_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_round_trips_with_identical_parameters(files, tmp_path, name, fmt):
    path, model, x = files[(name, fmt)]
    loaded = load_model(path, trust=(fmt == "pickle"))
    expected_format = {"pickle": "eager"}.get(fmt, fmt)
    assert loaded.format == expected_format
    assert loaded.weights_only == (fmt in ("state_dict", "safetensors"))
    reference = _float_state(model) if loaded.weights_only else dict(model.named_parameters())
    _assert_same_params(loaded.module, reference)
    if loaded.can_run:
        with torch.no_grad():
            assert torch.allclose(loaded.module(x), model(x), atol=1e-5)
    else:
        with pytest.raises(ModelLoadError, match="no forward pass"):
            loaded.module(x)

    out = tmp_path / (path.name if fmt != "pickle" else f"{name}.pt")
    save_model(loaded, out)
    again = load_model(out)
    if again.weights_only:
        _assert_same_params(again.module, _float_state(loaded.module))
    else:
        _assert_same_params(again.module, dict(loaded.module.named_parameters()))
    if fmt in ("torchscript", "pt2"):
        assert again.format == fmt
        with torch.no_grad():
            assert torch.allclose(again.module(x), model(x), atol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == [out.name], "temp files left behind"


def test_pt2_keeps_program_and_example_input(files):
    path, model, x = files[("resnet", "pt2")]
    loaded = load_model(path)
    assert isinstance(loaded.metadata["exported_program"], torch.export.ExportedProgram)
    assert torch.equal(loaded.example_input, x)


def test_pt2_example_input_from_placeholders_when_none_saved(tmp_path):
    model, x = make("lstm")
    ep = torch.export.export(model, (x,))
    path = tmp_path / "noex.pt2"
    torch.export.save(ep, str(path))
    with zipfile.ZipFile(path) as zin:
        members = {n: zin.read(n) for n in zin.namelist()}
    sample = next(n for n in members if "sample_inputs" in n)
    members[sample] = b""  # no example inputs: the shape must come from the input placeholder
    stripped = tmp_path / "stripped.pt2"
    with zipfile.ZipFile(stripped, "w") as zout:
        for n, data in members.items():
            zout.writestr(n, data)
    loaded = load_model(stripped)
    assert loaded.example_input is not None
    assert loaded.example_input.shape == x.shape and loaded.example_input.dtype == x.dtype
    with torch.no_grad():
        assert loaded.module(loaded.example_input).shape == (x.shape[0], 10)


class _Evil:
    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def _evil_files(folder: Path) -> dict[str, Path]:
    target = folder / SIDE_EFFECT_NAME
    evil = _Evil(target)
    paths = {
        "plain_pickle": folder / "evil.pkl",
        "legacy_torch": folder / "evil_legacy.pt",
        "zip_container": folder / "evil_zip.pt",
        "zip_container_bin": folder / "evil.bin",
    }
    with paths["plain_pickle"].open("wb") as fh:
        pickle.dump(evil, fh)
    torch.save(evil, paths["legacy_torch"], _use_new_zipfile_serialization=False)
    torch.save({"w": torch.ones(3), "payload": evil}, paths["zip_container"])
    torch.save({"state_dict": {"w": torch.ones(3)}, "x": evil}, paths["zip_container_bin"])
    return paths


@pytest.mark.parametrize(
    "kind", ["plain_pickle", "legacy_torch", "zip_container", "zip_container_bin"]
)
def test_malicious_pickle_is_refused_without_running(tmp_path, kind):
    path = _evil_files(tmp_path)[kind]
    with pytest.raises(UntrustedPickleError) as info:
        load_model(path)
    msg = str(info.value)
    assert str(path) in msg and "--trust" in msg and "system" in msg
    assert not (tmp_path / SIDE_EFFECT_NAME).exists()


def test_malicious_member_inside_pt2_is_refused_without_running(tmp_path):
    model, x = make("encoder")
    good = tmp_path / "good.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(good))
    buf = io.BytesIO()
    torch.save(_Evil(tmp_path / SIDE_EFFECT_NAME), buf)
    bad = tmp_path / "bad.pt2"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bad, "w") as zout:
        for n in zin.namelist():
            zout.writestr(n, buf.getvalue() if "sample_inputs" in n else zin.read(n))
    with pytest.raises(UntrustedPickleError, match="example inputs"):
        load_model(bad)
    assert not (tmp_path / SIDE_EFFECT_NAME).exists()
    assert load_model(good).format == "pt2"


@pytest.mark.parametrize(
    "expr, ok",
    [
        ("s0", True),
        ("2*s0 + 1", True),
        ("Max(s0, 2)", True),
        ("FloorDiv(s1, 4) - 1", True),
        ("__import__('os').system('x')", False),
        ("eval('1')", False),
        ("s0.__class__", False),
        ("open", False),
    ],
)
def test_pt2_symbolic_expressions_must_be_plain_arithmetic(expr, ok):
    assert _safe_sym_expr(expr) is ok


def test_pickled_module_needs_trust(files):
    path, model, x = files[("resnet", "pickle")]
    with pytest.raises(UntrustedPickleError, match="ResNetBN"):
        load_model(path)
    loaded = load_model(path, trust=True)
    assert loaded.format == "eager" and isinstance(loaded.module, type(model))


def _damaged(tmp_path: Path, files) -> dict[str, Path]:
    sd_path = files[("resnet", "state_dict")][0]
    st_path = files[("resnet", "safetensors")][0]
    model, _ = make("encoder")
    legacy = tmp_path / "legacy.pt"
    torch.save(model.state_dict(), legacy, _use_new_zipfile_serialization=False)
    out = {
        "empty": tmp_path / "empty.pt",
        "zip_truncated": tmp_path / "zip_truncated.pt",
        "legacy_truncated": tmp_path / "legacy_truncated.pt",
        "safetensors_truncated": tmp_path / "trunc.safetensors",
        "random": tmp_path / "random.pt",
        "random_pickle_magic": tmp_path / "random2.pt",
        "text": tmp_path / "notes.pt",
        "plain_zip": tmp_path / "other.zip",
    }
    out["empty"].write_bytes(b"")
    data = sd_path.read_bytes()
    out["zip_truncated"].write_bytes(data[: len(data) // 2])
    data = legacy.read_bytes()
    out["legacy_truncated"].write_bytes(data[: len(data) // 2])
    data = st_path.read_bytes()
    out["safetensors_truncated"].write_bytes(data[: len(data) - 100])
    g = torch.Generator().manual_seed(1)
    out["random"].write_bytes(bytes(torch.randint(0, 256, (4096,), generator=g).tolist()))
    out["random_pickle_magic"].write_bytes(
        b"\x80\x02" + bytes(torch.randint(0, 256, (4096,), generator=g).tolist())
    )
    out["text"].write_text("this is not a model\n")
    with zipfile.ZipFile(out["plain_zip"], "w") as zf:
        zf.writestr("readme.txt", "hello")
    return out


@pytest.mark.parametrize(
    "kind, words",
    [
        ("empty", "empty"),
        ("zip_truncated", "truncated"),
        ("legacy_truncated", "truncated"),
        ("safetensors_truncated", "safetensors"),
        ("random", "not a recognised"),
        ("random_pickle_magic", "cannot be read"),
        ("text", "not a recognised"),
        ("plain_zip", "zip archive"),
    ],
)
def test_damaged_files_give_a_clear_load_error(tmp_path, files, kind, words):
    path = _damaged(tmp_path, files)[kind]
    with pytest.raises(ModelLoadError) as info:
        load_model(path)
    assert not isinstance(info.value, UntrustedPickleError)
    msg = str(info.value)
    assert msg.startswith(str(path)) and words in msg
    assert info.value.hint, "every load error says what to do"
    assert "\n" not in msg


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model(tmp_path / "nope.pt")
    with pytest.raises(ModelLoadError, match="directory"):
        load_model(tmp_path)
    with pytest.raises(ModelLoadError, match="unknown demo"):
        load_model("demo:nope")


def test_format_comes_from_content_not_extension(tmp_path, files):
    st = files[("lstm", "safetensors")][0]
    as_pt = tmp_path / "weights.pt"
    as_pt.write_bytes(st.read_bytes())
    loaded = load_model(as_pt)
    assert loaded.format == "safetensors" and loaded.metadata["extension_mismatch"]

    ts = files[("lstm", "torchscript")][0]
    as_bin = tmp_path / "model.bin"
    as_bin.write_bytes(ts.read_bytes())
    loaded = load_model(as_bin)
    assert loaded.format == "torchscript" and loaded.metadata["extension_mismatch"]

    sd = files[("lstm", "state_dict")][0]
    as_st = tmp_path / "model.safetensors"
    as_st.write_bytes(sd.read_bytes())
    assert load_model(as_st).format == "state_dict"

    pt2 = files[("lstm", "pt2")][0]
    as_zip = tmp_path / "program.zip"
    as_zip.write_bytes(pt2.read_bytes())
    assert load_model(as_zip).format == "pt2"


@pytest.mark.parametrize("wrap", ["state_dict", "model", "model_state_dict"])
def test_nested_checkpoints_and_wrapper_prefixes(tmp_path, wrap):
    model, _ = make("encoder")
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    path = tmp_path / "ckpt.pt"
    torch.save({wrap: sd, "epoch": 3, "optimizer": {"lr": 0.1}}, path)
    loaded = load_model(path)
    assert loaded.metadata["stripped_prefix"] == "module."
    assert "epoch" in loaded.metadata["checkpoint_keys"]
    _assert_same_params(loaded.module, dict(model.named_parameters()))


def test_weights_only_module_mirrors_checkpoint():
    state = {
        "a.weight": torch.randn(3, 2),
        "a.b.weight": torch.randn(4),
        "bn.num_batches_tracked": torch.tensor(7),
        "table": torch.arange(5),
        "half.weight": torch.randn(2, 2).half(),
    }
    module = WeightsOnlyModule(state, source="ckpt.pt")
    assert sorted(n for n, _ in module.named_parameters()) == [
        "a.b.weight",
        "a.weight",
        "half.weight",
    ]
    assert sorted(n for n, _ in module.named_buffers()) == ["bn.num_batches_tracked", "table"]
    assert get_tensor(module, "half.weight").dtype == torch.float16  # shadows nn.Module.half
    assert set(module.state_dict()) == set(state)
    with pytest.raises(ModelLoadError, match="ckpt.pt.*no forward pass"):
        module(torch.zeros(1))
    with pytest.raises(ModelLoadError, match="both a tensor and a module path"):
        WeightsOnlyModule({"a": torch.ones(1), "a.b": torch.ones(1)})


def test_demo_loads_and_reaches_recorded_accuracy():
    for name, kind in (("mlp", "flat"), ("cnn", "image")):
        loaded = load_model(f"demo:{name}")
        assert loaded.format == "demo" and loaded.task == "classification"
        assert loaded.num_classes == 10 and loaded.metadata["input_kind"] == kind
        _, test = digits_split(kind)
        with torch.no_grad():
            acc = float((loaded.module(test.x).argmax(1) == test.y).float().mean())
        recorded = demo_info(name)["test_accuracy"]
        assert acc == pytest.approx(recorded, abs=1e-6)
        assert acc >= 0.97
        assert loaded.example_input.shape[1:] == test.x.shape[1:]


def test_state_dict_with_demo_architecture(tmp_path):
    demo = load_model("demo:mlp")
    path = tmp_path / "mlp_weights.safetensors"
    save_model(demo, path)
    weights_only = load_model(path)
    assert weights_only.weights_only
    runnable = load_model(path, architecture="demo:mlp")
    assert runnable.can_run and runnable.metadata["architecture"] == "demo:mlp"
    with torch.no_grad():
        assert torch.equal(runnable.module(demo.example_input), demo.module(demo.example_input))
    with pytest.raises(ModelLoadError, match="does not fit architecture demo:cnn.*missing"):
        load_model(path, architecture="demo:cnn")


def test_clone_is_independent_for_every_format(files):
    for fmt, trust in (
        ("torchscript", False),
        ("pt2", False),
        ("safetensors", False),
        ("pickle", True),
    ):
        path, _, _ = files[("resnet", fmt)]
        loaded = load_model(path, trust=trust)
        before = get_tensor(loaded.module, "fc.weight").clone()
        copy = clone_model(loaded)
        assert copy.format == loaded.format
        set_tensor(copy.module, "fc.weight", torch.zeros_like(before))
        assert torch.equal(get_tensor(loaded.module, "fc.weight"), before), fmt
        assert float(get_tensor(copy.module, "fc.weight").abs().sum()) == 0.0


def test_set_tensor_can_change_shape_and_get_tensor_reports_unknown_names():
    model, _ = make("encoder")
    set_tensor(model, "net.2.weight", torch.ones(8, 128))
    assert isinstance(model.net[2].weight, torch.nn.Parameter)
    assert model.net[2].weight.shape == (8, 128)
    with pytest.raises(KeyError, match="nope.weight"):
        get_tensor(model, "nope.weight")


def test_nonfinite_weights_load_and_round_trip(tmp_path):
    model, _ = make("encoder")
    with torch.no_grad():
        model.net[0].weight[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    path = tmp_path / "nan.safetensors"
    save_file(dict(model.state_dict()), str(path))
    loaded = load_model(path)
    w = get_tensor(loaded.module, "net.0.weight")
    assert int((~torch.isfinite(w)).sum()) == 3


def test_save_failure_leaves_nothing_behind(tmp_path, files):
    loaded = load_model(files[("resnet", "pt2")][0])
    broken = clone_model(loaded)
    broken.metadata["example_args"] = None
    out = tmp_path / "x.pt2"
    with pytest.raises(ExportError, match="example inputs"):
        save_model(broken, out)
    assert list(tmp_path.iterdir()) == []


def test_progress_and_cancel(files):
    seen = []
    load_model(files[("lstm", "safetensors")][0], progress=lambda f, m: seen.append(f))
    assert seen[0] == 0.0 and seen[-1] == 1.0
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        load_model("demo:mlp", cancel=token)


def test_forward_runs_any_batch_size_on_a_static_batch_program(files):
    path, model, x = files[("resnet", "pt2")]
    loaded = load_model(path)
    assert loaded.metadata["fixed_batch"] == x.shape[0]
    big = torch.randn(11, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(forward(loaded, big), model(big), atol=1e-5)
        assert torch.allclose(forward(loaded, big[:1]), model(big[:1]), atol=1e-5)
    eager = load_model(files[("resnet", "pickle")][0], trust=True)
    assert "fixed_batch" not in eager.metadata
    with torch.no_grad():
        assert torch.allclose(forward(eager, big), model(big), atol=1e-5)


def test_dynamic_batch_pt2_opens(tmp_path):
    """torch writes a dynamic dimension as ``Symbol('s77', positive=True, integer=True)``."""
    model, x = make("resnet")
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    path = tmp_path / "dyn.pt2"
    torch.export.save(ep, str(path))
    loaded = load_model(path)
    assert loaded.format == "pt2" and not loaded.metadata.get("fixed_batch")
    x7 = torch.randn(7, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(loaded.module(x7), model(x7), atol=1e-6)


@pytest.mark.parametrize(
    "expr, ok",
    [
        ("Symbol('s77', positive=True, integer=True)", True),
        ("2*Symbol('s0', integer=True) + 1", True),
        ("Symbol('__import__')", False),
        ("Symbol('s0', evaluate=__import__('os'))", False),
    ],
)
def test_pt2_symbol_declarations(expr, ok):
    assert _safe_sym_expr(expr) is ok


@pytest.mark.parametrize(
    "guard, ok",
    [
        ("L['x'].size()[0] > 2", True),
        ("L['flat_args'][0].size()[1] == 2*L['y'].size()[0] and not L['x'].dim() < 2", True),
        ("__import__('os').system('id') == 0", False),
        ("L['x'].size()[0] > 2 or open('f')", False),
        ("L['x'].__class__ == 1", False),
    ],
)
def test_pt2_guard_code_must_be_plain_size_checks(guard, ok):
    from core.io.model_io import _safe_guard

    assert _safe_guard(guard) is ok


def test_pt2_guard_code_that_runs_code_is_refused(files, tmp_path):
    """``ExportedProgram.module()`` compiles guards_code with exec and runs it on every call."""
    import json
    import re

    src = files[("lstm", "pt2")][0]
    bad = tmp_path / "bad.pt2"
    marker = tmp_path / SIDE_EFFECT_NAME
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            raw = zin.read(info.filename)
            if re.search(r"models/[^/]+\.json$", info.filename):
                program = json.loads(raw)
                program["guards_code"] = [f"__import__('os').mkdir({str(marker)!r}) is None"]
                raw = json.dumps(program).encode()
            zout.writestr(info, raw)
    with pytest.raises(UntrustedPickleError, match="guard code"):
        load_model(bad)
    assert not marker.exists()
    loaded = load_model(bad, trust=True)  # the user vouches for it: then it is theirs to run
    assert loaded.format == "pt2"


def test_packed_archive_opens_as_the_compressed_model(tmp_path):
    from core.export.formats import export
    from tests.core._fixtures import make_result

    model, x = make("resnet")
    src = tmp_path / "resnet.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(src))
    result = make_result(load_model(src), sparsity=0.7, bits=6)
    export(result, "packed", tmp_path / "model.packed.safetensors", latency=False)
    # The recorded source is only opened when named (base=...); then the archive runs as it.
    opened = load_model(tmp_path / "model.packed.safetensors", base=src)
    assert opened.can_run and opened.format == "pt2"
    for name, value in result.compressed.module.state_dict().items():
        assert torch.equal(opened.module.state_dict()[name], value), name
    # Without a base the dequantized weights open weights-only, saying how to get a runnable one.
    fallback = load_model(tmp_path / "model.packed.safetensors")
    assert fallback.weights_only
    assert "--base" in fallback.metadata["opened_weights_only_reason"]
    assert torch.equal(
        get_tensor(fallback.module, "stem.weight"),
        result.compressed.module.state_dict()["stem.weight"],
    )


class _ModeModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        return self.fc(x)


def test_pt2_constant_string_inputs_cannot_escape_into_guard_code(tmp_path):
    """``module()`` writes ``mode == '<constant>'`` into exec()'d guard code: a quote escapes."""
    import json
    import re

    good = tmp_path / "mode.pt2"
    torch.export.save(torch.export.export(_ModeModel(), (torch.randn(3, 4), "fast")), str(good))
    assert load_model(good).format == "pt2"
    marker = tmp_path / SIDE_EFFECT_NAME
    payload = f"x' == '' or __import__('os').mkdir({str(marker)!r}) or '"
    bad = tmp_path / "bad.pt2"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            raw = zin.read(info.filename)
            if re.search(r"models/[^/]+\.json$", info.filename):
                raw = raw.replace(b'"fast"', json.dumps(payload).encode())
            zout.writestr(info, raw)
    with pytest.raises(UntrustedPickleError, match="constant string input"):
        load_model(bad)
    assert not marker.exists()
