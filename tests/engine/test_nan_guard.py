"""The NaN guard checks more than the loss: gradients, the gradient norm with clipping, and the weights after
the update; a checkpoint never holds non-finite values, and a rollback recovers (issue 16 items 1, 2, 6)."""

from __future__ import annotations

import re

import pytest
import torch

from engine_tiny import have_images, non_finite_method, tiny_config, tiny_data
from mimkit.engine import TrainingDiverged, train
from mimkit.engine import checkpoint as ckpt_io

pytestmark = pytest.mark.skipif(not have_images(), reason="needs Fashion-MNIST or the foolbox sample images")
COMMON = ["model.depth=1", "optim.max_steps=12", "trainer.checkpoint_every_steps=2"]



def _nonfinite(ckpt: dict) -> list[str]:
    bad = [k for k, v in ckpt["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    for i, state in ckpt["optimizer"]["state"].items():
        bad += [f"optimizer.{i}.{k}" for k, v in state.items()
                if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    return bad


def test_a_huge_lr_never_checkpoints_nonfinite_weights(tmp_path):
    """The issue's repro: the loss stays finite while the update is not; before, last.ckpt held NaN weights."""
    cfg = tiny_config(tmp_path, *COMMON, "optim.lr=1e6", "optim.clip_grad=null", "trainer.nan_retries=2")
    with pytest.raises(TrainingDiverged, match=r"non-finite|NaN/inf"):
        train(cfg, data=tiny_data())
    ckpt = ckpt_io.load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert _nonfinite(ckpt) == []
    assert ckpt["nan_guard"]["rollbacks"] == 2


def test_rollback_recovers_from_a_nonfinite_update(tmp_path):
    cfg = tiny_config(tmp_path, *COMMON, "optim.lr=1e6", "optim.clip_grad=null", "trainer.nan_retries=3",
                      "trainer.nan_lr_factor=1e-4")
    res = train(cfg, data=tiny_data())
    assert res.metrics["global_step"] == 12 and res.metrics["nan_rollbacks"] >= 1
    assert all(torch.isfinite(p).all() for p in res.method.parameters())
    assert _nonfinite(ckpt_io.load_checkpoint(res.checkpoint)) == []


class _InfGradient(torch.autograd.Function):
    """Identity forward; backward makes the gradient infinite (a finite loss with a non-finite gradient)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def _method(cfg, bad_steps):
    return non_finite_method(cfg, bad_steps, spoil=_InfGradient.apply)


@pytest.mark.parametrize("clip", ["1.0", "null"])
def test_a_nonfinite_gradient_norm_takes_the_divergence_path(tmp_path, clip):
    """With optim.clip_grad set, Fabric's 'non-finite ... cannot be clipped' RuntimeError escaped nan_retries."""
    cfg = tiny_config(tmp_path, *COMMON, f"optim.clip_grad={clip}", "trainer.run_name=stop")
    with pytest.raises(TrainingDiverged, match="at optimizer step 4") as err:
        train(cfg, data=tiny_data(), method=_method(cfg, {3: 1}))
    expected = r"gradient norm is (inf|nan)" if clip == "1.0" else "gradients hold NaN/inf"
    assert re.search(expected, str(err.value))
    cfg = tiny_config(tmp_path, *COMMON, f"optim.clip_grad={clip}", "trainer.run_name=retry", "trainer.nan_retries=1")
    res = train(cfg, data=tiny_data(), method=_method(cfg, {3: 1}))
    assert res.metrics["global_step"] == 12 and res.metrics["nan_rollbacks"] == 1
    assert [h["step"] for h in res.history] == list(range(1, 13))


def test_the_divergence_message_is_printed_once(tmp_path, capsys):
    from mimkit.cli import main

    code = main(["pretrain", "optim.max_steps=6", "optim.batch_size=8", "data.limit=64", "data.num_workers=0",
                 "data.stats_samples=16", "data.img_size=16", "model.depth=1", "optim.lr=1e6", "eval.knn=false",
                 "eval.visualize=false", "trainer.progress=false", f"trainer.out_dir={tmp_path}",
                 "trainer.run_name=nan"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("at optimizer step") == 1, err
