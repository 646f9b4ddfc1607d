"""k-means and the k-means patch tokenizer (CCViT's non-parametric tokenizer, VQ-KD's codebook init)."""

import pytest
import torch

from mimkit.models.patch import PatchGrid
from mimkit.targets.kmeans import KMeansTokenizer, kmeans, nearest


def test_nearest_is_the_brute_force_argmin_in_chunks():
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(300, 5, generator=g), torch.randn(17, 5, generator=g)
    brute = torch.cdist(x, c).argmin(1)
    assert torch.equal(nearest(x, c, "l2", chunk=64), brute)
    xn, cn = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(c, dim=1)
    assert torch.equal(nearest(xn, cn, "cosine", chunk=7), (xn @ cn.T).argmax(1))


def test_kmeans_finds_separated_clusters_and_is_seeded():
    g = torch.Generator().manual_seed(1)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    points = (centres.repeat_interleave(50, 0) + 0.1 * torch.randn(200, 2, generator=g))
    found = kmeans(points, 4, iters=10, seed=3)
    # every true centre has a centroid within 0.1
    assert torch.cdist(centres, found).min(1).values.max() < 0.1
    assert torch.equal(found, kmeans(points, 4, iters=10, seed=3))
    unit = kmeans(points + 1, 4, iters=5, seed=0, metric="cosine")
    assert torch.allclose(unit.norm(dim=1), torch.ones(4), atol=1e-5)


def test_empty_clusters_are_reseeded_so_every_code_is_used():
    # two duplicated points among many: a naive Lloyd step leaves centroids empty; reseeding keeps k in use
    points = torch.cat([torch.zeros(50, 3), torch.ones(50, 3), torch.arange(6.0).view(2, 3) + 5])
    c = kmeans(points, 4, iters=5, seed=0)
    assert torch.unique(nearest(points, c)).numel() == 4
    with pytest.raises(ValueError, match="at least k=8 points"):
        kmeans(torch.randn(5, 2), 8)


def test_tokenizer_codes_are_nearest_centroids_and_usage_is_counted():
    grid = PatchGrid.make(8, 4, 1)
    images = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    tok = KMeansTokenizer(grid, num_codes=5)
    with pytest.raises(RuntimeError, match="not fitted"):
        tok.codes(images)
    tok.fit(images, seed=0, iters=5)
    codes = tok.codes(images)
    patches = grid.patchify(images)
    dist = ((patches[:, :, None, :] - tok.centroids[None, None]) ** 2).sum(-1)
    assert codes.shape == (6, 4) and torch.equal(codes, dist.argmin(-1))
    assert torch.equal(tok.centroid_patches(codes), tok.centroids[codes])
    assert tok.usage(codes) == torch.unique(codes).numel() / 5
    assert tok.usage(torch.zeros(2, 4, dtype=torch.long)) == 1 / 5
    # the fitted tokenizer travels in the state_dict
    other = KMeansTokenizer(grid, 5)
    other.load_state_dict(tok.state_dict())
    assert other.fitted and torch.equal(other.codes(images), codes)


def test_fit_dataset_draws_seeded_images():
    grid = PatchGrid.make(8, 4, 1)
    data = [{"image": torch.full((1, 8, 8), float(i))} for i in range(20)]
    a = KMeansTokenizer(grid, 3).fit_dataset(data, num_images=6, seed=4, iters=3)
    b = KMeansTokenizer(grid, 3).fit_dataset(data, num_images=6, seed=4, iters=3)
    assert torch.equal(a.centroids, b.centroids)
    # constant images give constant patches, so every centroid (a mean of them) is constant too
    assert torch.allclose(a.centroids, a.centroids[:, :1].expand(-1, 16))
    c = KMeansTokenizer(grid, 3).fit_dataset(data, num_images=6, seed=5, iters=3)
    assert not torch.equal(a.centroids.sort(0).values, c.centroids.sort(0).values)
