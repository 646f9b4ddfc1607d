"""The callback API: hooks in order, state kept in last.ckpt and restored on resume, logging through the run's
loggers, and a callback that runs the encoder (and draws random numbers) every step leaves the run unchanged."""

from __future__ import annotations

import random

import pytest
import torch

from engine_tiny import have_images, tiny_config, tiny_data
from mimkit.engine import Callback, train
from mimkit.engine import checkpoint as ckpt_io
from mimkit.engine.metrics import read_metrics

pytestmark = pytest.mark.skipif(not have_images(), reason="needs Fashion-MNIST or the foolbox sample images")

COMMON = ["model.depth=1", "optim.max_steps=12", "model.drop_path=0.1", "trainer.checkpoint_every_steps=4"]



class EncoderProbe(Callback):
    """Every step: the encoder on a fixed held-out batch in eval mode under no_grad, plus careless draws from
    every global RNG and the model left in eval mode, as a sloppy online probe would do."""

    def __init__(self):
        self.features: list[float] = []

    def on_train_batch_end(self, run, step, metrics):
        images = torch.stack([run.data.val[(i, 0)]["image"] for i in range(4)])
        run.method.eval()
        with torch.no_grad():
            feats = run.method.encoder(images)
        torch.rand(3), random.random()  # global RNG draws: isolated by the loop
        self.features.append(float(feats.float().mean()))
        run.log({"probe_mean": self.features[-1]}, step)

    def state_dict(self):
        return {"features": list(self.features)}

    def load_state_dict(self, state):
        self.features = list(state["features"])


def test_a_callback_running_the_encoder_every_step_does_not_change_the_run(tmp_path):
    plain = train(tiny_config(tmp_path, "trainer.run_name=plain", *COMMON), data=tiny_data())
    probe = EncoderProbe()
    probed = train(tiny_config(tmp_path, "trainer.run_name=probed", *COMMON), data=tiny_data(), callbacks=[probe])
    a, b = plain.method.state_dict(), probed.method.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in plain.history] == [h["loss"] for h in probed.history]
    assert len(probe.features) == 12 and len(set(probe.features)) > 1  # it saw the weights change
    rows = read_metrics(probed.run_dir / "metrics.csv")
    assert [r["step"] for r in rows if "probe_mean" in r] == list(range(1, 13))


class Recorder(Callback):
    def __init__(self):
        self.calls: list[tuple] = []
        self.count = 0

    def on_fit_start(self, run):
        self.calls.append(("fit_start", run.global_step))

    def on_train_batch_end(self, run, step, metrics):
        assert step == run.global_step and {"loss", "lr"} <= metrics.keys()
        self.count += 1
        self.calls.append(("batch", step))

    def on_validation_end(self, run, step, val_loss):
        self.calls.append(("val", step))

    def on_epoch_end(self, run, epoch):
        assert epoch == run.epoch
        self.calls.append(("epoch", epoch))

    def on_fit_end(self, run, metrics):
        self.calls.append(("fit_end", metrics["global_step"]))

    def on_save_checkpoint(self, run, checkpoint):
        checkpoint["recorder_step"] = run.global_step

    def on_load_checkpoint(self, run, checkpoint):
        self.calls.append(("load", checkpoint["recorder_step"]))

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


def test_hooks_come_in_order_and_callback_state_survives_a_resume(tmp_path):
    rec = Recorder()
    full = train(tiny_config(tmp_path, "trainer.run_name=full", *COMMON), data=tiny_data(), callbacks=[rec])
    # 8 steps per epoch: validation and the epoch end after step 8; the final validation after step 12
    assert rec.calls == ([("fit_start", 0)] + [("batch", s) for s in range(1, 9)] + [("val", 8), ("epoch", 1)]
                         + [("batch", s) for s in range(9, 13)] + [("val", 12), ("fit_end", 12)])
    ckpt = ckpt_io.load_checkpoint(full.checkpoint)
    assert ckpt["callbacks"]["Recorder"] == {"count": 12} and ckpt["recorder_step"] == 12

    first = Recorder()
    train(tiny_config(tmp_path, "trainer.run_name=part", *COMMON, "trainer.stop_after_steps=5"), data=tiny_data(),
          callbacks=[first])
    assert first.count == 5
    second = Recorder()
    resumed = train(tiny_config(tmp_path, "trainer.run_name=part", *COMMON), resume="auto", data=tiny_data(),
                    callbacks=[second])
    assert second.calls[:2] == [("load", 5), ("fit_start", 5)] and second.count == 12
    assert all(torch.equal(a, b) for a, b in zip(full.method.state_dict().values(),
                                                 resumed.method.state_dict().values()))


def test_callbacks_must_be_callbacks_with_distinct_state_keys(tmp_path):
    with pytest.raises(TypeError, match="Callback instances"):
        train(tiny_config(tmp_path, *COMMON), data=tiny_data(), callbacks=[object()])
    with pytest.raises(ValueError, match="state key 'Recorder'"):
        train(tiny_config(tmp_path, "trainer.run_name=dup", *COMMON), data=tiny_data(),
              callbacks=[Recorder(), Recorder()])
