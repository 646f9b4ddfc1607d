"""Activation checkpointing of the ViT encoder (model.grad_checkpointing / encoder.set_grad_checkpointing).

With it on, a training forward + backward gives the same loss and the same gradients as without, and the
blocks really run twice (once in the forward, once recomputed in the backward); in eval mode or under
no_grad they run once.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from mimkit.config import load_config
from mimkit.methods import METHODS, build_method
from mimkit.models import VisionTransformer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from engine_tiny import have_images, real_images  # noqa: E402

pytestmark = pytest.mark.skipif(not have_images(), reason="needs Fashion-MNIST or the foolbox sample images")


def _images(n: int = 8, size: int = 16) -> torch.Tensor:
    x = real_images(n, size)
    return (x - x.mean()) / x.std()


class BlockCalls:
    """Counts how often each block's MLP starts (a submodule: it runs again when the block is recomputed).
    With grad_only, runs under no_grad (CAE's alignment target reuses the encoder) are not counted: they are
    never checkpointed.

    A pre-hook: the recomputation stops as soon as the last activation the backward needs is rebuilt, which
    can be inside the MLP, so a forward hook on the MLP would not always fire."""

    def __init__(self, encoder, grad_only: bool = False):
        self.grad_only = grad_only
        self.counts = [0] * len(encoder.blocks)
        self.handles = [b.mlp.register_forward_pre_hook(self._hook(i)) for i, b in enumerate(encoder.blocks)]

    def _hook(self, i):
        def hook(*_):
            if torch.is_grad_enabled() or not self.grad_only:
                self.counts[i] += 1
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _method(name: str, ckpt: bool, *extra: str, size: int = 16):
    cfg = load_config(overrides=[f"method={name}", "model.depth=3", "model.decoder=tiny", "model.patch_size=4",
                                 f"model.grad_checkpointing={str(ckpt).lower()}", "data.mean=[0.286]",
                                 "data.std=[0.353]", *extra])
    torch.manual_seed(0)
    return build_method(cfg, (size, size), 1)


def _batch(images) -> dict:
    n = images.shape[0]
    return {"image": images, "seed": torch.arange(n), "label": torch.arange(n) % 10}


def _loss_and_grads(method, images):
    method.train()
    method.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # drop path draws from the global RNG
    out = method(_batch(images))
    out["loss"].backward()
    grads = {k: p.grad.clone() for k, p in method.named_parameters() if p.grad is not None}
    return out["loss"].detach(), grads


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_same_loss_and_gradients_and_blocks_recomputed(name, request):
    """drop_path > 0: the recomputation must replay the same random paths, or the gradients would differ."""
    from method_wiring import external_overrides

    from mimkit.config import method_config_class

    extra = external_overrides(name, request)
    if "num_codes" in method_config_class(name).model_fields:  # a k-means tokenizer fitted on these 8 images
        extra.append("method.num_codes=32")
    # methods reading a frozen run (teacher, tokenizer) use its 28x28 images: some need the same patch grid
    size = 28 if any(e.startswith(("method.tokenizer", "method.teacher", "method.mim_teacher")) for e in extra) else 16
    images = _images(size=size)
    plain = _method(name, False, "model.drop_path=0.2", *extra, size=size)
    ckpt = _method(name, True, "model.drop_path=0.2", *extra, size=size)
    assert not plain.encoder.grad_checkpointing and ckpt.encoder.grad_checkpointing  # from_config read it
    plain.prepare([{"image": img, "label": i % 10} for i, img in enumerate(images)], 0)  # k-means etc., copied below
    ckpt.load_state_dict(plain.state_dict())
    loss_a, grads_a = _loss_and_grads(plain, images)

    calls = BlockCalls(ckpt.encoder, grad_only=True)
    loss_b, grads_b = _loss_and_grads(ckpt, images)
    calls.remove()
    # the EMA teacher of HPM is a no-grad copy: never checkpointed, and not hooked here
    forwards = _block_forwards(plain, images)
    assert all(c == 2 * f for c, f in zip(calls.counts, forwards)), (calls.counts, forwards)
    assert min(forwards) >= 1  # every method runs every encoder block at least once

    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for k in grads_a:
        torch.testing.assert_close(grads_b[k], grads_a[k], rtol=1e-5, atol=1e-7, msg=k)


def _block_forwards(method, images) -> list[int]:
    """How often each encoder block runs in one training forward without checkpointing."""
    calls = BlockCalls(method.encoder, grad_only=True)
    torch.manual_seed(123)
    method.train()
    method(_batch(images))
    calls.remove()
    return calls.counts


def _encoder(ckpt: bool = False) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(16, 4, 1, embed_dim=32, depth=3, num_heads=2, drop_path_rate=0.1,
                             grad_checkpointing=ckpt)


PATHS = {
    "forward": lambda enc, x: enc(x),
    "forward_visible": lambda enc, x: enc(x, ids_keep=torch.tensor([[0, 3, 5, 9]] * x.shape[0])),
    "forward_tokens": lambda enc, x: enc.forward_tokens(enc.embed(x)),
    "run_blocks": lambda enc, x: torch.cat([enc.run_blocks(enc.embed(x), taps=(0, -1))[0],
                                            *enc.run_blocks(enc.embed(x), taps=(0, -1))[1].values()], 1),
    "forward_layers": lambda enc, x: torch.cat(enc.forward_layers(x, [0, 2]), 1),
}


@pytest.mark.parametrize("path", list(PATHS))
def test_every_encoder_path_is_checkpointed_and_exact(path):
    fn, images = PATHS[path], _images(4)
    plain, ckpt = _encoder(False), _encoder(False)
    ckpt.set_grad_checkpointing(True)  # on an existing encoder, timm's name
    assert ckpt.grad_checkpointing and all(b.grad_checkpointing for b in ckpt.blocks)

    results = []
    for enc in (plain, ckpt):
        enc.train()
        calls = BlockCalls(enc)
        torch.manual_seed(7)
        out = fn(enc, images)
        after_forward = list(calls.counts)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        calls.remove()
        grads = {k: p.grad.clone() for k, p in enc.named_parameters() if p.grad is not None}
        results.append((out.detach(), grads, after_forward, calls.counts))

    (out_a, grads_a, fwd_a, all_a), (out_b, grads_b, fwd_b, all_b) = results
    assert fwd_a == fwd_b and min(fwd_a) >= 1  # the forward itself runs each block as often
    assert all_a == fwd_a  # no recomputation without checkpointing
    assert all_b == [2 * c for c in fwd_b]  # each block recomputed once in the backward
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=0)
    assert grads_a.keys() == grads_b.keys()
    for k in grads_a:
        torch.testing.assert_close(grads_b[k], grads_a[k], rtol=1e-5, atol=1e-7, msg=k)


def test_no_recomputation_in_eval_mode_or_without_grad():
    enc, images = _encoder(True), _images(2)
    calls = BlockCalls(enc)
    with torch.no_grad():
        enc.train()(images)
    assert calls.counts == [1, 1, 1]
    enc.eval()
    out = enc(images)  # eval mode with grad enabled: no checkpoint, plain autograd graph
    out.sum().backward()
    assert calls.counts == [2, 2, 2]
    calls.remove()


def test_switching_off_and_state_dict_unchanged():
    enc = _encoder(True)
    plain = _encoder(False)
    assert list(enc.state_dict()) == list(plain.state_dict())  # timm's parameter names either way
    enc.set_grad_checkpointing(False)
    assert not enc.grad_checkpointing
    enc.grad_checkpointing = True  # attribute form
    assert all(b.grad_checkpointing for b in enc.blocks)
    cfg = load_config(overrides=["model.depth=2", "model.grad_checkpointing=true"])
    assert VisionTransformer.from_config(cfg.model, 16, 1).grad_checkpointing
    assert not VisionTransformer.from_config(cfg.model.model_copy(update={"grad_checkpointing": False}), 16, 1) \
        .grad_checkpointing


@pytest.mark.slow
def test_engine_run_with_compile_and_grad_checkpointing(tmp_path):
    """trainer.compile=true (with activation checkpointing): the run is really compiled, trains like the eager
    run, and its checkpoint keys carry no `_orig_mod.` prefix. Compiling takes over a minute on a CPU: slow."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from engine_tiny import tiny_config, tiny_data
    from mimkit.engine import load_checkpoint, train

    common = ["optim.max_steps=2", "model.depth=2", "model.grad_checkpointing=true"]
    torch._dynamo.reset()
    counters.clear()
    compiled = train(tiny_config(tmp_path, "trainer.run_name=compiled", "trainer.compile=true", *common),
                     data=tiny_data())
    assert counters["stats"]["unique_graphs"] >= 1  # trainer.compile was acted on
    assert not counters["graph_break"], dict(counters["graph_break"])  # checkpointed blocks compile whole
    eager = train(tiny_config(tmp_path, "trainer.run_name=eager", *common), data=tiny_data())
    assert compiled.method.encoder.grad_checkpointing
    keys = list(load_checkpoint(compiled.checkpoint)["model"])
    assert keys == list(eager.method.state_dict()) and not any("_orig_mod" in k for k in keys)
    torch.testing.assert_close(torch.tensor([h["loss"] for h in compiled.history]),
                               torch.tensor([h["loss"] for h in eager.history]), rtol=1e-4, atol=1e-5)
    assert abs(compiled.metrics["val_loss"] - eager.metrics["val_loss"]) < 1e-4
