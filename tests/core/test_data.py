"""The digits split, user data files and their validation against a model."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from core.base.errors import DataError
from core.base.model import LoadedModel
from core.io.data import (
    Dataset,
    check_data,
    demo_data_for,
    digits_split,
    load_data,
    split_dataset,
    with_model_labels,
)
from core.io.model_io import load_model
from tests.models import make


def test_digits_split_is_fixed_stratified_and_scaled():
    train, test = digits_split("flat")
    assert (len(train), len(test)) == (1257, 540)
    assert train.x.shape == (1257, 64) and train.x.dtype == torch.float32
    assert float(train.x.min()) == 0.0 and float(train.x.max()) == 1.0
    assert train.y.dtype == torch.int64 and set(train.y.tolist()) == set(range(10))
    # Stratified: each class's share differs by well under one sample's weight between sides.
    share_tr = torch.bincount(train.y, minlength=10) / len(train)
    share_te = torch.bincount(test.y, minlength=10) / len(test)
    assert float((share_tr - share_te).abs().max()) < 0.005
    again, _ = digits_split("flat")
    assert torch.equal(again.x, train.x) and torch.equal(again.y, train.y)
    img_train, img_test = digits_split("image")
    assert img_train.x.shape == (1257, 1, 8, 8)
    assert torch.equal(img_train.x.reshape(-1, 64), train.x)
    # Callers own their tensors: mutating one split leaves the next call untouched.
    train.x.zero_()
    assert float(digits_split("flat")[0].x.max()) == 1.0
    with pytest.raises(ValueError):
        digits_split("nope")


def test_batches_cover_everything_and_shuffle_is_seeded():
    data = Dataset(torch.arange(10).float()[:, None], torch.arange(10), "t")
    plain = [xb[:, 0].tolist() for xb, _ in data.batches(4)]
    assert plain == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    a = torch.cat([yb for _, yb in data.batches(3, shuffle=True, seed=5)])
    b = torch.cat([yb for _, yb in data.batches(3, shuffle=True, seed=5)])
    c = torch.cat([yb for _, yb in data.batches(3, shuffle=True, seed=6)])
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert sorted(a.tolist()) == list(range(10))


def test_load_npz_and_pt(tmp_path):
    x = np.random.default_rng(0).random((6, 64))
    y = np.array([0, 1, 2, 3, 4, 5], dtype=np.int32)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    data = load_data(tmp_path / "d.npz")
    assert data.x.dtype == torch.float32 and data.y.dtype == torch.int64
    assert torch.allclose(data.x, torch.from_numpy(x).float()) and data.y.tolist() == y.tolist()
    torch.save({"x": torch.randint(0, 100, (3, 16))}, tmp_path / "tokens.pt")
    tokens = load_data(tmp_path / "tokens.pt")
    assert tokens.x.dtype == torch.int64 and tokens.y is None
    torch.save({"x": torch.zeros(2, 3), "y": torch.tensor([1.0, 2.0])}, tmp_path / "f.pt")
    assert load_data(tmp_path / "f.pt").y.tolist() == [1, 2]


def _bad_files(tmp_path):
    out = {}

    def npz(name, **arrays):
        np.savez(tmp_path / f"{name}.npz", **arrays)
        out[name] = tmp_path / f"{name}.npz"

    npz("missing_x", inputs=np.zeros((3, 2)))
    npz("float_labels", x=np.zeros((3, 2)), y=np.array([0.5, 1.0, 2.0]))
    npz("negative_labels", x=np.zeros((3, 2)), y=np.array([0, -1, 2]))
    npz("mismatched", x=np.zeros((3, 2)), y=np.array([0, 1]))
    npz("onehot", x=np.zeros((3, 2)), y=np.eye(3, dtype=np.int64))
    npz("empty_x", x=np.zeros((0, 2)))
    npz("strings", x=np.array(["a", "b"]))
    np.savez(tmp_path / "objects.npz", x=np.array([{"a": 1}, None], dtype=object))
    out["objects"] = tmp_path / "objects.npz"
    (tmp_path / "empty.npz").write_bytes(b"")
    out["empty"] = tmp_path / "empty.npz"
    np.save(tmp_path / "single.npy", np.zeros((3, 2)))
    out["single"] = tmp_path / "single.npy"
    torch.save(torch.zeros(3, 2), tmp_path / "bare.pt")
    out["bare"] = tmp_path / "bare.pt"
    (tmp_path / "junk.pt").write_bytes(os.urandom(256))
    out["junk"] = tmp_path / "junk.pt"
    out["missing"] = tmp_path / "nope.npz"
    out["directory"] = tmp_path
    npz("nan_x", x=np.array([[0.0, np.nan], [1.0, np.inf]], dtype=np.float32))
    model, ex = make("encoder")
    torch.jit.save(torch.jit.trace(model, ex), str(tmp_path / "model.pt"))
    out["torchscript"] = tmp_path / "model.pt"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2, 2)}, str(tmp_path / "weights.npz"))
    out["safetensors"] = tmp_path / "weights.npz"
    return out


@pytest.mark.parametrize(
    "kind, words",
    [
        ("missing_x", "no array named 'x'"),
        ("float_labels", "non-integer labels"),
        ("negative_labels", "negative labels"),
        ("mismatched", "3 samples but 'y' has 2"),
        ("onehot", "one class label per sample"),
        ("empty_x", "at least one sample"),
        ("strings", "not numbers"),
        ("objects", "object array"),
        ("empty", "empty"),
        ("single", "single .npy array"),
        ("bare", "bare tensor"),
        ("junk", "not a readable torch file"),
        ("missing", "no such file"),
        ("directory", "directory"),
        ("nan_x", "2 NaN/Inf values"),
        ("torchscript", "TorchScript model, not a data file"),
        ("safetensors", "safetensors weights file, not a data file"),
    ],
)
def test_bad_data_files_raise_data_error(tmp_path, kind, words):
    path = _bad_files(tmp_path)[kind]
    with pytest.raises(DataError) as info:
        load_data(path)
    assert words in str(info.value) and str(path) in str(info.value)


def test_pickled_objects_in_data_are_never_unpickled(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'PWNED'}",))

    torch.save({"x": torch.zeros(2, 2), "y": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(DataError, match="never unpickled"):
        load_data(tmp_path / "evil.pt")
    assert not (tmp_path / "PWNED").exists()


def test_check_data_against_model(tmp_path):
    mlp = load_model("demo:mlp")
    train, _ = digits_split("flat")
    check = check_data(mlp, train)
    assert check.ran_model and check.output_shape == (1257, 10) and check.model_classes == 10
    assert "1257 samples" in check.summary()

    wrong_shape = Dataset(torch.zeros(4, 3, 5), None, "wrong.npz")
    with pytest.raises(
        DataError, match=r"wrong.npz.*per-sample shape \[3, 5\].*expects x like \[64\]"
    ):
        check_data(mlp, wrong_shape)

    out_of_range = Dataset(torch.zeros(3, 64), torch.tensor([0, 3, 12]), "labels.npz")
    with pytest.raises(DataError, match="label 12 is out of range for a model with 10 classes"):
        check_data(mlp, out_of_range)

    model, x = make("transformer")
    tokens_as_float = Dataset(x.float(), None, "tokens.npz")
    loaded = LoadedModel(model, "eager", "m", "m", example_input=x)
    with pytest.raises(DataError, match="cannot run"):
        check_data(loaded, tokens_as_float)


def test_weights_only_model_checks_labels_only(tmp_path):
    from safetensors.torch import save_file

    save_file(dict(load_model("demo:mlp").module.state_dict()), str(tmp_path / "w.safetensors"))
    loaded = load_model(tmp_path / "w.safetensors")
    check = check_data(loaded, Dataset(torch.zeros(2, 7), torch.tensor([0, 1]), "d"))
    assert not check.ran_model and "weights-only" in check.summary()
    with pytest.raises(DataError, match="weights-only"):
        with_model_labels(loaded, Dataset(torch.zeros(2, 64), None, "d"))


def test_model_predictions_serve_as_labels():
    mlp = load_model("demo:mlp")
    _, test = digits_split("flat")
    unlabelled = Dataset(test.x, None, "digits")
    labelled = with_model_labels(mlp, unlabelled)
    with torch.no_grad():
        expected = mlp.module(test.x).argmax(1)
    assert torch.equal(labelled.y, expected)
    # The demo agrees with the true labels on its recorded accuracy.
    acc = float((labelled.y == test.y).float().mean())
    assert acc == pytest.approx(mlp.metadata["info"]["test_accuracy"], abs=1e-6)

    gru, x = make("gru")
    with pytest.raises(DataError, match="not \\(N, classes\\) scores"):
        with_model_labels(LoadedModel(gru, "eager", "g", "g"), Dataset(x, None, "seq"))


def test_split_dataset_is_seeded_disjoint_and_complete():
    data = Dataset(torch.arange(20).float()[:, None], torch.arange(20) % 3, "d")
    a_tr, a_ho = split_dataset(data, 0.25, seed=1)
    b_tr, b_ho = split_dataset(data, 0.25, seed=1)
    assert (len(a_tr), len(a_ho)) == (15, 5)
    assert torch.equal(a_ho.x, b_ho.x)
    assert sorted(torch.cat([a_tr.x, a_ho.x])[:, 0].tolist()) == list(range(20))
    with pytest.raises(DataError, match="cannot split"):
        split_dataset(Dataset(torch.zeros(1, 2), None, "one"))


def test_demo_data_for():
    mlp, cnn = load_model("demo:mlp"), load_model("demo:cnn")
    assert demo_data_for(mlp)[0].x.shape == (1257, 64)
    assert demo_data_for(cnn)[1].x.shape == (540, 1, 8, 8)
    model, x = make("transformer")
    assert demo_data_for(LoadedModel(model, "eager", "t", "t", example_input=x)) is None
    resnet, rx = make("resnet")  # (N, 1, 8, 8) input and 10 outputs: the digits fit
    pairs = demo_data_for(LoadedModel(resnet, "eager", "r", "r", example_input=rx))
    assert pairs is not None and pairs[0].x.shape[1:] == (1, 8, 8)
