import pytest
import torch

from mimkit import rng
from mimkit.masking.attention_guided import HINT_STREAM, AttentionGuidedMasking


def _scores(b=32, n=49, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, n, generator=g).softmax(1)  # attention-like rows, no ties


def _ratios(b=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    r = 0.1 + 0.4 * torch.rand(b, generator=g)
    r[::4] = 0.0  # some images unmasked, as masking_prob leaves them
    return r


def test_high_hides_exactly_the_most_attended_patches():
    scores, ratios = _scores(), _ratios()
    seeds = torch.arange(32)
    mask = AttentionGuidedMasking("high")(scores, ratios, seeds).masked
    n = scores.shape[1]
    counts = (ratios * n).floor().long()
    assert torch.equal(mask.sum(1), counts)
    for b in range(32):
        k = int(counts[b])
        top = set(scores[b].topk(k).indices.tolist()) if k else set()
        assert set(mask[b].nonzero().view(-1).tolist()) == top
        if 0 < k < n:  # every hidden patch is attended more than every visible one
            assert scores[b][mask[b]].min() > scores[b][~mask[b]].max()
    assert not mask[::4].any()  # ratio 0: nothing hidden


def test_low_hides_exactly_the_least_attended_patches():
    scores, ratios = _scores(), _ratios()
    mask = AttentionGuidedMasking("low")(scores, ratios, torch.arange(32)).masked
    n = scores.shape[1]
    counts = (ratios * n).floor().long()
    assert torch.equal(mask.sum(1), counts)
    for b in range(32):
        k = int(counts[b])
        if k:
            assert set(mask[b].nonzero().view(-1).tolist()) == set((-scores[b]).topk(k).indices.tolist())
            assert scores[b][mask[b]].max() < scores[b][~mask[b]].min()
    high = AttentionGuidedMasking("high")(scores, ratios, torch.arange(32)).masked
    assert not (high & mask).any()  # under half of N: the two never share a patch


def test_hint_reveals_the_right_number_of_patches_drawn_from_the_top_set():
    scores = _scores(b=64, n=64, seed=3)
    ratios = torch.full((64,), 0.45)
    seeds = torch.arange(64) + 100
    gen = AttentionGuidedMasking("hint", show_max=0.1)
    mask = gen(scores, ratios, seeds).masked
    high = AttentionGuidedMasking("high")(scores, ratios, seeds).masked
    n = 64
    top_k = int(0.1 * n)  # 6 most attended patches
    reveal = int(0.1 * 0.45 * n)  # 2 hints per image
    assert (top_k, reveal) == (6, 2)
    revealed = high & ~mask
    assert not (mask & ~high).any()  # hint only un-hides: a subset of High's mask
    assert (revealed.sum(1) == reveal).all()
    top = torch.zeros_like(high).scatter(1, scores.topk(top_k, dim=1).indices, True)
    assert not (revealed & ~top).any()  # every hint comes from the top set
    # the hints are the image's seeded draw: the highest-noise patches of its top set
    noise = rng.uniform(seeds, n, stream=HINT_STREAM).masked_fill(~top, -1.0)
    expected = torch.zeros_like(top).scatter(1, noise.topk(reveal, dim=1).indices, True)
    assert torch.equal(revealed, expected)
    # and they vary across images: not always the same ranks of the top set
    ranks = torch.argsort(torch.argsort(scores, 1, descending=True), 1)
    assert len({tuple(sorted(ranks[b][revealed[b]].tolist())) for b in range(64)}) > 5


def test_hint_draws_are_uniform_over_the_top_set():
    n, b = 50, 4000
    scores = torch.arange(n, dtype=torch.float32).flip(0).expand(b, n)  # patch i has rank i
    mask = AttentionGuidedMasking("hint", show_max=0.1)(scores, torch.full((b,), 0.4), torch.arange(b)).masked
    revealed = ~mask[:, :5]  # top set = patches 0..4, hidden 0..19, 2 hints each
    assert (revealed.sum(1) == 2).all() and mask[:, 5:20].all() and not mask[:, 20:].any()
    share = revealed.float().mean(0)
    assert torch.allclose(share, torch.full((5,), 0.4), atol=0.03), share


def test_masks_depend_only_on_scores_and_seeds():
    scores, ratios = _scores(), _ratios()
    seeds = torch.arange(32) * 13 + 5
    for variant in ("high", "hint", "low"):
        gen = AttentionGuidedMasking(variant)
        full = gen(scores, ratios, seeds).masked
        assert torch.equal(full, gen(scores.clone(), ratios.clone(), seeds.clone()).masked)
        # an image's mask is its own: the same inside any batch, in any order
        perm = torch.randperm(32, generator=torch.Generator().manual_seed(0))
        assert torch.equal(gen(scores[perm], ratios[perm], seeds[perm]).masked, full[perm])
        assert torch.equal(gen(scores[5:9], ratios[5:9], seeds[5:9]).masked, full[5:9])
        # the global RNG plays no part
        torch.manual_seed(123)
        again = gen(scores, ratios, seeds).masked
        torch.manual_seed(321)
        assert torch.equal(again, gen(scores, ratios, seeds).masked)
    # ties go to the lower index: a constant score hides the first patches in raster order
    flat = AttentionGuidedMasking("high")(torch.ones(2, 10), 0.3, torch.arange(2)).masked
    assert flat[:, :3].all() and not flat[:, 3:].any()


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="variant"):
        AttentionGuidedMasking("middle")
    with pytest.raises(ValueError, match="show_max"):
        AttentionGuidedMasking("hint", show_max=1.5)
    with pytest.raises(ValueError, match="ratio"):
        AttentionGuidedMasking("high")(torch.rand(2, 9), torch.tensor([0.2, 1.0]), torch.arange(2))
