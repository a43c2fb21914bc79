"""Tiny random Hugging Face model folders and text data, built with transformers' own classes.

Shared by tests/core/test_hf.py and tests/e2e/test_cli_hf.py. Every folder is what
``save_pretrained`` writes (config.json + model.safetensors) plus a word-level tokenizer
(``tokenizer.json`` via ``PreTrainedTokenizerFast``) built here from a small vocabulary.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

WORDS = (
    "the a cat dog bird sat ran flew on under mat tree roof fast slow big small red blue green "
    "and then it was very quite"
).split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[EOS]"]
KINDS = ("encoder", "causal_lm", "classifier")
NUM_LABELS = 3


def _transformers():
    return pytest.importorskip("transformers")


def tokenizer():
    """A ``PreTrainedTokenizerFast`` over `WORDS` (word level, whitespace split)."""
    tf = _transformers()
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(SPECIALS + list(WORDS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        eos_token="[EOS]",
    )


def vocab_size() -> int:
    return len(SPECIALS) + len(WORDS)


def build_folder(kind: str, folder: Path, *, seed: int = 0, sentence_transformers: bool = False):
    """Save a tiny random ``kind`` model (`KINDS`) with its tokenizer into ``folder``."""
    tf = _transformers()
    import torch

    torch.manual_seed(seed)
    small = {"num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    if kind == "encoder":
        model = tf.BertModel(
            tf.BertConfig(
                vocab_size=vocab_size(), hidden_size=32, max_position_embeddings=64, **small
            )
        )
    elif kind == "classifier":
        model = tf.BertForSequenceClassification(
            tf.BertConfig(
                vocab_size=vocab_size(),
                hidden_size=32,
                max_position_embeddings=64,
                num_labels=NUM_LABELS,
                **small,
            )
        )
    elif kind == "causal_lm":
        eos = SPECIALS.index("[EOS]")
        model = tf.GPT2LMHeadModel(
            tf.GPT2Config(
                vocab_size=vocab_size(),
                n_embd=32,
                n_layer=2,
                n_head=2,
                n_positions=64,
                bos_token_id=eos,
                eos_token_id=eos,
            )
        )
    else:
        raise ValueError(kind)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tokenizer().save_pretrained(str(folder))
    if sentence_transformers:
        (folder / "modules.json").write_text(
            json.dumps(
                [
                    {
                        "idx": 0,
                        "name": "0",
                        "path": "",
                        "type": "sentence_transformers.models.Transformer",
                    },
                    {
                        "idx": 1,
                        "name": "1",
                        "path": "1_Pooling",
                        "type": "sentence_transformers.models.Pooling",
                    },
                    {
                        "idx": 2,
                        "name": "2",
                        "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize",
                    },
                ]
            )
        )
        (folder / "1_Pooling").mkdir()
        (folder / "1_Pooling" / "config.json").write_text(
            json.dumps({"word_embedding_dimension": 32, "pooling_mode_cls_token": False,
                        "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False})
        )  # fmt: skip
        (folder / "2_Normalize").mkdir()
    return model


def sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` random sentences of 3..10 words from `WORDS`."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))) for _ in range(n)]


def write_txt(path: Path, n: int, seed: int = 0) -> Path:
    path.write_text("\n".join(sentences(n, seed)) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, n: int, seed: int = 0, *, pairs: bool = False) -> Path:
    """Labelled records; the label is a function of the text (its first word's index mod 3)."""
    texts = sentences(n, seed)
    others = sentences(n, seed + 1)
    with path.open("w", encoding="utf-8") as fh:
        for text, other in zip(texts, others, strict=True):
            rec = {"text": text, "label": WORDS.index(text.split()[0]) % NUM_LABELS}
            if pairs:
                rec["text_pair"] = other
            fh.write(json.dumps(rec) + "\n")
    return path


def build_seq2seq(folder: Path, *, seed: int = 0):
    """A tiny random T5 encoder-decoder (``T5ForConditionalGeneration``, which will not run
    without decoder inputs) with the word-level tokenizer."""
    tf = _transformers()
    import torch

    torch.manual_seed(seed)
    pad = SPECIALS.index("[PAD]")
    model = tf.T5ForConditionalGeneration(
        tf.T5Config(
            vocab_size=vocab_size(),
            d_model=32,
            d_ff=64,
            d_kv=16,
            num_layers=2,
            num_heads=2,
            pad_token_id=pad,
            decoder_start_token_id=pad,
            eos_token_id=SPECIALS.index("[EOS]"),
        )
    )
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tokenizer().save_pretrained(str(folder))
    return model


def build_image_model(folder: Path, *, head: bool = True, seed: int = 0):
    """A tiny random ViT on 3x16x16 images: ``ViTForImageClassification`` (`NUM_LABELS`
    classes) or, with ``head=False``, the bare ``ViTModel``. No tokenizer (images)."""
    tf = _transformers()
    import torch

    torch.manual_seed(seed)
    config = tf.ViTConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=16,
        patch_size=4,
        num_labels=NUM_LABELS,
    )
    model = tf.ViTForImageClassification(config) if head else tf.ViTModel(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    return model


def build_audio_model(folder: Path, *, seed: int = 0):
    """A tiny random wav2vec 2.0 classifier: its input is a raw waveform (``input_values``),
    which the workbench does not feed."""
    tf = _transformers()
    import torch

    torch.manual_seed(seed)
    model = tf.Wav2Vec2ForSequenceClassification(
        tf.Wav2Vec2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            conv_dim=(16, 16),
            conv_stride=(5, 2),
            conv_kernel=(10, 3),
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=2,
            num_labels=2,
        )
    )
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    return model


def build_two_tower(folder: Path, *, seed: int = 0):
    """A tiny random CLIP (text and image towers): its forward needs token ids and pixels at
    once, which the workbench does not make (it opens weights-only)."""
    tf = _transformers()
    import torch

    torch.manual_seed(seed)
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    config = tf.CLIPConfig(
        text_config={
            **tower,
            "vocab_size": vocab_size(),
            "num_attention_heads": 2,
            "max_position_embeddings": 32,
        },
        vision_config={**tower, "num_attention_heads": 2, "image_size": 16, "patch_size": 4},
        projection_dim=16,
    )
    model = tf.CLIPModel(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tokenizer().save_pretrained(str(folder))
    return model
