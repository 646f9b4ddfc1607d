import math

import pytest
import torch

from mimkit.masking.disjoint import DisjointMasking, stack_views


def _counts(n, ratio, pred_ratio):
    kept = int(n * (1 - ratio))
    hidden = n - kept
    union = min(n, math.floor(pred_ratio * n + 0.5))  # round half up
    return kept, hidden, union


@pytest.mark.parametrize("grid", [(5, 7), (6, 10), (7, 7)])
@pytest.mark.parametrize("ratio,pred_ratio", [(0.6, 1.0), (0.5, 1.0), (0.3, 0.6), (0.4, 0.7), (0.75, 1.0)])
def test_views_hide_the_ratio_and_their_union_covers_the_prediction_ratio(grid, ratio, pred_ratio):
    n = grid[0] * grid[1]
    seeds = torch.arange(200) * 7919 + 3
    v1, v2 = DisjointMasking(ratio, pred_ratio)(seeds, grid)
    kept, hidden, union = _counts(n, ratio, pred_ratio)
    # each view hides the mask ratio's share
    assert (v1.masked.sum(1) == hidden).all() and (v2.masked.sum(1) == hidden).all()
    # the union covers exactly the prediction share (when two views of this size can reach it)
    reach = min(union, hidden + min(hidden, kept))
    assert ((v1.masked | v2.masked).sum(1) == reach).all()
    # and the overlap is the least those counts allow: the views are disjoint whenever they can be
    overlap = (v1.masked & v2.masked).sum(1)
    assert (overlap == 2 * hidden - reach).all()
    if pred_ratio >= 2 * ratio and 2 * hidden <= n and union >= 2 * hidden:
        assert (overlap == 0).all()


def test_half_masks_with_full_prediction_are_complementary():
    v1, v2 = DisjointMasking(0.5, 1.0)(torch.arange(100), (6, 8))
    assert not (v1.masked & v2.masked).any()
    assert (v1.masked | v2.masked).all()


def test_view_two_choices_are_random_not_a_fixed_subset():
    # DMJD's default 0.6 / 1.0 on 49 patches: view 2 hides all 19 visible of view 1 plus 11 of its 30 hidden
    v1, v2 = DisjointMasking(0.6, 1.0)(torch.arange(400), (7, 7))
    again = v2.masked & v1.masked
    assert (again.sum(1) == 11).all()
    # which of view 1's hidden patches are hidden again differs between images and covers every position
    assert len({tuple(r.tolist()) for r in again}) > 390
    assert again.any(0).all() and (~v1.masked).any(0).all()
    # the frequency of "hidden again" is about 11/30 at each position (uniform, no positional bias)
    freq = again.sum(0).float() / v1.masked.sum(0).float()
    assert (freq - 11 / 30).abs().max() < 0.15


def test_ids_match_the_masks():
    seeds = torch.arange(16)
    for m in DisjointMasking(0.6, 1.0)(seeds, (4, 6)):
        kept = torch.zeros_like(m.masked)
        kept.scatter_(1, m.ids_keep, True)
        assert torch.equal(kept, ~m.masked)
        shuffle = torch.argsort(m.ids_restore, dim=1)  # ids_restore inverts [visible; hidden]
        assert torch.equal(shuffle[:, : m.ids_keep.shape[1]], m.ids_keep)
        assert torch.equal(torch.gather(shuffle, 1, m.ids_restore), torch.arange(24).expand(16, -1))


def test_units_hide_whole_groups_with_the_same_counts():
    v1, v2 = DisjointMasking(0.6, 1.0, unit=2)(torch.arange(50), (6, 8))
    n_units = 12
    kept = int(n_units * 0.4)
    for m in (v1.masked, v2.masked):
        per_unit = m.view(50, 3, 2, 4, 2).sum(dim=(2, 4))
        assert ((per_unit == 0) | (per_unit == 4)).all()
        assert (m.sum(1) == 4 * (n_units - kept)).all()
    assert (v1.masked | v2.masked).all()
    with pytest.raises(ValueError, match="divisible"):
        DisjointMasking(0.6, 1.0, unit=2)(torch.arange(2), (7, 7))


def test_same_seed_same_views_whatever_the_batch():
    gen = DisjointMasking(0.6, 1.0)
    a = gen(torch.tensor([3, 4, 5]), (5, 7))
    b = gen(torch.tensor([9, 4]), (5, 7))
    for va, vb in zip(a, b):
        assert torch.equal(va.masked[1], vb.masked[1])
        assert not torch.equal(va.masked[0], vb.masked[0])


def test_stacked_views_are_view_major():
    views = DisjointMasking(0.6, 1.0)(torch.arange(3), (4, 4))
    s = stack_views(views)
    assert torch.equal(s.masked[:3], views[0].masked) and torch.equal(s.masked[3:], views[1].masked)
    assert s.ids_keep.shape == (6, math.floor(16 * 0.4 + 1e-9))


def test_invalid_ratios_are_refused():
    with pytest.raises(ValueError):
        DisjointMasking(0.6, 0.5)
    with pytest.raises(ValueError):
        DisjointMasking(1.0, 1.0)
