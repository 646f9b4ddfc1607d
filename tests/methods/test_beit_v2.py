"""BEiT v2 (card C4 stage 2): cross-entropy on the hidden patches only, against the codes of a frozen VQ-KD
tokenizer that stays out of the state_dict and the optimizer; the loss falls and mlm_acc rises."""

import pytest
import torch
import torch.nn.functional as F
from method_helpers import fashion_mnist, small_method, train_metrics

from mimkit.config import load_config
from mimkit.interop.io import save_method_checkpoint
from mimkit.methods import build_method
from mimkit.models.pos_embed import sincos_2d

DATA = ["data.mean=[0.286]", "data.std=[0.353]"]


@pytest.fixture(scope="module")
def vqkd_checkpoint(teacher_checkpoint, tmp_path_factory):
    """A VQ-KD (64 codes, 2 blocks) trained for 8 steps on Fashion-MNIST, saved as a mimkit checkpoint."""
    cfg = load_config(overrides=["method=vqkd", "model.depth=2", "data.img_size=28", *DATA,
                                 f"method.teacher.source={teacher_checkpoint}", "method.teacher.norm=standardize",
                                 "method.decoder_depth=1", "method.num_codes=64", "method.dead_after=2"])
    torch.manual_seed(0)
    method = build_method(cfg, (28, 28), 1)
    train_metrics(method, fashion_mnist(256), steps=8, lr=1e-3, batch_size=32)
    path = tmp_path_factory.mktemp("vqkd") / "vqkd.ckpt"
    return save_method_checkpoint(method.eval(), cfg, {"img_size": [28, 28], "channels": 1, "mean": [0.286],
                                                       "std": [0.353]}, path)


def beit_v2(tokenizer, *overrides):
    torch.manual_seed(0)
    return small_method("beit_v2", (28, 28), 1, *DATA, f"method.tokenizer={tokenizer}", *overrides, depth=2)


def batch(n=16, offset=0):
    return {"image": fashion_mnist(n + offset)[offset:], "seed": torch.arange(n) + offset}


def test_targets_are_the_frozen_tokenizers_codes_and_it_is_not_saved(vqkd_checkpoint):
    m = beit_v2(vqkd_checkpoint).train()
    tok = m.tokenizer
    assert not tok.training and all(not p.requires_grad for p in tok.parameters())
    own = {id(p) for p in m.parameters()}
    assert not any(id(p) in own for p in tok.parameters())
    assert not any("tokenizer" in k or "quantizer" in k for k in m.state_dict())
    b = batch()
    assert torch.equal(m.targets(b["image"]), tok.tokenize(b["image"]))  # same normalisation: the codes as is
    codebook = tok.quantizer.codebook.clone()
    m(b)["loss"].backward()
    assert all(p.grad is None for p in tok.parameters())
    assert torch.equal(tok.quantizer.codebook, codebook)  # the tokenizer's codebook does not move in stage 2


def logits_by_hand(m, images, masked, early_layers):
    """BEiT v2's two code predictions computed from the parameters, not the method's code path: patches
    projected by the patch-embedding weights, hidden ones replaced by the mask token, the fixed sin-cos table
    added, then every encoder block; main = LM head(final norm(last block)); aggregation = the branch's blocks
    on [class token after the last block ; patches after block `early_layers`], then the same norm and head."""
    enc = m.encoder
    b, c = images.shape[:2]
    (gh, gw), (ph, pw), d = enc.grid.shape, enc.grid.patch_size, enc.embed_dim
    patches = images.unfold(2, ph, ph).unfold(3, pw, pw).permute(0, 2, 3, 1, 4, 5).reshape(b, gh * gw, -1)
    x = patches @ enc.patch_embed.proj.weight.reshape(d, -1).T + enc.patch_embed.proj.bias
    x = torch.where(masked.unsqueeze(-1), m.mask_token.expand(b, gh * gw, d), x)
    table = sincos_2d(d, (gh, gw), cls_token=True)  # the class token's row is zeros
    x = torch.cat([(enc.cls_token + table[0]).expand(b, 1, d), x + table[1:]], dim=1)
    after = []
    for blk in enc.blocks:
        x = blk(x)
        after.append(x)
    main = m.lm_head(enc.norm(after[-1])[:, 1:])
    if m.aggregation is None:
        return main, None
    y = torch.cat([after[-1][:, :1], after[early_layers - 1][:, 1:]], dim=1)
    for blk in m.aggregation.blocks:
        y = blk(y)
    return main, m.lm_head(enc.norm(y)[:, 1:])


def cross_entropy_by_hand(logits, codes):
    return -(logits.log_softmax(-1).gather(-1, codes.unsqueeze(-1))).mean()


def test_loss_is_cross_entropy_on_hidden_patches_only(vqkd_checkpoint):
    m = beit_v2(vqkd_checkpoint).eval()
    b = batch()
    mask = m.make_mask(b)
    assert (mask.masked.sum(1) == round(0.38 * 49)).all()  # BEiT v2's exact count
    codes = m.targets(b["image"])
    with torch.no_grad():
        main, agg = logits_by_hand(m, b["image"], mask.masked, 1)  # 3/4 of 2 blocks, at least 1: after block 1
        out = m(b)
    h = mask.masked
    expect = cross_entropy_by_hand(main[h], codes[h]) + cross_entropy_by_hand(agg[h], codes[h])
    torch.testing.assert_close(out["loss"], expect, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["mlm_loss"], cross_entropy_by_hand(main[h], codes[h]), atol=1e-5, rtol=1e-5)
    assert out["mlm_acc"] == (main[h].argmax(-1) == codes[h]).float().mean()
    # other codes at the visible patches change nothing
    scrambled = torch.where(h, codes, (codes + 7) % m.num_codes)
    m.targets = lambda images: scrambled
    with torch.no_grad():
        assert torch.allclose(m(b)["loss"], out["loss"], atol=1e-6)


def test_patch_aggregation_branch_reads_the_last_class_token_and_early_patches_with_shared_norm_and_head(
        vqkd_checkpoint):
    m = beit_v2(vqkd_checkpoint, "model.depth=4", "method.early_layers=2").eval()  # BEiT v2: 9 of 12
    b = batch(8)
    mask = m.make_mask(b)
    with torch.no_grad():
        main, agg = m.logits(b["image"], mask)
        main_ref, agg_ref = logits_by_hand(m, b["image"], mask.masked, 2)
    torch.testing.assert_close(main, main_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(agg, agg_ref, atol=1e-5, rtol=1e-5)
    # the comparison has teeth: the patches after another block give other logits
    with torch.no_grad():
        assert not torch.allclose(logits_by_hand(m, b["image"], mask.masked, 3)[1], agg, atol=1e-3)
    # norm and LM head are shared: the branch owns only its blocks, and the final norm moves both predictions
    own = {n.split(".")[0] for n, _ in m.named_parameters()}
    assert own == {"encoder", "mask_token", "lm_head", "aggregation"}
    assert {n.split(".")[1] for n, _ in m.aggregation.named_parameters()} == set(map(str, range(2)))
    assert all(n.startswith("blocks.") for n, _ in m.aggregation.named_parameters())
    with torch.no_grad():
        m.encoder.norm.bias.add_(0.5)
        main2, agg2 = m.logits(b["image"], mask)
    assert not torch.allclose(main2, main) and not torch.allclose(agg2, agg)
    # the aggregation blocks are dropped with the branch: head_layers=0 leaves the main term alone
    plain = beit_v2(vqkd_checkpoint, "method.head_layers=0").eval()
    assert plain.aggregation is None and not any("aggregation" in k for k in plain.state_dict())
    with torch.no_grad():
        out = plain(b)
        main0, _ = logits_by_hand(plain, b["image"], mask.masked, 1)
    h = mask.masked
    torch.testing.assert_close(out["loss"], cross_entropy_by_hand(main0[h], plain.targets(b["image"])[h]),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="early_layers=4"):
        beit_v2(vqkd_checkpoint, "model.depth=4", "method.early_layers=4")


def test_tokenizer_loads_without_its_teacher_and_codes_like_the_trained_vqkd(vqkd_checkpoint, tmp_path):
    """The teacher trained the tokenizer; using it needs only encoder, code projection and codebook."""
    from mimkit.engine.checkpoint import load_checkpoint, method_from_checkpoint
    from mimkit.methods.vqkd import load_tokenizer

    ckpt = load_checkpoint(vqkd_checkpoint)
    ckpt["config"]["method"]["teacher"]["source"] = str(tmp_path / "moved_away.ckpt")
    moved = tmp_path / "vqkd_teacher_gone.ckpt"
    torch.save(ckpt, moved)
    tok = load_tokenizer(moved)
    assert not any(k.startswith(("decoder.", "decode_task.")) for k in tok.state_dict())
    trained = method_from_checkpoint(vqkd_checkpoint)[0]
    images = batch()["image"]
    assert torch.equal(tok.tokenize(images), trained.tokenize(images))
    assert torch.equal(tok.quantizer.codebook, trained.quantizer.codebook)
    m = beit_v2(moved)
    assert torch.equal(m.targets(images), trained.tokenize(images))


def test_not_a_vqkd_run_is_refused_by_name(teacher_checkpoint):
    with pytest.raises(ValueError, match="not a VQ-KD tokenizer"):
        beit_v2(teacher_checkpoint)


def test_loss_falls_and_mlm_acc_rises_on_fashion_mnist(vqkd_checkpoint):
    m = beit_v2(vqkd_checkpoint)
    rows = train_metrics(m, fashion_mnist(256), steps=25, lr=1e-3, batch_size=32)
    first, last = rows[:5], rows[-5:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    assert mean(last, "loss") < 0.9 * mean(first, "loss")
    assert mean(last, "mlm_acc") > mean(first, "mlm_acc") + 0.05
    assert mean(last, "agg_mlm_acc") > mean(first, "agg_mlm_acc")
    assert all(0 < r["target_code_usage"] <= 1 for r in rows)
