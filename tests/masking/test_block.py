import math

import pytest
import torch

from mimkit import rng
from mimkit.masking import RandomMasking
from mimkit.masking.block import BlockMasking

GRIDS = [(7, 7), (8, 8), (7, 9), (14, 14), (4, 6), (9, 5)]


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("ratio", [0.4, 75 / 196, 0.5, 0.75])
def test_exact_count_per_image_with_consistent_ids(grid, ratio):
    n = grid[0] * grid[1]
    seeds = torch.arange(60) * 7919 + 3
    m = BlockMasking(ratio)(seeds, grid)
    expected = math.floor(ratio * n + 0.5)
    assert m.masked.shape == (60, n)
    assert (m.masked.sum(1) == expected).all(), m.masked.sum(1)
    assert m.ids_keep.shape == (60, n - expected) and m.num_visible == n - expected
    assert not m.masked.gather(1, m.ids_keep).any()
    # ids_restore un-shuffles [visible; hidden] back to raster order
    order = torch.cat([m.ids_keep, torch.stack([row.nonzero().view(-1) for row in m.masked])], 1)
    assert torch.equal(order.gather(1, m.ids_restore), torch.arange(n).expand(60, n))


@pytest.mark.parametrize("grid", [(7, 9), (14, 14), (8, 8)])
def test_blocks_are_filled_rectangles_inside_the_grid_and_survive_the_fixup(grid):
    gen = BlockMasking(0.4)
    gh, gw = grid
    for seed in range(40):
        union, blocks = gen.blocks(rng.generator(seed, BlockMasking.stream), grid)
        assert blocks, "at least one block fits a grid of this size"
        rebuilt = torch.zeros(gh, gw, dtype=torch.bool)
        for top, left, h, w in blocks:
            assert 0 <= top and 0 <= left and 0 < h < gh and 0 < w < gw and top + h <= gh and left + w <= gw
            assert union[top: top + h, left: left + w].all()  # a whole rectangle is hidden
            rebuilt[top: top + h, left: left + w] = True
        assert torch.equal(rebuilt, union)  # nothing outside the blocks
        assert union.sum() <= gen.num_masked(gh * gw)
        # the generator for one seed replays the blocks, then the exact fix-up only adds patches
        final = gen(torch.tensor([seed]), grid).masked.view(gh, gw)
        assert (final | ~union).all()


def _hidden_neighbours(masked: torch.Tensor) -> float:
    """Mean number of hidden 4-neighbours of a hidden patch, over masks [B, gh, gw]."""
    m = masked.float()
    nb = torch.zeros_like(m)
    nb[:, 1:] += m[:, :-1]
    nb[:, :-1] += m[:, 1:]
    nb[:, :, 1:] += m[:, :, :-1]
    nb[:, :, :-1] += m[:, :, 1:]
    return float((nb * m).sum() / m.sum())


def test_block_masks_are_clumped_compared_with_random_masks():
    seeds = torch.arange(200)
    block = BlockMasking(0.4)(seeds, (14, 14)).masked.view(-1, 14, 14)
    random = RandomMasking(0.4)(seeds, 196).masked.view(-1, 14, 14)
    # random: ~0.4 * 4 * (edge-corrected) ~ 1.5; BEiT blocks: most neighbours of a hidden patch are hidden
    assert _hidden_neighbours(block) > 2.8 > 1.8 > _hidden_neighbours(random)


def test_same_seed_same_mask_other_seed_other_mask_whatever_the_batch():
    gen = BlockMasking(0.4)
    a = gen(torch.tensor([3, 4, 5]), (7, 9)).masked
    b = gen(torch.tensor([11, 3]), (7, 9)).masked
    assert torch.equal(a[0], b[1])
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[1], a[2])
    assert len({tuple(r.tolist()) for r in gen(torch.arange(50), (7, 9)).masked}) > 45


def test_inexact_variant_keeps_the_blocks_count():
    gen = BlockMasking(0.4, exact=False)
    m = gen(torch.arange(100), (14, 14))
    counts = m.masked.sum(1)
    assert m.ids_keep is None and m.ids_restore is None
    assert (counts <= 78).all() and counts.float().mean() > 70
    for seed in range(10):
        union, _ = gen.blocks(rng.generator(seed, BlockMasking.stream), (14, 14))
        assert torch.equal(m.masked[seed], union.view(-1))


def test_min_area_is_a_fraction_of_n_or_a_count():
    assert BlockMasking(75 / 196).area_bounds(196) == (16, 75)  # BEiT v2: min 16, max = M
    assert BlockMasking(0.4).area_bounds(16)[0] == 2  # at least 2 on tiny grids
    assert BlockMasking(0.4, min_area=4).area_bounds(64)[0] == 4  # BEiT v1's absolute 4
    assert BlockMasking(0.4, max_area=0.1).area_bounds(100) == (8, 10)


def test_bad_settings_are_refused():
    for kwargs in [dict(ratio=0.0), dict(ratio=1.0), dict(min_area=0), dict(aspect=(2.0, 1.0))]:
        with pytest.raises(ValueError):
            BlockMasking(**kwargs)
