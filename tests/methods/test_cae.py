import pytest
import torch
from method_helpers import cifar_samples, falls, fashion_mnist, small_method, train_losses

from mimkit.masking import BlockMasking
from mimkit.models import VisionTransformer
from mimkit.models.pos_embed import sincos_2d


def _cae(size=28, channels=1, *overrides, depth=2):
    return small_method("cae", size, channels, "method.regressor_depth=2", "method.decoder_depth=2", *overrides,
                        depth=depth)


def _batch(b=4, c=1, size=28, seed0=0):
    g = torch.Generator().manual_seed(seed0)
    return {"image": torch.randn(b, c, size, size, generator=g), "seed": torch.arange(b) + seed0}


def test_mask_is_an_exact_beit_block_mask_of_half_the_patches():
    cae = _cae()
    batch = _batch(16)
    mask = cae.make_mask(batch)
    assert cae.grid.num_patches == 49 and (mask.masked.sum(1) == 25).all()  # round(0.5 * 49)
    assert torch.equal(mask.masked, BlockMasking(0.5, min_area=0.08)(batch["seed"], (7, 7)).masked)
    ids = cae.masked_ids(mask)
    assert ids.shape == (16, 25) and mask.masked.gather(1, ids).all() and not mask.masked.gather(1, mask.ids_keep).any()
    assert (ids.diff(dim=1) > 0).all()  # raster order
    # blocks, not scattered patches: most hidden patches have a hidden 4-neighbour
    grid = mask.masked.view(16, 7, 7)
    pad = torch.nn.functional.pad(grid.float(), (1, 1, 1, 1))
    neighbours = pad[:, :-2, 1:-1] + pad[:, 2:, 1:-1] + pad[:, 1:-1, :-2] + pad[:, 1:-1, 2:]
    assert (neighbours[grid] > 0).float().mean() > 0.9


def _capture_inputs(module, store):
    return module.register_forward_pre_hook(lambda m, args: store.append([a.detach().clone() for a in args]))


def test_regressor_keys_carry_positions_values_do_not():
    torch.manual_seed(0)
    cae = _cae()
    reg = cae.regressor
    batch = _batch()
    mask = cae.make_mask(batch)
    ids_m = cae.masked_ids(mask)
    visible = cae.encoder(batch["image"], ids_keep=mask.ids_keep)[:, 1:]  # the class token is not a key
    block_in, attn_in = [], []
    hooks = [_capture_inputs(blk, block_in) for blk in reg.blocks]
    hooks += [_capture_inputs(blk.cross_attn, attn_in) for blk in reg.blocks]
    out = reg(visible, mask.ids_keep, ids_m)
    for h in hooks:
        h.remove()
    pos_v, pos_m = reg.positions(mask.ids_keep), reg.positions(ids_m)
    assert not torch.equal(pos_v[:, :1], pos_v[:, 1:2])  # positions differ, so the check below has teeth
    # the first queries are the bare mask token: the position is added inside every block
    torch.testing.assert_close(block_in[0][0], reg.mask_token.expand(4, ids_m.shape[1], -1))
    for blk, (queries, context, pq, pc), (q, k, v) in zip(reg.blocks, block_in, attn_in):
        torch.testing.assert_close(context, visible)
        kv = torch.cat([context, queries], dim=1)  # keys/values: the visible latents and the queries
        torch.testing.assert_close(q, blk.norm_q(queries + pos_m))
        torch.testing.assert_close(k, blk.norm_k(kv + torch.cat([pos_v, pos_m], dim=1)))
        torch.testing.assert_close(v, blk.norm_v(kv))  # no position embedding in the values
        assert not torch.allclose(k, blk.norm_k(kv))
    assert out.shape == (4, ids_m.shape[1], cae.encoder.embed_dim)
    # the key projection has no bias (it would cancel in the softmax), queries and values do
    attn = reg.blocks[0].cross_attn
    assert attn.k.bias is None and attn.q.bias is not None and attn.v.bias is not None
    # layer-scale 0.1 on both branches, and a separate LayerNorm for each of q, k, v
    assert torch.all(reg.blocks[0].gamma_1 == 0.1) and torch.all(reg.blocks[0].gamma_2 == 0.1)
    assert len({id(reg.blocks[0].norm_q), id(reg.blocks[0].norm_k), id(reg.blocks[0].norm_v)}) == 3


def test_decoder_never_sees_the_visible_tokens():
    torch.manual_seed(0)
    cae = _cae().eval()
    a, b = _batch(4, seed0=0), _batch(4, seed0=1)
    b["seed"] = a["seed"]  # the same masks, different images
    mask = cae.make_mask(a)
    ids_m = cae.masked_ids(mask)
    seen = []
    hooks = [_capture_inputs(blk, seen) for blk in cae.decoder.blocks]
    latents, pred, _ = cae.predict(a["image"], mask)
    for h in hooks:
        h.remove()
    # every decoder block works on the M masked tokens alone; its input is the predicted latents + positions
    assert all(x[0].shape[1] == ids_m.shape[1] for x in seen)
    torch.testing.assert_close(seen[0][0], latents + cae.regressor.positions(ids_m))
    # given the regressor's output, the decoder's prediction does not depend on the visible tokens at all:
    # image b (other visible content) with a's predicted latents forced in gives a's predictions
    cae.regressor.forward = lambda *args: latents
    _, pred_b, _ = cae.predict(b["image"], mask)
    torch.testing.assert_close(pred_b, pred)
    del cae.regressor.forward
    _, pred_b, _ = cae.predict(b["image"], mask)
    assert not torch.allclose(pred_b, pred)  # it does through the regressor


def encoder_on_patches_by_hand(encoder, images, hidden):
    """The encoder shown only the patches `hidden` marks (Bool[B, N], the same count per image), computed from its
    parameters: each such patch (raster order) times the patch-embedding weights, plus its row of the fixed
    sin-cos table; the class token (zero position) in front; every block, the final norm; class token dropped."""
    b = images.shape[0]
    (gh, gw), (ph, pw), d = encoder.grid.shape, encoder.grid.patch_size, encoder.embed_dim
    patches = images.unfold(2, ph, ph).unfold(3, pw, pw).permute(0, 2, 3, 1, 4, 5).reshape(b, gh * gw, -1)
    tokens = patches @ encoder.patch_embed.proj.weight.reshape(d, -1).T + encoder.patch_embed.proj.bias
    tokens = tokens + sincos_2d(d, (gh, gw))
    rows = [tokens[i, hidden[i].nonzero().view(-1)] for i in range(b)]
    x = torch.cat([encoder.cls_token.expand(b, 1, d), torch.stack(rows)], dim=1)
    for blk in encoder.blocks:
        x = blk(x)
    return encoder.norm(x)[:, 1:]


def test_alignment_target_is_the_same_encoder_on_the_masked_patches_without_gradient():
    torch.manual_seed(0)
    cae = _cae()
    # no second encoder: the target comes from the online one (the reference's copy has momentum 0)
    assert [n for n, m in cae.named_modules() if isinstance(m, VisionTransformer)] == ["encoder"]
    batch = _batch()
    opt = torch.optim.AdamW(cae.parameters(), lr=1e-2)
    for step in range(2):
        mask = cae.make_mask(batch)
        target = cae.alignment_target(batch["image"], cae.masked_ids(mask))
        assert not target.requires_grad and target.grad_fn is None
        with torch.no_grad():
            expected = encoder_on_patches_by_hand(cae.encoder, batch["image"], mask.masked)
            latents = cae.predict(batch["image"], mask)[0]
        torch.testing.assert_close(target, expected)  # after a step too: the current weights, not a stale copy
        out = cae(batch)
        torch.testing.assert_close(out["align_loss"], (latents - expected).pow(2).mean())
        torch.testing.assert_close(out["loss"], out["rec_loss"] + 2.0 * out["align_loss"])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    # the target is the encoder on the masked patches alone: it ignores the visible ones entirely
    ids_m = cae.masked_ids(mask)
    other = batch["image"].clone()
    hidden = cae.grid.expand_mask(mask.masked)
    other[~hidden.expand_as(other)] = 5.0
    torch.testing.assert_close(cae.alignment_target(other, ids_m), cae.alignment_target(batch["image"], ids_m))


def test_loss_counts_only_masked_patches():
    torch.manual_seed(0)
    cae = _cae()
    batch = _batch()
    mask = cae.make_mask(batch)
    base = cae(batch)
    true_target = cae.target

    def noisy(where):
        def target(images):
            t = true_target(images)
            return t + 100.0 * where.unsqueeze(-1).to(t.dtype)
        return target

    cae.target = noisy(~mask.masked)  # garbage at every visible patch: nothing changes
    torch.testing.assert_close(cae(batch)["rec_loss"], base["rec_loss"])
    one = torch.zeros_like(mask.masked)
    one[0, cae.masked_ids(mask)[0, 0]] = True
    cae.target = noisy(one)  # one masked patch off: the loss moves
    assert cae(batch)["rec_loss"] > base["rec_loss"] + 1.0


def test_align_weight_zero_turns_the_alignment_off():
    torch.manual_seed(0)
    cae = _cae(28, 1, "method.align_weight=0")
    out = cae(_batch())
    assert out["align_loss"] > 0 and torch.equal(out["loss"], out["rec_loss"])
    out["loss"].backward()
    # with the alignment off, only the reconstruction trains, still through the regressor
    assert cae.regressor.blocks[0].cross_attn.q.weight.grad.abs().sum() > 0
    with pytest.raises(Exception, match="align_weight"):
        _cae(28, 1, "method.align_weight=-1")


def test_reconstruct_draws_predictions_at_masked_patches_and_hog_draws_masks():
    torch.manual_seed(0)
    cae = _cae()
    batch = _batch()
    rec = cae.reconstruct(batch)
    mask = cae.make_mask(batch)
    hidden = cae.grid.expand_mask(mask.masked)
    _, pred, ids_m = cae.predict(batch["image"], mask)
    full = torch.zeros(4, 49, pred.shape[-1]).scatter(1, ids_m.unsqueeze(-1).expand_as(pred), pred)
    pixels = cae.target.to_pixels(full, batch["image"])
    torch.testing.assert_close(rec.prediction[hidden.expand_as(pixels)], pixels[hidden.expand_as(pixels)])
    assert (rec.prediction[~hidden.expand_as(pixels)] == 0).all()
    torch.testing.assert_close(rec.pasted[~hidden.expand_as(pixels)], batch["image"][~hidden.expand_as(pixels)])
    hog = _cae(28, 1, "method.target=hog")
    assert hog.reconstruct(batch) is None and hog.make_mask(batch).masked.sum(1).eq(25).all()
    assert hog.decoder.head.out_features == 4 * 9  # 2x2 cells of 2 px per 4-px patch, 1 channel, 9 bins


def _trained(images, steps, *overrides, lr=1e-3):
    torch.manual_seed(0)
    cae = _cae(images.shape[-1], images.shape[1], *overrides)
    logs = []
    forward = cae.forward

    def logging_forward(batch):
        out = forward(batch)
        logs.append({k: float(v.detach()) for k, v in out.items()})
        return out

    cae.forward = logging_forward
    losses = train_losses(cae, images, steps=steps, lr=lr, batch_size=32)
    return cae, losses, logs


def test_loss_falls_on_fashion_mnist_without_collapse():
    images = fashion_mnist(256)
    _, losses, logs = _trained(images, 60)
    rec = [x["rec_loss"] for x in logs]
    assert falls(losses, factor=0.7) and falls(rec, factor=0.7), (losses[:5], losses[-5:])
    # no collapse. A short run gives the latents a large shared offset (target_sim ~0.99, as much with the
    # alignment off), so target_sim is bounded away from 1 (identical targets) and the effective rank of the
    # centred targets (~58 at initialisation, ~38 here) must stay far above a collapsed 1
    last = logs[-5:]
    assert max(x["target_sim"] for x in last) < 0.998, [x["target_sim"] for x in last]
    assert min(x["target_rank"] for x in last) > 15, [x["target_rank"] for x in last]
    # the alignment is learned: the predictions approach the targets
    assert sum(x["align_loss"] for x in last) < 0.2 * sum(x["align_loss"] for x in logs[:5])


def test_loss_falls_on_cifar_with_hog_targets():
    images = cifar_samples(20)
    _, losses, logs = _trained(images, 30, "method.target=hog", lr=1e-3)
    assert falls(losses, factor=0.7), (losses[:5], losses[-5:])
    assert max(x["target_sim"] for x in logs[-5:]) < 0.998 and min(x["target_rank"] for x in logs[-5:]) > 5
