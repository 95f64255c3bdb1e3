"""Reconstruction likelihoods for image codecs.

A :class:`Reconstruction` says how many channels the decoder must produce, the
per-dimension negative log-likelihood of the target image under the decoder's
output, and how to turn that output back into an image in ``[0, 1]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class Reconstruction:
    """Decoder output ``[B, out_channels, H, W]`` <-> image ``[B, 3, H, W]`` in [0, 1]."""

    out_channels: int = 3

    def nll(self, out: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood per pixel dimension (scalar)."""
        raise NotImplementedError

    def to_image(self, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class LogitLaplace(Reconstruction):
    """The DALL-E paper's logit-Laplace likelihood (appendix A.3).

    Pixels are squeezed into ``[eps, 1 - eps]`` (``y = (1 - 2 eps) x + eps``) so their
    logits stay finite; the decoder predicts ``mu`` (in logit space) and ``ln b`` per
    channel (6 channels), and ``-ln p(y) = ln(2 b) + ln y + ln(1 - y) + |logit y - mu| / b``.
    The image is ``unmap(sigmoid(mu))``.
    """

    out_channels = 6

    def __init__(self, eps: float = 0.1) -> None:
        assert 0 < eps < 0.5, f"logit-Laplace eps must be in (0, 0.5), got {eps}"
        self.eps = eps

    def map_pixels(self, x: torch.Tensor) -> torch.Tensor:
        return (1 - 2 * self.eps) * x + self.eps

    def unmap_pixels(self, y: torch.Tensor) -> torch.Tensor:
        return ((y - self.eps) / (1 - 2 * self.eps)).clamp(0, 1)

    def nll(self, out: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        mu, log_b = out.chunk(2, dim=1)
        y = self.map_pixels(images)
        log_y, log_1my = torch.log(y), torch.log1p(-y)
        nll = math.log(2.0) + log_b + log_y + log_1my + (log_y - log_1my - mu).abs() * torch.exp(-log_b)
        return nll.mean()

    def to_image(self, out: torch.Tensor) -> torch.Tensor:
        return self.unmap_pixels(torch.sigmoid(out[:, :3]))


class MeanSquaredError(Reconstruction):
    """Plain MSE in pixel space (a fixed-variance Gaussian up to constants): directly optimises PSNR."""

    out_channels = 3

    def nll(self, out: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out, images)

    def to_image(self, out: torch.Tensor) -> torch.Tensor:
        return out.clamp(0, 1)


# Param value -> factory (``eps`` is only used by logit-Laplace).
RECONSTRUCTIONS = {
    "logit-laplace": lambda eps: LogitLaplace(eps),
    "mse": lambda eps: MeanSquaredError(),
}
