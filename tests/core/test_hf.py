"""Hugging Face model folders (core/io/hf.py) and text data (core/io/text_data.py).

Tiny random BERT encoder, GPT-2 causal LM and BERT sequence classifier are built with
transformers' own config classes and saved with ``save_pretrained``; each goes through
open -> text data -> analyze -> (scan) -> compress -> evaluate -> export (packed, hf, onnx)
-> reload, and every reload is compared with the compressed model's outputs.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from core.analysis.inventory import inventory  # noqa: E402
from core.analysis.stats import analyze  # noqa: E402
from core.base.errors import DataError, ModelLoadError  # noqa: E402
from core.compress.engine import compress  # noqa: E402
from core.evaluate import evaluate  # noqa: E402
from core.export.formats import export_all  # noqa: E402
from core.io.data import load_data  # noqa: E402
from core.io.hf import HFForward, read_pooling  # noqa: E402
from core.io.model_io import (  # noqa: E402
    clone_model,
    load_model,
    load_packed,  # noqa: E402
)
from core.recipe.plan import simple_plan  # noqa: E402
from tests import hf_models  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for kind in hf_models.KINDS:
        hf_models.build_folder(kind, root / kind)
        out[kind] = root / kind
    hf_models.build_folder("encoder", root / "st", seed=1, sentence_transformers=True)
    out["st"] = root / "st"
    out["txt"] = hf_models.write_txt(root / "s.txt", 40)
    out["jsonl"] = hf_models.write_jsonl(root / "l.jsonl", 40)
    out["pairs"] = hf_models.write_jsonl(root / "p.jsonl", 12, seed=3, pairs=True)
    return out


def _reference(folder, cls_name):
    import transformers

    return getattr(transformers, cls_name).from_pretrained(str(folder)).eval()


def test_folder_opens_with_checkpoint_names_and_matches_transformers(folders):
    from safetensors import safe_open

    for kind, cls_name in (
        ("encoder", "BertModel"),
        ("causal_lm", "GPT2LMHeadModel"),
        ("classifier", "BertForSequenceClassification"),
    ):
        loaded = load_model(folders[kind])
        info = loaded.metadata["hf"]
        assert (loaded.format, info["kind"], info["architecture"]) == ("hf", kind, cls_name)
        assert loaded.can_run and info["tokenizer"] and isinstance(loaded.module, HFForward)
        with safe_open(str(folders[kind] / "model.safetensors"), "pt") as fh:
            keys = set(fh.keys())
        names = {n for n, _ in loaded.module.named_parameters()}
        # Every parameter is a checkpoint key (GPT-2's lm_head is tied to wte: not listed twice).
        assert names <= keys and len(names) >= len(keys) - 1
        assert set(loaded.module.state_dict()) >= names
        data = load_data(folders["txt"], loaded)
        x = data.x[:5]
        ref = _reference(folders[kind], cls_name)
        with torch.no_grad():
            got = loaded.module(x)
            kwargs = {"input_ids": x[:, 0], "attention_mask": x[:, 1]}
            if x.shape[1] == 3:
                kwargs["token_type_ids"] = x[:, 2]
            out = ref(**kwargs)
        if kind == "encoder":
            m = x[:, 1].unsqueeze(-1).float()
            want = (out.last_hidden_state * m).sum(1) / m.sum(1)
            assert got.shape == (5, 32)
        else:
            want = out.logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        rows = {row.name: row for row in inventory(loaded)}
        assert all(r.tensor in names for r in rows.values() if r.tensor is not None)
    gpt2_rows = {r.name: r for r in inventory(load_model(folders["causal_lm"]))}
    assert gpt2_rows["transformer.h.0.attn.c_attn"].type == "Conv1D"
    assert gpt2_rows["transformer.h.0.attn.c_attn"].prunable


def test_clone_keeps_names_and_does_not_share(folders):
    loaded = load_model(folders["classifier"])
    copy = clone_model(loaded)
    name = "classifier.weight"
    with torch.no_grad():
        dict(copy.module.named_parameters())[name].zero_()
    assert float(dict(loaded.module.named_parameters())[name].detach().abs().sum()) > 0
    assert float(copy.module.hf.classifier.weight.detach().abs().sum()) == 0.0


def test_text_data_tokenized_with_mask_pairs_and_labels(folders):
    enc = load_model(folders["encoder"])
    txt = load_data(folders["txt"], enc)
    lines = folders["txt"].read_text().splitlines()
    assert txt.x.dtype == torch.int64 and txt.x.shape[:2] == (len(lines), 3) and txt.y is None
    # Mask length = words + [CLS] + [SEP]; padding to the longest text.
    lengths = txt.x[:, 1].sum(dim=1)
    assert lengths.tolist() == [len(t.split()) + 2 for t in lines]
    assert int(txt.x.shape[2]) == int(lengths.max())
    labelled = load_data(folders["jsonl"], enc)
    recs = [json.loads(line) for line in folders["jsonl"].read_text().splitlines()]
    assert labelled.y.tolist() == [r["label"] for r in recs]
    pairs = load_data(folders["pairs"], enc)
    assert int(pairs.x[:, 2].max()) == 1  # the second segment has token type 1
    gpt = load_data(folders["txt"], load_model(folders["causal_lm"]))
    assert gpt.x.shape[1] == 2  # no token-type channel for GPT-2


def test_text_data_errors(folders, tmp_path):
    enc = load_model(folders["encoder"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the cat"}\n{"txt": "x"}\n')
    with pytest.raises(DataError, match="line 2 has no string field 'text'"):
        load_data(bad, enc)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"text": "the cat", "label": 1}\n{"text": "a dog"}\n')
    with pytest.raises(DataError, match="some records have a 'label'"):
        load_data(mixed, enc)
    neg = tmp_path / "neg.jsonl"
    neg.write_text('{"text": "the cat", "label": -1}\n')
    with pytest.raises(DataError, match="non-negative integer"):
        load_data(neg, enc)
    with pytest.raises(DataError, match="needs a model's tokenizer"):
        load_data(folders["txt"])
    with pytest.raises(DataError, match="Hugging Face folder"):
        load_data(folders["txt"], load_model("demo:mlp"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no texts"):
        load_data(empty, enc)


def test_sentence_transformers_pooling(folders):
    mode, normalize, where = read_pooling(folders["st"])
    assert (mode, normalize) == ("mean", True) and "1_Pooling" in where
    loaded = load_model(folders["st"])
    emb = loaded.module(load_data(folders["txt"], loaded).x[:6])
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(6))
    cls_cfg = folders["st"] / "1_Pooling" / "config.json"
    saved = cls_cfg.read_text()
    try:
        cls_cfg.write_text(json.dumps({"pooling_mode_cls_token": True}))
        assert read_pooling(folders["st"])[0] == "cls"
        cls_cfg.write_text(json.dumps({"pooling_mode_weightedmean_tokens": True}))
        with pytest.raises(ModelLoadError, match="no mode"):
            read_pooling(folders["st"])
    finally:
        cls_cfg.write_text(saved)


def test_refusals(folders, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(plain)
    cfg_only = tmp_path / "cfg"
    cfg_only.mkdir()
    (cfg_only / "config.json").write_text((folders["encoder"] / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="no PyTorch weights"):
        load_model(cfg_only)
    custom = tmp_path / "custom"
    hf_models.build_folder("encoder", custom)
    cfg = json.loads((custom / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "modeling_x.XModel"}
    (custom / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="--trust"):
        load_model(custom)
    cfg["auto_map"] = {"AutoModel": "someone/repo--modeling_x.XModel"}
    (custom / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="never downloads"):
        load_model(custom, trust=True)
    with pytest.raises(ModelLoadError, match="own architecture"):
        load_model(folders["encoder"], architecture="demo:mlp")


def test_pytorch_model_bin_folder(folders, tmp_path):
    from safetensors.torch import load_file

    folder = tmp_path / "bin"
    folder.mkdir()
    for f in folders["classifier"].iterdir():
        if f.name != "model.safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    torch.save(
        load_file(str(folders["classifier"] / "model.safetensors")), folder / "pytorch_model.bin"
    )
    a, b = load_model(folder), load_model(folders["classifier"])
    assert a.metadata["hf"]["weights"] == ["pytorch_model.bin"]
    x = b.example_input
    torch.testing.assert_close(a.module(x), b.module(x))


@pytest.mark.parametrize("kind", hf_models.KINDS)
def test_compress_evaluate_export_reload(folders, kind, tmp_path):
    loaded = load_model(folders[kind])
    data = load_data(folders["jsonl" if kind == "classifier" else "txt"], loaded)
    stats = analyze(loaded, data if data.y is not None else None)
    result = compress(loaded, simple_plan(0.5, 8), stats)
    ev = evaluate(result.compressed, data, reference=loaded, latency=False)
    before = evaluate(loaded, data, latency=False)
    assert ev.fidelity_metric == loaded.metadata["hf"]["fidelity"]
    assert 0.0 < ev.cosine <= 1.0 + 1e-9 and ev.rel_l2 > 0.0
    if kind == "causal_lm":
        assert math.isfinite(before.perplexity) and math.isfinite(ev.perplexity)
        assert ev.perplexity != before.perplexity and 0.0 <= ev.next_token_agreement <= 1.0
        # A random model's perplexity is near the vocabulary size, far from 1.
        assert 1.0 < before.perplexity < 4 * hf_models.vocab_size()
    else:
        assert ev.perplexity is None and ev.next_token_agreement is None
    if kind == "classifier":
        assert ev.classifier and 0.0 <= ev.accuracy <= 1.0 and 0.0 <= ev.agreement <= 1.0
    records = {
        r.format: r for r in export_all(result, ["packed", "hf", "onnx"], tmp_path, data=data)
    }
    assert records["packed"].max_abs_diff == 0.0
    assert records["hf"].max_abs_diff == 0.0
    assert records["onnx"].max_abs_diff < 1e-4
    x = data.x[:6]
    with torch.no_grad():
        want = result.compressed.module(x)
        restored = load_packed(tmp_path / "model.packed.safetensors", base=str(folders[kind]))
        torch.testing.assert_close(restored.module(x), want)
        assert restored.metadata["hf"]["kind"] == kind
        reopened = load_model(tmp_path / "hf_model")
        torch.testing.assert_close(reopened.module(x), want, rtol=0, atol=0)
    hf_dir = tmp_path / "hf_model"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in hf_dir.iterdir()
    }
    # Pruned zeros are in the written weights, as transformers itself reads them.
    from safetensors.torch import load_file

    written = load_file(str(hf_dir / "model.safetensors"))
    prunable = [r.tensor for r in inventory(loaded) if r.prunable and r.tensor in written]
    zeros = sum(int((written[t] == 0).sum()) for t in prunable)
    total = sum(written[t].numel() for t in prunable)
    assert zeros / total >= 0.5 - 1e-3
    assert records["hf"].bytes_on_disk == sum(p.stat().st_size for p in hf_dir.iterdir())


def test_hf_export_refused_for_other_models(tmp_path):
    from core.base.errors import ExportError
    from core.export.formats import check_formats

    with pytest.raises(ExportError, match="Hugging Face folder"):
        check_formats(load_model("demo:mlp"), ["hf"])


def test_scan_on_text_data(folders):
    from core.planning.sensitivity import Level, scan

    loaded = load_model(folders["classifier"])
    data = load_data(folders["jsonl"], loaded)
    stats = analyze(loaded, data)
    levels = (Level(0.0, None), Level(0.5, None), Level(0.9, None))
    result = scan(loaded, stats, data, levels=levels, max_samples=16, cache=False)
    curve = result.layer("bert.encoder.layer.0.attention.self.query")
    assert [p.level.sparsity for p in curve.points] == [0.0, 0.5, 0.9]
    assert curve.points[0].cos_loss == pytest.approx(0.0, abs=1e-9)
    assert curve.points[-1].cos_loss > 0.0
