"""Online probe: kNN and linear-probe accuracy of the encoder every `eval.online_probe_every_steps` steps.

Settings: eval.online_probe_every_steps (None: off), eval.online_probe_images, eval.pool; arguments given to
the constructor take their place (a user's own OnlineProbe in `train(callbacks=[...])`).
The probe images are a fixed seeded subset of the run's held-out validation split (see mimkit.eval.online),
so the training images' order, the masks and the weights are untouched: the loop isolates this hook's RNG
and train/eval mode, and the probe itself only runs forward passes under no_grad. The accuracies are logged
(metrics.csv, TensorBoard, ... as online_knn / online_linear), drawn by `mimkit report`, and their history is
kept in last.ckpt so a resumed run's curve continues where it stopped. Rank 0 only (not under FSDP, whose
sharded weights need every rank: there the probe is off with a note).
"""

from __future__ import annotations

from mimkit.engine.callbacks.base import Callback


class OnlineProbe(Callback):
    # not engine-owned: the loop runs it under isolated_rng (the linear probe seeds its own draws)

    def __init__(self, every_steps: int | None = None, num_images: int | None = None, pool: str | None = None,
                 seed: int = 0):
        self.every_steps, self.num_images, self.pool, self.seed = every_steps, num_images, pool, seed
        self.probes = None
        self.history: list[dict] = []
        self.off = False

    def _every(self, run) -> int | None:
        return self.every_steps or getattr(run.config.eval, "online_probe_every_steps", None)

    def _probe(self, run) -> None:
        from mimkit.eval.online import ProbeSet, probe_encoder

        if self.off or not run.is_global_zero or not self._every(run):
            return
        if run.engine.is_fsdp:
            self.off = True
            run.print("note: the online probe is off under FSDP (sharded weights)")
            return
        if any(h["step"] == run.global_step for h in self.history):
            return
        ev = run.config.eval
        if self.probes is None:
            self.probes = ProbeSet.from_dataset(run.data.val, self.num_images or ev.online_probe_images, self.seed)
        # the encoder runs under no_grad inside (feature extraction); only the small probe heads train
        result = probe_encoder(run.method.encoder, self.probes, pool=self.pool or ev.pool, seed=self.seed)
        row = {"step": run.global_step, **result}
        self.history.append(row)
        run.log({k: v for k, v in row.items() if k != "step"}, step=run.global_step)

    def on_fit_start(self, run) -> None:
        if run.global_step == 0:
            self._probe(run)  # the untrained encoder: each run's curve starts at its own random-init floor

    def on_train_batch_end(self, run, step: int, metrics: dict) -> None:
        every = self._every(run)
        if every and (step % every == 0 or step == run.total_steps):
            self._probe(run)

    def state_dict(self) -> dict:
        return {"history": list(self.history)} if self.history else {}

    def load_state_dict(self, state: dict) -> None:
        self.history = [dict(h) for h in state.get("history", [])]
