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


class LoraBlock(Strict):
    """Low-rank adapters (LoRA, Hu et al. 2021) on chosen linear layers; everything else stays as loaded."""

    targets: list[str] = Field(
        ..., min_length=1, max_length=256, description="glob patterns of the linear modules that get adapters, e.g. '*.query_key_value'"
    )
    rank: int = Field(8, ge=1, le=4096, description="rank r of each adapter")
    alpha: float = Field(16.0, gt=0, description="adapters add (alpha / r) * B A to each weight")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input in training")
    merge: bool = Field(
        False, description="export merged full weights (plus the adapter beside them) instead of the adapter alone, applied at load"
    )


class StageBlock(ComponentBlock):
    """A stage's block: its component, how it trains, and optionally pretrained weights."""

    train: Any = Field(default_factory=dict, description="validated against the stage's train schema")
    weights: Optional[str] = Field(
        None, max_length=4096, description="a safetensors file of this component's weights (e.g. from `dalle convert`), loaded before training"
    )
    frozen: bool = Field(False, description="never train this stage: use `weights` as they are")
    lora: Optional[LoraBlock] = Field(None, description="fine-tune `weights` through low-rank adapters only")
    freeze: list[str] = Field(
        default_factory=list, max_length=256, description="glob patterns of parameter names kept fixed while training, e.g. 'text_embeddings.*'"
    )

    @model_validator(mode="after")
    def _frozen_needs_weights(self) -> "StageBlock":
        if self.frozen and not self.weights:
            raise ValueError("frozen: a frozen stage is never trained, so it needs `weights` (a safetensors file)")
        if self.lora is not None and not self.weights:
            raise ValueError("lora: adapters fine-tune pretrained weights; set `weights` (e.g. from `dalle convert`)")
        if self.frozen and (self.lora is not None or self.freeze):
            raise ValueError("frozen: a frozen stage is never trained; drop `lora` / `freeze`, or `frozen` to fine-tune")
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
