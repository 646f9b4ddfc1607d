"""Reconstruction snapshots: <run_dir>/recon/step_NNNNNN.png every `eval.recon_every_epochs` epochs, on rank 0
(not under FSDP), of one fixed batch (the first held-out images with fixed seeds, so the pictures compare)."""

from __future__ import annotations

from mimkit.engine.callbacks.base import Callback


class Reconstructions(Callback):
    engine_owned = True

    def __init__(self):
        self.batch = None
        self.off = False

    def on_epoch_end(self, run, epoch: int) -> None:
        every = getattr(run.config.eval, "recon_every_epochs", 0)
        if not every or epoch % every or not run.is_global_zero or run.engine.is_fsdp or self.off:
            return
        try:
            from mimkit.data import fixed_batch
            from mimkit.viz import save_reconstruction_grid

            if self.batch is None:
                val = getattr(run.data, "val", None)
                ds = val if val is not None and len(val) > 0 else run.data.train
                self.batch = fixed_batch(ds, run.config.eval.num_images)
            path = run.run_dir / "recon" / f"step_{run.global_step:06d}.png"
            save_reconstruction_grid(run.method, self.batch, path, run.data.mean, run.data.std, max_images=None)
        except Exception as err:  # pictures are informative only; never fail a run on them
            self.off = True
            run.print(f"warning: no more reconstruction pictures this run: {type(err).__name__}: {err}")
