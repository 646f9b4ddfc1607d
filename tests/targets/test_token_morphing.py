"""Token morphing (DTM): ToMe bipartite matching on the targets, group means applied alike to prediction and target."""

import pytest
import torch
import torch.nn.functional as F

from mimkit.targets.token_morphing import (
    batch_generator, bipartite_merge, draw_schedule, merges_per_iteration, morph, token_groups,
)


def _tokens(b=3, t=17, d=8, seed=0):
    return torch.randn(b, t, d, generator=torch.Generator().manual_seed(seed))


def test_zero_merges_is_the_identity():
    x = _tokens()
    for k, r in [(0, 5), (4, 0)]:
        sigma = token_groups(x, k, r)
        assert torch.equal(sigma, torch.eye(x.shape[1]).expand(x.shape[0], -1, -1))
        assert torch.equal(morph(x, sigma), x)


@pytest.mark.parametrize("t", [17, 50])
@pytest.mark.parametrize("k,r", [(1, 1), (1, 8), (3, 2), (3, 4)])
def test_token_count_after_k_iterations_of_r_merges(t, k, r):
    sigma = token_groups(_tokens(t=t), k, r)
    assert sigma.shape == (3, t - k * r, t)
    assert torch.equal(sigma.sum(1), torch.ones(3, t))   # every original token in exactly one group
    assert (sigma.sum(2) >= 1).all()                    # and no empty group


def test_one_iteration_merges_at_most_half_of_the_unprotected_tokens():
    assert token_groups(_tokens(t=17), 1, 100).shape[1] == 17 - 8   # ToMe's cap: (T - 1) // 2


def test_class_token_is_never_merged():
    x = _tokens(t=21)
    x[:, 0] = x[:, 1]                 # the class token is the most similar token there is to patch 1
    sigma = token_groups(x, 5, 2)
    assert torch.equal(sigma[:, 0], F.one_hot(torch.zeros(3, dtype=torch.long), 21).float())
    # without protection the identical pair is the first merge
    free = token_groups(x, 1, 1, class_token=False)
    assert (free[:, :, 0] * free[:, :, 1]).sum(1).eq(1).all()


def test_merged_tokens_equal_their_group_means_and_one_sigma_morphs_both():
    x, y = _tokens(seed=1), _tokens(seed=2)
    sigma = token_groups(x, 3, 2)
    assert (sigma.sum(-1) > 1).any()
    for z in (x, y):                                    # the groups of x applied to x and to another tensor
        out = morph(z, sigma)
        for b in range(z.shape[0]):
            for members in sigma[b].bool():
                mean = z[b, members].mean(0)
                assert torch.allclose(out[b, members], mean.expand(int(members.sum()), -1), atol=1e-6)
    # morph = Sigma^T (Sigma z / rowsum Sigma), and the groups depend only on x
    ref = sigma.transpose(1, 2) @ ((sigma @ y) / sigma.sum(-1, keepdim=True))
    assert torch.allclose(morph(y, sigma), ref, atol=1e-6)
    assert torch.equal(token_groups(x, 3, 2), sigma)


def test_merging_keeps_size_weighted_means_of_the_originals():
    x = _tokens(t=33)
    tokens, size = x, torch.ones(3, 33, 1)
    group = torch.arange(33).expand(3, 33)
    for _ in range(4):
        tokens, size, dest = bipartite_merge(tokens, size, 3)
        group = dest.gather(1, group)
    sigma = F.one_hot(group, tokens.shape[1]).transpose(1, 2).float()
    assert torch.equal(size.squeeze(-1), sigma.sum(-1))
    assert torch.allclose(tokens, sigma @ x / sigma.sum(-1, keepdim=True), atol=1e-5)


def test_identical_tokens_are_grouped_together():
    base = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(3))
    x = torch.cat([base[:, :1], base[:, 1:].repeat_interleave(2, dim=1)], dim=1)  # cls, then pairs of twins
    sigma = token_groups(x, 1, 8)
    # twins sit at odd/even neighbours (2i+1, 2i+2): each A-token's best partner is its twin
    for b in range(2):
        for i in range(8):
            assert torch.equal(sigma[b, :, 1 + 2 * i], sigma[b, :, 2 + 2 * i])


def test_schedule_follows_the_repo_rule_and_is_seeded():
    seeds = torch.tensor([5, 9, 11])
    a = draw_schedule(49, 14, 200, batch_generator(seeds))
    assert a == draw_schedule(49, 14, 200, batch_generator(seeds))
    assert a != draw_schedule(49, 14, 200, batch_generator(seeds + 1))
    for k, r in a:
        assert 1 <= k <= 14 and 0 <= r and k * r <= 49
    assert len({r for _, r in a}) > 5 and {k for k, _ in a} == set(range(1, 15))
    assert all(r == 0 for _, r in draw_schedule(0, 14, 20, batch_generator(seeds)))


def test_merges_per_iteration_rounds_up_unless_that_exceeds_n1():
    assert merges_per_iteration(9, 2, 10) == 5     # ceil: 2 * 5 = 10 <= n1
    assert merges_per_iteration(9, 2, 9) == 4      # 2 * 5 = 10 > n1 = 9: floor
    assert merges_per_iteration(0, 3, 49) == 0
    assert merges_per_iteration(49, 14, 49) == 3   # ceil(3.5) * 14 = 56 > 49
