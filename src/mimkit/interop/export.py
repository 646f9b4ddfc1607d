"""Export a mimkit MAE checkpoint as a timm model folder, a transformers ViTMAE folder or MAE's reference layout.

Every output is a folder with `model.safetensors` and `config.json`; nothing is pickled.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from mimkit.engine.checkpoint import CheckpointError, method_from_checkpoint
from mimkit.interop import keymaps
from mimkit.interop.io import CONFIG_NAME, WEIGHTS_NAME, write_json, write_safetensors

FORMATS = ("timm", "hf", "mae")


class ExportError(CheckpointError):
    """The checkpoint cannot be written in the requested format; the message says what does not fit."""


def _state(method) -> dict:
    return {k: v.detach().cpu() for k, v in method.state_dict().items()}


def _timm_config(method, data: dict) -> dict:
    enc = method.encoder
    c, (h, w) = enc.grid.in_chans, enc.grid.img_size
    cnn = hasattr(enc, "stage_names")
    if cnn and (enc.depth < 4 or enc.small_stem):
        raise ExportError(
            f"this {enc.timm_name} has {'a small-image stem (conv1 stride 1, no maxpool)' if enc.small_stem else f'only {enc.depth} stages'}, "
            "which timm's model arguments cannot express; its weights load into timm by hand (see mimkit.models.cnn)"
        )
    return {
        "architecture": enc.timm_name,
        "num_classes": 0,
        "num_features": enc.embed_dim,
        "global_pool": "avg" if cnn else "token",
        "model_args": enc.timm_kwargs(),
        "pretrained_cfg": {
            "tag": "mimkit_mae",
            "input_size": [c, h, w],
            "fixed_input_size": not cnn,  # timm passes img_size to models with a fixed input size
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": list(data["mean"]),
            "std": list(data["std"]),
            "num_classes": 0,
            "pool_size": None,
            "first_conv": "conv1" if cnn else "patch_embed.proj",
            "classifier": "fc" if cnn else "head",
        },
    }


def hf_config_dict(method, cfg) -> dict:
    """transformers.ViTMAEConfig arguments for this MAE; raises ExportError for what ViTMAE cannot express."""
    enc, dec = method.encoder, method.decoder
    (h, w), (ph, pw) = enc.grid.img_size, enc.grid.patch_size
    if h != w:
        raise ExportError(
            f"transformers ViTMAE needs a square image size, this model uses {h}x{w} "
            f"(ViTMAEForPreTraining's patchify and position embeddings assume square inputs); export the encoder to timm "
            f"instead (MAE's own code assumes square images too)"
        )
    if ph != pw:
        raise ExportError(f"transformers ViTMAE needs a square patch size, this model uses {ph}x{pw}")
    dec_block = dec.blocks[0] if len(dec.blocks) else None
    return {
        "architectures": ["ViTMAEForPreTraining"],
        "model_type": "vit_mae",
        "hidden_size": enc.embed_dim,
        "num_hidden_layers": enc.depth,
        "num_attention_heads": enc.num_heads,
        "intermediate_size": enc.blocks[0].mlp.fc1.out_features,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-6,
        "image_size": h,
        "patch_size": ph,
        "num_channels": enc.grid.in_chans,
        "qkv_bias": True,
        "decoder_num_attention_heads": dec_block.attn.num_heads if dec_block is not None else 1,
        "decoder_hidden_size": dec.embed.out_features,
        "decoder_num_hidden_layers": len(dec.blocks),
        "decoder_intermediate_size": dec_block.mlp.fc1.out_features if dec_block is not None else 4 * dec.embed.out_features,
        "mask_ratio": float(cfg.method.mask_ratio),
        "norm_pix_loss": bool(cfg.method.norm_pix),
    }


def _hf_preprocessor(method, data: dict) -> dict:
    h, w = method.encoder.grid.img_size
    return {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": h, "width": w},
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(data["mean"]),
        "image_std": list(data["std"]),
    }


# the keyword arguments of facebookresearch/mae's MaskedAutoencoderViT (models_mae.py), besides norm_layer
MAE_CONSTRUCTOR_ARGS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "decoder_embed_dim",
                        "decoder_depth", "decoder_num_heads", "mlp_ratio", "norm_pix_loss")
MAE_LOAD_HINT = ("model = MaskedAutoencoderViT(**config['constructor'], "
                 "norm_layer=functools.partial(torch.nn.LayerNorm, eps=config['layer_norm_eps']))")


def mae_official_limits(method) -> list[str]:
    """What facebookresearch/mae's code cannot run for this model (empty: it runs as is)."""
    enc = method.encoder
    (h, w), (ph, pw) = enc.grid.img_size, enc.grid.patch_size
    limits = []
    if h != w or ph != pw:
        limits.append(f"its constructor takes one square image and patch size (this model: {h}x{w} images, "
                      f"{ph}x{pw} patches), so there is no 'constructor' entry")
    if enc.grid.in_chans != 3:
        limits.append(f"its patchify/unpatchify (loss and reconstructions) hard-code 3 channels; this model takes "
                      f"{enc.grid.in_chans}: the encoder builds with in_chans={enc.grid.in_chans}, the loss does not run")
    return limits


def _mae_config(method, cfg, data: dict) -> dict:
    """config.json of the "mae" export: `constructor` is exactly what MaskedAutoencoderViT takes (see
    docs/interop: two lines load it); the other keys are what mimkit's importer and a reader need."""
    enc, dec = method.encoder, method.decoder
    (h, w), (ph, pw) = enc.grid.img_size, enc.grid.patch_size
    norm = enc.norm
    conf = {"layout": "facebookresearch/mae MaskedAutoencoderViT"}
    limits = mae_official_limits(method)
    if h == w and ph == pw:
        conf["constructor"] = {
            "img_size": int(h), "patch_size": int(ph), "in_chans": int(enc.grid.in_chans),
            "embed_dim": int(enc.embed_dim), "depth": int(enc.depth), "num_heads": int(enc.num_heads),
            "decoder_embed_dim": int(dec.embed.out_features), "decoder_depth": len(dec.blocks),
            "decoder_num_heads": int(dec.blocks[0].attn.num_heads) if len(dec.blocks) else 1,
            "mlp_ratio": float(enc.mlp_ratio), "norm_pix_loss": bool(cfg.method.norm_pix),
        }
        conf["load"] = MAE_LOAD_HINT
    conf["layer_norm_eps"] = float(getattr(norm, "eps", 1e-6))  # MAE's models use 1e-6; nn.LayerNorm's default 1e-5
    if limits:
        conf["official_code_limits"] = limits
    conf.update({
        # mimkit's own description (re-import with `mimkit import-mae`; any geometry)
        "img_size": [int(h), int(w)], "patch_size": [int(ph), int(pw)], "in_chans": int(enc.grid.in_chans),
        "decoder_num_heads": int(dec.blocks[0].attn.num_heads) if len(dec.blocks) else 1,
        "norm_pix_loss": bool(cfg.method.norm_pix), "mask_ratio": float(cfg.method.mask_ratio),
        "mean": list(data["mean"]), "std": list(data["std"]),
    })
    return conf


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path, fmt: str = "timm") -> Path:
    """Write the checkpoint's weights to `out_dir` in format `fmt` ("timm", "hf" or "mae"); returns `out_dir`.

    timm: loadable with `timm.create_model("local-dir:<out_dir>", pretrained=True)` (encoder only).
    hf:   loadable with `transformers.ViTMAEForPreTraining.from_pretrained(out_dir)` (encoder and decoder).
    mae:  facebookresearch/mae's MaskedAutoencoderViT state dict, plus a config.json whose `constructor` entry
          is MaskedAutoencoderViT's keyword arguments (with `layer_norm_eps` for its norm_layer); geometries
          MAE's code cannot run (non-square, not 3 channels) are warned about and listed there.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    method, cfg, ckpt = method_from_checkpoint(ckpt_path)
    if cfg.method.name != "mae" or not hasattr(method, "decoder"):
        if fmt != "timm":
            raise ExportError(f"format {fmt!r} holds an MAE encoder and decoder; method {cfg.method.name!r} has no MAE decoder")
    data = ckpt["data"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = _state(method)
    meta = {"format": "pt", "source": "mimkit"}
    if fmt == "timm":
        write_safetensors(keymaps.mimkit_to_timm(state), out / WEIGHTS_NAME, meta)
        write_json(_timm_config(method, data), out / CONFIG_NAME)
    elif fmt == "hf":
        config = hf_config_dict(method, cfg)  # validate before writing anything
        write_safetensors(keymaps.mimkit_to_hf(state), out / WEIGHTS_NAME, meta)
        write_json(config, out / CONFIG_NAME)
        write_json(_hf_preprocessor(method, data), out / "preprocessor_config.json")
    else:
        for limit in mae_official_limits(method):
            warnings.warn(f"facebookresearch/mae's code cannot run this model as it is: {limit}", UserWarning,
                          stacklevel=2)
        write_safetensors(keymaps.mimkit_to_mae(state), out / WEIGHTS_NAME, meta)
        write_json(_mae_config(method, cfg, data), out / CONFIG_NAME)
    return out
