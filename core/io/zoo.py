"""Built-in demo models for scikit-learn's 8x8 digits: ``demo:mlp`` and ``demo:cnn``.

The architectures live here; their trained weights are shipped under ``resources/demo/`` as
``<name>.safetensors`` with a ``<name>.json`` record (test accuracy, training settings), both
written by ``bench/train_demos.py``. The modules use only ``torch.nn.functional`` calls in
``forward`` so they script, trace, ``torch.export`` and ONNX-export without changes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core import RESOURCES
from core.base.errors import ModelLoadError

#: Where the shipped demo weights live (``resources/demo`` at the repository root).
DEMO_DIR = RESOURCES / "demo"

DEMO_PREFIX = "demo:"


class DigitsMLP(nn.Module):
    """LeNet-300-100 on the 64 pixels of an 8x8 digit: 64 -> 300 -> 100 -> 10 with ReLU.

    Accepts ``(N, 64)`` or ``(N, 1, 8, 8)`` (flattened) float inputs in ``[0, 1]``.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(64, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class DigitsCNN(nn.Module):
    """LeNet-5 adapted to 1x8x8 digits.

    conv(1->6, 3x3, pad 1) + ReLU + maxpool 2 -> conv(6->16, 3x3, pad 1) + ReLU + maxpool 2
    -> flatten (16*2*2 = 64) -> fc 120 -> fc 84 -> fc 10. Input ``(N, 1, 8, 8)`` in ``[0, 1]``.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 2 * 2, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


@dataclass(frozen=True)
class DemoSpec:
    """What a demo needs besides its weights: class, input layout and a description."""

    name: str
    cls: type[nn.Module]
    input_kind: str  # "flat" -> (N, 64); "image" -> (N, 1, 8, 8); see core.io.data.digits_split
    num_classes: int
    description: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (64,) if self.input_kind == "flat" else (1, 8, 8)


DEMOS: dict[str, DemoSpec] = {
    "mlp": DemoSpec(
        "mlp", DigitsMLP, "flat", 10, "LeNet-300-100-style MLP (64-300-100-10) on 8x8 digits"
    ),
    "cnn": DemoSpec("cnn", DigitsCNN, "image", 10, "LeNet-5-style CNN on 1x8x8 digits"),
}


def demo_name(source: str | Path) -> str | None:
    """Return ``"mlp"`` for ``"demo:mlp"`` (or ``"mlp"`` if it names a demo), else ``None``.

    A bare name only counts when no file of that name exists, so a local file called ``mlp``
    still opens as a file.
    """
    text = str(source)
    if text.startswith(DEMO_PREFIX):
        return text[len(DEMO_PREFIX) :]
    if text in DEMOS and not Path(text).exists():
        return text
    return None


def demo_spec(name: str) -> DemoSpec:
    """Look up a demo by name (``"mlp"`` or ``"demo:mlp"``); unknown names raise `ModelLoadError`."""
    key = name[len(DEMO_PREFIX) :] if name.startswith(DEMO_PREFIX) else name
    try:
        return DEMOS[key]
    except KeyError:
        known = ", ".join(DEMO_PREFIX + k for k in DEMOS)
        raise ModelLoadError(
            f"unknown demo model {name!r}", hint=f"the built-in demos are {known}"
        ) from None


def build_demo(name: str) -> nn.Module:
    """A freshly initialised (untrained) demo architecture, in eval mode.

    Parameters
    ----------
    name
        ``"mlp"`` or ``"cnn"`` (a ``"demo:"`` prefix is accepted).
    """
    spec = demo_spec(name)
    return spec.cls(spec.num_classes).eval()


def weights_path(name: str) -> Path:
    return DEMO_DIR / f"{demo_spec(name).name}.safetensors"


def info_path(name: str) -> Path:
    return DEMO_DIR / f"{demo_spec(name).name}.json"


def demo_info(name: str) -> dict[str, Any]:
    """The training record written next to the weights (``test_accuracy``, settings, date...)."""
    path = info_path(name)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(
            "the demo's training record is missing",
            path=path,
            hint="run `python bench/train_demos.py` to train the demos again",
        ) from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"the demo's training record is unreadable ({exc})",
            path=path,
            hint="run `python bench/train_demos.py` to write it again",
        ) from None


def load_demo(name: str) -> nn.Module:
    """The demo architecture with its shipped trained weights, in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    module = build_demo(name)
    path = weights_path(name)
    if not path.is_file():
        raise ModelLoadError(
            "the demo's weight file is missing",
            path=path,
            hint="run `python bench/train_demos.py` to train the demos again",
        )
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(
            f"the demo's weight file is unreadable ({exc})",
            path=path,
            hint="run `python bench/train_demos.py` to write it again",
        ) from None
    module.load_state_dict(state, strict=True)
    return module
