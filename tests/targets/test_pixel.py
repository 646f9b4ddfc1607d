import torch

from mimkit.models import PatchGrid
from mimkit.targets import PixelTarget


def test_norm_pix_standardises_each_patch_over_all_its_channels():
    grid = PatchGrid.make(8, 4, 3)
    images = torch.rand(2, 3, 8, 8) * torch.tensor([1.0, 5.0, 0.1]).view(1, 3, 1, 1)
    t = PixelTarget(grid, norm=True)(images)
    assert t.shape == (2, 4, 48)
    torch.testing.assert_close(t.mean(-1), torch.zeros(2, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(t.var(-1), torch.ones(2, 4), atol=1e-3, rtol=0)
    # per patch, not per image: one bright patch does not change another patch's target
    brighter = images.clone()
    brighter[:, :, :4, :4] += 10
    t2 = PixelTarget(grid, norm=True)(brighter)
    torch.testing.assert_close(t2[:, 1:], t[:, 1:])


def test_raw_pixels_and_inverse_mapping():
    grid = PatchGrid.make((8, 12), 4, 2)
    images = torch.randn(3, 2, 8, 12)
    raw = PixelTarget(grid, norm=False)
    assert torch.equal(raw(images), grid.patchify(images))
    norm = PixelTarget(grid, norm=True)
    # predicting the normalised target exactly maps back to the image itself
    torch.testing.assert_close(norm.to_pixels(norm(images), images), images, atol=1e-5, rtol=1e-5)
