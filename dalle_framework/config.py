"""The sections of a recipe that components and stages read (the schema of the blocks).

:mod:`.recipe` reads, composes and validates whole recipes; the blocks it
validates are these models, and a validated block holds the ``Params``
objects of the components it names.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import Field, model_validator

from .interfaces import Sampling, Strict


class ComponentBlock(Strict):
    """``{name, params}``: a registered component and its params (a ``Params`` object once validated)."""

    name: str = Field(..., max_length=200, description="a registered component of the block's kind")
    params: Any = Field(default_factory=dict, description="validated against the component's own Params")


class TokenizerBlock(ComponentBlock):
    """The ``tokenizer:`` block: the component, and how many unknown words a run may have."""

    max_unknown: float = Field(
        0.01, ge=0, le=1,
        description="share of a split's caption words the tokenizer may read as unknown before a run is refused",
    )


class StageBlock(ComponentBlock):
    """A stage's block: its component, how it trains, and optionally pretrained weights."""

    train: Any = Field(default_factory=dict, description="validated against the stage's train schema")
    weights: Optional[str] = Field(
        None, max_length=4096, description="a safetensors file of this component's weights (e.g. from `dalle convert`), loaded before training"
    )
    frozen: bool = Field(False, description="never train this stage: use `weights` as they are")

    @model_validator(mode="after")
    def _frozen_needs_weights(self) -> "StageBlock":
        if self.frozen and not self.weights:
            raise ValueError("frozen: a frozen stage is never trained, so it needs `weights` (a safetensors file)")
        return self


class GenerateConfig(Strict):
    candidates: int = Field(16, ge=1, le=100_000, description="samples drawn per caption")
    keep: int = Field(4, ge=1, le=100_000, description="best candidates kept after reranking")
    batch_size: int = Field(64, ge=1, le=100_000, description="candidates decoded per forward pass")
    sampling: Sampling = Field(default_factory=Sampling)
    captions: list[str] = Field(default_factory=list, description="default captions for `dalle generate`")


class EvaluateConfig(Strict):
    captions: int = Field(16, ge=1, le=100_000, description="held-out captions generated for")
    candidates: int = Field(16, ge=1, le=100_000, description="samples per caption before reranking")
    rounds: int = Field(1, ge=1, le=1000, description="independent best-of-N draws per caption (more judgements, tighter numbers)")
    batches: int = Field(8, ge=1, le=10**6, description="held-out batches for losses and PSNR")
    batch_size: int = Field(64, ge=1, le=100_000)


class DistributedConfig(Strict):
    """How the processes of a multi-process job (torchrun, deepspeed) work together."""

    timeout_minutes: float = Field(
        30.0, gt=0, le=7 * 24 * 60,
        description="how long a collective waits for the slowest rank before the job fails (a hung or lost rank)",
    )
