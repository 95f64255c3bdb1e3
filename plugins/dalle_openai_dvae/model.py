"""OpenAI's released DALL-E dVAE (Ramesh et al. 2021, appendix A), as a codec.

The released encoder and decoder are the paper's architecture, which the core
already implements (:class:`dalle_framework.nn.ConvEncoder` / ``ConvDecoder``):
four groups of bottleneck residual blocks (encoder kernels 3,3,3,1; decoder
1,3,3,3), residual branches scaled by ``1 / n_layers**2``, 2x2 max-pooling down,
nearest-neighbour upsampling, a 7x7 encoder stem and a 1x1 decoder stem of
``decoder_init`` channels over one-hot codes. So a 256x256 image becomes a
32x32 grid of 8192 codes. What is specific to the release:

- pixels: the encoder reads ``map_pixels(x) = 0.8 x + 0.1`` (the paper's
  ``[eps, 1 - eps]`` squeeze, eps = 0.1); the decoder outputs logit-Laplace
  parameters (6 channels) and the image is ``unmap_pixels(sigmoid(mu))``.
- tokens: ``encode`` takes the argmax of the encoder's logits.

``loss`` is the paper's objective at the end of its schedules, for fine-tuning:
Gumbel-softmax relaxation at temperature ``tau`` (paper: annealed to 1/16),
logit-Laplace NLL per pixel dimension + ``kl_weight`` (paper: 6.6) times the KL of
the posterior to the uniform prior, normalised by the same count.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from einops import rearrange

from dalle_framework import CodecFacts, ImageCodec
from dalle_framework.metrics import codebook_usage, psnr_from_mse
from dalle_framework.nn import ConvDecoder, ConvEncoder, LogitLaplace, check_images, kl_to_uniform, token_grid

from .layout import GROUPS
from .params import OpenAIDVAEParams

LOGIT_LAPLACE_EPS = 0.1  # dall_e's map_pixels / unmap_pixels


class OpenAIDVAE(ImageCodec):
    """OpenAI's released DALL-E dVAE: 8192 codes, a 32x32 grid at 256x256.

    - ``encode(images[B,3,H,W] in [0,1]) -> LongTensor[B, (H/8)*(W/8)]`` (argmax codes)
    - ``decode(LongTensor[B, h*w]) -> images[B,3,8h,8w]`` in [0,1]
    - ``loss(images, step) -> {loss, recon, kl, perplexity, usage, psnr}`` (the paper's, to fine-tune)

    Weights come from ``dalle convert openai-dvae encoder.pkl decoder.pkl OUT --trust-pickle``.
    """

    Params = OpenAIDVAEParams

    @classmethod
    def describe(cls, params: "OpenAIDVAE.Params") -> CodecFacts:
        side = params.image_size // 2 ** (GROUPS - 1)  # the encoder pools between its groups
        return CodecFacts(params.vocab_size, (side, side), params.image_size)

    def __init__(self, params: Optional["OpenAIDVAE.Params"] = None, **runtime: Any) -> None:
        super().__init__()
        self.params = params = params or self.Params()
        self.adopt(self.describe(params))
        self.pixels = LogitLaplace(LOGIT_LAPLACE_EPS)
        shape = dict(width=params.hidden, channel_mults=[1, 2, 4, 8], blocks_per_group=params.blocks_per_group)
        self.encoder = ConvEncoder(out_channels=params.vocab_size, stem_kernel=7, **shape)
        self.decoder = ConvDecoder(
            in_channels=params.vocab_size, out_channels=self.pixels.out_channels, stem_width=params.decoder_init, **shape
        )

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] -> code logits ``[B, K, H/8, W/8]``."""
        check_images(images, self.image_size)
        return self.encoder(self.pixels.map_pixels(images))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return rearrange(self.logits(images).argmax(dim=1), "b h w -> b (h w)")

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.pixels.to_image(self.decoder.forward_tokens(token_grid(tokens, self.grid)))

    def loss(self, images: torch.Tensor, step: int = 0) -> dict[str, Any]:
        logits = self.logits(images)  # [B, K, h, w]
        out = self.decoder(F.gumbel_softmax(logits, tau=self.params.tau, hard=False, dim=1))
        recon = self.pixels.nll(out, images)
        # KL(q || uniform) per cell, summed over cells and divided by the pixel dimensions like recon.
        log_q = F.log_softmax(logits.float(), dim=1)
        kl = kl_to_uniform(log_q.exp(), log_q, dim=1).sum(dim=(1, 2)).mean() / images[0].numel()
        with torch.no_grad():
            stats = codebook_usage(logits.argmax(dim=1), self.vocab_size)
            mse = F.mse_loss(self.pixels.to_image(out).float(), images.float()).clamp_min(1e-10)
        return {
            "loss": recon + self.params.kl_weight * kl,
            "recon": recon.detach(),
            "kl": kl.detach(),
            "perplexity": stats["perplexity"],
            "usage": stats["usage"],
            "psnr": float(psnr_from_mse(mse)),
        }

    @classmethod
    def convert_released(cls, files, out_dir, *, trust_pickle: bool, params=None) -> dict:
        from .convert import convert_openai_files  # reads released files; imported when converting only

        return convert_openai_files(cls, files, out_dir, trust_pickle=trust_pickle, overrides=params)
