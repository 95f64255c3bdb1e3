"""The reranker stage: a contrastive image-text model trained on the recipe's pairs."""

from __future__ import annotations

from typing import Any, Optional

import torch

from dalle_framework import Preview, Stage
from dalle_framework.data import image_tensor

from .params import RerankerSpec

PREVIEW_POOL = 64  # held-out images the preview retrieves from


class RerankerStage(RerankerSpec, Stage):
    """Trains the recipe's ``reranker`` on image-caption pairs; measured by held-out retrieval."""

    @classmethod
    def seed_offset(cls) -> int:
        return 2

    def columns(self, split: str) -> list[Any]:
        images, captions = self.pipe.split(split)
        return [images, captions]

    def record(self, sample) -> tuple:
        return (image_tensor(sample.image), sample.caption)

    def step_args(self, batch, step, device):
        return (batch[0].to(device).float() / 255.0, list(batch[1]))

    def extra_metrics(self, module, device, limit, *, collective=False):
        # Retrieval ranks every held-out image against every caption, so each rank scores all of them
        # (the same work on every rank: under ZeRO-3 they must run the same forward passes anyway).
        images, captions = self.heldout(limit)
        metrics = module.retrieval_metrics(images.to(device).float() / 255.0, list(captions))
        return {f"retrieval_{k}": float(v) for k, v in metrics.items()}

    def report(self, module, device, cfg) -> dict[str, Any]:
        return self.extra_metrics(module, device, cfg.batches * cfg.batch_size)

    @torch.no_grad()
    def preview(self, module, device) -> Optional[Preview]:
        """Its top retrievals: for four held-out captions, the held-out images it scores best, best first."""
        images, captions = self.heldout(PREVIEW_POOL)
        if not len(captions):
            return None
        queries = list(dict.fromkeys(captions))[:4]
        pool = images.to(device).float() / 255.0
        best = module.similarity(pool, queries).topk(min(4, len(pool)), dim=0).indices.T  # [captions, k]
        return Preview(pool[best.to(pool.device)].cpu(), queries)
