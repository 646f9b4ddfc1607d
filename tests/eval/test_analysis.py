import math

import pytest
import torch

from mimkit.eval import analysis as A
from mimkit.models import VisionTransformer


def _vit(depth=2, img=32, patch=4, dim=32, heads=2, seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=img, patch_size=patch, in_chans=3, embed_dim=dim, depth=depth, num_heads=heads)


def _images(b=4, img=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, img, img, generator=g)


def _local_mask(h, w, radius=1):
    """Bool [T, T]: patches may attend only to patches within `radius` (Chebyshev) and to the class token."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    near = ((ys[:, None] - ys[None]).abs() <= radius) & ((xs[:, None] - xs[None]).abs() <= radius)
    t = h * w + 1
    m = torch.ones(t, t, dtype=torch.bool)
    m[1:, 1:] = near
    return m


def _restrict_to_local(encoder, mask):
    """Hook every block's attention so that the real forward pass runs with `mask` (the model is unchanged)."""
    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        kwargs["attn_mask"] = mask
        return args, kwargs
    return [blk.attn.register_forward_pre_hook(hook, with_kwargs=True) for blk in encoder.blocks]


def test_recomputed_attention_matches_the_forward_pass():
    enc = _vit(depth=1)
    x = _images(2)
    (attn,) = A.attention_maps(enc, x)
    blk = enc.blocks[0]
    captured = {}
    h = blk.attn.register_forward_hook(lambda m, a, out: captured.setdefault("out", out))
    enc.eval()
    with torch.no_grad():
        enc(x)
        h.remove()
        tokens = torch.cat([(enc.cls_token + enc.pos_embed[:, :1]).expand(2, -1, -1), enc.embed(x)], 1)
        xin = blk.norm1(tokens)
        v = blk.attn.qkv(xin).reshape(2, 65, 3, 2, 16).permute(2, 0, 3, 1, 4)[2]
        manual = blk.attn.proj((attn @ v).transpose(1, 2).reshape(2, 65, 32))
    assert attn.shape == (2, 2, 65, 65)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 2, 65))
    torch.testing.assert_close(manual, captured["out"], atol=1e-5, rtol=1e-4)


def _real_images(folder, n=4):
    """n CIFAR sample images, normalised per channel: [n, 3, 32, 32]."""
    import numpy as np
    from PIL import Image

    files = sorted(folder.glob("cifar10_*.png"))[:n]
    x = torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])).float() / 255
    x = x.permute(0, 3, 1, 2)
    return (x - x.mean(dim=(0, 2, 3), keepdim=True)) / x.std(dim=(0, 2, 3), keepdim=True)


def test_local_attention_has_smaller_mean_distance_than_global(real_images_dir):
    enc = _vit(depth=3)
    x = _real_images(real_images_dir)
    global_d = A.mean_attention_distance(enc, x)
    handles = _restrict_to_local(enc, _local_mask(8, 8, radius=1))
    try:
        local_d = A.mean_attention_distance(enc, x)
    finally:
        for h in handles:
            h.remove()
    assert global_d.shape == local_d.shape == (3, 2)
    # patch 4 px: neighbours within one patch are at most 4*sqrt(2) px away
    assert (local_d <= 4 * math.sqrt(2) + 1e-4).all()
    assert (local_d < global_d - 3.0).all(), (local_d, global_d)
    # near-uniform attention of a random ViT over 8x8 patches: about the mean pairwise distance (~4 patches)
    mean_pair = A.patch_distances(8, 8, 4).mean()
    assert (global_d > 0.7 * mean_pair).all()


def test_mean_distance_of_known_maps():
    h, w = 3, 3
    n = h * w
    self_attn = torch.zeros(1, 1, n + 1, n + 1)
    self_attn[0, 0, torch.arange(n + 1), torch.arange(n + 1)] = 1.0
    assert float(A.mean_attention_distance_from_maps(self_attn, h, w, 16)) == pytest.approx(0.0)
    uniform = torch.full((1, 1, n + 1, n + 1), 1.0 / (n + 1))
    expected = float(A.patch_distances(h, w, 16).mean())  # cls column dropped, rows renormalised
    assert float(A.mean_attention_distance_from_maps(uniform, h, w, 16)) == pytest.approx(expected, rel=1e-6)
    # non-square patches: a horizontal neighbour is pw pixels away
    right = torch.zeros(1, 1, 2 + 1, 2 + 1)
    right[0, 0, :, 2] = 1.0  # every query attends to patch (0, 1) of a 1x2 grid
    d = A.mean_attention_distance_from_maps(right, 1, 2, (4, 6))
    assert float(d) == pytest.approx(3.0)  # query (0,0): 6 px, query (0,1): 0 px


def test_uniform_attention_entropy_is_log_t():
    enc = _vit(depth=2)
    for blk in enc.blocks:  # q = k = 0 -> every row uniform over the T = 1 + 64 tokens
        torch.nn.init.zeros_(blk.attn.qkv.weight)
        torch.nn.init.zeros_(blk.attn.qkv.bias)
    ent = A.attention_entropy(enc, _images(2))
    torch.testing.assert_close(ent, torch.full((2, 2), math.log(65)))
    ent_patches = A.attention_entropy(enc, _images(2), drop_cls=True)
    torch.testing.assert_close(ent_patches, torch.full((2, 2), math.log(64)))
    nmi = A.attention_nmi(enc, _images(2))
    assert nmi.abs().max() < 1e-6  # identical rows: no information about the query


def test_entropy_and_nmi_of_one_hot_attention():
    t = 5
    eye = torch.eye(t).view(1, 1, t, t)
    assert float(A.attention_entropy_from_maps(eye)) == pytest.approx(0.0, abs=1e-6)
    assert float(A.attention_nmi_from_maps(eye)) == pytest.approx(1.0, abs=1e-6)


def test_effective_rank_of_rank_k_features():
    g = torch.Generator().manual_seed(0)
    n, d = 400, 64
    for k in (1, 3, 10):
        u, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
        equal = (u @ v.T).float()  # k equal singular values
        assert A.effective_rank(equal, center=False) == pytest.approx(k, rel=1e-3)
        gauss = torch.randn(n, k, generator=g) @ torch.randn(k, d, generator=g)
        er = A.effective_rank(gauss)
        assert k - 0.35 * k <= er <= k + 0.05, (k, er)
        s = A.singular_spectrum(gauss)
        assert (s[k:] < 1e-3 * s[0]).all()
    full = torch.randn(2000, 16, generator=g)
    assert A.effective_rank(full) > 15.0


def test_fourier_curve_high_vs_low_frequency_maps():
    h = w = 8
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    checker = ((ys + xs) % 2).float() * 2 - 1          # all energy at the highest frequency
    smooth = torch.cos(2 * math.pi * ys / h) + torch.cos(2 * math.pi * xs / w) + 3.0  # mostly DC
    g = torch.Generator().manual_seed(0)

    def tokens(pattern):
        scale = torch.rand(2, 1, 16, generator=g) + 0.5
        noise = 1e-3 * torch.randn(2, h * w, 16, generator=g)
        return torch.cat([torch.zeros(2, 1, 16), pattern.reshape(1, -1, 1) * scale + noise], dim=1)

    freqs, hi = A.fourier_rel_logamp_curve(tokens(checker), h, w)
    _, lo = A.fourier_rel_logamp_curve(tokens(smooth), h, w)
    assert freqs[0] == 0 and freqs[-1] == pytest.approx(1.0) and len(freqs) == 5
    assert hi[0] == 0 and lo[0] == 0
    assert hi[-1] > 5.0 and lo[-1] < -5.0


def test_analyze_shapes_and_layer_features():
    enc = _vit(depth=3)
    x = _images(3)
    feats = A.layer_features(enc, x)
    assert len(feats) == 3 and feats[0].shape == (3, 65, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc.norm(feats[-1]), enc.eval()(x))
    res = A.analyze(enc, x)
    assert len(res["attention_distance"]) == 3 and len(res["attention_distance"][0]) == 2
    assert len(res["fourier_rel_logamp"]) == 3 and len(res["layer_effective_rank"]) == 3
    assert len(res["singular_values"]) == 3  # 3 images, centred cls features
    assert 0 < res["effective_rank"] <= 3
    cls = A.cls_attention(enc, x, layers=[-1])
    assert cls.shape == (1, 3, 2, 8, 8)
    torch.testing.assert_close(cls.sum(dim=(-2, -1)), torch.ones(1, 3, 2))
    enc.train()
    A.attention_maps(enc, x, layers=0)
    assert enc.training  # the caller's mode is restored
    with pytest.raises(ValueError):
        A.attention_maps(enc, x, layers=[5])
