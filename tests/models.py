"""Non-demo models generated on the fly for tests (and benchmarks): each comes with an example input.

- `ResNetBN`: ResNet-style CNN, BatchNorm, a residual block, a depthwise + pointwise pair.
- `TinyTransformer`: token embedding + positional embedding + TransformerEncoder (MHA) + head.
- `LSTMClassifier`: 2-layer LSTM over 8x8 digit rows + linear head.
- `GRUTagger`: GRU + linear, outputs per-step features (not a classifier).
- `Encoder`: MLP producing L2-normalised embeddings (not a classifier).
"""

from __future__ import annotations

import torch
from torch import nn


class ResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class ResNetBN(nn.Module):
    """Input (N, 1, 8, 8) -> 10 logits."""

    def __init__(self, width: int = 16, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.block = ResBlock(width)
        self.dw = nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False)
        self.dw_bn = nn.BatchNorm2d(width)
        self.pw = nn.Conv2d(width, 2 * width, 1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = self.block(x)
        x = torch.relu(self.dw_bn(self.dw(x)))
        x = torch.relu(self.pw(x))
        x = x.mean(dim=(2, 3))
        return self.fc(x)


class TinyTransformer(nn.Module):
    """Input (N, 16) int64 token ids in [0, 100) -> 5 logits."""

    def __init__(self, vocab: int = 100, d: int = 32, seq: int = 16, num_classes: int = 5):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(1, seq, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, 4, dim_feedforward=64, batch_first=True, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.pos[:, : tokens.shape[1]]
        h = self.encoder(h)
        return self.head(self.norm(h).mean(dim=1))


class LSTMClassifier(nn.Module):
    """Input (N, 8, 8): 8 steps of 8 features -> 10 logits."""

    def __init__(self, hidden: int = 32, num_classes: int = 10):
        super().__init__()
        self.lstm = nn.LSTM(8, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class GRUTagger(nn.Module):
    """Input (N, 12, 6) -> (N, 12, 4) per-step features."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(6, 24, batch_first=True)
        self.out = nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.gru(x)
        return self.out(h)


class Encoder(nn.Module):
    """Input (N, 64) -> (N, 16) unit-norm embeddings."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.net(x), dim=-1)


class Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck: 1x1, 3x3, 1x1 convs with BatchNorm, a shortcut."""

    def __init__(self, cin: int, width: int, stride: int, downsample: bool):
        super().__init__()
        cout = 4 * width
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
            if downsample
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.downsample(x))


class ResNet50(nn.Module):
    """torchvision's ResNet-50 layout (107 layers: 53 conv, 53 BN, fc) with ``base`` channels in
    the stem (64: the real 25.6M parameters; small bases for fast tests)."""

    def __init__(self, base: int = 64, classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, base, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        cin, stages = base, []
        for i, blocks in enumerate((3, 4, 6, 3)):
            width, layers = base * 2**i, []
            for j in range(blocks):
                layers.append(Bottleneck(cin, width, 2 if (j == 0 and i > 0) else 1, j == 0))
                cin = 4 * width
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def example_input(model: nn.Module, batch: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if isinstance(model, TinyTransformer):
        return torch.randint(0, 100, (batch, 16), generator=g)
    if isinstance(model, ResNetBN):
        return torch.randn(batch, 1, 8, 8, generator=g)
    if isinstance(model, LSTMClassifier):
        return torch.randn(batch, 8, 8, generator=g)
    if isinstance(model, GRUTagger):
        return torch.randn(batch, 12, 6, generator=g)
    if isinstance(model, Encoder):
        return torch.randn(batch, 64, generator=g)
    raise TypeError(type(model))


def make(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """Build a seeded model by name (``resnet``, ``transformer``, ``lstm``, ``gru``, ``encoder``) in eval mode."""
    torch.manual_seed(seed)
    model = {
        "resnet": ResNetBN,
        "transformer": TinyTransformer,
        "lstm": LSTMClassifier,
        "gru": GRUTagger,
        "encoder": Encoder,
    }[name]()
    model.eval()
    return model, example_input(model)


ALL = ("resnet", "transformer", "lstm", "gru", "encoder")
