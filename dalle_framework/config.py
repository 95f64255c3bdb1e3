"""The sections of a recipe that components and stages read (the schema of the blocks).

:mod:`.recipe` reads, composes and validates whole recipes; the blocks it
validates are these models, and a validated block holds the ``Params``
objects of the components it names.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, field_validator, model_validator

from .schema import Sampling, Strict


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


class ReferenceConfig(Strict):
    """The real images generated ones are compared with by distribution metrics."""

    split: Literal["heldout"] = Field("heldout", description="the data split whose real images are the reference")
    images: Optional[int] = Field(None, ge=2, le=10**7, description="its first N images (null: the whole split)")
    floor: Optional[Literal["train"]] = Field(
        None,
        description="also measure this real split against the reference, as many images as generated ones: "
        "what a perfect model would reach (only meaningful when both splits come from one distribution)",
    )


class IntervalConfig(Strict):
    """How confidence intervals are made: Wilson for rates, a percentile bootstrap for scores."""

    level: float = Field(0.95, gt=0.5, lt=1, description="coverage of every interval")
    resamples: int = Field(200, ge=20, le=100_000, description="bootstrap resamples (over captions' draws and real images)")
    seed: int = Field(0, ge=0, lt=2**63, description="seeds the bootstrap and every random subset (KID, the floor's images)")


def _default_features() -> dict[str, ComponentBlock]:
    return {"judge": ComponentBlock(name="judge"), "reranker": ComponentBlock(name="reranker")}


class EvaluateConfig(Strict):
    captions: int = Field(16, ge=1, le=100_000, description="held-out captions generated for")
    candidates: int = Field(16, ge=1, le=100_000, description="samples per caption before reranking")
    rounds: int = Field(1, ge=1, le=1000, description="independent best-of-N draws per caption (more judgements, tighter numbers)")
    batches: int = Field(8, ge=1, le=10**6, description="held-out batches for losses and PSNR")
    batch_size: int = Field(64, ge=1, le=100_000)
    seed: Optional[int] = Field(None, ge=0, lt=2**63, description="seeds the draws (null: the recipe's seed)")
    metrics: Optional[list[ComponentBlock]] = Field(
        None, description="metrics to measure, names or {name, params} (null: every registered default metric that applies)"
    )
    features: dict[str, ComponentBlock] = Field(
        default_factory=_default_features,
        description="feature networks for distribution metrics, by the name reports use: {name, params} each "
        "(e.g. inception: {name: inception-v3, params: {weights: pt_inception.pth}})",
    )
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)
    interval: IntervalConfig = Field(default_factory=IntervalConfig)

    @field_validator("metrics", mode="before")
    @classmethod
    def _names_are_blocks(cls, value: Any) -> Any:
        """``[fd, {name: kid, params: {...}}]``: a bare name is a block without params."""
        if isinstance(value, list):
            return [{"name": item} if isinstance(item, str) else item for item in value]
        return value


class DistributedConfig(Strict):
    """How the processes of a multi-process job (torchrun, deepspeed) work together."""

    timeout_minutes: float = Field(
        30.0, gt=0, le=7 * 24 * 60,
        description="how long a collective waits for the slowest rank before the job fails (a hung or lost rank)",
    )
