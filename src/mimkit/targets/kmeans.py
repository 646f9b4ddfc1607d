"""k-means in torch, and a tokenizer whose codes are the nearest k-means centroid of each raw patch.

CCViT (Yan et al., 2023) tokenizes images without training a network: k-means over raw pixel patches, each
patch's code is its nearest centroid (fit "in seconds"; the paper uses faiss, a torch Lloyd loop does at this
scale). BEiT v2's VQ-KD initialises its codebook with the same algorithm in cosine form on the first batch.

Deterministic given the seed (initial centroids are a seeded sample of the points; ties break to the lowest
index), so every rank of a distributed run fits the same tokenizer from the same images.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from mimkit.models.patch import PatchGrid

Metric = Literal["l2", "cosine"]


def nearest(points: torch.Tensor, centroids: torch.Tensor, metric: Metric = "l2", chunk: int = 8192) -> torch.Tensor:
    """Index of the nearest centroid [K, D] for each point [M, D] -> Long[M] (chunked: memory O(chunk * K)).

    cosine: the largest dot product (the caller normalises both sides); l2: the smallest squared distance."""
    out = []
    c = centroids.float()
    c_sq = (c * c).sum(1)
    for start in range(0, points.shape[0], chunk):
        x = points[start:start + chunk].float()
        if metric == "cosine":
            out.append((x @ c.T).argmax(1))
        else:  # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2, and ||x||^2 does not change the argmin
            out.append((c_sq - 2 * x @ c.T).argmin(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=points.device)


def kmeans(points: torch.Tensor, k: int, iters: int = 20, seed: int = 0, metric: Metric = "l2") -> torch.Tensor:
    """Lloyd's k-means on points [M, D] -> centroids [k, D] (unit rows for metric="cosine").

    Initial centroids: k-means++ (each next one drawn with probability proportional to its squared distance to
    the nearest one so far, from a seeded subsample of 32 points per centroid), which avoids the merged clusters
    of a uniform draw. A centroid that loses all its points is moved to the point currently worst served (the
    farthest from its centroid), so every code stays in use at the end of each iteration when there are at
    least k distinct points."""
    m = points.shape[0]
    if m < k:
        raise ValueError(f"k-means needs at least k={k} points, got {m}: use more images or fewer codes")
    x = points.float()
    if metric == "cosine":
        x = F.normalize(x, dim=1)
    g = torch.Generator().manual_seed(int(seed))
    # k-means++ is k sequential passes: seed it on a subsample (32 points per centroid) and let Lloyd use all
    pool = x if m <= 32 * k else x[torch.randperm(m, generator=g)[:32 * k].to(x.device)]
    centroids = _plus_plus_init(pool, k, g, metric)
    for _ in range(iters):
        assign = nearest(x, centroids, metric)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
        empty = (~filled).nonzero().flatten()
        if len(empty):
            # the worst-served points become the new centroids (largest distance to their own centroid)
            if metric == "cosine":
                cost = -(x * centroids[assign]).sum(1)
            else:
                cost = ((x - centroids[assign]) ** 2).sum(1)
            centroids[empty] = x[cost.topk(len(empty)).indices]
        if metric == "cosine":
            centroids = F.normalize(centroids, dim=1)
    return centroids


def _plus_plus_init(x: torch.Tensor, k: int, g: torch.Generator, metric: Metric) -> torch.Tensor:
    m = x.shape[0]
    picks = [int(torch.randint(m, (1,), generator=g))]
    dist = torch.full((m,), float("inf"), device=x.device)
    for _ in range(k - 1):
        last = x[picks[-1]]
        d = (2 - 2 * (x @ last)).clamp_min(0) if metric == "cosine" else ((x - last) ** 2).sum(1)
        dist = torch.minimum(dist, d)
        weights = dist.cpu().double()
        if float(weights.sum()) <= 0:  # fewer distinct points than k: any point not yet picked
            weights = torch.ones(m, dtype=torch.double)
            weights[picks] = 0
        picks.append(int(torch.multinomial(weights, 1, generator=g)))
    return x[torch.tensor(picks, device=x.device)].clone()


class KMeansTokenizer(nn.Module):
    """Codes of image patches: the nearest of `num_codes` centroids of raw (normalised-space) pixel patches.

    The centroids are a persistent buffer, so a run's checkpoint carries its tokenizer. Patches are flattened as
    `PatchGrid.patchify` does, in the images' own (data-normalised) space: normalisation is a per-channel affine
    map, so the codes are those of the raw pixels up to that map (exactly so for one channel)."""

    def __init__(self, grid: PatchGrid, num_codes: int):
        super().__init__()
        if num_codes < 2:
            raise ValueError(f"a tokenizer needs at least 2 codes, got num_codes={num_codes}")
        self.grid, self.num_codes = grid, int(num_codes)
        self.register_buffer("centroids", torch.zeros(num_codes, grid.patch_dim))
        self.register_buffer("is_fitted", torch.zeros((), dtype=torch.bool))

    @property
    def fitted(self) -> bool:
        return bool(self.is_fitted)

    @torch.no_grad()
    def fit(self, images: torch.Tensor, seed: int = 0, iters: int = 20, max_patches: int = 200_000) -> "KMeansTokenizer":
        """Fit on the patches of `images` [B, C, H, W] (a seeded subsample of at most `max_patches`)."""
        patches = self.grid.patchify(images.float()).reshape(-1, self.grid.patch_dim)
        if patches.shape[0] > max_patches:
            g = torch.Generator().manual_seed(int(seed) + 1)
            patches = patches[torch.randperm(patches.shape[0], generator=g)[:max_patches]]
        self.centroids.copy_(kmeans(patches, self.num_codes, iters, seed, "l2").to(self.centroids))
        self.is_fitted.fill_(True)
        return self

    @torch.no_grad()
    def fit_dataset(self, dataset, num_images: int = 2000, seed: int = 0, iters: int = 20,
                    max_patches: int = 200_000) -> "KMeansTokenizer":
        """Fit on `num_images` images drawn (seeded, without replacement) from a dataset of {"image": ...} items,
        as a method's `prepare` hook does with the training split."""
        n = min(int(num_images), len(dataset))
        g = torch.Generator().manual_seed(int(seed))
        idx = torch.randperm(len(dataset), generator=g)[:n].tolist()
        images = torch.stack([dataset[i]["image"] for i in idx])
        return self.fit(images, seed, iters, max_patches)

    def _check(self) -> None:
        if not self.fitted:
            raise RuntimeError("the k-means tokenizer is not fitted: call fit/fit_dataset (a run does it in "
                               "Method.prepare) or load a checkpoint that has it")

    @torch.no_grad()
    def codes(self, images: torch.Tensor) -> torch.Tensor:
        """Long[B, N]: each patch's nearest centroid."""
        self._check()
        patches = self.grid.patchify(images.float())
        b, n, d = patches.shape
        return nearest(patches.reshape(-1, d), self.centroids, "l2").view(b, n)

    def centroid_patches(self, codes: torch.Tensor) -> torch.Tensor:
        """[B, N, patch_dim]: the pixels of each code's centroid (CCViT's replacement corruption)."""
        return self.centroids[codes]

    def usage(self, codes: torch.Tensor) -> float:
        """Fraction of the codebook that `codes` use."""
        return float(torch.unique(codes).numel()) / self.num_codes
