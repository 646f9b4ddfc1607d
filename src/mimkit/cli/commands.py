"""What each `mimkit` verb does (pretrain, tokenizer fit, eval, visualize, report, export, info, import-mae,
data shard), given its parsed arguments. Heavy imports happen inside the commands so `mimkit --help` answers
at once."""

from __future__ import annotations

import sys
from pathlib import Path

DEFAULT_RECIPE = "the built-in default (MAE ViT-Tiny/4 on Fashion-MNIST)"


def cmd_pretrain(args) -> int:
    from mimkit.config import load_config, to_yaml
    from mimkit.engine import train
    from mimkit.pipeline import (
        has_labels,
        knn_evaluation,
        save_mask_attention,
        save_reconstructions,
        write_json,
    )

    init, base = None, None
    if args.init:
        # start from another run's or an imported checkpoint's weights (e.g. `mimkit import-mae`); its
        # recipe is the base unless --config is given, so the architecture matches the weights
        from mimkit.engine.checkpoint import load_checkpoint

        init = load_checkpoint(_checkpoint_path(args.init))
        base = {k: v for k, v in init["config"].items() if k in ("method", "model", "data", "optim", "eval")}
    if args.resume and not args.init:  # the run's own settings, with the overrides on top
        from mimkit.engine.resume import config_for_resume

        cfg = config_for_resume(args.resume, args.config, args.overrides)
    else:
        cfg = load_config(args.config, args.overrides, base=base)
    if args.print_config:
        print(to_yaml(cfg, comments=True), end="")
        return 0
    method = _init_method(cfg, init, args.init) if init else None
    result = train(cfg, resume=args.resume, method=method,
                   allow_config_change=getattr(args, "allow_config_change", False))
    if not result.is_global_zero:
        return 0
    run_dir = Path(result.run_dir)
    summary = {"run_dir": str(run_dir), **{k: v for k, v in result.metrics.items()}}
    method, data = result.method.cpu().eval(), result.data
    if cfg.eval.visualize:
        notes: list[str] = []
        path = save_reconstructions(method, cfg, data.mean, data.std, run_dir / "reconstruction.png",
                                    cfg.eval.num_images, notes)
        for note in notes:
            print(f"note: {note}")
        if path:
            summary["reconstruction"] = str(path)
            print(f"reconstructions: {path}")
        else:  # no pixel predictions: the masks the method draws and where its encoder looks
            path = save_mask_attention(method, cfg, data.mean, data.std, run_dir / "masks.png", cfg.eval.num_images)
            summary["masks"] = str(path)
            print(f"masks and attention: {path}")
    if cfg.eval.knn:
        if has_labels(cfg.data):
            knn = knn_evaluation(method, cfg, data.mean, data.std)
            summary.update(knn)
            from mimkit.data.build import dataset_name

            print(f"kNN top-1 on the {dataset_name(cfg.data)} test split (k={knn['knn_k']}, T={knn['knn_temperature']}, "
                  f"{knn['bank_size']} bank / {knn['queries']} queries): {100 * knn['knn_top1']:.2f}%")
        else:
            print(f"kNN skipped: data.source={cfg.data.source!r} has no labels "
                  f"(run `mimkit eval {run_dir}/checkpoints/last.ckpt data.source=imagefolder data.path=DIR`)")
    if cfg.eval.baseline_table:
        from mimkit.eval.labels import table_lines
        from mimkit.pipeline import baseline_table

        print(f"evaluating against random init and raw pixels: {', '.join(cfg.eval.label_cells)} ...", flush=True)
        table = baseline_table(method.encoder, cfg, data.mean, data.std)
        (run_dir / "eval").mkdir(exist_ok=True)
        write_json(run_dir / "eval" / "baselines.json", table)
        summary["baseline_table"] = {row: {c: (None if r is None else r["value"]) for c, r in cells.items()}
                                     for row, cells in table["rows"].items()}
        print(f"top-1 on the {cfg.data.source} test split, % (lrs chosen on a validation split of the training "
              f"images; {table['seconds'] / 60:.1f} min):")
        print("\n".join(table_lines(table)))
    write_json(run_dir / "results.json", summary)
    print(f"run folder: {run_dir}")
    return 0


def cmd_tokenizer_fit(args) -> int:
    """`mimkit tokenizer fit [--config YAML] [--resume R] key=value...`: `mimkit pretrain` with method=vqkd, then
    the codebook usage (mimkit.tokenizer_fit)."""
    import os
    import time

    import torch.distributed as dist

    from mimkit.tokenizer_fit import record_codebook_usage, vqkd_overrides

    args.overrides = vqkd_overrides(args.config, list(args.overrides))
    args.init = None
    started = time.time() - 1.0
    code = cmd_pretrain(args)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", 0))
    if code or args.print_config or rank != 0:
        return code
    record_codebook_usage(args.config, args.overrides, args.resume, started)
    return 0


def _init_method(cfg, init: dict, source: str):
    """A method built for this run's data, with weights from `init` (names and shapes must all match)."""
    from mimkit.engine.checkpoint import load_state_strict
    from mimkit.methods import build_method

    meta = init["data"]
    method = build_method(cfg, tuple(meta["img_size"]), int(meta["channels"]))
    load_state_strict(method, init["model"], source)
    return method


def _checkpoint_path(path: str) -> Path:
    """A checkpoint file from a file or run folder (engine.checkpoint.find_checkpoint: clear error if absent)."""
    from mimkit.engine.checkpoint import find_checkpoint

    return find_checkpoint(path)


def _load(ckpt: str):
    from mimkit.engine.checkpoint import method_from_checkpoint

    return method_from_checkpoint(_checkpoint_path(ckpt))


def _run_dir(ckpt: str) -> Path:
    """The run folder of a checkpoint argument, where default outputs go."""
    from mimkit.engine.checkpoint import run_dir_of

    return run_dir_of(_checkpoint_path(ckpt).resolve())


def cmd_eval(args) -> int:
    """Any protocol on a mimkit checkpoint / run folder, `timm:NAME`, `timm:local-dir:DIR`, `hf:DIR or hub name`
    or `open_clip:MODEL@FILE` (a `#proj` suffix: CLIP's projected tokens; docs/teachers.md)."""
    import torch

    from mimkit.backends import is_external_spec, load_encoder, norm_for, wrap_mimkit
    from mimkit.config import PretrainConfig, apply_overrides
    from mimkit.data import build_labelled
    from mimkit.data.build import make_source
    from mimkit.data.errors import DataReport
    from mimkit.engine.checkpoint import (
        encoder_from_checkpoint,
        find_checkpoint,
        run_dir_of,
    )
    from mimkit.eval.protocols import run_protocol, summary_line
    from mimkit.pipeline import has_labels, write_json

    external = is_external_spec(args.checkpoint)
    if external:
        loaded = load_encoder(args.checkpoint)
        cfg = apply_overrides(PretrainConfig(), args.overrides)
        # the encoder's input size is fixed by its position table
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"img_size": list(loaded.img_size)})})
        run_dir = None
    else:
        # the encoder alone: a distillation run's teachers need not be where they were during training
        encoder, cfg, ckpt = encoder_from_checkpoint(_checkpoint_path(args.checkpoint))
        loaded = wrap_mimkit(encoder, ckpt["data"])
        cfg = apply_overrides(cfg, args.overrides)
        ckpt_path = find_checkpoint(args.checkpoint)
        in_run = Path(args.checkpoint).is_dir() or ckpt_path.parent.name == "checkpoints"
        run_dir = run_dir_of(ckpt_path) if in_run else None
    eval_updates = {k: v for k, v in (("pool", args.pool), ("from_scratch", args.from_scratch or None),
                                      ("compare_scratch", args.compare_scratch or None)) if v is not None}
    if args.layers:
        eval_updates["layers"] = [int(i) for i in args.layers.split(",")]
    ecfg = cfg.eval.model_copy(update=eval_updates)
    if not has_labels(cfg.data):
        from mimkit.data import DataError

        raise DataError(f"evaluation needs labelled images, and data.source={cfg.data.source!r} has none; "
                        "use e.g. data.source=imagefolder data.path=DIR")
    if external:
        mean, std = norm_for(loaded, int(make_source(cfg.data, "test", DataReport()).channels))
    else:
        mean, std = ckpt["data"]["mean"], ckpt["data"]["std"]
    data = cfg.data.model_copy(update={"mean": list(mean), "std": list(std)})
    train, test = build_labelled(data, "train", mean, std), build_labelled(data, "test", mean, std)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    from mimkit.eval.features import progress_bars

    with progress_bars(args.protocol if cfg.trainer.progress else None):  # trainer.progress=false: no bars
        res = run_protocol(args.protocol, loaded.encoder, train, test, ecfg, device=device)
    from mimkit.data.build import dataset_name

    res = {**res, "encoder": args.checkpoint, "data": cfg.data.source, "dataset": dataset_name(cfg.data)}
    if args.protocol == "knn":  # the keys `mimkit eval` wrote before protocols existed
        d = res["details"]
        res.update(knn_top1=res["value"], knn_k=d["k"], knn_temperature=d["temperature"], pool=d["pool"],
                   bank_size=d["bank_size"], queries=d["queries"])
    print(summary_line(res))
    details = res.get("details") if isinstance(res.get("details"), dict) else {}
    for warning in details.get("warnings") or []:  # e.g. a probe whose budget was too short to train it
        print(f"warning: {warning}", file=sys.stderr)
    if run_dir is not None:
        (run_dir / "eval").mkdir(exist_ok=True)
        write_json(run_dir / "eval" / f"{args.protocol}.json", res)
    if args.json:
        write_json(args.json, res)
    return 0


def cmd_visualize(args) -> int:
    from mimkit.config import apply_overrides
    from mimkit.pipeline import save_reconstructions

    method, cfg, ckpt = _load(args.checkpoint)
    cfg = apply_overrides(cfg, args.overrides)
    # not reconstruction.png: that is the training's own picture, kept as it was
    out = Path(args.out) if args.out else _run_dir(args.checkpoint) / "visualize" / "reconstruction.png"
    notes: list[str] = []
    path = save_reconstructions(method, cfg, ckpt["data"]["mean"], ckpt["data"]["std"], out, args.num_images, notes)
    if path is None:
        from mimkit.pipeline import save_mask_attention

        notes.clear()
        path = save_mask_attention(method, cfg, ckpt["data"]["mean"], ckpt["data"]["std"],
                                   out.with_name(out.stem.replace("reconstruction", "masks") + out.suffix),
                                   args.num_images, notes)
        print(f"method {cfg.method.name!r} predicts no pixels: drew its masks and class-token attention instead")
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {path}")
    return 0


def cmd_report(args) -> int:
    from mimkit.report import build_report

    path = build_report(args.run_dir, args.out, num_images=args.num_images, analysis_images=args.analysis_images,
                        overrides=list(args.overrides), device=args.device, model=not args.no_model)
    print(f"wrote {path}")
    return 0


def cmd_export(args) -> int:
    import warnings

    from mimkit.interop import export_checkpoint

    ckpt = _checkpoint_path(args.checkpoint)
    out = Path(args.out) if args.out else _run_dir(args.checkpoint) / f"export-{args.format}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = export_checkpoint(ckpt, out, args.format)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(f"exported {args.format} weights to {path}")
    return 0


def cmd_info(args) -> int:
    from mimkit.interop import checkpoint_info, format_info

    ckpt = _checkpoint_path(args.checkpoint)
    print(format_info(checkpoint_info(ckpt)))
    return 0


def cmd_import_mae(args) -> int:
    from mimkit.interop import import_mae_checkpoint

    assumed: list[str] = []
    size = None if args.img_size is None else (args.img_size[0] if len(args.img_size) == 1 else tuple(args.img_size))
    path = import_mae_checkpoint(args.source, args.out, args.arch, img_size=size, decoder_heads=args.decoder_heads,
                                 mask_ratio=args.mask_ratio, norm_pix=args.norm_pix, mean=args.mean, std=args.std,
                                 assumed=assumed)
    for line in assumed:
        print(f"assumed: {line}")
    print(f"wrote mimkit checkpoint {path}")
    return 0


def cmd_data_shard(args) -> int:
    from mimkit.data.shards import INDEX_FILE, write_shards

    index = write_shards(args.folder, args.out, args.shard_size, recursive=args.recursive)
    n_shards = len(index["shards"])
    labels = f", {len(index['classes'])} classes" if index["labelled"] else ", unlabelled"
    print(f"wrote {index['count']} images into {n_shards} shard(s) in {args.out}{labels} (index: {INDEX_FILE})")
    bad = index["unreadable"]
    if bad:
        print(f"{len(bad)} unreadable file(s) not written:", file=sys.stderr)
        for item in bad:
            print(f"  {item['path']}: {item['reason']}", file=sys.stderr)
    return 0
