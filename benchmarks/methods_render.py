"""The methods benchmark's report, rendered from its results (the JSON) alone: the table, the loss-curve figure,
the setup and the reading notes."""

from __future__ import annotations

import math
import time

from methods_claims import logged_series, probe_se
from methods_rows import FLOORS, RANDOM, RANDOM_MEAN, TEACHER, TEACHER_OF, recipe_of


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
    vals = logged_series(history, key)
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


def fmt_pct(v) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


def fmt_num(v, fmt: str = ".4f") -> str:
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
            name + (" (mean pool)" if r.get("pool") == "mean" and name not in FLOORS else ""), fmt_num(r.get("steps"), "d"), fmt_num(r.get("images_seen"), ",d"), fmt_num(r.get("train_s"), ".0f"),
            fmt_num(r.get("wall_s"), ".0f"), fmt_num(r.get("images_per_s"), ".1f"), fmt_num(r.get("loss_final")),
            fmt_num(r.get("val_loss")), fmt_pct(r.get("knn")), fmt_pct(r.get("linear")), fmt_pct(r.get("attentive")),
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
    se = 100 * probe_se(0.75, n_test)
    notes.append(f"One seed and {n_test} test images: an accuracy near 75% has a standard error of about "
                 f"{se:.1f} points, so differences below about {2 * se * math.sqrt(2):.1f} points between two "
                 f"rows are within noise.")
    rnd = rows.get(RANDOM, {})
    for key, label in (("knn", "kNN"), ("linear", "linear probe"), ("attentive", "attentive probe")):
        have = [(rows[n][key], n) for n in trained if rows[n].get(key) is not None]
        if not have:
            continue
        best_v, best = max(have)
        text = f"{label}: best {best} ({fmt_pct(best_v)}%)"
        if "mae" in rows and rows["mae"].get(key) is not None:
            rank = sorted((v for v, _ in have), reverse=True).index(rows["mae"][key]) + 1
            text += f"; MAE {fmt_pct(rows['mae'][key])}% ranks {rank} of {len(have)}"
        if rnd.get(key) is not None:
            def floor(n):  # each row against the untrained encoder read the same way (class or mean token)
                f = rows.get(RANDOM_MEAN) if rows[n].get("pool") == "mean" else rnd
                return (f or rnd).get(key, rnd[key])

            r = rnd[key]
            above = [n for v, n in have if v > floor(n)]
            clear = [n for v, n in have if v - floor(n) > 2 * math.sqrt(2) * probe_se(floor(n), n_test)]
            below = [n for v, n in have if v <= floor(n)]
            text += (f"; {len(above)} of {len(have)} score above random init ({fmt_pct(r)}%"
                     + (f"; {fmt_pct(rows[RANDOM_MEAN][key])}% with mean pooling" if rows.get(RANDOM_MEAN, {}).get(key)
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
