"""Train the built-in demo models and write ``resources/demo/<name>.safetensors`` + ``.json``.

Usage::

    python bench/train_demos.py            # both demos
    python bench/train_demos.py mlp        # one of them

Seeded and CPU-only (2 threads); each demo trains in well under a minute. The recipe: AdamW
with weight decay, a cosine learning-rate schedule, random +-1 pixel shifts of the 8x8 digits as
augmentation, on the fixed training part of `core.io.data.digits_split`. Nothing is selected on the
test set: the last epoch's weights are kept and the test accuracy is measured once and recorded.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.io.data import DIGITS_SPLIT_SEED, DIGITS_TEST_FRACTION, digits_split  # noqa: E402
from core.io.zoo import DEMO_DIR, DEMOS, build_demo  # noqa: E402

SETTINGS = {
    "mlp": {"epochs": 150, "lr": 5e-3, "weight_decay": 1e-4, "batch_size": 32, "shift": 1},
    "cnn": {"epochs": 300, "lr": 3e-3, "weight_decay": 1e-4, "batch_size": 32, "shift": 1},
}
SEED = 0


def random_shift(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Shift each (N, 1, 8, 8) image by up to ``max_shift`` pixels, filling with zeros."""
    if max_shift == 0:
        return x
    n = x.shape[0]
    padded = F.pad(x, (max_shift,) * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    rows = (dy[:, None] + torch.arange(8)[None, :])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(8)[None, :])[:, None, None, :]
    idx = torch.arange(n)[:, None, None, None]
    return padded[idx, torch.zeros_like(idx), rows, cols]


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train(name: str) -> dict:
    spec = DEMOS[name]
    cfg = SETTINGS[name]
    torch.manual_seed(SEED)
    g = torch.Generator().manual_seed(SEED)
    train_set, test_set = digits_split("image")
    model = build_demo(name).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    steps_per_epoch = -(-len(train_set) // cfg["batch_size"])
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg["lr"], total_steps=cfg["epochs"] * steps_per_epoch
    )
    start = time.perf_counter()
    for epoch in range(cfg["epochs"]):
        for xb, yb in train_set.batches(cfg["batch_size"], shuffle=True, seed=SEED + epoch):
            xb = random_shift(xb, cfg["shift"], g)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    seconds = time.perf_counter() - start
    model.eval()
    x_te = test_set.x if spec.input_kind == "image" else test_set.x.reshape(-1, 64)
    record = {
        "name": f"demo:{name}",
        "description": spec.description,
        "test_accuracy": round(accuracy(model, x_te, test_set.y), 6),
        "train_accuracy": round(accuracy(model, train_set.x, train_set.y), 6),
        "test_samples": len(test_set),
        "train_samples": len(train_set),
        "split": {
            "dataset": "sklearn.datasets.load_digits, x/16 in [0, 1]",
            "test_fraction": DIGITS_TEST_FRACTION,
            "random_state": DIGITS_SPLIT_SEED,
            "stratified": True,
        },
        "input_shape": list(spec.input_shape),
        "num_classes": spec.num_classes,
        "params": sum(p.numel() for p in model.parameters()),
        "train_settings": {
            "optimizer": "AdamW",
            "schedule": "OneCycleLR (cosine)",
            "augmentation": f"random shift up to {cfg['shift']} px",
            "seed": SEED,
            **cfg,
        },
        "train_seconds": round(seconds, 2),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "script": "bench/train_demos.py",
    }
    return {"model": model, "record": record}


def write(name: str, model: torch.nn.Module, record: dict, out_dir: Path) -> None:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / f"{name}.safetensors"
    info = out_dir / f"{name}.json"
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tmp_w = weights.with_suffix(".safetensors.tmp")
    save_file(state, str(tmp_w), metadata={"demo": name, "script": record["script"]})
    tmp_i = info.with_suffix(".json.tmp")
    tmp_i.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    for tmp in (tmp_w, tmp_i):
        os.chmod(tmp, 0o644)  # safetensors writes 0600; the shipped files must be readable
    os.replace(tmp_w, weights)
    os.replace(tmp_i, info)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"any of {', '.join(DEMOS)}")
    parser.add_argument("--out", type=Path, default=DEMO_DIR)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in DEMOS]
    if unknown:
        parser.error(f"unknown demo(s) {', '.join(unknown)}; choose from {', '.join(DEMOS)}")
    torch.set_num_threads(args.threads)
    for name in args.names or list(DEMOS):
        result = train(name)
        rec = result["record"]
        write(name, result["model"], rec, args.out)
        print(
            f"demo:{name}: test accuracy {rec['test_accuracy']:.4f} "
            f"(train {rec['train_accuracy']:.4f}), {rec['params']} params, "
            f"{rec['train_seconds']:.1f} s -> {args.out / (name + '.safetensors')}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
