"""Two CPU processes (gloo, launched by torchrun) against one process: sharded kNN feature extraction, and a
checkpoint written by a 2-process run resumed under 2 processes and under 1 process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddp_eval_worker import N_BANK, QUERY_LIMIT, eval_encoder, eval_sets
from engine_tiny import have_images, tiny_config, tiny_data, worst_weight_gap
from mimkit.engine import train
from mimkit.eval import extract_features, extract_layer_features, knn_classify

pytestmark = pytest.mark.skipif(not have_images(), reason="needs Fashion-MNIST or the foolbox sample images")

HERE = Path(__file__).resolve().parent


def _torchrun(*args: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(HERE.parents[1] / "src"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(HERE / "ddp_eval_worker.py"), *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


class one_thread:
    """The in-process reference runs on one thread while the two workers use the other core."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


def test_sharded_feature_extraction_matches_one_process(tmp_path):
    proc = _torchrun("features", str(tmp_path / "feats"))
    with one_thread():
        encoder = eval_encoder()
        bank, queries = eval_sets()
        xb, yb = extract_features(encoder, bank, batch_size=8)
        xq, yq = extract_features(encoder, queries, batch_size=8, limit=QUERY_LIMIT)
        layers, ly = extract_layer_features(encoder, queries, [0, -1], pool="mean", batch_size=8)
        pred = knn_classify(xb, yb, xq, k=5, temperature=0.07, num_classes=10)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-4000:]

    ranks = [torch.load(tmp_path / f"feats.rank{r}.pt", weights_only=True) for r in (0, 1)]
    n_query = len(queries)
    # each rank encoded only its share (images r, r + 2, ...): 34 + 33 bank, 16 + 15 queries, 17 + 16 layers
    shares = [len(range(r, N_BANK, 2)) + len(range(r, QUERY_LIMIT, 2)) + len(range(r, n_query, 2)) for r in (0, 1)]
    assert [r["seen"] for r in ranks] == shares and sum(shares) == N_BANK + QUERY_LIMIT + n_query
    for r in ranks:
        assert r["world"] == 2
        # every rank gets every feature back, in data order, with its label
        assert torch.equal(r["bank"][1], yb) and torch.equal(r["queries"][1], yq) and torch.equal(r["layers"][1], ly)
        assert r["bank"][0].shape == xb.shape == (N_BANK, 192) and r["queries"][0].shape == (QUERY_LIMIT, 192)
        torch.testing.assert_close(r["bank"][0], xb, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["queries"][0], xq, rtol=1e-5, atol=1e-5)
        assert len(r["layers"][0]) == 2
        for a, b in zip(r["layers"][0], layers):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert torch.equal(r["pred"], pred)  # the same kNN predictions, hence the same accuracy
    assert len(set(yb.tolist())) > 3  # real labels, not a constant


STEPS = ["optim.max_steps=10", "optim.clip_grad=1000"]  # 8 steps an epoch: the resumed part crosses epoch 1


def test_checkpoint_from_two_processes_resumes_exactly_under_two_and_one(tmp_path):
    proc = _torchrun("resume", str(tmp_path), str(tmp_path / "ddp.pt"), "6", *STEPS)
    with one_thread():  # the uninterrupted one-process reference, while the workers run
        single = train(tiny_config(tmp_path, "trainer.run_name=single", *STEPS), data=tiny_data())
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-4000:]
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert ddp["world"] == 2 and ddp["stopped"]
    # the 2-process checkpoint: 6 steps of 8 images into epoch 0
    assert ddp["progress_at_stop"]["global_step"] == 6 and ddp["progress_at_stop"]["position"] == 48

    with one_thread():  # the same 2-process checkpoint, resumed by a single process
        one = train(tiny_config(tmp_path, "trainer.run_name=ddp_stop", *STEPS), resume=str(tmp_path / "ddp_stop"),
                    data=tiny_data())
    assert single.metrics["global_step"] == ddp["metrics"]["global_step"] == one.metrics["global_step"] == 10

    ref = torch.tensor([h["loss"] for h in single.history])
    two_two = torch.tensor([h["loss"] for h in ddp["history"]])
    two_one = torch.tensor([h["loss"] for h in one.history])
    assert [h["step"] for h in ddp["history"]] == list(range(1, 11))
    assert [h["step"] for h in one.history] == list(range(7, 11))
    torch.testing.assert_close(two_two, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(two_one, ref[6:], rtol=0, atol=1e-5)
    assert [h["lr"] for h in one.history] == [h["lr"] for h in single.history][6:]

    want = single.method.state_dict()
    assert worst_weight_gap(ddp["state"], want) < 1e-5
    assert worst_weight_gap(one.method.state_dict(), want) < 1e-5
    assert abs(ddp["metrics"]["val_loss"] - single.metrics["val_loss"]) < 1e-5
    assert abs(one.metrics["val_loss"] - single.metrics["val_loss"]) < 1e-5
