"""A distributed, resumable sampler that hands each sample its own seed.

It yields `(index, seed)` pairs; the dataset derives the sample's crop and flip from the seed and the
method derives its mask from it (see mimkit.rng). The epoch order is one seeded permutation shared by all
ranks; rank r takes positions r, r + W, r + 2W, ... So with a per-rank batch of B/W, the union of the
ranks' k-th batches is exactly the k-th batch of B that a single process would draw.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler

from mimkit import rng


class SeededSampler(Sampler):
    def __init__(self, num_samples: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True, global_batch: int = 1):
        if num_samples < 1:
            raise ValueError("the dataset is empty")
        self.num_samples, self.seed, self.shuffle = num_samples, seed, shuffle
        self.rank, self.world_size = rank, world_size
        # drop_last: every optimizer step sees a full global batch, so steps per epoch are the same for any W
        self.global_batch = global_batch if drop_last else 1
        self.epoch = 0
        self.start = 0  # samples of this rank already consumed in the epoch (resume mid-epoch)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator()
        g.manual_seed(rng.combine(self.seed, self.epoch, 0x5A3))
        return torch.randperm(self.num_samples, generator=g)

    @property
    def epoch_length(self) -> int:
        """Samples per epoch across all ranks: whole global batches only."""
        return (self.num_samples // self.global_batch) * self.global_batch

    def __len__(self) -> int:
        return self.epoch_length // self.world_size - self.start

    def __iter__(self):
        order = self._order()[: self.epoch_length]
        mine = order[self.rank :: self.world_size][self.start :]
        seeds = rng.sample_seeds(self.seed, self.epoch, mine)
        return iter(zip(mine.tolist(), seeds.tolist()))
