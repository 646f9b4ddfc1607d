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

import json
import time
from html import escape
from pathlib import Path

from mimkit.report.html import note
from mimkit.report.model_sections import model_sections
from mimkit.report.run_sections import (config_section, probe_rows, probe_section, reconstruction_section,
                                         summary_section, training_section)


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
        attn_html, analysis_html, res = model_sections(run_dir, num_images, analysis_images, overrides, device)
    else:
        attn_html = analysis_html = note("skipped (no model sections requested)")
        res = None
    body = {
        "summary": summary_section(run_dir),
        "training": training_section(run_dir),
        "reconstructions": reconstruction_section(run_dir),
        "attention": attn_html,
        "probes": probe_section(run_dir),
        "analysis": analysis_html,
        "config": config_section(run_dir),
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


__all__ = ["SECTIONS", "build_report", "probe_rows"]
