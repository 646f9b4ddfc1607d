import pytest
import torch
from method_helpers import falls, fashion_mnist, small_method, train_losses

from mimkit.methods.ijepa import IJEPA
from mimkit.models.predictor import STOP_STREAM, StoPQueries, seeded_normal


def _batch(b=8, seed0=0):
    g = torch.Generator().manual_seed(seed0)
    return {"image": torch.randn(b, 1, 28, 28, generator=g), "seed": torch.arange(b) + seed0}


def _queries(m, seeds, ids):
    pos = m.predictor.pos_embed[ids]
    return pos, m.predictor.queries(pos, m.predictor.predictor_embed, seeds)


def test_stop_is_ijepa_with_its_own_name_and_sigma():
    m = small_method("stop", 28, 1, depth=2)
    assert isinstance(m, IJEPA) and isinstance(m.predictor.queries, StoPQueries)
    assert m.predictor.queries.sigma == 0.25 and m.momentum(0.0) == pytest.approx(0.996)
    # no mask token in the StoP path
    assert not any("mask_token" in n for n, _ in m.named_parameters())
    assert small_method("stop", 28, 1, "method.sigma=0.5", depth=2).predictor.queries.sigma == 0.5


def test_sigma_zero_is_ijepa_exactly():
    torch.manual_seed(0)
    ijepa = small_method("ijepa", 28, 1, depth=2)
    stop = small_method("stop", 28, 1, "method.sigma=0", depth=2)
    state = ijepa.state_dict()
    token = state.pop("predictor.queries.mask_token")
    stop.load_state_dict(state)  # every other weight the same
    # StoP's queries carry predictor_embed's bias where I-JEPA's carry the mask token: tie them
    with torch.no_grad():
        ijepa.predictor.queries.mask_token.copy_(ijepa.predictor.predictor_embed.bias.view_as(token))
    ijepa.train()
    stop.train()
    batch = _batch()
    assert torch.equal(ijepa(batch)["loss"], stop(batch)["loss"])
    # and the noise is what changes it
    noisy = small_method("stop", 28, 1, depth=2)
    noisy.load_state_dict(state)
    noisy.train()
    assert not torch.equal(noisy(batch)["loss"], stop(batch)["loss"])


def test_noise_is_A_times_gaussian_in_the_encoder_width_through_predictor_embed():
    m = small_method("stop", 28, 1, "method.sigma=0.3", depth=2)
    m.train()
    seeds = torch.tensor([11, 12])
    ids = torch.randint(0, 49, (2, 4, 6), generator=torch.Generator().manual_seed(0))
    pos, q = _queries(m, seeds, ids)
    embed = m.predictor.predictor_embed
    d = m.encoder.embed_dim
    n = 0.3 * seeded_normal(seeds, 4 * 6 * d, STOP_STREAM).view(2, 4, 6, d)  # encoder width, from the seeds
    torch.testing.assert_close(q, pos + n @ embed.weight.T + embed.bias)
    # the same image gets the same noise in any batch; another image other noise
    _, q1 = _queries(m, seeds[1:], ids[1:])
    torch.testing.assert_close(q1, q[1:])
    assert not torch.allclose(q[0], q[1] - pos[1] + pos[0])
    # the shared A: with predictor_embed's weight zeroed the noise is gone (only the bias remains)
    with torch.no_grad():
        embed.weight.zero_()
    _, q0 = _queries(m, seeds, ids)
    torch.testing.assert_close(q0, pos + embed.bias)


def test_no_noise_in_eval_mode():
    m = small_method("stop", 28, 1, depth=2)
    batch = _batch()
    blocks = m.blocks(batch)
    m.train()
    a = m.predict(batch["image"], blocks, batch["seed"])
    b = m.predict(batch["image"], blocks, batch["seed"] + 1000)
    assert not torch.allclose(a, b)  # training: the noise depends on the seeds
    m.eval()
    c = m.predict(batch["image"], blocks, batch["seed"])
    d = m.predict(batch["image"], blocks, None)  # no seeds needed: nothing is drawn
    torch.testing.assert_close(c, d)
    ids = blocks.targets
    pos, q = _queries(m, batch["seed"], ids)
    torch.testing.assert_close(q, pos + m.predictor.predictor_embed.bias)
    m.train()
    with pytest.raises(ValueError, match="seeds"):
        m.predict(batch["image"], blocks, None)


def test_loss_falls_on_fashion_mnist_without_collapse():
    images = fashion_mnist(256)
    m = small_method("stop", 28, 1, depth=2)
    losses = train_losses(m, images, steps=25)
    assert falls(losses, factor=0.6), losses
    m.eval()
    out = m({"image": images[:32], "seed": torch.arange(32)})
    assert out["target_sim"].item() < 0.9 and out["image_sim"].item() < 0.99, out
