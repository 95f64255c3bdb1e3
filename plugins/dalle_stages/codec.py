"""Stage 1: the image codec, trained on the recipe's images and measured by hard-token reconstruction."""

from __future__ import annotations

import math
from functools import cached_property
from typing import Any, Optional

import torch
from pydantic import Field
from torch import nn

from dalle_framework import CodecFacts, Preview, Stage, TrainConfig
from dalle_framework.data import as_model_images, save_grid
from dalle_framework.metrics import codebook_usage


class CodecTrain(TrainConfig):
    hflip: bool = Field(
        False, description="mirror each training image left-right with probability 1/2 (only here: captions name directions)"
    )


class CodecStage(Stage):
    """Trains the recipe's ``codec`` on its images; hands the prior the codes and grid."""

    Params = CodecTrain
    kind = "codec"
    required = True
    uses = ("data",)

    @classmethod
    def seed_offset(cls) -> int:
        return 0

    @cached_property
    def facts(self) -> CodecFacts:
        block = self.block
        return self.pipe.manager.registry(self.kind).get(block.name).describe(block.params)

    def provides(self) -> dict[str, Any]:
        return {"image_vocab_size": self.facts.vocab_size, "grid": self.facts.grid, "image_size": self.facts.image_size}

    def columns(self, split: str) -> list[Any]:
        images, _ = self.pipe.split(split)
        return [images]

    def step_args(self, batch, step, device):
        return (as_model_images(batch[0], self.facts.image_size, device), step)

    def augment(self, batch, key):
        if not self.train.hflip:
            return batch
        images = batch[0]
        generator = torch.Generator().manual_seed(self.pipe.recipe.seed * 1_000_003 + key)
        mirror = torch.rand(len(images), generator=generator) < 0.5
        return [torch.where(mirror[:, None, None, None], images.flip(-1), images), *batch[1:]]

    def evaluate(self, module, device, *, limit=None):
        """Loss terms and reconstruction; a frozen codec (converted, maybe with no training loss) only reconstructs."""
        if self.block.frozen:
            return self.extra_metrics(module, device, limit or self.train.eval_batches * self.train.batch_size)
        return super().evaluate(module, device, limit=limit)

    @torch.no_grad()
    def extra_metrics(self, module, device, limit):
        return codec_metrics(module, self.heldout(limit)[0], batch_size=self.train.batch_size, device=device)

    def report(self, module, device, cfg) -> dict[str, Any]:
        images = self.heldout(cfg.batches * cfg.batch_size)[0]
        report = codec_metrics(module, images, batch_size=cfg.batch_size, device=device)
        preview = self.preview(module, device)
        grid = save_grid(preview.images.flatten(0, 1).cpu(), self.pipe.run_dir / "eval" / "codec.png", nrow=preview.images.shape[1])
        return {**report, "grid": str(grid)}

    @torch.no_grad()
    def preview(self, module, device) -> Optional[Preview]:
        images = as_model_images(self.heldout(8)[0], module.image_size, device)
        recon = at_size(module.decode(module.encode(images)).clamp(0, 1), images)
        return Preview(torch.stack([images, recon]), ["held-out images", "their hard-token reconstructions"])


def at_size(decoded: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Decoded images at the side of the images they encode: a decoder that returns larger
    ones (ruDALL-E's wavelet decoder: twice the side) is measured at the input size."""
    if decoded.shape[-2:] == images.shape[-2:]:
        return decoded
    return torch.nn.functional.interpolate(decoded, size=images.shape[-2:], mode="area")


@torch.no_grad()
def codec_metrics(codec: nn.Module, images: torch.Tensor, *, batch_size: int = 64, device: torch.device | str = "cpu") -> dict[str, float]:
    """Hard-token reconstruction of uint8 ``images[N,3,H,W]``.

    ``mse`` and ``psnr`` (mean of per-image PSNR in dB, pixels in [0,1]) come from
    argmax codes decoded; ``psnr_of_mean_mse`` is the stricter split-level figure
    ``10 log10(1 / mse)``. ``codebook_usage`` is the share of codes used at least
    once and ``perplexity`` the exponentiated entropy of the code histogram.
    """
    mse_sum, psnr_sum, n = 0.0, 0.0, 0
    codes: list[torch.Tensor] = []
    for start in range(0, len(images), batch_size):
        batch = as_model_images(images[start : start + batch_size], codec.image_size, device)
        tokens = codec.encode(batch)
        recon = at_size(codec.decode(tokens).clamp(0, 1), batch)
        per_image = (recon - batch).pow(2).flatten(1).mean(1)
        mse_sum += float(per_image.sum())
        psnr_sum += float((10 * torch.log10(1.0 / per_image.clamp_min(1e-10))).sum())
        n += len(batch)
        codes.append(tokens.cpu())
    usage = codebook_usage(torch.cat(codes), codec.vocab_size)
    return {
        "mse": mse_sum / max(n, 1),
        "psnr": psnr_sum / max(n, 1),
        "psnr_of_mean_mse": 10 * math.log10(1.0 / max(mse_sum / max(n, 1), 1e-10)),
        "images": n,
        "codebook_usage": usage["usage"],
        "perplexity": usage["perplexity"],
    }
