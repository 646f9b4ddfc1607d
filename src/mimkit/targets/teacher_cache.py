"""Teacher features cached on disk, so a distillation run (or its ablations) does not pay for the teacher twice.

A sample's augmented image is a pure function of its seed (mimkit.rng), and the seed of (run seed, epoch,
index); so two runs with the same data, seed and batch layout feed the teacher the same images, and a resumed
run feeds it what it fed before. The cache keys features by sample seed and checks each hit against a
fingerprint of the image (a fixed random projection of its pixels, computed on the image's device): a seed
whose image differs (other data, other augmentation settings) is recomputed and stored again, never served
stale.

Layout: `<dir>/part-<rank>-<n>.safetensors`, each holding one batch's `seed`, `fingerprint` and `layer<i>`
tensors, written atomically (temporary file + rename). An index of every part is read when the cache opens.
Writing stops once the folder holds `max_bytes` ("when the data is small enough"); reading goes on.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from mimkit import rng

_FP_STREAM = 0xF1A9


def fingerprint(images: torch.Tensor) -> torch.Tensor:
    """[B] float64: the projection of each flattened image on a fixed pseudo-random vector (same for every run)."""
    flat = images.detach().reshape(images.shape[0], -1).double()
    r = rng.uniform(torch.tensor([_FP_STREAM], device=images.device), flat.shape[1]).double().view(-1) - 0.5
    return flat @ r


class TeacherCache:
    def __init__(self, directory: str | os.PathLike, max_bytes: int = 2 << 30, rank: int = 0, rtol: float = 1e-5):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.rank, self.rtol = int(max_bytes), int(rank), rtol
        self.index: dict[int, tuple[Path, int]] = {}
        self.fps: dict[int, float] = {}
        self.bytes = 0
        self.hits = self.misses = 0
        for part in sorted(self.dir.glob("part-*.safetensors")):
            self._add_to_index(part)
        self._next = len(list(self.dir.glob(f"part-{self.rank}-*.safetensors")))

    def _add_to_index(self, part: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(part), "pt") as f:
            seeds, fps = f.get_tensor("seed").tolist(), f.get_tensor("fingerprint").tolist()
        for row, (s, fp) in enumerate(zip(seeds, fps)):
            self.index[int(s)] = (part, row)
            self.fps[int(s)] = fp
        self.bytes += part.stat().st_size

    def _valid(self, seeds: list[int], fps: list[float]) -> bool:
        for s, fp in zip(seeds, fps):
            old = self.fps.get(s)
            if old is None or abs(old - fp) > self.rtol * max(1.0, abs(fp)):
                return False
        return True

    def _read(self, seeds: list[int], device) -> list[torch.Tensor]:
        from safetensors import safe_open

        by_part: dict[Path, list[tuple[int, int]]] = {}
        for pos, s in enumerate(seeds):
            part, row = self.index[s]
            by_part.setdefault(part, []).append((pos, row))
        out: list[torch.Tensor] | None = None
        for part, pairs in by_part.items():
            with safe_open(str(part), "pt") as f:
                names = sorted((k for k in f.keys() if k.startswith("layer")), key=lambda k: int(k[5:]))
                tensors = [f.get_tensor(k) for k in names]
            if out is None:
                out = [torch.empty((len(seeds), *t.shape[1:]), dtype=t.dtype) for t in tensors]
            pos = torch.tensor([p for p, _ in pairs])
            rows = torch.tensor([r for _, r in pairs])
            for o, t in zip(out, tensors):
                o[pos] = t[rows]
        return [o.to(device) for o in out]

    def _write(self, seeds: torch.Tensor, fps: torch.Tensor, feats: list[torch.Tensor]) -> None:
        from safetensors.torch import save_file

        if self.bytes >= self.max_bytes:
            return
        part = self.dir / f"part-{self.rank}-{self._next:06d}.safetensors"
        tmp = part.with_name(part.name + ".tmp")
        tensors = {"seed": seeds.detach().cpu().long(), "fingerprint": fps.detach().cpu()}
        tensors.update({f"layer{i}": f.detach().cpu().contiguous() for i, f in enumerate(feats)})
        save_file(tensors, str(tmp))
        os.replace(tmp, part)
        self._next += 1
        self._add_to_index(part)

    def get(self, images: torch.Tensor, seeds: torch.Tensor,
            compute: Callable[[torch.Tensor], list[torch.Tensor]]) -> list[torch.Tensor]:
        """The teacher's features of `images` (seeds [B]): from disk when every seed is cached with a matching
        fingerprint, else `compute(images)` (then stored)."""
        keys = [int(s) for s in seeds.tolist()]
        fps = fingerprint(images)
        if keys and self._valid(keys, fps.tolist()):
            self.hits += 1
            return self._read(keys, images.device)
        self.misses += 1
        feats = compute(images)
        self._write(seeds, fps, feats)
        return feats
