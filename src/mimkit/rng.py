"""Counter-based randomness keyed by per-sample seeds.

Every random choice that concerns one image (its crop, its flip, its mask) is a pure function of that
image's seed, which the sampler derives from (run seed, epoch, dataset index). So a sample gets the same
crop and mask whichever rank, worker or batch it lands in: one process and two DDP processes on the same
global batch see identical inputs, and a resumed run continues exactly without restoring RNG streams.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_MULT = 0x45D9F3B  # 27-bit multiplier: products of 32-bit values stay below 2**63, so int64 never overflows


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (two multiply-xorshift rounds) on int64 tensors holding 32-bit values."""
    x = ((x >> 16) ^ x) * _MULT & _MASK32
    x = ((x >> 16) ^ x) * _MULT & _MASK32
    return (x >> 16) ^ x


def _mix_py(x: int) -> int:
    x &= _MASK32
    x = (((x >> 16) ^ x) * _MULT) & _MASK32
    x = (((x >> 16) ^ x) * _MULT) & _MASK32
    return (x >> 16) ^ x


def combine(*values: int) -> int:
    """Hash a tuple of integers into one 31-bit seed (positive, fits every generator API)."""
    h = 0x9E3779B9
    for v in values:
        v = int(v)
        h = _mix_py(h ^ _mix_py(v & _MASK32) ^ _mix_py((v >> 32) + 0x632BE5AB))
    return h & 0x7FFFFFFF


def sample_seeds(base_seed: int, epoch: int, indices: torch.Tensor) -> torch.Tensor:
    """Per-sample seeds for `indices` (Long[B]) in `epoch` of a run seeded with `base_seed`."""
    key = combine(base_seed, epoch)
    return _mix32((_mix32(indices.long() & _MASK32) ^ key) & _MASK32) & 0x7FFFFFFF


def uniform(seeds: torch.Tensor, n: int, stream: int = 0) -> torch.Tensor:
    """Float32 U[0,1) noise of shape [B, n]: row b depends only on (seeds[b], stream).

    Computed on the seeds' device, vectorised; `stream` separates independent uses of one seed.
    """
    seeds = seeds.long().view(-1, 1)
    pos = torch.arange(n, device=seeds.device, dtype=torch.long).view(1, -1)
    key = _mix32((seeds ^ _mix_py(stream + 0x7F4A7C15)) & _MASK32)
    x = _mix32((_mix32((pos * 0x9E37 + 0x3C6E) & _MASK32) ^ key) & _MASK32)
    x = _mix32((x + key) & _MASK32)
    # 24 high-quality bits map exactly into float32's mantissa: values in [0, 1) with no rounding to 1.0
    return (x >> 8).to(torch.float32) * (1.0 / (1 << 24))


def generator(seed: int, stream: int = 0) -> torch.Generator:
    """A CPU torch.Generator for per-sample work that needs sequential draws (crops, block masks)."""
    g = torch.Generator()
    g.manual_seed(combine(seed, stream))
    return g
