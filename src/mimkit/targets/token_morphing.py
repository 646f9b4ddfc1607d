"""Dynamic token morphing (DTM, Kim et al., ICLR'25; card C16): average contextually similar target tokens.

Teacher tokens are spatially inconsistent targets. DTM groups similar tokens with ToMe's bipartite soft matching
(Bolya et al., ICLR'23) on the *target* features and replaces every token, of the prediction and of the target
alike, by its group's mean, so the regression targets become region-level averages.

- `token_groups(x, iterations, r)`: k iterations of bipartite soft matching on x [B, T, D] (cosine similarity;
  the current sequence split into alternate tokens, even positions A and odd positions B; each of the r A-tokens
  with the most similar B-partner is merged into it with a size-weighted average; the class token, position 0,
  is never merged). Returns the source matrix Sigma [B, T', T]: Sigma[b, g, t] = 1 when original token t is in
  group g. As in ToMe, one iteration merges at most half of the unprotected tokens (r is capped there).
- `morph(x, sigma)`: x~ = Sigma^T (Sigma x / rowsum Sigma), each token replaced by its group's mean; the same
  Sigma goes to the prediction and to the target.
- `draw_schedule(...)`: the per-step schedule of the DTM repo: for each of L draws, merges n ~ U{0..n1},
  iterations k ~ U{1..k_max}, r = ceil(n / k), or floor(n / k) when k * ceil(n / k) would exceed n1.
- `batch_generator(seeds)`: the generator that draws it, a function of the batch's sample seeds (one schedule
  per batch, as in the repo, reproducible from the data order alone).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mimkit import rng

SCHEDULE_STREAM = 16  # rng stream of the per-batch schedule generator


def batch_generator(seeds: torch.Tensor, stream: int = SCHEDULE_STREAM) -> torch.Generator:
    """A CPU generator keyed by every sample seed of the batch (so the same batch draws the same schedule)."""
    return rng.generator(rng.combine(*seeds.reshape(-1).tolist()), stream)


def draw_schedule(n1: int, k_max: int, draws: int, generator: torch.Generator) -> list[tuple[int, int]]:
    """(iterations k, merges per iteration r) for each of `draws` draws: n ~ U{0..n1}, k ~ U{1..k_max},
    r = ceil(n / k) unless k * ceil(n / k) > n1, then floor(n / k). r = 0 means no morphing for that draw."""
    if n1 < 0 or k_max < 1 or draws < 1:
        raise ValueError(f"need n1 >= 0, k_max >= 1 and draws >= 1, got n1={n1}, k_max={k_max}, draws={draws}")
    out = []
    for _ in range(draws):
        n = int(torch.randint(0, n1 + 1, (1,), generator=generator))
        k = int(torch.randint(1, k_max + 1, (1,), generator=generator))
        out.append((k, merges_per_iteration(n, k, n1)))
    return out


def merges_per_iteration(n: int, k: int, n1: int) -> int:
    """r = ceil(n / k), or floor(n / k) when k iterations of ceil(n / k) would merge more than n1 tokens."""
    r = math.ceil(n / k)
    return n // k if r * k > n1 else r


def bipartite_merge(x: torch.Tensor, size: torch.Tensor, r: int, class_token: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ToMe iteration on x [B, T, D] with token sizes [B, T, 1].

    Returns (merged tokens [B, T - r', D] as size-weighted means, their sizes [B, T - r', 1], dest Long[B, T]:
    where each input token went), with r' = min(r, (T - protected) // 2). The output order is
    [unmerged A-tokens in their order (class token first); all B-tokens], as in ToMe."""
    b, t, _ = x.shape
    protected = 1 if class_token else 0
    r = min(int(r), (t - protected) // 2)
    device = x.device
    if r <= 0:
        dest = torch.arange(t, device=device).expand(b, t)
        return x, size, dest
    unit = F.normalize(x.float(), dim=-1)
    a, bb = unit[:, ::2], unit[:, 1::2]
    n_a, n_b = a.shape[1], bb.shape[1]
    scores = a @ bb.transpose(1, 2)                               # [B, A, B] cosine similarities
    if class_token:
        scores[:, 0, :] = -math.inf                               # the class token finds no partner
    best, partner = scores.max(dim=-1)                            # each A-token's most similar B-token
    order = best.argsort(dim=-1, descending=True, stable=True)    # A-tokens, most similar first
    merged_a, kept_a = order[:, :r], order[:, r:].sort(dim=-1).values  # kept in their order: class token first
    n_kept = n_a - r
    dest_a = torch.empty(b, n_a, dtype=torch.long, device=device)
    dest_a.scatter_(1, kept_a, torch.arange(n_kept, device=device).expand(b, n_kept))
    dest_a.scatter_(1, merged_a, n_kept + partner.gather(1, merged_a))
    dest = torch.empty(b, t, dtype=torch.long, device=device)
    dest[:, ::2] = dest_a
    dest[:, 1::2] = n_kept + torch.arange(n_b, device=device)
    t_new = t - r
    weighted = x.new_zeros(b, t_new, x.shape[-1]).scatter_add_(1, dest[..., None].expand_as(x), x * size)
    new_size = size.new_zeros(b, t_new, 1).scatter_add_(1, dest[..., None], size)
    return weighted / new_size, new_size, dest


@torch.no_grad()
def token_groups(x: torch.Tensor, iterations: int, r: int, class_token: bool = True) -> torch.Tensor:
    """Source matrix Sigma [B, T', T] (float32, 0/1; each column one 1) after `iterations` rounds of r merges
    on x [B, T, D]: T' = T - iterations * r while r stays within half of the unprotected tokens. r = 0 or no
    iterations: the identity."""
    b, t, _ = x.shape
    group = torch.arange(t, device=x.device).expand(b, t)   # the group of each original token
    tokens = x.detach().float()
    size = tokens.new_ones(b, t, 1)
    if r > 0:
        for _ in range(iterations):
            tokens, size, dest = bipartite_merge(tokens, size, r, class_token)
            group = dest.gather(1, group)
    return F.one_hot(group, tokens.shape[1]).transpose(1, 2).float()


def morph(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x~ = Sigma^T (Sigma x / rowsum Sigma): every token of x [B, T, D] replaced by its group's mean, in float32
    (outside autocast: the group means are targets). A square Sigma has only singleton groups: x itself."""
    if sigma.shape[1] == sigma.shape[2]:
        return x.float()
    with torch.autocast(device_type=x.device.type, enabled=False):
        sigma = sigma.float()
        means = torch.bmm(sigma, x.float()) / sigma.sum(-1, keepdim=True)
        return torch.bmm(sigma.transpose(1, 2), means)
