import math

import pytest
import torch
from method_helpers import falls, fashion_mnist, small_method, train_losses

from mimkit import rng
from mimkit.methods.ijepa import IJEPA
from mimkit.models.predictor import DIFFUSION_STREAM, LEVEL_STREAM, DiffusionQueries, seeded_normal


def _batch(b=8, seed0=0):
    g = torch.Generator().manual_seed(seed0)
    return {"image": torch.randn(b, 1, 28, 28, generator=g), "seed": torch.arange(b) + seed0}


def test_njepa_is_ijepa_with_a_multi_level_schedule():
    m = small_method("njepa", 28, 1, depth=2)
    assert isinstance(m, IJEPA) and isinstance(m.predictor.queries, DiffusionQueries)
    q = m.predictor.queries
    torch.testing.assert_close(q.schedule(), torch.tensor([0.0, 0.125, 0.25, 0.375, 0.5], dtype=torch.float64))
    other = small_method("njepa", 28, 1, "method.noise_levels=2", "method.sigma_max=0.8", depth=2).predictor.queries
    torch.testing.assert_close(other.schedule(), torch.tensor([0.0, 0.4, 0.8], dtype=torch.float64))
    # pos_scale: the RMS of the sin-cos entries (half sines, half cosines: 1 / sqrt(2))
    assert q.pos_scale == pytest.approx(1 / math.sqrt(2), rel=1e-3)


def test_levels_are_uniform_over_1_to_L_per_image_and_block():
    q = DiffusionQueries(16, levels=4)
    seeds = torch.arange(2000)
    levels = q.draw_levels(seeds, 4)
    assert levels.shape == (2000, 4) and levels.min() == 1 and levels.max() == 4
    counts = torch.bincount(levels.view(-1), minlength=5)[1:].float() / levels.numel()
    assert (counts - 0.25).abs().max() < 0.02, counts
    assert torch.equal(q.draw_levels(seeds[7:9], 4), levels[7:9])  # per image, whatever the batch
    expected = (rng.uniform(seeds[:5], 4, stream=LEVEL_STREAM) * 4).long() + 1
    assert torch.equal(levels[:5], expected)


def test_queries_are_a_variance_preserving_diffusion_step_on_the_positions():
    m = small_method("njepa", 28, 1, depth=2)
    m.train()
    pred = m.predictor
    q = pred.queries
    seeds = torch.tensor([3, 4, 5])
    ids = torch.randint(0, 49, (3, 4, 6), generator=torch.Generator().manual_seed(1))
    pos = pred.pos_embed[ids]
    out = q(pos, pred.predictor_embed, seeds)
    sigma = q.schedule()[q.draw_levels(seeds, 4)].float().view(3, 4, 1, 1)
    eps = seeded_normal(seeds, 4 * 6 * pred.dim, DIFFUSION_STREAM).view(3, 4, 6, pred.dim)
    expected = q.mask_token + (1 - sigma**2).sqrt() * pos + sigma * q.pos_scale * eps
    torch.testing.assert_close(out, expected)
    # every block's own level: blocks of one image may be noised differently
    resid = (out - q.mask_token - (1 - sigma**2).sqrt() * pos) / q.pos_scale
    assert torch.allclose(resid.std(dim=(2, 3)), sigma.view(3, 4), atol=0.05)


def test_no_noise_in_eval_mode():
    m = small_method("njepa", 28, 1, depth=2)
    batch = _batch()
    blocks = m.blocks(batch)
    m.train()
    a = m.predict(batch["image"], blocks, batch["seed"])
    b = m.predict(batch["image"], blocks, batch["seed"] + 1000)
    assert not torch.allclose(a, b)
    m.eval()
    c = m.predict(batch["image"], blocks, batch["seed"])
    torch.testing.assert_close(c, m.predict(batch["image"], blocks, None))
    pos = m.predictor.pos_embed[blocks.targets]
    q = m.predictor.queries(pos, m.predictor.predictor_embed, batch["seed"])
    torch.testing.assert_close(q, pos + m.predictor.queries.mask_token)  # level 0: the I-JEPA query
    # sigma_max 0 is I-JEPA in training too
    zero = small_method("njepa", 28, 1, "method.sigma_max=0", depth=2)
    ijepa = small_method("ijepa", 28, 1, depth=2)
    ijepa.load_state_dict(zero.state_dict())
    zero.train()
    ijepa.train()
    assert torch.equal(zero(batch)["loss"], ijepa(batch)["loss"])


def test_loss_falls_on_fashion_mnist_without_collapse():
    images = fashion_mnist(256)
    m = small_method("njepa", 28, 1, depth=2)
    losses = train_losses(m, images, steps=25)
    assert falls(losses, factor=0.6), losses
    m.eval()
    out = m({"image": images[:32], "seed": torch.arange(32)})
    assert out["target_sim"].item() < 0.9 and out["image_sim"].item() < 0.99, out
