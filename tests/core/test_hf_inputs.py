"""Hugging Face folders beyond one-stack text models: an encoder-decoder (T5, which runs only
with decoder inputs), image models (ViT: ``pixel_values`` in, classifier and bare encoder)
and a refusal for inputs the workbench cannot make (a wav2vec 2.0 waveform model).

Each model goes open -> data -> analyze -> compress -> evaluate -> export (packed, hf, onnx)
-> reload, compared with the compressed model's own outputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from core.analysis.stats import analyze  # noqa: E402
from core.base.errors import DataError, ModelLoadError  # noqa: E402
from core.compress.engine import compress  # noqa: E402
from core.evaluate import evaluate  # noqa: E402
from core.export.formats import export_all  # noqa: E402
from core.io.data import load_data  # noqa: E402
from core.io.hf import shift_right  # noqa: E402
from core.io.model_io import load_model, load_packed  # noqa: E402
from core.recipe.plan import simple_plan  # noqa: E402
from tests import hf_models  # noqa: E402


def _export_and_reload(result, data, folder, tmp_path, x):
    records = {
        r.format: r for r in export_all(result, ["packed", "hf", "onnx"], tmp_path, data=data)
    }
    assert records["packed"].max_abs_diff == 0.0
    assert records["hf"].max_abs_diff == 0.0
    assert records["onnx"].max_abs_diff < 1e-4
    with torch.no_grad():
        want = result.compressed.module(x)
        restored = load_packed(tmp_path / "model.packed.safetensors", base=str(folder))
        torch.testing.assert_close(restored.module(x), want)
        reopened = load_model(tmp_path / "hf_model")
        torch.testing.assert_close(reopened.module(x), want, rtol=0, atol=0)
    return records


def test_encoder_decoder_runs_on_text_with_shifted_decoder_inputs(tmp_path):
    import transformers

    folder = tmp_path / "t5"
    hf_models.build_seq2seq(folder)
    loaded = load_model(folder)
    info = loaded.metadata["hf"]
    assert info["kind"] == "token_logits" and info["inputs"] == "text"
    data = load_data(hf_models.write_txt(tmp_path / "s.txt", 30), loaded)
    x = data.x[:4]
    # The same logits as transformers itself given the shifted text as decoder input.
    ref = transformers.T5ForConditionalGeneration.from_pretrained(str(folder)).eval()
    ids, mask = x[:, 0], x[:, 1]
    dec = ref._shift_right(ids)
    assert torch.equal(shift_right(ids, ref.config), dec)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        torch.testing.assert_close(loaded.module(x), want)
    stats = analyze(loaded)
    result = compress(loaded, simple_plan(0.5, 8), stats)
    ev = evaluate(result.compressed, data, reference=loaded, latency=False)
    assert ev.fidelity_metric == info["fidelity"] and 0.0 < ev.cosine < 1.0
    _export_and_reload(result, data, folder, tmp_path / "out", x)


def _images(tmp_path, n=48, labels=True):
    rng = np.random.default_rng(0)
    arrays = {"x": rng.standard_normal((n, 3, 16, 16)).astype(np.float32)}
    if labels:
        arrays["y"] = rng.integers(0, hf_models.NUM_LABELS, n)
    path = tmp_path / "images.npz"
    np.savez(path, **arrays)
    return path


def test_image_classifier_takes_pixel_values(tmp_path):
    import transformers

    folder = tmp_path / "vit"
    hf_models.build_image_model(folder)
    loaded = load_model(folder)
    info = loaded.metadata["hf"]
    assert info["kind"] == "classifier" and info["inputs"] == "image"
    assert info["image_shape"] == [3, 16, 16] and not info["tokenizer"]
    assert loaded.task == "classification" and loaded.num_classes == hf_models.NUM_LABELS
    assert tuple(loaded.example_input.shape) == (2, 3, 16, 16)
    data = load_data(_images(tmp_path), loaded)
    x = data.x[:5]
    ref = transformers.ViTForImageClassification.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), ref(pixel_values=x).logits)
    stats = analyze(loaded, data)  # with labels: gradient statistics too
    assert any(ts.grad is not None for ts in stats.tensors.values())
    result = compress(loaded, simple_plan(0.5, 8, "taylor"), stats)
    ev = evaluate(result.compressed, data, reference=loaded, latency=False)
    assert ev.classifier and 0.0 <= ev.accuracy <= 1.0 and 0.0 <= ev.agreement <= 1.0
    _export_and_reload(result, data, folder, tmp_path / "out", x)
    # Text cannot feed an image model: a clear refusal naming the input it needs.
    txt = hf_models.write_txt(tmp_path / "s.txt", 5)
    with pytest.raises(DataError, match=r"takes images.*\[N, 3, 16, 16\]"):
        load_data(txt, loaded)


def test_image_encoder_embeds_with_its_pooled_output(tmp_path):
    import transformers

    folder = tmp_path / "vitmodel"
    hf_models.build_image_model(folder, head=False)
    loaded = load_model(folder)
    assert loaded.metadata["hf"]["kind"] == "encoder"
    assert "image embedding" in loaded.metadata["hf"]["fidelity"]
    data = load_data(_images(tmp_path, labels=False), loaded)
    ref = transformers.ViTModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        out = loaded.module(data.x[:3])
        torch.testing.assert_close(out, ref(pixel_values=data.x[:3]).pooler_output)
    result = compress(loaded, simple_plan(0.5, 8), analyze(loaded))
    ev = evaluate(result.compressed, data, reference=loaded, latency=False)
    assert 0.0 < ev.cosine < 1.0


def test_a_waveform_model_is_refused_with_a_hint(tmp_path):
    folder = tmp_path / "w2v"
    hf_models.build_audio_model(folder)
    with pytest.raises(ModelLoadError, match="input_values") as err:
        load_model(folder)
    assert "TorchScript or .pt2" in str(err.value)


def test_a_model_needing_two_inputs_opens_weights_only_with_a_note(tmp_path):
    """CLIP runs only on text and pixels together: the folder opens weights-only (with a
    note saying why), compresses and exports; evaluation is refused with a clear error."""
    from core.base.errors import CompressionError, WorkbenchError

    folder = tmp_path / "clip"
    hf_models.build_two_tower(folder)
    loaded = load_model(folder)
    assert not loaded.can_run and loaded.example_input is None
    (note,) = loaded.metadata["notes"]
    assert "CLIPModel does not run on text alone" in note and "weights-only" in note
    result = compress(loaded, simple_plan(0.5, 8), analyze(loaded))
    out = tmp_path / "out"
    out.mkdir()
    records = {r.format: r for r in export_all(result, ["packed", "hf"], out)}
    assert records["packed"].bytes_on_disk < records["hf"].bytes_on_disk
    restored = load_packed(out / "model.packed.safetensors", base=str(folder))
    want = dict(result.compressed.module.named_parameters())
    for name, p in restored.module.named_parameters():
        torch.testing.assert_close(p, want[name])
    data = load_data(hf_models.write_txt(tmp_path / "s.txt", 8), loaded)
    with pytest.raises((CompressionError, WorkbenchError), match="forward|weights-only"):
        evaluate(loaded, data, latency=False)


@pytest.mark.parametrize(
    ("change", "what"),
    [({"image_size": 4000}, "pixels"), ({"image_size": [1, 1 << 40]}, "pixels")],
)
def test_a_crafted_image_size_is_refused_before_the_model_runs(tmp_path, change, what):
    """The folder runs once on example images shaped by config.json: a crafted size (on a
    convolutional model, whose weights do not depend on it) is refused in one line instead
    of a forward pass over gigabytes."""
    import json

    import transformers

    folder = tmp_path / "resnet"
    torch.manual_seed(0)
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3
    )
    transformers.ResNetForImageClassification(config).save_pretrained(str(folder))
    assert tuple(load_model(folder).example_input.shape) == (2, 3, 224, 224)
    data = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**data, **change}))
    with pytest.raises(ModelLoadError, match=what):
        load_model(folder)
