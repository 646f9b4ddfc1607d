"""Fine-tuning's layer-wise lr decay assigns every encoder kind `mimkit.backends` loads the same way: the patch and
position embeddings first, block i at depth i + 1 (found through the model's own block list, not its names), the
final norm with the last block, the classifier head last; position tables and tokens get no weight decay.
Tiny random models written to tmp folders, no network."""

import json

import pytest
import torch

from mimkit.backends import MimkitEncoder, TimmEncoder, load_encoder
from mimkit.eval.finetune import Classifier, random_init
from mimkit.models import VisionTransformer

transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=4)
DECAY = 0.5


def _hf_folder(tmp_path, kind):
    from transformers import (CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model,
                              SiglipVisionConfig, SiglipVisionModel, ViTConfig, ViTModel)

    torch.manual_seed(0)
    if kind == "clip_proj":
        text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                    max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=dict(image_size=16, projection_dim=12, **SMALL),
                                    projection_dim=12))
    elif kind == "clip":
        model = CLIPVisionModel(CLIPVisionConfig(image_size=16, **SMALL))
    elif kind == "siglip":
        model = SiglipVisionModel(SiglipVisionConfig(image_size=16, **SMALL))
    elif kind == "dinov2":
        model = Dinov2Model(Dinov2Config(image_size=16, mlp_ratio=2, **{k: v for k, v in SMALL.items()
                                                                         if k != "intermediate_size"}))
    else:
        model = ViTModel(ViTConfig(image_size=16, **SMALL), add_pooling_layer=False)
    model.save_pretrained(tmp_path / kind)
    return f"hf:{tmp_path / kind}" + ("#proj" if kind == "clip_proj" else "")


def _open_clip(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    from safetensors.torch import save_file

    name = "mimkit-test-finetune-clip"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / f"{name}.json").write_text(json.dumps({
        "embed_dim": 12, "vision_cfg": {"image_size": 16, "patch_size": 4, "width": 32, "layers": 2, "head_width": 16,
                                        "mlp_ratio": 2},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}))
    open_clip.add_model_config(tmp_path / "configs")
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in open_clip.create_model(name).state_dict().items()},
              tmp_path / "oc.safetensors")
    return f"open_clip:{name}@{tmp_path / 'oc.safetensors'}"


def _blocks(encoder) -> list:
    """The encoder's transformer blocks, from its module tree."""
    model = encoder.model
    if hasattr(model, "blocks"):
        return list(model.blocks)
    if hasattr(model, "visual"):
        return list(model.visual.transformer.resblocks)
    tower = getattr(model, "vision_model", model)
    if hasattr(tower, "layers"):  # transformers 5's ViT
        return list(tower.layers)
    return list(getattr(tower.encoder, "layers", None) or tower.encoder.layer)


def _encoder(kind, tmp_path):
    if kind == "mimkit":
        vit = VisionTransformer(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2)
        return MimkitEncoder(vit, 3, 2, 32)
    if kind == "timm":
        import timm

        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=16, patch_size=4,
                                  depth=2, embed_dim=32, num_heads=2)
        return TimmEncoder(model, 3, 2, 32)
    spec = _open_clip(tmp_path) if kind == "open_clip" else _hf_folder(tmp_path, kind)
    return load_encoder(spec).encoder


@pytest.mark.parametrize("kind", ["mimkit", "timm", "vit", "clip", "clip_proj", "siglip", "dinov2", "open_clip"])
def test_every_block_gets_its_own_decayed_lr(kind, tmp_path):
    from timm.optim import param_groups_layer_decay

    from mimkit.eval.finetune import NO_WEIGHT_DECAY

    model = Classifier(_encoder(kind, tmp_path), 10)
    names = {id(p): n for n, p in model.named_parameters()}
    no_wd = [n for n in names.values() if n.endswith(NO_WEIGHT_DECAY)]
    scale, decay = {}, {}
    for g in param_groups_layer_decay(model, 0.05, no_weight_decay_list=no_wd, layer_decay=DECAY):
        for p in g["params"]:
            scale[names[id(p)]], decay[names[id(p)]] = g["lr_scale"], g["weight_decay"]
    blocks = _blocks(model.encoder)
    depth = len(blocks)
    assert depth == 2
    in_block = {}
    for i, block in enumerate(blocks):
        for p in block.parameters():
            in_block[names[id(p)]] = i
    for name, s in scale.items():
        if name in in_block:  # block i: one step of decay per block above it, and one for the head
            assert s == DECAY ** (depth - in_block[name]), name
        elif name.startswith(("head.", "fc_norm.")):
            assert s == 1.0, name
        else:  # embeddings at the bottom, the final norm (and projection) with the last block
            assert s in (DECAY ** (depth + 1), DECAY), name
    stem = [n for n, s in scale.items() if s == DECAY ** (depth + 1)]
    assert stem and all("embed" in n or n.split(".")[-2:][0] in ("conv1", "ln_pre", "pre_layrnorm") or
                        n.endswith(("cls_token", "mask_token", "class_embedding", "positional_embedding"))
                        for n in stem), stem
    tables = [n for n in scale if n.endswith(("pos_embed", "position_embeddings", "position_embedding.weight",
                                              "positional_embedding"))]
    assert all(decay[n] == 0.0 for n in tables)
    assert kind == "mimkit" or tables  # mimkit's sin-cos table is frozen (no grad), every other kind learns one


def test_open_clip_encoders_reinitialise_for_from_scratch_runs(tmp_path):
    enc = _encoder("open_clip", tmp_path)
    fresh = random_init(enc)
    before, after = dict(enc.named_parameters()), dict(fresh.named_parameters())
    assert before.keys() == after.keys()
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    weights = [n for n, p in before.items() if p.ndim >= 2 or n.endswith("class_embedding")]
    assert set(weights) <= set(changed)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert fresh(x).shape == enc(x).shape and torch.isfinite(fresh(x)).all()
