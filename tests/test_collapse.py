import math

import torch

from mimkit.collapse import batch_entropy, mean_entropy, mean_pairwise_cosine


def test_pairwise_cosine_is_one_for_identical_and_near_zero_for_random():
    same = torch.ones(50, 8) * torch.randn(8)
    assert mean_pairwise_cosine(same).item() == torch.tensor(1.0).item() or abs(mean_pairwise_cosine(same) - 1) < 1e-5
    rand = torch.randn(400, 64, generator=torch.Generator().manual_seed(0))
    assert abs(mean_pairwise_cosine(rand).item()) < 0.02
    # brute force on a small set
    x = torch.randn(6, 5)
    z = torch.nn.functional.normalize(x, dim=-1)
    sim = z @ z.T
    expect = (sim.sum() - sim.diag().sum()) / 30
    assert torch.allclose(mean_pairwise_cosine(x), expect, atol=1e-6)


def test_entropies():
    uniform = torch.full((4, 16), 1 / 16)
    assert abs(mean_entropy(uniform).item() - math.log(16)) < 1e-5
    onehot = torch.nn.functional.one_hot(torch.zeros(4, dtype=torch.long), 16).float()
    assert mean_entropy(onehot).item() < 1e-4 and batch_entropy(onehot).item() < 1e-4
    spread = torch.nn.functional.one_hot(torch.arange(4), 16).float()
    assert abs(batch_entropy(spread).item() - math.log(4)) < 1e-5
