import pytest
import torch
from pydantic import ValidationError

from mimkit.data.transforms import TrainTransform
from mimkit.data.views import MultiViewTransform, ViewSpec, adjust, byol_views, views_of
from mimkit import rng


def _img(c=3, h=40, w=36):
    g = torch.Generator().manual_seed(0)
    return (torch.rand(c, h, w, generator=g) * 255).to(torch.uint8)


def test_view_zero_is_the_plain_crop_and_views_are_seeded():
    img = _img()
    plain = TrainTransform((16, 16))(img, 7)
    mv = MultiViewTransform((16, 16), [ViewSpec(), ViewSpec(jitter_p=1.0, solarize_p=1.0)])
    out = mv(img, 7)
    assert torch.equal(out["image"], plain) and torch.equal(out["views"][0], plain)
    assert not torch.equal(out["views"][1], plain)
    again = mv(img, 7)
    assert all(torch.equal(a, b) for a, b in zip(out["views"], again["views"]))
    assert not torch.equal(mv(img, 8)["views"][1], out["views"][1])


def test_photometric_steps_any_channel_count():
    for c in (1, 3, 5):
        x = torch.rand(c, 20, 20)
        spec = ViewSpec(jitter_p=1.0, grayscale_p=1.0, blur_p=1.0, solarize_p=1.0)
        y = adjust(x, spec, rng.generator(3, 1))
        assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1 and not torch.equal(x, y)
    rgb = torch.rand(3, 8, 8)
    gray = adjust(rgb, ViewSpec(grayscale_p=1.0), rng.generator(0))
    assert torch.allclose(gray[0], gray[1]) and torch.allclose(gray[1], gray[2])
    sol = adjust(rgb, ViewSpec(solarize_p=1.0), rng.generator(0))
    assert torch.equal(sol, torch.where(rgb >= 0.5, 1 - rgb, rgb))
    same = adjust(rgb, ViewSpec(), rng.generator(0))  # every probability 0: untouched
    assert torch.equal(same, rgb)


def test_batches_carry_views_through_the_loader_and_fallback():
    from torch.utils.data import default_collate

    mv = MultiViewTransform((16, 16), byol_views(), mean=[0.5] * 3, std=[0.25] * 3)
    batch = default_collate([{**mv(_img(), s), "seed": s} for s in range(4)])
    assert len(batch["views"]) == 2 and batch["views"][1].shape == (4, 3, 16, 16)
    assert torch.equal(batch["image"], batch["views"][0])
    plain = {"image": torch.zeros(2, 3, 4, 4)}
    assert all(v is plain["image"] for v in views_of(plain, 2))


def test_a_view_can_have_its_own_size_and_is_blurred_at_the_training_scale():
    # DINO/iBOT local crops: smaller than the globals; batches stack each view at its own size
    from torch.utils.data import default_collate

    img = _img()
    local = ViewSpec(crop_scale=(0.05, 0.25), size=(48, 48), blur_p=1.0, blur_sigma=(1.0, 2.0))
    mv = MultiViewTransform((112, 112), [ViewSpec(), local])
    out = mv(img, 3)
    assert out["views"][0].shape == (3, 112, 112) and out["views"][1].shape == (3, 48, 48)
    # the crop is the plain RandomResizedCrop at 48 x 48 with the view's seed; its blur sigma is scaled by the
    # training side (112 / 224), not by the view's own (48 / 224)
    s = MultiViewTransform.view_seed(3, 1)
    crop = TrainTransform((48, 48), (0.05, 0.25))(img, s)
    assert torch.equal(out["views"][1], adjust(crop, local, rng.generator(s, 0x56494557), blur_side=112))
    assert not torch.equal(out["views"][1], adjust(crop, local, rng.generator(s, 0x56494557)))
    batch = default_collate([{**mv(img, k), "seed": k} for k in range(3)])
    assert [tuple(v.shape) for v in batch["views"]] == [(3, 3, 112, 112), (3, 3, 48, 48)]
    with pytest.raises(ValidationError, match="size"):
        ViewSpec(size=(0, 8))
