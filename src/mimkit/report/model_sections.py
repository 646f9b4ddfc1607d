"""Report sections that need the run's checkpoint and images: attention maps and the analysis plots
(`mimkit.eval.analysis`)."""

from __future__ import annotations

import math
from html import escape
from pathlib import Path

from mimkit.report.html import chart, figure, note, png_data_uri
from mimkit.viz.plots import line_chart_svg



def model_sections(run_dir: Path, num_images: int, analysis_images: int, overrides,
                    device) -> tuple[str, str, dict | None]:
    """(attention html, analysis html, analysis dict or None)."""
    import torch

    from mimkit.engine.checkpoint import find_checkpoint, method_from_checkpoint

    try:
        ckpt_path = find_checkpoint(run_dir)
    except Exception as err:  # noqa: BLE001 - shown on the page
        msg = note(f"needs the checkpoint: {err}")
        return msg, msg, None
    try:
        method, cfg, ckpt = method_from_checkpoint(ckpt_path)
    except Exception as err:  # noqa: BLE001 - shown on the page
        msg = note(f"could not load the checkpoint {ckpt_path} ({type(err).__name__}: {err})")
        return msg, msg, None
    from mimkit.config import apply_overrides

    cfg = apply_overrides(cfg, overrides)  # a bad override is the caller's error, not a note
    encoder = getattr(method, "encoder", None)
    if encoder is None or not hasattr(encoder, "blocks"):
        msg = note(f"method {cfg.method.name!r} has no ViT encoder to analyse")
        return msg, msg, None
    encoder = encoder.to(device).eval()
    try:
        from mimkit.data.run_images import reconstruction_batch

        mean, std = ckpt["data"]["mean"], ckpt["data"]["std"]
        batch = reconstruction_batch(cfg, mean, std, max(num_images, analysis_images))
        images = batch["image"]
    except Exception as err:  # noqa: BLE001 - data may be absent where the report is built; say so
        msg = note(f"could not read the run's images ({type(err).__name__}: {err}); pass data.* overrides "
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
        f'<div class="figs">{figure(png_data_uri(grid), "", "class-token attention maps")}</div>'
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
    charts.append(chart(line_chart_svg(series, "Mean attention distance", "layer", "pixels"),
                         "mean attention distance per layer (dots: heads), in pixels over the patch grid, class token "
                         "dropped", "attention distance per layer"))
    ent = res["attention_entropy"]
    series = [{"x": layers, "y": [sum(r) / len(r) for r in ent], "label": "mean over heads"},
              {"x": [l for l, r in zip(layers, ent) for _ in r], "y": [v for r in ent for v in r], "label": "heads",
               "line": False, "markers": True, "color": "#999999"}]
    charts.append(chart(line_chart_svg(series, "Attention entropy", "layer", "nats"),
                         f"attention entropy per layer (uniform over all {res['grid'][0] * res['grid'][1] + 1} tokens: "
                         f"{math.log(res['grid'][0] * res['grid'][1] + 1):.2f} nats)", "attention entropy per layer"))
    nmi = res["attention_nmi"]
    charts.append(chart(line_chart_svg(
        [{"x": layers, "y": [sum(r) / len(r) for r in nmi], "label": "mean over heads"},
         {"x": [l for l, r in zip(layers, nmi) for _ in r], "y": [v for r in nmi for v in r], "label": "heads",
          "line": False, "markers": True, "color": "#999999"}], "Attention NMI", "layer", "NMI"),
        "normalised mutual information between queries and keys (near 0: every query attends alike)", "attention NMI"))
    charts.append(chart(line_chart_svg([{"x": layers, "y": res["fourier_rel_logamp"], "label": "highest frequency",
                                          "markers": True}], "Fourier: high-frequency amplitude", "layer",
                                        "relative log amplitude"),
                         "log amplitude of the highest frequency of each layer's patch-token maps relative to DC",
                         "fourier relative log amplitude per layer"))
    freqs, curves = res["fourier_curves"]["freqs"], res["fourier_curves"]["curves"]
    fs = [{"x": freqs, "y": c, "label": f"layer {i + 1}" if i in (0, len(curves) - 1) else None,
           "color": _ramp_hex(i / max(1, len(curves) - 1))} for i, c in enumerate(curves)]
    charts.append(chart(line_chart_svg(fs, "Fourier spectrum of feature maps", "frequency (x pi)",
                                        "relative log amplitude"),
                         "half-diagonal of the log amplitude spectrum, per layer (dark: early, light: late)",
                         "fourier curves"))
    sv = [v for v in res["singular_values"] if v > 1e-6 * max(res["singular_values"] + [1e-30])]  # drop numerical zeros
    charts.append(chart(line_chart_svg([{"x": list(range(1, len(sv) + 1)), "y": sv, "label": "singular values"}],
                                        "Feature spectrum", "index", "singular value", log_y=True),
                         f"singular values of the centred {res['pool']} features of {res['num_images']} images; "
                         f"effective rank {res['effective_rank']:.2f}", "singular value spectrum"))
    charts.append(chart(line_chart_svg([{"x": layers, "y": res["layer_effective_rank"], "label": "patch tokens",
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
