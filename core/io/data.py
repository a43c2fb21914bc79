"""Data for calibration, gradients and evaluation: the built-in digits split and user files.

The digits split
    scikit-learn's bundled 8x8 digits (1797 images, 10 classes, pixel values 0..16) scaled by
    1/16 to ``[0, 1]`` float32, split 70/30 by ``train_test_split(test_size=0.3,
    random_state=0, stratify=y)``: 1257 training and 540 test images, every class in the same
    proportion on both sides. ``kind="flat"`` gives ``x`` of shape ``(N, 64)``, ``kind="image"``
    gives ``(N, 1, 8, 8)``; both give int64 labels ``y`` of shape ``(N,)``.

User data
    ``.npz`` (``numpy.savez``) or ``.pt`` (``torch.save`` of a dict) holding an array ``x``
    (first axis = samples) and optionally ``y`` (integer class labels, one per sample).
    Floating ``x`` becomes float32, integer ``x`` (token ids) int64. ``.pt`` files are read with
    ``torch.load(weights_only=True)``: nothing in them is executed. Without ``y``, the original
    model's own predictions serve as labels (`with_model_labels`).
"""

from __future__ import annotations

import functools
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.base.errors import DataError
from core.base.limits import CORRUPT_CONTAINER_ERRORS, check_npz, check_torch_zip, corrupt_reason
from core.base.model import LoadedModel, forward
from core.io.text_data import is_text_data, load_text_data
from core.io.vetting import pickle_globals

#: Fraction of the digits held out for testing and the seed of the stratified split.
DIGITS_TEST_FRACTION = 0.3
DIGITS_SPLIT_SEED = 0

DATA_HINT = (
    "save a dict with an array 'x' (samples first) and optional integer labels 'y', "
    "e.g. numpy.savez('data.npz', x=x, y=y)"
)


@dataclass(frozen=True)
class Dataset:
    """Inputs ``x`` (samples first) and optional integer labels ``y``; never mutated."""

    x: torch.Tensor
    y: torch.Tensor | None
    name: str

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def labelled(self) -> bool:
        return self.y is not None

    def batches(
        self, batch_size: int, *, shuffle: bool = False, seed: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Yield ``(x, y)`` mini-batches; the last one may be smaller.

        Parameters
        ----------
        batch_size
            Samples per batch (>= 1).
        shuffle
            Visit samples in a random order drawn from ``seed`` (same seed, same order).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(self)
        order = None
        if shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        for start in range(0, n, batch_size):
            if order is None:
                idx = slice(start, start + batch_size)
            else:
                idx = order[start : start + batch_size]
            yield self.x[idx], (self.y[idx] if self.y is not None else None)

    def subset(self, index: torch.Tensor, name: str | None = None) -> Dataset:
        """The samples at ``index`` (a 1-D index tensor), as a new dataset."""
        y = self.y[index] if self.y is not None else None
        return Dataset(self.x[index], y, name or self.name)

    @property
    def num_classes(self) -> int | None:
        """``max(y) + 1`` when labelled, else ``None``."""
        if self.y is None or self.y.numel() == 0:
            return None
        return int(self.y.max()) + 1


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED, stratify=y
    )
    for a in (x_tr, x_te, y_tr, y_te):
        a.setflags(write=False)
    return x_tr, x_te, y_tr, y_te


def digits_split(kind: str = "flat") -> tuple[Dataset, Dataset]:
    """The fixed seeded stratified 70/30 split of scikit-learn's digits: ``(train, test)``.

    Parameters
    ----------
    kind
        ``"flat"``: ``x`` is ``(N, 64)``; ``"image"``: ``x`` is ``(N, 1, 8, 8)``.
    """
    if kind not in ("flat", "image"):
        raise ValueError(f"kind must be 'flat' or 'image', got {kind!r}")
    x_tr, x_te, y_tr, y_te = _digits_arrays()
    shape = (-1, 64) if kind == "flat" else (-1, 1, 8, 8)
    # Copies: callers get tensors they own, the cached arrays stay pristine.
    train = Dataset(torch.tensor(x_tr).reshape(shape), torch.tensor(y_tr), f"digits-train ({kind})")
    test = Dataset(torch.tensor(x_te).reshape(shape), torch.tensor(y_te), f"digits-test ({kind})")
    return train, test


def _read_npz(path: Path) -> dict[str, Any]:
    # Declared member and array sizes first: np.load allocates them before reading any data.
    check_npz(path, what="the .npz archive", error=DataError)
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except ValueError as exc:
        # allow_pickle=False refuses object arrays; say so instead of numpy's wording.
        raise DataError(
            f"the .npz holds an object array that would need unpickling ({exc})",
            path=path,
            hint="store plain numeric arrays",
        ) from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"not a readable .npz archive ({exc})", path=path, hint=DATA_HINT) from None


def _read_pt(path: Path) -> Any:
    if zipfile.is_zipfile(path):
        check_torch_zip(path, what="the torch data file", error=DataError)
    try:
        with warnings.catch_warnings(), path.open("rb") as fh:
            warnings.simplefilter("ignore")
            # A file object, not the path: torch.load dispatches on a ".safetensors" suffix.
            return torch.load(fh, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many unrelated types for corrupt/unsafe files
        kind = "torch_zip" if zipfile.is_zipfile(path) else "pickle"
        names = pickle_globals(path, kind) if "Weights only load failed" in str(exc) else None
        if names:
            reason = (
                f"it holds pickled Python objects (it references {', '.join(dict.fromkeys(names))[:120]}), "
                "which are never unpickled"
            )
        else:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if "Weights only load failed" in msg:
                msg = "not a valid pickle stream"
            reason = f"it is not a readable torch file ({msg[:160]})"
        raise DataError(reason, path=path, hint=DATA_HINT) from None


def _as_tensor(value: Any, key: str, path: Path) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise DataError(
                f"'{key}' has dtype {value.dtype}, not numbers",
                path=path,
                hint=f"store '{key}' as a numeric array",
            )
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, (list, tuple)):
        try:
            return torch.as_tensor(np.asarray(value))
        except (TypeError, ValueError, RuntimeError):
            pass
    raise DataError(
        f"'{key}' is a {type(value).__name__}, not an array",
        path=path,
        hint=f"store '{key}' as a numpy array or torch tensor",
    )


def _clean_x(x: torch.Tensor, path: Path | str) -> torch.Tensor:
    if x.ndim == 0 or x.shape[0] == 0:
        raise DataError(
            f"'x' must hold at least one sample along its first axis, got shape {tuple(x.shape)}",
            path=path,
            hint=DATA_HINT,
        )
    if x.is_complex():
        raise DataError("'x' is complex-valued", path=path, hint="store real numbers")
    if x.dtype == torch.bool:
        return x.to(torch.float32)
    if x.is_floating_point():
        return x.to(torch.float32)
    return x.to(torch.int64)


def _clean_y(y: torch.Tensor, n: int, path: Path | str) -> torch.Tensor:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(
            f"'y' must be one class label per sample (shape ({n},)), got shape {tuple(y.shape)}",
            path=path,
            hint="store integer class ids, not one-hot vectors or per-step targets",
        )
    if y.shape[0] != n:
        raise DataError(
            f"'x' has {n} samples but 'y' has {y.shape[0]} labels",
            path=path,
            hint="give exactly one label per sample",
        )
    if y.dtype == torch.bool or y.is_complex():
        raise DataError(
            f"'y' has dtype {y.dtype}; labels must be integer class ids",
            path=path,
            hint="store y as int64 class ids 0..C-1",
        )
    if y.is_floating_point():
        # Integral floats (e.g. 3.0) are accepted; anything else is not a class id.
        if not torch.isfinite(y).all() or not torch.equal(y, torch.round(y)):
            bad = y[~(torch.isfinite(y) & (y == torch.round(y)))][0].item()
            raise DataError(
                f"'y' holds non-integer labels (e.g. {bad})",
                path=path,
                hint="labels must be integer class ids 0..C-1",
            )
    y = y.to(torch.int64)
    if y.numel() and int(y.min()) < 0:
        raise DataError(
            f"'y' holds negative labels (min {int(y.min())})",
            path=path,
            hint="labels must be class ids 0..C-1",
        )
    return y


def make_dataset(x: Any, y: Any = None, name: str = "data") -> Dataset:
    """Validate and normalise in-memory arrays into a `Dataset` (same rules as `load_data`)."""
    xt = _clean_x(_as_tensor(x, "x", Path(name)), name)
    yt = None if y is None else _clean_y(_as_tensor(y, "y", Path(name)), xt.shape[0], name)
    return Dataset(xt, yt, name)


def load_data(path: str | Path, model: LoadedModel | None = None) -> Dataset:
    """Read a ``.npz`` or ``.pt`` file holding ``x`` and optional ``y``.

    The container is detected from content (an ``.npz`` is a zip of ``.npy`` members; a
    torch file is read with ``weights_only=True``). Raises `DataError` naming the file, what
    is wrong and what to do. Text data (``.txt``/``.jsonl``) is tokenized with ``model``'s
    Hugging Face tokenizer (`core.io.text_data`).
    """

    if is_text_data(path):
        if model is None:
            raise DataError(
                "text data needs a model's tokenizer; open the model first",
                path=str(path),
                hint="open a Hugging Face model folder, then its text data",
            )
        x, y = load_text_data(path, model)
        return Dataset(x, y, str(path))
    try:
        return _load_data(path)
    except CORRUPT_CONTAINER_ERRORS as exc:
        raise DataError(
            f"the data file is damaged or not a valid .npz/.pt container ({corrupt_reason(exc)})",
            path=str(path),
            hint="write it again with numpy.savez(path, x=..., y=...) or torch.save",
        ) from None


def _load_data(path: str | Path) -> Dataset:
    path = Path(path)
    if not path.exists():
        raise DataError("no such file", path=path, hint="check the path to the data file")
    if path.is_dir():
        raise DataError("is a directory, not a data file", path=path, hint=DATA_HINT)
    if path.stat().st_size == 0:
        raise DataError("the file is empty", path=path, hint=DATA_HINT)

    is_npz = False
    names: list[str] = []
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError):
            names = []
        is_npz = bool(names) and all(n.endswith(".npy") for n in names)
    if is_npz:
        obj: Any = _read_npz(path)
    else:
        _refuse_non_data(path, names)
        obj = _read_pt(path)

    if isinstance(obj, torch.Tensor):
        raise DataError("the file holds one bare tensor, not a dict", path=path, hint=DATA_HINT)
    if not isinstance(obj, Mapping):
        raise DataError(
            f"the file holds a {type(obj).__name__}, not a dict with 'x'",
            path=path,
            hint=DATA_HINT,
        )
    if "x" not in obj:
        keys = ", ".join(map(repr, list(obj)[:8])) or "nothing"
        raise DataError(
            f"no array named 'x' (found {keys})",
            path=path,
            hint=DATA_HINT,
        )
    x = _clean_x(_as_tensor(obj["x"], "x", path), path)
    if x.is_floating_point():
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            # One NaN input poisons every statistic computed from the model's outputs.
            raise DataError(
                f"'x' holds {bad} NaN/Inf value{'s' if bad > 1 else ''}",
                path=path,
                hint="drop or impute the samples with missing values",
            )
    y = None
    if obj.get("y") is not None:
        y = _clean_y(_as_tensor(obj["y"], "y", path), x.shape[0], path)
    return Dataset(x, y, str(path))


def _refuse_non_data(path: Path, names: list[str]) -> None:
    """`DataError` for files that are clearly not ``.npz``/``.pt`` data: say what they are."""
    with path.open("rb") as fh:
        magic = fh.read(9)
    if magic.startswith(b"\x93NUMPY"):
        raise DataError(
            "this is a single .npy array; inputs and labels need names",
            path=path,
            hint=DATA_HINT,
        )
    tails = {n.rsplit("/", 1)[-1] for n in names}
    if "constants.pkl" in tails or any("/code/" in f"/{n}" for n in names):
        raise DataError("this is a TorchScript model, not a data file", path=path, hint=DATA_HINT)
    if "archive_format" in tails:
        raise DataError(
            "this is a torch.export program (.pt2), not a data file", path=path, hint=DATA_HINT
        )
    if not names and magic[:1] != b"\x80":
        # Neither a zip container nor a pickle stream (protocol 2+ starts with 0x80); a
        # safetensors file starts with its 8-byte header length, then the JSON header.
        what = (
            "this is a safetensors weights file, not a data file"
            if magic[8:9] == b"{"
            else "it is not a readable torch file or .npz archive (unknown content)"
        )
        raise DataError(what, path=path, hint=DATA_HINT)


@dataclass(frozen=True)
class DataCheck:
    """What `check_data` found: the data's layout and, when the model ran, its outputs."""

    samples: int
    x_shape: tuple[int, ...]
    x_dtype: str
    labelled: bool
    label_classes: int | None
    output_shape: tuple[int, ...] | None
    model_classes: int | None
    ran_model: bool

    def summary(self) -> str:
        parts = [f"{self.samples} samples, x {list(self.x_shape)} {self.x_dtype}"]
        if self.labelled:
            parts.append(f"labels 0..{(self.label_classes or 1) - 1}")
        else:
            parts.append("no labels (the model's own predictions will serve as labels)")
        if self.output_shape is not None:
            parts.append(f"model output {list(self.output_shape)}")
        elif not self.ran_model:
            parts.append("not run through the model (weights-only: no forward pass)")
        return "; ".join(parts)


def _forward(loaded: LoadedModel, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return forward(loaded, x)


def check_data(loaded: LoadedModel, data: Dataset, *, probe: int = 4) -> DataCheck:
    """Check that ``data`` fits ``loaded``: one forward pass on a few samples, label range.

    Weights-only models cannot run; then only the data's own consistency is reported.
    Raises `DataError` when the model rejects the inputs or a label is out of its class range.
    """
    x = data.x
    output_shape = None
    model_classes = loaded.num_classes
    if loaded.can_run:
        try:
            out = _forward(loaded, x[:probe])
        except Exception as exc:  # any failure inside the user's forward pass
            expected = ""
            if loaded.example_input is not None:
                ex = loaded.example_input
                expected = f"; the model expects x like {list(ex.shape[1:])} {ex.dtype}"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(
                f"the model cannot run on x of per-sample shape {list(x.shape[1:])} {x.dtype}"
                f"{expected} ({first[:200]})",
                path=data.name,
                hint="give inputs shaped and typed like the model's own input",
            ) from None
        output_shape = (len(data),) + tuple(out.shape[1:])
        if out.ndim == 2 and out.is_floating_point():
            model_classes = int(out.shape[1])
    if data.y is not None and model_classes is not None and data.y.numel():
        top = int(data.y.max())
        if top >= model_classes:
            raise DataError(
                f"label {top} is out of range for a model with {model_classes} classes",
                path=data.name,
                hint=f"labels must be 0..{model_classes - 1}",
            )
    return DataCheck(
        samples=len(data),
        x_shape=tuple(x.shape),
        x_dtype=str(x.dtype).replace("torch.", ""),
        labelled=data.y is not None,
        label_classes=data.num_classes,
        output_shape=output_shape,
        model_classes=model_classes,
        ran_model=loaded.can_run,
    )


def with_model_labels(model: LoadedModel, data: Dataset, *, batch_size: int = 256) -> Dataset:
    """A copy of ``data`` whose ``y`` is the argmax of ``model``'s outputs (class logits).

    Raises `DataError` when the model cannot run or its outputs are not ``(N, C)`` scores.
    """
    if not model.can_run:
        raise DataError(
            "labels cannot come from a weights-only model (no forward pass)",
            path=data.name,
            hint="provide labels 'y' in the data file or open the model with an architecture",
        )
    preds = []
    for xb, _ in data.batches(batch_size):
        out = _forward(model, xb)
        if out.ndim != 2:
            raise DataError(
                f"the model's outputs have shape {list(out.shape)}, not (N, classes) scores, "
                "so its predictions cannot serve as labels",
                path=data.name,
                hint="provide labels 'y' in the data file",
            )
        preds.append(out.argmax(dim=1))
    return Dataset(data.x, torch.cat(preds).to(torch.int64), f"{data.name} (model labels)")


def split_dataset(data: Dataset, holdout: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Seeded random split into ``(train, holdout)``; both parts keep at least one sample."""
    n = len(data)
    if n < 2:
        raise DataError(
            f"cannot split {n} sample(s) into two parts",
            path=data.name,
            hint="provide at least two samples",
        )
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be in (0, 1), got {holdout}")
    n_hold = min(max(int(round(n * holdout)), 1), n - 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return (
        data.subset(order[n_hold:], f"{data.name} (train)"),
        data.subset(order[:n_hold], f"{data.name} (holdout)"),
    )


def demo_data_for(loaded: LoadedModel) -> tuple[Dataset, Dataset] | None:
    """The digits split shaped for ``loaded`` when it is (or behaves like) a digits demo.

    Demos (and files opened with ``architecture="demo:..."``) get their own layout. Another
    runnable model gets the digits when its example input is ``(N, 64)`` or ``(N, 1, 8, 8)``
    float and it answers with 10 class scores; otherwise ``None``.
    """
    kind = loaded.metadata.get("input_kind")
    if kind in ("flat", "image"):
        return digits_split(kind)
    ex = loaded.example_input
    if not loaded.can_run or ex is None or not ex.is_floating_point():
        return None
    per_sample = tuple(ex.shape[1:])
    kind = {(64,): "flat", (1, 8, 8): "image"}.get(per_sample)
    if kind is None:
        return None
    try:
        out = _forward(loaded, ex[:1])
    except Exception:  # a model that cannot take its own example is simply not a digits model
        return None
    if out.ndim == 2 and out.shape[1] == 10:
        return digits_split(kind)
    return None
