"""The DALL-E discrete VAE (Ramesh et al. 2021, section 2.1 and appendix A).

The encoder maps an image to logits over ``vocab_size`` codes per grid cell. For
training the categorical posterior is relaxed with Gumbel-softmax at temperature
``tau``; the decoder reads the (relaxed) one-hot codes through a 1x1 conv, which
is the codebook embedding. The loss is the paper's beta-ELBO:

    loss = recon_nll + beta * KL(q(z|x) || uniform) [+ usage_weight * KL(mean_batch q || uniform)]

Both terms are sums over the image normalised by the same count, the number of
pixel dimensions ``3 * H * W`` (``recon`` is the per-dimension NLL, ``kl`` is the
per-cell KL summed over the ``h * w`` cells and divided by ``3 * H * W``), so their
ratio is exactly the paper's and ``beta = 6.6`` means what it means there.
``tau`` anneals 1 -> 1/16 and ``beta`` 0 -> 6.6 on cosine schedules.

What mattered for hard-token quality in short CPU runs (emoji 64x64, 512 codes,
~10 CPU-minutes; see benchmarks/codec_quality.py): ``loss: mse`` (with logit-Laplace
every run left over half of the codebook unused, down to 1%, and 8x8 grids lost
1-4 dB), ``straight_through: true``
(the decoder trains on the hard codes that decode() sees), ``kl_end: 0`` (the KL to a
uniform prior fights sharp posteriors: 6.6 cost ~9 dB, 1.0 cost ~6 dB), ``usage_weight:
1`` (keeps >90% of codes in use), ``tau_steps`` ~ 80% of the run, ``stem_downsample: 4``
(full-resolution convs with few channels dominate CPU time), ``residual_gain: 1`` (the
paper's 1/n_layers^2 slows shallow stacks). The paper's defaults
(logit-Laplace, kl 6.6, soft relaxation) are for 3M-update GPU runs.

Outer-loop settings (owned by the trainer): AdamW, lr 2e-3 with ~100 warmup steps
for small CPU models (paper: 1e-4 at batch 512, cosine decay), batch 16 (more updates
beat bigger batches in a fixed CPU budget), no flips (these codecs underfit), weight
EMA 0.999 for long runs (paper), off for runs of a few thousand steps.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange

from dalle_framework import CodecFacts, ImageCodec
from dalle_framework.metrics import codebook_usage, psnr_from_mse
from dalle_framework.nn import RECONSTRUCTIONS, ConvDecoder, ConvEncoder, check_images, cosine_schedule, kl_to_uniform, token_grid

from .params import GumbelDVAEParams


class GumbelDVAE(ImageCodec):
    """Discrete VAE with a Gumbel-softmax relaxation.

    - ``encode(images[B,3,H,W] in [0,1]) -> LongTensor[B, h*w]`` (argmax of the logits)
    - ``decode(LongTensor[B, h*w]) -> images[B,3,H,W]`` in [0,1]
    - ``loss(images, step) -> {loss, recon, kl, usage_kl, tau, beta, perplexity, usage, psnr}``
      (``psnr``, ``usage`` and ``perplexity`` are of this batch: relaxed reconstruction, argmax codes)
    """

    Params = GumbelDVAEParams

    @classmethod
    def describe(cls, params: "GumbelDVAE.Params") -> CodecFacts:
        return params.facts()

    def __init__(self, params: "GumbelDVAE.Params") -> None:
        super().__init__()
        self.params = params
        self.adopt(params.facts())
        self.recon = RECONSTRUCTIONS[params.loss](params.eps)
        self.encoder = ConvEncoder.from_params(params, out_channels=params.vocab_size)
        # The decoder's first 1x1 conv over one-hot codes is the codebook embedding.
        self.decoder = ConvDecoder.from_params(params, in_channels=params.vocab_size, out_channels=self.recon.out_channels)

    # -- schedules ---------------------------------------------------------------------
    def tau(self, step: int) -> float:
        p = self.params
        return cosine_schedule(step, p.tau_start, p.tau_end, p.tau_steps)

    def beta(self, step: int) -> float:
        p = self.params
        return cosine_schedule(step, p.kl_start, p.kl_end, p.kl_steps)

    # -- the model -----------------------------------------------------------------------
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] -> code logits ``[B, K, h, w]``."""
        check_images(images, self.image_size)
        return self.encoder(images * 2 - 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return rearrange(self.logits(images).argmax(dim=1), "b h w -> b (h w)")

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(Relaxed) one-hot codes ``[B, K, h, w]`` -> decoder output ``[B, C, H, W]``."""
        return self.decoder(codes)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.recon.to_image(self.decoder.forward_tokens(token_grid(tokens, self.grid)))

    def loss(self, images: torch.Tensor, step: int = 0) -> dict[str, Any]:
        tau, beta = self.tau(step), self.beta(step)
        logits = self.logits(images)  # [B, K, h, w]
        codes = F.gumbel_softmax(logits, tau=tau, hard=self.params.straight_through, dim=1)
        out = self.decode_codes(codes)
        recon = self.recon.nll(out, images)

        # KL(q || uniform) per cell = sum_k q log q + log K; summed over cells, per pixel dim.
        log_q = F.log_softmax(logits.float(), dim=1)
        kl = kl_to_uniform(log_q.exp(), log_q, dim=1).sum(dim=(1, 2)).mean() / images[0].numel()  # cells [B, h, w] summed
        # The same divergence for the batch's average posterior: low when many codes are in use.
        mean_q = log_q.exp().mean(dim=(0, 2, 3))
        usage_kl = kl_to_uniform(mean_q, mean_q.clamp_min(1e-12).log(), dim=0)
        usage_kl = usage_kl * logits[0, 0].numel() / images[0].numel()

        with torch.no_grad():
            stats = codebook_usage(logits.argmax(dim=1), self.vocab_size)
            mse = F.mse_loss(self.recon.to_image(out).float(), images.float()).clamp_min(1e-10)
        return {
            "loss": recon + beta * kl + self.params.usage_weight * usage_kl,
            "recon": recon.detach(),
            "kl": kl.detach(),
            "usage_kl": usage_kl.detach(),
            "tau": tau,
            "beta": beta,
            "perplexity": stats["perplexity"],
            "usage": stats["usage"],
            "psnr": float(psnr_from_mse(mse)),
        }
