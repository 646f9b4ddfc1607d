"""MaskAlign's visible set: multinomial draws without replacement from the teacher's attention, per-image seeded."""

import pytest
import torch

from mimkit.masking.attention_sampled import AttentionSampledMasking, gumbel_order


def test_the_visible_set_has_int_n_times_one_minus_ratio_patches_and_a_consistent_mask():
    m = AttentionSampledMasking(0.7)
    scores = torch.rand(5, 49)
    mask = m(torch.arange(5), (7, 7), scores)
    assert mask.ids_keep.shape == (5, 14) and mask.num_visible == 14
    assert (~mask.masked).sum(1).tolist() == [14] * 5
    assert torch.equal(torch.gather(mask.masked, 1, mask.ids_keep), torch.zeros(5, 14, dtype=torch.bool))
    assert torch.equal(mask.ids_keep, mask.ids_keep.sort(1).values)          # raster order
    shuffled = torch.gather(mask.masked, 1, torch.argsort(mask.ids_restore, 1))
    assert not shuffled[:, :14].any() and shuffled[:, 14:].all()             # ids_restore un-shuffles [visible; hidden]
    with pytest.raises(ValueError, match="no visible patch"):
        AttentionSampledMasking(0.99)(torch.arange(2), 16, torch.rand(2, 16))
    with pytest.raises(ValueError, match="non-negative"):
        m(torch.arange(2), 16, -torch.rand(2, 16))


def test_a_row_depends_only_on_its_scores_and_seed():
    m = AttentionSampledMasking(0.5)
    scores, seeds = torch.rand(6, 16), torch.tensor([3, 1, 4, 1, 5, 9])
    scores[3] = scores[1]                                  # images 1 and 3: same seed, same scores
    a = m(seeds, 16, scores)
    assert torch.equal(a.masked[1], a.masked[3])
    assert torch.equal(a.masked, m(seeds, 16, scores).masked)
    perm = torch.tensor([5, 2, 0, 4, 1, 3])
    assert torch.equal(m(seeds[perm], 16, scores[perm]).masked, a.masked[perm])
    assert not torch.equal(m(seeds + 1, 16, scores).masked, a.masked)


def test_draws_follow_sequential_multinomial_without_replacement():
    # 3 patches with attention (0.6, 0.3, 0.1), 2 visible: P({0,1}) = .6*.3/.4 + .3*.6/.7 = 0.7071,
    # P({0,2}) = .6*.1/.4 + .1*.6/.9 = 0.2167, P({1,2}) = .3*.1/.7 + .1*.3/.9 = 0.0762
    trials = 6000
    scores = torch.tensor([[0.6, 0.3, 0.1]]).expand(trials, -1)
    order = gumbel_order(scores, torch.arange(trials))
    first = torch.bincount(order[:, 0], minlength=3).double() / trials
    assert torch.allclose(first, torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64), atol=0.025)
    hidden = order[:, 2]   # the one left out names the visible pair
    pairs = torch.bincount(hidden, minlength=3).double() / trials      # hidden 2 -> {0,1}, 1 -> {0,2}, 0 -> {1,2}
    assert torch.allclose(pairs, torch.tensor([0.0762, 0.2167, 0.7071], dtype=torch.float64), atol=0.025)


def test_high_attention_patches_are_seen_more_often_and_zero_attention_ones_last():
    m = AttentionSampledMasking(0.75)
    scores = torch.full((2000, 16), 0.01)
    scores[:, :4] = 1.0                                   # four salient patches
    seen = (~m(torch.arange(2000), (4, 4), scores).masked).double().mean(0)
    assert seen[:4].min() > 0.8 and seen[4:].max() < 0.1
    zero = torch.zeros(200, 16)
    zero[:, 5] = 1.0
    mask = m(torch.arange(200), 16, zero)                 # 4 visible, one patch has all the attention
    assert not mask.masked[:, 5].any()
    assert (mask.masked.sum(1) == 12).all()               # the other 3 still drawn, among zero-score patches


def test_no_scores_is_a_uniform_random_visible_set():
    m = AttentionSampledMasking(0.75)
    seeds = torch.arange(3000)
    a = m(seeds, 16)
    assert torch.equal(a.masked, m(seeds, 16, torch.full((3000, 16), 0.3)).masked)   # any constant score
    seen = (~a.masked).double().mean(0)
    assert torch.allclose(seen, torch.full((16,), 0.25, dtype=torch.float64), atol=0.04)
