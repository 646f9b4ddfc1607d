import math

import pytest
import torch

from mimkit.losses.latent import (normalized_l2, patch_infonce, patch_retrieval_accuracy, similarity_regulariser,
                                  similarity_target, standardize_patches, within_image_cosine)


def test_infonce_on_a_hand_computed_case():
    # two patches, two dims. Standardising pred over the patches turns [[1, 0], [0, 1]] into directions
    # [1, -1]/sqrt2 and [-1, 1]/sqrt2; the targets stay e1, e2. Cosines: own target 1/sqrt2, the other -1/sqrt2,
    # so each row's cross-entropy is log(1 + exp(-sqrt2 / tau)), and the loss is that times 2 tau.
    pred = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    target = torch.eye(2)[None]
    for tau in (1.0, 0.2):
        expected = 2 * tau * math.log1p(math.exp(-math.sqrt(2) / tau))
        assert patch_infonce(pred, target, tau).item() == pytest.approx(expected, rel=1e-4)
    # without the standardisation the prediction is the target itself: cosines 1 and 0
    assert patch_infonce(pred, target, 1.0, standardize=False).item() == pytest.approx(2 * math.log1p(math.exp(-1)))


def test_infonce_positives_are_the_diagonal_and_negatives_stay_in_the_image():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(3, 10, 16, generator=g)
    right = patch_infonce(target, target)
    shifted = patch_infonce(target.roll(1, dims=1), target)  # every prediction paired with another patch
    assert right < shifted - 0.5
    # relabelling the patches (same permutation on both sides) changes nothing
    perm = torch.randperm(10, generator=g)
    torch.testing.assert_close(patch_infonce(target[:, perm], target[:, perm]), right)
    # the batch loss is the mean of per-image losses: no negatives from other images
    pred = torch.randn(3, 10, 16, generator=g)
    per_image = torch.stack([patch_infonce(pred[i:i + 1], target[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(patch_infonce(pred, target), per_image.mean())
    # what all predictions of an image share is removed first: an offset per image does not matter
    offset = torch.randn(3, 1, 16, generator=g) * 5
    torch.testing.assert_close(patch_infonce(pred + offset, target), patch_infonce(pred, target), rtol=1e-4, atol=1e-5)
    assert patch_retrieval_accuracy(target, target) == 1.0
    assert patch_retrieval_accuracy(target.roll(1, dims=1), target) < 0.5


def test_infonce_gradient_reaches_predictions_and_shapes_are_checked():
    pred = torch.randn(2, 5, 8, requires_grad=True)
    patch_infonce(pred, torch.randn(2, 5, 8)).backward()
    assert pred.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="at least 2"):
        patch_infonce(torch.randn(2, 1, 8), torch.randn(2, 1, 8))
    with pytest.raises(ValueError, match="both be"):
        patch_infonce(torch.randn(2, 5, 8), torch.randn(2, 4, 8))
    z = standardize_patches(torch.randn(2, 5, 8) * 3 + 1)
    torch.testing.assert_close(z.mean(1), torch.zeros(2, 8), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(1), torch.ones(2, 8), atol=1e-3, rtol=0)


def test_within_image_cosine_and_the_regulariser():
    # tokens e1, e2, (e1 + e2)/sqrt2: pair cosines 0, 1/sqrt2, 1/sqrt2 -> mean sqrt2 / 3 (self-pairs excluded)
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    assert within_image_cosine(x).item() == pytest.approx(math.sqrt(2) / 3)
    same = torch.ones(2, 4, 3)
    assert within_image_cosine(same).item() == pytest.approx(1.0)
    # the mean over images of each image's own mean
    both = torch.cat([x, -x[:, :, :]], 0)
    assert within_image_cosine(both).item() == pytest.approx(math.sqrt(2) / 3)
    reg = similarity_regulariser([x, same], 0.5, 0.1)
    assert reg.item() == pytest.approx(0.1 * ((math.sqrt(2) / 3 - 0.5) ** 2 + 0.25))
    with pytest.raises(ValueError):
        within_image_cosine(torch.randn(2, 1, 3))


def test_similarity_target_decays_along_a_cosine():
    assert similarity_target(0.0) == pytest.approx(0.75)
    assert similarity_target(0.5) == pytest.approx(0.5)
    assert similarity_target(1.0) == pytest.approx(0.25)
    assert similarity_target(2.0) == pytest.approx(0.25)
    assert similarity_target(0.25) > 0.5 + 0.125  # a cosine stays near the start longer than a line


def test_normalized_l2_regresses_per_token_standardised_targets():
    target = torch.randn(2, 5, 8) * 3 + 2
    z = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    assert normalized_l2(z, target).item() == pytest.approx(0.0, abs=1e-10)
    assert normalized_l2(torch.zeros_like(target), target).item() == pytest.approx(7 / 8, rel=1e-4)
