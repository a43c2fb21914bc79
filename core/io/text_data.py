"""Text data for Hugging Face models: ``.txt`` (one text per line) or ``.jsonl`` records.

``.jsonl``: one JSON object per line with ``"text"``, optional ``"text_pair"`` (a second
segment, for cross-encoders / NLI classifiers) and optional integer ``"label"``. Either every
record has a label or none has. Blank lines are skipped in both formats.

The texts are tokenized with the model folder's own tokenizer (truncation at the model's
maximum length, padding to the longest text, attention mask) and stacked into the one input
tensor `core.io.hf.HFForward` takes: ``x[:, 0]`` ids, ``x[:, 1]`` attention mask and, for models
with a token-type embedding, ``x[:, 2]`` token type ids. `core.io.data.load_data` wraps it in an
ordinary `core.io.data.Dataset`, so statistics, evaluation, scans and fine-tuning use it unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from core.base.errors import DataError
from core.base.model import LoadedModel
from core.io.hf import IDS, MASK, TYPES, hf_info, load_tokenizer

TEXT_SUFFIXES = (".txt", ".jsonl")
TEXT_HINT = (
    "write one text per line (.txt), or one JSON object per line (.jsonl) with 'text' and "
    "optional 'label' / 'text_pair'"
)
#: A text file larger than this is refused (the whole file is tokenized in memory).
MAX_TEXT_BYTES = 256 * 1024 * 1024
#: Default cap on the tokenized length; the model's own limit applies when smaller.
DEFAULT_MAX_LENGTH = 128


def is_text_data(path: str | Path) -> bool:
    """True for a ``.txt`` / ``.jsonl`` path (text data that needs a tokenizer)."""
    return Path(path).suffix.lower() in TEXT_SUFFIXES


def read_records(path: Path) -> tuple[list[str], list[str] | None, list[int] | None]:
    """``(texts, pairs, labels)`` from a ``.txt`` or ``.jsonl`` file; `DataError` when malformed."""
    if not path.exists():
        raise DataError("no such file", path=path, hint="check the path to the data file")
    if path.is_dir():
        raise DataError("is a directory, not a data file", path=path, hint=TEXT_HINT)
    if path.stat().st_size > MAX_TEXT_BYTES:
        raise DataError(
            f"the text file is larger than {MAX_TEXT_BYTES // 2**20} MiB",
            path=path,
            hint="use a sample of the texts for calibration and evaluation",
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError("the file is not UTF-8 text", path=path, hint=TEXT_HINT) from None
    texts: list[str] = []
    pairs: list[str] = []
    labels: list[int | None] = []
    jsonl = path.suffix.lower() == ".jsonl"
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if not jsonl:
            texts.append(line)
            continue
        try:
            rec: Any = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"line {number} is not valid JSON ({exc.msg})", path=path, hint=TEXT_HINT
            ) from None
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise DataError(f"line {number} has no string field 'text'", path=path, hint=TEXT_HINT)
        texts.append(rec["text"])
        pair = rec.get("text_pair")
        if pair is not None and not isinstance(pair, str):
            raise DataError(
                f"line {number}: 'text_pair' is not a string", path=path, hint=TEXT_HINT
            )
        pairs.append(pair if pair is not None else "")
        label = rec.get("label")
        if label is not None and (
            isinstance(label, bool) or not isinstance(label, int) or label < 0
        ):
            raise DataError(
                f"line {number}: 'label' must be a non-negative integer, got {label!r}",
                path=path,
                hint="labels are class indices 0..classes-1",
            )
        labels.append(label)
    if not texts:
        raise DataError("the file holds no texts", path=path, hint=TEXT_HINT)
    has = [lab is not None for lab in labels]
    if any(has) and not all(has):
        first = has.index(False) if has[0] else has.index(True)
        raise DataError(
            f"some records have a 'label' and some do not (record {first + 1} differs from "
            "the first)",
            path=path,
            hint="label every record or none",
        )
    out_labels = [int(lab or 0) for lab in labels] if labels and all(has) else None
    out_pairs = pairs if jsonl and any(pairs) else None
    return texts, out_pairs, out_labels


def load_text_data(
    path: str | Path, model: LoadedModel, *, max_length: int = DEFAULT_MAX_LENGTH
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tokenize a text file with ``model``'s folder tokenizer: ``(x, y)``.

    ``x`` is int64 ``[texts, channels, seq]`` (see the module docstring), ``y`` the int64
    labels or ``None``.

    Parameters
    ----------
    path
        ``.txt`` or ``.jsonl`` (see the module docstring).
    model
        A model opened from a Hugging Face folder that has tokenizer files.
    max_length
        Longest tokenized sequence (capped by the model's own limit); longer texts are cut.

    Raises
    ------
    DataError
        The model is not a Hugging Face folder or has no tokenizer; the file is malformed.
    """

    path = Path(path)
    info = hf_info(model)
    if info is None:
        raise DataError(
            "text data needs a model opened from a Hugging Face folder (its tokenizer turns "
            "the text into token ids)",
            path=path,
            hint="open the model's folder, or give .npz/.pt data with token ids in 'x'",
        )
    if info.get("inputs") == "image":
        raise DataError(
            "the model takes images (pixel_values), so text cannot feed it",
            path=path,
            hint=f"give .npz/.pt data with float images in 'x' shaped [N, "
            f"{', '.join(map(str, info.get('image_shape') or ['C', 'H', 'W']))}] and "
            "optional integer labels in 'y'",
        )
    if not info.get("tokenizer"):
        raise DataError(
            "the model folder has no tokenizer, so the text cannot be tokenized",
            path=path,
            hint=f"copy the tokenizer files into {info['folder']}",
        )
    texts, pairs, labels = read_records(path)
    tokenizer = load_tokenizer(Path(info["folder"]))
    if tokenizer.pad_token is None:
        # GPT-2 style tokenizers have no pad token; padded positions are masked out anyway.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise DataError(
            "the tokenizer has no padding, end-of-text or unknown token to pad with",
            path=path,
            hint="add a pad_token to the folder's tokenizer_config.json",
        )
    limit = max(2, min(max_length, int(info.get("max_length") or max_length)))
    enc = tokenizer(
        texts,
        pairs,
        padding="longest",
        truncation=True,
        max_length=limit,
        return_tensors="pt",
        return_token_type_ids=True,
    )
    ids = enc["input_ids"].to(torch.int64)
    channels = [None, None, None][: int(info.get("channels", 2))]
    channels[IDS] = ids
    channels[MASK] = enc["attention_mask"].to(torch.int64)
    if len(channels) > TYPES:
        types = enc.get("token_type_ids")
        channels[TYPES] = types.to(torch.int64) if types is not None else torch.zeros_like(ids)
    x = torch.stack(channels, dim=1)
    y = torch.tensor(labels, dtype=torch.int64) if labels is not None else None
    return x, y


__all__ = ["TEXT_SUFFIXES", "is_text_data", "load_text_data", "read_records"]
