"""docs/results.md from the committed JSON alone (benchmarks/results/small_compute/evidence/<recipe>/*.json).

    python benchmarks/render_results.py [--out docs/results.md]

Each recipe's table: every encoder row (pretrained, the same architecture at random init, raw pixels) and
every protocol@label-fraction cell, as mean +- sample std over the pretraining seeds. Each target of issue 14
is decided by methods_claims.paired_claim (95% t-interval of the per-seed paired difference, >= 3 seeds):
"held" only when the whole interval clears the target. Nothing is trained or evaluated here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from methods_claims import paired_claim  # noqa: E402  (benchmarks/ is not a package)

EVIDENCE = Path(__file__).parent / "results" / "small_compute" / "evidence"

# recipe -> [(description, row, cell, comparison row or None, comparison cell, margin)]: "row's cell >=
# comparison's cell + margin" (or >= margin alone when comparison is None), decided per seed, paired
TARGETS = {
    "demo": [
        ("linear probe >= random init + 5", "pretrained", "linear@1", "random_init", "linear@1", 0.05),
        ("1%-label fine-tune >= from scratch + 5", "pretrained", "finetune@0.01", "random_init", "finetune@0.01", 0.05),
        ("linear probe above random init", "pretrained", "linear@1", "random_init", "linear@1", 0.0),
        ("kNN above random init", "pretrained", "knn@1", "random_init", "knn@1", 0.0),
        ("linear probe above raw pixels", "pretrained", "linear@1", "raw_pixels", "linear@1", 0.0),
    ],
    "long": [
        ("linear probe >= 87%", "pretrained", "linear@1", None, "linear@1", 0.87),
        ("linear probe >= raw pixels + 2", "pretrained", "linear@1", "raw_pixels", "linear@1", 0.02),
        ("kNN >= raw pixels' kNN", "pretrained", "knn@1", "raw_pixels", "knn@1", 0.0),
        ("linear probe above random init", "pretrained", "linear@1", "random_init", "linear@1", 0.0),
        ("1%-label fine-tune above from scratch", "pretrained", "finetune@0.01", "random_init", "finetune@0.01", 0.0),
        ("10%-label fine-tune above from scratch", "pretrained", "finetune@0.1", "random_init", "finetune@0.1", 0.0),
    ],
}


def load(recipe_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(recipe_dir.glob("*.json"))]


def cell_values(runs: list[dict], row: str, cell: str) -> dict:
    """{seed: value} of one row's cell over the runs."""
    out = {}
    for r in runs:
        v = r["table"]["rows"].get(row, {}).get(cell)
        if v is not None:
            out[r["seed"]] = float(v["value"])
    return out


def fmt(values: dict) -> str:
    v = list(values.values())
    if not v:
        return "n/a"
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{100 * statistics.fmean(v):.2f} +- {100 * sd:.2f} ({len(v)})"


def decide(runs: list[dict], row: str, cell: str, other: str | None, other_cell: str, margin: float) -> dict:
    mine = cell_values(runs, row, cell)
    theirs = cell_values(runs, other, other_cell) if other else {s: 0.0 for s in mine}
    shifted = {s: v - margin for s, v in mine.items()}
    return paired_claim(shifted, theirs, "above")


def render_recipe(name: str, runs: list[dict]) -> list[str]:
    cells = runs[0]["table"]["cells"]
    rows = list(runs[0]["table"]["rows"])
    pretrain_min = [r["pretrain_wall_s"] / 60 for r in runs]
    loads = ", ".join(f"{r['machine']['load_avg_end'][0]:.1f}" for r in runs)
    eval_min = ", ".join(f"{r['eval_s'] / 60:.1f}" for r in runs)
    machine = runs[0]["machine"]
    lines = [f"## {name}", "",
             f"Seeds: {sorted(r['seed'] for r in runs)}. Evaluation wall time per seed: "
             f"{eval_min} min; machine: {machine['host']} ({machine['cpus']} CPUs, {machine['threads']} torch "
             f"threads), 1-min load average at the end of each evaluation: {loads}.",
             "Pretraining wall time per seed (start to last checkpoint): "
             + ", ".join(f"{m:.1f}" for m in pretrain_min) + " min.", "",
             "Top-1 on the Fashion-MNIST test split, % (mean +- sample std (seeds)); every lr chosen on a "
             "validation split of the training images:", "",
             "| encoder | " + " | ".join(cells) + " |", "|---" * (len(cells) + 1) + "|"]
    for row in rows:
        lines.append(f"| {row} | " + " | ".join(fmt(cell_values(runs, row, c)) for c in cells) + " |")
    lines += ["", "| target | paired difference - margin, mean [95% interval], points | verdict |", "|---|---|---|"]
    for desc, row, cell, other, other_cell, margin in TARGETS.get(name, []):
        if cell not in cells:
            continue
        d = decide(runs, row, cell, other, other_cell, margin)
        interval = "n/a" if d["low"] is None else f"{100 * d['mean']:+.2f} [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}]"
        lines.append(f"| {desc} | {interval} (n={d['n']}) | {d['status']} |")
    return lines + [""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).parents[1] / "docs" / "results.md"))
    args = ap.parse_args(argv)
    lines = ["# Results at small compute", "",
             "Generated by `python benchmarks/render_results.py` from benchmarks/results/small_compute/evidence/ "
             "(written by `python benchmarks/small_compute.py evidence`); do not edit by hand.", ""]
    for recipe_dir in sorted(p for p in EVIDENCE.iterdir() if p.is_dir()) if EVIDENCE.is_dir() else []:
        runs = load(recipe_dir)
        if runs:
            lines += render_recipe(recipe_dir.name, runs)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
