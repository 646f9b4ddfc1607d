"""`mimkit report RUN_DIR`: one self-contained HTML page about a run.

Sections: summary, training curves (loss, val_loss, lr from metrics.csv), reconstructions over training
(recon/step_*.png, else reconstruction.png), attention maps (class-token attention of the last layers over a
few images), probe results (every eval/*.json and results.json's kNN figures), analysis plots (attention
distance, entropy, Fourier high-frequency amplitude, feature spectrum and effective rank; see
`mimkit.eval.analysis`) and the configuration. Every picture is embedded as a data URI (PNG, or SVG for
charts); the page loads nothing from anywhere else.

Attention maps and analysis need the checkpoint and the run's images (the data section of its config,
which `data.*` overrides can redirect); when either is missing the page says why and shows the rest.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import time
from html import escape
from pathlib import Path

from mimkit.viz.plots import line_chart_svg

SECTIONS = {
    "summary": "Summary",
    "training": "Training curves",
    "reconstructions": "Reconstructions over training",
    "attention": "Attention maps",
    "probes": "Probe results",
    "analysis": "Analysis",
    "config": "Configuration",
}

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1200px;color:#222;
padding:0 16px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
nav a{margin-right:12px} .muted{color:#777} .note{color:#8a5a00;background:#fff7e6;padding:6px 10px;border-radius:4px}
.figs{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start} figure{margin:0}
figcaption{font-size:12px;color:#555;max-width:560px} img{max-width:100%;height:auto;border:1px solid #eee}
table{border-collapse:collapse;font-size:13px} th,td{border:1px solid #ddd;padding:4px 8px;text-align:left}
th{background:#f5f5f5} td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f7f7f7;padding:10px;overflow:auto;font-size:12px}
"""


# ----------------------------------------------------------------------------------------------------------
# embedding


def png_data_uri(image) -> str:
    """A PIL image or PNG bytes/path as a data:image/png;base64 URI."""
    if isinstance(image, (str, Path)):
        raw = Path(image).read_bytes()
    elif isinstance(image, (bytes, bytearray)):
        raw = bytes(image)
    else:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        raw = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(raw).decode("ascii")


def svg_data_uri(svg: str) -> str:
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode("utf-8")).decode("ascii")


def _figure(uri: str, caption: str = "", alt: str = "") -> str:
    cap = f"<figcaption>{escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{uri}" alt="{escape(alt or caption)}">{cap}</figure>'


def _chart(svg: str, caption: str = "", alt: str = "") -> str:
    return _figure(svg_data_uri(svg), caption, alt)


def _note(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'


# ----------------------------------------------------------------------------------------------------------
# sections


def _read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    from mimkit.engine.metrics import read_metrics

    try:
        return read_metrics(path)
    except (ValueError, KeyError):
        return []


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if key in r and "step" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def _training_section(run_dir: Path) -> str:
    rows = _read_metrics(run_dir)
    if not rows:
        return _note("no metrics.csv in the run folder")
    out = []
    xs, ys = _series(rows, "loss")
    vx, vy = _series(rows, "val_loss")
    loss = [{"x": xs, "y": ys, "label": "train loss"}]
    if vx:
        loss.append({"x": vx, "y": vy, "label": "val loss (fixed masks)", "markers": True})
    out.append(_chart(line_chart_svg(loss, "Loss", "optimizer step", "loss"),
                      "training loss (mean over each logging window) and held-out validation loss", "loss curve"))
    lx, ly = _series(rows, "lr")
    if lx:
        out.append(_chart(line_chart_svg([{"x": lx, "y": ly, "label": "lr"}], "Learning rate", "optimizer step", "lr"),
                          "learning rate schedule", "lr curve"))
    probe = [{"x": _series(rows, k)[0], "y": [100 * v for v in _series(rows, k)[1]], "label": label, "markers": True}
             for k, label in (("online_linear", "linear probe"), ("online_knn", "kNN")) if any(k in r for r in rows)]
    if probe:
        out.append(_chart(line_chart_svg(probe, "Online probe", "optimizer step", "top-1 %"),
                          "online probe on fixed held-out images (eval.online_probe_every_steps)", "online probe"))
    extra = [k for k in ("grad_norm", "images_per_s") if any(k in r for r in rows)]
    for k in extra:
        ex, ey = _series(rows, k)
        out.append(_chart(line_chart_svg([{"x": ex, "y": ey, "label": k}], k, "optimizer step", k), k, k))
    last = rows[-1]
    summary = ", ".join(f"{k} {last[k]:.4g}" for k in ("loss", "lr") if k in last)
    return f'<div class="figs">{"".join(out)}</div><p class="muted">{len(rows)} logged rows; last: step ' \
           f'{last.get("step", "?")}{", " + escape(summary) if summary else ""}</p>'


def _recon_step(path: Path) -> int:
    m = re.search(r"(\d+)", path.stem)
    return int(m.group(1)) if m else -1


def _reconstruction_section(run_dir: Path, max_grids: int = 12) -> str:
    grids = sorted((run_dir / "recon").glob("step_*.png"), key=_recon_step) if (run_dir / "recon").is_dir() else []
    caption = "columns: original | masked | reconstruction | reconstruction with visible patches pasted"
    if grids:
        shown = grids
        if len(grids) > max_grids:  # evenly spaced, always the first and the last
            idx = sorted({round(i * (len(grids) - 1) / (max_grids - 1)) for i in range(max_grids)})
            shown = [grids[i] for i in idx]
        figs = "".join(_figure(png_data_uri(p), f"step {_recon_step(p)}", f"reconstruction at step {_recon_step(p)}")
                       for p in shown)
        more = f" ({len(shown)} of {len(grids)} shown)" if len(shown) < len(grids) else ""
        return f'<p class="muted">{escape(caption)}{more}</p><div class="figs">{figs}</div>'
    final = run_dir / "reconstruction.png"
    if final.is_file():
        return f'<p class="muted">{escape(caption)}; end of training only (no recon/ folder)</p>' \
               f'<div class="figs">{_figure(png_data_uri(final), "end of training", "reconstruction")}</div>'
    return _note("no reconstruction pictures in the run folder (recon/step_*.png or reconstruction.png)")


def _fmt_value(metric: str, value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return escape(str(value))
    if not math.isfinite(value):
        return str(value)
    if any(t in metric.lower() for t in ("acc", "top1", "top5")) and 0 <= value <= 1:
        return f"{100 * value:.2f}%"
    return f"{value:.4g}"


def _details(d) -> str:
    if not isinstance(d, dict):
        return escape(str(d)) if d is not None else ""
    items = []
    for k, v in d.items():
        if isinstance(v, float):
            items.append(f"{k}={v:.4g}")
        elif isinstance(v, (int, str, bool)) or v is None:
            items.append(f"{k}={v}")
        elif isinstance(v, (list, tuple)) and len(v) <= 6 and all(isinstance(x, (int, float, str)) for x in v):
            items.append(f"{k}={list(v)}")
    return escape(", ".join(items))


def _results(run_dir: Path) -> dict:
    """results.json of the run, or {} when absent or unreadable."""
    try:
        return json.loads((run_dir / "results.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def probe_rows(run_dir: Path) -> list[dict]:
    """Rows of the probe table: results.json's kNN figures, then every eval/*.json (sorted by name).

    The kNN that pretraining ran is the same protocol as `mimkit eval --protocol knn`: it is named the same
    way (knn / top1, k, temperature, ...), and listed once when eval/knn.json holds the same evaluation."""
    rows = []
    r = _results(run_dir)
    if r:
        if "knn_top1" in r:
            names = {"knn_k": "k", "knn_temperature": "temperature", "pool": "pool", "bank_size": "bank_size",
                     "queries": "queries"}
            rows.append({
                "source": "results.json", "protocol": "knn", "metric": "top1", "value": r["knn_top1"],
                "details": {new: r[old] for old, new in names.items() if old in r},
                "seconds": r.get("seconds"),
            })
    eval_dir = run_dir / "eval"
    for p in sorted(eval_dir.glob("*.json")) if eval_dir.is_dir() else []:
        try:
            r = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            rows.append({"source": p.name, "protocol": "?", "metric": "unreadable JSON", "value": "", "details": None,
                         "seconds": None})
            continue
        items = r if isinstance(r, list) else [r]
        for it in items:
            if isinstance(it, dict):
                row = {"source": f"eval/{p.name}", "protocol": it.get("protocol", p.stem),
                       "metric": it.get("metric", ""), "value": it.get("value", ""),
                       "details": it.get("details"), "seconds": it.get("seconds")}
                same = next((x for x in rows if _same_evaluation(x, row)), None)
                if same is not None:
                    same["source"] += f", {row['source']}"
                else:
                    rows.append(row)
    return rows


def _same_evaluation(a: dict, b: dict) -> bool:
    """Two rows of one evaluation: same protocol, metric and value, and the settings both record agree."""
    if (a["protocol"], a["metric"], a["value"]) != (b["protocol"], b["metric"], b["value"]):
        return False
    da, db = a.get("details") or {}, b.get("details") or {}
    if not isinstance(da, dict) or not isinstance(db, dict):
        return da == db
    return all(da[k] == db[k] for k in set(da) & set(db))


def _probe_section(run_dir: Path) -> str:
    rows = probe_rows(run_dir)
    if not rows:
        return _note("no probe results yet: run `mimkit eval RUN_DIR --protocol ...` (results go to RUN_DIR/eval/)")
    body = "".join(
        f"<tr><td>{escape(str(r['protocol']))}</td><td>{escape(str(r['metric']))}</td>"
        f"<td class=\"num\">{_fmt_value(str(r['metric']), r['value'])}</td>"
        f"<td class=\"num\">{'' if r['seconds'] is None else _fmt_value('s', r['seconds'])}</td>"
        f"<td>{_details(r['details'])}</td><td class=\"muted\">{escape(r['source'])}</td></tr>"
        for r in rows
    )
    return ("<table><thead><tr><th>protocol</th><th>metric</th><th>value</th><th>seconds</th><th>details</th>"
            f"<th>file</th></tr></thead><tbody>{body}</tbody></table>")


def _config_section(run_dir: Path) -> str:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return _note("no config.yaml in the run folder")
    return f"<pre>{escape(path.read_text())}</pre>"


def _summary_section(run_dir: Path) -> str:
    items = [("run folder", str(run_dir.resolve()))]
    r = _results(run_dir)
    if r:
        for k in ("global_step", "total_steps", "epoch", "loss", "val_loss", "images_per_s", "knn_top1"):
            if k in r and r[k] is not None:
                items.append((k, _fmt_value(k, r[k]) if isinstance(r[k], (int, float)) else escape(str(r[k]))))
    body = "".join(f"<tr><th>{escape(k)}</th><td>{v if k != 'run folder' else escape(v)}</td></tr>" for k, v in items)
    return f"<table>{body}</table>"


# ----------------------------------------------------------------------------------------------------------
# model-dependent sections (attention maps and analysis)


def _model_sections(run_dir: Path, num_images: int, analysis_images: int, overrides,
                    device) -> tuple[str, str, dict | None]:
    """(attention html, analysis html, analysis dict or None)."""
    import torch

    from mimkit.engine.checkpoint import find_checkpoint, method_from_checkpoint

    try:
        ckpt_path = find_checkpoint(run_dir)
    except Exception as err:  # noqa: BLE001 - shown on the page
        msg = _note(f"needs the checkpoint: {err}")
        return msg, msg, None
    try:
        method, cfg, ckpt = method_from_checkpoint(ckpt_path)
    except Exception as err:  # noqa: BLE001 - shown on the page
        msg = _note(f"could not load the checkpoint {ckpt_path} ({type(err).__name__}: {err})")
        return msg, msg, None
    from mimkit.config import apply_overrides

    cfg = apply_overrides(cfg, overrides)  # a bad override is the caller's error, not a note
    encoder = getattr(method, "encoder", None)
    if encoder is None or not hasattr(encoder, "blocks"):
        msg = _note(f"method {cfg.method.name!r} has no ViT encoder to analyse")
        return msg, msg, None
    encoder = encoder.to(device).eval()
    try:
        from mimkit.pipeline import reconstruction_batch

        mean, std = ckpt["data"]["mean"], ckpt["data"]["std"]
        batch = reconstruction_batch(cfg, mean, std, max(num_images, analysis_images))
        images = batch["image"]
    except Exception as err:  # noqa: BLE001 - data may be absent where the report is built; say so
        msg = _note(f"could not read the run's images ({type(err).__name__}: {err}); pass data.* overrides "
                    f"(e.g. data.path=DIR) to point at them")
        return msg, msg, None

    from mimkit.eval import analysis as A
    from mimkit.viz.attention import colorbar, render_attention_grid

    depth = len(encoder.blocks)
    show = images[:num_images]
    last = sorted({max(0, depth - 2), depth - 1})
    cls = A.cls_attention(encoder, show, layers=last)  # [len(last), B, H, h, w]
    heads = cls.shape[2]
    maps = [cls[i].mean(dim=1) for i in range(len(last))]
    labels = [f"layer {l + 1} (mean of {heads} heads)" for l in last]
    for hd in range(min(heads, 6)):
        maps.append(cls[-1][:, hd])
        labels.append(f"layer {depth} head {hd + 1}")
    grid = render_attention_grid(show, maps, mean, std)
    attn_html = (
        f'<p class="muted">class-token attention to the patches (class token column dropped, renormalised; each map '
        f'stretched from its own minimum to its maximum). Columns: image | {escape(" | ".join(labels))}.</p>'
        f'<div class="figs">{_figure(png_data_uri(grid), "", "class-token attention maps")}</div>'
        f'<p class="muted">low <img src="{png_data_uri(colorbar(160, 10))}" alt="colour scale" '
        f'style="vertical-align:middle;border:0"> high</p>'
    )

    with torch.no_grad():
        res = A.analyze(encoder, images[:analysis_images])
    layers = list(range(1, depth + 1))
    charts = []
    dist = res["attention_distance"]
    series = [{"x": layers, "y": [sum(r) / len(r) for r in dist], "label": "mean over heads"}]
    series.append({"x": [l for l, r in zip(layers, dist) for _ in r], "y": [v for r in dist for v in r],
                   "label": "heads", "line": False, "markers": True, "color": "#999999"})
    charts.append(_chart(line_chart_svg(series, "Mean attention distance", "layer", "pixels"),
                         "mean attention distance per layer (dots: heads), in pixels over the patch grid, class token "
                         "dropped", "attention distance per layer"))
    ent = res["attention_entropy"]
    series = [{"x": layers, "y": [sum(r) / len(r) for r in ent], "label": "mean over heads"},
              {"x": [l for l, r in zip(layers, ent) for _ in r], "y": [v for r in ent for v in r], "label": "heads",
               "line": False, "markers": True, "color": "#999999"}]
    charts.append(_chart(line_chart_svg(series, "Attention entropy", "layer", "nats"),
                         f"attention entropy per layer (uniform over all {res['grid'][0] * res['grid'][1] + 1} tokens: "
                         f"{math.log(res['grid'][0] * res['grid'][1] + 1):.2f} nats)", "attention entropy per layer"))
    nmi = res["attention_nmi"]
    charts.append(_chart(line_chart_svg(
        [{"x": layers, "y": [sum(r) / len(r) for r in nmi], "label": "mean over heads"},
         {"x": [l for l, r in zip(layers, nmi) for _ in r], "y": [v for r in nmi for v in r], "label": "heads",
          "line": False, "markers": True, "color": "#999999"}], "Attention NMI", "layer", "NMI"),
        "normalised mutual information between queries and keys (near 0: every query attends alike)", "attention NMI"))
    charts.append(_chart(line_chart_svg([{"x": layers, "y": res["fourier_rel_logamp"], "label": "highest frequency",
                                          "markers": True}], "Fourier: high-frequency amplitude", "layer",
                                        "relative log amplitude"),
                         "log amplitude of the highest frequency of each layer's patch-token maps relative to DC",
                         "fourier relative log amplitude per layer"))
    freqs, curves = res["fourier_curves"]["freqs"], res["fourier_curves"]["curves"]
    fs = [{"x": freqs, "y": c, "label": f"layer {i + 1}" if i in (0, len(curves) - 1) else None,
           "color": _ramp_hex(i / max(1, len(curves) - 1))} for i, c in enumerate(curves)]
    charts.append(_chart(line_chart_svg(fs, "Fourier spectrum of feature maps", "frequency (x pi)",
                                        "relative log amplitude"),
                         "half-diagonal of the log amplitude spectrum, per layer (dark: early, light: late)",
                         "fourier curves"))
    sv = [v for v in res["singular_values"] if v > 1e-6 * max(res["singular_values"] + [1e-30])]  # drop numerical zeros
    charts.append(_chart(line_chart_svg([{"x": list(range(1, len(sv) + 1)), "y": sv, "label": "singular values"}],
                                        "Feature spectrum", "index", "singular value", log_y=True),
                         f"singular values of the centred {res['pool']} features of {res['num_images']} images; "
                         f"effective rank {res['effective_rank']:.2f}", "singular value spectrum"))
    charts.append(_chart(line_chart_svg([{"x": layers, "y": res["layer_effective_rank"], "label": "patch tokens",
                                          "markers": True}], "Effective rank per layer", "layer", "effective rank"),
                         "effective rank (exp entropy of normalised singular values) of each layer's patch tokens",
                         "effective rank per layer"))
    analysis_html = (f'<p class="muted">{res["num_images"]} images, {res["grid"][0]}x{res["grid"][1]} patches of '
                     f'{res["patch_size"][0]:g}x{res["patch_size"][1]:g} px; see mimkit.eval.analysis</p>'
                     f'<div class="figs">{"".join(charts)}</div>')
    return attn_html, analysis_html, res


def _ramp_hex(t: float) -> str:
    from mimkit.viz.attention import colorize

    r, g, b = (int(round(255 * c)) for c in colorize(min(0.9, max(0.0, t))))
    return f"#{r:02x}{g:02x}{b:02x}"


# ----------------------------------------------------------------------------------------------------------
# the page


def build_report(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    num_images: int = 4,
    analysis_images: int = 32,
    overrides: list[str] | tuple = (),
    device: str = "cpu",
    model: bool = True,
    analysis_json: bool = True,
) -> Path:
    """Write the report of `run_dir` to `out` (default RUN_DIR/report.html) and return its path.

    num_images: images with attention maps; analysis_images: images for the analysis metrics.
    model=False skips the sections that need the checkpoint and the images (attention, analysis).
    analysis_json: also write the analysis numbers beside the page (report_analysis.json)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder not found: {run_dir}")
    out = Path(out) if out else run_dir / "report.html"
    start = time.perf_counter()
    if model:
        attn_html, analysis_html, res = _model_sections(run_dir, num_images, analysis_images, overrides, device)
    else:
        attn_html = analysis_html = _note("skipped (no model sections requested)")
        res = None
    body = {
        "summary": _summary_section(run_dir),
        "training": _training_section(run_dir),
        "reconstructions": _reconstruction_section(run_dir),
        "attention": attn_html,
        "probes": _probe_section(run_dir),
        "analysis": analysis_html,
        "config": _config_section(run_dir),
    }
    nav = "".join(f'<a href="#{k}">{escape(v)}</a>' for k, v in SECTIONS.items())
    sections = "".join(f'<section id="{k}"><h2>{escape(SECTIONS[k])}</h2>{body[k]}</section>' for k in SECTIONS)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    html = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>mimkit report: {escape(run_dir.name)}</title><style>{_CSS}</style></head><body>"
        f"<h1>mimkit report: {escape(run_dir.name)}</h1>"
        f'<p class="muted">written {stamp} in {time.perf_counter() - start:.1f} s by `mimkit report`</p>'
        f"<nav>{nav}</nav>{sections}</body></html>\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(out)
    if analysis_json and res is not None:
        (out.parent / (out.stem + "_analysis.json")).write_text(json.dumps(res, indent=1) + "\n")
    return out
