"""VQ-VAE (van den Oord et al. 2017) with EMA codebook updates and dead-code restarts.

The encoder (the same convolutional stack as the DALL-E dVAE, from
``dalle_framework.nn``) maps an image to a ``code_dim`` vector per grid cell; each
vector is replaced by its nearest codebook entry, with straight-through
gradients. The loss is ``recon + beta * |z_e - sg(z_q)|^2`` (commitment). The
codebook is not learned by gradients: it is an exponential moving average of the
encoder vectors assigned to each code (Laplace-smoothed counts), and a code left
unused for ``restart_after`` training steps is re-initialised from a random encoder
vector of the batch. All codebook state lives in buffers, so DeepSpeed / DDP keep
it in checkpoints; under torch.distributed the statistics are all-reduced and the
restart vectors broadcast from rank 0 so every rank holds the same codebook.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from dalle_framework import CodecFacts, ImageCodec, distributed
from dalle_framework.metrics import codebook_usage, psnr_from_mse
from dalle_framework.nn import RECONSTRUCTIONS, ConvDecoder, ConvEncoder, check_images, nearest_code, sample_rows, token_grid

from .params import VQVAEParams


def _distributed() -> bool:
    return distributed.is_initialized() and distributed.world_size() > 1


class EMACodebook(nn.Module):
    """Nearest-code quantiser whose codes track EMA means of their assigned vectors.

    ``forward(z[B, D, h, w]) -> (z_q[B, D, h, w] straight-through, codes[B, h, w])``;
    EMA and restarts happen only in training mode.
    """

    def __init__(self, vocab_size: int, dim: int, *, decay: float, eps: float, restart_after: Optional[int], init_from_data: bool) -> None:
        super().__init__()
        self.vocab_size, self.dim, self.decay, self.eps = vocab_size, dim, decay, eps
        self.restart_after = restart_after
        codebook = torch.randn(vocab_size, dim)
        self.register_buffer("codebook", codebook)
        self.register_buffer("ema_count", torch.ones(vocab_size))
        self.register_buffer("ema_sum", codebook.clone())
        self.register_buffer("unused_steps", torch.zeros(vocab_size, dtype=torch.long))
        self.register_buffer("initialised", torch.tensor(not init_from_data))

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes ``[B, h, w]`` -> vectors ``[B, D, h, w]``."""
        return rearrange(F.embedding(codes, self.codebook), "b h w d -> b d h w")

    def quantise(self, z: torch.Tensor) -> torch.Tensor:
        """``[B, D, h, w]`` -> nearest codes ``[B, h, w]``."""
        flat = rearrange(z, "b d h w -> (b h w) d").float()
        return nearest_code(flat, self.codebook.float()).view(z.shape[0], *z.shape[2:])

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training:
            self._update(rearrange(z.detach(), "b d h w -> (b h w) d").float())
        codes = self.quantise(z)
        z_q = self.lookup(codes).to(z.dtype)
        return z + (z_q - z).detach(), codes

    @torch.no_grad()
    def _update(self, flat: torch.Tensor) -> None:
        """One EMA step on encoder vectors ``flat[N, D]``, then restart dead codes."""
        if not bool(self.initialised):
            # Data-dependent initialisation: codes start on encoder outputs, so all are reachable.
            self._set_codes(torch.arange(self.vocab_size, device=flat.device), self._shared_sample(flat, self.vocab_size))
            self.initialised.fill_(True)
        codes = nearest_code(flat, self.codebook.float())
        one_hot = F.one_hot(codes, self.vocab_size).type_as(flat)  # [N, K]
        count, total = one_hot.sum(0), one_hot.t() @ flat
        if _distributed():
            dist.all_reduce(count)
            dist.all_reduce(total)
        self.ema_count.mul_(self.decay).add_(count, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(total, alpha=1 - self.decay)
        n = self.ema_count.sum()
        smoothed = (self.ema_count + self.eps) / (n + self.vocab_size * self.eps) * n  # Laplace smoothing
        self.codebook.copy_(self.ema_sum / smoothed[:, None])

        self.unused_steps.add_(1).masked_fill_(count > 0, 0)
        if self.restart_after is not None:
            dead = (self.unused_steps >= self.restart_after).nonzero().flatten()
            if dead.numel():
                self._set_codes(dead, self._shared_sample(flat, dead.numel()))

    def _shared_sample(self, flat: torch.Tensor, n: int) -> torch.Tensor:
        """``n`` random rows of ``flat``, identical on every rank (rank 0's draw)."""
        rows = sample_rows(flat, n)
        if _distributed():
            dist.broadcast(rows, src=0)
        return rows

    def _set_codes(self, idx: torch.Tensor, vectors: torch.Tensor) -> None:
        self.codebook[idx] = vectors
        self.ema_sum[idx] = vectors
        self.ema_count[idx] = 1.0
        self.unused_steps[idx] = 0


class VQVAE(ImageCodec):
    """VQ-VAE codec over the DALL-E convolutional encoder / decoder.

    - ``encode(images[B,3,H,W] in [0,1]) -> LongTensor[B, h*w]`` (nearest codes)
    - ``decode(LongTensor[B, h*w]) -> images[B,3,H,W]`` in [0,1]
    - ``loss(images, step) -> {loss, recon, commitment, perplexity, usage, unused_last_step, psnr}``
      (``unused_last_step``: fraction of codes no vector of this step chose)
    """

    Params = VQVAEParams

    @classmethod
    def describe(cls, params: "VQVAE.Params") -> CodecFacts:
        return params.facts()

    def __init__(self, params: "VQVAE.Params") -> None:
        super().__init__()
        self.params = params
        self.adopt(params.facts())
        self.recon = RECONSTRUCTIONS[params.loss](params.eps)
        self.encoder = ConvEncoder.from_params(params, out_channels=params.code_dim)
        self.quantiser = EMACodebook(
            params.vocab_size,
            params.code_dim,
            decay=params.decay,
            eps=params.ema_eps,
            restart_after=params.restart_after,
            init_from_data=params.init_from_data,
        )
        self.decoder = ConvDecoder.from_params(params, in_channels=params.code_dim, out_channels=self.recon.out_channels)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] -> encoder vectors ``[B, D, h, w]``."""
        check_images(images, self.image_size)
        return self.encoder(images * 2 - 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return rearrange(self.quantiser.quantise(self.embed(images)), "b h w -> b (h w)")

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        codes = token_grid(tokens, self.grid)
        param = next(self.decoder.parameters())
        return self.recon.to_image(self.decoder(self.quantiser.lookup(codes).to(param.dtype)))

    def loss(self, images: torch.Tensor, step: int = 0) -> dict[str, Any]:
        z = self.embed(images)
        z_q, codes = self.quantiser(z)
        out = self.decoder(z_q)
        recon = self.recon.nll(out, images)
        commitment = F.mse_loss(z, self.quantiser.lookup(codes).to(z.dtype).detach())
        with torch.no_grad():
            stats = codebook_usage(codes, self.vocab_size)
            mse = F.mse_loss(self.recon.to_image(out).float(), images.float()).clamp_min(1e-10)
            dead = (self.quantiser.unused_steps > 0).float().mean()
        return {
            "loss": recon + self.params.beta * commitment,
            "recon": recon.detach(),
            "commitment": commitment.detach(),
            "perplexity": stats["perplexity"],
            "usage": stats["usage"],
            "unused_last_step": float(dead),
            "psnr": float(psnr_from_mse(mse)),
        }
