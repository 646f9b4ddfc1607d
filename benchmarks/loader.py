"""Is the data pipeline the bottleneck? The DataLoader alone vs the training step alone, in images/s.

* loader: the recipe's training dataset (decode + augmentation + normalisation, the trainer's SeededSampler
  and default collate) through a DataLoader with `--workers` processes; the first batch (worker start-up) is
  timed separately, then images/s over the next `--batches` batches (epochs wrap around on small data).
* step: the recipe's method (build_method) + AdamW on one synthetic in-memory batch of the same shape
  (forward + backward + optimizer step; no data loading at all), the mean rate over `--steps` steps
  after `--warmup` steps.

ratio = loader images/s / step images/s: below 1 the GPU/CPU doing the step waits for data (raise
data.num_workers, use faster storage or shards, or smaller images); well above 1 the step is the limit.

    python benchmarks/loader.py --workers 2 --batch-size 64 --json loader_fmnist.json
    python benchmarks/loader.py --data-source shards --data-path SHARDS data.img_size=32 --json loader_shards.json

Any trailing key=value is a config override (as for `mimkit pretrain`); --config takes a YAML recipe.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch
from torch.utils.data import DataLoader
from torch.utils.data._utils.collate import default_collate


def measure_loader(dataset, batch_size: int, workers: int, batches: int, seed: int = 0) -> dict:
    from mimkit.data import SeededSampler

    sampler = SeededSampler(len(dataset), seed=seed, shuffle=True, drop_last=len(dataset) >= batch_size)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        persistent_workers=workers > 0, collate_fn=default_collate)
    epoch, images, t0 = 0, 0, time.perf_counter()
    first = None
    while True:
        sampler.set_epoch(epoch)
        for batch in loader:
            n = int(batch["image"].shape[0])
            if first is None:
                first = time.perf_counter() - t0
                t0 = time.perf_counter()
                continue
            images += n
            batches -= 1
            if batches <= 0:
                dt = time.perf_counter() - t0
                return {"images_per_s": images / dt, "images": images, "seconds": dt, "first_batch_s": first,
                        "workers": workers, "batch_size": batch_size, "dataset_len": len(dataset)}
        epoch += 1


def measure_step(cfg, img_size, channels: int, batch_size: int, steps: int, warmup: int, device: str) -> dict:
    from mimkit.engine.optim import build_optimizer, no_decay_names
    from mimkit.methods import build_method

    torch.manual_seed(0)
    method = build_method(cfg, tuple(img_size), channels).to(device).train()
    opt = build_optimizer(method, cfg.optim, no_decay_names(method))
    batch = {"image": torch.randn(batch_size, channels, *img_size, device=device),
             "seed": torch.arange(batch_size, dtype=torch.long), "index": torch.arange(batch_size),
             "label": torch.zeros(batch_size, dtype=torch.long)}

    def step():
        out = method(batch)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"images_per_s": steps * batch_size / dt, "steps": steps, "seconds": dt, "batch_size": batch_size,
            "device": device, "method": cfg.method.name, "encoder": cfg.model.encoder}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML recipe (default: the built-in Fashion-MNIST MAE recipe)")
    p.add_argument("--data-source", help="data.source override, e.g. folder or shards")
    p.add_argument("--data-path", help="data.path override")
    p.add_argument("--workers", type=int, help="DataLoader workers (default: data.num_workers)")
    p.add_argument("--batch-size", type=int, help="images per batch (default: optim.batch_size)")
    p.add_argument("--batches", type=int, default=20, help="timed loader batches (after the first)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="torch.set_num_threads for the step (and this process)")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from mimkit.config import load_config
    from mimkit.data import build_pretrain_data

    overrides = list(args.overrides)
    if args.data_source:
        overrides.append(f"data.source={args.data_source}")
    if args.data_path:
        overrides.append(f"data.path={args.data_path}")
    cfg = load_config(args.config, overrides)
    bs = args.batch_size or cfg.optim.batch_size
    workers = cfg.data.num_workers if args.workers is None else args.workers
    data = build_pretrain_data(cfg.data)
    loader = measure_loader(data.train, bs, workers, args.batches, seed=cfg.trainer.seed)
    step = measure_step(cfg, data.img_size, data.channels, bs, args.steps, args.warmup, args.device)
    ratio = loader["images_per_s"] / step["images_per_s"]
    verdict = ("the data pipeline is the bottleneck (the step waits for data)" if ratio < 1.0 else
               "the training step is the bottleneck (data arrives faster than it is consumed)")
    result = {"data_source": cfg.data.source, "data_path": cfg.data.path, "img_size": list(data.img_size),
              "channels": data.channels, "loader": loader, "step": step, "loader_over_step": ratio,
              "verdict": verdict, "torch": torch.__version__, "python": platform.python_version(),
              "threads": torch.get_num_threads()}
    print(f"data {cfg.data.source} ({len(data.train)} training images, {tuple(data.img_size)}, "
          f"{data.channels} ch), batch {bs}")
    print(f"loader alone: {loader['images_per_s']:.0f} images/s ({workers} workers; first batch "
          f"{loader['first_batch_s']:.2f} s)")
    print(f"step alone:   {step['images_per_s']:.0f} images/s ({cfg.method.name}, {cfg.model.encoder}, "
          f"{args.device})")
    print(f"loader/step = {ratio:.2f}: {verdict}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
