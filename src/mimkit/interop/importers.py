"""Turn weights from facebookresearch/mae, transformers ViTMAE or a timm ViT folder into a mimkit checkpoint.

The result is an ordinary mimkit checkpoint (config, data statistics, MAE state dict), so `mimkit visualize`,
`method_from_checkpoint` and continued pretraining use it like one mimkit wrote. Where the source has no
decoder (MAE's released pretraining files hold the encoder only; timm models never do), the decoder is
freshly initialised and the checkpoint records that under source["decoder"] = "initialised".
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from mimkit.config import PretrainConfig, build_config
from mimkit.engine.checkpoint import CheckpointError, load_state_strict
from mimkit.interop import keymaps
from mimkit.interop.io import (
    CONFIG_NAME,
    IMAGENET_MEAN,
    IMAGENET_STD,
    WEIGHTS_NAME,
    read_json,
    read_safetensors,
    read_state_file,
    save_method_checkpoint,
)
from mimkit.models import DECODER_PRESETS, VIT_PRESETS


def _encoder_preset(dim: int, depth: int, arch: str | None, source: str) -> dict:
    """ModelConfig encoder fields for weights `dim` wide and `depth` blocks deep: the preset of that width
    (`arch` to insist on one), with ``depth`` set when the weights have another number of blocks than the
    preset (a run trained with ``model.depth``)."""
    if arch is not None:
        if arch not in VIT_PRESETS:
            raise CheckpointError(f"unknown encoder {arch!r}; choose one of {sorted(VIT_PRESETS)}")
        if VIT_PRESETS[arch].embed_dim != dim:
            raise CheckpointError(f"{source}: weights have width {dim}, but {arch} is {VIT_PRESETS[arch].embed_dim} wide")
        names = [arch]
    else:
        names = [n for n, spec in VIT_PRESETS.items() if spec.embed_dim == dim]
    exact = [n for n in names if VIT_PRESETS[n].depth == depth]
    if exact:
        return {"encoder": exact[0]}
    if names:
        return {"encoder": names[0], "depth": depth}
    known = ", ".join(f"{n} ({s.embed_dim}x{s.depth})" for n, s in VIT_PRESETS.items())
    raise CheckpointError(f"{source}: no mimkit encoder has width {dim}; known: {known}")


def _decoder_settings(dim: int, depth: int, heads: int | None) -> dict:
    """ModelConfig decoder fields: a preset when one matches exactly, else explicit overrides."""
    if heads is None:
        same_dim = [s for s in DECODER_PRESETS.values() if s.dim == dim]
        heads = same_dim[0].num_heads if same_dim else next(h for h in (16, 8, 4, 2, 1) if dim % h == 0)
    for name, spec in DECODER_PRESETS.items():
        if (spec.depth, spec.dim, spec.num_heads) == (depth, dim, heads):
            return {"decoder": name}
    return {"decoder": "base", "decoder_depth": depth, "decoder_dim": dim, "decoder_heads": heads}


def _depth(state: dict, prefix: str) -> int:
    idx = {int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)}
    if idx and idx != set(range(len(idx))):
        raise CheckpointError(f"blocks under {prefix} are not numbered 0..{len(idx) - 1}: {sorted(idx)}")
    return len(idx)


def _size(v) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    return (int(v[0]), int(v[1]))


def _data_meta(img_size, channels: int, mean, std) -> dict:
    if mean is None or std is None:
        if channels != 3:
            raise CheckpointError(
                f"the weights take {channels}-channel images: give mean and std (one value per channel); "
                f"ImageNet's statistics are the default only for 3 channels"
            )
        mean, std = mean or IMAGENET_MEAN, std or IMAGENET_STD
    return {"img_size": list(_size(img_size)), "channels": channels, "mean": list(mean), "std": list(std)}


def _build_and_save(state: dict, cfg_tree: dict, data: dict, out_ckpt, source: dict) -> Path:
    from mimkit.methods import build_method

    cfg = build_config(PretrainConfig, cfg_tree)
    method = build_method(cfg, tuple(data["img_size"]), data["channels"])
    own = method.state_dict()
    if source.get("decoder") == "initialised":
        state = {**{k: v for k, v in own.items() if k.startswith("decoder.")}, **state}
    load_state_strict(method, state, source["path"])
    if not torch.equal(method.encoder.pos_embed.detach(), own["encoder.pos_embed"]):
        # fixed sin-cos embeddings in a different layout would silently change the model: keep the file's,
        # but say so (they load as they are; mimkit never recomputes them after construction)
        source["note"] = "position embeddings differ from mimkit's sin-cos layout; the file's were kept"
    return save_method_checkpoint(method, cfg, data, out_ckpt, source=source)


def _config_tree(encoder: dict, patch: int, dec: dict, mask_ratio: float, norm_pix: bool, data: dict) -> dict:
    h, w = data["img_size"]
    return {
        "method": {"name": "mae", "mask_ratio": mask_ratio, "norm_pix": norm_pix},
        "model": {**encoder, "patch_size": patch, **dec},
        "data": {"img_size": h if h == w else [h, w], "channels": data["channels"], "mean": data["mean"], "std": data["std"]},
    }


# ------------------------------------------------------------------------------------------- mae reference


def _mae_file(path: Path) -> tuple[Path, dict]:
    """(weights file, sidecar config or {}) for a file or a folder written by `export_checkpoint(fmt="mae")`."""
    if path.is_dir():
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise CheckpointError(f"{path} is a folder without {WEIGHTS_NAME}")
        path = weights
    sidecar = path.parent / CONFIG_NAME
    meta = read_json(sidecar) if path.suffix == ".safetensors" and sidecar.is_file() else {}
    if meta and "facebookresearch/mae" not in str(meta.get("layout", "")):
        meta = {}
    return path, meta


def import_mae_checkpoint(
    path: str | Path,
    out_ckpt: str | Path,
    arch: str | None = None,
    *,
    img_size: int | tuple[int, int] | None = None,
    decoder_heads: int | None = None,
    mask_ratio: float | None = None,
    norm_pix: bool | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    assumed: list[str] | None = None,
) -> Path:
    """Convert a facebookresearch/mae checkpoint (.pth {"model": state_dict, ...} or .safetensors, or a folder
    from `export_checkpoint(fmt="mae")`) into a mimkit checkpoint at `out_ckpt`; returns `out_ckpt`.

    The architecture is read from the weights: width and depth pick the encoder preset (`arch` to insist on
    one), the patch-embedding kernel gives the patch size, the position-embedding length the (square) image
    size (`img_size` for a non-square one), and the decoder's blocks its width and depth. Head counts are not
    visible in the weights: the encoder's come from its preset, the decoder's from `decoder_heads` or the
    preset decoder of that width (16 for MAE's 512-wide decoder).

    `norm_pix` defaults to False, as in MAE's code and its released visualisation checkpoints (pixel targets);
    set it True for models trained with --norm_pix_loss. Files written by mimkit's own "mae" export carry
    these settings in their config.json and need no arguments. A run trained with ``model.depth`` imports
    as its width's preset with that depth. `assumed` (a list) receives one line per setting that was neither
    given nor in the file (decoder heads, norm_pix, mean/std, image size, mask ratio), which
    ``mimkit import-mae`` prints.
    """
    path = Path(path)
    weights, meta = _mae_file(path)
    meta = {**meta, **(meta.get("constructor") or {})}  # the official constructor's arguments, when written
    assumed = assumed if assumed is not None else []
    raw = read_state_file(weights)
    dropped = sorted(k for k in raw if k.startswith(("head.", "fc_norm.")))
    raw = {k: v for k, v in raw.items() if k not in dropped}
    for key in ("patch_embed.proj.weight", "pos_embed", "cls_token", "norm.weight"):
        if key not in raw:
            raise CheckpointError(f"{weights} is not in facebookresearch/mae's layout (no {key!r})")
    pw = raw["patch_embed.proj.weight"]
    dim, channels, ph, pwid = pw.shape
    if ph != pwid:
        raise CheckpointError(f"{weights}: non-square patches {ph}x{pwid} are not supported by mimkit's config")
    depth = _depth(raw, "blocks.")
    preset = _encoder_preset(dim, depth, arch, str(weights))
    mlp = raw["blocks.0.mlp.fc1.weight"].shape[0] if depth else 4 * dim
    if mlp != 4 * dim:
        raise CheckpointError(f"{weights}: MLP width {mlp} is not 4x the embedding width {dim}; mimkit encoders use ratio 4")
    n = raw["pos_embed"].shape[1] - 1
    if meta.get("num_heads") is not None and int(meta["num_heads"]) != VIT_PRESETS[preset["encoder"]].num_heads:
        raise CheckpointError(f"{weights}: {meta['num_heads']} encoder heads, but mimkit's {preset['encoder']} uses "
                              f"{VIT_PRESETS[preset['encoder']].num_heads}")
    if img_size is None and meta.get("img_size"):
        img_size = meta["img_size"]
    if img_size is None:
        side = math.isqrt(n)
        if side * side != n:
            raise CheckpointError(f"{weights}: {n} position embeddings is not a square grid; pass img_size=(H, W)")
        img_size = (side * ph, side * ph)
        assumed.append(f"image size {img_size[0]}x{img_size[1]} (a square grid of the {n} position embeddings; "
                       "--img-size H W for another)")
    mean = mean if mean is not None else meta.get("mean")
    std = std if std is not None else meta.get("std")
    if (mean is None or std is None) and channels == 3:
        assumed.append(f"ImageNet mean {IMAGENET_MEAN} and std {IMAGENET_STD} (--mean/--std for others)")
    data = _data_meta(img_size, channels, mean, std)
    gh, gw = data["img_size"][0] // ph, data["img_size"][1] // ph
    if gh * gw != n:
        raise CheckpointError(f"{weights}: image size {data['img_size']} with patch {ph} gives {gh * gw} patches, the file has {n}")

    has_decoder = "decoder_embed.weight" in raw
    if has_decoder:
        ddim = raw["decoder_embed.weight"].shape[0]
        ddepth = _depth(raw, "decoder_blocks.")
        if decoder_heads is None:
            decoder_heads = meta.get("decoder_num_heads")
        dec = _decoder_settings(ddim, ddepth, decoder_heads)
        if decoder_heads is None:
            heads = dec.get("decoder_heads") or DECODER_PRESETS[dec["decoder"]].num_heads
            assumed.append(f"{heads} decoder heads (not in the weights; guessed from the width {ddim}: "
                           "--decoder-heads N if the model was trained with another count, else its loss is wrong)")
        pred = raw["decoder_pred.weight"].shape[0]
        if pred != ph * ph * channels:
            raise CheckpointError(f"{weights}: decoder predicts {pred} values per patch, expected {ph}*{ph}*{channels}")
    else:
        dec = {"decoder": "mae"} if decoder_heads is None else {"decoder": "mae", "decoder_heads": decoder_heads}
    if mask_ratio is None:
        if "mask_ratio" not in meta:
            assumed.append("mask ratio 0.75 (MAE's; --mask-ratio for another)")
        mask_ratio = float(meta.get("mask_ratio", 0.75))
    if norm_pix is None:
        if "norm_pix_loss" not in meta:
            assumed.append("norm_pix off: pixel targets, as MAE's visualisation checkpoints (--norm-pix for models "
                           "trained with --norm_pix_loss)")
        norm_pix = bool(meta.get("norm_pix_loss", False))
    tree = _config_tree(preset, int(ph), dec, mask_ratio, norm_pix, data)
    state = keymaps.mae_to_mimkit(raw)
    if not has_decoder:
        state = {k: v for k, v in state.items() if k.startswith("encoder.")}
    source = {"kind": "facebookresearch/mae", "path": str(path), "decoder": "loaded" if has_decoder else "initialised"}
    if dropped:
        source["dropped"] = dropped
    if assumed:
        source["assumed"] = list(assumed)
    return _build_and_save(state, tree, data, out_ckpt, source)


# ------------------------------------------------------------------------------------------- transformers


def import_hf(
    folder: str | Path,
    out_ckpt: str | Path,
    *,
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> Path:
    """Convert a transformers ViTMAEForPreTraining folder (config.json + model.safetensors or
    pytorch_model.bin) into a mimkit checkpoint; mean/std default to its preprocessor_config.json."""
    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file():
        raise CheckpointError(f"{folder} has no {CONFIG_NAME}: not a transformers model folder")
    conf = read_json(folder / CONFIG_NAME)
    if conf.get("model_type") != "vit_mae":
        raise CheckpointError(f"{folder} holds a {conf.get('model_type')!r} model, not vit_mae (ViTMAEForPreTraining)")
    if (folder / WEIGHTS_NAME).is_file():
        raw = read_safetensors(folder / WEIGHTS_NAME)
    elif (folder / "pytorch_model.bin").is_file():
        raw = read_state_file(folder / "pytorch_model.bin")
    else:
        raise CheckpointError(f"{folder} has neither {WEIGHTS_NAME} nor pytorch_model.bin (sharded folders are not supported)")
    dim, depth = int(conf.get("hidden_size", 768)), int(conf.get("num_hidden_layers", 12))
    preset = _encoder_preset(dim, depth, None, str(folder))
    heads, name = int(conf.get("num_attention_heads", 12)), preset["encoder"]
    if heads != VIT_PRESETS[name].num_heads:
        raise CheckpointError(f"{folder}: {heads} attention heads, but mimkit's {name} uses {VIT_PRESETS[name].num_heads}")
    if int(conf.get("intermediate_size", 4 * dim)) != 4 * dim:
        raise CheckpointError(f"{folder}: intermediate_size {conf['intermediate_size']} is not 4 x hidden_size {dim}")
    if conf.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{folder}: activation {conf['hidden_act']!r}; mimkit's blocks use exact gelu")
    patch = conf.get("patch_size", 16)
    if not isinstance(patch, int):
        if patch[0] != patch[1]:
            raise CheckpointError(f"{folder}: non-square patch size {patch}")
        patch = patch[0]
    channels = int(conf.get("num_channels", 3))
    pre = folder / "preprocessor_config.json"
    if (mean is None or std is None) and pre.is_file():
        p = read_json(pre)
        mean = mean if mean is not None else p.get("image_mean")
        std = std if std is not None else p.get("image_std")
    data = _data_meta(conf.get("image_size", 224), channels, mean, std)
    dec = _decoder_settings(int(conf.get("decoder_hidden_size", 512)), int(conf.get("decoder_num_hidden_layers", 8)),
                            int(conf.get("decoder_num_attention_heads", 16)))
    tree = _config_tree(preset, int(patch), dec, float(conf.get("mask_ratio", 0.75)),
                        bool(conf.get("norm_pix_loss", False)), data)
    state = keymaps.hf_to_mimkit(raw)
    has_decoder = any(k.startswith("decoder.") for k in state)
    source = {"kind": "transformers ViTMAE", "path": str(folder), "decoder": "loaded" if has_decoder else "initialised"}
    return _build_and_save(state, tree, data, out_ckpt, source)


# ------------------------------------------------------------------------------------------- timm


def import_timm(
    folder: str | Path,
    out_ckpt: str | Path,
    *,
    decoder: str = "mae",
    mask_ratio: float = 0.75,
    norm_pix: bool = True,
) -> Path:
    """Convert a timm model folder (config.json + model.safetensors, e.g. from `export_checkpoint(fmt="timm")`)
    holding a ViT with fixed sin-cos-compatible shapes into a mimkit MAE checkpoint with a fresh decoder."""
    folder = Path(folder)
    conf = read_json(folder / CONFIG_NAME)
    args = dict(conf.get("model_args") or {})
    pcfg = conf.get("pretrained_cfg") or {}
    raw = read_safetensors(folder / WEIGHTS_NAME)
    raw = {k: v for k, v in raw.items() if not k.startswith(("head.", "fc_norm.", "head_drop."))}
    if "patch_embed.proj.weight" not in raw:
        raise CheckpointError(f"{folder}: not a timm VisionTransformer (no patch_embed.proj.weight)")
    dim, channels, ph, pwid = raw["patch_embed.proj.weight"].shape
    if ph != pwid:
        raise CheckpointError(f"{folder}: non-square patches {ph}x{pwid} are not supported by mimkit's config")
    preset = _encoder_preset(dim, _depth(raw, "blocks."), None, str(folder))
    size = args.get("img_size") or (pcfg.get("input_size") or [channels, 224, 224])[1:]
    data = _data_meta(size, channels, pcfg.get("mean"), pcfg.get("std"))
    tree = _config_tree(preset, int(ph), {"decoder": decoder}, mask_ratio, norm_pix, data)
    state = keymaps.timm_to_mimkit(raw)
    source = {"kind": "timm", "path": str(folder), "decoder": "initialised"}
    return _build_and_save(state, tree, data, out_ckpt, source)
