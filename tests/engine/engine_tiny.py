"""Small real-image data and configs for the engine tests (also imported by the DDP worker script).

Images are Fashion-MNIST test images (center 16x16 crop) read straight from the IDX file, so the engine
tests do not depend on the data layer; items follow its contract {"image", "seed", "index", "label"}.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mimkit.config import PretrainConfig, load_config
from mimkit.engine import train
from mimkit.methods import MAE, build_method

FMNIST = Path("/usr/share/datasets/fashion-mnist")
FOOLBOX = Path(__file__).resolve().parents[2] / ".data" / "foolbox" / "foolbox" / "data"


def have_images() -> bool:
    return (FMNIST / "t10k-images-idx3-ubyte.gz").is_file() or any(FOOLBOX.glob("*.png"))


def real_images(n: int, size: int = 16) -> torch.Tensor:
    """[n, 1, size, size] float images in [0, 1]: Fashion-MNIST, else the foolbox sample PNGs (grey)."""
    path = FMNIST / "t10k-images-idx3-ubyte.gz"
    if path.is_file():
        with gzip.open(path, "rb") as fh:
            fh.read(16)
            raw = np.frombuffer(fh.read(n * 28 * 28), dtype=np.uint8).reshape(n, 1, 28, 28)
        x = torch.from_numpy(raw.copy()).float() / 255.0
    else:
        from PIL import Image

        files = sorted(FOOLBOX.glob("*.png"))
        imgs = [np.asarray(Image.open(files[i % len(files)]).convert("L").resize((28, 28))) for i in range(n)]
        x = torch.from_numpy(np.stack(imgs)[:, None].copy()).float() / 255.0
    o = (28 - size) // 2
    return x[:, :, o:o + size, o:o + size].contiguous()


class TinyImages(Dataset):
    """Keys (index, seed) -> item dict; the seed decides a horizontal flip, like the real augmenting datasets."""

    def __init__(self, images: torch.Tensor, augment: bool = True):
        self.images, self.augment = images, augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, 0)
        img = self.images[index]
        if self.augment and seed % 2:
            img = img.flip(-1)
        return {"image": img.clone(), "seed": int(seed), "index": int(index), "label": 0}


@dataclass
class TinyData:
    train: Dataset
    val: Dataset
    channels: int
    img_size: tuple
    mean: list
    std: list
    report: object = field(default=None)


def tiny_data(n_train: int = 64, n_val: int = 16, size: int = 16) -> TinyData:
    x = real_images(n_train + n_val, size)
    mean, std = float(x.mean()), float(x.std())
    x = (x - mean) / std
    return TinyData(TinyImages(x[:n_train]), TinyImages(x[n_train:], augment=False), 1, (size, size), [mean], [std])


def tiny_config(out_dir, *overrides: str) -> PretrainConfig:
    base = [
        f"trainer.out_dir={out_dir}", "trainer.run_name=run", "trainer.accelerator=cpu", "trainer.devices=1",
        "trainer.progress=false", "trainer.log_every_steps=1", "data.num_workers=0", "data.img_size=16",
        "model.encoder=vit_tiny", "model.patch_size=4", "model.decoder=tiny",
        "optim.batch_size=8", "optim.lr=1e-3", "optim.max_steps=6", "optim.warmup_fraction=0.3",
        "eval.knn=false", "eval.visualize=false",
    ]
    return load_config(None, base + list(overrides))


def comparable(t: torch.Tensor, name: str) -> torch.Tensor:
    """Without the key third of qkv biases: its exact gradient is zero (softmax ignores a shift shared by all
    keys), so AdamW turns ~1e-10 rounding noise into lr-sized steps of random sign in any two runs that sum
    in a different order."""
    if name.endswith("attn.qkv.bias"):
        n = t.shape[0] // 3
        return torch.cat([t[:n], t[2 * n:]])
    return t


def worst_weight_gap(state: dict, ref: dict) -> float:
    """The largest elementwise difference between two state dicts of one model (see `comparable`)."""
    assert state.keys() == ref.keys()
    return max((comparable(state[k], k) - comparable(ref[k], k)).abs().max().item() for k in ref)


def reordering_floor(out_dir, single, *overrides: str) -> float:
    """How far float32 alone moves the weights: the single-process run `single` against the same run with
    its global batch summed in 4 accumulation steps. Nothing but the order of the gradient sums differs, and
    AdamW divides each gradient by its own running scale, so weights whose gradient is near zero move by up
    to ~1e-4 in a few steps (measured: 9.4e-5 for blocks.0.mlp.fc1 after 5 steps on Fashion-MNIST). A
    distributed run that sums in yet another order can only be held to this floor, not to a fixed 1e-5."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reordered = train(tiny_config(out_dir, "trainer.run_name=reordered", *overrides, "optim.accumulate=4"),
                          data=tiny_data())
    finally:
        torch.set_num_threads(n)
    return worst_weight_gap(reordered.method.state_dict(), single.method.state_dict())


class NonFiniteAt(MAE):
    """MAE whose training loss is passed through `spoil` (default: times NaN) at chosen optimizer steps;
    `nan_plan` {0-based step: how many more times} is plain Python state, untouched by a rollback (which
    reloads only the weights). Build one with `non_finite_method`."""

    nan_plan: dict
    step_now = -1

    @staticmethod
    def spoil(loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan")

    def begin_step(self, step, total_steps):
        super().begin_step(step, total_steps)
        self.step_now = step

    def forward(self, batch):
        out = super().forward(batch)
        if self.training and self.nan_plan.get(self.step_now, 0) > 0:
            self.nan_plan[self.step_now] -= 1
            out["loss"] = self.spoil(out["loss"])
        return out


def non_finite_method(cfg: PretrainConfig, nan_plan: dict | None = None, spoil=None):
    """The tiny MAE the trainer would build for `cfg` (same seed, 16x16 grey images), spoiled per `nan_plan`."""
    torch.manual_seed(cfg.trainer.seed)  # as the trainer seeds the methods it builds
    m = build_method(cfg, (16, 16), 1)
    if nan_plan is not None:
        m.__class__ = NonFiniteAt
        m.nan_plan = dict(nan_plan)
        if spoil is not None:
            m.spoil = spoil  # an instance attribute: called as a plain function
    return m
