"""Small-compute MAE on Fashion-MNIST: a recipe search on a validation split, resumable row by row.

    python benchmarks/small_compute.py search --grid round1            # pretrain each trial x seed, probe on val
    python benchmarks/small_compute.py show --grid round1              # the table from the JSON alone
    python benchmarks/small_compute.py evidence --recipe demo --runs runs/demo-s0 runs/demo-s1 runs/demo-s2
    python benchmarks/render_results.py                                # docs/results.md from the JSON

`evidence` scores finished pretraining runs on the TEST split with the label-fraction protocol
(mimkit.eval.labels: every lr chosen on a validation split of the training images), each next to the same
architecture at random init and raw pixels, through the same code and splits; one JSON per run under
benchmarks/results/small_compute/evidence/<recipe>/, skipped when present.

Every trial x seed pretrains one MAE (`mimkit.engine.train`) on the 60k training images and scores the
encoder with the linear probe (lr chosen and accuracy measured on a validation split carved from a seeded
subset of the TRAINING images) and weighted kNN on the same split. The test split is never read here: it
decides nothing. The untrained encoder (the same trial at step 0, same init seed) is scored by the same code,
so each row carries its own random-init floor. Each finished (trial, seed) writes
benchmarks/results/small_compute/<grid>/<trial>-s<seed>.json; a rerun skips those, so a search can be
stopped at any moment and grown later.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from mimkit.config import apply_overrides, load_config
from mimkit.data import build_labelled, build_pretrain_data
from mimkit.engine import train
from mimkit.engine.checkpoint import encoder_from_checkpoint
from mimkit.engine.metrics import read_metrics
from torch.utils.data import Subset

from mimkit.eval.features import encode_dataset, pool_tokens
from mimkit.eval.knn import knn_classify
from mimkit.eval.labels import table_lines
from mimkit.eval.linear import carve_val, linear_probe
from mimkit.methods import build_method
from mimkit.pipeline import baseline_table

RESULTS = Path(__file__).parent / "results" / "small_compute"
BASE = ["data.source=fashion_mnist", "eval.knn=false", "eval.visualize=false", "trainer.progress=false",
        "eval.recon_every_epochs=0"]
PROBE_IMAGES = 20000   # seeded subset of the training split that the probes see (split into probe-train/val)
PROBE_VAL = 0.25

# name -> overrides; the grids are the search as run (results/small_compute/<grid>/ holds what they gave)
GRIDS: dict[str, dict[str, list[str]]] = {
    "round1": {
        "tiny-d6-p7-e3": ["model.encoder=vit_tiny", "model.depth=6", "model.patch_size=7", "optim.epochs=3"],
        "micro-p4-e3": ["model.encoder=vit_micro", "model.patch_size=4", "optim.epochs=3"],
        "nano-p4-e3": ["model.encoder=vit_nano", "model.patch_size=4", "optim.epochs=3"],
        "micro-p7-e6": ["model.encoder=vit_micro", "model.patch_size=7", "optim.epochs=6"],
    },
    # decoder size, batch and mask ratio around round1's first row
    "round2": {
        "tiny-d6-p7-e3-dec4x256": ["model.encoder=vit_tiny", "model.depth=6", "model.patch_size=7", "optim.epochs=3",
                                   "model.decoder=small"],
        "tiny-d6-p7-e3-b128": ["model.encoder=vit_tiny", "model.depth=6", "model.patch_size=7", "optim.epochs=3",
                               "optim.batch_size=128"],
        "tiny-d6-p7-e3-mask60": ["model.encoder=vit_tiny", "model.depth=6", "model.patch_size=7", "optim.epochs=3",
                                 "method.mask_ratio=0.6"],
    },
    # learning rate and mask ratio around round2's b128 row (the demo recipe at 3 epochs)
    "round3": {
        "tiny-d6-p7-e3-b128-blr4e-3": ["model.encoder=vit_tiny", "model.depth=6", "model.patch_size=7",
                                       "optim.epochs=3", "optim.batch_size=128", "optim.base_lr=4e-3"],
        "tiny-d6-p7-e3-b128-mask60": ["model.encoder=vit_tiny", "model.depth=6", "model.patch_size=7",
                                      "optim.epochs=3", "optim.batch_size=128", "method.mask_ratio=0.6"],
    },
}


def probe_split(labels: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into the training split: a seeded PROBE_IMAGES subset, then its probe-train / val halves."""
    g = torch.Generator().manual_seed(seed)
    subset = torch.randperm(labels.shape[0], generator=g)[:PROBE_IMAGES].sort().values
    tr, va = carve_val(labels[subset], PROBE_VAL, seed)
    return subset[tr], subset[va]


def score_encoder(encoder, cfg, data) -> dict:
    """Linear probe and kNN of `encoder` (class token and mean patch token) on the probe split of the
    training images only."""
    train = build_labelled(cfg.data, "train", data.mean, data.std)
    tr, va = probe_split(torch.as_tensor(train.source.labels)[train.indices] if hasattr(train.source, "labels")
                         else torch.tensor([train[i]["label"] for i in range(len(train))]))
    both = torch.cat([tr, va])  # probe-train first, then val

    def fn(enc, x):
        tokens = enc(x)
        return [pool_tokens(tokens, "cls").float(), pool_tokens(tokens, "mean").float()]

    feats, y = encode_dataset(encoder, Subset(train, both.tolist()), fn, batch_size=512)
    n_tr = tr.numel()
    out = {}
    for pool, x in zip(("cls", "mean"), feats):
        # linear_probe carves its own val from its first argument (the lr choice): we score on our val half
        lin = linear_probe(x[:n_tr], y[:n_tr], x[n_tr:], y[n_tr:], val_fraction=0.1, epochs=30, num_classes=10)
        knn = knn_classify(x[:n_tr], y[:n_tr], x[n_tr:], k=20, temperature=0.07, num_classes=10)
        out[pool] = {"linear_val": lin["test_acc"], "linear_lr": lin["best_lr"],
                     "knn_val": float((knn == y[n_tr:]).float().mean())}
    return out


def run_trial(grid: str, trial: str, seed: int, overrides: list[str], out: Path) -> dict:
    cfg = load_config(None, BASE + overrides + [f"trainer.seed={seed}", f"trainer.out_dir={tempfile.gettempdir()}/mimkit-sc",
                                               f"trainer.run_name={grid}-{trial}-s{seed}"])
    data = build_pretrain_data(cfg.data)
    torch.manual_seed(seed)  # as the trainer does before it builds the method: the same initial weights
    untrained = build_method(cfg, tuple(data.img_size), int(data.channels))
    row: dict = {"grid": grid, "trial": trial, "seed": seed, "overrides": overrides}
    for pool, scores in score_encoder(untrained.encoder, cfg, data).items():
        row[f"untrained_{pool}"] = scores
    start = time.perf_counter()
    result = train(cfg, data=data)
    row["pretrain_s"] = time.perf_counter() - start
    row["steps"] = result.metrics.get("global_step")
    row["final_loss"] = result.metrics.get("loss")
    row["val_loss"] = result.metrics.get("val_loss")
    for pool, scores in score_encoder(result.method.encoder, cfg, data).items():
        row[f"mae_{pool}"] = scores
    row["machine"] = {"host": platform.node(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                      "load_avg_end": os.getloadavg()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(row, indent=1))
    tmp.replace(out)
    return row


def show(grid: str) -> None:
    rows = [json.loads(p.read_text()) for p in sorted((RESULTS / grid).glob("*.json"))]
    print(f"{'trial':22s} seed  steps  min   lin cls/mean (untrained)          knn cls/mean (untrained)")
    for r in rows:
        m, u = r["mae_cls"], r["untrained_cls"]
        mm, um = r["mae_mean"], r["untrained_mean"]
        print(f"{r['trial']:22s} {r['seed']:4d} {r['steps']:6d} {r['pretrain_s'] / 60:4.1f}  "
              f"{m['linear_val']:.3f}/{mm['linear_val']:.3f} ({u['linear_val']:.3f}/{um['linear_val']:.3f})  "
              f"{m['knn_val']:.3f}/{mm['knn_val']:.3f} ({u['knn_val']:.3f}/{um['knn_val']:.3f})")




def run_evidence(recipe: str, run_dir: Path, cells: list[str] | None, overrides: list[str]) -> Path:
    """The label table of one finished run (pretrained / random init / raw pixels), written as JSON; `cells`
    None: the run's own eval.label_cells (its recipe's)."""
    out = RESULTS / "evidence" / recipe / f"{run_dir.name}.json"
    if out.exists():
        return out
    ckpt_path = run_dir / "checkpoints" / "last.ckpt"
    encoder, cfg, ckpt = encoder_from_checkpoint(ckpt_path)
    progress = ckpt["progress"]
    if progress["global_step"] < progress.get("total_steps", progress["global_step"]):
        raise SystemExit(f"{run_dir}: the run has not finished")
    if cells:
        cfg = apply_overrides(cfg, [f"eval.label_cells={json.dumps(cells)}"])
    cfg = apply_overrides(cfg, list(overrides))
    start = time.perf_counter()
    table = baseline_table(encoder, cfg, ckpt["data"]["mean"], ckpt["data"]["std"])
    payload = {
        "recipe": recipe, "run": run_dir.name, "seed": cfg.trainer.seed, "table": table,
        "config": json.loads(cfg.model_dump_json()), "eval_s": time.perf_counter() - start,
        # config.yaml is written as the run starts and last.ckpt as it ends (wall clock, load included)
        "pretrain_wall_s": ckpt_path.stat().st_mtime - (run_dir / "config.yaml").stat().st_mtime,
        "pretrain_rows": read_metrics(run_dir / "metrics.csv") if (run_dir / "metrics.csv").exists() else [],
        "machine": {"host": platform.node(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                    "load_avg_end": os.getloadavg()},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(out)
    print("\n".join(table_lines(table)), flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["search", "show", "evidence"])
    ap.add_argument("--grid", choices=sorted(GRIDS))
    ap.add_argument("--recipe", help="evidence: the recipe's name (the results folder)")
    ap.add_argument("--runs", nargs="*", default=[], help="evidence: finished run folders")
    ap.add_argument("--cells", default=None, help="evidence: protocol@fraction cells (default: the run's own "
                    "eval.label_cells)")
    ap.add_argument("overrides", nargs="*", default=[], help="evidence: eval.* overrides")
    ap.add_argument("--trials", default=None, help="comma-separated subset of the grid's trials")
    ap.add_argument("--seeds", default="0", help="comma-separated pretraining seeds")
    args = ap.parse_args(argv)
    if args.command == "evidence":
        for run in args.runs:
            cells = args.cells.split(",") if args.cells else None
            print(run_evidence(args.recipe, Path(run), cells, args.overrides), flush=True)
        return 0
    if args.grid is None:
        ap.error("--grid is required for search and show")
    if args.command == "show":
        show(args.grid)
        return 0
    trials = GRIDS[args.grid]
    names = args.trials.split(",") if args.trials else list(trials)
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in names:
            out = RESULTS / args.grid / f"{name}-s{seed}.json"
            if out.exists():
                continue
            row = run_trial(args.grid, name, seed, trials[name], out)
            print(json.dumps({k: row[k] for k in ("trial", "seed", "steps", "pretrain_s", "mae_cls", "mae_mean",
                                                  "untrained_cls", "untrained_mean")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
