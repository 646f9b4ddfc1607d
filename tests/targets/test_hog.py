import math

import pytest
import torch

from mimkit.models.patch import PatchGrid
from mimkit.targets import HOG, HOGTarget


def test_an_edge_puts_its_energy_in_one_orientation_bin_and_turning_it_moves_the_bin():
    img = torch.zeros(1, 1, 16, 16)
    img[..., :, 8:] = 1.0  # a vertical edge: horizontal gradient
    hog = HOG(nbins=9, cell=8)
    h = hog(img)  # [1, 9, 2, 2]
    assert h.shape == (1, 9, 2, 2)
    mag, bins = hog.gradients(img)
    edge_bins = bins[mag > 0].unique()
    assert len(edge_bins) == 1
    b = int(edge_bins)
    assert h[0, :, 0, 0].argmax() == b and torch.allclose(h[0, :, 0, 0].norm(), torch.tensor(1.0))
    turned = hog(img.transpose(-1, -2))
    b2 = int(turned[0, :, 0, 0].argmax())
    # 90 degrees apart in an unsigned 180-degree range: nbins/2 bins away (up to flooring)
    assert min((b - b2) % 9, (b2 - b) % 9) in (4, 5)


def test_unsigned_orientation_and_constant_images():
    img = torch.rand(2, 3, 16, 16)
    hog = HOG(nbins=9, cell=4)
    assert torch.allclose(hog(img), hog(-img), atol=1e-5)  # opposite gradients share a bin
    assert hog(torch.full((1, 2, 8, 8), 0.3)).abs().max() == 0  # no gradient, no energy


def test_each_channel_cell_histogram_is_unit_norm():
    h = HOG(nbins=6, cell=4)(torch.rand(2, 3, 12, 8))
    assert h.shape == (2, 18, 3, 2)
    norms = h.view(2, 3, 6, 3, 2).norm(dim=2)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-4)


def test_patch_targets_hold_the_cells_of_their_patch():
    grid = PatchGrid.make((8, 12), 4, 2)
    target = HOGTarget(grid, cell=2, nbins=9)
    img = torch.rand(3, 2, 8, 12)
    t = target(img)
    assert t.shape == (3, 6, target.dim) and target.dim == 2 * 2 * 2 * 9
    cells = target.hog(img)  # [3, 18, 4, 6]
    # patch (row 1, col 2) -> cells rows 2..3, cols 4..5, flattened (cell-row, cell-col, channel, bin)
    expected = cells[1, :, 2:4, 4:6].permute(1, 2, 0).reshape(-1)
    torch.testing.assert_close(t[1, 1 * 3 + 2], expected)


def test_cell_must_divide_the_patch():
    with pytest.raises(ValueError, match="divide the patch"):
        HOGTarget(PatchGrid.make(16, 4, 1), cell=3)
    assert math.isfinite(float(HOG(cell=8)(torch.rand(1, 1, 20, 20)).sum()))  # trailing pixels dropped
