"""Parameter-name translations between mimkit's MAE state dict and other layouts.

mimkit: encoder.* (timm's ViT names) and decoder.{embed, mask_token, pos_embed, blocks.i, norm, pred}.
timm:   the encoder's names without the "encoder." prefix.
mae:    facebookresearch/mae's MaskedAutoencoderViT: encoder names at the top level, decoder_* for the decoder.
hf:     transformers' ViTMAEForPreTraining as stored on disk (the hub layout, e.g. facebook/vit-mae-base):
        vit.embeddings.*, vit.encoder.layer.i.*, vit.layernorm.*, decoder.decoder_*; attention as separate
        query/key/value projections where timm fuses them into one qkv matrix.
"""

from __future__ import annotations

import re

import torch

from mimkit.engine.checkpoint import CheckpointError

# ---------------------------------------------------------------------------------------------------- mae

_MAE_DECODER = {  # mimkit decoder.<a> <-> mae <b>
    "embed.": "decoder_embed.",
    "mask_token": "mask_token",
    "pos_embed": "decoder_pos_embed",
    "blocks.": "decoder_blocks.",
    "norm.": "decoder_norm.",
    "pred.": "decoder_pred.",
}


def mimkit_to_mae(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if key.startswith("encoder."):
            out[key[len("encoder."):]] = value
        elif key.startswith("decoder."):
            rest = key[len("decoder."):]
            for ours, theirs in _MAE_DECODER.items():
                if rest.startswith(ours):
                    out[theirs + rest[len(ours):]] = value
                    break
            else:
                raise KeyError(f"no facebookresearch/mae name for {key}")
        else:
            raise KeyError(f"no facebookresearch/mae name for {key}")
    return out


def mae_to_mimkit(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `mimkit_to_mae`; unknown keys are an error (a classifier head, say, is dropped by the caller)."""
    out = {}
    for key, value in state.items():
        for ours, theirs in _MAE_DECODER.items():
            if key.startswith(theirs):
                out["decoder." + ours + key[len(theirs):]] = value
                break
        else:
            out["encoder." + key] = value
    return out


# ---------------------------------------------------------------------------------------------------- timm


def mimkit_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}


def timm_to_mimkit(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"encoder." + k: v for k, v in state.items() if not k.startswith("head.")}


# ---------------------------------------------------------------------------------------------------- hf

# per transformer layer: timm Block name <-> HF hub name (besides the fused qkv, handled apart)
_HF_LAYER = {
    "norm1.": "layernorm_before.",
    "attn.proj.": "attention.output.dense.",
    "norm2.": "layernorm_after.",
    "mlp.fc1.": "intermediate.dense.",
    "mlp.fc2.": "output.dense.",
}
_HF_QKV = ("attention.attention.query.", "attention.attention.key.", "attention.attention.value.")

_HF_TOP = {  # mimkit <-> HF for everything outside the per-layer blocks
    "encoder.cls_token": "vit.embeddings.cls_token",
    "encoder.pos_embed": "vit.embeddings.position_embeddings",
    "encoder.patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
    "encoder.patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
    "encoder.norm.weight": "vit.layernorm.weight",
    "encoder.norm.bias": "vit.layernorm.bias",
    "decoder.embed.weight": "decoder.decoder_embed.weight",
    "decoder.embed.bias": "decoder.decoder_embed.bias",
    "decoder.mask_token": "decoder.mask_token",
    "decoder.pos_embed": "decoder.decoder_pos_embed",
    "decoder.norm.weight": "decoder.decoder_norm.weight",
    "decoder.norm.bias": "decoder.decoder_norm.bias",
    "decoder.pred.weight": "decoder.decoder_pred.weight",
    "decoder.pred.bias": "decoder.decoder_pred.bias",
}
_HF_BLOCKS = {"encoder.blocks.": "vit.encoder.layer.", "decoder.blocks.": "decoder.decoder_layers."}
_BLOCK_RE = re.compile(r"^(encoder|decoder)\.blocks\.(\d+)\.(.+)$")


def mimkit_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
            continue
        m = _BLOCK_RE.match(key)
        if not m:
            raise KeyError(f"no transformers ViTMAE name for {key}")
        part, idx, rest = m.groups()
        prefix = _HF_BLOCKS[f"{part}.blocks."] + idx + "."
        if rest.startswith("attn.qkv."):
            kind = rest[len("attn.qkv."):]  # weight | bias
            for name, chunk in zip(_HF_QKV, value.chunk(3, dim=0)):
                out[prefix + name + kind] = chunk.clone()
            continue
        for ours, theirs in _HF_LAYER.items():
            if rest.startswith(ours):
                out[prefix + theirs + rest[len(ours):]] = value
                break
        else:
            raise KeyError(f"no transformers ViTMAE name for {key}")
    return out


# names transformers >= 5 uses in memory (and, for decoder layers, a spelling its save_pretrained writes)
_HF_ALIASES = [
    (re.compile(r"^vit\.layers\.(\d+)\."), r"vit.encoder.layer.\1."),
    (re.compile(r"^decoder\.decoder_encoder\.layer\.(\d+)\."), r"decoder.decoder_layers.\1."),
    (re.compile(r"\.attention\.q_proj\."), ".attention.attention.query."),
    (re.compile(r"\.attention\.k_proj\."), ".attention.attention.key."),
    (re.compile(r"\.attention\.v_proj\."), ".attention.attention.value."),
    (re.compile(r"\.attention\.o_proj\."), ".attention.output.dense."),
    (re.compile(r"\.mlp\.fc1\."), ".intermediate.dense."),
    (re.compile(r"\.mlp\.fc2\."), ".output.dense."),
]


def normalize_hf_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rewrite newer transformers spellings into the hub layout that `hf_to_mimkit` reads."""
    out = {}
    for key, value in state.items():
        for pattern, repl in _HF_ALIASES:
            key = pattern.sub(repl, key)
        out[key] = value
    return out


def hf_to_mimkit(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = normalize_hf_keys(state)
    top = {theirs: ours for ours, theirs in _HF_TOP.items()}
    layer = {theirs: ours for ours, theirs in _HF_LAYER.items()}
    block_re = re.compile(r"^(vit\.encoder\.layer|decoder\.decoder_layers)\.(\d+)\.(.+)$")
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
            continue
        m = block_re.match(key)
        if not m:
            unknown.append(key)
            continue
        where, idx, rest = m.groups()
        prefix = ("encoder" if where.startswith("vit") else "decoder") + f".blocks.{idx}."
        for i, name in enumerate(_HF_QKV):
            if rest.startswith(name):
                kind = rest[len(name):]
                qkv.setdefault((prefix + "attn.qkv." + kind, kind), {})[i] = value
                break
        else:
            for theirs, ours in layer.items():
                if rest.startswith(theirs):
                    out[prefix + ours + rest[len(theirs):]] = value
                    break
            else:
                unknown.append(key)
    if unknown:
        shown = ", ".join(sorted(unknown)[:8]) + (" ..." if len(unknown) > 8 else "")
        raise CheckpointError(f"unexpected transformers ViTMAE weights: {shown}")
    for (name, _kind), parts in qkv.items():
        if sorted(parts) != [0, 1, 2]:
            raise CheckpointError(f"incomplete query/key/value weights for {name}")
        out[name] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
    return out
