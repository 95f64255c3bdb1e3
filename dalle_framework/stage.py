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

import zlib
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from . import rundir
from .config import EvaluateConfig, StageBlock
from .data.batches import ShuffledBatches, chunks
from .interfaces import Component, TrainConfig


@dataclass
class Preview:
    """Images worth a look: ``images[R, C, 3, H, W]`` in [0, 1], one caption per row."""

    images: torch.Tensor
    captions: list[str]


class Stage(Component):
    """One trainable step of a pipeline (see the module docstring)."""

    Params: ClassVar[type[TrainConfig]] = TrainConfig
    kind: ClassVar[str] = ""
    after: ClassVar[tuple[str, ...]] = ()
    uses: ClassVar[tuple[str, ...]] = ("data",)
    required: ClassVar[bool] = False

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
        """Work done once before training (pre-encoding tokens, say); returns what it made."""
        return {}

    def columns(self, split: str) -> list[Any]:
        """Equal-length columns (tensors or lists) of a split, indexed together into batches."""
        raise NotImplementedError(f"stage {self.name!r} must define columns()")

    def batches(self, *, rank: int, world_size: int) -> ShuffledBatches:
        return ShuffledBatches(
            self.columns("train"), batch_size=self.train.batch_size, seed=self.pipe.recipe.seed, rank=rank, world_size=world_size
        )

    def step_args(self, batch: list[Any], step: int, device: torch.device) -> tuple:
        """A batch of columns -> the arguments of ``module(*args)`` (its loss)."""
        raise NotImplementedError(f"stage {self.name!r} must define step_args()")

    def augment(self, batch: list[Any], key: int) -> list[Any]:
        """A training batch after random augmentation; ``key`` seeds it, so resumed runs replay it exactly."""
        return batch

    def heldout(self, limit: int) -> list[Any]:
        return [c[:limit] for c in self.columns("heldout")]

    # ------------------------------------------------------------------ measuring

    @torch.no_grad()
    def evaluate(self, module: nn.Module, device: torch.device, *, limit: Optional[int] = None) -> dict[str, float]:
        """Mean of the loss terms over held-out batches (``limit`` samples, or all), plus ``extra_metrics``."""
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

    def report(self, module: nn.Module, device: torch.device, cfg: EvaluateConfig) -> dict[str, Any]:
        """This stage's part of ``dalle evaluate`` (held-out metrics; grids go under ``<run>/eval``)."""
        return self.evaluate(module, device, limit=cfg.batches * cfg.batch_size)

    def preview(self, module: nn.Module, device: torch.device) -> Optional[Preview]:
        """Images worth a look in TensorBoard at each evaluation, or None."""
        return None


def stage_order(stages: dict[str, type[Stage]]) -> list[str]:
    """Stage names with every stage after those it depends on, otherwise in the given order.

    A dependency that is not among ``stages`` is ignored here (the recipe check
    reports it); a cycle is an error naming it.
    """
    order: list[str] = []
    visiting: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise ValueError(f"stages depend on each other in a circle: {' -> '.join([*visiting, name])}")
        visiting.append(name)
        for dep in stages[name].after:
            if dep in stages:
                visit(dep)
        visiting.pop()
        order.append(name)

    for name in stages:
        visit(name)
    return order
