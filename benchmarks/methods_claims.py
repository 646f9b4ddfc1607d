"""Card claims of the methods benchmark and how each is decided.

`paired_claim` is THE decision rule for comparing a method with its comparison row over pretraining seeds:
per-seed values paired by seed, a 95% t-interval on the mean paired difference, and "held" / "failed" /
"inconclusive" by where that interval lies ("insufficient seeds" below `MIN_SEEDS`). Every other threshold a
check uses (single-seed probes: two standard errors of the difference) is in this module too, next to the check
that uses it, and each check states its test in `CLAIMS`.
"""

from __future__ import annotations

import math
import time

from methods_rows import TEACHER, is_teacher_row, recipe_of, split_variant

MIN_SEEDS = 3  # fewer paired seeds than this decide nothing
CONFIDENCE = 0.95


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz's method)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularised incomplete beta function."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (0.5 < p < 1) of Student's t with `df` degrees of freedom, by bisection on `t_cdf`."""
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2.0


def paired_claim(values: dict | list, comparison: dict | list, direction: str = "above",
                 confidence: float = CONFIDENCE) -> dict:
    """Decide "this row is `direction` ("above" or "below") its comparison" from per-seed values.

    `values` and `comparison` are {seed: value} (paired on the seeds both have) or equal-length lists (paired by
    position). With d the paired differences (value - comparison) over n >= MIN_SEEDS seeds, the interval is
    mean(d) +- t_{(1 + confidence) / 2, n - 1} * sd(d) / sqrt(n) (sd with n - 1): "held" when it lies entirely on
    the claimed side of 0, "failed" when entirely on the other side, "inconclusive" when it contains 0; fewer
    seeds: "insufficient seeds". Returns {"status", "n", "mean", "low", "high", "seeds"}."""
    if direction not in ("above", "below"):
        raise ValueError(f"direction must be 'above' or 'below', got {direction!r}")
    if isinstance(values, dict) != isinstance(comparison, dict):
        raise ValueError("give both sides as {seed: value} or both as lists")
    if isinstance(values, dict):
        seeds = sorted(set(values) & set(comparison), key=str)
        pairs = [(float(values[s]), float(comparison[s])) for s in seeds]
    else:
        if len(values) != len(comparison):
            raise ValueError(f"{len(values)} values against {len(comparison)}: pair them by seed")
        seeds, pairs = list(range(len(values))), [(float(a), float(b)) for a, b in zip(values, comparison)]
    diffs = [a - b for a, b in pairs]
    n = len(diffs)
    out = {"n": n, "seeds": seeds, "mean": mean_of(diffs) if diffs else None, "low": None, "high": None}
    if n < MIN_SEEDS:
        return {**out, "status": "insufficient seeds"}
    mean = out["mean"]
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = t_quantile((1.0 + confidence) / 2.0, n - 1) * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    sign = 1.0 if direction == "above" else -1.0
    side_low, side_high = sorted((sign * low, sign * high))
    status = "held" if side_low > 0 else "failed" if side_high < 0 else "inconclusive"
    return {**out, "status": status, "low": low, "high": high}


def logged_series(history: list[dict], key: str) -> list[float]:
    return [float(h[key]) for h in history if key in h and h[key] is not None and math.isfinite(float(h[key]))]


def mean_of(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def _quarters(vals: list[float]) -> tuple[float, float, int]:
    q = max(1, len(vals) // 4)
    return mean_of(vals[:q]), mean_of(vals[-q:]), q


def check_hpm(history, row=None, rows=None):
    vals = logged_series(history, "rank_acc")
    if not vals:
        return "not logged", "no `rank_acc` in the training history"
    first, last, q = _quarters(vals)
    held = last > 0.5 and last > first
    return ("held" if held else "did not hold",
            f"rank_acc mean {first:.3f} over the first {q} steps -> {last:.3f} over the last {q} "
            f"({len(vals)} steps logged)")


def check_mff(history, row=None, rows=None):
    vals = logged_series(history, "fuse_shallow")
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


def probe_se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 1e-6) / max(1, n))


def compare_probe(row: dict | None, other: dict | None, key: str, name: str, other_name: str,
                  want: str = "above") -> tuple[str, str]:
    """Is `row`'s probe `key` above (or, want="differs", different from) `other`'s by more than two standard
    errors of the difference? Within them: inconclusive."""
    a, b = (row or {}).get(key), (other or {}).get(key)
    if a is None or b is None:
        return "n/a", f"needs both {name}'s and {other_name}'s {key} probe"
    n = int((row or {}).get("eval_test") or (other or {}).get("eval_test") or 1)
    se = math.sqrt(probe_se(a, n) ** 2 + probe_se(b, n) ** 2)
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
    se = math.sqrt(2) * probe_se(best_other, n)
    text = ", ".join(f"{k} {100 * v:.2f}%" for k, v in have.items()) + f" (kNN; 2 SE of a difference {200 * se:.2f})"
    if have["low"] < min(have["high"], have["hint"]):
        return ("held" if best_other - have["low"] > 2 * se else "inconclusive"), text
    # Low is not the lowest: a clear miss only if it beats the worse of the others beyond the noise
    return ("did not hold" if have["low"] - min(have["high"], have["hint"]) > 2 * se else "inconclusive"), text


def check_vqkd(history, row=None, rows=None):
    vals = logged_series(history, "code_usage")
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
