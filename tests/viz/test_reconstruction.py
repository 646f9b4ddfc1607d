import numpy as np
import torch
from PIL import Image

from mimkit.masking import mask_from_noise
from mimkit.methods.mae import MAE
from mimkit.models import MAEDecoder, VisionTransformer
from mimkit.viz import render_reconstruction_grid, save_reconstruction_grid


def _mae(in_chans):
    torch.manual_seed(0)
    enc = VisionTransformer(img_size=28, patch_size=4, in_chans=in_chans, embed_dim=32, depth=1, num_heads=2)
    dec = MAEDecoder(enc.grid.shape, 32, enc.grid.patch_dim, dim=32, depth=1, num_heads=2)
    return MAE(enc, dec, 0.75)


def _batch(b, c, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = 0.6 + 0.2 * torch.rand(b, c, 28, 28, generator=g)  # bright images in [0.6, 0.8]
    mean, std = [0.5] * c, [0.25] * c
    norm = (images - torch.tensor(mean).view(1, c, 1, 1)) / torch.tensor(std).view(1, c, 1, 1)
    noise = torch.rand(b, 49, generator=g)
    return {"image": norm, "seed": torch.arange(b), "mask_noise": noise}, mean, std


def test_grayscale_grid_size_and_dark_masked_cells(tmp_path):
    method = _mae(1)
    batch, mean, std = _batch(3, 1)
    path = save_reconstruction_grid(method, batch, tmp_path / "sub" / "rec.png", mean, std)
    img = Image.open(path)
    assert img.format == "PNG" and img.mode == "L"
    scale, gap, cell = 4, 4, 112  # 28 px upscaled x4 -> 112 px cells
    top = img.size[1] - (3 * cell + 4 * gap)  # the band of column titles
    assert img.size[0] == 4 * cell + 5 * gap and 12 <= top <= 40
    a = np.asarray(img).astype(int)
    for j in range(4):  # every column has a title: dark text pixels in the band above it
        x0 = gap + j * (cell + gap)
        assert a[:top, x0:x0 + cell].min() < 128, j
    hidden = mask_from_noise(batch["mask_noise"], 0.75).masked.reshape(3, 7, 7)
    plain = np.asarray(render_reconstruction_grid(method.reconstruct(batch), mean, std, titles=False))
    np.testing.assert_array_equal(a[top:], plain)
    assert a.shape[0] - top == 3 * cell + 4 * gap
    for row in range(3):
        y0 = top + gap + row * (cell + gap)
        orig = a[y0:y0 + cell, gap:gap + cell]
        masked = a[y0:y0 + cell, 2 * gap + cell:2 * gap + 2 * cell]
        assert orig.min() >= 0.6 * 255 - 1
        for i in range(7):
            for j in range(7):
                patch = masked[i * 16:(i + 1) * 16, j * 16:(j + 1) * 16]
                if hidden[row, i, j]:
                    assert patch.max() < 60, (row, i, j)      # dark fill
                else:
                    assert patch.min() >= 0.6 * 255 - 1       # the bright original shows through
                    np.testing.assert_array_equal(patch, orig[i * 16:(i + 1) * 16, j * 16:(j + 1) * 16])
    assert method.training  # mode restored


def test_rgb_and_many_channels(tmp_path):
    for c, mode in [(3, "RGB"), (5, "RGB")]:
        method = _mae(c)
        batch, mean, std = _batch(2, c)
        img = Image.open(save_reconstruction_grid(method, batch, tmp_path / f"rec{c}.png", mean, std))
        assert img.mode == mode and img.size[0] == 4 * 112 + 5 * 4 and img.size[1] > 2 * 112 + 3 * 4
