"""Stage 2: the transformer prior, trained on text tokens and the frozen codec's image tokens."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from dalle_framework import ImageCodec, Preview, Sampling, Stage, UsageError, distributed, rundir
from dalle_framework.data import as_model_images, image_tensor, load_token_shards, save_token_shard, token_shard_header
from dalle_framework.data.stream import ShardedSplit, Skipped, TokenShards

from .params import PriorSpec

log = logging.getLogger(__name__)

LN2 = math.log(2.0)


SPLITS = ("train", "heldout")
ENCODE_BATCH = 256  # images per codec forward while encoding
TOKEN_SHARD_ROWS = 32 * ENCODE_BATCH  # rows per token shard cut from data held in memory
MANIFEST_FORMAT = "dalle-token-manifest/1"


class PriorStage(PriorSpec, Stage):
    """Trains the recipe's ``prior`` on ``[caption tokens | image tokens]``.

    Images are encoded once per split by the trained codec into token shards,
    ``<run>/tokens/<split>/NNNNNN.safetensors``, one per data shard (or per
    :data:`TOKEN_SHARD_ROWS` samples of data held in memory), listed by the manifest
    ``<run>/tokens/<split>.json``. Under several processes each rank encodes its own
    shards and rank 0 writes the manifest after all are done; shards already encoded
    from the same codec run, data and tokenizer are kept, so an interrupted ``dalle data
    encode`` continues. The prior then streams the token shards when the data source
    streams, and reads them into memory otherwise.
    """

    @classmethod
    def seed_offset(cls) -> int:
        return 1

    def runtime(self) -> dict[str, Any]:
        codec = self.pipe.stage(codec_stage(self.pipe)).provides()
        tokenizer = self.pipe.tokenizer
        return {
            "text_vocab_size": tokenizer.vocab_size,
            "text_len": tokenizer.text_len,
            "image_vocab_size": codec["image_vocab_size"],
            "grid": tuple(codec["grid"]),
        }

    def prepare(self) -> dict[str, Any]:
        return {split: encode_split(self.pipe, split, collective=True)["count"] for split in SPLITS}

    def manifest(self, split: str) -> dict[str, Any]:
        """The split's token manifest, encoding what is missing first (alone: see :meth:`prepare` for all ranks)."""
        return encode_split(self.pipe, split, collective=False)

    def tokens(self, split: str) -> dict[str, Any]:
        """The split's tokens in memory (data read into memory), read once per pipeline and codec run."""
        key = (split, token_source(self.pipe))
        cache = self.__dict__.setdefault("_tokens", {})
        if key not in cache:
            cache[key] = load_token_shards(manifest_paths(self.pipe, self.manifest(split)))
        return cache[key]

    def columns(self, split: str) -> list[Any]:
        data = self.tokens(split)
        return [data["text"], data["image_tokens"]]

    def stream(self, split: str) -> Optional[ShardedSplit]:
        if self.pipe.data.stream(split) is None:
            return None
        return ShardedSplit(manifest_paths(self.pipe, self.manifest(split)), TokenShards(), _identity)

    def counts(self, split: str, *, collective: bool = False) -> list[int]:
        return [int(entry["count"]) for entry in self.manifest(split)["shards"]]

    def step_args(self, batch, step, device):
        return (batch[0].to(device).long(), batch[1].to(device).long())

    def evaluate(self, module, device, *, limit=None, collective=False):
        metrics = super().evaluate(module, device, limit=limit, collective=collective)
        if "image_loss" in metrics:
            metrics["bits_per_image_token"] = metrics["image_loss"] / LN2
        return metrics

    def report(self, module, device, cfg) -> dict[str, Any]:
        metrics = self.evaluate(module, device, limit=cfg.batches * cfg.batch_size)
        return {k: metrics[k] for k in ("bits_per_image_token", "image_loss", "text_loss", "loss") if k in metrics}

    def tokens_per_sample(self) -> int:
        runtime = self.runtime()
        return runtime["text_len"] + runtime["grid"][0] * runtime["grid"][1]

    def heldout_captions(self, limit: int) -> list[str]:
        paths = manifest_paths(self.pipe, self.manifest("heldout"))
        return token_shard_header(paths[0])["captions"][:limit] if paths else []

    @torch.no_grad()
    def preview(self, module, device) -> Optional[Preview]:
        captions = self.heldout_captions(4)
        if not captions:
            return None
        text = self.pipe.tokenizer.encode(captions).to(device)
        generator = torch.Generator(device).manual_seed(0)
        tokens = module.generate(text, Sampling(), generator=generator)
        images = self.pipe.component(codec_stage(self.pipe)).decode(tokens).clamp(0, 1)
        return Preview(images[:, None], captions)


def _identity(x: Any) -> Any:
    return x


def codec_stage(pipe) -> str:
    """The stage whose image codec makes the prior's tokens: found by contract, as generation finds it."""
    name = pipe.role(ImageCodec)
    if name is None:
        raise UsageError(f"recipe {pipe.recipe.name!r} has no stage with an ImageCodec; the prior models a codec's tokens")
    return name


def token_source(pipe) -> str:
    """What a split's tokens are made from: the finished codec run (its ``run_id``), the data and the tokenizer."""
    stage = codec_stage(pipe)
    meta = rundir.read_meta(pipe.run_dir, stage)
    if meta is None:
        raise UsageError(f"{pipe.run_dir}: train the codec first (`dalle train ... --stage {stage}`)")
    made_from = {"codec": meta.get("run_id") or meta.get("finished_at"), "data": pipe.recipe.block_dump("data"),
                 "tokenizer": pipe.recipe.block_dump("tokenizer")}
    return hashlib.sha256(json.dumps(made_from, sort_keys=True).encode()).hexdigest()[:32]


def manifest_paths(pipe, manifest: dict[str, Any]) -> list[str]:
    folder = pipe.run_dir / "tokens" / manifest["split"]
    return [str(folder / entry["file"]) for entry in manifest["shards"]]


def _pieces(pipe, split: str, *, collective: bool) -> list[dict[str, Any]]:
    """What each token shard is encoded from: a data shard (path, size, mtime) or rows of data held in memory."""
    stream = pipe.data.stream(split)
    if stream is None:
        rows = len(pipe.split(split)[1])
        return [{"rows": [a, min(rows, a + TOKEN_SHARD_ROWS)]} for a in range(0, max(rows, 1), TOKEN_SHARD_ROWS)]
    counts = pipe.shard_counts(stream, collective=collective)
    return [{"shard": path, "records": count, "file": list(_stat(path))} for path, count in zip(stream.paths, counts)]


def _stat(path: str) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


def _valid_manifest(pipe, split: str, source: str) -> Optional[dict[str, Any]]:
    path = pipe.run_dir / "tokens" / f"{split}.json"
    if not path.is_file():
        return None
    manifest = rundir.read_json(path)
    ok = (isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT and manifest.get("source") == source
          and manifest.get("split") == split and isinstance(manifest.get("shards"), list))
    return manifest if ok and all(Path(p).is_file() for p in manifest_paths(pipe, manifest)) else None


@torch.no_grad()
def encode_split(pipe, split: str, *, collective: bool) -> dict[str, Any]:
    """Encode a split into token shards (those not already encoded from the same inputs) and return its manifest.

    With ``collective`` every rank calls it: rank ``r`` encodes shards ``r, r + world_size, ...``,
    then, after all are done, rank 0 writes the manifest (atomically) and the others read it.
    """
    source = token_source(pipe)
    manifest = _valid_manifest(pipe, split, source)
    if manifest is not None:
        return manifest
    rank, world = (distributed.rank(), distributed.world_size()) if collective else (0, 1)
    pieces = _pieces(pipe, split, collective=collective)
    folder = pipe.run_dir / "tokens" / split
    for index in range(rank, len(pieces), world):
        made_from = {"source": source, "piece": pieces[index]}
        target = folder / f"{index:06d}.safetensors"
        if target.is_file():
            try:
                if token_shard_header(target)["meta"].get("made_from") == made_from:
                    continue  # encoded before from the same inputs (a resumed `dalle data encode`)
            except UsageError:
                pass  # damaged: encode it again
        text, image_tokens, captions = _encode_piece(pipe, split, pieces[index])
        save_token_shard(target, text, image_tokens, captions, {"codec": source, "split": split, "made_from": made_from})
    if collective:
        distributed.barrier()
    if not collective or distributed.is_main():
        shards = [{"file": f"{i:06d}.safetensors", "count": token_shard_header(folder / f"{i:06d}.safetensors")["rows"]}
                  for i in range(len(pieces))]
        manifest = {"format": MANIFEST_FORMAT, "source": source, "split": split, "shards": shards,
                    "count": sum(s["count"] for s in shards)}
        for stale in set(folder.glob("*.safetensors")) - {folder / s["file"] for s in shards}:
            stale.unlink()  # left from data that had more shards
        legacy = pipe.run_dir / "tokens" / f"{split}.safetensors"  # one file per split, before token shards
        if legacy.is_file():
            legacy.unlink()
        rundir.write_json(pipe.run_dir / "tokens" / f"{split}.json", manifest)
    if collective:
        distributed.barrier()
        manifest = _valid_manifest(pipe, split, source)
        if manifest is None:
            raise UsageError(f"{pipe.run_dir / 'tokens'}: rank 0's token manifest is not visible here; the run directory must be shared by all nodes")
    return manifest


def _encode_piece(pipe, split: str, piece: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Text and image tokens of one piece, encoded :data:`ENCODE_BATCH` images at a time (bounded memory)."""
    from dalle_framework.progress import progress_bar

    codec = pipe.component(codec_stage(pipe))
    device = next(codec.parameters()).device
    tokens: list[torch.Tensor] = []
    captions: list[str] = []
    rows = piece["rows"][1] - piece["rows"][0] if "rows" in piece else piece["records"]
    bar = progress_bar(total=rows, desc=f"encode {split}", unit="img", leave=False, enabled=distributed.is_main())
    for images, texts in _piece_batches(pipe, split, piece):
        bar.update(len(texts))
        tokens.append(codec.encode(as_model_images(images, codec.image_size, device)).cpu())
        captions += texts
    bar.close()
    image_tokens = torch.cat(tokens) if tokens else torch.zeros(0, codec.tokens_per_image, dtype=torch.long)
    text = pipe.tokenizer.encode(captions) if captions else torch.zeros(0, pipe.tokenizer.text_len, dtype=torch.long)
    return text, image_tokens, captions


def _piece_batches(pipe, split: str, piece: dict[str, Any]) -> Iterator[tuple[torch.Tensor, list[str]]]:
    if "rows" in piece:
        images, captions = pipe.split(split)
        a, b = piece["rows"]
        for start in range(a, b, ENCODE_BATCH):
            yield images[start : min(b, start + ENCODE_BATCH)], captions[start : min(b, start + ENCODE_BATCH)]
        return
    stream = pipe.data.stream(split)
    batch: list[Any] = []
    for raw in stream.format.read(piece["shard"], 0, piece["records"]):
        item = stream.decode(raw)
        if isinstance(item, Skipped):
            log.warning("encode %s: skipped %s: %s", split, item.key, item.reason)
            continue
        batch.append(item)
        if len(batch) == ENCODE_BATCH:
            yield _stack(batch)
            batch = []
    if batch:
        yield _stack(batch)


def _stack(samples: list) -> tuple[torch.Tensor, list[str]]:
    return torch.stack([image_tensor(s.image) for s in samples]), [s.caption for s in samples]
