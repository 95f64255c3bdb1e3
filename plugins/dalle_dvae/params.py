"""The dVAE's settings, importable without torch: recipes are checked with them alone."""

from __future__ import annotations

from pydantic import Field

from dalle_framework.nn import ConvCodecParams


class GumbelDVAEParams(ConvCodecParams):
    tau_start: float = Field(1.0, gt=0, description="Gumbel-softmax temperature at step 0 (paper: 1)")
    tau_end: float = Field(1 / 16, gt=0, description="final temperature (paper: 1/16)")
    tau_steps: int = Field(150_000, ge=0, description="cosine anneal length of tau in steps (paper: 150k updates)")
    kl_start: float = Field(0.0, ge=0, description="KL weight beta at step 0 (paper: 0)")
    kl_end: float = Field(6.6, ge=0, description="final KL weight (paper: 6.6; per-dimension normalised ELBO)")
    kl_steps: int = Field(5_000, ge=0, description="cosine ramp length of beta in steps (paper: 5000 updates)")
    usage_weight: float = Field(
        0.0,
        ge=0,
        description="weight of KL(mean posterior of the batch || uniform), normalised like kl: pushes the encoder to "
        "spread codes over the codebook (not in the paper, which is 0; counters code collapse in short runs)",
    )
    straight_through: bool = Field(
        False, description="hard one-hot forward, soft gradient: train on what decode() sees (closes the argmax gap)"
    )
