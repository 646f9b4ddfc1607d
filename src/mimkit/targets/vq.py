"""A cosine vector quantiser whose codebook moves only by an EMA of the vectors assigned to it (BEiT v2's VQ-KD).

    z  <- z / ||z||                       (the quantiser normalises its input)
    k  =  argmax_j  z . e_j               (nearest unit code by cosine)
    e_j <- normalise(decay * e_j + (1 - decay) * normalise(mean of the z assigned to j in this batch))
    loss = beta * MSE(sg(e_k), z);  output z + sg(e_k - z)   (straight-through: the gradient reaches z unchanged)

The codebook is a buffer (no gradient, never in an optimizer): codes no vector chose in a batch stay where they
are. It starts from cosine k-means on the first training batch (`initialised` flag in the state_dict, so a
resumed run does not redo it). Under torch.distributed the first batch is gathered from every rank and the EMA
statistics (counts and sums) are summed over ranks, so all ranks hold the same codebook at every step.

Codebook usage, the health signal of a VQ tokenizer (BEiT v2 reports 97-100%; a collapsed one uses a handful
of codes): the codes of the last `usage_window` training batches are counted in a ring buffer, and `usage()`
is the fraction of the codebook that window used.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from mimkit.targets.kmeans import kmeans, nearest


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of x [M, D] from every rank, concatenated in rank order (ranks may hold different M)."""
    if not _distributed():
        return x
    world = dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    most = int(max(int(s) for s in sizes))
    padded = torch.zeros(most, x.shape[1], dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)])


def _sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


class EMACosineQuantizer(nn.Module):
    """forward(z [..., dim]) -> (z_q straight-through [..., dim], codes Long[...], commitment loss)."""

    def __init__(self, num_codes: int, dim: int, decay: float = 0.99, beta: float = 1.0, kmeans_iters: int = 10,
                 usage_window: int = 100, seed: int = 0, dead_after: int | None = None):
        super().__init__()
        if num_codes < 2:
            raise ValueError(f"a codebook needs at least 2 codes, got num_codes={num_codes}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"the EMA decay must be in [0, 1), got {decay}")
        self.num_codes, self.dim, self.decay, self.beta = int(num_codes), int(dim), float(decay), float(beta)
        self.kmeans_iters, self.seed = int(kmeans_iters), int(seed)
        self.dead_after = int(dead_after) if dead_after else None
        self.register_buffer("codebook", torch.zeros(num_codes, dim))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        # training batches since each code was last chosen (the optional dead-code restart reads it)
        self.register_buffer("idle", torch.zeros(num_codes, dtype=torch.long))
        # diagnostics only: per-batch code counts of the last `usage_window` training batches (not saved)
        self.register_buffer("window_counts", torch.zeros(max(1, int(usage_window)), num_codes), persistent=False)
        self.register_buffer("window_pos", torch.zeros((), dtype=torch.long), persistent=False)

    # ---- initialisation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def initialise(self, z: torch.Tensor) -> None:
        """Cosine k-means on unit vectors z [M, dim] (every rank's, gathered). With fewer vectors than codes
        (tiny batches) the codes beyond k-means' M centroids are jittered copies of seeded random vectors."""
        points = _gather_rows(F.normalize(z.detach().float(), dim=-1))
        k = min(self.num_codes, points.shape[0])
        codes = kmeans(points, k, self.kmeans_iters, self.seed, metric="cosine")
        if k < self.num_codes:
            g = torch.Generator().manual_seed(self.seed + 1)
            extra = self.num_codes - k
            picks = torch.randint(points.shape[0], (extra,), generator=g)
            noise = torch.randn(extra, self.dim, generator=g) * (0.1 / self.dim ** 0.5)
            codes = torch.cat([codes, F.normalize(points[picks].cpu() + noise, dim=-1).to(codes)])
        self.codebook.copy_(codes.to(self.codebook))
        self.initialised.fill_(True)

    # ---- assignment ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """Long[...]: the nearest code (by cosine) of each vector of z [..., dim]; no update."""
        flat = F.normalize(z.detach().float().reshape(-1, self.dim), dim=-1)
        return nearest(flat, self.codebook.float(), metric="cosine").view(z.shape[:-1])

    @torch.no_grad()
    def ema_update(self, z: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Move each chosen code towards the normalised mean of its unit vectors z [M, dim]; returns the
        (all-ranks) counts [K] of this batch."""
        counts = torch.bincount(codes, minlength=self.num_codes).float()
        sums = torch.zeros(self.num_codes, self.dim, device=z.device).index_add_(0, codes, z.float())
        stats = _sum_over_ranks(torch.cat([counts[:, None], sums], dim=1))  # one collective for both
        counts, sums = stats[:, 0], stats[:, 1:]
        used = counts > 0
        means = F.normalize(sums / counts.clamp_min(1.0)[:, None], dim=-1)
        target = torch.where(used[:, None], means, self.codebook)  # codes nobody chose stay put
        self.codebook.copy_(F.normalize(self.decay * self.codebook + (1.0 - self.decay) * target, dim=-1))
        self.idle.add_(1).masked_fill_(used, 0)
        if self.dead_after:
            self.restart_dead(z, codes)
        return counts

    @torch.no_grad()
    def restart_dead(self, z: torch.Tensor, codes: torch.Tensor) -> None:
        """Not in BEiT v2 (an option): codes idle for `dead_after` batches move onto the batch's worst-served
        unit vectors z [M, dim] (lowest cosine to their code), so a drifting encoder cannot strand them."""
        dead = (self.idle >= self.dead_after).nonzero().flatten()
        if len(dead) == 0:  # the same on every rank: `idle` follows the all-rank counts
            return
        fit = (z.float() * self.codebook[codes]).sum(-1)
        n = min(len(dead), z.shape[0])
        self.codebook[dead[:n]] = z[fit.topk(n, largest=False).indices].float()
        self.idle[dead[:n]] = 0
        if _distributed():  # each rank drew from its own batch: take rank 0's
            dist.broadcast(self.codebook, src=0)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        shape = z.shape
        z = F.normalize(z.float(), dim=-1)
        flat = z.reshape(-1, self.dim)
        if self.training and not bool(self.initialised):
            self.initialise(flat)
        codes = nearest(flat.detach(), self.codebook.float(), metric="cosine")
        z_q = self.codebook[codes].float().view(shape)  # a copy: the EMA update below does not touch it
        if self.training:
            counts = self.ema_update(flat.detach(), codes)
            self._record(counts)
        commitment = self.beta * F.mse_loss(z_q.detach(), z)
        return z + (z_q - z).detach(), codes.view(shape[:-1]), commitment

    # ---- usage ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _record(self, counts: torch.Tensor) -> None:
        i = int(self.window_pos) % self.window_counts.shape[0]
        self.window_counts[i] = counts.to(self.window_counts)
        self.window_pos += 1

    @torch.no_grad()
    def window_histogram(self) -> torch.Tensor:
        return self.window_counts.sum(0)

    @torch.no_grad()
    def usage(self, counts: torch.Tensor | None = None) -> torch.Tensor:
        """Fraction of the codebook used in `counts` [K] (default: the training window's)."""
        counts = self.window_histogram() if counts is None else counts
        return (counts > 0).float().mean()

    @torch.no_grad()
    def perplexity(self, counts: torch.Tensor | None = None) -> torch.Tensor:
        """exp(entropy) of the code frequencies in `counts`, in codes (K when all are used equally)."""
        counts = self.window_histogram() if counts is None else counts
        p = counts.float() / counts.sum().clamp_min(1.0)
        return torch.exp(-(p * p.clamp_min(1e-12).log()).sum())
