import math

import torch

from mimkit.masking import CoarseMasking


def test_groups_are_hidden_whole_with_the_ceil_count():
    m = CoarseMasking(ratio=0.6, unit=2)(torch.arange(50), (8, 8)).masked.view(50, 8, 8)
    groups = m.view(50, 4, 2, 4, 2)
    # every 2x2 group is all hidden or all visible
    per_group = groups.sum(dim=(2, 4))
    assert ((per_group == 0) | (per_group == 4)).all()
    assert ((per_group == 4).sum(dim=(1, 2)) == math.ceil(16 * 0.6)).all()


def test_grids_not_divisible_by_the_unit_are_cropped():
    m = CoarseMasking(ratio=0.5, unit=2)(torch.arange(20), (7, 9)).masked
    assert m.shape == (20, 63)
    frac = m.float().mean(1)
    assert (frac > 0.3).all() and (frac < 0.75).all()


def test_same_seed_same_mask_other_seed_other_mask():
    gen = CoarseMasking(ratio=0.6, unit=2)
    a, b = gen(torch.tensor([3, 4]), (8, 8)).masked, gen(torch.tensor([3, 5]), (8, 8)).masked
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])
