"""Stage 2: the transformer prior, trained on text tokens and the frozen codec's image tokens."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Optional

import torch

from dalle_framework import Preview, Sampling, Stage, UsageError, rundir
from dalle_framework.data import as_model_images, chunks, load_token_shard, save_token_shard

LN2 = math.log(2.0)
CODEC = "codec"  # the stage whose tokens this one models


class PriorStage(Stage):
    """Trains the recipe's ``prior`` on ``[caption tokens | image tokens]``.

    Images are encoded once per split by the trained codec into
    ``<run>/tokens/<split>.safetensors``; a shard records which codec run made it,
    so a retrained codec never leaves stale tokens behind.
    """

    kind = "prior"
    after = (CODEC,)
    uses = ("data", "tokenizer")

    @classmethod
    def seed_offset(cls) -> int:
        return 1

    def runtime(self) -> dict[str, Any]:
        codec = self.pipe.stage(CODEC).provides()
        tokenizer = self.pipe.tokenizer
        return {
            "text_vocab_size": tokenizer.vocab_size,
            "text_len": tokenizer.text_len,
            "image_vocab_size": codec["image_vocab_size"],
            "grid": tuple(codec["grid"]),
        }

    def prepare(self) -> dict[str, Any]:
        return {split: int(len(self.tokens(split)["image_tokens"])) for split in ("train", "heldout")}

    def tokens(self, split: str) -> dict[str, Any]:
        """The split's token shard, read (or encoded) once per pipeline and codec run."""
        key = (split, token_source(self.pipe))
        cache = self.__dict__.setdefault("_tokens", {})
        if key not in cache:
            cache[key] = encode_tokens(self.pipe, split)
        return cache[key]

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

    def report(self, module, device, cfg) -> dict[str, Any]:
        metrics = self.evaluate(module, device, limit=cfg.batches * cfg.batch_size)
        return {k: metrics[k] for k in ("bits_per_image_token", "image_loss", "text_loss", "loss") if k in metrics}

    @torch.no_grad()
    def preview(self, module, device) -> Optional[Preview]:
        captions = self.tokens("heldout")["captions"][:4]
        if not captions:
            return None
        text = self.pipe.tokenizer.encode(captions).to(device)
        generator = torch.Generator(device).manual_seed(0)
        tokens = module.generate(text, Sampling(), generator=generator)
        images = self.pipe.component(CODEC).decode(tokens).clamp(0, 1)
        return Preview(images[:, None], captions)


def token_source(pipe) -> str:
    """What a split's tokens are made from: the finished codec run (its ``run_id``), the data and the tokenizer."""
    meta = rundir.read_meta(pipe.run_dir, CODEC)
    if meta is None:
        raise UsageError(f"{pipe.run_dir}: train the codec first (`dalle train ... --stage {CODEC}`)")
    made_from = {"codec": meta.get("run_id") or meta.get("finished_at"), "data": pipe.recipe.block_dump("data"),
                 "tokenizer": pipe.recipe.block_dump("tokenizer")}
    return hashlib.sha256(json.dumps(made_from, sort_keys=True).encode()).hexdigest()[:32]


@torch.no_grad()
def encode_tokens(pipe, split: str, *, batch_size: int = 256) -> dict[str, Any]:
    """Text and image tokens of a split, cached as a token shard in the run directory.

    The shard records what it was made from (:func:`token_source`), so a retrained
    codec or another tokenizer re-encodes instead of training on stale tokens.
    """
    from tqdm.auto import tqdm

    source = token_source(pipe)
    path = pipe.run_dir / "tokens" / f"{split}.safetensors"
    if path.is_file():
        shard = load_token_shard(path)
        if shard["meta"].get("codec") == source:
            return shard
    codec = pipe.component(CODEC)
    images, captions = pipe.split(split)
    device = next(codec.parameters()).device
    tokens = [
        codec.encode(as_model_images(batch, codec.image_size, device)).cpu()
        for (batch,) in tqdm(list(chunks([images], batch_size)), desc=f"encode {split}", leave=False)
    ]
    image_tokens = torch.cat(tokens) if tokens else torch.zeros(0, codec.tokens_per_image, dtype=torch.long)
    text = pipe.tokenizer.encode(captions) if captions else torch.zeros(0, pipe.tokenizer.text_len, dtype=torch.long)
    save_token_shard(path, text, image_tokens, captions, {"codec": source, "split": split})
    return load_token_shard(path)
