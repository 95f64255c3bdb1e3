"""Stage 1: the image codec, trained on the recipe's images and measured by hard-token reconstruction."""

from __future__ import annotations

from functools import cached_property
from typing import Any, Iterable, Optional

import torch
from torch import nn

from dalle_framework import CodecFacts, Preview, Stage, distributed
from dalle_framework.data import as_model_images, image_tensor, save_grid
from dalle_framework.metrics import histogram_usage, psnr_from_mse

from .params import CodecSpec


class CodecStage(CodecSpec, Stage):
    """Trains the recipe's ``codec`` on its images; hands the prior the codes and grid."""

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

    def record(self, sample) -> tuple:
        return (image_tensor(sample.image),)

    def step_args(self, batch, step, device):
        return (as_model_images(batch[0], self.facts.image_size, device), step)

    def augment(self, batch, key):
        if not self.train.hflip:
            return batch
        images = batch[0]
        generator = torch.Generator().manual_seed(self.pipe.recipe.seed * 1_000_003 + key)
        mirror = torch.rand(len(images), generator=generator) < 0.5
        return [torch.where(mirror[:, None, None, None], images.flip(-1), images), *batch[1:]]

    def evaluate(self, module, device, *, limit=None, collective=False):
        """Loss terms and reconstruction; a frozen codec (converted, maybe with no training loss) only reconstructs."""
        if self.block.frozen:
            return self.extra_metrics(module, device, limit or self.train.eval_batches * self.train.batch_size, collective=collective)
        return super().evaluate(module, device, limit=limit, collective=collective)

    @torch.no_grad()
    def extra_metrics(self, module, device, limit, *, collective=False):
        batches = ((batch[0], weight) for batch, weight in self.heldout_batches(limit, collective=collective))
        return codec_metrics(module, batches, device=device, collective=collective)

    def report(self, module, device, cfg) -> dict[str, Any]:
        images = self.heldout(cfg.batches * cfg.batch_size)[0]
        report = codec_metrics(module, ((images[i : i + cfg.batch_size], 1.0) for i in range(0, len(images), cfg.batch_size)), device=device)
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
def codec_metrics(codec: nn.Module, batches: Iterable[tuple[torch.Tensor, float]], *, device: torch.device | str = "cpu",
                  collective: bool = False) -> dict[str, float]:
    """Hard-token reconstruction of ``(uint8 images[B,3,H,W], weight)`` batches (weight 0: a batch run only
    to keep ranks in step), summed over ranks when ``collective``.

    ``mse`` and ``psnr`` (mean of per-image PSNR in dB, pixels in [0,1]) come from
    argmax codes decoded; ``psnr_of_mean_mse`` is the stricter split-level figure
    ``10 log10(1 / mse)``. ``codebook_usage`` is the share of codes used at least
    once and ``perplexity`` the exponentiated entropy of the code histogram.
    """
    mse_sum, psnr_sum, n = 0.0, 0.0, 0.0
    histogram = torch.zeros(codec.vocab_size, dtype=torch.float64)
    for images, weight in batches:
        batch = as_model_images(images, codec.image_size, device)
        tokens = codec.encode(batch)
        recon = at_size(codec.decode(tokens).clamp(0, 1), batch)
        per_image = (recon - batch).float().pow(2).flatten(1).mean(1)
        mse_sum += float(per_image.sum()) * weight
        psnr_sum += float(psnr_from_mse(per_image).sum()) * weight
        n += len(batch) * weight
        histogram += torch.bincount(tokens.flatten().cpu(), minlength=codec.vocab_size).double() * weight
    if collective:
        *sums, mse_sum, psnr_sum, n = distributed.sum_over_ranks([*histogram.tolist(), mse_sum, psnr_sum, n])
        histogram = torch.tensor(sums, dtype=torch.float64)
    usage = histogram_usage(histogram)
    return {
        "mse": mse_sum / max(n, 1),
        "psnr": psnr_sum / max(n, 1),
        "psnr_of_mean_mse": psnr_from_mse(mse_sum / max(n, 1)),
        "images": int(n),
        "codebook_usage": usage["usage"],
        "perplexity": usage["perplexity"],
    }
