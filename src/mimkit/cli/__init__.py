"""`mimkit` command line: the parser and its entry point; the verbs are in cli.commands."""

from __future__ import annotations

import argparse
import shlex
import sys

from mimkit.cli.commands import (
    DEFAULT_RECIPE,
    cmd_data_shard,
    cmd_eval,
    cmd_export,
    cmd_import_mae,
    cmd_info,
    cmd_pretrain,
    cmd_report,
    cmd_tokenizer_fit,
    cmd_visualize,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mimkit", description="Masked image modeling: pretrain, evaluate, look, export.")
    sub = p.add_subparsers(dest="command", required=True)

    def run_arguments(p, recipe: str, example: str):
        """What every training verb takes: a recipe, resume, print-config, key=value overrides."""
        p.add_argument("--config", help=f"YAML recipe ({recipe})")
        p.add_argument("--resume", help="checkpoint or run folder to continue, or 'auto' (last.ckpt of this run)")
        p.add_argument("--print-config", action="store_true", help="print the resolved configuration, with each "
                       "field's description as a comment, and exit")
        p.add_argument("--allow-config-change", action="store_true",
                       help="with --resume: apply overrides that change what is trained (method, model, data, optim)")
        p.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {example}")

    s = sub.add_parser("pretrain", help="pretrain an encoder (default: MAE ViT-Tiny/4 on Fashion-MNIST)")
    run_arguments(s, f"default: {DEFAULT_RECIPE}", "optim.epochs=5 method=mae")
    s.add_argument("--init", help="start from these weights (a mimkit checkpoint, e.g. from `mimkit import-mae`); "
                   "its recipe is the base unless --config is given")
    s.set_defaults(func=cmd_pretrain)

    s = sub.add_parser("tokenizer", help="tokenizers: `tokenizer fit` trains BEiT v2's VQ-KD (pretrain method=vqkd)")
    tsub = s.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser("fit", help="pretrain with method=vqkd (same --config/overrides as pretrain), then print the "
                        "codebook usage over the validation split (also written to results.json)")
    run_arguments(t, "e.g. configs/vqkd_vit_tiny_fmnist.yaml", "method.teacher.source=runs/mae")
    t.set_defaults(func=cmd_tokenizer_fit)

    s = sub.add_parser("eval", help="evaluate an encoder: knn, linear, attentive, finetune, fewshot, layers, labels "
                       "(1/10/100%% of the labels) or baselines (vs random init and raw pixels)")
    s.add_argument("checkpoint", help="checkpoint file or run folder, timm:NAME, timm:local-dir:DIR, hf:DIR, "
                                      "open_clip:MODEL@FILE (docs/teachers.md)")
    s.add_argument("--protocol", default="knn", choices=["knn", "linear", "attentive", "finetune", "fewshot", "layers",
                                                         "labels", "baselines"],
                   help="evaluation protocol (settings: eval.* overrides; labels / baselines: eval.label_cells)")
    s.add_argument("--pool", default=None, choices=["cls", "mean"],
                   help="image feature: class token or mean patch (default eval.pool)")
    s.add_argument("--layers", help="comma-separated block indices: features from these blocks (negative: from end)")
    s.add_argument("--from-scratch", action="store_true", help="finetune: same architecture, random initialisation")
    s.add_argument("--compare-scratch", action="store_true", help="finetune: from the weights and from scratch")
    s.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    s.add_argument("--json", help="also write the result here (a run folder also gets eval/<protocol>.json)")
    s.add_argument("overrides", nargs="*", help="data.* / eval.* overrides, e.g. data.source=imagefolder data.path=DIR")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("visualize", help="picture: original | masked | reconstruction | reconstruction + visible")
    s.add_argument("checkpoint", help="checkpoint file or run folder")
    s.add_argument("--out", help="PNG path (default: <run>/visualize/reconstruction.png; the training's own "
                   "reconstruction.png is left as it is)")
    s.add_argument("--num-images", type=int, default=8)
    s.add_argument("overrides", nargs="*", help="data.* overrides, to draw other images")
    s.set_defaults(func=cmd_visualize)

    s = sub.add_parser("report", help="one HTML page: curves, reconstructions, attention, probes, analysis, config")
    s.add_argument("run_dir", help="run folder")
    s.add_argument("--out", help="HTML path (default: RUN_DIR/report.html)")
    s.add_argument("--num-images", type=int, default=4, help="images shown with attention maps")
    s.add_argument("--analysis-images", type=int, default=32, help="images the analysis metrics average over")
    s.add_argument("--device", default="cpu", help="device for the attention maps and analysis (cpu, cuda, ...)")
    s.add_argument("--no-model", action="store_true", help="skip the sections that load the checkpoint and images")
    s.add_argument("overrides", nargs="*", help="data.* overrides, to analyse other images")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("export", help="write weights as safetensors + config for timm, Hugging Face or MAE's code")
    s.add_argument("checkpoint", help="checkpoint file or run folder")
    s.add_argument("--format", required=True, choices=["timm", "hf", "mae"])
    s.add_argument("--out", help="output folder (default: <run>/export-<format>)")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("info", help="describe a checkpoint")
    s.add_argument("checkpoint", help="checkpoint file or run folder")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("data", help="data tools: `data shard FOLDER OUT` writes WebDataset tar shards")
    dsub = s.add_subparsers(dest="data_command", required=True)
    d = dsub.add_parser("shard", help="write the images of FOLDER into WebDataset-style tar shards in OUT "
                        "(train with data.source=shards data.path=OUT)")
    d.add_argument("folder", help="image folder; class sub-folders (FOLDER/<class>/...) add <key>.cls labels")
    d.add_argument("out", help="output folder for shard-NNNNNN.tar and index.json")
    d.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    d.add_argument("--recursive", action="store_true",
                   help="every image under FOLDER, unlabelled (sub-folder names are not used as classes)")
    d.set_defaults(func=cmd_data_shard)

    s = sub.add_parser("import-mae", help="convert a facebookresearch/mae checkpoint into a mimkit checkpoint")
    s.add_argument("source", help="their .pth (loaded with weights_only=True) or .safetensors")
    s.add_argument("--out", required=True, help="mimkit checkpoint to write")
    s.add_argument("--arch", help="encoder preset to insist on (default: the one of the weights' width)")
    s.add_argument("--decoder-heads", type=int, help="decoder attention heads (not in the weights; default: "
                   "the preset decoder of that width, e.g. 16 for MAE's 512-wide decoder)")
    s.add_argument("--norm-pix", action=argparse.BooleanOptionalAction, default=None,
                   help="the model was trained with --norm_pix_loss (default: off, or the export's config.json)")
    s.add_argument("--img-size", type=int, nargs="+", metavar="PX", help="image size: one number or H W "
                   "(default: a square grid of the position embeddings)")
    s.add_argument("--mask-ratio", type=float, help="mask ratio for continued pretraining (default 0.75)")
    s.add_argument("--mean", type=float, nargs="+", help="per-channel mean (default: ImageNet's for 3 channels)")
    s.add_argument("--std", type=float, nargs="+", help="per-channel std (default: ImageNet's for 3 channels)")
    s.set_defaults(func=cmd_import_mae)
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
    except KeyboardInterrupt as err:
        ckpt = getattr(err, "checkpoint", None)  # engine.TrainingInterrupted: the run can be continued
        again = f"; continue with: mimkit pretrain --resume {shlex.quote(str(err.run_dir))}" if ckpt else ""
        print(f"interrupted{again}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
