"""What the built-in stages declare of themselves and the settings of their metrics and feature
networks, importable without torch: recipes are checked, and stages ordered, with these alone."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from dalle_framework import Params, StageSpec, TrainConfig

CODEC = "codec"  # the stage whose tokens the prior models


# ----------------------------------------------------------------------------- stages


class CodecTrain(TrainConfig):
    hflip: bool = Field(
        False, description="mirror each training image left-right with probability 1/2 (only here: captions name directions)"
    )


class CodecSpec(StageSpec):
    Params = CodecTrain
    kind = "codec"
    required = True
    uses = ("data",)


class PriorSpec(StageSpec):
    kind = "prior"
    after = (CODEC,)
    uses = ("data", "tokenizer")


class RerankerSpec(StageSpec):
    kind = "reranker"
    uses = ("data",)


# ----------------------------------------------------------------------------- metrics


class StageParams(Params):
    stage: Optional[str] = Field(None, description="the stage to report (default: every trained stage whose component fits)")


class DistributionParams(Params):
    features: Optional[list[str]] = Field(
        None, description="names of evaluate.features networks (default: every configured one this run can run)"
    )
    images: Literal["candidates", "best"] = Field(
        "candidates", description="candidates: every image drawn (the model's own distribution); best: the reranked best of each draw"
    )


class KidParams(DistributionParams):
    subsets: int = Field(100, ge=2, le=10_000, description="random subsets averaged (the field's default: 100)")
    subset_size: int = Field(1000, ge=2, le=100_000, description="rows per subset, fewer when a set is smaller (the field's: 1000)")
    bootstrap_subsets: int = Field(5, ge=1, le=1000, description="subsets per bootstrap resample (bounds the interval's cost)")


class PrdcParams(DistributionParams):
    k: int = Field(5, ge=1, le=1000, description="nearest neighbours that set each sample's ball (the papers' 5 and 3-5)")


# ----------------------------------------------------------------------------- feature networks


class RerankerFeaturesParams(Params):
    stage: Optional[str] = Field(None, description="the reranker stage (default: the first one, which ranks candidates)")


class InceptionV3Params(Params):
    weights: str = Field(
        ..., description="the FID Inception weights: a torch state dict (read weights-only, e.g. pytorch-fid's "
        "pt_inception-2015-12-05-6726825d.pth) or a safetensors file with the same keys"
    )
    preset: Literal["pytorch-fid", "torch-fidelity"] = Field(
        "pytorch-fid", description="how images are resized to 299 and scaled, as that reference does"
    )
    batch_size: int = Field(50, ge=1, le=4096, description="images per forward pass")
