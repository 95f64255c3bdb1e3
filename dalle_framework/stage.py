"""The stage contract: one trainable step of a pipeline, described in one place.

A stage (the codec, the prior, the reranker, or whatever a plugin adds) is a
class registered like a component, through ``dalle_register_stages``. It says

- ``name``: the recipe block that configures it (``codec:``) and the folder it owns in a run;
- ``kind``: the registry kind of the component it trains (its block's ``name`` is looked up there);
- ``after``: the stages whose outputs it consumes. Training order follows from it, and so
  does staleness: retraining one of them makes this stage stale;
- ``uses``: the other recipe blocks whose change makes it stale (``data``, ``tokenizer``);
- ``provides()``: the facts it hands to later stages, from params alone (the codec's grid);
- ``runtime()``: the keyword facts its component is built with;
- ``columns`` / ``batches`` / ``step_args`` / ``augment``: how it feeds the engine;
- ``evaluate`` / ``report`` / ``preview``: its held-out metrics, its part of
  ``dalle evaluate``, and the images worth a look in TensorBoard;
- ``Params``: the schema of its ``train:`` block (:class:`TrainConfig` or a subclass).

The training loop, evaluation, ``dalle run`` and the CLI iterate over stages;
nothing else spells a stage's name. A stage instance is bound to a pipeline:
``StageClass(pipe)``.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import nn

from . import distributed, rundir
from .config import EvaluateConfig, StageBlock
from .data.batches import ShuffledBatches
from .data.stream import ShardedSplit, Skipped, StreamBatches, collate, read_positions
from .interfaces import Component, Sample, TrainConfig
from .schema import StageSpec

log = logging.getLogger(__name__)


@dataclass
class Preview:
    """Images worth a look: ``images[R, C, 3, H, W]`` in [0, 1], one caption per row."""

    images: torch.Tensor
    captions: list[str]


class Stage(StageSpec, Component):
    """One trainable step of a pipeline (see the module docstring); what it declares of itself
    (``Params``, ``kind``, ``after``, ``uses``, ``required``) is on :class:`StageSpec`."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe  # the dalle_framework.pipeline.Pipeline this stage belongs to (it sits above this module)

    @classmethod
    def seed_offset(cls) -> int:
        """Added to the recipe's seed for this stage's initialisation (data order uses the recipe's seed)."""
        return zlib.crc32(cls.name.encode()) % 100_000

    # ------------------------------------------------------------------ configuration

    @property
    def block(self) -> StageBlock:
        return self.pipe.recipe.stages[self.name]

    @property
    def train(self) -> TrainConfig:
        return self.block.train

    def provides(self) -> dict[str, Any]:
        """Facts later stages are built with, known from this stage's params alone."""
        return {}

    def runtime(self) -> dict[str, Any]:
        """Keyword facts the component is built with (``cls(params, **runtime)``)."""
        return {}

    def build(self) -> nn.Module:
        """A freshly initialised component (on the current default device)."""
        return self.pipe.manager.registry(self.kind).build(self.block, **self.runtime())

    def identity(self, *, with_train: bool = True) -> dict[str, Any]:
        """What this stage's weights depend on: its block, the blocks it uses, and the
        finished runs of the stages it comes after. Equal identity = reusable weights."""
        block = self.block.model_dump(mode="json", exclude=set() if with_train else {"train"})
        uses = {name: self.pipe.recipe.block_dump(name) for name in self.uses}
        inputs = {}
        for name in self.after:
            meta = rundir.read_meta(self.pipe.run_dir, name)
            inputs[name] = meta.get("run_id") if meta else None
        return {"block": block, "uses": uses, "after": inputs}

    # ------------------------------------------------------------------ data

    def prepare(self) -> dict[str, Any]:
        """Work done once before training (pre-encoding tokens, say); returns what it made.
        Collective: under several processes every rank calls it (each does its share)."""
        return {}

    def columns(self, split: str) -> list[Any]:
        """Equal-length columns (tensors or lists) of a split held in memory, indexed together into batches."""
        raise NotImplementedError(f"stage {self.name!r} must define columns()")

    def record(self, sample: Sample) -> tuple:
        """One streamed sample -> this stage's column values (what ``columns`` holds for one sample).
        Runs in DataLoader workers; needed only where the recipe's data source streams."""
        raise NotImplementedError(f"stage {self.name!r} cannot read a streamed data source: it must define record()")

    def stream(self, split: str) -> Optional[ShardedSplit]:
        """The split as a stream of this stage's records, or None when the data source is read into memory."""
        source = self.pipe.data.stream(split)
        return None if source is None else source.map(self.record)

    def counts(self, split: str, *, collective: bool = False) -> list[int]:
        """Records per shard of a streamed split (counted once per pipeline, cached in the run)."""
        return self.pipe.shard_counts(self.stream(split), collective=collective)

    def batches(self, *, rank: int, world_size: int) -> "ShuffledBatches | StreamBatches":
        """Endless, resumable training batches of this rank (see :mod:`dalle_framework.data.stream`)."""
        train, seed = self.train, self.pipe.recipe.seed
        stream = self.stream("train")
        if stream is None:
            return ShuffledBatches(self.columns("train"), batch_size=train.batch_size, seed=seed, rank=rank, world_size=world_size)
        return StreamBatches(stream, self.counts("train"), batch_size=train.batch_size, seed=seed, rank=rank, world_size=world_size,
                             workers=train.num_workers, shuffle_block=train.shuffle_block, on_skip=_log_skip)

    def step_args(self, batch: list[Any], step: int, device: torch.device) -> tuple:
        """A batch of columns -> the arguments of ``module(*args)`` (its loss)."""
        raise NotImplementedError(f"stage {self.name!r} must define step_args()")

    def augment(self, batch: list[Any], key: int) -> list[Any]:
        """A training batch after random augmentation; ``key`` seeds it, so resumed runs replay it exactly."""
        return batch

    def size(self, split: str) -> int:
        """Samples in a split (records, for a streamed one: undecodable ones are skipped when read)."""
        if self.stream(split) is None:
            columns = self.columns(split)
            return len(columns[0]) if columns else 0
        return sum(self.counts(split))

    def heldout(self, limit: int) -> list[Any]:
        """The first ``limit`` held-out samples as columns, the same on every rank."""
        return self._heldout_slice(0, limit)

    def _heldout_slice(self, start: int, stop: int) -> list[Any]:
        stream = self.stream("heldout")
        if stream is None:
            return [c[start:stop] for c in self.columns("heldout")]
        items = [i for i in read_positions(stream, self.counts("heldout"), start, stop) if not isinstance(i, Skipped)]
        return collate(items) if items else []

    def heldout_batches(self, limit: int, *, collective: bool = False) -> Iterator[tuple[list[Any], float]]:
        """This rank's share of the first ``limit`` held-out samples: ``(batch, weight)`` pairs.

        The held-out samples are cut into batches of ``train.batch_size`` the same way on any
        number of ranks, and batch ``i`` is evaluated by rank ``i % world_size``, so the figures do
        not depend on the world size and one held-out shard serves any number of ranks. Every rank
        runs as many batches (a forward pass under ZeRO-3 is a collective): a rank with fewer runs
        batch 0 again with weight 0. Without ``collective`` this process evaluates them all.
        """
        rank, world = (distributed.rank(), distributed.world_size()) if collective else (0, 1)
        size, step = min(limit, self.size("heldout")), self.train.batch_size
        count = -(-size // step)
        mine = range(rank, count, world)
        for i in mine:
            batch = self._heldout_slice(i * step, min(size, (i + 1) * step))
            yield (batch, 1.0) if batch and len(batch[0]) else (self._heldout_slice(0, min(size, step)), 0.0)
        for _ in range(-(-count // world) - len(mine)):
            yield self._heldout_slice(0, min(size, step)), 0.0

    # ------------------------------------------------------------------ measuring

    @torch.no_grad()
    def evaluate(self, module: nn.Module, device: torch.device, *, limit: Optional[int] = None, collective: bool = False) -> dict[str, float]:
        """Mean of the loss terms over held-out batches (``limit`` samples, or ``train.eval_batches``
        batches), plus ``extra_metrics``. With ``collective`` every rank evaluates its share and the
        sums are added up over ranks."""
        limit = limit or self.train.eval_batches * self.train.batch_size
        totals: dict[str, float] = {}
        count = 0.0
        was_training = module.training
        module.eval()
        for batch, weight in self.heldout_batches(limit, collective=collective):
            out = module(*self.step_args(batch, self.train.steps, device))
            size = len(batch[0]) * weight
            for key, value in out.items():
                totals[key] = totals.get(key, 0.0) + float(value) * size
            count += size
        module.train(was_training)
        metrics = mean_over(totals, count, collective=collective)
        metrics.update(self.extra_metrics(module, device, limit, collective=collective))
        return metrics

    def extra_metrics(self, module: nn.Module, device: torch.device, limit: int, *, collective: bool = False) -> dict[str, float]:
        """More held-out figures (PSNR, retrieval); with ``collective`` every rank calls it and must agree."""
        return {}

    def report(self, module: nn.Module, device: torch.device, cfg: EvaluateConfig) -> dict[str, Any]:
        """This stage's part of ``dalle evaluate`` (held-out metrics; grids go under ``<run>/eval``)."""
        return self.evaluate(module, device, limit=cfg.batches * cfg.batch_size)

    def preview(self, module: nn.Module, device: torch.device) -> Optional[Preview]:
        """Images worth a look in TensorBoard at each evaluation, or None."""
        return None

    def tokens_per_sample(self) -> Optional[int]:
        """Tokens one training sample feeds the model (logged as tokens/s), or None where tokens are not the unit."""
        return None


def mean_over(totals: dict[str, float], count: float, *, collective: bool) -> dict[str, float]:
    """``totals / count``, both summed over ranks first when ``collective``."""
    keys = sorted(totals)
    sums = distributed.sum_over_ranks([totals[k] for k in keys] + [count]) if collective else [totals[k] for k in keys] + [count]
    return {k: v / max(sums[-1], 1.0) for k, v in zip(keys, sums[:-1])}


def _log_skip(skipped: Skipped) -> None:
    log.warning("data: skipped %s: %s", skipped.key, skipped.reason)
