"""Methods benchmark v2: every method for the same number of epochs (or MAE's CPU time), over several
pretraining seeds, one JSON per (row, seed), resumable at any row; the table is rendered from the JSON alone.

    python benchmarks/methods_v2.py run --methods mae,simmim,ibot --seeds 0,1,2 --epochs 1
    python benchmarks/methods_v2.py run --methods mae,simmim --seeds 0,1,2 --epochs 1 --equal-time
    python benchmarks/methods_v2.py render --name e1 --out docs/methods_v2.md

`run` trains each (row, seed) in its own process (`one`), so a crash costs one row and the row's peak memory
is its own, and writes benchmarks/results/methods_v2/<name>/<row>-s<seed>.json when the row is done; a rerun
skips every row whose JSON exists, so the command can be stopped at any moment and the table grown later
(more methods, more seeds). <name> is the budget: "e<epochs>" (equal epochs) or "e<epochs>-time" (each method
trains MAE's wall time for that many epochs: its epochs are scaled by MAE's seconds per step over its own,
both measured back to back in the row's process). setup.json there fixes how rows are measured; a run that
would measure differently under the same name is refused, naming the field.

Rows: `mae` first (it is every comparison's reference and, for the same seed, the frozen teacher of the
distillation methods and the tokenizer source is the `vqkd` row), then the asked methods, then `random init`,
the MAE recipe's encoder untrained (each seed its own init), scored by the same probes. Each row records the
cost (seconds per epoch, training FLOPs per image, peak resident memory), its loss history, and the probes of
benchmarks/methods_runner.evaluate (kNN, linear, attentive) on a seeded subset of the training images and the
first test images.

Claims are decided by methods_claims.paired_claim alone: paired by seed, held / failed / inconclusive from the
95% interval of the mean paired difference; CLAIMS below says which comparison each card's claim is.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, also when loaded by file path

from methods_claims import logged_series, paired_claim  # noqa: E402
from methods_rows import ROOT, recipe_of, resolve_methods, split_variant  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "methods_v2"
RUNS = ROOT / "runs" / "methods_v2"
MAE, RANDOM = "mae", "random init"
METRICS = ("linear", "knn", "attentive")
# a card's claim as a comparison of one probe, paired by seed: (metric, reference row, direction, the claim)
CLAIMS: dict[str, tuple[str, str, str, str]] = {
    "simmim": ("linear", MAE, "above", "SimMIM's mask tokens in the encoder: above MAE at equal epochs"),
    "dmjd": ("linear", MAE, "above", "DMJD: above MAE at equal wall-clock (read in the -time budget)"),
    "ibot": ("knn", MAE, "above", "iBOT's class-token distillation: kNN far above MAE's"),
    "cae": ("linear", MAE, "above", "CAE's separated encoder: linear probe above MAE's"),
    "localmim": ("linear", MAE, "above", "LocalMIM: MAE's accuracy in fewer epochs"),
    "maskfeat": ("linear", MAE, "above", "MaskFeat (HOG targets): above pixel targets"),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def budget_name(epochs: float, equal_time: bool) -> str:
    return f"e{epochs:g}" + ("-time" if equal_time else "")


def row_file(folder: Path, row: str, seed: int) -> Path:
    """<row>-s<seed>.json, the row name made safe for a file name (variants have brackets and '=')."""
    return folder / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', row)}-s{seed}.json"


def write_json(path: Path, payload: dict) -> None:
    """Atomically: a row's file exists only once it is whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=float))
    os.replace(tmp, path)


def setup_of(args) -> dict:
    return {"epochs": args.epochs, "equal_time": args.equal_time, "batch_size": args.batch_size,
            "eval_train": args.eval_train, "eval_test": args.eval_test, "attentive_train": args.attentive_train,
            "set": list(args.set)}


def check_setup(folder: Path, setup: dict) -> None:
    path = folder / "setup.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = [f"{k}: {old.get(k)!r} there, {v!r} here" for k, v in setup.items() if old.get(k) != v]
        if diff:
            raise SystemExit(f"{folder} holds rows measured differently ({'; '.join(diff)}); give another --name")
    else:
        write_json(path, setup)


def reads_tokenizer(row: str) -> bool:
    """Does this row's recipe predict the codes of a VQ-KD tokenizer (BEiT v2)? Then the vqkd row runs first."""
    from mimkit.config import load_config

    recipe = ROOT / "configs" / f"{recipe_of(split_variant(row)[0])}_vit_tiny_fmnist.yaml"
    return recipe.is_file() and "tokenizer" in type(load_config(recipe).method).model_fields


def plan(methods: list[str]) -> list[str]:
    """The rows in running order: mae first, vqkd before the methods that read its tokenizer (added when they
    are asked for), the floor last."""
    rows = [MAE] + [m for m in methods if m != MAE]
    if "vqkd" not in rows and any(reads_tokenizer(r) for r in rows):
        rows.append("vqkd")
    if "vqkd" in rows:
        rows.remove("vqkd")
        rows.insert(1, "vqkd")
    return rows + [RANDOM]


def run(args) -> int:
    name = args.name or budget_name(args.epochs, args.equal_time)
    folder = Path(args.results_dir) / name
    check_setup(folder, setup_of(args))
    rows = plan(resolve_methods(args.methods))
    failed = 0
    for seed in [int(s) for s in args.seeds.split(",")]:
        for row in rows:
            out = row_file(folder, row, seed)
            if out.exists():
                log(f"{row} seed {seed}: done before ({out.name}), skipped")
                continue
            log(f"{row} seed {seed}: running")
            rc = launch_row(args, name, row, seed)
            if rc != 0 or not out.exists():
                failed += 1
                log(f"{row} seed {seed}: FAILED (exit {rc}); a rerun tries it again")
    return 1 if failed else 0


def launch_row(args, name: str, row: str, seed: int) -> int:
    cmd = [sys.executable, str(Path(__file__).resolve()), "one", "--name", name, "--row", row, "--seed", str(seed),
           "--epochs", f"{args.epochs:g}", "--batch-size", str(args.batch_size), "--threads", str(args.threads),
           "--eval-train", str(args.eval_train), "--eval-test", str(args.eval_test),
           "--attentive-train", str(args.attentive_train), "--results-dir", str(args.results_dir),
           "--runs-dir", str(args.runs_dir)] + (["--equal-time"] if args.equal_time else [])
    for s in args.set:
        cmd += ["--set", s]
    return subprocess.call(cmd)


def flops_per_image(cfg, data) -> float:
    """Forward + backward FLOPs of one training step of a fresh copy of the method, per image
    (torch.utils.flop_counter: matrix multiplies and attention)."""
    from torch.utils.data import default_collate
    from torch.utils.flop_counter import FlopCounterMode

    from mimkit.methods import build_method, method_class

    specs = method_class(cfg.method.name).view_specs(cfg.method)
    if specs:  # the augmented views the trainer's loader would give (iBOT, ...)
        data = data.with_views(specs, cfg.data.crop_ratio)
    method = build_method(cfg, tuple(data.img_size), int(data.channels)).train()
    method.prepare(data.train, cfg.trainer.seed)
    n = min(16, len(data.train))
    batch = default_collate([data.train[(i, cfg.trainer.seed)] for i in range(n)])
    counter = FlopCounterMode(display=False)
    with counter:
        method(batch)["loss"].backward()
    return counter.get_total_flops() / n


def one(args) -> int:
    """One (row, seed): train, measure, probe, write its JSON."""
    import resource

    import torch

    torch.set_num_threads(args.threads)
    from methods_runner import calibrate, evaluate, wiring_overrides

    from mimkit.config import EvalConfig, load_config
    from mimkit.data import build_labelled, build_pretrain_data
    from mimkit.engine import train
    from mimkit.eval.protocols import limit_dataset
    from mimkit.methods import build_method

    from mimkit.engine.metrics import read_metrics

    folder, work = Path(args.results_dir) / args.name, Path(args.runs_dir) / args.name
    started, load_start, t_row = time.strftime("%Y-%m-%d %H:%M:%S"), os.getloadavg(), time.perf_counter()
    common = [f"optim.batch_size={args.batch_size}", f"trainer.seed={args.seed}", "trainer.progress=false",
              "eval.recon_every_epochs=0", "eval.visualize=false", "data.num_workers=0", "trainer.log_every_steps=1",
              f"trainer.out_dir={work}", f"trainer.run_name={args.row}-s{args.seed}", *args.set]
    mae_cfg = load_config(ROOT / "configs" / "mae_vit_tiny_fmnist.yaml", common)
    data = build_pretrain_data(mae_cfg.data)
    dcfg = mae_cfg.data.model_copy(update={"mean": list(data.mean), "std": list(data.std)})
    probe_data = (limit_dataset(build_labelled(dcfg, "train", data.mean, data.std), args.eval_train, args.seed),
                  limit_dataset(build_labelled(dcfg, "test", data.mean, data.std), args.eval_test))
    ecfg = EvalConfig()
    row: dict = {"row": args.row, "seed": args.seed, "started": started, "budget": args.name}
    if args.row == RANDOM:
        torch.manual_seed(args.seed)  # the MAE recipe's encoder as the trainer would initialise it for this seed
        encoder, pool = build_method(mae_cfg, tuple(data.img_size), int(data.channels)).encoder, mae_cfg.eval.pool
        row["recipe"] = "configs/mae_vit_tiny_fmnist.yaml (untrained)"
    else:
        base, variant = split_variant(args.row)
        recipe = ROOT / "configs" / f"{recipe_of(base)}_vit_tiny_fmnist.yaml"
        # the distillation rows' teacher and BEiT v2's tokenizer: the same seed's mae / vqkd runs of this budget
        given = {k: {"run_dir": str(work / f"{k}-s{args.seed}"), "stage": "done"} for k in (MAE, "vqkd")}
        given["teacher"] = given[MAE]
        wiring = wiring_overrides(load_config(recipe, common + variant).method, argparse.Namespace(
            teacher=None, teacher_for=[]), given)
        cfg = load_config(recipe, common + wiring + variant)
        cfg = cfg.model_copy(update={"data": dcfg})  # one dataset (and its statistics) for every row
        epochs = args.epochs
        if args.equal_time and args.row != MAE:
            mine, ref = calibrate(cfg, data)["s_per_step"], calibrate(mae_cfg, data)["s_per_step"]
            epochs = args.epochs * ref / mine
            row.update(s_per_step_calibrated=mine, mae_s_per_step_calibrated=ref)
        cfg = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"epochs": epochs, "max_steps": None})})
        row.update(recipe=str(recipe.relative_to(ROOT)), overrides=variant, wiring=wiring, epochs=epochs)
        try:
            row["flops_per_image"] = flops_per_image(cfg, data)
        except Exception as err:  # a cost figure: its failure is recorded, the row still trains
            row["flops_per_image"], row["flops_error"] = None, f"{type(err).__name__}: {err}"[:300]
        t = time.perf_counter()
        res = train(cfg, data=data, resume="auto")  # a row cut short continues from its checkpoint
        row["train_wall_s"] = time.perf_counter() - t
        m = res.metrics
        steps = int(m["global_step"])
        hist = read_metrics(res.run_dir / "metrics.csv")  # the whole run, also when it was resumed here
        keep = max(1, len(hist) // 200)
        row.update(steps=steps, batch_size=cfg.optim.batch_size, images_per_s=float(m.get("images_per_s") or 0),
                   s_per_epoch=row["train_wall_s"] / max(epochs, 1e-9), val_loss=m.get("val_loss"),
                   loss=logged_series(hist, "loss")[::keep], history_every=keep)
        encoder, pool = res.method.encoder, cfg.eval.pool
    row["eval"] = evaluate(encoder, probe_data, args, ecfg, "cpu", pool)
    row.update(peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, wall_s=time.perf_counter() - t_row,
               machine={"host": platform.node(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                        "load_avg_start": load_start, "load_avg_end": os.getloadavg()},
               ended=time.strftime("%Y-%m-%d %H:%M:%S"), eval_train=len(probe_data[0]), eval_test=len(probe_data[1]))
    write_json(row_file(folder, args.row, args.seed), row)
    log(f"{args.row} seed {args.seed}: linear {100 * row['eval']['linear']:.2f}%, kNN {100 * row['eval']['knn']:.2f}% "
        f"({row['wall_s'] / 60:.1f} min)")
    return 0


def load_rows(folder: Path) -> dict[str, dict[int, dict]]:
    """{row: {seed: result}} from the JSON files alone: mae first, the random-init floor last."""
    out: dict[str, dict[int, dict]] = {}
    for path in sorted(folder.glob("*-s*.json")):
        r = json.loads(path.read_text())
        out.setdefault(r["row"], {})[int(r["seed"])] = r
    order = sorted(out, key=lambda n: (n != MAE, n == RANDOM, n))
    return {n: dict(sorted(out[n].items())) for n in order}


def claims(rows: dict[str, dict[int, dict]]) -> list[dict]:
    """Every row against MAE and the random-init floor on the linear probe, and each card's claim of CLAIMS."""
    def values(row, metric):
        return {s: r["eval"][metric] for s, r in rows.get(row, {}).items()}

    out = []
    for row in rows:
        if row == RANDOM:
            continue
        tests = [("linear", RANDOM, "above", "linear probe above the untrained encoder")]
        card = CLAIMS.get(split_variant(row)[0])
        if row != MAE and not (card and card[:3] == ("linear", MAE, "above")):
            tests.append(("linear", MAE, "above", "linear probe above MAE's"))
        if card:
            tests.append(card)
        for metric, ref, direction, text in tests:
            if ref in rows:
                out.append({"row": row, "claim": text, "metric": metric, "against": ref,
                            **paired_claim(values(row, metric), values(ref, metric), direction)})
    return out


def loss_svg(rows: dict[str, dict[int, dict]]) -> str:
    """Each trained row's loss curve (its lowest seed), MAE's dashed beside it (methods_render.loss_figure)."""
    from methods_render import loss_figure

    first = {n: rs[min(rs)] for n, rs in rows.items() if n != RANDOM}
    return loss_figure({n: {"history": [{"loss": v} for v in r.get("loss") or []], "steps": r.get("steps")}
                        for n, r in first.items()}, list(first))


def render(folder: Path, figure: str | None = None) -> str:
    import statistics

    rows, setup = load_rows(folder), json.loads((folder / "setup.json").read_text())

    def cell(rs, key):
        vals = [key(r) for r in rs.values() if key(r) is not None]
        if not vals:
            return "n/a"
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{statistics.fmean(vals):.2f} +- {sd:.2f} ({len(vals)})"

    lines = [f"# Methods benchmark v2: {folder.name}", "",
             f"Generated by `python benchmarks/methods_v2.py render --name {folder.name}` from "
             f"benchmarks/results/methods_v2/{folder.name}/ alone; do not edit by hand.", "",
             f"Setup: {json.dumps(setup)}.", "",
             "Top-1 on the first test images, % (mean +- sample std over pretraining seeds (n)); cost per row:", "",
             "| row | epochs | linear | kNN | attentive | s/epoch | GFLOPs/image | peak MiB |", "|---" * 8 + "|"]
    for name, rs in rows.items():
        lines.append(f"| {name} | {cell(rs, lambda r: r.get('epochs'))} | "
                     + " | ".join(cell(rs, lambda r, m=m: 100 * r["eval"][m]) for m in METRICS)
                     + f" | {cell(rs, lambda r: r.get('s_per_epoch'))} | "
                     f"{cell(rs, lambda r: r['flops_per_image'] / 1e9 if r.get('flops_per_image') else None)} | "
                     f"{cell(rs, lambda r: r.get('peak_rss_mib'))} |")
    lines += ["", "Claims (methods_claims.paired_claim: paired by seed, 95% interval of the mean difference, points):",
              "", "| row | claim | against | difference [95% interval] | verdict |", "|---" * 5 + "|"]
    for c in claims(rows):
        diff = "n/a" if c["mean"] is None else f"{100 * c['mean']:+.2f}"
        if c["low"] is not None:
            diff += f" [{100 * c['low']:+.2f}, {100 * c['high']:+.2f}]"
        lines.append(f"| {c['row']} | {c['claim']} | {c['against']} | {diff} (n={c['n']}) | {c['status']} |")
    if figure:
        lines += ["", f"![loss per method, normalised by its first logged loss]({figure})"]
    lines += ["", "Runs (machine, threads, load average at start and end, wall time):", ""]
    for name, rs in rows.items():
        for seed, r in sorted(rs.items()):
            mc = r["machine"]
            lines.append(f"- {name} seed {seed}: {mc['host']} ({mc['cpus']} CPUs, {mc['threads']} threads), load "
                         f"{mc['load_avg_start'][0]:.1f} -> {mc['load_avg_end'][0]:.1f}, {r['wall_s'] / 60:.1f} min, "
                         f"{r['started']}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["run", "one", "render"])
    p.add_argument("--methods", default="mae", help="all, or a comma list (variants: ibot[mim_weight=0])")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--equal-time", action="store_true", help="each method trains MAE's wall time for --epochs")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-train", type=int, default=5000)
    p.add_argument("--eval-test", type=int, default=2000)
    p.add_argument("--attentive-train", type=int, default=2000)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every row")
    p.add_argument("--name", help="results folder under benchmarks/results/methods_v2 (default: the budget)")
    p.add_argument("--row")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="render: the markdown file (default: print)")
    p.add_argument("--results-dir", default=str(RESULTS), help="where the rows' JSON go (one folder per --name)")
    p.add_argument("--runs-dir", default=str(RUNS), help="where the rows' run folders go (one folder per --name)")
    args = p.parse_args(argv)
    if args.command == "run":
        return run(args)
    if args.command == "one":
        return one(args)
    folder = Path(args.results_dir) / (args.name or budget_name(args.epochs, args.equal_time))
    if args.out:
        out = Path(args.out)
        svg = loss_svg(load_rows(folder))
        fig = out.parent / "figures" / f"{out.stem}_{folder.name}_loss.svg"
        if svg:
            fig.parent.mkdir(parents=True, exist_ok=True)
            fig.write_text(svg)
        text = render(folder, os.path.relpath(fig, out.parent) if svg else None)
        out.write_text(text)
    else:
        print(render(folder), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
