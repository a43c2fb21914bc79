"""The compression report: ``report.json`` (machine-readable) and ``report.html`` (one file).

The HTML page is self-contained: inline CSS, and per-layer before/after weight histograms drawn
as inline SVG from the tensors themselves (no plotting library, no external assets), so it can
be mailed or archived next to the model.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.base.memory import MappedPages
from core.base.outdir import atomic_write

#: Histogram bins per layer in the HTML report.
HIST_BINS = 48
#: Layers that get a histogram in the HTML page (the largest ones): a page with 10**5 plots
#: is neither readable nor quick to write.
HTML_HISTOGRAMS = 64


def _finite(value: Any) -> Any:
    """JSON-safe: non-finite floats become None (recursively)."""
    t = type(value)
    if t is float:
        return value if math.isfinite(value) else None
    if t is str or t is int or t is bool or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


#: Above this many entries a list is written one entry per line, each entry compact: the
#: indenting encoder is pure Python (seconds for a report of 10**5 layers).
_COMPACT_LIST = 200


def dumps(data: Any) -> str:
    """``report.json`` text: indented, with long lists (per-layer tables) one entry a line."""

    def long(v: Any) -> bool:
        return isinstance(v, list) and len(v) > _COMPACT_LIST

    if not isinstance(data, dict) or not any(long(v) for v in data.values()):
        return json.dumps(data, indent=2, allow_nan=False) + "\n"
    parts = []
    for k, v in data.items():
        key = json.dumps(str(k))
        if long(v):
            body = ",\n".join("    " + json.dumps(x, allow_nan=False) for x in v)
            parts.append(f"  {key}: [\n{body}\n  ]")
        else:
            inner = json.dumps(v, indent=2, allow_nan=False).replace("\n", "\n  ")
            parts.append(f"  {key}: {inner}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def fp32_bytes(module: torch.nn.Module) -> int:
    """Bytes of every floating-point parameter stored as float32 (the uncompressed baseline)."""
    return sum(4 * p.numel() for p in module.parameters() if p.dtype.is_floating_point)


def stored_bytes(module: torch.nn.Module) -> int:
    """Bytes of the same parameters as `fp32_bytes` at their own dtype (what the original
    model takes as stored: half of the fp32 figure for a bfloat16/float16 checkpoint)."""
    return sum(
        p.numel() * p.element_size() for p in module.parameters() if p.dtype.is_floating_point
    )


def _eval_dict(ev: Any) -> dict[str, Any] | None:
    if ev is None:
        return None
    return ev.to_dict() if hasattr(ev, "to_dict") else dict(ev)


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = dict(module.named_buffers())
    out.update(dict(module.named_parameters()))
    return out


def report_data(
    result: Any,
    *,
    evals: Mapping[str, Any] | None = None,
    exports: Sequence[Any] = (),
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything ``report.json`` holds, as a JSON-ready dict.

    ``extra``: further top-level blocks (``warnings``, ``device``, ``cost``), added as given.
    """
    evals = dict(evals or {})
    before, after = _eval_dict(evals.get("before")), _eval_dict(evals.get("after"))
    original = fp32_bytes(result.original.module)
    stored = stored_bytes(result.original.module)
    packed = [e for e in exports if e.format == "packed"]
    estimate = sum(r.packed_bytes for r in result.layers)
    compressed = packed[0].bytes_on_disk if packed else None
    return _finite(
        {
            "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": str(result.original.source),
            "model_format": result.original.format,
            "original_bytes": original,
            "compressed_bytes": compressed,
            "compression_ratio": original / compressed if compressed else None,
            # The original's parameters at their own dtype (bfloat16 checkpoints: half of
            # original_bytes), and the ratio against that: what the user's file shrinks by.
            "stored_bytes": stored,
            "compression_ratio_vs_stored": stored / compressed if compressed else None,
            "layers_packed_bytes": estimate,
            "sparsity": result.sparsity,
            "accuracy_before": before.get("accuracy") if before else None,
            "accuracy_after": after.get("accuracy") if after else None,
            "fidelity": {
                "data": evals.get("data"),
                "agreement": after.get("agreement") if after else None,
                "rel_l2": after.get("rel_l2") if after else None,
                "cosine": after.get("cosine") if after else None,
                # Hugging Face folders: what the fidelity numbers measure, and causal LMs'
                # perplexity (before/after) and next-token agreement.
                "metric": after.get("fidelity_metric") if after else None,
                "perplexity_before": before.get("perplexity") if before else None,
                "perplexity_after": after.get("perplexity") if after else None,
                "next_token_agreement": after.get("next_token_agreement") if after else None,
                "latency_ms_before": before.get("latency_ms_per_batch") if before else None,
                "latency_ms_after": after.get("latency_ms_per_batch") if after else None,
            },
            "evaluation": {"before": before, "after": after},
            "exports": [e.to_dict() for e in exports],
            "layers": [r.to_dict() for r in result.layers],
            "removed_channels": {k: list(v) for k, v in result.removed_channels.items()},
            "recipe": result.plan.to_dict(),
            **dict(extra or {}),
        }
    )


# ---------------------------------------------------------------------------------------
# SVG histograms
# ---------------------------------------------------------------------------------------
#: Tensors above this many elements are histogrammed in chunks (`_histogram_pair_chunked`).
_PAIR_CHUNK = 1 << 22
#: Elements per chunk of `_histogram_pair_chunked` (float64 and sort temporaries ~8 MB each).
_PAIR_STEP = 1 << 20


def _histogram_pair_chunked(
    before: torch.Tensor, after: torch.Tensor, mask: torch.Tensor | None, bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`histogram_pair` in chunks of `_PAIR_STEP` elements (the same edges and counts: min/max
    and binning are per element), with a few tens of MB of float64 temporaries instead of
    about eight copies of a 10**8-weight tensor."""
    b_flat = before.detach().reshape(-1)
    a_flat = after.detach().reshape(-1)
    m_flat = mask.reshape(-1) if (mask is not None and mask.shape == after.shape) else None
    pages = MappedPages()  # the original's pages of a mapped file, given back chunk by chunk

    def b_chunks():
        for s in range(0, b_flat.numel(), _PAIR_STEP):
            raw = b_flat[s : s + _PAIR_STEP]
            c = raw.double().numpy()
            pages.release(raw)
            yield c[np.isfinite(c)]

    def a_chunks():
        for s in range(0, a_flat.numel(), _PAIR_STEP):
            c = a_flat[s : s + _PAIR_STEP].double()
            c = c[m_flat[s : s + _PAIR_STEP]] if m_flat is not None else c[c != 0]
            c = c.numpy()
            yield c[np.isfinite(c)]

    lo, hi = math.inf, -math.inf
    for chunks in (b_chunks, a_chunks):
        for c in chunks():
            if c.size:
                lo, hi = min(lo, float(c.min())), max(hi, float(c.max()))
    if lo > hi:  # no finite value at all: the range of np.zeros(1)
        lo = hi = 0.0
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    hb = sum((np.histogram(c, edges)[0] for c in b_chunks()), np.zeros(bins, dtype=np.int64))
    ha = sum((np.histogram(c, edges)[0] for c in a_chunks()), np.zeros(bins, dtype=np.int64))
    return edges, hb, ha


def histogram_pair(
    before: torch.Tensor, after: torch.Tensor, mask: torch.Tensor | None, bins: int = HIST_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shared-edge histograms of the original weights and the kept compressed weights."""
    if max(before.numel(), after.numel()) > _PAIR_CHUNK:
        return _histogram_pair_chunked(before, after, mask, bins)
    b = before.detach().double().reshape(-1).numpy()
    a = after.detach().double().reshape(-1)
    if mask is not None and mask.shape == after.shape:
        a = a[mask.reshape(-1)]
    else:
        a = a[a != 0]
    a = a.numpy()
    b, a = b[np.isfinite(b)], a[np.isfinite(a)]
    both = np.concatenate([b, a]) if (b.size or a.size) else np.zeros(1)
    lo, hi = float(both.min()), float(both.max())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    return edges, np.histogram(b, edges)[0], np.histogram(a, edges)[0]


def svg_histogram(edges: np.ndarray, before: np.ndarray, after: np.ndarray) -> str:
    """Two overlaid bar histograms (before grey, after blue) with a sqrt count scale."""
    w, h, pad = 320, 110, 14
    top = float(max(before.max(initial=0), after.max(initial=0), 1))
    bw = (w - 2 * pad) / len(before)

    def bars(counts: np.ndarray, cls: str) -> str:
        out = []
        for i, c in enumerate(counts):
            if c <= 0:
                continue
            bh = (h - 2 * pad) * math.sqrt(c / top)
            x = pad + i * bw
            out.append(
                f'<rect class="{cls}" x="{x:.1f}" y="{h - pad - bh:.1f}" '
                f'width="{max(bw - 0.6, 0.6):.1f}" height="{bh:.1f}"><title>'
                f"[{edges[i]:.3g}, {edges[i + 1]:.3g}): {int(c)}</title></rect>"
            )
        return "".join(out)

    zero = ""
    if edges[0] < 0 < edges[-1]:
        zx = pad + (0 - edges[0]) / (edges[-1] - edges[0]) * (w - 2 * pad)
        zero = f'<line class="zero" x1="{zx:.1f}" x2="{zx:.1f}" y1="{pad}" y2="{h - pad}"/>'
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" '
        f'height="{h}" role="img">{bars(before, "b")}{bars(after, "a")}{zero}'
        f'<text x="{pad}" y="{h - 2}">{edges[0]:.3g}</text>'
        f'<text x="{w - pad}" y="{h - 2}" text-anchor="end">{edges[-1]:.3g}</text></svg>'
    )


# ---------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------
_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;
color:#1d232a;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;margin-top:1.8em;border-bottom:1px solid #dde}
.cards{display:flex;gap:1em;flex-wrap:wrap}.card{background:#f3f6fa;border-radius:8px;padding:.7em 1em}
.card b{display:block;font-size:1.35em}table{border-collapse:collapse;width:100%;margin:.5em 0}
th,td{padding:.3em .6em;border-bottom:1px solid #e4e7ec;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}td.note{text-align:left;white-space:normal;color:#555}
.hists{display:flex;flex-wrap:wrap;gap:1em}.hist{border:1px solid #e4e7ec;border-radius:6px;padding:.4em}
.hist h3{font-size:.95em;margin:.1em 0}rect.b{fill:#9aa4b1;opacity:.75}rect.a{fill:#2f6fd6;opacity:.8}
line.zero{stroke:#d33;stroke-width:1}svg text{font-size:9px;fill:#666}
.legend span{display:inline-block;width:.9em;height:.9em;margin:0 .3em 0 1em;vertical-align:middle}
.muted{color:#666}
"""


def _fmt(value: Any, spec: str = "", none: str = "–") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return none
    return format(value, spec) if spec else str(value)


def _pct(value: Any) -> str:
    return _fmt(None if value is None else 100 * value, ".2f", "–") + (
        "%" if value is not None else ""
    )


def _row(cells: Sequence[str], cls: Sequence[str] | None = None) -> str:
    tds = []
    for i, c in enumerate(cells):
        klass = f' class="{cls[i]}"' if cls and cls[i] else ""
        tds.append(f"<td{klass}>{c}</td>")
    return "<tr>" + "".join(tds) + "</tr>"


def _deployed_cell(dep: Mapping[str, Any] | None) -> str:
    """The deployed check of one export: accuracy (or agreement), latency median [p10-p90]."""
    if not dep:
        return "–"
    acc = dep.get("accuracy")
    head = f"acc {_pct(acc)}" if acc is not None else f"agree {_pct(dep.get('agreement'))}"
    lats = [
        f"{html.escape(k.replace('batch_', 'b'))}: {v['median']:.3f} "
        f"[{v['p10']:.3f}–{v['p90']:.3f}] ms"
        for k, v in (dep.get("latency_ms") or {}).items()
    ]
    flag = " <b>MISMATCH</b>" if dep.get("deployed_mismatch") else ""
    return "<br>".join([head + flag, *lats])


def _html_exports(parts: list[str], data: Mapping[str, Any]) -> None:
    """Sizes, fidelity and latency of each exported file."""
    e = html.escape
    parts.append("<h2>Exports</h2>")
    if data["exports"]:
        parts.append(
            "<table><tr><th>format</th><th>file</th><th>bytes</th><th>vs fp32</th>"
            "<th>max |Δ| vs PyTorch</th><th>latency (ms/batch)</th><th>deployed</th>"
            "<th>note</th></tr>"
        )
        for ex in data["exports"]:
            ratio = data["original_bytes"] / ex["bytes_on_disk"] if ex["bytes_on_disk"] else None
            parts.append(
                _row(
                    [
                        e(ex["format"]),
                        e(Path(ex["path"]).name),
                        f"{ex['bytes_on_disk']:,}",
                        _fmt(ratio, ".1f") + "×",
                        _fmt(ex["max_abs_diff"], ".2e"),
                        _fmt(ex["latency_ms"], ".3f")
                        + (
                            f" <span class='muted'>(batch {ex['batch']})</span>"
                            if ex.get("batch")
                            else ""
                        ),
                        _deployed_cell(ex.get("deployed")),
                        e(ex.get("note") or ""),
                    ],
                    ["", "", "", "", "", "", "", "note"],
                )
            )
        parts.append("</table>")
    else:
        parts.append("<p class='muted'>No exports were written.</p>")


def _html_accuracy(parts: list[str], data: Mapping[str, Any]) -> None:
    """Accuracy and output fidelity, before and after."""
    e = html.escape
    parts.append("<h2>Accuracy and fidelity</h2>")
    ev = data["evaluation"]
    if ev.get("before") or ev.get("after"):
        fid = data["fidelity"]
        parts.append(
            "<table><tr><th>measure</th><th>original</th><th>compressed</th></tr>"
            + _row(["data", e(str(fid["data"])), e(str(fid["data"]))])
            + _row(["accuracy", _pct(data["accuracy_before"]), _pct(data["accuracy_after"])])
            + _row(["top-1 agreement with original", "100.00%", _pct(fid["agreement"])])
            + _row(["relative L2 error of outputs", "0", _fmt(fid["rel_l2"], ".3e")])
            + _row(["cosine similarity of outputs", "1", _fmt(fid["cosine"], ".5f")])
            + (
                _row(["fidelity measured as", e(str(fid["metric"])), e(str(fid["metric"]))])
                if fid.get("metric")
                else ""
            )
            + (
                _row(
                    [
                        "perplexity",
                        _fmt(fid["perplexity_before"], ".4g"),
                        _fmt(fid["perplexity_after"], ".4g"),
                    ]
                )
                + _row(["next-token agreement", "100.00%", _pct(fid["next_token_agreement"])])
                if fid.get("perplexity_after") is not None
                else ""
            )
            + _row(
                [
                    "PyTorch latency (ms/batch)",
                    _fmt(fid["latency_ms_before"], ".3f"),
                    _fmt(fid["latency_ms_after"], ".3f"),
                ]
            )
            + "</table>"
        )
    else:
        parts.append("<p class='muted'>Not evaluated (no data or no forward pass).</p>")


def _html_layers(parts: list[str], data: Mapping[str, Any]) -> None:
    """The per-layer table."""
    e = html.escape
    parts.append(
        "<h2>Layers</h2><table><tr><th>layer</th><th>type</th><th>shape</th><th>method</th>"
        "<th>sparsity</th><th>nnz</th><th>bits</th><th>SQNR dB</th><th>fp32 B</th>"
        "<th>packed B</th></tr>"
    )
    for layer in data["layers"]:
        bits = layer["bits"]
        qdesc = (
            f"{bits} {'sym' if layer['symmetric'] else 'asym'}"
            f"{' /ch' if layer['per_channel'] else ''}"
            if bits
            else "fp32"
        )
        parts.append(
            _row(
                [
                    e(layer["name"]),
                    e(layer["type"]),
                    "×".join(str(s) for s in layer["shape"]),
                    e(layer["method"]) + (" (skipped)" if layer.get("skipped") else ""),
                    _pct(layer["sparsity"]),
                    f"{layer['nnz']:,}",
                    qdesc,
                    _fmt(layer["sqnr_db"], ".1f", "∞"),
                    f"{layer['dense_bytes']:,}",
                    f"{layer['packed_bytes']:,}",
                ]
            )
        )
    parts.append("</table>")


def _html_histograms(parts: list[str], result: Any) -> None:
    """Weight histograms of the largest `HTML_HISTOGRAMS` layers (original and kept)."""
    e = html.escape
    parts.append(
        "<h2>Weight histograms</h2><p class='legend muted'>count on a square-root scale"
        "<span style='background:#9aa4b1'></span>original"
        "<span style='background:#2f6fd6'></span>kept after compression</p><div class='hists'>"
    )
    before_t = _tensors(result.original.module)
    after_t = _tensors(result.compressed.module)
    shown = result.layers
    if len(shown) > HTML_HISTOGRAMS:
        largest = sorted(range(len(shown)), key=lambda i: -shown[i].original_numel)
        keep = set(largest[:HTML_HISTOGRAMS])
        shown = [r for i, r in enumerate(shown) if i in keep]
        parts.append(
            f"<p class='muted'>the {HTML_HISTOGRAMS} largest of {len(result.layers):,} layers</p>"
        )
    for layer in shown:
        if layer.tensor not in before_t or layer.tensor not in after_t:
            continue
        edges, hb, ha = histogram_pair(
            before_t[layer.tensor], after_t[layer.tensor], result.masks.get(layer.tensor)
        )
        parts.append(
            f"<div class='hist'><h3>{e(layer.name)} <span class='muted'>"
            f"{_pct(layer.sparsity)} pruned</span></h3>{svg_histogram(edges, hb, ha)}</div>"
        )
    parts.append("</div>")


def stored_narrower(data: Mapping[str, Any]) -> bool:
    """Whether a report's original is stored narrower than fp32 (a bfloat16/float16
    checkpoint): its size as stored is then shown beside the fp32 one."""
    stored = data.get("stored_bytes")
    return bool(stored) and stored < data["original_bytes"]


def _stored_card(data: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [("size as stored", f"{data['stored_bytes']:,} B")] if stored_narrower(data) else []


def _vs_stored(data: Mapping[str, Any]) -> str:
    ratio = data.get("compression_ratio_vs_stored")
    return f" ({_fmt(ratio, '.1f')}× vs stored)" if stored_narrower(data) and ratio else ""


def render_html(result: Any, data: Mapping[str, Any]) -> str:
    """The report page for ``result`` and its `report_data`."""
    e = html.escape
    orig_bytes = data["original_bytes"]
    cards = [
        ("model", e(str(data["model"]))),
        ("fp32 size", f"{orig_bytes:,} B"),
        *_stored_card(data),
        ("packed size", f"{data['compressed_bytes']:,} B" if data["compressed_bytes"] else "–"),
        ("compression", _fmt(data["compression_ratio"], ".1f") + "×" + _vs_stored(data)),
        ("sparsity", _pct(data["sparsity"])),
        ("accuracy", f"{_pct(data['accuracy_before'])} → {_pct(data['accuracy_after'])}"),
    ]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>Compression report – {e(str(data['model']))}</title><style>{_CSS}</style></head><body>",
        f"<h1>Compression report</h1><p class='muted'>{e(data['generated'])} · source format "
        f"{e(str(data['model_format']))}</p>",
        "<div class='cards'>"
        + "".join(f"<div class='card'>{k}<b>{v}</b></div>" for k, v in cards)
        + "</div>",
    ]
    _html_exports(parts, data)
    _html_accuracy(parts, data)
    _html_layers(parts, data)
    _html_histograms(parts, result)
    parts.append(
        "<h2>Recipe</h2><pre>" + e(json.dumps(data["recipe"], indent=2)) + "</pre></body></html>"
    )
    return "".join(parts)


def write_report(
    result: Any,
    out_dir: str | Path,
    *,
    evals: Mapping[str, Any] | None = None,
    exports: Sequence[Any] = (),
    force: bool = True,
    extra: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.html`` into ``out_dir`` (atomically).

    Parameters
    ----------
    result
        The `core.compress.engine.CompressionResult`.
    evals
        ``{"before": EvalResult | None, "after": EvalResult | None, "data": name}``.
    exports
        The `core.export.formats.ExportRecord`s written for this result.
    force
        Replace existing report files (the CLI checks ``--force`` before it gets here).
    extra
        Further top-level blocks of ``report.json`` (see `report_data`).

    Returns
    -------
    (Path, Path)
        The JSON and HTML paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = report_data(result, evals=evals, exports=exports, extra=extra)
    json_path, html_path = out / "report.json", out / "report.html"
    text = dumps(data)
    atomic_write(json_path, [text.encode("utf-8")], force=force)
    atomic_write(html_path, [render_html(result, data).encode("utf-8")], force=force)
    return json_path, html_path


def update_report(result: Any, out_dir: str | Path, exports: Sequence[Any]) -> Path | None:
    """Merge re-exports into an existing ``report.json``/``report.html`` (``workbench export``).

    Entries of the same format are replaced, others kept; the evaluation and the per-layer
    table stay as `write_report` measured them. When the packed archive is re-written the
    compressed size and ratio follow it. Returns the JSON path, or ``None`` when ``out_dir``
    has no report to update (a re-export into another folder).
    """
    json_path = Path(out_dir) / "report.json"
    if not json_path.is_file():
        return None
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    new = {e.format: e.to_dict() for e in exports}
    kept = [e for e in data.get("exports", []) if e.get("format") not in new]
    data["exports"] = kept + list(new.values())
    packed = new.get("packed")
    if packed is not None and data.get("original_bytes"):
        data["compressed_bytes"] = packed["bytes_on_disk"]
        data["compression_ratio"] = data["original_bytes"] / packed["bytes_on_disk"]
        if data.get("stored_bytes"):
            data["compression_ratio_vs_stored"] = data["stored_bytes"] / packed["bytes_on_disk"]
    data = _finite(data)
    text = dumps(data)
    atomic_write(json_path, [text.encode("utf-8")], force=True)
    atomic_write(
        json_path.with_name("report.html"),
        [render_html(result, data).encode("utf-8")],
        force=True,
    )
    return json_path
