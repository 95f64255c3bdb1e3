"""The contracts every plugin implements.

Shapes are the contract. Images are float tensors ``[B, 3, H, W]`` in ``[0, 1]``
unless stated otherwise; token tensors are ``torch.long``.

Every component class carries a nested pydantic ``Params`` model with
``extra="forbid"``; a recipe's ``params`` block is validated against it and the
instance is built as ``cls(params, **runtime)`` where ``runtime`` holds facts
that come from other components (vocabulary sizes, grid, text length).
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

PAD_ID = 0  # every tokenizer reserves id 0 for padding; priors give each padded position its own learned token


class Params(BaseModel):
    """Base for component parameters: unknown keys are errors, never ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class Component:
    """Mixin shared by all registered classes.

    ``name`` and ``plugin`` are filled in by the registry on registration.
    """

    Params: ClassVar[type[Params]] = Params
    name: ClassVar[str] = ""
    plugin: ClassVar[str] = ""


# --------------------------------------------------------------------------- text


class Tokenizer(Component, abc.ABC):
    """Turns captions into fixed-length id tensors.

    ``encode(list[str]) -> LongTensor[B, text_len]``: padded on the right with
    ``PAD_ID`` (0) and truncated to ``text_len``. Ids are in ``[0, vocab_size)``.
    """

    vocab_size: int
    text_len: int

    @abc.abstractmethod
    def encode(self, texts: list[str]) -> torch.Tensor: ...

    @abc.abstractmethod
    def decode(self, ids: torch.Tensor) -> list[str]: ...


# --------------------------------------------------------------------------- stage 1


class ImageCodec(nn.Module, Component):
    """Maps images to a grid of discrete tokens and back.

    - ``encode(images[B,3,H,W] in [0,1]) -> LongTensor[B, h*w]`` (hard codes)
    - ``decode(LongTensor[B, h*w]) -> images[B,3,H,W] in [0,1]``
    - ``loss(images, step) -> dict``: key ``loss`` (scalar to minimise) plus named
      terms to log (floats or 0-d tensors). ``forward`` is ``loss`` so that
      training engines (DeepSpeed) can call the module directly.
    """

    vocab_size: int
    grid: tuple[int, int]
    image_size: int

    def __init__(self) -> None:
        nn.Module.__init__(self)

    @abc.abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def decode(self, tokens: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def loss(self, images: torch.Tensor, step: int = 0) -> dict[str, Any]: ...

    def forward(self, images: torch.Tensor, step: int = 0) -> dict[str, Any]:
        return self.loss(images, step)

    @property
    def tokens_per_image(self) -> int:
        return self.grid[0] * self.grid[1]


# --------------------------------------------------------------------------- stage 2


class Sampling(BaseModel):
    """How image tokens are drawn. Shared by priors, the pipeline and the CLI."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(1.0, gt=0, description="softmax temperature")
    top_k: Optional[int] = Field(None, ge=1, description="keep the k most likely tokens")
    top_p: Optional[float] = Field(None, gt=0, le=1, description="nucleus mass to keep")
    guidance_scale: float = Field(1.0, ge=0, description="classifier-free guidance; 1 = off")
    use_cache: bool = Field(True, description="key/value cache for incremental decoding")


class Prior(nn.Module, Component):
    """Autoregressive model of ``[text tokens | image tokens]``.

    Built as ``cls(params, text_vocab_size=, text_len=, image_vocab_size=, grid=)``.

    - ``loss(text[B,T], image_tokens[B,h*w]) -> dict``: ``loss`` (weighted), and
      ``text_loss`` / ``image_loss`` in nats per token.
    - ``generate(text[B,T], sampling, prime=None, generator=None) -> LongTensor[B,h*w]``;
      ``prime[B, n]`` holds the first ``n`` image tokens to keep (image priming).
    """

    def __init__(self) -> None:
        nn.Module.__init__(self)

    @abc.abstractmethod
    def loss(self, text: torch.Tensor, image_tokens: torch.Tensor) -> dict[str, Any]: ...

    @abc.abstractmethod
    def generate(
        self,
        text: torch.Tensor,
        sampling: Sampling,
        prime: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor: ...

    def forward(self, text: torch.Tensor, image_tokens: torch.Tensor) -> dict[str, Any]:
        return self.loss(text, image_tokens)


# --------------------------------------------------------------------------- reranking


class Reranker(nn.Module, Component):
    """Scores how well images match captions.

    - ``score(images[B,3,H,W] in [0,1], texts: list[str] of B) -> FloatTensor[B]``
    - ``loss(images, texts) -> dict`` for training from a recipe (contrastive).
    """

    def __init__(self) -> None:
        nn.Module.__init__(self)

    @abc.abstractmethod
    def score(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor: ...

    @abc.abstractmethod
    def loss(self, images: torch.Tensor, texts: list[str]) -> dict[str, Any]: ...

    def forward(self, images: torch.Tensor, texts: list[str]) -> dict[str, Any]:
        return self.loss(images, texts)


# --------------------------------------------------------------------------- data

Split = Literal["train", "heldout"]


@dataclass
class Sample:
    """One image-caption pair: ``image`` is uint8 ``[H, W, 3]`` (numpy or tensor)."""

    image: Any
    caption: str
    key: str = ""
    meta: dict = field(default_factory=dict)


class DataSource(Component, abc.ABC):
    """Yields image-caption pairs for a fixed, documented train / held-out split.

    ``samples(split)`` iterates once over that split, in a deterministic order.
    A sample that cannot be decoded is skipped and counted in ``skipped``.
    Sources whose truth is known may implement ``judge`` (an oracle).
    """

    skipped: int = 0

    @abc.abstractmethod
    def samples(self, split: Split) -> Iterator[Sample]: ...

    def size(self, split: Split) -> Optional[int]:
        """Number of samples in ``split`` when known without reading it, else None."""
        return None

    def captions(self, split: Split) -> list[str]:
        """Distinct captions of a split, in a stable order (used to evaluate generation)."""
        seen: dict[str, None] = {}
        for sample in self.samples(split):
            seen.setdefault(sample.caption, None)
        return list(seen)

    def judge(self, images: torch.Tensor, captions: list[str]) -> Optional[dict[str, list[bool]]]:
        """Oracle verdicts per attribute (e.g. ``colour``, ``shape``, ``position``) or None."""
        return None

    def prepare_judge(self, cache_dir: Path) -> Optional[dict]:
        """Get ``judge`` ready: a learned judge is trained, or loaded from ``cache_dir`` where cached.

        Returns the judge's own accuracy on real held-out images, the ceiling for generated
        ones: ``{"all": share}``, optionally with ``per_caption: {caption: share}``; None when
        the judge is exact (rules, no model) or there is none.
        """
        return None


# --------------------------------------------------------------------------- training engines


class EngineRun(abc.ABC):
    """A model and its optimizer wrapped for one training stage.

    ``step(*batch)`` runs forward (``module(*batch)`` must return a loss dict),
    backward, clipping, accumulation and the optimizer step; it returns the
    loss dict detached to floats.
    """

    module: nn.Module
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @abc.abstractmethod
    def step(self, *batch: Any) -> dict[str, float]: ...

    @abc.abstractmethod
    def save(self, directory: str, client_state: dict) -> None:
        """Write optimizer + model state under ``directory`` (all ranks call this)."""

    @abc.abstractmethod
    def load(self, directory: str) -> dict:
        """Restore what ``save`` wrote; returns the client state."""

    @abc.abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on CPU (consolidated across ranks when sharded)."""

    def lr(self) -> float:
        return float("nan")

    def barrier(self) -> None:
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()


class Engine(Component, abc.ABC):
    """Builds an :class:`EngineRun` for a module and a stage's train config."""

    @abc.abstractmethod
    def prepare(self, module: nn.Module, train: Any) -> EngineRun: ...

    def model_context(self, train: Any) -> contextlib.AbstractContextManager:
        """Context the module is built in (ZeRO-3 shards weights as they are created)."""
        return contextlib.nullcontext()
