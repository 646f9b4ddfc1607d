import math

import pytest
import torch
from method_helpers import falls, fashion_mnist, small_method, train_losses

from mimkit.masking.attention_guided import HINT_STREAM, AttentionGuidedMasking
from mimkit.methods.attmask import AttMask


def _attmask(*overrides, depth=2):
    return small_method("attmask", 28, 1, *overrides, depth=depth)


def _batch(b=16, seed0=0):
    g = torch.Generator().manual_seed(seed0)
    return {"image": torch.randn(b, 1, 28, 28, generator=g), "seed": torch.arange(b) + seed0}


def test_teacher_gives_logits_and_attention_in_one_pass():
    m = _attmask()
    x = _batch()["image"]
    logits, scores = m.teacher_forward(x)
    t = m.teacher.module
    torch.testing.assert_close(logits, t["head"](t["encoder"](x)).float())
    assert scores.shape == (16, m.grid.num_patches) and (scores > 0).all() and (scores.sum(1) < 1).all()
    assert not scores.requires_grad


@pytest.mark.parametrize("variant", ["high", "low", "hint"])
def test_mask_follows_the_teachers_class_token_attention(variant):
    m = _attmask(f"method.variant={variant}")
    batch = _batch(b=64)
    seeds = batch["seed"]
    _, scores = m.teacher_forward(batch["image"])
    mask = m.make_mask(batch).masked
    ratios = m.mask_ratios(seeds, 0)
    n = m.grid.num_patches
    counts = (ratios.double() * n).floor().long()
    assert torch.equal(mask, AttentionGuidedMasking(variant)(scores, ratios, seeds, stream=HINT_STREAM).masked)
    assert not mask[counts == 0].any()  # masking_prob: about half the images are left whole
    assert 16 < int((counts > 0).sum()) < 48
    for i in torch.nonzero(counts > 0).view(-1).tolist():
        k = int(counts[i])
        most = set(scores[i].topk(k).indices.tolist())
        least = set((-scores[i]).topk(k).indices.tolist())
        hidden = set(mask[i].nonzero().view(-1).tolist())
        if variant == "high":
            assert hidden == most
        elif variant == "low":
            assert hidden == least
        else:
            top = set(scores[i].topk(int(0.1 * n)).indices.tolist())
            revealed = most - hidden
            assert hidden <= most and revealed <= top
            assert len(revealed) == int(0.1 * float(ratios[i]) * n)
    # the picture's mask is view 0 of training's; view 1 uses the second view's own scores and draws
    both = m.masks(seeds, torch.cat([scores, scores.flip(1)]))
    assert torch.equal(both[:64], mask)


def test_masks_depend_only_on_scores_and_seeds():
    m = _attmask("method.variant=hint")
    seeds = torch.arange(40) + 7
    scores = torch.rand(40, m.grid.num_patches, generator=torch.Generator().manual_seed(2))
    a = m.view_mask(seeds, 0, scores)
    torch.manual_seed(99)
    assert torch.equal(a, m.view_mask(seeds, 0, scores))
    assert torch.equal(a[10:20], m.view_mask(seeds[10:20], 0, scores[10:20]))
    assert not torch.equal(a, m.view_mask(seeds, 1, scores))  # the second view has its own ratios and hints


def test_training_on_fashion_mnist_lowers_the_loss_without_collapse():
    m = _attmask("method.variant=hint", "method.teacher.start=0.99", "method.teacher_temp=0.04",
                 "method.center_momentum=0.99")
    images = fashion_mnist(256)
    losses = train_losses(m, images, steps=25, lr=5e-4, batch_size=24, view_specs=AttMask.view_specs(m.cfg))
    assert falls(losses), losses
    m.eval()
    out = m({"image": images[:64], "seed": torch.arange(64)})
    log_k = math.log(m.cfg.out_dim)
    assert out["teacher_entropy"] < log_k - 1.0, out
    assert out["teacher_batch_entropy"] > 0.4 * log_k, out
    assert out["mask_share"] > 0
