"""Focal frequency loss (Jiang et al., ICCV 2021), as A2MIM uses it (openmixup's FocalFrequencyLoss).

Both images go to the 2-D spectrum (orthonormal FFT over H, W). The loss is the mean over frequencies of
w(u, v) * |F_pred(u, v) - F_target(u, v)|^2. The weight w is the spectral error itself, |dF|^alpha, optionally
log(1 + .)-compressed, divided by its maximum, and detached. So frequencies the model gets most wrong ("hard"
frequencies) weigh most, and frequencies it already reproduces weigh little. A2MIM's setting (alpha 1, average
spectrum, log matrix, batch matrix) is the default here.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def spectrum(images: torch.Tensor) -> torch.Tensor:
    """Orthonormal 2-D FFT over the last two dims as (real, imag) pairs: [..., H, W, 2], in float32."""
    f = torch.fft.fft2(images.float(), dim=(-2, -1), norm="ortho")
    return torch.stack([f.real, f.imag], dim=-1)


def spectrum_weight(f_pred: torch.Tensor, f_target: torch.Tensor, alpha: float = 1.0, log_matrix: bool = True,
                    batch_matrix: bool = True) -> torch.Tensor:
    """The focal weight [..., H, W] in [0, 1], detached: |dF|^alpha (log(1 + .) if `log_matrix`) divided by
    its maximum over the whole tensor (`batch_matrix`) or per image and channel."""
    with torch.no_grad():
        d = f_pred - f_target
        w = (d[..., 0] ** 2 + d[..., 1] ** 2).sqrt() ** alpha
        if log_matrix:
            w = torch.log1p(w)
        if batch_matrix:
            peak = w.max()
        else:
            peak = w.flatten(-2).max(dim=-1).values[..., None, None]
        # where the error is zero everywhere the reference's 0/0 becomes 0: no weight, no loss
        w = torch.where(peak > 0, w / peak.clamp_min(torch.finfo(w.dtype).tiny), torch.zeros_like(w))
        return w.clamp(0.0, 1.0)


class FocalFrequencyLoss(nn.Module):
    def __init__(self, alpha: float = 1.0, ave_spectrum: bool = True, log_matrix: bool = True,
                 batch_matrix: bool = True):
        super().__init__()
        self.alpha, self.ave_spectrum = alpha, ave_spectrum
        self.log_matrix, self.batch_matrix = log_matrix, batch_matrix

    def forward(self, pred: torch.Tensor, target: torch.Tensor, matrix: torch.Tensor | None = None) -> torch.Tensor:
        """Scalar loss for images [B, C, H, W]. `ave_spectrum` compares the minibatch-mean spectra (the FFT is
        linear, so this is the spectrum of the mean image: per-image errors that cancel across the batch do not
        count, as in the reference). `matrix` replaces the online weight with a fixed one."""
        f_pred, f_target = spectrum(pred), spectrum(target)
        if self.ave_spectrum:
            f_pred, f_target = f_pred.mean(0, keepdim=True), f_target.mean(0, keepdim=True)
        if matrix is None:
            weight = spectrum_weight(f_pred, f_target, self.alpha, self.log_matrix, self.batch_matrix)
        else:
            weight = matrix.detach()
        diff = f_pred - f_target
        return (weight * (diff[..., 0] ** 2 + diff[..., 1] ** 2)).mean()


__all__ = ["FocalFrequencyLoss", "spectrum", "spectrum_weight"]
