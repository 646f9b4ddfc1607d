import torch

from mimkit import rng


def test_uniform_range_and_row_independence():
    seeds = torch.tensor([3, 17, 99, 123456])
    u = rng.uniform(seeds, 1000)
    assert u.shape == (4, 1000) and u.dtype == torch.float32
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    # a row depends on its own seed only: the same seed in another batch gives the same row
    assert torch.equal(rng.uniform(torch.tensor([99]), 1000)[0], u[2])
    # roughly uniform
    assert abs(float(u.mean()) - 0.5) < 0.02


def test_streams_and_seeds_differ():
    seeds = torch.tensor([5, 6])
    a, b = rng.uniform(seeds, 64, stream=0), rng.uniform(seeds, 64, stream=1)
    assert not torch.equal(a, b)
    assert not torch.equal(a[0], a[1])


def test_sample_seeds_depend_on_epoch_and_index():
    idx = torch.arange(10_000)
    s0 = rng.sample_seeds(0, 0, idx)
    assert len(torch.unique(s0)) > 9_990
    assert not torch.equal(s0, rng.sample_seeds(0, 1, idx))
    assert not torch.equal(s0, rng.sample_seeds(1, 0, idx))
    assert torch.equal(s0[[7, 3]], rng.sample_seeds(0, 0, torch.tensor([7, 3])))
