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

The script is split by concern: `methods_runner.py` runs the rows, `methods_claims.py` decides the card claims
(one decision rule for paired per-seed comparisons, `paired_claim`), `methods_render.py` writes the report from
the results alone, `methods_rows.py` names the rows. This file is the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, also when loaded by file path

from methods_rows import (FLOORS, RANDOM, RANDOM_MEAN, ROOT, TEACHER, TEACHER_OF, is_teacher_row, recipe_of,
                          resolve_methods, split_top, split_variant)
from methods_claims import (check_cl_mim, check_claim, check_dmjd, check_hpm, check_hybrid_distill, check_maskalign,
                            check_mff, check_vqkd)
from methods_render import loss_figure, normalised_curve, reading_notes, render_markdown, render_table
from methods_runner import (check_mergeable, exit_status, given_teacher_row, log, merge_results, needs_teacher,
                            random_floor, run_method, steps_for_budget, teacher_for, wiring_overrides)


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


if __name__ == "__main__":
    raise SystemExit(main())
