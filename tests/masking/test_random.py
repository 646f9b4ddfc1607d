import pytest
import torch

from mimkit.masking import RandomMasking, mask_from_noise


@pytest.mark.parametrize("n,ratio", [(49, 0.75), (64, 0.75), (196, 0.6), (10, 0.5)])
def test_mask_ratio_is_exact_per_sample(n, ratio):
    mask = RandomMasking(ratio)(torch.arange(256), n)
    num_keep = int(n * (1 - ratio))
    assert mask.masked.shape == (256, n)
    assert (mask.masked.sum(1) == n - num_keep).all()
    assert mask.ids_keep.shape == (256, num_keep)
    # the kept ids are exactly the unmasked positions
    assert (~mask.masked.gather(1, mask.ids_keep)).all()
    # ids_restore inverts the shuffle: [kept; hidden] gathered by ids_restore is raster order
    order = torch.cat([mask.ids_keep, torch.nonzero(mask.masked)[:, 1].view(256, -1)], 1)
    shuffled = torch.argsort(mask.ids_restore, 1)
    assert torch.equal(torch.sort(shuffled[:, :num_keep], 1).values, torch.sort(order[:, :num_keep], 1).values)
    assert torch.equal(torch.gather(shuffled, 1, mask.ids_restore), torch.arange(n).expand(256, n))


def test_mask_depends_only_on_the_sample_seed():
    m = RandomMasking(0.75)
    a = m(torch.tensor([1, 2, 3, 4]), 49)
    b = m(torch.tensor([4, 3]), 49)
    assert torch.equal(a.masked[3], b.masked[0]) and torch.equal(a.masked[2], b.masked[1])
    assert not torch.equal(a.masked[0], a.masked[1])


def test_masks_are_uniform_over_positions():
    mask = RandomMasking(0.75)(torch.arange(20_000), 16)
    freq = mask.masked.float().mean(0)
    assert torch.allclose(freq, torch.full_like(freq, 0.75), atol=0.02)


def test_noise_rule_keeps_lowest_noise():
    noise = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
    mask = mask_from_noise(noise, 0.5)
    assert mask.masked.tolist() == [[True, False, True, False]]


def test_bad_ratio_is_refused():
    with pytest.raises(ValueError, match="ratio"):
        RandomMasking(1.0)
    with pytest.raises(ValueError, match="no visible patch"):
        mask_from_noise(torch.rand(2, 3), 0.9)
