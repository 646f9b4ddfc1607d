"""The dataset the trainer sees: a subset of a source, a transform, and the on_error policy.

``dataset[(index, seed)]`` (what :class:`~mimkit.data.sampler.SeededSampler` yields) and ``dataset[index]``
(seed derived from the index) both return ``{"image": Float[C, H, W] normalized, "seed": int, "index": int,
"label": int}`` with label -1 for unlabelled sources.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from mimkit import rng
from mimkit.data.errors import ChannelMismatchError, DataError, record_load_error

INDEX_SEED_STREAM = 0x1D5EED  # seed for a plain-int index: combine(index, INDEX_SEED_STREAM)
_SUBSTITUTE_TRIES = 16


def index_seed(index: int) -> int:
    return rng.combine(int(index), INDEX_SEED_STREAM)


class MIMDataset(Dataset):
    """`indices` select items of `source` (positions 0..len-1 map to source items indices[0..len-1])."""

    def __init__(self, source, indices: torch.Tensor, transform, on_error: str = "error",
                 report_dir: str | None = None, report=None):
        self.source = source
        self.indices = torch.as_tensor(indices, dtype=torch.long).clone()
        self.transform = transform
        self.on_error = on_error
        self.report_dir = str(report_dir) if report_dir is not None else None
        self.report = report  # DataReport: load-time failures seen in this process are added to it

    def __len__(self) -> int:
        return int(self.indices.numel())

    @property
    def source_indices(self) -> list[int]:
        return self.indices.tolist()

    def _load(self, position: int) -> tuple[torch.Tensor, int]:
        """(raw image, label) of this position, applying the on_error policy to decoding failures."""
        n = len(self)
        pos = position
        for attempt in range(_SUBSTITUTE_TRIES + 1):
            src = int(self.indices[pos])
            try:
                return self.source.load(src)
            except DataError as err:
                if self.on_error == "error" or isinstance(err, ChannelMismatchError):
                    raise
                path, reason = self.source.describe(src), str(err.__cause__ or err)
                record_load_error(self.report_dir, path, reason)
                if self.report is not None:
                    self.report.local_errors.setdefault(path, " ".join(reason.split()))
                if n < 2:
                    break
                # deterministic substitute: another position, a function of (position, attempt) only
                pos = (position + 1 + rng.combine(position, attempt, 0x5B) % (n - 1)) % n
        raise DataError(f"no readable substitute found for {self.source.describe(int(self.indices[position]))} "
                        f"(tried {attempt + 1} image(s) of this {n}-image dataset; last: {self.source.describe(src)});"
                        " see the data report")

    def __getitem__(self, key):
        if isinstance(key, (tuple, list)):
            index, seed = int(key[0]), int(key[1])
        else:
            index = int(key)
            seed = index_seed(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images")
        img, label = self._load(index)
        out = self.transform(img, seed)
        item = out if isinstance(out, dict) else {"image": out}  # a MultiViewTransform gives image + views
        return {**item, "seed": seed, "index": index, "label": int(label)}

    def __repr__(self) -> str:
        return f"MIMDataset({self.source!r}, n={len(self)}, transform={type(self.transform).__name__})"


def fixed_batch(dataset, num_images: int, seed: int = 0) -> dict:
    """The first `num_images` items with seeds fixed by (seed, index): the same images and masks every time
    (reconstruction pictures comparable across training steps and runs)."""
    indices = torch.arange(min(num_images, len(dataset)))
    seeds = rng.sample_seeds(seed, 0, indices)
    items = [dataset[(int(i), int(s))] for i, s in zip(indices, seeds)]
    return {"image": torch.stack([it["image"] for it in items]), "seed": seeds}
