"""One entry point per protocol: `run_protocol(name, encoder, train, test, cfg)` -> a JSON-ready result.

Every result is {"protocol", "metric", "value", "details", "seconds"}; `summary_line(result)` is the line the
CLI prints. `encoder` is any module giving [B, 1 + N, D] tokens (see `mimkit.backends.load_encoder`);
`train` / `test` are labelled datasets (e.g. `mimkit.data.build_labelled`); `cfg` is an `EvalConfig`.
"""

from __future__ import annotations

import time

import torch
from torch.utils.data import Subset

from mimkit.config import EvalConfig
from mimkit.eval.attentive import attentive_probe
from mimkit.eval.baselines import baseline_encoders, seeded_random_init
from mimkit.eval.features import extract_features, extract_tokens
from mimkit.eval.fewshot import few_shot
from mimkit.eval.finetune import finetune_sweep, recipe_settings
from mimkit.eval.knn import knn_accuracy
from mimkit.eval.labels import label_table, table_lines
from mimkit.eval.layerwise import layerwise_probe
from mimkit.eval.linear import linear_probe
from mimkit.eval.splits import carve_balanced_val, dataset_labels

PROTOCOLS = ("knn", "linear", "attentive", "finetune", "fewshot", "layers", "labels", "baselines")


def limit_dataset(ds, n: int | None, seed: int | None = None):
    """The first `n` items (seed None) or a seeded random `n` of them, in index order."""
    if n is None or n >= len(ds):
        return ds
    if seed is None:
        return Subset(ds, range(n))
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return Subset(ds, idx.tolist())


def _cap(*limits: int | None) -> int | None:
    given = [n for n in limits if n is not None]
    return min(given) if given else None


def _features(encoder, train, test, cfg: EvalConfig, device):
    kw = dict(pool=cfg.pool, batch_size=cfg.batch_size, device=device, layers=cfg.layers)
    xtr, ytr = extract_features(encoder, train, **kw)
    xte, yte = extract_features(encoder, test, **kw)
    return xtr, ytr, xte, yte


def _num_classes(*label_sets) -> int:
    return int(max(int(y.max()) for y in label_sets)) + 1


def _finetune(encoder, train, test, cfg: EvalConfig, device) -> dict:
    """eval.finetune_recipe on the training images; with several base lrs, a class-balanced validation split
    (eval.val_fraction) is held out of them to choose one."""
    labels = dataset_labels(train)
    names = getattr(getattr(train, "dataset", train), "classes", None)
    classes = len(names) if names else _num_classes(labels, dataset_labels(test))
    recipe = recipe_settings(cfg)
    blrs = recipe.pop("blrs")
    val = None
    if len(blrs) > 1:
        pool, val_idx = carve_balanced_val(labels, cfg.val_fraction, cfg.seed)
        train, val = Subset(train, pool.tolist()), Subset(train, val_idx.tolist())
    inits = [False, True] if cfg.compare_scratch else [cfg.from_scratch]
    runs = [finetune_sweep(encoder, train, val, test, classes, blrs, from_scratch=s, device=device, seed=cfg.seed,
                           **recipe) for s in inits]
    return {"runs": runs, "recipe": {"name": cfg.finetune_recipe, "blrs": blrs, **recipe}}


def run_protocol(name: str, encoder, train, test, cfg: EvalConfig | None = None,
                 device: str | torch.device = "cpu") -> dict:
    cfg = cfg or EvalConfig()
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}")
    start = time.perf_counter()
    encoder = encoder.to(device).eval()
    train_n, test_n, seed = cfg.train_limit, cfg.test_limit, cfg.seed
    if name == "knn":  # eval.knn_limit: the first N train (bank) and test (queries) images
        train_n, test_n = _cap(train_n, cfg.knn_limit), _cap(test_n, cfg.knn_limit)
        seed = None if cfg.knn_limit and train_n == cfg.knn_limit else seed
    if name == "attentive":
        train_n = _cap(train_n, cfg.attentive_train_limit)
    train, test = limit_dataset(train, train_n, seed), limit_dataset(test, test_n)
    src = {"pool": cfg.pool, "layers": cfg.layers}

    if name == "knn":
        xtr, ytr, xte, yte = _features(encoder, train, test, cfg, device)
        acc = knn_accuracy(xtr, ytr, xte, yte, k=cfg.knn_k, temperature=cfg.knn_temperature)
        details = {"k": cfg.knn_k, "temperature": cfg.knn_temperature, **src,
                   "bank_size": int(xtr.shape[0]), "queries": int(xte.shape[0])}
        metric, value = "top1", acc
    elif name == "linear":
        xtr, ytr, xte, yte = _features(encoder, train, test, cfg, device)
        details = {**src, **linear_probe(xtr, ytr, xte, yte, cfg.linear_lrs, cfg.linear_epochs, cfg.batch_size,
                                         cfg.val_fraction, cfg.linear_weight_decay, cfg.seed)}
        metric, value = "top1", details["test_acc"]
    elif name == "fewshot":
        xtr, ytr, xte, yte = _features(encoder, train, test, cfg, device)
        details = {**src, **few_shot(xtr, ytr, xte, yte, cfg.fewshot_shots, range(cfg.fewshot_seeds),
                                     cfg.fewshot_classifier)}
        top = max(details["results"], key=lambda r: r["shots"])
        metric, value = f"top1_{top['shots']}shot_mean", top["mean"]
    elif name == "attentive":
        kw = dict(batch_size=cfg.batch_size, device=device)
        ttr, ytr = extract_tokens(encoder, train, **kw)
        tte, yte = extract_tokens(encoder, test, **kw)
        details = attentive_probe(ttr, ytr, tte, yte, epochs=cfg.attentive_epochs, lr=cfg.attentive_lr,
                                  num_heads=cfg.attentive_heads, num_queries=cfg.ep_queries,
                                  val_fraction=cfg.val_fraction, seed=cfg.seed)
        ep = next(r for r in details["rows"] if r["probe"] == "efficient_probe")
        metric, value = "top1_efficient_probe", ep["test_acc"]
    elif name == "layers":
        details = layerwise_probe(encoder, train, test, cfg.layers, cfg.pool, cfg.linear_lrs, cfg.layers_epochs,
                                  cfg.val_fraction, cfg.batch_size, device, seed=cfg.seed)
        best = next(r for r in details["layers"] if r["layer"] == details["best_layer"])
        metric, value = "top1_best_val_layer", best["test_acc"]
    elif name in ("labels", "baselines"):
        encoders = baseline_encoders(encoder, train, cfg.seed) if name == "baselines" else {"pretrained": encoder}
        if name == "labels" and cfg.compare_scratch:
            encoders["random_init"] = seeded_random_init(encoder, cfg.seed)
        details = label_table(encoders, train, test, cfg, device)
        first = details["cells"][0]
        metric, value = f"top1_{first}", details["rows"]["pretrained"][first]["value"]
    else:  # finetune
        details = _finetune(encoder, train, test, cfg, device)
        metric, value = ("top1_from_scratch" if cfg.from_scratch and not cfg.compare_scratch else "top1",
                         details["runs"][0]["test_acc"])
    return {"protocol": name, "metric": metric, "value": float(value), "details": details,
            "seconds": time.perf_counter() - start}


def summary_line(result: dict) -> str:
    """One line a person reads: the figure and what it depends on."""
    name, d, pct = result["protocol"], result["details"], 100 * result["value"]
    secs = f"{result['seconds']:.1f}s"
    if name == "knn":
        return (f"kNN top-1: {pct:.2f}% (k={d['k']}, T={d['temperature']}, pool={d['pool']}, "
                f"{d['bank_size']} bank / {d['queries']} queries, {secs})")
    if name == "linear":
        sweep = ", ".join(f"{r['lr']:g}:{100 * r['val_acc']:.1f}" for r in d["sweep"])
        return (f"linear probe top-1: {pct:.2f}% (lr {d['best_lr']:g} chosen on val {100 * d['val_acc']:.2f}%; "
                f"val sweep lr:acc {sweep}; pool={d['pool']}, {secs})")
    if name == "fewshot":
        parts = ", ".join(f"{r['shots']}-shot {100 * r['mean']:.2f}±{100 * r['std']:.2f}%" for r in d["results"])
        return f"few-shot ({d['classifier']}, {len(d['seeds'])} seeds): {parts} ({secs})"
    if name == "attentive":
        parts = "; ".join(f"{r['probe']} {100 * r['test_acc']:.2f}% ({r['trainable_params']:,} params, "
                          f"{r['seconds']:.1f}s)" for r in d["rows"])
        return f"attentive probes top-1: {parts}"
    if name == "layers":
        parts = " ".join(f"{r['layer']}:{100 * r['test_acc']:.1f}" for r in d["layers"])
        return f"layer-wise linear probe top-1 per block: {parts} (best on val: block {d['best_layer']}, {secs})"
    if name in ("labels", "baselines"):
        sizes = ", ".join(f"{f}: {v['size']}" for f, v in d["splits"]["subsets"].items())
        return "\n".join([f"{name}: top-1 % (labelled images per fraction {sizes}; lr chosen on "
                           f"{d['splits']['val_size']} held-out training images; {secs})", *table_lines(d)])
    parts = "; ".join(f"{'scratch' if r['from_scratch'] else 'pretrained'} {100 * r['test_acc']:.2f}% "
                      f"({r['steps']} steps, blr {r['blr']:g}"
                      + (f" chosen on val {100 * r['val_acc']:.2f}%" if len(r["sweep"]) > 1 else "")
                      + f", loss {r['chosen']['loss_first']:.3f}->{r['chosen']['loss_last']:.3f})" for r in d["runs"])
    return f"fine-tune top-1 ({d['recipe']['name']} recipe): {parts} ({secs})"
