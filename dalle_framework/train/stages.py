"""The three training stages: what each trains on and how it is evaluated.

A stage knows its data and its metrics; the loop in :mod:`.loop` knows
engines, checkpoints, logging and resume, and is the same for all stages.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .. import checkpoint as ckpt
from ..errors import UsageError
from ..pipeline import Pipeline, _fit
from .batches import ShuffledBatches, chunks

LN2 = math.log(2.0)


def load_images(pipe: Pipeline, split: str) -> tuple[torch.Tensor, list[str]]:
    """A split of the recipe's data as uint8 ``[N,3,H,W]`` plus captions, cached per pipeline."""
    from ..data.images import load_split

    key = f"images/{split}"
    if key not in pipe._cache:
        pipe._cache[key] = load_split(pipe.data, split, progress=True)
    return pipe._cache[key]


def as_float(images: torch.Tensor, size: int, device: torch.device) -> torch.Tensor:
    """uint8 ``[B,3,H,W]`` -> float in [0,1] at the codec's size."""
    return _fit(images.to(device).float() / 255.0, size)


class Stage:
    """One trainable component of a pipeline."""

    name: str = ""

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe = pipe

    @property
    def train(self):
        return self.pipe.block(self.name).train

    def build(self) -> nn.Module:
        return self.pipe.new_component(self.name)

    def columns(self, split: str) -> list[Any]:
        raise NotImplementedError

    def batches(self, *, rank: int, world_size: int) -> ShuffledBatches:
        return ShuffledBatches(
            self.columns("train"), batch_size=self.train.batch_size, seed=self.pipe.recipe.seed, rank=rank, world_size=world_size
        )

    def step_args(self, batch: list[Any], step: int, device: torch.device) -> tuple:
        raise NotImplementedError

    def augment(self, batch: list[Any], key: int) -> list[Any]:
        """A training batch after random augmentation; ``key`` seeds it, so resumed runs replay it exactly."""
        return batch

    def heldout(self, limit: int) -> list[Any]:
        return [c[:limit] for c in self.columns("heldout")]

    @torch.no_grad()
    def evaluate(self, module: nn.Module, device: torch.device, *, limit: Optional[int] = None) -> dict[str, float]:
        """Mean of the loss terms over held-out batches (``limit`` samples, or all)."""
        limit = limit or self.train.eval_batches * self.train.batch_size
        totals: dict[str, float] = {}
        count = 0
        was_training = module.training
        module.eval()
        for batch in chunks(self.heldout(limit), self.train.batch_size):
            out = module(*self.step_args(batch, self.train.steps, device))
            size = len(batch[0])
            for key, value in out.items():
                totals[key] = totals.get(key, 0.0) + float(value) * size
            count += size
        module.train(was_training)
        metrics = {k: v / max(count, 1) for k, v in totals.items()}
        metrics.update(self.extra_metrics(module, device, limit))
        return metrics

    def extra_metrics(self, module: nn.Module, device: torch.device, limit: int) -> dict[str, float]:
        return {}

    def preview(self, module: nn.Module, device: torch.device) -> Optional[torch.Tensor | tuple[torch.Tensor, list[str]]]:
        """Images ``[B,3,H,W]`` in [0,1] worth a look in TensorBoard, or None; or
        ``(images, captions)`` when image ``b`` was drawn for ``captions[b]`` (shown beside it)."""
        return None


class CodecStage(Stage):
    name = "codec"
    image_size: Optional[int] = None  # known once the codec is built

    def build(self) -> nn.Module:
        module = super().build()
        self.image_size = module.image_size
        return module

    def columns(self, split: str) -> list[Any]:
        images, _ = load_images(self.pipe, split)
        return [images]

    def step_args(self, batch, step, device):
        size = self.image_size or self.pipe.codec.image_size
        return (as_float(batch[0], size, device), step)

    def augment(self, batch, key):
        if not self.train.hflip:
            return batch
        images = batch[0]
        generator = torch.Generator().manual_seed(self.pipe.recipe.seed * 1_000_003 + key)
        mirror = torch.rand(len(images), generator=generator) < 0.5
        return [torch.where(mirror[:, None, None, None], images.flip(-1), images), *batch[1:]]

    @torch.no_grad()
    def extra_metrics(self, module, device, limit):
        from ..evaluation import codec_metrics

        images = self.heldout(limit)[0]
        return codec_metrics(module, images, batch_size=self.train.batch_size, device=device)

    @torch.no_grad()
    def preview(self, module, device):
        images = as_float(self.heldout(8)[0], module.image_size, device)
        return torch.cat([images, module.decode(module.encode(images)).clamp(0, 1)])


class PriorStage(Stage):
    """Trains on text and image tokens; images are encoded once by the frozen codec."""

    name = "prior"

    def tokens(self, split: str) -> dict[str, Any]:
        key = f"tokens/{split}"
        if key not in self.pipe._cache:
            self.pipe._cache[key] = encode_tokens(self.pipe, split)
        return self.pipe._cache[key]

    def columns(self, split: str) -> list[Any]:
        data = self.tokens(split)
        return [data["text"], data["image_tokens"]]

    def step_args(self, batch, step, device):
        return (batch[0].to(device).long(), batch[1].to(device).long())

    def evaluate(self, module, device, *, limit=None):
        metrics = super().evaluate(module, device, limit=limit)
        if "image_loss" in metrics:
            metrics["bits_per_image_token"] = metrics["image_loss"] / LN2
        return metrics

    @torch.no_grad()
    def preview(self, module, device):
        from ..interfaces import Sampling

        captions = self.tokens("heldout")["captions"][:4]
        if not captions:
            return None
        text = self.pipe.tokenizer.encode(captions).to(device)
        generator = torch.Generator(device).manual_seed(0)
        tokens = module.generate(text, Sampling(), generator=generator)
        return self.pipe.codec.decode(tokens).clamp(0, 1), list(captions)


class RerankerStage(Stage):
    name = "reranker"

    def columns(self, split: str) -> list[Any]:
        images, captions = load_images(self.pipe, split)
        return [images, captions]

    def step_args(self, batch, step, device):
        return (batch[0].to(device).float() / 255.0, list(batch[1]))

    @torch.no_grad()
    def extra_metrics(self, module, device, limit):
        metric = getattr(module, "retrieval_metrics", None)
        if metric is None:
            return {}
        images, captions = self.heldout(limit)
        return {f"retrieval_{k}": float(v) for k, v in metric(images.to(device).float() / 255.0, list(captions)).items()}


STAGE_CLASSES: dict[str, type[Stage]] = {cls.name: cls for cls in (CodecStage, PriorStage, RerankerStage)}


def make_stage(pipe: Pipeline, name: str) -> Stage:
    if name not in STAGE_CLASSES:
        raise UsageError(f"unknown stage {name!r}; choose one of {', '.join(STAGE_CLASSES)}")
    return STAGE_CLASSES[name](pipe)


@torch.no_grad()
def encode_tokens(pipe: Pipeline, split: str, *, batch_size: int = 256) -> dict[str, Any]:
    """Image tokens of a split from the trained codec, cached as a token shard in the run dir.

    The shard records the codec weights' fingerprint, so retraining the codec
    invalidates it instead of silently training on stale tokens.
    """
    from ..data.tokens import load_token_shard, save_token_shard
    from tqdm.auto import tqdm

    path = pipe.run_dir / "tokens" / f"{split}.safetensors"
    fingerprint = codec_fingerprint(pipe.run_dir)
    if path.is_file():
        shard = load_token_shard(path)
        if shard["meta"].get("codec") == fingerprint:
            return shard
    codec = pipe.codec
    images, captions = load_images(pipe, split)
    device = next(codec.parameters()).device
    tokens = [
        codec.encode(as_float(batch, codec.image_size, device)).cpu()
        for (batch,) in tqdm(list(chunks([images], batch_size)), desc=f"encode {split}", leave=False)
    ]
    image_tokens = torch.cat(tokens) if tokens else torch.zeros(0, codec.tokens_per_image, dtype=torch.long)
    text = pipe.tokenizer.encode(captions) if captions else torch.zeros(0, pipe.tokenizer.text_len, dtype=torch.long)
    save_token_shard(path, text, image_tokens, captions, {"codec": fingerprint, "split": split})
    return load_token_shard(path)


def codec_fingerprint(run_dir: Path) -> str:
    meta = run_dir / "codec" / ckpt.META_FILE
    if not meta.is_file():
        raise UsageError(f"{run_dir}: train the codec first (`dalle train ... --stage codec`)")
    data = ckpt.read_json(meta)
    return f"{data.get('finished_at', '')}:{data.get('step', '')}"
