"""A run of a method with an EMA teacher, centres and augmented views resumes exactly: the teacher, its
schedule position, iBOT's centres and LUT's BatchNorm statistics continue as if never stopped."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mimkit.config import load_config
from mimkit.engine import train

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def _cfg(tmp_path, name, method, *extra):
    return load_config(None, [
        f"method={method}", f"trainer.out_dir={tmp_path}", f"trainer.run_name={name}", "trainer.accelerator=cpu",
        "trainer.progress=false", "trainer.log_every_steps=1", "data.num_workers=0", "data.limit=48",
        "data.val_fraction=0.1", "data.stats_samples=16", "model.depth=2", "model.decoder=tiny",
        "model.decoder_depth=1", "optim.batch_size=8", "optim.max_steps=7", "eval.knn=false",
        "eval.visualize=false", *extra])


@pytest.mark.parametrize("method, extra", [("ibot", []), ("lut", []), ("ibot", ["method.local_crops_number=2"])],
                         ids=["ibot", "lut", "ibot-local-crops"])
def test_teacher_method_resumes_bit_for_bit(tmp_path, method, extra):
    if not FMNIST.exists():
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    torch.set_num_threads(1)
    full = train(_cfg(tmp_path, "full", method, *extra))
    part = train(_cfg(tmp_path, "part", method, *extra, "trainer.stop_after_steps=3"))
    resumed = train(_cfg(tmp_path, "part", method, *extra), resume="auto")
    assert [h["loss"] for h in part.history] + [h["loss"] for h in resumed.history] == \
        [h["loss"] for h in full.history]
    a, b = full.method.state_dict(), resumed.method.state_dict()
    teacher = [k for k in a if k.startswith("teacher.")]
    assert teacher and all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    # the teacher really moved during the run (it is not just the initial copy being compared)
    student = {k[len("teacher.module."):]: v for k, v in a.items() if k.startswith("teacher.module.")}
    assert any(not torch.equal(v, a[k]) for k, v in student.items() if k in a and v.is_floating_point())


@pytest.mark.parametrize("method", ["ccvit", "vqkd"])
def test_tokenizer_methods_resume_bit_for_bit(tmp_path, method, request, monkeypatch):
    """CCViT's k-means tokenizer is fitted once (Method.prepare) and comes back from the checkpoint on resume;
    VQ-KD's codebook (k-means initialised on the first batch, then EMA) and its usage window continue exactly."""
    if not FMNIST.exists():
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    torch.set_num_threads(1)
    extra = ["method.num_codes=32"]
    if method == "ccvit":
        extra += ["method.kmeans_images=32", "method.kmeans_iters=5"]
    else:
        extra += [f"method.teacher.source={request.getfixturevalue('teacher_checkpoint')}"]
    from mimkit.methods import method_class

    cls = method_class(method)
    calls = []
    original = cls.prepare
    monkeypatch.setattr(cls, "prepare", lambda self, dataset, seed: (calls.append(seed), original(self, dataset, seed)))
    full = train(_cfg(tmp_path, "full", method, *extra))
    part = train(_cfg(tmp_path, "part", method, "trainer.stop_after_steps=3", *extra))
    assert len(calls) == 2
    resumed = train(_cfg(tmp_path, "part", method, *extra), resume="auto")
    assert len(calls) == 2  # not refitted on resume
    assert [h["loss"] for h in part.history] + [h["loss"] for h in resumed.history] == \
        [h["loss"] for h in full.history]
    a, b = full.method.state_dict(), resumed.method.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
