"""Fixed-mask validation: the mean MIM loss over the held-out split at every epoch end and at the end of the
run, with the same images, seeds and so masks every time (the val seeds are derived from trainer.seed only)."""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, default_collate

from mimkit import rng
from mimkit.data.sampler import SeededSampler
from mimkit.engine.callbacks.base import Callback

VAL_STREAM = 0x7A1D  # the validation masks' seed is rng.combine(trainer.seed, VAL_STREAM): fixed for the run


class Validation(Callback):
    engine_owned = True

    def __init__(self):
        self.loader = None
        self.val_loss, self.val_step = None, -1

    def on_fit_start(self, run) -> None:
        loop, cfg = run.engine, run.config
        self.val_loss = loop.last_metrics.get("val_loss")
        # a resumed finished run has nothing left to validate
        self.val_step = run.global_step if run.global_step >= run.total_steps else -1
        val = getattr(run.data, "val", None)
        if val is None or len(val) == 0:
            return
        self.sampler = SeededSampler(len(val), seed=rng.combine(cfg.trainer.seed, VAL_STREAM), shuffle=False,
                                     rank=run.fabric.global_rank, world_size=loop.world, drop_last=False)
        self.sampler.set_epoch(0)
        nw = cfg.data.num_workers
        pin = bool(cfg.data.pin_memory) and run.fabric.device.type == "cuda"
        # used once an epoch: no need to keep its workers alive
        self.loader = DataLoader(val, batch_size=loop.micro, sampler=self.sampler, drop_last=False, num_workers=nw,
                                 pin_memory=pin, persistent_workers=False, collate_fn=default_collate)

    def on_epoch_end(self, run, epoch: int) -> None:
        self.run_validation(run, float(epoch))

    def on_train_end(self, run) -> None:
        loop = run.engine
        if not loop.stopped_early and self.val_step != run.global_step:
            self.run_validation(run, loop.epoch + loop.position / loop.epoch_len)

    def run_validation(self, run, epoch: float) -> None:
        loop = run.engine
        val_loss = self.validate(run)
        self.val_step = run.global_step
        if val_loss is None:
            return
        self.val_loss = val_loss
        run.log({"val_loss": val_loss, "epoch": float(epoch)}, run.global_step)
        run.print(f"epoch {epoch:g} step {run.global_step}: val_loss {val_loss:.4f}")
        loop.callbacks.call("on_validation_end", run.global_step, val_loss)

    @torch.no_grad()
    def validate(self, run) -> float | None:
        """Mean MIM loss over the held-out split with fixed masks (val seeds at epoch 0, same every time)."""
        if self.loader is None:
            return None
        loop, fabric, model = run.engine, run.fabric, run.model
        self.sampler.set_epoch(0)
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=fabric.device)

        def add(batch, weight: float) -> None:
            out = model(batch)
            b = batch["image"].shape[0] * weight
            total.add_(torch.tensor([out["loss"].detach().double().item() * b, b], dtype=torch.float64,
                                    device=total.device))

        seen, last = 0, None
        for batch in self.loader:
            last = fabric.to_device(batch)
            add(last, 1.0)
            seen += 1
        if loop.is_fsdp:
            # FSDP needs every rank in every forward: ranks with fewer batches repeat one with weight 0
            most = math.ceil(math.ceil(len(run.data.val) / loop.world) / loop.micro)  # rank 0 has the most
            for _ in range(most - seen):
                add(last if last is not None else self._filler(run), 0.0)
        if loop.world > 1:
            total = fabric.all_reduce(total, reduce_op="sum")
        model.train()
        return float(total[0] / total[1]) if total[1] > 0 else None

    def _filler(self, run) -> dict:
        item = run.data.val[(0, rng.combine(run.config.trainer.seed, VAL_STREAM))]
        return run.fabric.to_device(default_collate([item]))
