"""Every MIM method against MAE for the same CPU budget on Fashion-MNIST: loss curves, probes, claims.

For each method (recipe `configs/<name>_vit_tiny_fmnist.yaml` plus the same common overrides: data, batch
size, seed, no progress bar, no pictures, out_dir in a work folder), the script

1. calibrates seconds per optimizer step: a fresh copy of the method, the trainer's AdamW, a few steps after
   warm-up (data loading included, the steps spread over the method's schedule);
2. sets `optim.max_steps = budget / (s/step)`, so that the lr schedule (and any curriculum) spans the run,
   and trains from scratch with `mimkit.engine.train` on the one shared PretrainData;
3. records steps, wall time, images/s, the loss curve (the trainer's per-step history), the fixed-mask
   held-out loss (`val_loss`, the method's own loss: not comparable across methods);
4. evaluates the encoder like every other one: tokens once over a seeded subset of the Fashion-MNIST training
   images and the first test images, then weighted kNN (class token, k=20, T=0.07), the linear probe
   (BatchNorm + linear, lr sweep chosen on a validation split) and the cross-attention pooler on the patch
   tokens (`EvalConfig` defaults); a "random init" row (the MAE recipe's encoder, untrained) is the floor;
5. checks the card's small-scale claim where one fits this budget (HPM's ranking accuracy, MFF's fusion
   weights, DMJD against MAE at equal wall-clock).

A method that fails to build, train or evaluate is reported with its error and the script goes on; the exit
status is non-zero only if MAE fails. Writes a markdown report (`--out`), an SVG of the loss curves beside it
and, with `--json`, every figure.

The full run (11 methods and the random-init row in about 30-35 minutes on 2 quiet cores: per method about
60 s of training, 10 s of calibration, 25 s of setup, validation and checkpoint, and 50-60 s of evaluation,
mostly the encoder's pass over the 7,000 probe images; the log prints a running projection after each method):

    .venv/bin/python benchmarks/methods.py --methods all --budget-s 60 --threads 2 \
        --eval-train 5000 --eval-test 2000 --attentive-train 2000 \
        --out docs/methods.md --json benchmarks/results/methods.json

On a machine shared with other jobs, `--threads 1` (two threads fighting other processes for two cores ran
about 10x slower per step in our tests); the same budget then buys fewer steps, which the table shows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TEACHER = "teacher"  # the MAE recipe at --teacher-budget-s: the frozen teacher of the distillation rows
TEACHER_OF = "teacher:"  # "teacher:ibot": the ibot recipe at --teacher-budget-s (a teacher for --teacher-for)
RANDOM = "random init"
RANDOM_MEAN = "random init (mean pool)"
FLOORS = (RANDOM, RANDOM_MEAN)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------------
# budget


def steps_for_budget(budget_s: float, s_per_step: float, min_steps: int = 1, max_steps: int | None = None) -> int:
    """Optimizer steps that fit `budget_s` seconds at `s_per_step` (at least `min_steps`, at most `max_steps`)."""
    if not (s_per_step > 0 and math.isfinite(s_per_step)):
        raise ValueError(f"seconds per step must be a positive number, got {s_per_step}")
    steps = max(int(min_steps), int(budget_s / s_per_step))
    return min(steps, int(max_steps)) if max_steps else steps


def calibrate(cfg, data, warmup: int = 2, steps: int = 4) -> dict:
    """Seconds per optimizer step of a fresh copy of the method, as the trainer runs it (data loading,
    begin_step, forward, backward, AdamW step, end_step); the timed steps are spread over the schedule."""
    from torch.utils.data import DataLoader, default_collate

    from mimkit.engine.optim import build_optimizer, no_decay_names
    from mimkit.methods import build_method

    torch.manual_seed(cfg.trainer.seed)
    # the data statistics as the trainer resolves them (a frozen teacher converts the images with them)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"mean": list(data.mean), "std": list(data.std)})})
    method = build_method(cfg, tuple(data.img_size), int(data.channels)).train()
    method.prepare(data.train, cfg.trainer.seed)  # as the trainer does before a fresh run (CCViT's k-means)
    opt = build_optimizer(method, cfg.optim, no_decay_names(method))
    batch_size = cfg.optim.batch_size // cfg.optim.accumulate
    loader = DataLoader(data.train, batch_size=batch_size, shuffle=False, drop_last=True, num_workers=0,
                        collate_fn=default_collate)
    pseudo_total = 100  # hooks see progress 0 during warm-up, then points spread over (0, 1)
    times, it = [], iter(loader)
    for i in range(warmup + steps):
        step = 0 if i < warmup else round(pseudo_total * (i - warmup + 0.5) / steps)
        t = time.perf_counter()
        if hasattr(method, "begin_step"):
            method.begin_step(step, pseudo_total)
        for _ in range(cfg.optim.accumulate):
            try:
                batch = next(it)
            except StopIteration:
                it = iter(loader)
                batch = next(it)
            out = method(batch)
            (out["loss"] / cfg.optim.accumulate).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if hasattr(method, "end_step"):
            method.end_step(step, pseudo_total)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    times.sort()
    return {"s_per_step": times[len(times) // 2], "step_times": times, "warmup": warmup}


# ----------------------------------------------------------------------------------------------------------
# card claims: method -> (claim, check(history, row, rows) -> (status, evidence))


def _series(history: list[dict], key: str) -> list[float]:
    return [float(h[key]) for h in history if key in h and h[key] is not None and math.isfinite(float(h[key]))]


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def _quarters(vals: list[float]) -> tuple[float, float, int]:
    q = max(1, len(vals) // 4)
    return _mean(vals[:q]), _mean(vals[-q:]), q


def check_hpm(history, row=None, rows=None):
    vals = _series(history, "rank_acc")
    if not vals:
        return "not logged", "no `rank_acc` in the training history"
    first, last, q = _quarters(vals)
    held = last > 0.5 and last > first
    return ("held" if held else "did not hold",
            f"rank_acc mean {first:.3f} over the first {q} steps -> {last:.3f} over the last {q} "
            f"({len(vals)} steps logged)")


def check_mff(history, row=None, rows=None):
    vals = _series(history, "fuse_shallow")
    if not vals:
        return "not logged", "no `fuse_shallow` in the training history"
    first, (_, last, q) = vals[0], _quarters(vals)
    end = vals[-1]
    weights = sorted(k for k in (history[-1] if history else {}) if k.startswith("fuse_w"))
    parts = ", ".join(f"{k[len('fuse_w'):]}:{float(history[-1][k]):.3f}" for k in weights)
    held = end > first
    return ("held" if held else "did not hold",
            f"fuse_shallow {first:.4f} at step 1 -> {end:.4f} at the end (last-{q}-step mean {last:.4f})"
            + (f"; final weights by block {parts}" if parts else ""))


def _probe_se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 1e-6) / max(1, n))


def compare_probe(row: dict | None, other: dict | None, key: str, name: str, other_name: str,
                  want: str = "above") -> tuple[str, str]:
    """Is `row`'s probe `key` above (or, want="differs", different from) `other`'s by more than two standard
    errors of the difference? Within them: inconclusive."""
    a, b = (row or {}).get(key), (other or {}).get(key)
    if a is None or b is None:
        return "n/a", f"needs both {name}'s and {other_name}'s {key} probe"
    n = int((row or {}).get("eval_test") or (other or {}).get("eval_test") or 1)
    se = math.sqrt(_probe_se(a, n) ** 2 + _probe_se(b, n) ** 2)
    diff = a - b
    if abs(diff) < 2 * se:
        status = "inconclusive"
    elif want == "differs":
        status = "held"
    else:
        status = "held" if diff > 0 else "did not hold"
    return status, (f"{key} {100 * a:.2f}% vs {other_name} {100 * b:.2f}% ({100 * diff:+.2f} points; two standard "
                    f"errors of the difference on {n} test images: {200 * se:.2f})")


def check_dmjd(history, row=None, rows=None):
    return compare_probe(row, (rows or {}).get("mae"), "linear", "DMJD", "MAE")


def _against(other: str, key: str, want: str = "above"):
    def check(history, row=None, rows=None):
        return compare_probe(row, (rows or {}).get(other), key, (row or {}).get("method", "this"), other, want)
    return check


def check_attmask(history, row=None, rows=None):
    rows = rows or {}
    variants = {"high": rows.get("attmask"), "hint": rows.get("attmask[variant=hint]"),
                "low": rows.get("attmask[variant=low]")}
    have = {k: r["knn"] for k, r in variants.items() if r and r.get("knn") is not None}
    if len(have) < 3:
        return "n/a", "needs the attmask (high), attmask[variant=hint] and attmask[variant=low] rows"
    n = int((row or {}).get("eval_test") or 1)
    best_other = max(have["high"], have["hint"])
    se = math.sqrt(2) * _probe_se(best_other, n)
    text = ", ".join(f"{k} {100 * v:.2f}%" for k, v in have.items()) + f" (kNN; 2 SE of a difference {200 * se:.2f})"
    if have["low"] < min(have["high"], have["hint"]):
        return ("held" if best_other - have["low"] > 2 * se else "inconclusive"), text
    # Low is not the lowest: a clear miss only if it beats the worse of the others beyond the noise
    return ("did not hold" if have["low"] - min(have["high"], have["hint"]) > 2 * se else "inconclusive"), text


def check_vqkd(history, row=None, rows=None):
    vals = _series(history, "code_usage")
    if not vals:
        return "not logged", "no `code_usage` in the training history"
    # the usage window (the recipe's usage_window, 20 batches) starts with the k-means-initialised first batch,
    # which uses every code by construction: only steps after it say anything
    window = 20
    if len(vals) <= window:
        return "n/a", (f"{len(vals)} steps: the {window}-batch usage window still holds the k-means-initialised first "
                       f"batch (usage {vals[-1]:.3f}); needs a longer run (docs/methods_300s.md)")
    vals = vals[window:]
    first, last, q = _quarters(vals)
    return ("held" if last > 0.9 else "did not hold",
            f"code_usage (share of the codebook used over the last training batches' window) {last:.3f} over the "
            f"last {q} steps ({len(vals)} logged; first quarter {first:.3f})")


def check_maskalign(history, row=None, rows=None):
    rows = rows or {}
    teacher, mae = rows.get(TEACHER), rows.get("mae")
    probe, text = compare_probe(row, teacher, "linear", "MaskAlign", "its teacher")
    if probe == "n/a":
        return "n/a", "needs the teacher row (run with --teacher-budget-s) and this row's linear probe"
    reached = probe in ("held", "inconclusive")  # above the teacher, or below it by less than the noise
    if not (row and mae and row.get("s_per_step") and mae.get("s_per_step")):
        return "n/a", text + "; needs MAE's seconds per step for the cost half"
    ratio = row["s_per_step"] / mae["s_per_step"]
    status = "held" if reached and ratio < 1 else "did not hold"
    return status, (f"{text}; student {row.get('steps')} steps at {ratio:.2f}x MAE's seconds per step, teacher "
                    f"{teacher.get('steps')} steps")


def wired_teacher(row: dict | None, field: str, rows: dict) -> dict | None:
    """The row whose run a distillation row's teacher field `field` read (from the row's wiring overrides)."""
    prefix = f"method.{field}.source="
    source = next((w[len(prefix):] for w in (row or {}).get("wiring") or [] if w.startswith(prefix)), None)
    if source is None:
        return None
    return next((r for r in rows.values() if source in (r.get("run_dir"), r.get("source"))), None)


def check_hybrid_distill(history, row=None, rows=None):
    rows = rows or {}
    mim, cl = wired_teacher(row, "mim_teacher", rows), wired_teacher(row, "feature_teacher", rows)
    if mim is None or cl is None or mim is cl:
        return "n/a", ("needs two different teachers, probed here: --teacher-for feature_teacher=teacher:ibot (say) "
                       "beside the MAE teacher row")
    keys = ("attn_nmi", "attn_distance")
    if any((r or {}).get(k) is None for r in (row, mim, cl) for k in keys):
        return "n/a", "needs the last block's attention NMI and distance of the student and both teachers"
    mim_like = {k: abs(row[k] - mim[k]) < abs(row[k] - cl[k]) for k in keys}
    cl_probe, cl_text = compare_probe(cl, mim, "linear", "the CL teacher", "the MIM teacher")
    attn = "; ".join(f"{k} student {row[k]:.3g}, MIM teacher {mim[k]:.3g}, CL teacher {cl[k]:.3g}" for k in keys)
    if cl_probe != "held":
        return "n/a", (f"the CL teacher's probe is not above the MIM teacher's ({cl_text}): nothing to move towards; "
                       f"{attn}")
    probe, text = compare_probe(row, mim, "linear", "the student", "the MIM teacher")
    if not all(mim_like.values()):
        status = "did not hold"
    else:
        status = {"held": "held", "inconclusive": "inconclusive"}.get(probe, "did not hold")
    return status, f"{attn}; {text}; CL teacher {100 * cl['linear']:.2f}%"


def check_cl_mim(history, row=None, rows=None):
    rows = rows or {}
    out = [compare_probe(row, rows.get(f"cl_mim[lam={v}]"), "linear", "cl_mim", f"cl_mim[lam={v}]") for v in (0, 1)]
    if any(s == "n/a" for s, _ in out):
        return "n/a", "needs the cl_mim[lam=0] (SimMIM part only) and cl_mim[lam=1] (MoCo v3 part only) rows"
    statuses = {s for s, _ in out}
    status = "held" if statuses == {"held"} else "did not hold" if "did not hold" in statuses else "inconclusive"
    return status, "; ".join(t for _, t in out)


CLAIMS = {
    "hpm": ("the loss predictor's ranking accuracy is above 0.5 and rises",
            "rank_acc (pairwise ranking accuracy of the predicted losses of each training batch's masked patches, "
            "computed before that batch's update) averaged over the last quarter of steps is > 0.5 and above the "
            "first quarter's mean", check_hpm),
    "mff": ("the learned fusion weights move towards shallow layers",
            "fuse_shallow (weight on layers other than the deepest) ends above its step-1 value", check_mff),
    "dmjd": ("two disjoint masked views beat MAE at equal wall-clock",
             "linear probe above MAE's by more than two standard errors (inconclusive within them)", check_dmjd),
    "ibot": ("masked-patch distillation adds to DINO-style class-token distillation",
             "kNN above the ibot[mim_weight=0] row (no MIM term) by more than two standard errors",
             _against("ibot[mim_weight=0]", "knn")),
    "attmask": ("masking the least-attended patches (Low) is the worst AttMask variant",
                "kNN of attmask[variant=low] below both High (the attmask row) and Hint; held if by more than two "
                "standard errors", check_attmask),
    "cae": ("the alignment loss matters",
            "linear probe of cae differs from the cae[align_weight=0] row by more than two standard errors",
            _against("cae[align_weight=0]", "linear", "differs")),
    "latent_mim": ("latent reconstruction beats MAE's pixels on the linear probe at equal budget",
                   "linear probe above MAE's by more than two standard errors", _against("mae", "linear")),
    "lut": ("the unmasked-token objective improves on MAE",
            "linear probe above MAE's by more than two standard errors", _against("mae", "linear")),
    "stop": ("stochastic positions improve I-JEPA's linear probe",
             "linear probe above the ijepa row by more than two standard errors", _against("ijepa", "linear")),
    "njepa": ("diffusion-noised positions improve I-JEPA's linear probe",
              "linear probe above the ijepa row by more than two standard errors", _against("ijepa", "linear")),
    "ccvit": ("centroid replacement adds to code prediction",
              "linear probe above the ccvit[replace_ratio=0] row by more than two standard errors",
              _against("ccvit[replace_ratio=0]", "linear")),
    "vqkd": ("the VQ-KD codebook usage stays above 90% with a self-trained teacher",
             "code_usage averaged over the last quarter of steps > 0.9 (the recipe restarts codes idle for 5 batches, "
             "`dead_after: 5`, which BEiT v2 does not; without it short runs collapse, see the vqkd docstring)",
             check_vqkd),
    "beit_v2": ("the patch-aggregation branch improves the linear probe",
                "linear probe above the beit_v2[head_layers=0] row by more than two standard errors",
                _against("beit_v2[head_layers=0]", "linear")),
    "maskalign": ("a MaskAlign student reaches its teacher's probe accuracy at a lower cost per step than MAE",
                  "linear probe not below the teacher row's by more than two standard errors, and seconds per step "
                  "below MAE's", check_maskalign),
    "hybrid_distill": ("the student's attention stays MIM-like while its probe moves towards the CL teacher",
                       "the last block's attention NMI and mean distance (64 test images) are each closer to the MIM "
                       "teacher's than to the CL teacher's, and the linear probe is above the MIM teacher's by more "
                       "than two standard errors (given a CL teacher whose probe is)", check_hybrid_distill),
    "dtm": ("token morphing improves on plain per-token distillation",
            "linear probe above the dtm[morph=false] row by more than two standard errors",
            _against("dtm[morph=false]", "linear")),
    "sup_mim": ("an auxiliary MIM decoder improves supervised training's kNN retrieval",
                "kNN above the sup_mim[mim_weight=0] row (supervised only) by more than two standard errors",
                _against("sup_mim[mim_weight=0]", "knn")),
    "cl_mim": ("the CL + MIM hybrid beats either loss alone",
               "linear probe above both cl_mim[lam=0] and cl_mim[lam=1] by more than two standard errors",
               check_cl_mim),
}

# why a method has no claim checked here (the card's small-scale checks need more than this budget)
NO_CLAIM = {
    "mae": "the baseline",
    "simmim": "a baseline, no card claim",
    "maskfeat": "a baseline, no card claim",
    "localmim": "card: better FT/LP than MAE at 50-100 epochs; this budget is a fraction of one epoch",
    "selective_mae": "card: >=2x wall-clock speed-up at matched LP; needs probe-vs-time curves, not measured here",
    "hi_end_mae": "card: dense-probe (segmentation) gain over MAE; no dense probe here",
    "ropim": "card: beats SimMIM at equal epochs; runs here have equal time, not equal epochs",
    "a2mim": "card: IN-100 numbers and ablations; nothing that fits this budget",
    "ijepa": "the base that StoP and N-JEPA are compared with",
    "uta": "card: CLIP zero-shot accuracy; needs CLIP's text tower, not available with a self-trained teacher",
    TEACHER: "the frozen teacher of the distillation rows (see Setup)",
}


def check_claim(name: str, history: list[dict], row: dict, rows: dict) -> dict:
    if is_teacher_row(name) and name not in NO_CLAIM:
        return {"status": "n/a", "claim": None, "evidence": f"a frozen teacher ({recipe_of(name)} recipe) of the "
                                                              "distillation rows (see Setup)"}
    if name not in CLAIMS and split_variant(name)[1]:
        return {"status": "n/a", "claim": None, "evidence": f"a variant of {split_variant(name)[0]} (see its claim)"}
    if row.get("error") and not history:
        return {"status": "not run", "claim": CLAIMS[name][0] if name in CLAIMS else None,
                "test": CLAIMS[name][1] if name in CLAIMS else None, "evidence": f"the method failed ({row['stage']})"}
    if name not in CLAIMS:
        return {"status": "n/a", "claim": None, "evidence": NO_CLAIM.get(name, "no small-scale claim fits this budget")}
    claim, test, fn = CLAIMS[name]
    status, evidence = fn(history, row, rows)
    return {"status": status, "claim": claim, "test": test, "evidence": evidence}


# ----------------------------------------------------------------------------------------------------------
# loss curves


def smooth(values: list[float], window: int) -> list[float]:
    """Centred moving average (shorter at the ends)."""
    if window <= 1:
        return list(values)
    h, out = window // 2, []
    for i in range(len(values)):
        chunk = values[max(0, i - h): i + h + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def normalised_curve(history: list[dict], key: str = "loss") -> tuple[list[float], list[float]]:
    """(fraction of training, loss / first-step loss), smoothed over ~5% of the steps."""
    vals = _series(history, key)
    if not vals:
        return [], []
    n = len(vals)
    first = vals[0] if vals[0] != 0 else 1.0
    ys = smooth([v / first for v in vals], max(1, n // 20))
    return [(i + 1) / n for i in range(n)], ys


def loss_figure(rows: dict, order: list[str], cols: int = 3) -> str:
    """One SVG: a small chart per method (its normalised loss, MAE's dashed for reference), on a grid."""
    from mimkit.viz.plots import line_chart_svg

    names = [n for n in order if n not in FLOORS and rows.get(n, {}).get("history")]
    if not names:
        return ""
    w, h = 360, 230
    ref = normalised_curve(rows["mae"]["history"]) if "mae" in rows and rows["mae"].get("history") else None
    charts = []
    for n in names:
        x, y = normalised_curve(rows[n]["history"])
        series = [{"x": x, "y": y, "label": n, "color": "#1f77b4"}]
        if ref is not None and n != "mae":
            series.append({"x": ref[0], "y": ref[1], "label": "mae", "color": "#7f7f7f", "dash": True})
        r = rows[n]
        title = f"{n}: {r.get('steps', '?')} steps"
        charts.append(line_chart_svg(series, title=title, xlabel="fraction of training",
                                     ylabel="loss / step-1 loss", width=w, height=h))
    nrows = math.ceil(len(charts) / cols)
    width, height = w * min(cols, len(charts)), h * nrows
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}">', f'<rect width="{width}" height="{height}" fill="white"/>']
    for i, svg in enumerate(charts):
        x, y = (i % cols) * w, (i // cols) * h
        parts.append(svg.replace("<svg ", f'<svg x="{x}" y="{y}" ', 1))
    parts.append("</svg>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------------------
# report


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


def _num(v, fmt: str = ".4f") -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_table(results: dict) -> str:
    rows, order = results["rows"], results["order"]
    head = ["method", "steps", "images seen", "train s", "wall s", "img/s", "final train loss", "val_loss",
            "kNN", "linear", "attentive", "card claim"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * 10 + "---|"]
    for name in order:
        r = rows.get(name)
        if r is None:
            continue
        if r.get("error") and r.get("steps") is None:
            lines.append(f"| {name} | " + " | ".join(["–"] * 10) + f" | **failed** ({r['stage']}): "
                         f"{_cell(r['error'])} |")
            continue
        claim = r.get("claim") or {}
        ctext = claim.get("status", "n/a")
        if claim.get("claim"):  # the claim itself and its test are in the section below the table
            ctext = f"**{ctext}**: {claim['evidence']}"
        elif claim.get("evidence"):
            ctext = f"{ctext}: {claim['evidence']}"
        if r.get("error"):
            ctext += f"; **failed** ({r['stage']}): {r['error']}"
        lines.append("| " + " | ".join([
            name + (" (mean pool)" if r.get("pool") == "mean" and name not in FLOORS else ""), _num(r.get("steps"), "d"), _num(r.get("images_seen"), ",d"), _num(r.get("train_s"), ".0f"),
            _num(r.get("wall_s"), ".0f"), _num(r.get("images_per_s"), ".1f"), _num(r.get("loss_final")),
            _num(r.get("val_loss")), _pct(r.get("knn")), _pct(r.get("linear")), _pct(r.get("attentive")),
            _cell(ctext),
        ]) + " |")
    return "\n".join(lines)


def reading_notes(results: dict) -> list[str]:
    """Statements that follow from the numbers in the table, nothing else."""
    rows, s = results["rows"], results["setup"]
    trained = [n for n in results["order"] if n not in FLOORS and rows.get(n, {}).get("images_seen") is not None]
    failed = [n for n in results["order"] if rows.get(n, {}).get("error")]
    notes = []
    n_test = s["eval_test"]
    se = 100 * _probe_se(0.75, n_test)
    notes.append(f"One seed and {n_test} test images: an accuracy near 75% has a standard error of about "
                 f"{se:.1f} points, so differences below about {2 * se * math.sqrt(2):.1f} points between two "
                 f"rows are within noise.")
    rnd = rows.get(RANDOM, {})
    for key, label in (("knn", "kNN"), ("linear", "linear probe"), ("attentive", "attentive probe")):
        have = [(rows[n][key], n) for n in trained if rows[n].get(key) is not None]
        if not have:
            continue
        best_v, best = max(have)
        text = f"{label}: best {best} ({_pct(best_v)}%)"
        if "mae" in rows and rows["mae"].get(key) is not None:
            rank = sorted((v for v, _ in have), reverse=True).index(rows["mae"][key]) + 1
            text += f"; MAE {_pct(rows['mae'][key])}% ranks {rank} of {len(have)}"
        if rnd.get(key) is not None:
            def floor(n):  # each row against the untrained encoder read the same way (class or mean token)
                f = rows.get(RANDOM_MEAN) if rows[n].get("pool") == "mean" else rnd
                return (f or rnd).get(key, rnd[key])

            r = rnd[key]
            above = [n for v, n in have if v > floor(n)]
            clear = [n for v, n in have if v - floor(n) > 2 * math.sqrt(2) * _probe_se(floor(n), n_test)]
            below = [n for v, n in have if v <= floor(n)]
            text += (f"; {len(above)} of {len(have)} score above random init ({_pct(r)}%"
                     + (f"; {_pct(rows[RANDOM_MEAN][key])}% with mean pooling" if rows.get(RANDOM_MEAN, {}).get(key)
                        is not None else "") + f"), {len(clear)} of them by more than the noise margin")
            if below:
                text += f" (not above: {', '.join(below)})"
        notes.append(text + ".")
    speeds = [(rows[n]["images_per_s"], n) for n in trained if rows[n].get("images_per_s")]
    if len(speeds) > 1:
        (lo, lo_n), (hi, hi_n) = min(speeds), max(speeds)
        notes.append(f"Throughput ranged from {lo:.1f} img/s ({lo_n}) to {hi:.1f} img/s ({hi_n}), so at the same "
                     f"{s['budget_s']:g} s budget the methods saw between "
                     f"{min(rows[n]['images_seen'] for n in trained):,} and "
                     f"{max(rows[n]['images_seen'] for n in trained):,} images.")
    over = [n for n in trained  # a teacher row's budget is --teacher-budget-s
            if rows[n].get("train_s") and rows[n]["train_s"] > 1.25 * (rows[n].get("budget_s") or s["budget_s"])]
    if over:
        notes.append(f"Training took more than 1.25x the budget for {', '.join(over)} (the calibration "
                     f"underestimated their step time; see train s).")
    claims = [(n, rows[n]["claim"]) for n in trained if (rows[n].get("claim") or {}).get("claim")]
    for n, c in claims:
        notes.append(f"{n} card claim ({c['claim']}): {c['status']}; {c['evidence']}.")
    if failed:
        where = ", ".join(f"{n} ({rows[n]['stage']})" for n in failed)
        notes.append(f"Failed: {where}; errors in the table and tracebacks in the JSON.")
    return notes


def teacher_note(results: dict) -> list[str]:
    """How the distillation rows got their frozen teacher (and BEiT v2 its tokenizer)."""
    row = results["rows"].get(TEACHER)
    if not row:
        return []
    made = (f"the MAE recipe trained for {row.get('budget_s', 0):g} s ({row.get('steps')} steps)" if not row.get("source")
            else f"the given run {row['source']} ({row.get('steps')} steps)")
    chosen = dict(pair.partition("=")[::2] for pair in results["setup"].get("teacher_for") or [])
    unless = "".join(f"; `{field}` reads the `{r}` row instead" for field, r in chosen.items())
    others = [f"* **{n}:** the {recipe_of(n)} recipe trained for {results['rows'][n].get('budget_s', 0):g} s "
              f"({results['rows'][n].get('steps')} steps), a frozen teacher like the one above, probed like the rows"
              for n in results["order"] if n.startswith(TEACHER_OF) and n in results["rows"]]
    return [f"* **{TEACHER}:** {made}, probed like the other rows; every frozen-teacher field of a row's recipe "
            "(`method.teacher.source`, Hybrid Distillation's `mim_teacher` and `feature_teacher`) reads it"
            f"{unless}, and `beit_v2` rows predict the codes of this run's `vqkd` row (`method.tokenizer`). Its "
            "budget is not the rows' budget: it is the kind of checkpoint a user distils from.", *others]


def render_markdown(results: dict) -> str:
    s = results["setup"]
    out = ["# MIM methods at equal CPU budget on Fashion-MNIST", ""]
    if s.get("smoke"):
        out += ["> **Smoke run.** The figures below come from a tiny run (budget, evaluation sizes or methods far "
                "below the full benchmark) made to check the script; they say nothing about the methods. "
                "They stand until the lead reruns the full benchmark (the command in the script's docstring).",
                ""]
    out += [
        "Generated by `benchmarks/methods.py`; do not edit by hand. Command:", "", "```",
        *s.get("commands", [s["command"]]), "```", "",
        f"Machine: {s['machine']}; {s['cpu_count']} CPUs visible, {s['threads']} torch threads; torch "
        f"{s['torch']}, Python {s['python']}; device {s['device']}. Started {s['started']}, total "
        f"{results.get('seconds', 0) / 60:.1f} min.", "",
        "## Setup", "",
        f"* **Budget:** {s['budget_s']:g} s of training per method. Each method is first timed for "
        f"{s['calibration_steps']} optimizer steps after {s['calibration_warmup']} warm-up steps (a fresh copy, "
        f"data loading included); then `optim.max_steps` = budget / (median s/step), so the lr schedule "
        f"and any curriculum span the run, and the method trains from scratch. `train s` is the time inside "
        f"optimizer steps; `wall s` adds setup, the validation pass and the checkpoint.",
        f"* **Recipes:** `configs/<method>_vit_tiny_fmnist.yaml`, with the same overrides for every method: "
        f"`{' '.join(s['common_overrides'])}`. All methods train on the same PretrainData (Fashion-MNIST "
        f"training split minus {100 * s['val_fraction']:g}% held out, same augmentation, order and seeds); batch "
        f"{s['batch_size']}.",
        "* **Losses:** `final train loss` is the mean over the last 10% of steps; `val_loss` is the trainer's "
        "fixed-mask held-out loss. Both are each method's own objective (pixels, HOG, features, different "
        "masks and normalisations): **they are not comparable across methods**, only along a method's curve. "
        "The probes are the comparable figures.",
        f"* **Probes** (the same for every encoder, mimkit.eval, `EvalConfig` defaults): tokens computed once "
        f"over {s['eval_train']:,} training images (seeded subset) and the first {s['eval_test']:,} test "
        f"images; weighted kNN on the class token (or the mean patch token where the recipe's `eval.pool` is mean, marked "
        f"(mean pool) after the method) (k={s['knn_k']}, T={s['knn_temperature']}); linear probe on "
        f"the class token (BatchNorm + linear, {s['linear_epochs']} epochs, lr swept and chosen on a "
        f"{100 * s['probe_val_fraction']:g}% validation split; same pooling); attentive probe: the cross-attention pooler "
        f"({s['attentive_heads']} heads) on the patch tokens of the first {s['attentive_train']:,} of those "
        f"training images, {s['attentive_epochs']} epochs. Accuracies in %.",
        f"* **{RANDOM}:** the MAE recipe's encoder, untrained (seed {s['seed']}): the floor (and **{RANDOM_MEAN}**, "
        f"the same encoder read through the mean patch token, the floor of rows whose `pool` is mean).",
        "* **Card claims:** checked only where a method card's small-scale claim fits this budget; the test is "
        "stated with the result. `not logged`: the method does not log the metric the check needs.",
        *teacher_note(results),
        "", "## Results", "", render_table(results), "",
    ]
    if results.get("figure"):
        out += [f"![normalised training loss per method]({results['figure']})", "",
                "Training loss divided by its first-step value against the fraction of the run (moving average "
                "over 5% of the steps); MAE's curve dashed for reference.", ""]
    claims = [(n, r["claim"]) for n, r in results["rows"].items() if (r.get("claim") or {}).get("claim")]
    if claims:
        out += ["## Card claims checked", "", "| method | claim | test | result | evidence |", "|---|---|---|---|---|"]
        for n, c in claims:
            out.append(f"| {n} | {_cell(c['claim'])} | {_cell(c['test'])} | **{c['status']}** | "
                       f"{_cell(c['evidence'])} |")
        out.append("")
    out += ["## Reading notes", "", "Generated from the numbers above.", ""]
    out += [f"* {t}" for t in reading_notes(results)]
    out.append("")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------------
# running


def evaluate(encoder, probe_data, args, ecfg, device, pool: str = "cls") -> dict:
    from mimkit.eval.attentive import attentive_probe
    from mimkit.eval.features import extract_tokens
    from mimkit.eval.knn import knn_accuracy
    from mimkit.eval.linear import linear_probe

    train, test = probe_data
    t0 = time.perf_counter()
    encoder = encoder.to(device).eval()
    ttr, ytr = extract_tokens(encoder, train, batch_size=ecfg.batch_size, device=device)
    tte, yte = extract_tokens(encoder, test, batch_size=ecfg.batch_size, device=device)
    out = {"tokens_s": time.perf_counter() - t0}
    # the recipe's eval.pool: the class token, or the mean patch token for methods that never train the class
    # token (I-JEPA's predictor reads patch tokens only)
    if pool == "mean":
        xtr, xte = ttr[:, 1:].float().mean(1), tte[:, 1:].float().mean(1)
    else:
        xtr, xte = ttr[:, 0].float(), tte[:, 0].float()
    out = {**out, "pool": pool}
    out["knn"] = float(knn_accuracy(xtr, ytr, xte, yte, k=ecfg.knn_k, temperature=ecfg.knn_temperature))
    lp = linear_probe(xtr, ytr, xte, yte, ecfg.linear_lrs, ecfg.linear_epochs, ecfg.batch_size, ecfg.val_fraction,
                      ecfg.linear_weight_decay, ecfg.seed, num_classes=10)
    out["linear"], out["linear_lr"] = lp["test_acc"], lp["best_lr"]
    na = min(len(ttr), args.attentive_train)
    ap = attentive_probe(ttr[:na].float(), ytr[:na], tte.float(), yte, kinds=("cross_attention",),
                         epochs=ecfg.attentive_epochs, lr=ecfg.attentive_lr, num_heads=ecfg.attentive_heads,
                         val_fraction=ecfg.val_fraction, seed=ecfg.seed, num_classes=10)
    out["attentive"] = ap["rows"][0]["test_acc"]
    out.update(attention_stats(encoder, test, device))
    out["eval_s"] = time.perf_counter() - t0
    return out


def attention_stats(encoder, test, device, images: int = 64) -> dict:
    """The last block's attention NMI and mean attention distance (pixels), averaged over heads, on the first
    test images (`mimkit.eval.analysis`, what "What do self-supervised ViTs learn?" reads); {} for encoders
    whose attention cannot be read."""
    from mimkit.eval.analysis import attention_nmi, mean_attention_distance

    x = torch.stack([test[i]["image"] for i in range(min(images, len(test)))]).to(device)
    try:
        return {"attn_nmi": float(attention_nmi(encoder, x, layers=[-1]).mean()),
                "attn_distance": float(mean_attention_distance(encoder, x, layers=[-1]).mean())}
    except (ValueError, AttributeError, TypeError):
        return {}


def run_method(name: str, args, common: list[str], base_cfg, data, probe_data, ecfg, device, rows) -> dict:
    from mimkit.config import load_config
    from mimkit.engine import train

    row: dict = {"method": name, "stage": "config", "eval_test": len(probe_data[1])}
    base, variant = split_variant(name)
    recipe = ROOT / "configs" / f"{recipe_of(base)}_vit_tiny_fmnist.yaml"
    try:
        if not recipe.is_file():
            raise FileNotFoundError(f"no recipe {recipe.relative_to(ROOT)}")
        row["recipe"] = str(recipe.relative_to(ROOT))
        if variant:
            row["overrides"] = variant
        wiring = wiring_overrides(load_config(recipe, common + variant).method, args, rows)
        if wiring:
            row["wiring"] = wiring
        cfg = load_config(recipe, common + wiring + variant)
        if cfg.data != base_cfg.data:  # one dataset for all: the recipe's data section is replaced
            row["note"] = "recipe's data section replaced by the shared one"
            cfg = cfg.model_copy(update={"data": base_cfg.data})
        row["stage"] = "calibration"
        cal = calibrate(cfg, data, args.calibration_warmup, args.calibration_steps)
        budget = args.teacher_budget_s if is_teacher_row(name) else args.budget_s
        row["budget_s"] = budget
        steps = steps_for_budget(budget, cal["s_per_step"], args.min_steps)
        row.update({"s_per_step": cal["s_per_step"], "calibration_times": cal["step_times"], "max_steps": steps})
        log(f"{name}: {cal['s_per_step']:.3f} s/step -> {steps} steps of {cfg.optim.batch_size}")
        cfg = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"max_steps": steps})})
        row["stage"] = "training"
        t = time.perf_counter()
        res = train(cfg, data=data)
        row["wall_s"] = time.perf_counter() - t
        m, hist = res.metrics, res.history
        losses = _series(hist, "loss")
        tail = losses[-max(1, len(losses) // 10):]
        row.update({
            "steps": int(m["global_step"]), "batch_size": cfg.optim.batch_size,
            "images_seen": int(m["global_step"]) * cfg.optim.batch_size, "images_per_s": float(m["images_per_s"]),
            "train_s": int(m["global_step"]) * cfg.optim.batch_size / max(float(m["images_per_s"]), 1e-9),
            "loss_first": losses[0] if losses else None, "loss_final": _mean(tail) if tail else None,
            "val_loss": None if m.get("val_loss") is None else float(m["val_loss"]),
            "history": hist, "run_dir": str(res.run_dir),
        })
        log(f"{name}: {row['steps']} steps in {row['train_s']:.0f}s ({row['images_per_s']:.1f} img/s), loss "
            f"{_num(row['loss_first'])} -> {_num(row['loss_final'])}, val_loss {_num(row['val_loss'])}")
        row["stage"] = "evaluation"
        row.update(evaluate(res.method.encoder, probe_data, args, ecfg, device, cfg.eval.pool))
        log(f"{name}: kNN {_pct(row['knn'])}%, linear {_pct(row['linear'])}%, attentive "
            f"{_pct(row['attentive'])}% ({row['eval_s']:.0f}s)")
        row["stage"] = "done"
        del res
    except Exception as err:  # report and go on with the next method
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
        row["traceback"] = traceback.format_exc()
        log(f"{name}: FAILED during {row['stage']}: {row['error']}")
    row["claim"] = check_claim(name, row.get("history") or [], row, rows)
    return row


def recipe_of(row_name: str) -> str:
    """The recipe a row trains: "teacher" is MAE's, "teacher:ibot" ibot's, any other row its own."""
    if row_name == TEACHER:
        return "mae"
    return row_name[len(TEACHER_OF):] if row_name.startswith(TEACHER_OF) else row_name


def is_teacher_row(name: str) -> bool:
    return name == TEACHER or name.startswith(TEACHER_OF)


def teacher_for(args) -> dict[str, str]:
    """--teacher-for FIELD=ROW pairs: teacher field FIELD reads row ROW's run instead of the teacher row's."""
    out = {}
    for pair in args.teacher_for:
        field, sep, row = pair.partition("=")
        if not sep or not field or not row:
            raise SystemExit(f"--teacher-for {pair!r}: write FIELD=ROW, e.g. feature_teacher=teacher:ibot")
        out[field.strip()] = row.strip()
    return out


def wiring_overrides(method_cfg, args, rows: dict) -> list[str]:
    """What a method needs from outside its recipe: every frozen-teacher field (a TeacherConfig) reads the
    benchmark's teacher (the "teacher" row's run, or --teacher) unless --teacher-for gives it another row's
    run, and a `tokenizer` field (BEiT v2) the vqkd row's run. The recipes name runs under runs/ that a user
    makes first; here they come from this run."""
    from mimkit.targets.teacher import teacher_fields

    out = []
    chosen = teacher_for(args)
    for f in teacher_fields(type(method_cfg)):
        if f in chosen:
            source = (rows.get(chosen[f]) or {}).get("run_dir")
            if not source or rows[chosen[f]].get("stage") != "done":
                raise ValueError(f"{method_cfg.name}.{f} reads row {chosen[f]!r} (--teacher-for), which has not run "
                                 "to the end before it")
        else:
            source = args.teacher or (rows.get(TEACHER) or {}).get("run_dir")
            if not source:
                raise ValueError(f"{method_cfg.name} needs a teacher: give --teacher RUN or --teacher-budget-s S")
        out.append(f"method.{f}.source={source}")
    if "tokenizer" in type(method_cfg).model_fields:
        vqkd = (rows.get("vqkd") or {}).get("run_dir")
        if not vqkd or (rows.get("vqkd") or {}).get("stage") != "done":
            raise ValueError(f"{method_cfg.name} predicts the codes of a VQ-KD tokenizer: run the vqkd row first")
        out.append(f"method.tokenizer={vqkd}")
    return out


def split_variant(name: str) -> tuple[str, list[str]]:
    """"ibot[mim_weight=0]" -> ("ibot", ["method.mim_weight=0"]): a row for a method's recipe with method
    overrides (several separated by ";"), so an ablation or variant gets its own row beside the method."""
    if "[" not in name:
        return name, []
    if not name.endswith("]"):
        raise ValueError(f"bad method variant {name!r}; write name[key=value;key=value]")
    base, inner = name[:-1].split("[", 1)
    return base, [f"method.{kv.strip()}" for kv in inner.split(";") if kv.strip()]


def split_top(spec: str) -> list[str]:
    """Split a --methods list at commas outside brackets (a variant may hold a comma: stop[sigma=0.5])."""
    parts, depth, cur = [], 0, ""
    for ch in spec:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def resolve_methods(spec: str) -> list[str]:
    from mimkit.methods import METHODS

    names = list(METHODS) if spec == "all" else [s.strip() for s in split_top(spec) if s.strip()]
    # MAE first: the claims and the figure compare with it
    return (["mae"] if "mae" in names else []) + [n for n in names if n != "mae"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget-s", type=float, default=120.0, help="training seconds per method")
    p.add_argument("--methods", default="all", help="all, or a comma list (e.g. mae,simmim)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128, help="global batch of every method")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="data loader workers (0: in the training process)")
    p.add_argument("--eval-train", type=int, default=5000, help="probe training images (seeded subset)")
    p.add_argument("--eval-test", type=int, default=2000, help="probe test images (the first ones)")
    p.add_argument("--attentive-train", type=int, default=2000, help="of those, for the attentive probe")
    p.add_argument("--calibration-steps", type=int, default=4)
    p.add_argument("--calibration-warmup", type=int, default=2)
    p.add_argument("--min-steps", type=int, default=5)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override applied to every method's recipe (repeatable), e.g. model.depth=6")
    p.add_argument("--teacher", help="a mimkit run (or checkpoint) as the frozen teacher of every teacher field")
    p.add_argument("--teacher-budget-s", type=float, default=300.0,
                   help="without --teacher: train the MAE recipe this long first (the \"teacher\" row) when some "
                        "method needs a teacher")
    p.add_argument("--teacher-for", action="append", default=[], metavar="FIELD=ROW",
                   help="teacher field FIELD of every row reads the run of row ROW of this benchmark, e.g. "
                        "feature_teacher=teacher:ibot (a \"teacher:<recipe>\" row trains that recipe for "
                        "--teacher-budget-s and runs first)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--work-dir", help="run folders go here (default: a temporary folder, removed at the end)")
    p.add_argument("--keep-runs", action="store_true", help="keep each method's run folder")
    p.add_argument("--out", default="docs/methods.md")
    p.add_argument("--figure", help="loss-curve SVG (default: figures/methods_loss.svg beside --out)")
    p.add_argument("--json", help="write every figure (with histories) here")
    p.add_argument("--merge", action="append", default=[],
                   help="a previous --json (repeatable): its rows are kept (and its random-init row reused) unless "
                        "rerun here; the setups must match (budget, batch, seed, probes). With --methods '' the "
                        "merged rows are only re-rendered")
    args = p.parse_args(argv)
    merged = merge_results([json.loads(Path(m).read_text()) for m in args.merge]) if args.merge else None

    torch.set_num_threads(args.threads)
    from mimkit.config import EvalConfig, load_config
    from mimkit.data import build_labelled, build_pretrain_data
    from mimkit.eval.protocols import limit_dataset

    t_all = time.perf_counter()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="mimkit-methods-"))
    work.mkdir(parents=True, exist_ok=True)
    common = [f"optim.batch_size={args.batch_size}", f"trainer.seed={args.seed}", "trainer.progress=false",
              f"trainer.accelerator={args.device}", "eval.recon_every_epochs=0", "eval.visualize=false",
              f"data.num_workers={args.workers}", f"trainer.out_dir={work}"]
    common_all = common + list(args.set)
    methods = resolve_methods(args.methods)
    ecfg = EvalConfig()
    rows: dict = {}

    base_cfg = load_config(ROOT / "configs" / "mae_vit_tiny_fmnist.yaml", common_all) if "mae" in methods else None
    if base_cfg is None:  # no MAE asked for: the shared data still follow the MAE recipe's data section
        base_cfg = load_config(ROOT / "configs" / "mae_vit_tiny_fmnist.yaml", common_all)
    data = build_pretrain_data(base_cfg.data)
    dcfg = base_cfg.data.model_copy(update={"mean": list(data.mean), "std": list(data.std)})
    train_all = build_labelled(dcfg, "train", data.mean, data.std)
    test_all = build_labelled(dcfg, "test", data.mean, data.std)
    probe_data = (limit_dataset(train_all, args.eval_train, args.seed), limit_dataset(test_all, args.eval_test))
    if merged:  # before any training: rows measured differently must not share a table
        check_mergeable(merged["setup"], args, len(probe_data[0]), len(probe_data[1]))
    log(f"methods: {', '.join(methods)}; budget {args.budget_s:g}s each; batch {args.batch_size}; "
        f"{len(data.train)} training images; probes {len(probe_data[0])} / {len(probe_data[1])}; "
        f"{torch.get_num_threads()} threads; work dir {work}")

    extra_teachers = [r for r in teacher_for(args).values() if r.startswith(TEACHER_OF) and r not in methods]
    methods = list(dict.fromkeys(extra_teachers)) + methods  # a teacher:<recipe> row runs before its students
    if not args.teacher and any(needs_teacher(n) for n in methods) and TEACHER not in methods:
        methods = [TEACHER] + methods
    elif args.teacher and any(needs_teacher(n) for n in methods):
        rows[TEACHER] = given_teacher_row(args, probe_data, ecfg)  # probed like the rows, not trained here
    for i, name in enumerate(methods):
        rows[name] = run_method(name, args, common_all, base_cfg, data, probe_data, ecfg, args.device, rows)
        spent = time.perf_counter() - t_all
        log(f"{i + 1}/{len(methods)} methods done in {spent / 60:.1f} min; at this pace all of them and the "
            f"random-init row take about {spent / (i + 1) * (len(methods) + 0.5) / 60:.0f} min")

    if TEACHER in rows and TEACHER not in methods:  # a given --teacher, probed before the loop
        methods = [TEACHER] + methods
    if merged:
        kept = [n for n in merged["order"] if n not in FLOORS and n not in rows]
        rows = {**{n: merged["rows"][n] for n in kept}, **rows}
        methods = [n for n in merged["order"] if n in rows] + [n for n in methods if n not in merged["order"]]
    # the floors: the MAE recipe's encoder with no training, read like the rows (class token; mean patch token
    # too when some recipe pools that way)
    floors = [(RANDOM, "cls")] + ([(RANDOM_MEAN, "mean")] if any(r.get("pool") == "mean" for r in rows.values())
                                  else [])
    for floor, pool in floors:
        rows[floor] = random_floor(floor, pool, merged, base_cfg, data, probe_data, args, ecfg)
    # claims that compare with other rows (DMJD vs MAE) see every row now
    for name in methods:
        rows[name]["claim"] = check_claim(name, rows[name].get("history") or [], rows[name], rows)

    shrunk = any(s.startswith(("model.depth", "data.limit")) for s in args.set)
    smoke = args.budget_s < 60 or args.eval_train < 2000 or args.eval_test < 1000 or shrunk
    command = ".venv/bin/python benchmarks/methods.py " + shlex.join(argv)
    results = {
        "setup": {
            "command": command,
            "commands": (merged["setup"].get("commands") or [merged["setup"]["command"]]) + [command] if merged
            else [command],
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", {platform.system()}",
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "device": args.device, "started": started,
            "budget_s": args.budget_s, "batch_size": args.batch_size, "seed": args.seed,
            "methods": methods, "common_overrides": [c for c in common_all if not c.startswith("trainer.out_dir")],
            "val_fraction": base_cfg.data.val_fraction, "train_images": len(data.train),
            "eval_train": len(probe_data[0]), "eval_test": len(probe_data[1]),
            "attentive_train": min(args.attentive_train, len(probe_data[0])),
            "knn_k": ecfg.knn_k, "knn_temperature": ecfg.knn_temperature, "linear_epochs": ecfg.linear_epochs,
            "probe_val_fraction": ecfg.val_fraction, "attentive_epochs": ecfg.attentive_epochs,
            "attentive_heads": ecfg.attentive_heads, "calibration_steps": args.calibration_steps,
            "calibration_warmup": args.calibration_warmup, "smoke": smoke,
            "teacher_for": list(dict.fromkeys(((merged["setup"].get("teacher_for") or []) if merged else [])
                                              + list(args.teacher_for))),
        },
        "order": methods + [f for f in FLOORS if f in rows], "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig = Path(args.figure) if args.figure else out.parent / "figures" / "methods_loss.svg"
    svg = loss_figure(rows, results["order"])
    if svg:
        fig.parent.mkdir(parents=True, exist_ok=True)
        fig.write_text(svg)
        results["figure"] = os.path.relpath(fig, out.parent).replace(os.sep, "/")
    results["seconds"] = time.perf_counter() - t_all
    if args.json:  # first: the figures survive a bug in the rendering (re-render them with --merge)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))
        log(f"wrote {args.json}")
    out.write_text(render_markdown(results))
    log(f"wrote {out}" + (f" and {fig}" if svg else ""))
    print()
    print(render_table(results))
    if not args.keep_runs:
        for row in rows.values():
            if row.get("run_dir"):
                shutil.rmtree(row["run_dir"], ignore_errors=True)
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return exit_status(rows)


def needs_teacher(name: str) -> bool:
    """Does this row's recipe have a frozen-teacher field (so the run needs a teacher row or --teacher)?"""
    from mimkit.config import load_config
    from mimkit.targets.teacher import teacher_fields

    recipe = ROOT / "configs" / f"{split_variant(name)[0]}_vit_tiny_fmnist.yaml"
    return recipe.is_file() and bool(teacher_fields(type(load_config(recipe).method)))


def merge_results(runs: list[dict]) -> dict:
    """Several --json results as one: rows in order of first appearance, a later run's row replacing an
    earlier one's; the first run's setup (the others are checked against it), every command kept."""
    out = {"setup": dict(runs[0]["setup"]), "order": [], "rows": {}}
    commands, teacher_for = [], []
    for run in runs:
        for k in ("budget_s", "batch_size", "seed", "eval_train", "eval_test", "attentive_train", "device"):
            if run["setup"].get(k) != out["setup"].get(k):
                raise SystemExit(f"cannot merge runs measured differently: {k} {run['setup'].get(k)} vs "
                                 f"{out['setup'].get(k)}")
        commands += run["setup"].get("commands") or [run["setup"]["command"]]
        teacher_for += run["setup"].get("teacher_for") or []
        for name in run["order"]:
            if name not in out["order"]:
                out["order"].append(name)
            out["rows"][name] = run["rows"][name]
    out["setup"]["commands"] = list(dict.fromkeys(commands))
    out["setup"]["teacher_for"] = list(dict.fromkeys(teacher_for))
    return out


def given_teacher_row(args, probe_data, ecfg) -> dict:
    """The --teacher run's encoder through the same probes (what the distillation rows are compared with)."""
    from mimkit.engine.checkpoint import encoder_from_checkpoint, find_checkpoint, load_checkpoint

    row: dict = {"method": TEACHER, "stage": "evaluation", "eval_test": len(probe_data[1]), "run_dir": None,
                 "source": str(args.teacher)}
    try:
        path = find_checkpoint(args.teacher)
        encoder, cfg, ckpt = encoder_from_checkpoint(path)
        progress = load_checkpoint(path).get("progress") or {}
        row["steps"] = progress.get("global_step")
        row.update(evaluate(encoder, probe_data, args, ecfg, args.device, cfg.eval.pool))
        row["stage"] = "done"
        log(f"teacher {args.teacher}: kNN {_pct(row['knn'])}%, linear {_pct(row['linear'])}%")
    except Exception as err:
        row["error"] = f"{type(err).__name__}: {err}"[:300]
        row["traceback"] = traceback.format_exc()
    row["claim"] = {"status": "n/a", "claim": None, "evidence": f"the given frozen teacher ({args.teacher})"}
    return row


def random_floor(name: str, pool: str, merged, base_cfg, data, probe_data, args, ecfg) -> dict:
    """The untrained MAE-recipe encoder through the same probes (reused from a merged run when it has it)."""
    from mimkit.methods import build_method

    if merged and merged["rows"].get(name, {}).get("stage") == "done":
        return merged["rows"][name]
    rnd: dict = {"method": name, "stage": "evaluation", "eval_test": len(probe_data[1])}
    try:
        torch.manual_seed(args.seed)
        enc = build_method(base_cfg, tuple(data.img_size), int(data.channels)).encoder
        rnd.update(evaluate(enc, probe_data, args, ecfg, args.device, pool))
        rnd["stage"] = "done"
        log(f"{name}: kNN {_pct(rnd['knn'])}%, linear {_pct(rnd['linear'])}%, attentive {_pct(rnd['attentive'])}%")
    except Exception as err:
        rnd["error"] = f"{type(err).__name__}: {err}"[:300]
        rnd["traceback"] = traceback.format_exc()
    rnd["claim"] = {"status": "n/a", "claim": None, "evidence": "untrained floor"}
    return rnd


def check_mergeable(old: dict, args, eval_train: int, eval_test: int) -> None:
    """Rows of two runs share a table only if they were measured alike."""
    same = {"budget_s": args.budget_s, "batch_size": args.batch_size, "seed": args.seed, "eval_train": eval_train,
            "eval_test": eval_test, "attentive_train": min(args.attentive_train, eval_train), "device": args.device}
    diff = [f"{k}: {old.get(k)} there, {v} here" for k, v in same.items() if old.get(k) != v]
    if diff:
        raise SystemExit("cannot merge with a run measured differently: " + "; ".join(diff))


def exit_status(rows: dict) -> int:
    """Non-zero only when MAE was run and failed; other methods' failures are reported in the table."""
    mae = rows.get("mae")
    return 1 if mae is not None and mae.get("error") else 0


if __name__ == "__main__":
    raise SystemExit(main())
