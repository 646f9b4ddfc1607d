"""Representation quality on Fashion-MNIST: a default MAE run against random init and raw pixels.

Compares, on the same images:

* **mae**: the encoder of a default `mimkit pretrain` run (MAE ViT-Tiny/4, 1 epoch; `--run-dir` reuses a run,
  otherwise this script pretrains one with `mimkit.engine.train` and the default configuration);
* **random**: the same architecture, randomly initialised (`mimkit.eval.finetune.random_init`, seed `--seed`);
* **pixels**: raw pixels, standardized per pixel on the probe training images: scikit-learn's logistic
  regression (the usual "~84.5% with all 60k images" baseline), the same BatchNorm + linear lr sweep the
  encoders get, and kNN on the same pixels.

Protocols (mimkit.eval, settings from `EvalConfig` defaults unless given here): weighted kNN (k=20, T=0.07,
class token), linear probe (BatchNorm + linear, lr sweep chosen on a 10% validation split of the training
images), attentive probes (cross-attention pooler and Efficient Probing on the patch tokens), and fine-tuning
with the MAE recipe from the MAE weights and from random initialisation at the same budget (steps, batch, lr).

Each encoder runs once over the probe images: its tokens are cached and every probe reads them.
Prints a markdown table; `--json` writes every figure with its details.

    .venv/bin/python benchmarks/quality.py --run-dir runs/<default run> --json quality.json
    .venv/bin/python benchmarks/quality.py --pretrain-out runs     # pretrains the default run first
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

def pixels(ds) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for i in range(len(ds)):
        item = ds[i]
        xs.append(torch.as_tensor(item["image"]).reshape(-1).float())
        ys.append(int(item["label"]))
    return torch.stack(xs), torch.tensor(ys)

def pretrain(out_dir: str, overrides: list[str]):
    from mimkit.config import load_config
    from mimkit.engine import train

    cfg = load_config(None, [f"trainer.out_dir={out_dir}", *overrides])  # `mimkit pretrain`'s built-in default
    log(f"pretraining the default recipe into {out_dir} (overrides: {overrides or 'none'})")
    res = train(cfg)
    log(f"pretrained: {res.run_dir} ({res.metrics.get('global_step')} steps)")
    return res.run_dir

def pixel_baselines(args, skip, train, test, results, probes) -> None:
    """Standardized raw pixels: sklearn logistic regression, kNN and the BatchNorm + linear sweep."""
    t = time.perf_counter()
    xtr, ytr = pixels(train)
    xte, yte = pixels(test)
    mu, sd = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
    ztr, zte = (xtr - mu) / sd, (xte - mu) / sd
    log(f"pixels loaded ({time.perf_counter() - t:.1f}s)")
    if "logreg" not in skip:
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        t = time.perf_counter()
        clf = LogisticRegression(max_iter=args.logreg_iter, C=1.0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            clf.fit(ztr.numpy(), ytr.numpy())
        converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        acc = float((torch.as_tensor(clf.predict(zte.numpy())) == yte).float().mean())
        row = results["rows"].setdefault("pixels", {})
        row["logreg"], row["logreg_details"] = acc, {"C": 1.0, "solver": "lbfgs", "max_iter": args.logreg_iter,
                                                     "converged": converged, "seconds": time.perf_counter() - t}
        log(f"pixels: sklearn logistic regression {100 * acc:.2f}% (C=1, lbfgs, {args.logreg_iter} iterations, "
            f"{'converged' if converged else 'not converged'}, {time.perf_counter() - t:.1f}s)")
    probes("pixels", ztr, ytr, zte, yte)

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", help="an existing default MAE run (folder or checkpoint); otherwise pretrain one")
    p.add_argument("--pretrain-out", default="runs", help="where to pretrain when --run-dir is not given")
    p.add_argument("--pretrain-override", action="append", default=[],
                   help="section.field=value for the pretraining run (repeatable); defaults otherwise")
    p.add_argument("--train-size", type=int, default=10000, help="probe training images (seeded subset of 60k)")
    p.add_argument("--test-size", type=int, default=2000, help="test images (the first ones of the 10k)")
    p.add_argument("--linear-epochs", type=int, default=30)
    p.add_argument("--attentive-epochs", type=int, default=10)
    p.add_argument("--ft-train-size", type=int, default=10000, help="fine-tuning training images (seeded subset)")
    p.add_argument("--ft-test-size", type=int, default=None, help="fine-tuning test images (default --test-size)")
    p.add_argument("--ft-steps", type=int, default=100, help="fine-tuning optimizer steps, both inits")
    p.add_argument("--ft-batch", type=int, default=64)
    p.add_argument("--ft-recipe", default="imagenet", choices=["imagenet", "small"],
                   help="eval.finetune_recipe (imagenet: what docs/benchmarks.md's figures used)")
    p.add_argument("--ft-blr", type=float, default=None, help="default: the recipe's first base lr")
    p.add_argument("--logreg-iter", type=int, default=200, help="lbfgs iterations of the pixel logistic regression")
    p.add_argument("--skip", default="", help="comma list of parts to skip: knn,linear,attentive,finetune,logreg")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--json", help="write all results here")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    skip = {s for s in args.skip.split(",") if s}
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    from mimkit.config import EvalConfig, PretrainConfig
    from mimkit.data import build_labelled
    from mimkit.engine.checkpoint import find_checkpoint, method_from_checkpoint
    from mimkit.eval.attentive import attentive_probe
    from mimkit.backends import wrap_mimkit
    from mimkit.eval.features import extract_tokens
    from mimkit.eval.finetune import finetune, random_init
    from mimkit.eval.knn import knn_accuracy
    from mimkit.eval.linear import linear_probe
    from mimkit.eval.protocols import limit_dataset

    t_all = time.perf_counter()
    run_dir = args.run_dir or str(pretrain(args.pretrain_out, args.pretrain_override))
    ckpt_path = find_checkpoint(run_dir)
    method, cfg, ckpt = method_from_checkpoint(ckpt_path)
    if not isinstance(cfg, PretrainConfig):
        cfg = PretrainConfig.model_validate(cfg)
    mae = wrap_mimkit(method.encoder, ckpt["data"]).encoder.eval()
    torch.manual_seed(args.seed)
    rand = random_init(mae).eval()
    ecfg = EvalConfig()
    mean, std = ckpt["data"]["mean"], ckpt["data"]["std"]
    data_cfg = cfg.data.model_copy(update={"mean": list(mean), "std": list(std)})
    train_all, test_all = build_labelled(data_cfg, "train", mean, std), build_labelled(data_cfg, "test", mean, std)
    train, test = limit_dataset(train_all, args.train_size, args.seed), limit_dataset(test_all, args.test_size)
    ft_train = limit_dataset(train_all, args.ft_train_size, args.seed)
    ft_test = limit_dataset(test_all, args.ft_test_size or args.test_size)
    log(f"checkpoint {ckpt_path}; probes: {len(train)} train / {len(test)} test; "
        f"fine-tuning: {len(ft_train)} train / {len(ft_test)} test, {args.ft_steps} steps x {args.ft_batch}; "
        f"device {device}, {torch.get_num_threads()} threads")

    results: dict = {"setup": {
        "run_dir": str(run_dir), "checkpoint": str(ckpt_path),
        "pretrain_steps": ckpt.get("progress", {}).get("global_step"),
        "train_size": len(train), "test_size": len(test), "ft_train_size": len(ft_train), "ft_test_size": len(ft_test),
        "ft_steps": args.ft_steps, "ft_batch": args.ft_batch, "linear_epochs": args.linear_epochs,
        "attentive_epochs": args.attentive_epochs, "seed": args.seed, "device": device,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "knn_k": ecfg.knn_k, "knn_temperature": ecfg.knn_temperature,
    }, "rows": {}}

    def probes(name: str, feats_tr, ytr, feats_te, yte, tokens=None):
        row = results["rows"].setdefault(name, {})
        if "knn" not in skip:
            t = time.perf_counter()
            row["knn"] = float(knn_accuracy(feats_tr, ytr, feats_te, yte, k=ecfg.knn_k,
                                            temperature=ecfg.knn_temperature))
            log(f"{name}: kNN {100 * row['knn']:.2f}% ({time.perf_counter() - t:.1f}s)")
        if "linear" not in skip:
            lp = linear_probe(feats_tr, ytr, feats_te, yte, ecfg.linear_lrs, args.linear_epochs, ecfg.batch_size,
                              ecfg.val_fraction, ecfg.linear_weight_decay, args.seed, num_classes=10)
            row["linear"], row["linear_details"] = lp["test_acc"], lp
            log(f"{name}: linear {100 * lp['test_acc']:.2f}% (lr {lp['best_lr']:g}, {lp['seconds']:.1f}s)")
        if tokens is not None and "attentive" not in skip:
            ap = attentive_probe(tokens[0].float(), ytr, tokens[1].float(), yte, epochs=args.attentive_epochs,
                                 lr=ecfg.attentive_lr, num_heads=ecfg.attentive_heads, num_queries=ecfg.ep_queries,
                                 val_fraction=ecfg.val_fraction, seed=args.seed, num_classes=10)
            for r in ap["rows"]:
                key = "ep" if r["probe"] == "efficient_probe" else "xattn"
                row[key], row[f"{key}_params"] = r["test_acc"], r["trainable_params"]
                log(f"{name}: {r['probe']} {100 * r['test_acc']:.2f}% ({r['trainable_params']:,} params, "
                    f"{r['seconds']:.1f}s)")
            row["attentive_details"] = ap

    # raw pixels
    if not {"knn", "linear", "logreg"} <= skip:
        pixel_baselines(args, skip, train, test, results, probes)

    # encoders: tokens once, every probe on the cache
    for name, enc in (("mae", mae), ("random", rand)):
        if {"knn", "linear", "attentive"} <= skip:
            break
        t = time.perf_counter()
        ttr, ytr_e = extract_tokens(enc, train, batch_size=ecfg.batch_size, device=device)
        tte, yte_e = extract_tokens(enc, test, batch_size=ecfg.batch_size, device=device)
        log(f"{name}: tokens {tuple(ttr.shape)} + {tuple(tte.shape)} ({time.perf_counter() - t:.1f}s)")
        probes(name, ttr[:, 0].float(), ytr_e, tte[:, 0].float(), yte_e, tokens=(ttr, tte))
        del ttr, tte

    if "finetune" not in skip:
        from mimkit.eval.finetune import recipe_settings

        recipe = recipe_settings(ecfg.model_copy(update={"finetune_recipe": args.ft_recipe}))
        blr = args.ft_blr or recipe.pop("blrs")[0]
        recipe.pop("blrs", None)
        kw = dict(recipe, epochs=10 ** 6, max_steps=args.ft_steps, batch_size=args.ft_batch, blr=blr,
                  device=device, seed=args.seed)
        for name, scratch in (("mae", False), ("random", True)):
            r = finetune(mae, ft_train, ft_test, 10, from_scratch=scratch, **kw)
            row = results["rows"].setdefault(name, {})
            row["finetune"], row["finetune_details"] = r["test_acc"], r
            log(f"{name}: fine-tune {100 * r['test_acc']:.2f}% ({r['steps']} steps, {r['epochs']:.2f} epochs, "
                f"loss {r['loss_first']:.3f}->{r['loss_last']:.3f}, {r['seconds']:.1f}s)")

    results["seconds"] = time.perf_counter() - t_all
    print()
    print(table(results))
    print(f"\ntotal {results['seconds']:.0f}s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        log(f"wrote {args.json}")
    return 0

def table(results: dict) -> str:
    s, rows = results["setup"], results["rows"]
    cols = [("knn", f"kNN (k={s['knn_k']})"), ("linear", "linear probe"), ("xattn", "cross-attn probe"),
            ("ep", "EP probe"), ("finetune", f"fine-tune ({s['ft_steps']} steps)"), ("logreg", "logistic reg.")]
    names = {"mae": "MAE ViT-Tiny/4 (default run)", "random": "same ViT, random init",
             "pixels": "raw pixels (standardized)"}
    lines = ["| encoder | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for key in ("mae", "random", "pixels"):
        if key not in rows:
            continue
        cells = [f"{100 * rows[key][c]:.2f}" if c in rows[key] else "–" for c, _ in cols]
        lines.append(f"| {names[key]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

if __name__ == "__main__":
    raise SystemExit(main())
