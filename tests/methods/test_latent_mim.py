import pytest
import torch
from method_helpers import cifar_samples, falls, fashion_mnist, small_method, train_metrics

from mimkit.engine.optim import param_groups
from mimkit.methods.latent_mim import gapped_images, gapped_windows, visible_count, window_offsets
from mimkit.models.cross_decoder import position_attention
from mimkit.models.patch import PatchGrid


def _lmim(*overrides, size=28, channels=1, depth=2):
    return small_method("latent_mim", size, channels, *overrides, depth=depth)


def _batch(b=4, c=1, size=28, seed0=0):
    g = torch.Generator().manual_seed(seed0)
    return {"image": torch.randn(b, c, size, size, generator=g), "seed": torch.arange(b) + seed0}


def test_split_keeps_a_tenth_visible_from_the_seed():
    assert [visible_count(0.1, n) for n in (196, 49, 64, 9, 3)] == [20, 5, 6, 1, 1]
    assert visible_count(0.25, 196) == 49 and visible_count(0.99, 49) == 47  # at least 2 targets
    m = _lmim()
    assert m.num_visible == 5
    seeds = torch.arange(32) + 7
    vis, trg = m.split(seeds)
    assert vis.shape == (32, 5) and trg.shape == (32, 44)
    assert torch.equal(torch.cat([vis, trg], 1).sort(1).values, torch.arange(49).expand(32, 49))
    mask = m.make_mask({"seed": seeds})
    assert (mask.masked.sum(1) == 44).all() and not mask.masked.gather(1, vis).any()
    assert torch.equal(mask.ids_keep, vis)
    # an image's split depends on its seed only, not on the batch around it
    assert torch.equal(m.split(seeds[3:6])[0], vis[3:6])
    assert not torch.equal(m.split(seeds + 100)[0], vis)
    assert _lmim("method.vis_fraction=0.25").num_visible == 12


def test_gap_zero_is_plain_patchify_exactly():
    grid = PatchGrid.make(28, 4, 1)
    images = torch.randn(3, 1, 28, 28)
    seeds = torch.tensor([1, 2, 3])
    assert gapped_images(images, 4, 0, seeds) is images
    # the window gather itself with zero gap is the identity too (every offset is 0)
    out = gapped_windows(images, 4, 0, seeds)
    assert torch.equal(grid.patchify(out), grid.patchify(images))
    m = _lmim("method.patch_gap=0")
    batch = _batch()
    assert torch.equal(m.training_input(batch), batch["image"])


def test_gap_windows_stay_inside_their_cells_with_seeded_jitter():
    p, gap, gh, gw = 4, 2, 3, 5
    cell = p + gap
    h, w = gh * cell, gw * cell
    b = 8
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    coords = (ys * w + xs).float().expand(b, 1, h, w)  # each pixel holds its own index
    seeds = torch.arange(b) + 11
    out = gapped_windows(coords, p, gap, seeds)
    assert out.shape == (b, 1, gh * p, gw * p)
    oy, ox = window_offsets(seeds, (gh, gw), gap)
    src_y, src_x = out.long() // w, out.long() % w
    for r in range(gh):
        for c in range(gw):
            py = src_y[:, 0, r * p:(r + 1) * p, c * p:(c + 1) * p]
            px = src_x[:, 0, r * p:(r + 1) * p, c * p:(c + 1) * p]
            # inside cell (r, c) ...
            assert ((py // cell) == r).all() and ((px // cell) == c).all()
            # ... a contiguous p x p window starting at the seed's offset
            assert torch.equal(py[:, 0, 0] - r * cell, oy[:, r, c]) and torch.equal(px[:, 0, 0] - c * cell, ox[:, r, c])
            assert torch.equal(py, py[:, :1, :1] + torch.arange(p).view(1, p, 1).expand(b, p, p))
            assert torch.equal(px, px[:, :1, :1] + torch.arange(p).view(1, 1, p).expand(b, p, p))
    # offsets use the whole range [0, gap] and differ between cells and between images
    assert set(oy.unique().tolist()) == set(range(gap + 1)) == set(ox.unique().tolist())
    assert not torch.equal(oy[0], oy[1]) and len(oy[0].unique()) > 1
    assert torch.equal(gapped_windows(coords, p, gap, seeds), out)
    # in a method: the encoder still sees data.img_size images, and with a 1 px gap at patch 4 the input differs
    m = _lmim()
    batch = _batch()
    x = m.training_input(batch)
    assert x.shape == batch["image"].shape and not torch.allclose(x, batch["image"])
    assert m.encoder(batch["image"]).shape == (4, 50, m.encoder.embed_dim)


def test_queries_start_from_visible_tokens_near_their_position():
    m = _lmim()
    dec = m.decoder
    v = torch.randn(2, 1, dec.dim)
    ids = torch.tensor([[0, 10, 48], [3, 4, 5]])
    one = torch.tensor([[7], [20]])
    # a single visible token: every query gets exactly it (softmax over one key)
    q = dec.position_weighted_queries(ids, one, v)
    pos = dec.pos_embed[0, 1:]
    torch.testing.assert_close(q, dec.mask_token + v + pos[ids])
    # several: the weights peak at the visible patch nearest the query (here: the query's own position)
    vis_ids = torch.tensor([[0, 6, 42, 48]])
    w = position_attention(pos[vis_ids], pos[vis_ids], torch.eye(4)[None])
    assert torch.equal(w[0].argmax(-1), torch.arange(4))
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 4))


def test_target_encoder_sees_only_target_patches_and_gets_no_gradient():
    m = _lmim("method.patch_gap=0")
    batch = _batch()
    images = batch["image"]
    vis, trg = m.split(batch["seed"])
    seen = {}
    hook = m.teacher.module["encoder"].register_forward_hook(
        lambda mod, args, kwargs, out: seen.update(ids=kwargs["ids_keep"], shape=out.shape), with_kwargs=True)
    out = m(batch)
    hook.remove()
    assert torch.equal(seen["ids"], trg) and seen["shape"][1] == 1 + 44
    # repainting the visible patches changes the predictions but not the targets
    grid = m.grid
    patches = grid.patchify(images)
    noise = torch.randn(4, 5, patches.shape[-1])
    repainted = grid.unpatchify(patches.scatter(1, vis[..., None].expand(-1, -1, patches.shape[-1]), noise))
    torch.testing.assert_close(m.targets(repainted, trg), m.targets(images, trg))
    with torch.no_grad():
        assert not torch.allclose(m.predict(repainted, vis, trg)[0], m.predict(images, vis, trg)[0])
    # no gradient into the teacher; the optimizer leaves it out; the EMA follows the student
    opt = torch.optim.AdamW([p for g in param_groups(m, 0.05) for p in g["params"]], lr=1e-2)
    teacher = list(m.teacher.parameters())
    m.begin_step(0, 10)
    out["loss"].backward()
    assert teacher and all(p.grad is None and not p.requires_grad for p in teacher)
    assert not {id(p) for g in opt.param_groups for p in g["params"]} & {id(p) for p in teacher}
    before = [p.clone() for p in teacher]
    opt.step()
    m.end_step(0, 10)
    mom = m.cfg.teacher(0.0)
    assert mom == pytest.approx(0.99) and m.cfg.teacher(1.0) == 1.0
    student = {f"{k}.{n}": p for k, part in m.student().items() for n, p in part.named_parameters()}
    named = list(m.teacher.module.named_parameters())
    assert [n for n, _ in named] == list(student)
    for (name, p), old in zip(named, before):
        torch.testing.assert_close(p, mom * old + (1 - mom) * student[name])
    # the teacher is saved with the method
    fresh = _lmim("method.patch_gap=0")
    fresh.load_state_dict(m.state_dict())
    torch.testing.assert_close(fresh.targets(images, trg), m.targets(images, trg))


def test_loss_knob_and_logged_metrics():
    batch = _batch()
    outs = {}
    for loss in ("infonce", "l2"):
        torch.manual_seed(0)
        outs[loss] = _lmim(f"method.loss={loss}")(batch)
        assert set(outs[loss]) >= {"loss", "pred_loss", "sim_reg", "target_sim", "patch_acc", "sim_target", "pred_sim", "vis_sim"}
        assert all(v.ndim == 0 and torch.isfinite(v) for v in outs[loss].values())
    # identical networks (same seed), different objectives
    torch.testing.assert_close(outs["l2"]["target_sim"], outs["infonce"]["target_sim"])
    assert outs["l2"]["pred_loss"] != outs["infonce"]["pred_loss"]
    assert outs["infonce"]["sim_target"].item() == pytest.approx(0.75)
    off = _lmim("method.sim_weight=0")(batch)
    assert off["sim_reg"] == 0 and off["loss"] == off["pred_loss"]
    with pytest.raises(Exception, match="loss"):
        _lmim("method.loss=cosine")


def test_training_on_fashion_mnist_lowers_the_loss_without_collapse():
    images = fashion_mnist(256)
    m = _lmim()
    rows = train_metrics(m, images, steps=36)
    assert falls([r["loss"] for r in rows]), [round(r["loss"], 3) for r in rows]
    # predictions find their own patch far above chance (1/44), and the targets stay spread out
    m.eval()
    with torch.no_grad():
        end = m({"image": images[:64], "seed": torch.arange(64) + 10**6})
    assert end["patch_acc"] > 0.2, end
    first = sum(r["target_sim"] for r in rows[:3]) / 3
    assert end["target_sim"] < 0.9 and end["target_sim"] < first, (first, end)


def test_training_on_cifar_lowers_the_loss():
    rows = train_metrics(_lmim(size=32, channels=3), cifar_samples(20), steps=20, batch_size=20)
    assert falls([r["loss"] for r in rows]), [round(r["loss"], 3) for r in rows]
    assert rows[-1]["target_sim"] < 0.9
