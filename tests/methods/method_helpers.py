"""Real images and a short training loop for the method tests (imported as `from method_helpers import ...`).

Fashion-MNIST (grey, 28x28) from the Debian package and the foolbox CIFAR-10 samples (RGB, 32x32); a test
is skipped with the reason when its images are missing.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from mimkit.config import load_config
from mimkit.methods import build_method

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
FOOLBOX = Path(__file__).resolve().parents[2] / ".data" / "foolbox" / "foolbox" / "data"


def fashion_mnist(n: int) -> torch.Tensor:
    """The first n Fashion-MNIST training images, [n, 1, 28, 28], roughly standardised."""
    if not FMNIST.exists():
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    with gzip.open(FMNIST) as fh:
        raw = np.frombuffer(fh.read(), np.uint8, offset=16)
    x = torch.from_numpy(raw[: n * 784].copy()).float().view(n, 1, 28, 28) / 255
    return (x - 0.286) / 0.353


def cifar_samples(n: int = 20) -> torch.Tensor:
    """Up to 20 real CIFAR-10 images from the foolbox wheel, [n, 3, 32, 32], roughly standardised."""
    from PIL import Image

    files = sorted(FOOLBOX.glob("cifar10_*.png"))
    if not files:
        pytest.skip(f"foolbox sample images not found in {FOOLBOX}: run `make test-data`")
    imgs = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files[:n]])
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
    return (x - 0.45) / 0.25


def small_method(name: str, size, channels: int, *overrides: str, depth: int = 4):
    """A method on a shallow ViT-Tiny with the tiny decoder: seconds per test on a CPU."""
    img = size if isinstance(size, int) else list(size)  # the config's image size, which the patch must tile
    cfg = load_config(overrides=[f"method={name}", f"model.depth={depth}", "model.decoder=tiny", f"data.img_size={img}",
                                 *overrides])
    return build_method(cfg, size, channels)


def with_views(batch: dict, specs) -> dict:
    """Add batch["views"] as the loader would (data.views.MultiViewTransform, one view per ViewSpec, seeded by
    batch["seed"]) to a batch of already-normalised images: they are mapped to [0, 1] by the batch's range,
    augmented, and mapped back, so the views live in the images' space. View 0 replaces batch["image"]."""
    from mimkit.data.views import MultiViewTransform

    images = batch["image"]
    lo, hi = float(images.min()), float(images.max())
    span = max(hi - lo, 1e-6)
    c = images.shape[1]
    tf = MultiViewTransform(tuple(images.shape[-2:]), specs, mean=[-lo / span] * c, std=[1 / span] * c)
    items = [tf(((img - lo) / span).clamp(0, 1), int(s)) for img, s in zip(images, batch["seed"])]
    views = [torch.stack([it["views"][k] for it in items]) for k in range(len(specs))]
    return {**batch, "image": views[0], "views": views}


def train_metrics(method, images: torch.Tensor, steps: int = 30, lr: float = 1e-3, batch_size: int = 32,
                  seed: int = 0, view_specs=None) -> list[dict[str, float]]:
    """Train `method` for `steps` AdamW steps on minibatches of `images` (fresh per-image seeds each step,
    calling the engine's step hooks) and return every step's metrics (the method's output dict as floats).
    With `view_specs` (what the method's `view_specs(cfg)` gives) each batch carries augmented views as the
    loader's would."""
    torch.manual_seed(seed)
    method.train()
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for step in range(steps):
        idx = torch.randperm(len(images), generator=g)[:batch_size]
        batch = {"image": images[idx], "seed": idx + step * len(images)}
        if view_specs:
            batch = with_views(batch, view_specs)
        method.begin_step(step, steps)
        out = method(batch)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        method.end_step(step, steps)
        rows.append({k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in out.items()})
    return rows


def train_losses(method, images: torch.Tensor, steps: int = 30, lr: float = 1e-3, batch_size: int = 32,
                 seed: int = 0, view_specs=None) -> list[float]:
    """The losses of `train_metrics`."""
    return [r["loss"] for r in train_metrics(method, images, steps, lr, batch_size, seed, view_specs)]


def falls(losses: list[float], window: int = 5, factor: float = 0.9) -> bool:
    """The mean of the last `window` losses is below `factor` times the mean of the first `window`."""
    first, last = np.mean(losses[:window]), np.mean(losses[-window:])
    return bool(last < factor * first)
