"""FrozenTeacher.forward_with_attention: features and attention from ONE teacher pass; class-token attention
on the student's grid."""

import pytest
import torch
import torch.nn.functional as F

from mimkit.eval.analysis import attention_maps
from mimkit.backends import wrap_mimkit
from mimkit.models import VisionTransformer
from mimkit.targets.teacher import FrozenTeacher


def _teacher(img=16, patch=4, student_grid=(4, 4), layers=(0,), seed=0):
    torch.manual_seed(seed)
    vit = VisionTransformer(img, patch, 3, embed_dim=24, depth=3, num_heads=3).eval()
    data = {"img_size": [img, img], "channels": 3, "mean": [0.4] * 3, "std": [0.2] * 3}
    return vit, FrozenTeacher(wrap_mimkit(vit, data), student_grid, [0.5] * 3, [0.25] * 3, layers=list(layers))


def test_one_pass_gives_the_features_and_the_attention_of_deeper_layers():
    vit, t = _teacher(layers=(0,))
    calls = []
    original = vit.forward_layers
    vit.forward_layers = lambda *a, **k: calls.append(1) or original(*a, **k)
    x = torch.randn(2, 3, 16, 16)
    feats, attns = t.forward_with_attention(x, [-1, 1])
    assert len(calls) == 1                                  # a single teacher pass, although block 2 > layer 0
    vit.forward_layers = original
    assert len(feats) == 1 and torch.allclose(feats[0], t.features(x)[0], atol=1e-6)
    ref = attention_maps(vit, x * 1.25 + 0.5, [2, 1])       # the teacher's own normalisation: (x*.25+.5-.4)/.2
    assert [a.shape for a in attns] == [(2, 3, 17, 17)] * 2
    assert all(a.dtype == torch.float32 and not a.requires_grad for a in attns)
    assert torch.allclose(attns[0], ref[0], atol=1e-5) and torch.allclose(attns[1], ref[1], atol=1e-5)
    assert torch.allclose(attns[0].sum(-1), torch.ones(2, 3, 17), atol=1e-5)
    assert not torch.allclose(attns[0], attns[1])
    assert not any(b.attn._forward_pre_hooks for b in vit.blocks)   # the hooks are removed afterwards
    with pytest.raises(ValueError, match="out of range"):
        t.forward_with_attention(x, [3])


def test_cls_attention_is_the_head_mean_class_row_over_patches_renormalised():
    _, t = _teacher()
    attn = torch.rand(2, 3, 17, 17).softmax(-1)
    row = t.cls_attention_on_student_grid(attn)
    expect = attn[:, :, 0, 1:].mean(1)
    assert row.shape == (2, 16)
    assert torch.allclose(row, expect / expect.sum(-1, keepdim=True), atol=1e-6)


def test_cls_attention_is_resampled_to_a_finer_student_grid():
    _, t = _teacher(img=16, patch=8, student_grid=(4, 4))   # teacher grid 2x2, student 4x4
    x = torch.randn(2, 3, 16, 16)
    _, (attn,) = t.forward_with_attention(x, [-1])
    assert attn.shape == (2, 3, 5, 5)
    row = t.cls_attention_on_student_grid(attn)
    assert row.shape == (2, 16) and torch.allclose(row.sum(-1), torch.ones(2), atol=1e-6)
    coarse = attn[:, :, 0, 1:].mean(1).view(2, 1, 2, 2)
    up = F.interpolate(coarse, size=(4, 4), mode="bilinear", align_corners=False).flatten(1)
    assert torch.allclose(row, up / up.sum(-1, keepdim=True), atol=1e-6)
    # the most attended teacher patch stays the most attended quadrant on the student grid
    top = coarse.flatten(1).argmax(-1)
    quadrant = row.view(2, 2, 2, 2, 2).permute(0, 1, 3, 2, 4).reshape(2, 4, 4).sum(-1)
    assert torch.equal(quadrant.argmax(-1), top)


def test_a_timm_teacher_gives_its_attention():
    import timm

    from mimkit.backends import LoadedEncoder, TimmEncoder

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, num_classes=0,
                              depth=2).eval()
    t = FrozenTeacher(LoadedEncoder(TimmEncoder(model, 3, 2, 192), (16, 16), 3, [0.5] * 3, [0.25] * 3),
                      (4, 4), [0.5] * 3, [0.25] * 3, layers=[-1])
    x = torch.randn(2, 3, 16, 16)
    (feat,), (attn,) = t.forward_with_attention(x, [-1])
    assert torch.allclose(feat, t.features(x)[0], atol=1e-5)
    assert torch.allclose(attn, attention_maps(model, x, [-1])[0], atol=1e-5)
