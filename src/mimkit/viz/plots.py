"""Small self-contained SVG charts (line and point series, linear or log y) for the HTML report.

No plotting library is needed: each chart is one SVG string with explicit width and height, so it can be
inlined or embedded as a `data:image/svg+xml` image and renders the same in any browser.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    out, v = [], start
    while v <= hi + 1e-9 * step:
        out.append(0.0 if abs(v) < 1e-12 * step else v)
        v += step
    return out


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e4 or a < 1e-3:
        return f"{v:.0e}".replace("e-0", "e-").replace("e+0", "e")
    if a >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}"


def line_chart_svg(
    series: Sequence[dict],
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    width: int = 560,
    height: int = 320,
    log_y: bool = False,
) -> str:
    """An SVG line chart. Each series: {"x": [...], "y": [...], "label": str, optional "color",
    "markers": bool (draw points), "line": bool (default True), "dash": bool}. Non-finite points (and, with
    `log_y`, non-positive ones) are skipped; a series with no points is drawn in the legend only."""
    ml, mr, mt, mb = 64, 16, 30 if title else 12, 44
    pw, ph = width - ml - mr, height - mt - mb
    pts_all = []
    clean = []
    for i, s in enumerate(series):
        pts = [(float(x), float(y)) for x, y in zip(s.get("x", []), s.get("y", []))
               if _finite(x) and _finite(y) and (not log_y or y > 0)]
        if log_y:
            pts = [(x, math.log10(y)) for x, y in pts]
        clean.append((s, pts, s.get("color") or PALETTE[i % len(PALETTE)]))
        pts_all += pts
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
             f'<rect width="{width}" height="{height}" fill="white"/>']
    if title:
        parts.append(f'<text x="{width / 2:.1f}" y="18" text-anchor="middle" font-size="13" '
                     f'font-weight="bold">{escape(title)}</text>')
    if not pts_all:
        parts.append(f'<text x="{width / 2:.1f}" y="{height / 2:.1f}" text-anchor="middle" fill="#888">no data</text>')
        parts.append("</svg>")
        return "".join(parts)
    x0, x1 = min(p[0] for p in pts_all), max(p[0] for p in pts_all)
    y0, y1 = min(p[1] for p in pts_all), max(p[1] for p in pts_all)
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    if y1 == y0:
        pad = abs(y0) * 0.05 or 0.5
        y0, y1 = y0 - pad, y1 + pad
    else:
        pad = 0.05 * (y1 - y0)
        y0, y1 = y0 - pad, y1 + pad

    def sx(x):
        return ml + (x - x0) / (x1 - x0) * pw

    def sy(y):
        return mt + ph - (y - y0) / (y1 - y0) * ph

    # axes, grid and ticks
    parts.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>')
    for t in nice_ticks(x0, x1, 6):
        X = sx(t)
        parts.append(f'<line x1="{X:.1f}" y1="{mt}" x2="{X:.1f}" y2="{mt + ph}" stroke="#eee"/>')
        parts.append(f'<text x="{X:.1f}" y="{mt + ph + 14}" text-anchor="middle">{_fmt(t)}</text>')
    if log_y:
        step = max(1, math.ceil((y1 - y0) / 6))
        yt = [float(e) for e in range(math.floor(y0), math.ceil(y1) + 1) if y0 <= e <= y1 and e % step == 0]
        if len(yt) < 2:
            yt = nice_ticks(y0, y1, 4)
        labels = [_fmt(10 ** t) for t in yt]
    else:
        yt = nice_ticks(y0, y1, 5)
        labels = [_fmt(t) for t in yt]
    for t, lab in zip(yt, labels):
        Y = sy(t)
        parts.append(f'<line x1="{ml}" y1="{Y:.1f}" x2="{ml + pw}" y2="{Y:.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{ml - 5}" y="{Y + 4:.1f}" text-anchor="end">{lab}</text>')
    if xlabel:
        parts.append(f'<text x="{ml + pw / 2:.1f}" y="{height - 8}" text-anchor="middle">{escape(xlabel)}</text>')
    if ylabel:
        parts.append(f'<text x="14" y="{mt + ph / 2:.1f}" text-anchor="middle" '
                     f'transform="rotate(-90 14 {mt + ph / 2:.1f})">{escape(ylabel)}</text>')
    # data
    for s, pts, color in clean:
        if not pts:
            continue
        if s.get("line", True) and len(pts) > 1:
            d = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            dash = ' stroke-dasharray="5,3"' if s.get("dash") else ""
            parts.append(f'<polyline points="{d}" fill="none" stroke="{color}" stroke-width="1.6"{dash}/>')
        if s.get("markers") or len(pts) == 1:
            r = s.get("radius", 2.6)
            parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="{r}" fill="{color}" fill-opacity="0.75"/>'
                      for x, y in pts]
    # legend
    labelled = [(s.get("label"), color) for s, _, color in clean if s.get("label")][:10]
    if labelled:
        parts.append(f'<rect x="{ml + pw - 134}" y="{mt + 2}" width="130" height="{14 * len(labelled) + 4}" '
                     f'fill="white" fill-opacity="0.85" stroke="#ddd"/>')
    for i, (label, color) in enumerate(labelled):
        ly = mt + 8 + 14 * i
        parts.append(f'<rect x="{ml + pw - 130}" y="{ly - 7}" width="10" height="10" fill="{color}"/>')
        parts.append(f'<text x="{ml + pw - 116}" y="{ly + 2}">{escape(str(label))}</text>')
    parts.append("</svg>")
    return "".join(parts)
