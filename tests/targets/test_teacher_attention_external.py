"""FrozenTeacher.forward_with_attention for `hf:` and `open_clip:` teachers: the attention read by pre-hooks in
the teacher's own (fused-kernel) pass equals the libraries' own attention probabilities, for transformers ViT,
ViTMAE, CLIP, SigLIP, DINOv2 with registers and open_clip towers (nn.MultiheadAttention batch- and
sequence-first, open_clip's own Attention with q/k norms); MaskAlign's default attention mask runs on a `hf:` CLIP.

Every model is a tiny random one written to a tmp folder (the builders of tests/eval/test_encoders_clip.py)."""

import json
import sys
from pathlib import Path

import pytest
import torch

from mimkit.backends import load_encoder
from mimkit.targets.teacher import FrozenTeacher

transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "methods"))
from method_helpers import fashion_mnist, small_method  # noqa: E402

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=4)
CROP = {"crop_size": {"height": 16, "width": 16}}  # DINOv2: the processor's crop is the input size
REGISTERS = 2


def _images(n=2, seed=1):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _vit_mae_noise(model, x):  # the patch order kept, as the adapter runs it
    n = model.embeddings.patch_embeddings.num_patches
    return {"noise": torch.arange(n, dtype=torch.float32).expand(x.shape[0], -1)}


# name -> (config class, model class, config kwargs, preprocessor file, extra model inputs, prefix tokens)
FAMILIES = {
    "vit": ("ViTConfig", "ViTModel", dict(image_size=16, **SMALL), None, None, 1),
    "vit_mae": ("ViTMAEConfig", "ViTMAEModel", dict(image_size=16, mask_ratio=0.0, **SMALL), None, _vit_mae_noise, 1),
    "clip": ("CLIPVisionConfig", "CLIPVisionModel", dict(image_size=16, **SMALL), None, None, 1),
    "siglip": ("SiglipVisionConfig", "SiglipVisionModel", dict(image_size=16, **SMALL), None, None, 0),
    "dinov2_registers": ("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel",
                         dict(image_size=32, num_register_tokens=REGISTERS, mlp_ratio=2,
                              **{k: v for k, v in SMALL.items() if k != "intermediate_size"}), CROP, None,
                         1 + REGISTERS),
}


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_attention")
    for name, (conf_cls, model_cls, kwargs, prep, _, _) in FAMILIES.items():
        torch.manual_seed(0)
        extra = {"add_pooling_layer": False} if name == "vit" else {}
        model = getattr(transformers, model_cls)(getattr(transformers, conf_cls)(**kwargs), **extra)
        model.save_pretrained(root / name)
        if prep:
            (root / name / "preprocessor_config.json").write_text(json.dumps(prep))
    return root


def _own_grid_teacher(spec, layers=(0, -1)):
    """A FrozenTeacher whose data statistics are the model's own and whose student grid is its grid: the model
    sees exactly the test's images, so its attention compares with the library's on the same input."""
    loaded = load_encoder(spec)
    return loaded, FrozenTeacher(loaded, loaded.encoder.grid_size, loaded.mean, loaded.std, layers=list(layers))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_hf_attention_is_the_librarys_own(hf_folders, name):
    conf_cls, model_cls, _, _, extra, prefix = FAMILIES[name]
    loaded, teacher = _own_grid_teacher(f"hf:{hf_folders / name}")
    model = loaded.encoder.model
    impl = model.config._attn_implementation
    x = _images(seed=len(name))
    feats, attns = teacher.forward_with_attention(x, [-1, 0])
    ref_model = getattr(transformers, model_cls).from_pretrained(hf_folders / name, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = ref_model(pixel_values=x, output_attentions=True, **(extra(ref_model, x) if extra else {})).attentions
    t = prefix + 16
    assert [a.shape for a in attns] == [(2, 2, t, t)] * 2 and all(a.dtype == torch.float32 for a in attns)
    torch.testing.assert_close(attns[0], ref[-1].float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(attns[1], ref[0].float(), atol=1e-5, rtol=0)
    assert not torch.allclose(attns[0], attns[1])
    for mine, plain in zip(feats, teacher.features(x)):  # the same features as the plain pass
        torch.testing.assert_close(mine, plain, atol=1e-5, rtol=1e-5)
    # the teacher's own pass was not switched to eager attention, and the hooks are gone
    assert model.config._attn_implementation == impl
    assert not any(m._forward_pre_hooks for m in model.modules())
    # per-patch scores: the class row on the patches (registers left out) or, for SigLIP, the column mean
    last = ref[-1].float()
    expect = last[:, :, 0, prefix:].mean(1) if prefix else last.mean(2).mean(1)
    torch.testing.assert_close(teacher.cls_attention_on_student_grid(attns[0]),
                               expect / expect.sum(-1, keepdim=True), atol=1e-5, rtol=0)
    assert teacher.has_class_token == (prefix > 0)


# ----------------------------------------------------------------------------------------------- open_clip

OC_CFG = {"embed_dim": 12,
          "vision_cfg": {"image_size": 16, "patch_size": 4, "width": 32, "layers": 2, "head_width": 16, "mlp_ratio": 2},
          "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def open_clip_files(tmp_path_factory):
    """Weights of a tiny open_clip model with torch's nn.MultiheadAttention blocks ("plain") and one with
    open_clip's own Attention (q/k LayerNorms: "qk_norm")."""
    open_clip = pytest.importorskip("open_clip", reason="open_clip is optional: pip install 'open_clip_torch>=3'")
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("open_clip_attention")
    (root / "configs").mkdir()
    qk = {**OC_CFG, "vision_cfg": {**OC_CFG["vision_cfg"], "qk_norm": True}}
    for name, cfg in (("plain", OC_CFG), ("qk_norm", qk)):
        (root / "configs" / f"mimkit-test-attn-{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(root / "configs")
    for name in ("plain", "qk_norm"):
        torch.manual_seed(0)
        model = open_clip.create_model(f"mimkit-test-attn-{name}").eval()
        with torch.no_grad():  # open_clip leaves some tensors at zero/one: make every weight matter
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, root / f"{name}.safetensors")
    return root


def _mha_reference(tower, x):
    """Block by block through open_clip's tower, each nn.MultiheadAttention asked for its own weights."""
    h, out = tower.embed(x), []
    seq_first = not tower.visual.transformer.batch_first
    h = h.transpose(0, 1) if seq_first else h
    for block in tower.visual.transformer.resblocks:
        y = block.ln_1(h)
        out.append(block.attn(y, y, y, need_weights=True, average_attn_weights=False)[1])
        h = block(h)
    return out


@pytest.mark.parametrize("seq_first", [False, True])
def test_open_clip_multihead_attention_is_torchs_own(open_clip_files, seq_first):
    loaded, teacher = _own_grid_teacher(f"open_clip:mimkit-test-attn-plain@{open_clip_files / 'plain.safetensors'}")
    tower = loaded.encoder.model
    assert isinstance(tower.visual.transformer.resblocks[0].attn, torch.nn.MultiheadAttention)
    if seq_first:  # open_clip < 2.24 ran its blocks sequence-first: the same weights in that layout
        tower.visual.transformer.batch_first = False
        for block in tower.visual.transformer.resblocks:
            block.attn.batch_first = False
    x = _images(seed=3)
    feats, attns = teacher.forward_with_attention(x, [0, 1])
    with torch.no_grad():
        ref = _mha_reference(tower, x)
    assert [a.shape for a in attns] == [(2, 2, 17, 17)] * 2
    for mine, theirs in zip(attns, ref):
        torch.testing.assert_close(mine, theirs.float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(feats[0], teacher.features(x)[0], atol=1e-5, rtol=1e-5)
    assert not any(m._forward_pre_hooks for m in tower.modules())


def test_open_clip_own_attention_with_qk_norm(open_clip_files, monkeypatch):
    import torch.nn.functional as F

    spec = f"open_clip:mimkit-test-attn-qk_norm@{open_clip_files / 'qk_norm.safetensors'}"
    loaded, teacher = _own_grid_teacher(spec, layers=[-1])
    attn = loaded.encoder.model.visual.transformer.resblocks[0].attn
    assert type(attn).__name__ == "Attention" and not isinstance(attn.ln_q, torch.nn.Identity)
    seen = []  # the q, k (after open_clip's q/k norms) its fused kernel receives: softmax(q k^T / sqrt(d)) by definition
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: seen.append((q, k)) or sdpa(q, k, v, **kw))
    x = _images(seed=4)
    feats, attns = teacher.forward_with_attention(x, [0, 1])
    assert len(seen) == 2
    for mine, (q, k) in zip(attns, seen):
        ref = (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).softmax(-1)
        torch.testing.assert_close(mine, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(feats[0], teacher.features(x)[0], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- methods

def test_maskalign_default_attention_mask_runs_on_a_hf_clip_teacher(hf_folders):
    m = small_method("maskalign", (28, 28), 1, "data.mean=[0.286]", "data.std=[0.353]",
                     f"method.teacher.source=hf:{hf_folders / 'clip'}", depth=2)
    assert m.cfg.mask == "attention"
    images = fashion_mnist(4)
    batch = {"image": images, "seed": torch.arange(4)}
    _, scores = m.teacher_pass(images, batch["seed"])
    assert scores.shape == (4, 49) and torch.allclose(scores.sum(-1), torch.ones(4), atol=1e-5)
    assert scores.std(-1).min() > 0  # the CLIP class token's attention, resampled from 4x4 to 7x7: not uniform
    out = m(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert all(p.grad is not None for p in m.encoder.parameters() if p.requires_grad)


def test_teachers_whose_attention_cannot_be_read_fail_by_name(hf_folders):
    """A timm BEiT (relative position bias) is refused naming its attention class; a SigLIP MIM teacher for
    Hybrid Distillation (no class token to pair with the student's) is refused when the method is built."""
    import timm

    from mimkit.backends import LoadedEncoder, TimmEncoder
    from mimkit.methods.hybrid_distill import HybridDistill
    from mimkit.models import VisionTransformer

    beit = timm.create_model("beit_base_patch16_224", pretrained=False, img_size=16, patch_size=4, embed_dim=24,
                             depth=1, num_heads=3, num_classes=0).eval()
    t = FrozenTeacher(LoadedEncoder(TimmEncoder(beit, 3, 1, 24), (16, 16), 3, [0.5] * 3, [0.25] * 3), (4, 4),
                      [0.5] * 3, [0.25] * 3)
    with pytest.raises(ValueError, match=r"cannot read the attention of teacher timm .*Attention"):
        t.check_attention()
    _, siglip = _own_grid_teacher(f"hf:{hf_folders / 'siglip'}")
    student = VisionTransformer(16, 4, 3, embed_dim=24, depth=2, num_heads=3)
    with pytest.raises(ValueError, match="mim_teacher has no class token"):
        HybridDistill(student, siglip, siglip)
