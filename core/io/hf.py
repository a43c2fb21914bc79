"""Hugging Face model folders: open them offline with a forward pass, and write them back.

A folder opens when it holds ``config.json`` and weights in one of the layouts
transformers writes (docs/formats.md): ``model.safetensors``, a sharded
``model.safetensors.index.json``, or ``pytorch_model.bin`` (one file or sharded; read with
``torch.load(weights_only=True)`` only). The class comes from the config's
``architectures`` (``BertModel``, ``GPT2LMHeadModel``, ``BertForSequenceClassification``...);
parameter names are the checkpoint's own.

Offline, always: ``HF_HUB_OFFLINE=1`` is set before transformers is imported and every
``from_pretrained`` gets ``local_files_only=True``. A folder that would need a download
(a config that points at another repository's code, missing weights) is a `ModelLoadError`.
Custom modelling code (``auto_map`` in config.json) runs only with ``trust=True`` and only
from the folder itself.

The forward pass: `HFForward` wraps the transformers model so the rest of the workbench sees
an ordinary ``module(x) -> tensor``. ``x`` is one int64 tensor ``[batch, channels, seq]``:
channel 0 the token ids, channel 1 the attention mask, channel 2 (when the tokenizer makes
them) the token type ids. The output is what fidelity is measured on:

- ``encoder`` (``BertModel``, sentence-transformers folders): the pooled sentence embedding
  ``[batch, hidden]``, pooled as the folder's ``1_Pooling/config.json`` says (mean pooling
  when the folder has no pooling config), L2-normalised when ``modules.json`` lists a
  ``Normalize`` module;
- ``classifier`` (``...ForSequenceClassification``): the class logits ``[batch, labels]``;
- ``causal_lm`` (``...ForCausalLM``, ``...LMHeadModel``): next-token logits
  ``[batch, seq, vocab]`` (perplexity and next-token agreement: `next_token_stats`);
- ``token_logits`` (any other head with ``logits``): ``[batch, seq, classes]``.

An encoder-decoder (T5, BART) also gets the decoder's input: the ids shifted right by the
decoder's start token (`shift_right`); an encoder's embedding is then pooled from the
encoder's states. An image model (``main_input_name`` ``pixel_values``: ViT, ConvNeXT,
ResNet, Swin) takes ``x`` as its float ``pixel_values`` ``[batch, channels, height, width]``
(``...ForImageClassification`` is a ``classifier``; a bare ``...Model`` an ``encoder`` whose
output is its pooled output, else the mean over positions); its data is an ``.npz``/``.pt``
with such ``x``. Other inputs (audio features, waveforms) are refused with a hint.

The wrapper shares the wrapped model's parameter, buffer and child dictionaries rather than
holding it as a child, so ``named_parameters()`` and ``state_dict()`` keys stay exactly the
checkpoint's (``bert.encoder.layer.0.attention.self.query.weight``), which is what plans,
recipes and packed archives are keyed by.

Why one module of this size: opening a folder (config, weights, pooling, tokenizer), the forward
wrapper and writing a folder back all follow the same folder layout rules (which files, which
names); keeping them together keeps the read and write sides of that layout in step.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.base.errors import ExportError, ModelLoadError
from core.base.limits import check_torch_zip
from core.base.model import LoadedModel
from core.base.progress import CancelToken, ProgressFn, no_progress

CONFIG = "config.json"
#: Weight layouts transformers writes, in the order they are preferred.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
#: Tokenizer and generation files copied into an exported folder when present.
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "added_tokens.json",
    "generation_config.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
)
INSTALL_HINT = 'install the optional Hugging Face support: pip install -e ".[hf]"'
KINDS = ("encoder", "classifier", "causal_lm", "token_logits")
POOLING_MODES = ("mean", "cls", "max")
#: Largest example image an image model is run on when it opens (`image_shape`).
MAX_IMAGE_CHANNELS = 16
MAX_IMAGE_PIXELS = 1024 * 1024
#: Channels of the packed input tensor ``x[:, c, :]``.
IDS, MASK, TYPES = 0, 1, 2


def is_hf_folder(path: str | Path) -> bool:
    """True for a directory holding ``config.json`` (a Hugging Face model folder)."""
    p = Path(path)
    return p.is_dir() and (p / CONFIG).is_file()


def transformers_module() -> Any:
    """Import transformers offline (``HF_HUB_OFFLINE=1``), quiet, or raise `ModelLoadError`."""
    # Set before the import: huggingface_hub reads these once, at import time.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        import transformers
    except ImportError:
        raise ModelLoadError(
            "opening a Hugging Face model folder needs the transformers package",
            hint=INSTALL_HINT,
        ) from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(
            f"{what} is not readable JSON ({type(exc).__name__})",
            path=path,
            hint="copy or download the model folder again",
        ) from None
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{what} is not a JSON object", path=path, hint="check the file")
    return obj


def weight_files(folder: Path) -> list[str]:
    """The weight files (by layout name) present in ``folder``; `ModelLoadError` when none."""
    found = [name for name in WEIGHT_FILES if (folder / name).is_file()]
    if not found:
        others = sorted(p.name for p in folder.iterdir() if p.suffix in (".h5", ".msgpack"))
        extra = f" (found {', '.join(others)}: TensorFlow/Flax weights)" if others else ""
        raise ModelLoadError(
            f"the folder has config.json but no PyTorch weights{extra}",
            path=folder,
            hint="download the model's model.safetensors (or pytorch_model.bin) into the "
            "folder; the workbench never downloads anything",
        )
    return found


def _check_bins(folder: Path, files: list[str]) -> None:
    """Zip-bomb limits for every ``.bin`` transformers would ``torch.load``."""

    names: list[str] = []
    if "pytorch_model.bin" in files:
        names.append("pytorch_model.bin")
    elif "pytorch_model.bin.index.json" in files:
        index = _read_json(folder / "pytorch_model.bin.index.json", "the shard index")
        names.extend(sorted(set(map(str, (index.get("weight_map") or {}).values()))))
    for name in names:
        shard = (folder / name).resolve()
        if shard.parent != folder.resolve() or not shard.is_file():
            raise ModelLoadError(
                f"the shard index names {name!r}, which is not a file in the folder",
                path=folder,
                hint="copy or download the model folder again",
            )
        check_torch_zip(shard, what="the PyTorch weights")


def read_pooling(folder: Path) -> tuple[str, bool, str]:
    """``(mode, normalize, where)``: how a sentence embedding is pooled from token states.

    sentence-transformers folders name their modules in ``modules.json``; the Pooling
    module's ``config.json`` says which mode (``pooling_mode_mean_tokens`` /
    ``_cls_token`` / ``_max_tokens``) and a ``Normalize`` module means unit-length output.
    Without that, mean pooling over the attention mask (``where`` says which applied).
    """
    modules_path = folder / "modules.json"
    if not modules_path.is_file():
        return "mean", False, "mean pooling (default: the folder has no pooling config)"
    try:
        modules = json.loads(modules_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise ModelLoadError(
            "modules.json is not readable JSON", path=modules_path, hint="check the file"
        ) from None
    if not isinstance(modules, list):
        raise ModelLoadError("modules.json is not a list", path=modules_path, hint="check it")
    mode, normalize, where = "mean", False, "mean pooling (modules.json has no Pooling module)"
    for entry in modules:
        if not isinstance(entry, Mapping):
            continue
        kind = str(entry.get("type", ""))
        if kind.endswith("Normalize"):
            normalize = True
        if kind.endswith("Pooling"):
            sub = (folder / str(entry.get("path", ""))).resolve()
            cfg_path = sub / "config.json"
            if sub.parent != folder.resolve() or not cfg_path.is_file():
                continue
            cfg = _read_json(cfg_path, "the pooling config")
            for candidate, key in (
                ("mean", "pooling_mode_mean_tokens"),
                ("cls", "pooling_mode_cls_token"),
                ("max", "pooling_mode_max_tokens"),
            ):
                if cfg.get(key):
                    mode = candidate
                    break
            else:
                raise ModelLoadError(
                    "the pooling config names no mode the workbench supports",
                    path=cfg_path,
                    hint="use mean, cls or max token pooling",
                )
            where = f"{mode} pooling ({entry.get('path')}/config.json)"
    return mode, normalize, where


def _kind_of(class_name: str) -> str:
    if class_name.endswith(("ForSequenceClassification", "ForImageClassification")):
        return "classifier"
    if class_name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal_lm"
    if class_name.endswith("Model") or "For" not in class_name:
        return "encoder"
    return "token_logits"


class HFForward(nn.Module):
    """A transformers model as ``module(x) -> tensor`` with the checkpoint's parameter names.

    Parameters
    ----------
    model
        The transformers ``PreTrainedModel``.
    kind
        One of `KINDS` (what the output is; see the module docstring).
    pooling, normalize
        Encoders only: `POOLING_MODES` entry, and whether to L2-normalise the embedding.
    """

    def __init__(self, model: nn.Module, kind: str, pooling: str = "mean", normalize: bool = False):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES}, got {pooling!r}")
        # Not registered as a child: sharing its dictionaries keeps every name unprefixed.
        object.__setattr__(self, "hf", model)
        self._modules = model._modules
        self._parameters = model._parameters
        self._buffers = model._buffers
        self._non_persistent_buffers_set = model._non_persistent_buffers_set
        self.kind = kind
        self.pooling = pooling
        self.normalize = normalize
        self.training = model.training

    def train(self, mode: bool = True) -> HFForward:
        # The wrapped model's own flag is read by its forward (dropout, caches).
        self.hf.train(mode)
        self.training = mode
        return self

    @property
    def takes_images(self) -> bool:
        """Whether the model's input is an image batch (``pixel_values``), not token ids."""
        return getattr(self.hf, "main_input_name", "input_ids") == "pixel_values"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: int64 ``[batch, 2 or 3, seq]`` (ids, attention mask[, token types]), or
        for an image model float ``pixel_values`` ``[batch, channels, height, width]``."""
        if self.takes_images:
            out = self.hf(pixel_values=x, return_dict=True)
            if self.kind != "encoder":
                return out.logits
            pooled = getattr(out, "pooler_output", None)
            if pooled is not None:
                return pooled.flatten(1)
            hidden = out.last_hidden_state
            return hidden.mean(dim=1) if hidden.dim() == 3 else hidden.flatten(2).mean(dim=2)
        mask = x[:, MASK]
        kwargs: dict[str, Any] = {"input_ids": x[:, IDS], "attention_mask": mask}
        if x.shape[1] > TYPES:
            kwargs["token_type_ids"] = x[:, TYPES]
        config = getattr(self.hf, "config", None)
        seq2seq = bool(getattr(config, "is_encoder_decoder", False))
        if seq2seq:
            # An encoder-decoder (T5, BART, Marian...) also needs the decoder's input: the
            # text itself shifted right by the decoder's start token (what training feeds),
            # so the logits predict the input tokens. BART builds the same by itself; T5
            # refuses to run without it.
            kwargs["decoder_input_ids"] = shift_right(x[:, IDS], config)
        if self.kind == "causal_lm" or seq2seq:
            kwargs["use_cache"] = False
        out = self.hf(**kwargs, return_dict=True)
        if self.kind != "encoder":
            return out.logits
        if seq2seq and getattr(out, "encoder_last_hidden_state", None) is not None:
            hidden = out.encoder_last_hidden_state  # the input's embedding, not the decoder's
        else:
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return pool(hidden, mask, self.pooling, self.normalize)

    def extra_repr(self) -> str:
        return f"{type(self.hf).__name__}, kind={self.kind}, pooling={self.pooling}"


def shift_right(ids: torch.Tensor, config: Any) -> torch.Tensor:
    """The decoder input of an encoder-decoder for target ``ids``: the decoder's start token
    (``decoder_start_token_id``, else the pad token, else 0) then ``ids[:, :-1]``."""
    start = getattr(config, "decoder_start_token_id", None)
    if start is None:
        start = getattr(config, "pad_token_id", None)
    out = torch.empty_like(ids)
    out[:, 1:] = ids[:, :-1]
    out[:, 0] = int(start or 0)
    return out


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str, normalize: bool) -> torch.Tensor:
    """Sentence embeddings ``[batch, hidden]`` from token states ``[batch, seq, hidden]``."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "cls":
        emb = hidden[:, 0]
    elif mode == "max":
        emb = hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min).amax(dim=1)
    else:
        emb = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
    if normalize:
        emb = torch.nn.functional.normalize(emb, dim=-1)
    return emb


def next_token_stats(
    logits: torch.Tensor, x: torch.Tensor, reference: torch.Tensor | None = None
) -> tuple[float, int, int]:
    """``(nll_sum, tokens, agree)`` of a causal LM batch: the summed negative log-likelihood
    of every real next token (attention mask on both positions), how many there were, and at
    how many the argmax prediction equals the reference's (0 without a reference)."""
    ids = x[:, IDS, 1:]
    valid = _next_token_valid(x)
    pred = logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(
        pred.reshape(-1, pred.shape[-1]), ids.reshape(-1), reduction="none"
    ).reshape(ids.shape)
    tokens = int(valid.sum())
    agree = 0
    if reference is not None:
        same = pred.argmax(dim=-1) == reference[:, :-1].argmax(dim=-1)
        agree = int((same & valid).sum())
    return float(nll[valid].double().sum()), tokens, agree


def language_model(loaded: LoadedModel) -> bool:
    """Whether ``loaded`` is a causal language model from a Hugging Face folder: its text is
    its own target (next-token loss), so it needs no labels for gradients or fine-tuning."""
    info = loaded.metadata.get("hf")
    return isinstance(info, dict) and info.get("kind") == "causal_lm"


def _next_token_valid(x: torch.Tensor) -> torch.Tensor:
    """Positions ``t`` whose next token is real (attention mask on at ``t`` and ``t + 1``)."""
    return (x[:, MASK, 1:] > 0) & (x[:, MASK, :-1] > 0)


def next_token_loss(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the next real token (the causal LM's training loss) of a batch
    ``x`` (`HFForward`'s packed ids and mask) under ``logits`` ``[batch, seq, vocab]``."""
    valid = _next_token_valid(x)
    pred = logits[:, :-1].float()[valid]
    if pred.numel() == 0:
        return logits.float().sum() * 0.0  # a batch of one-token texts: nothing to predict
    return torch.nn.functional.cross_entropy(pred, x[:, IDS, 1:][valid])


def token_kl(
    student: torch.Tensor, teacher: torch.Tensor, x: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``T^2 * KL(teacher^T || student^T)`` of the next-token distributions, averaged over the
    real tokens of ``x`` (distillation of a causal LM)."""
    valid = x[:, MASK] > 0
    s = student.float()[valid] / temperature
    t = teacher.float()[valid] / temperature
    if s.numel() == 0:
        return student.float().sum() * 0.0
    kl = torch.nn.functional.kl_div(
        torch.log_softmax(s, dim=-1),
        torch.log_softmax(t, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    return kl * (temperature * temperature)


def _architecture(config: Any, folder: Path) -> str:
    archs = getattr(config, "architectures", None) or []
    if not archs:
        return "AutoModel"
    return str(archs[0])


def _refuse_remote(config_dict: Mapping[str, Any], folder: Path, trust: bool) -> None:
    auto_map = config_dict.get("auto_map")
    if not auto_map:
        return
    refs = [str(v) for v in (auto_map.values() if isinstance(auto_map, Mapping) else [])]
    flat = [r for v in refs for r in ([v] if isinstance(v, str) else list(v))]
    if any("--" in r for r in flat):
        raise ModelLoadError(
            "config.json points at modelling code in another repository (auto_map with '--')",
            path=folder / CONFIG,
            hint="the workbench never downloads code; copy that code into the folder",
        )
    if not trust:
        raise ModelLoadError(
            "the folder needs its own Python modelling code (auto_map in config.json), which "
            "runs when the model is built",
            path=folder / CONFIG,
            hint="pass --trust only if you trust the folder's .py files",
        )


def _read_config(tf: Any, path: Path, trust: bool) -> Any:
    """The folder's config as transformers reads it (offline)."""
    try:
        return tf.AutoConfig.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=trust
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(
            f"transformers cannot read config.json ({_first(exc)})",
            path=path / CONFIG,
            hint="the model type may need a newer transformers, or the folder is incomplete",
        ) from None


def _build_model(
    cls: Any, arch: str, path: Path, config: Any, files: list[str], trust: bool
) -> Any:
    """Build ``arch`` from the folder's weights (offline, no pickled code), in eval mode."""
    try:
        model = cls.from_pretrained(
            str(path),
            config=config,
            local_files_only=True,
            trust_remote_code=trust,
            weights_only=True,
            use_safetensors=any(f.startswith("model.safetensors") for f in files),
        )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise ModelLoadError(
            f"transformers could not build {arch} from the folder ({_first(exc)})",
            path=path,
            hint="check that the weights belong to config.json and are complete",
        ) from None
    model.eval()
    return model


def load_hf_folder(
    folder: str | Path,
    *,
    trust: bool = False,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
) -> LoadedModel:
    """Open a Hugging Face model folder offline as a runnable `LoadedModel`.

    Parameters
    ----------
    folder
        A directory with ``config.json`` and weights (see the module docstring).
    trust
        Allow the folder's own modelling code (``auto_map``); never code from elsewhere.

    Returns
    -------
    LoadedModel
        ``format="hf"``; ``module`` an `HFForward`; ``metadata["hf"]`` holds ``folder``,
        ``architecture``, ``model_type``, ``kind``, ``pooling``, ``normalize``,
        ``pooling_source``, ``tokenizer`` (bool), ``weights`` (layout files) and ``fidelity``
        (what the evaluation measures).

    Raises
    ------
    ModelLoadError
        Missing weights or config, unknown architecture, a download or code would be needed.
    """
    path = Path(folder).expanduser()
    config_dict = _read_json(path / CONFIG, "config.json")
    files = weight_files(path)
    _refuse_remote(config_dict, path, trust)
    progress(0.1, "importing transformers")
    tf = transformers_module()
    if cancel is not None:
        cancel.check()
    config = _read_config(tf, path, trust)
    arch = _architecture(config, path)
    cls = _model_class(tf, arch, config_dict, path)
    if any(f.startswith("pytorch_model.bin") for f in files) and not any(
        f.startswith("model.safetensors") for f in files
    ):
        _check_bins(path, files)
    progress(0.3, f"building {arch}")
    model = _build_model(cls, arch, path, config, files, trust)
    if cancel is not None:
        cancel.check()
    kind = _kind_of(type(model).__name__)
    inputs = _input_name(model, arch, path)
    images = inputs == "pixel_values"
    pooling, normalize, pooling_source = (
        read_pooling(path) if kind == "encoder" and not images else ("mean", False, "")
    )
    if images and kind == "encoder":
        pooling_source = "the model's pooled output (else the mean over positions)"
    tokenizer = None if images else load_tokenizer(path, required=False)
    module = HFForward(model, kind, pooling, normalize)
    channels = input_channels(tokenizer, config)
    if images:
        image = image_shape(config)
        example = example_image(image)
    else:
        example = example_input(tokenizer, config, channels)
    meta: dict[str, Any] = {
        "detected": "hf_folder",
        "hf": {
            "folder": str(path),
            "architecture": arch,
            "model_type": str(getattr(config, "model_type", "")),
            "kind": kind,
            "pooling": pooling if kind == "encoder" else None,
            "normalize": normalize,
            "pooling_source": pooling_source or None,
            "tokenizer": tokenizer is not None,
            "weights": files,
            "fidelity": _fidelity_text(kind, pooling_source, normalize, images),
            "channels": channels,
            "max_length": max_length(tokenizer, config),
            "inputs": "image" if images else "text",
        },
    }
    if images:
        meta["hf"]["image_shape"] = list(image)
    num_labels = int(getattr(config, "num_labels", 0) or 0) if kind == "classifier" else None
    progress(0.8, "running the model once")
    refused = _forward_refused(module, example)
    if refused:
        meta["notes"] = [_weights_only_note(arch, images, refused)]
    progress(1.0, f"opened {path.name}")
    return LoadedModel(
        module,
        "hf",
        str(path),
        path.name,
        example_input=None if refused else example,
        weights_only=bool(refused),
        task={"classifier": "classification", "encoder": "embedding"}.get(kind, "unknown"),
        num_classes=num_labels,
        metadata=meta,
    )


def _model_class(tf: Any, arch: str, config_dict: dict[str, Any], path: Path) -> Any:
    """The transformers class that builds ``arch``: the folder's own (``auto_map``, with
    ``--trust``) or the library's."""
    if config_dict.get("auto_map"):
        cls = tf.AutoModel
        for key, ref in config_dict["auto_map"].items():
            if isinstance(ref, str) and ref.endswith("." + arch) and hasattr(tf, key):
                cls = getattr(tf, key)
        return cls
    cls = getattr(tf, arch, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ModelLoadError(
            f"transformers {tf.__version__} has no model class {arch!r} (config.json "
            "'architectures')",
            path=path / CONFIG,
            hint="install a transformers version that knows this architecture",
        )
    return cls


def _forward_refused(module: HFForward, example: torch.Tensor) -> str:
    """``""`` when ``module`` runs on ``example``, else why not (``Type: first line``)."""
    try:
        with torch.no_grad():
            module(example)
    except Exception as exc:  # noqa: BLE001 - the model's own code, any failure
        return f"{type(exc).__name__}: {_first(exc)}"
    return ""


def _weights_only_note(arch: str, images: bool, refused: str) -> str:
    """Why a folder opened weights-only. Multi-input models (CLIP: text and images at once)
    need inputs the workbench does not make: their weights are still compressed and
    exported, without a forward pass."""
    return (
        f"{arch} does not run on {'images' if images else 'text'} alone ({refused}): "
        "opened weights-only (compress and export work; evaluation, gradients and "
        "fine-tuning need a forward pass)"
    )


def _input_name(model: Any, arch: str, path: Path) -> str:
    """The model's main input: ``input_ids`` (text) or ``pixel_values`` (images); any other
    (audio features, raw waveforms) is a `ModelLoadError`: its shape is the model's own."""
    name = str(getattr(model, "main_input_name", "input_ids") or "input_ids")
    if name not in ("input_ids", "pixel_values"):
        raise ModelLoadError(
            f"{arch} takes {name!r} as its input; the workbench feeds Hugging Face folders "
            "token ids (text models) or pixel_values (image models) only",
            path=path,
            hint="export the model with its own example input to TorchScript or .pt2 "
            "(torch.export) and open that file",
        )
    return name


def image_shape(config: Any) -> tuple[int, int, int]:
    """``(channels, height, width)`` of one image: the config's ``num_channels`` (3) and
    ``image_size`` (an int or a pair; 224 when the config has none, as ResNet's)."""
    channels = int(getattr(config, "num_channels", 3) or 3)
    size = getattr(config, "image_size", None) or 224
    if isinstance(size, (list, tuple)):
        height, width = (int(size[0]), int(size[-1])) if size else (224, 224)
    else:
        height = width = int(size)
    # The folder is run on two such images when it opens: a crafted config must not make
    # that forward pass take gigabytes (1024x1024 covers the largest real inputs, SAM's).
    if not (0 < channels <= MAX_IMAGE_CHANNELS and 0 < height * width <= MAX_IMAGE_PIXELS):
        raise ModelLoadError(
            f"config.json gives an image of {channels}x{height}x{width}, beyond the "
            f"{MAX_IMAGE_CHANNELS} channels and {MAX_IMAGE_PIXELS:,} pixels the workbench "
            "runs an image model on",
            hint="check num_channels and image_size in config.json",
        )
    return channels, height, width


def example_image(shape: tuple[int, int, int]) -> torch.Tensor:
    """A two-image batch ``[2, channels, height, width]`` of fixed normal noise (tracing,
    exports; the same every time)."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn((2, *shape), generator=gen)


def _fidelity_text(kind: str, pooling_source: str, normalize: bool, images: bool = False) -> str:
    """What the evaluation measures for a model of this kind (reports and the window)."""
    if images and kind == "encoder":
        return f"cosine of the image embedding ({pooling_source})"
    return {
        "encoder": f"cosine of the pooled sentence embedding ({pooling_source}"
        f"{', L2-normalised' if normalize else ''})",
        "classifier": "accuracy (with labels) and top-1 agreement with the original",
        "causal_lm": "perplexity and next-token agreement with the original",
        "token_logits": "cosine of the logits" if images else "cosine of the per-token logits",
    }[kind]


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line[:200]


def load_tokenizer(folder: Path, *, required: bool = True) -> Any:
    """The folder's tokenizer (offline), or ``None`` when it has none and not ``required``."""
    has_files = any((folder / n).is_file() for n in SIDE_FILES[:8])
    if not has_files:
        if required:
            raise ModelLoadError(
                "the folder has no tokenizer files (tokenizer.json, vocab.txt, ...)",
                path=folder,
                hint="copy the model's tokenizer files into the folder to use text data",
            )
        return None
    tf = transformers_module()
    try:
        return tf.AutoTokenizer.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=False
        )
    except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
        if not required:
            return None
        raise ModelLoadError(
            f"the folder's tokenizer cannot be opened ({_first(exc)})",
            path=folder,
            hint="check the tokenizer files, or install the package the tokenizer needs",
        ) from None


def input_channels(tokenizer: Any, config: Any) -> int:
    """2 (ids, mask) or 3 (with token type ids, for models with a token-type embedding)."""
    if int(getattr(config, "type_vocab_size", 0) or 0) > 0:
        return 3
    names = getattr(tokenizer, "model_input_names", ()) if tokenizer is not None else ()
    return 3 if "token_type_ids" in names else 2


def max_length(tokenizer: Any, config: Any) -> int:
    """The longest sequence the model takes: position embeddings, capped by the tokenizer."""
    limits = [
        int(v)
        for v in (
            getattr(config, "max_position_embeddings", None),
            getattr(config, "n_positions", None),
            getattr(tokenizer, "model_max_length", None) if tokenizer is not None else None,
        )
        if isinstance(v, int) and 0 < v < 1_000_000
    ]
    return min(limits) if limits else 512


def example_input(tokenizer: Any, config: Any, channels: int) -> torch.Tensor:
    """A two-sample batch ``[2, channels, seq]`` of real token ids (tracing, exports)."""
    vocab = int(getattr(config, "vocab_size", 0) or 2)
    seq = min(8, max_length(tokenizer, config))
    ids = torch.arange(2 * seq, dtype=torch.int64).reshape(2, seq) % vocab
    mask = torch.ones_like(ids)
    parts = [ids, mask] + ([torch.zeros_like(ids)] if channels > 2 else [])
    return torch.stack(parts, dim=1)


def hf_info(loaded: LoadedModel) -> dict[str, Any] | None:
    """``loaded.metadata["hf"]`` when ``loaded`` is (restored from) a Hugging Face folder."""
    info = loaded.metadata.get("hf")
    return info if isinstance(info, dict) else None


def write_hf_folder(loaded: LoadedModel, target: Path, *, force: bool = False) -> int:
    """Write ``loaded`` (a compressed `HFForward` model) as a folder transformers opens.

    The folder gets the original's ``config.json``, tokenizer and sentence-transformers
    files, and the compressed weights as ``model.safetensors`` (pruned zeros, dequantized
    values, original dtypes). It is written next to ``target`` and renamed into place, so a
    failure leaves no partial folder. Returns the bytes written.
    """
    info = hf_info(loaded)
    module = loaded.module
    if info is None or not isinstance(module, HFForward):
        raise ExportError(
            "the hf export needs a model opened from a Hugging Face folder",
            path=loaded.source,
            hint="open the model's folder (config.json + weights), or choose another format",
        )
    source = Path(info["folder"])
    if target.exists() and not force:
        raise ExportError("folder already exists", path=target, hint="pass --force to replace it")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        module.hf.save_pretrained(str(tmp), safe_serialization=True)
        for name in SIDE_FILES:
            if (source / name).is_file() and not (tmp / name).exists():
                shutil.copy2(source / name, tmp / name)
        for sub in source.iterdir():
            # sentence-transformers module folders (1_Pooling, 2_Normalize) hold only JSON.
            if sub.is_dir() and sub.name[:1].isdigit() and "_" in sub.name:
                shutil.copytree(sub, tmp / sub.name)
        # mkdtemp (and transformers' own temporary files) are private; an export gets the
        # permissions a plain mkdir/open would give.
        umask = os.umask(0)
        os.umask(umask)
        for p in tmp.rglob("*"):
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)
        os.chmod(tmp, 0o777 & ~umask)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sum(p.stat().st_size for p in target.rglob("*") if p.is_file())


__all__ = [
    "HFForward",
    "hf_info",
    "is_hf_folder",
    "load_hf_folder",
    "language_model",
    "load_tokenizer",
    "next_token_loss",
    "next_token_stats",
    "pool",
    "read_pooling",
    "shift_right",
    "token_kl",
    "write_hf_folder",
]
