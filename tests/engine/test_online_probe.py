"""The online probe: fixed held-out probe images, kNN + linear accuracies logged during pretraining and kept
across a resume, and a probed run bit-for-bit the same as the unprobed one."""

from __future__ import annotations

import pytest
import torch

from engine_tiny import have_images, tiny_config, tiny_data
from mimkit.engine import train
from mimkit.engine.callbacks.online_probe import OnlineProbe
from mimkit.engine.metrics import read_metrics
from mimkit.eval.online import ProbeSet, probe_encoder

pytestmark = pytest.mark.skipif(not have_images(), reason="needs Fashion-MNIST or the foolbox sample images")

COMMON = ["model.depth=1", "optim.max_steps=8", "trainer.checkpoint_every_steps=4"]


class LabelledVal(torch.utils.data.Dataset):
    """The tiny data's validation images with two made-up classes (bright vs dark images), so the probe has
    something to separate."""

    def __init__(self, base):
        self.base = base
        means = torch.stack([base[(i, 0)]["image"].mean() for i in range(len(base))])
        self.labels = (means > means.median()).long()

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        i = key[0] if isinstance(key, tuple) else key
        return {**self.base[(i, 0)], "label": int(self.labels[i])}


def _data():
    d = tiny_data()
    d.val = LabelledVal(d.val)
    return d



def test_probe_set_is_fixed_by_its_seed_and_split_in_two_halves():
    val = _data().val
    a, b, c = ProbeSet.from_dataset(val, 10, seed=1), ProbeSet.from_dataset(val, 10, seed=1), ProbeSet.from_dataset(val, 10, seed=2)
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels, b.test_labels)
    assert not torch.equal(torch.cat([a.train_images, a.test_images]), torch.cat([c.train_images, c.test_images]))
    assert a.train_images.shape[0] == 5 and a.test_images.shape[0] == 5


def test_probe_knn_matches_an_independent_nearest_neighbour_count():
    """With k=1 the weighted kNN is the label of the nearest (cosine) probe-train image: recomputed here."""
    probes = ProbeSet.from_dataset(_data().val, 16, seed=0)
    flat = torch.nn.Flatten()

    class Pixels(torch.nn.Module):
        def forward(self, x):
            return flat(x)[:, None, :].repeat(1, 2, 1)  # [B, 1 + N, D]: cls = mean = the pixels

    res = probe_encoder(Pixels(), probes, knn_k=1)
    a = torch.nn.functional.normalize(flat(probes.train_images), dim=1)
    b = torch.nn.functional.normalize(flat(probes.test_images), dim=1)
    nearest = (b @ a.T).argmax(1)
    expected = (probes.train_labels[nearest] == probes.test_labels).float().mean()
    assert res["online_knn"] == pytest.approx(float(expected))
    assert 0.0 <= res["online_linear"] <= 1.0


def test_unlabelled_validation_images_are_refused_with_the_setting_to_change():
    base = tiny_data().val
    unlabelled = [{**base[(i, 0)], "label": -1} for i in range(len(base))]  # the data layer's "no label"
    with pytest.raises(ValueError, match="online_probe_every_steps"):
        ProbeSet.from_dataset(unlabelled, 8)


def test_the_probed_run_is_bit_for_bit_the_unprobed_run_and_logs_its_curve(tmp_path):
    plain = train(tiny_config(tmp_path, "trainer.run_name=plain", *COMMON), data=_data())
    probe = OnlineProbe(every_steps=4, num_images=16)
    probed = train(tiny_config(tmp_path, "trainer.run_name=probed", *COMMON), data=_data(), callbacks=[probe])
    a, b = plain.method.state_dict(), probed.method.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in plain.history] == [h["loss"] for h in probed.history]
    assert [h["step"] for h in probe.history] == [0, 4, 8]
    rows = [r for r in read_metrics(probed.run_dir / "metrics.csv") if "online_knn" in r]
    assert [r["step"] for r in rows] == [0, 4, 8]


def test_a_resumed_run_keeps_the_probe_history(tmp_path):
    first = OnlineProbe(every_steps=2, num_images=16)
    cfg = tiny_config(tmp_path, "trainer.run_name=r", *COMMON, "trainer.stop_after_steps=4")
    train(cfg, data=_data(), callbacks=[first])
    assert [h["step"] for h in first.history] == [0, 2, 4]
    second = OnlineProbe(every_steps=2, num_images=16)
    done = train(tiny_config(tmp_path, "trainer.run_name=r", *COMMON), resume=tmp_path / "r", data=_data(),
                 callbacks=[second])
    assert [h["step"] for h in second.history] == [0, 2, 4, 6, 8]
    assert second.history[:3] == first.history
    assert done.metrics["global_step"] == 8


def test_the_probe_runs_from_the_config_alone(tmp_path):
    cfg = tiny_config(tmp_path, "trainer.run_name=c", *COMMON, "eval.online_probe_every_steps=8",
                      "eval.online_probe_images=16")
    done = train(cfg, data=_data())
    rows = [r for r in read_metrics(done.run_dir / "metrics.csv") if "online_linear" in r]
    assert [r["step"] for r in rows] == [0, 8]
