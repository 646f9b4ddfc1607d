"""`mimkit` command line: pretrain, tokenizer fit, eval, visualize, report, export, info, import-mae, data shard.

Heavy imports happen inside the commands so `mimkit --help` answers at once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_RECIPE = "the built-in default (MAE ViT-Tiny/4 on Fashion-MNIST)"


def _cmd_pretrain(args) -> int:
    from mimkit.config import load_config, to_yaml
    from mimkit.engine import train
    from mimkit.pipeline import has_labels, knn_evaluation, save_mask_attention, save_reconstructions, write_json

    init, base = None, None
    if args.init:
        # start from another run's or an imported checkpoint's weights (e.g. `mimkit import-mae`); its
        # recipe is the base unless --config is given, so the architecture matches the weights
        from mimkit.engine.checkpoint import load_checkpoint

        init = load_checkpoint(_checkpoint_path(args.init))
        base = {k: v for k, v in init["config"].items() if k in ("method", "model", "data", "optim", "eval")}
    cfg = load_config(args.config, args.overrides, base=base)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    method = _init_method(cfg, init, args.init) if init else None
    result = train(cfg, resume=args.resume, method=method)
    if not result.is_global_zero:
        return 0
    run_dir = Path(result.run_dir)
    summary = {"run_dir": str(run_dir), **{k: v for k, v in result.metrics.items()}}
    method, data = result.method.cpu().eval(), result.data
    if cfg.eval.visualize:
        path = save_reconstructions(method, cfg, data.mean, data.std, run_dir / "reconstruction.png", cfg.eval.num_images)
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
            print(f"kNN top-1 on the {cfg.data.source} test split (k={knn['knn_k']}, T={knn['knn_temperature']}, "
                  f"{knn['bank_size']} bank / {knn['queries']} queries): {100 * knn['knn_top1']:.2f}%")
        else:
            print(f"kNN skipped: data.source={cfg.data.source!r} has no labels "
                  f"(run `mimkit eval {run_dir}/checkpoints/last.ckpt data.source=imagefolder data.path=DIR`)")
    write_json(run_dir / "results.json", summary)
    print(f"run folder: {run_dir}")
    return 0


def _cmd_tokenizer_fit(args) -> int:
    """`mimkit tokenizer fit [--config YAML] [--resume R] key=value...`: `mimkit pretrain` with method=vqkd, then
    the codebook usage (mimkit.tokenizer_fit)."""
    import os
    import time

    import torch.distributed as dist

    from mimkit.tokenizer_fit import record_codebook_usage, vqkd_overrides

    args.overrides = vqkd_overrides(args.config, list(args.overrides))
    args.init = None
    started = time.time() - 1.0
    code = _cmd_pretrain(args)
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


def _cmd_eval(args) -> int:
    """Any protocol on a mimkit checkpoint / run folder, `timm:NAME`, `timm:local-dir:DIR`, `hf:DIR or hub name`
    or `open_clip:MODEL@FILE` (a `#proj` suffix: CLIP's projected tokens; docs/teachers.md)."""
    import torch

    from mimkit.config import PretrainConfig, apply_overrides
    from mimkit.data import build_labelled
    from mimkit.backends import is_external_spec, load_encoder, norm_for, wrap_mimkit
    from mimkit.data.build import make_source
    from mimkit.data.errors import DataReport
    from mimkit.engine.checkpoint import encoder_from_checkpoint, find_checkpoint, run_dir_of
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
        raise SystemExit(f"error: evaluation needs labelled images, and data.source={cfg.data.source!r} has none; "
                         "use e.g. data.source=imagefolder data.path=DIR")
    if external:
        mean, std = norm_for(loaded, int(make_source(cfg.data, "test", DataReport()).channels))
    else:
        mean, std = ckpt["data"]["mean"], ckpt["data"]["std"]
    data = cfg.data.model_copy(update={"mean": list(mean), "std": list(std)})
    train, test = build_labelled(data, "train", mean, std), build_labelled(data, "test", mean, std)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    res = run_protocol(args.protocol, loaded.encoder, train, test, ecfg, device=device)
    res = {**res, "encoder": args.checkpoint, "data": cfg.data.source}
    if args.protocol == "knn":  # the keys `mimkit eval` wrote before protocols existed
        d = res["details"]
        res.update(knn_top1=res["value"], knn_k=d["k"], knn_temperature=d["temperature"], pool=d["pool"],
                   bank_size=d["bank_size"], queries=d["queries"])
    print(summary_line(res))
    if run_dir is not None:
        (run_dir / "eval").mkdir(exist_ok=True)
        write_json(run_dir / "eval" / f"{args.protocol}.json", res)
    if args.json:
        write_json(args.json, res)
    return 0


def _cmd_visualize(args) -> int:
    from mimkit.config import apply_overrides
    from mimkit.pipeline import save_reconstructions

    method, cfg, ckpt = _load(args.checkpoint)
    cfg = apply_overrides(cfg, args.overrides)
    out = Path(args.out) if args.out else _run_dir(args.checkpoint) / "reconstruction.png"
    path = save_reconstructions(method, cfg, ckpt["data"]["mean"], ckpt["data"]["std"], out, args.num_images)
    if path is None:
        from mimkit.pipeline import save_mask_attention

        path = save_mask_attention(method, cfg, ckpt["data"]["mean"], ckpt["data"]["std"],
                                   out.with_name(out.stem.replace("reconstruction", "masks") + out.suffix), args.num_images)
        print(f"method {cfg.method.name!r} predicts no pixels: drew its masks and class-token attention instead")
    print(f"wrote {path}")
    return 0


def _cmd_report(args) -> int:
    from mimkit.report import build_report

    path = build_report(args.run_dir, args.out, num_images=args.num_images, analysis_images=args.analysis_images,
                        overrides=list(args.overrides), device=args.device, model=not args.no_model)
    print(f"wrote {path}")
    return 0


def _cmd_export(args) -> int:
    from mimkit.interop import export_checkpoint

    ckpt = _checkpoint_path(args.checkpoint)
    out = Path(args.out) if args.out else _run_dir(args.checkpoint) / f"export-{args.format}"
    path = export_checkpoint(ckpt, out, args.format)
    print(f"exported {args.format} weights to {path}")
    return 0


def _cmd_info(args) -> int:
    from mimkit.interop import checkpoint_info, format_info

    ckpt = _checkpoint_path(args.checkpoint)
    print(format_info(checkpoint_info(ckpt)))
    return 0


def _cmd_import_mae(args) -> int:
    from mimkit.interop import import_mae_checkpoint

    path = import_mae_checkpoint(args.source, args.out)
    print(f"wrote mimkit checkpoint {path}")
    return 0


def _cmd_data_shard(args) -> int:
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mimkit", description="Masked image modeling: pretrain, evaluate, look, export.")
    sub = p.add_subparsers(dest="command", required=True)

    def run_arguments(p, recipe: str, example: str):
        """What every training verb takes: a recipe, resume, print-config, key=value overrides."""
        p.add_argument("--config", help=f"YAML recipe ({recipe})")
        p.add_argument("--resume", help="checkpoint or run folder to continue, or 'auto' (last.ckpt of this run)")
        p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
        p.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {example}")

    s = sub.add_parser("pretrain", help="pretrain an encoder (default: MAE ViT-Tiny/4 on Fashion-MNIST)")
    run_arguments(s, f"default: {DEFAULT_RECIPE}", "optim.epochs=5 method=mae")
    s.add_argument("--init", help="start from these weights (a mimkit checkpoint, e.g. from `mimkit import-mae`); "
                   "its recipe is the base unless --config is given")
    s.set_defaults(func=_cmd_pretrain)

    s = sub.add_parser("tokenizer", help="tokenizers: `tokenizer fit` trains BEiT v2's VQ-KD (pretrain method=vqkd)")
    tsub = s.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser("fit", help="pretrain with method=vqkd (same --config/overrides as pretrain), then print the "
                        "codebook usage over the validation split (also written to results.json)")
    run_arguments(t, "e.g. configs/vqkd_vit_tiny_fmnist.yaml", "method.teacher.source=runs/mae")
    t.set_defaults(func=_cmd_tokenizer_fit)

    s = sub.add_parser("eval", help="evaluate an encoder: knn, linear, attentive, finetune, fewshot or layers")
    s.add_argument("checkpoint", help="checkpoint file or run folder, timm:NAME, timm:local-dir:DIR, hf:DIR, "
                                      "open_clip:MODEL@FILE (docs/teachers.md)")
    s.add_argument("--protocol", default="knn", choices=["knn", "linear", "attentive", "finetune", "fewshot", "layers"],
                   help="evaluation protocol (settings: eval.* overrides)")
    s.add_argument("--pool", default=None, choices=["cls", "mean"],
                   help="image feature: class token or mean patch (default eval.pool)")
    s.add_argument("--layers", help="comma-separated block indices: features from these blocks (negative: from end)")
    s.add_argument("--from-scratch", action="store_true", help="finetune: same architecture, random initialisation")
    s.add_argument("--compare-scratch", action="store_true", help="finetune: from the weights and from scratch")
    s.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    s.add_argument("--json", help="also write the result here (a run folder also gets eval/<protocol>.json)")
    s.add_argument("overrides", nargs="*", help="data.* / eval.* overrides, e.g. data.source=imagefolder data.path=DIR")
    s.set_defaults(func=_cmd_eval)

    s = sub.add_parser("visualize", help="picture: original | masked | reconstruction | reconstruction + visible")
    s.add_argument("checkpoint", help="checkpoint file or run folder")
    s.add_argument("--out", help="PNG path (default: reconstruction.png beside the checkpoint)")
    s.add_argument("--num-images", type=int, default=8)
    s.add_argument("overrides", nargs="*", help="data.* overrides, to draw other images")
    s.set_defaults(func=_cmd_visualize)

    s = sub.add_parser("report", help="one HTML page: curves, reconstructions, attention, probes, analysis, config")
    s.add_argument("run_dir", help="run folder")
    s.add_argument("--out", help="HTML path (default: RUN_DIR/report.html)")
    s.add_argument("--num-images", type=int, default=4, help="images shown with attention maps")
    s.add_argument("--analysis-images", type=int, default=32, help="images the analysis metrics average over")
    s.add_argument("--device", default="cpu", help="device for the attention maps and analysis (cpu, cuda, ...)")
    s.add_argument("--no-model", action="store_true", help="skip the sections that load the checkpoint and images")
    s.add_argument("overrides", nargs="*", help="data.* overrides, to analyse other images")
    s.set_defaults(func=_cmd_report)

    s = sub.add_parser("export", help="write weights as safetensors + config for timm, Hugging Face or MAE's code")
    s.add_argument("checkpoint", help="checkpoint file or run folder")
    s.add_argument("--format", required=True, choices=["timm", "hf", "mae"])
    s.add_argument("--out", help="output folder (default: <run>/export-<format>)")
    s.set_defaults(func=_cmd_export)

    s = sub.add_parser("info", help="describe a checkpoint")
    s.add_argument("checkpoint", help="checkpoint file or run folder")
    s.set_defaults(func=_cmd_info)

    s = sub.add_parser("data", help="data tools: `data shard FOLDER OUT` writes WebDataset tar shards")
    dsub = s.add_subparsers(dest="data_command", required=True)
    d = dsub.add_parser("shard", help="write the images of FOLDER into WebDataset-style tar shards in OUT "
                        "(train with data.source=shards data.path=OUT)")
    d.add_argument("folder", help="image folder; class sub-folders (FOLDER/<class>/...) add <key>.cls labels")
    d.add_argument("out", help="output folder for shard-NNNNNN.tar and index.json")
    d.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    d.add_argument("--recursive", action="store_true",
                   help="every image under FOLDER, unlabelled (sub-folder names are not used as classes)")
    d.set_defaults(func=_cmd_data_shard)

    s = sub.add_parser("import-mae", help="convert a facebookresearch/mae checkpoint into a mimkit checkpoint")
    s.add_argument("source", help="their .pth (loaded with weights_only=True) or .safetensors")
    s.add_argument("--out", required=True, help="mimkit checkpoint to write")
    s.set_defaults(func=_cmd_import_mae)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # overrides (key=value) may stand anywhere, also after options: argparse alone cannot intermix them
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-") or "=" not in x or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    from mimkit.config import ConfigError
    from mimkit.engine.checkpoint import CheckpointError
    from mimkit.engine.trainer import TrainingDiverged

    known = (ConfigError, CheckpointError, FileNotFoundError, TrainingDiverged)
    try:
        from mimkit.data import DataError

        known = known + (DataError,)
    except ImportError:
        pass
    try:
        return int(args.func(args) or 0)
    except known as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
