"""AdamW parameter groups (no decay on biases, norms, tokens, pos_embed) and the warmup + cosine schedule."""

from __future__ import annotations

import math

import pytest

from mimkit.config import OptimConfig, PretrainConfig
from mimkit.engine.optim import (
    build_optimizer, lr_at, param_groups, set_weight_decay, warmup_steps, weight_decay_at,
)
from mimkit.methods import build_method


def _mae():
    cfg = PretrainConfig.model_validate({"model": {"encoder": "vit_tiny", "patch_size": 4, "decoder": "tiny"}})
    return build_method(cfg, (16, 16), 1)


def test_param_groups_exclude_biases_norms_and_tokens():
    method = _mae()
    groups = param_groups(method, weight_decay=0.05)
    names = {id(p): n for n, p in method.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    plain = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert not decay & plain
    # every trainable parameter is in exactly one group; frozen pos_embeds in none
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    assert decay | plain == trainable
    assert "encoder.pos_embed" not in trainable and "decoder.pos_embed" not in trainable
    for must in ("encoder.cls_token", "decoder.mask_token", "encoder.norm.weight", "encoder.norm.bias",
                 "encoder.blocks.0.norm1.weight", "encoder.blocks.0.attn.qkv.bias", "decoder.pred.bias",
                 "encoder.patch_embed.proj.bias"):
        assert must in plain, must
    for must in ("encoder.blocks.0.attn.qkv.weight", "encoder.patch_embed.proj.weight", "decoder.embed.weight",
                 "decoder.pred.weight", "encoder.blocks.11.mlp.fc2.weight"):
        assert must in decay, must
    assert all(method.get_parameter(n).ndim >= 2 for n in decay)


def test_optimizer_uses_config_betas_and_peak_lr():
    oc = OptimConfig(batch_size=512, base_lr=1e-4, betas=(0.8, 0.9), weight_decay=0.1)
    opt = build_optimizer(_mae(), oc)
    assert oc.peak_lr == pytest.approx(2e-4)
    for g in opt.param_groups:
        assert g["betas"] == (0.8, 0.9) and g["lr"] == pytest.approx(2e-4)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert OptimConfig(lr=3e-3, batch_size=64).peak_lr == 3e-3


def test_lr_schedule_warmup_then_cosine():
    total, peak, floor = 100, 1e-3, 1e-5
    w = warmup_steps(total, 0.1)
    assert w == 10
    lrs = [lr_at(s, total, w, peak, floor) for s in range(total)]
    # linear warmup from peak/w, reaching the peak at the end of warmup
    assert lrs[0] == pytest.approx(peak / w)
    assert all(b > a for a, b in zip(lrs[:w], lrs[1:w]))
    assert lrs[w - 1] == pytest.approx(peak) and lrs[w] == pytest.approx(peak)
    # then monotone cosine decay towards min_lr, half way at the middle of the decay
    decay = lrs[w:]
    assert all(b <= a for a, b in zip(decay, decay[1:]))
    mid = w + (total - w) // 2
    assert lrs[mid] == pytest.approx(floor + (peak - floor) * 0.5, rel=1e-6)
    assert floor < lrs[-1] < floor + (peak - floor) * 0.01
    assert lr_at(total, total, w, peak, floor) == pytest.approx(floor)
    # no warmup: the first step uses the peak
    assert lr_at(0, 50, 0, peak) == pytest.approx(peak)
    assert lr_at(25, 50, 0, peak) == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_groups_survive_fabric_wrapping():
    from lightning.fabric import Fabric

    from mimkit.engine.optim import clean_name, no_decay_names

    method = _mae()
    names = no_decay_names(method)
    wrapped = Fabric(accelerator="cpu", devices=1).setup_module(method)
    assert clean_name("_forward_module.module._fsdp_wrapped_module.encoder.norm.weight") == "encoder.norm.weight"
    opt = build_optimizer(wrapped, OptimConfig(), names)
    plain = {id(p) for p in opt.param_groups[1]["params"]}
    assert plain == {id(method.get_parameter(n)) for n in names}
    assert len(opt.param_groups[0]["params"]) + len(plain) == sum(p.requires_grad for p in method.parameters())


def test_weight_decay_schedule_is_dino_ibots_cosine_and_leaves_the_no_decay_group_alone():
    # DINO/iBOT's cosine_scheduler(0.04, 0.4, epochs, iters) without warmup: value i of a table of `total`
    total = 10
    table = [0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi * i / total)) for i in range(total)]
    assert [weight_decay_at(i, total, 0.04, 0.4) for i in range(total)] == pytest.approx(table)
    assert weight_decay_at(0, total, 0.04, 0.4) == pytest.approx(0.04)
    assert weight_decay_at(total // 2, total, 0.04, 0.4) == pytest.approx(0.22)
    assert weight_decay_at(3, total, 0.05) == 0.05  # no end: constant
    opt = build_optimizer(_mae(), OptimConfig(weight_decay=0.04, weight_decay_end=0.4))
    set_weight_decay(opt, 0.3)
    assert {g["group"]: g["weight_decay"] for g in opt.param_groups} == {"decay": 0.3, "no_decay": 0.0}
    with pytest.raises(ValueError, match="weight_decay_end"):
        OptimConfig(weight_decay_end=-1.0)
