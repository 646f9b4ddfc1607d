import math

import pytest
import torch
import torch.nn.functional as F

from mimkit.eval import knn_accuracy, knn_classify


def _clusters(n_per, num_classes=4, dim=16, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.eye(dim)[:num_classes] * 3.0
    labels = torch.arange(num_classes).repeat_interleave(n_per)
    feats = centers[labels] + noise * torch.randn(len(labels), dim, generator=g)
    return feats, labels


def test_well_separated_clusters_are_classified_perfectly():
    train_x, train_y = _clusters(50, seed=0)
    test_x, test_y = _clusters(20, seed=1)
    assert knn_accuracy(train_x, train_y, test_x, test_y, k=20) == 1.0
    assert torch.equal(knn_classify(train_x, train_y, test_x, k=5), test_y)


def test_hand_computed_weighted_vote():
    # bank: a class-1 point at cos 0.640 from the query, two class-0 points at cos 0.768, one opposite
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [-1.0, 0.0]])
    labels = torch.tensor([1, 0, 0, 2])
    query = torch.tensor([[1.0, 1.2]])
    q = F.normalize(query, dim=1)[0]
    sims = F.normalize(train, dim=1) @ q  # cos: 0.640, 0.768, 0.768, -0.640
    # k=3 keeps the points with labels 1, 0, 0
    t = 0.07
    w1 = math.exp(float(sims[0]) / t)
    w0 = 2 * math.exp(float(sims[1]) / t)
    expected = 0 if w0 > w1 else 1
    assert expected == 0
    assert knn_classify(train, labels, query, k=3, temperature=t).tolist() == [0]
    # k=1: the single nearest neighbour (a class-0 point) decides
    assert knn_classify(train, labels, query, k=1).tolist() == [0]
    # a query nearest to the class-1 point, k=1, picks class 1
    assert knn_classify(train, labels, torch.tensor([[1.0, 0.1]]), k=1).tolist() == [1]


def test_weights_beat_counts_when_temperature_is_low():
    # one very similar class-1 neighbour vs two weakly similar class-0 neighbours
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    labels = torch.tensor([1, 0, 0])
    query = torch.tensor([[1.0, 0.05]])
    assert knn_classify(train, labels, query, k=3, temperature=0.07).tolist() == [1]
    assert knn_classify(train, labels, query, k=3, temperature=1e4).tolist() == [0]  # ~ majority count


def test_chunking_does_not_change_predictions():
    g = torch.Generator().manual_seed(3)
    train = torch.randn(503, 24, generator=g)
    labels = torch.randint(0, 7, (503,), generator=g)
    test = torch.randn(211, 24, generator=g)
    ref = knn_classify(train, labels, test, k=20, chunk_size=10_000, bank_chunk_size=10_000)
    for chunk, bank_chunk in [(1, 10_000), (17, 10_000), (64, 37), (211, 20), (5, 501)]:
        out = knn_classify(train, labels, test, k=20, chunk_size=chunk, bank_chunk_size=bank_chunk)
        assert torch.equal(out, ref), (chunk, bank_chunk)


def test_k_larger_than_bank_and_scale_invariance():
    train, labels = _clusters(3, num_classes=2, dim=4)
    test, test_y = _clusters(2, num_classes=2, dim=4, seed=5)
    assert knn_accuracy(train, labels, test, test_y, k=100) == 1.0
    assert torch.equal(knn_classify(train * 7.0, labels, test * 0.1, k=3), knn_classify(train, labels, test, k=3))


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        knn_classify(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), torch.zeros(2, 5))
    with pytest.raises(ValueError):
        knn_classify(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long), torch.zeros(2, 4))
