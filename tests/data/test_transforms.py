import math

import pytest
import torch

from mimkit.data.transforms import EvalTransform, TrainTransform, crop_params


def _img(c=3, h=40, w=60):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (c, h, w), dtype=torch.uint8, generator=g)


def test_same_seed_same_crop_and_no_global_rng():
    tf = TrainTransform((32, 32))
    img = _img()
    torch.manual_seed(1)
    a = tf(img, 42)
    torch.manual_seed(2)
    torch.rand(100)
    b = tf(img, 42)
    assert torch.equal(a, b)
    state = torch.get_rng_state()
    tf(img, 43)
    assert torch.equal(state, torch.get_rng_state())  # global RNG untouched


def test_different_seeds_differ():
    tf = TrainTransform((32, 32))
    img = _img()
    params = {tf.params(40, 60, s) for s in range(50)}
    assert len(params) > 40
    flips = [tf.params(40, 60, s)[4] for s in range(200)]
    assert 60 < sum(flips) < 140
    assert not torch.equal(tf(img, 1), tf(img, 2))


def test_crop_within_bounds_scale_and_ratio():
    tf = TrainTransform((24, 24), scale=(0.3, 0.6), ratio=(0.8, 1.25))
    for s in range(300):
        top, left, h, w, _ = tf.params(50, 70, s)
        assert 0 <= top and top + h <= 50 and 0 <= left and left + w <= 70
        area = h * w / (50 * 70)
        assert 0.25 < area < 0.66  # rounding of h, w
        assert 0.7 < w / h < 1.4


def test_crop_fallback_is_centred():
    u = torch.full((40,), 0.999, dtype=torch.float64)  # every try asks for too large a crop
    top, left, h, w = crop_params(10, 100, (0.99, 1.0), (0.99, 1.0), u)
    assert (h, w) == (10, 10) and left == 45 and top == 0


def test_non_square_output_and_any_channel_count():
    img = torch.rand(7, 30, 50)
    out = TrainTransform((16, 40), hflip=False)(img, 5)
    assert out.shape == (7, 16, 40) and out.dtype == torch.float32
    assert float(out.min()) >= 0 and float(out.max()) <= 1  # bicubic overshoot clamped
    ev = EvalTransform((16, 40))(img)
    assert ev.shape == (7, 16, 40)
    assert torch.equal(img, img.clone())  # input untouched


def test_flip_and_full_crop_is_identity_or_mirror():
    img = _img(2, 16, 16)
    tf = TrainTransform((16, 16), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    for s in range(10):
        out = tf(img, s)
        flip = tf.params(16, 16, s)[4]
        ref = img.float() / 255
        assert torch.allclose(out, ref.flip(-1) if flip else ref)


def test_eval_transform_is_shorter_side_resize_and_centre_crop():
    img = torch.zeros(1, 20, 40)
    img[:, :, 10:30] = 1.0  # centre half is bright
    out = EvalTransform((10, 10))(img)
    # shorter side 20 -> 10 (width 40 -> 20), centre crop of 10 keeps only the bright centre
    assert out.shape == (1, 10, 10) and float(out.min()) > 0.9
    same = torch.rand(3, 10, 10)
    assert torch.equal(EvalTransform((10, 10))(same), same)


def test_normalization_applied():
    img = torch.full((2, 8, 8), 0.5)
    out = EvalTransform((8, 8), mean=[0.5, 0.25], std=[0.5, 0.25])(img)
    assert torch.allclose(out[0], torch.zeros(8, 8)) and torch.allclose(out[1], torch.ones(8, 8))


@pytest.mark.parametrize("size", [(28, 28), (32, 48)])
def test_uint8_and_float_inputs_agree(size):
    img = _img(3, 37, 41)
    tf = TrainTransform(size)
    assert torch.allclose(tf(img, 11), tf(img.float() / 255, 11), atol=1e-5)
    assert math.isclose(float(EvalTransform(size)(img).mean()), float(EvalTransform(size)(img.float() / 255).mean()),
                        abs_tol=1e-5)
