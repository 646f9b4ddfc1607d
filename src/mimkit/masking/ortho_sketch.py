"""ROPIM's "mask": a random orthogonal projection of the patch tokens along the token axis, built from a count
sketch, instead of a binary choice of hidden patches (a soft mask [B, N, N] per image)."""

from __future__ import annotations

import math

import torch

from mimkit import rng


class CountSketchProjection:
    """P = S D^-1 S^T, S in {0, +-1}^{N x K} (one non-zero per row), D = S^T S = diag(bucket sizes), K = ceil(rho N).

    Buckets: repeated random permutations of the K buckets laid over the N tokens (balanced: sizes differ by at
    most 1); signs: a shuffled balanced +-1 sequence. Both as the reference's `SketchGenerator`. The reference scales
    S S^T by rho = 0.14 instead of 1 / bucket size (= 1/7 with 196 tokens), so its P^2 = 0.98 P; dividing by the
    actual bucket sizes makes P an exact orthogonal projection (symmetric, idempotent, rank K) for any N.

    Randomness per image: bucket permutations from `rng.uniform(seeds, ., stream=31)`, signs from stream 32.
    """

    streams = (31, 32)

    def __init__(self, rho: float = 1 / 7):
        if not 0.0 < rho < 1.0:
            raise ValueError(f"sketching ratio must be in (0, 1), got {rho}")
        self.rho = rho

    def sketch_dim(self, n: int) -> int:
        # a small epsilon keeps float noise from adding a bucket (e.g. (1/7) * 49 = 7.000000000000001)
        return max(1, min(n, math.ceil(self.rho * n - 1e-9)))

    def hashes(self, seeds: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(bucket Long[B, N] in [0, K), sign Float[B, N] in {-1, +1}) per image."""
        k = self.sketch_dim(n)
        reps = math.ceil(n / k)
        perms = rng.uniform(seeds, reps * k, stream=self.streams[0]).view(-1, reps, k).argsort(dim=-1)
        bucket = perms.reshape(-1, reps * k)[:, :n]
        pairs = math.ceil(n / 2)
        base = torch.tensor([-1.0, 1.0], device=seeds.device).repeat(pairs)  # as many -1 as +1, shuffled
        order = rng.uniform(seeds, 2 * pairs, stream=self.streams[1]).argsort(dim=1)
        return bucket, base[order][:, :n]

    def sketch(self, seeds: torch.Tensor, n: int) -> torch.Tensor:
        """S: Float[B, N, K]."""
        bucket, sign = self.hashes(seeds, n)
        s = torch.zeros(bucket.shape[0], n, self.sketch_dim(n), device=seeds.device)
        return s.scatter_(2, bucket.unsqueeze(-1), sign.unsqueeze(-1))

    def __call__(self, seeds: torch.Tensor, n: int) -> torch.Tensor:
        """P: Float[B, N, N], P_ij = s_i s_j / |bucket| when tokens i and j share a bucket, else 0."""
        bucket, sign = self.hashes(seeds, n)
        same = (bucket.unsqueeze(2) == bucket.unsqueeze(1)).float()
        size = same.sum(dim=2, keepdim=True)  # size of token i's bucket
        return same * sign.unsqueeze(2) * sign.unsqueeze(1) / size
