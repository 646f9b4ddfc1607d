"""The frozen teacher: conversions between the data's and the teacher's input, grid resampling, frozenness."""

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from mimkit.config import PretrainConfig
from mimkit.backends import wrap_mimkit
from mimkit.interop import save_method_checkpoint
from mimkit.methods import build_method
from mimkit.models import VisionTransformer
from mimkit.targets.teacher import FrozenTeacher, TeacherConfig


def _vit(img=16, patch=4, chans=3, seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(img, patch, chans, embed_dim=24, depth=3, num_heads=3).eval()


def _loaded(vit, mean, std):
    data = {"img_size": list(vit.grid.img_size), "channels": vit.grid.in_chans, "mean": mean, "std": std}
    return wrap_mimkit(vit, data)


def test_same_setup_gives_the_layernormed_layer_and_no_gradient_or_state():
    vit = _vit()
    t = FrozenTeacher(_loaded(vit, [0.5] * 3, [0.2] * 3), (4, 4), [0.5] * 3, [0.2] * 3, layers=[1, -1])
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    f1, f2 = t(x)
    ref = vit.forward_layers(x, [1, 2])
    assert torch.allclose(f1, F.layer_norm(ref[0], ref[0].shape[-1:]), atol=1e-5)
    assert torch.allclose(f2, F.layer_norm(ref[1], ref[1].shape[-1:]), atol=1e-5)
    assert not f1.requires_grad
    assert list(t.parameters()) == [] and list(t.state_dict()) == []
    t.train()
    assert not t.encoder.training


def test_input_is_renormalised_for_the_teacher_and_grey_repeats():
    vit = _vit()
    t = FrozenTeacher(_loaded(vit, [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]), (4, 4), [0.5] * 3, [0.1] * 3, norm="none")
    x = torch.randn(2, 3, 16, 16)
    raw = x * 0.1 + 0.5
    expect = (raw - torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    assert torch.allclose(t(x)[0], vit.forward_layers(expect, [-1])[0], atol=1e-4)
    grey = FrozenTeacher(_loaded(vit, [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]), (4, 4), [0.3], [0.2], norm="none")
    g = torch.randn(2, 1, 16, 16)
    expect = ((g * 0.2 + 0.3) - 0.5) / 0.25
    assert torch.allclose(grey(g)[0], vit.forward_layers(expect.expand(-1, 3, -1, -1), [-1])[0], atol=1e-4)
    with pytest.raises(ValueError, match="2 channels"):
        FrozenTeacher(_loaded(vit, [0.5] * 3, [0.2] * 3), (4, 4), [0.5] * 2, [0.2] * 2)


def test_other_sizes_are_resized_and_resampled_to_the_student_grid():
    vit = _vit(img=32, patch=4)                      # an 8x8 teacher grid at 32 px
    t = FrozenTeacher(_loaded(vit, [0.5] * 3, [0.2] * 3), (4, 4), [0.5] * 3, [0.2] * 3, norm="none")
    x = torch.randn(2, 3, 16, 16)                    # student: 16 px, patch 4 -> 4x4
    out = t(x)[0]
    assert out.shape == (2, 1 + 16, 24)
    big = F.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False)
    full = vit.forward_layers(big, [-1])[0]
    pooled = F.interpolate(full[:, 1:].transpose(1, 2).reshape(2, 24, 8, 8), size=(4, 4), mode="bilinear",
                           align_corners=False).flatten(2).transpose(1, 2)
    assert torch.allclose(out[:, 1:], pooled, atol=1e-4) and torch.allclose(out[:, :1], full[:, :1], atol=1e-4)


def test_config_loads_a_mimkit_checkpoint_and_names_bad_fields(tmp_path):
    torch.manual_seed(0)
    cfg = PretrainConfig(method={"name": "mae"}, model={"encoder": "vit_tiny", "patch_size": 4, "depth": 2,
                                                        "decoder": "tiny"},
                         data={"img_size": [16, 16], "channels": 1, "mean": [0.3], "std": [0.3]})
    method = build_method(cfg, (16, 16), 1)
    path = save_method_checkpoint(method, cfg, {"img_size": [16, 16], "channels": 1, "mean": [0.3], "std": [0.3]},
                                  tmp_path / "teacher.ckpt")
    t = FrozenTeacher.from_config(TeacherConfig(source=str(path), layers=[0, 1], drop_cls=True), (4, 4), [0.3], [0.3])
    x = torch.randn(2, 1, 16, 16)
    a, b = t(x)
    assert a.shape == b.shape == (2, 16, 192)
    ref = method.encoder.eval().forward_layers(x, [1])[0][:, 1:]
    assert torch.allclose(b, F.layer_norm(ref, ref.shape[-1:]), atol=1e-4)
    with pytest.raises(ValidationError, match="norm"):
        TeacherConfig(source="x", norm="l2")
    with pytest.raises(ValueError, match="out of range"):
        FrozenTeacher.from_config(TeacherConfig(source=str(path), layers=[5]), (4, 4), [0.3], [0.3])
    # as a method builds it: the run's data statistics, and one layer where the method reads one
    data = cfg.data
    one = FrozenTeacher.for_method(TeacherConfig(source=str(path), layers=[1]), (4, 4), data, "DTM", one_layer=True)
    full = method.encoder.forward_layers(x, [1])[0]
    torch.testing.assert_close(one(x)[0], F.layer_norm(full, full.shape[-1:]), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"DTM reads one teacher layer; method.teacher.layers=\[0, 1\]"):
        FrozenTeacher.for_method(TeacherConfig(source=str(path), layers=[0, 1]), (4, 4), data, "DTM", one_layer=True)
    with pytest.raises(ValueError, match=r"VQ-KD shows the images .* \(data.mean, data.std\)"):
        FrozenTeacher.for_method(TeacherConfig(source=str(path)), (4, 4), None, "VQ-KD")


def test_a_timm_teacher_with_another_patch_size():
    import timm

    from mimkit.backends import LoadedEncoder, TimmEncoder

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=0,
                              depth=2).eval()
    loaded = LoadedEncoder(TimmEncoder(model, 3, 2, 192), (32, 32), 3, [0.5] * 3, [0.25] * 3)
    t = FrozenTeacher(loaded, (8, 8), [0.5] * 3, [0.25] * 3)   # teacher grid 4x4 -> student grid 8x8
    out = t(torch.randn(2, 3, 32, 32))[0]
    assert out.shape == (2, 65, 192) and torch.isfinite(out).all()
    assert torch.allclose(out.mean(-1), torch.zeros(2, 65), atol=1e-4)  # layer-normed tokens


def test_cached_teacher_serves_the_same_features_without_running(tmp_path, monkeypatch):
    vit = _vit()
    cfg = TeacherConfig(source="unused", cache_dir=str(tmp_path))
    t = FrozenTeacher(_loaded(vit, [0.5] * 3, [0.2] * 3), (4, 4), [0.5] * 3, [0.2] * 3)
    t.use_cache(cfg)
    x, seeds = torch.randn(3, 3, 16, 16), torch.tensor([5, 6, 7])
    first = t(x, seeds)[0]
    monkeypatch.setattr(t, "_compute", lambda images: (_ for _ in ()).throw(AssertionError("teacher ran")))
    assert torch.equal(t(x, seeds)[0], first)
    assert t.cache.hits == 1 and len(list(tmp_path.iterdir())) == 1   # one folder per teacher setting
