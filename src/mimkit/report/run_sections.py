"""Report sections read from the run folder's files alone: summary, training curves, reconstructions over
training, probe results and the configuration."""

from __future__ import annotations

import json
import math
import re
from html import escape
from pathlib import Path

from mimkit.report.html import chart, figure, note, png_data_uri
from mimkit.viz.plots import line_chart_svg



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


def training_section(run_dir: Path) -> str:
    rows = _read_metrics(run_dir)
    if not rows:
        return note("no metrics.csv in the run folder")
    out = []
    xs, ys = _series(rows, "loss")
    vx, vy = _series(rows, "val_loss")
    loss = [{"x": xs, "y": ys, "label": "train loss"}]
    if vx:
        loss.append({"x": vx, "y": vy, "label": "val loss (fixed masks)", "markers": True})
    out.append(chart(line_chart_svg(loss, "Loss", "optimizer step", "loss"),
                      "training loss (mean over each logging window) and held-out validation loss", "loss curve"))
    lx, ly = _series(rows, "lr")
    if lx:
        out.append(chart(line_chart_svg([{"x": lx, "y": ly, "label": "lr"}], "Learning rate", "optimizer step", "lr"),
                          "learning rate schedule", "lr curve"))
    probe = [{"x": _series(rows, k)[0], "y": [100 * v for v in _series(rows, k)[1]], "label": label, "markers": True}
             for k, label in (("online_linear", "linear probe"), ("online_knn", "kNN")) if any(k in r for r in rows)]
    if probe:
        out.append(chart(line_chart_svg(probe, "Online probe", "optimizer step", "top-1 %"),
                         "online probe on fixed held-out images (eval.online_probe_every_steps)", "online probe"))
    extra = [k for k in ("grad_norm", "images_per_s") if any(k in r for r in rows)]
    for k in extra:
        ex, ey = _series(rows, k)
        out.append(chart(line_chart_svg([{"x": ex, "y": ey, "label": k}], k, "optimizer step", k), k, k))
    last = rows[-1]
    summary = ", ".join(f"{k} {last[k]:.4g}" for k in ("loss", "lr") if k in last)
    return f'<div class="figs">{"".join(out)}</div><p class="muted">{len(rows)} logged rows; last: step ' \
           f'{last.get("step", "?")}{", " + escape(summary) if summary else ""}</p>'


def _recon_step(path: Path) -> int:
    m = re.search(r"(\d+)", path.stem)
    return int(m.group(1)) if m else -1


def reconstruction_section(run_dir: Path, max_grids: int = 12) -> str:
    grids = sorted((run_dir / "recon").glob("step_*.png"), key=_recon_step) if (run_dir / "recon").is_dir() else []
    caption = "columns: original | masked | reconstruction | reconstruction with visible patches pasted"
    if grids:
        shown = grids
        if len(grids) > max_grids:  # evenly spaced, always the first and the last
            idx = sorted({round(i * (len(grids) - 1) / (max_grids - 1)) for i in range(max_grids)})
            shown = [grids[i] for i in idx]
        figs = "".join(figure(png_data_uri(p), f"step {_recon_step(p)}", f"reconstruction at step {_recon_step(p)}")
                       for p in shown)
        more = f" ({len(shown)} of {len(grids)} shown)" if len(shown) < len(grids) else ""
        return f'<p class="muted">{escape(caption)}{more}</p><div class="figs">{figs}</div>'
    final = run_dir / "reconstruction.png"
    if final.is_file():
        return f'<p class="muted">{escape(caption)}; end of training only (no recon/ folder)</p>' \
               f'<div class="figs">{figure(png_data_uri(final), "end of training", "reconstruction")}</div>'
    return note("no reconstruction pictures in the run folder (recon/step_*.png or reconstruction.png)")


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


def probe_section(run_dir: Path) -> str:
    rows = probe_rows(run_dir)
    if not rows:
        return note("no probe results yet: run `mimkit eval RUN_DIR --protocol ...` (results go to RUN_DIR/eval/)")
    body = "".join(
        f"<tr><td>{escape(str(r['protocol']))}</td><td>{escape(str(r['metric']))}</td>"
        f"<td class=\"num\">{_fmt_value(str(r['metric']), r['value'])}</td>"
        f"<td class=\"num\">{'' if r['seconds'] is None else _fmt_value('s', r['seconds'])}</td>"
        f"<td>{_details(r['details'])}</td><td class=\"muted\">{escape(r['source'])}</td></tr>"
        for r in rows
    )
    return ("<table><thead><tr><th>protocol</th><th>metric</th><th>value</th><th>seconds</th><th>details</th>"
            f"<th>file</th></tr></thead><tbody>{body}</tbody></table>")


def config_section(run_dir: Path) -> str:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return note("no config.yaml in the run folder")
    return f"<pre>{escape(path.read_text())}</pre>"


def summary_section(run_dir: Path) -> str:
    items = [("run folder", str(run_dir.resolve()))]
    r = _results(run_dir)
    if r:
        for k in ("global_step", "total_steps", "epoch", "loss", "val_loss", "images_per_s", "knn_top1"):
            if k in r and r[k] is not None:
                items.append((k, _fmt_value(k, r[k]) if isinstance(r[k], (int, float)) else escape(str(r[k]))))
    body = "".join(f"<tr><th>{escape(k)}</th><td>{v if k != 'run folder' else escape(v)}</td></tr>" for k, v in items)
    return f"<table>{body}</table>"
