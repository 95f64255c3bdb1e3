"""The VQ-VAE's settings, importable without torch: recipes are checked with them alone."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from dalle_framework.nn import ConvCodecParams


class VQVAEParams(ConvCodecParams):
    loss: Literal["logit-laplace", "mse"] = Field("mse", description="reconstruction likelihood (MSE optimises PSNR)")
    code_dim: int = Field(64, ge=1, le=8192, description="dimension D of each code vector")
    beta: float = Field(0.25, ge=0, description="commitment weight (VQ-VAE paper: 0.25)")
    decay: float = Field(0.99, gt=0, lt=1, description="EMA decay of code counts and sums")
    ema_eps: float = Field(1e-5, gt=0, description="Laplace smoothing of code counts (avoids division by zero)")
    restart_after: Optional[int] = Field(
        50, ge=1, description="re-seed a code unused for this many training steps from a batch vector; null = never"
    )
    init_from_data: bool = Field(True, description="initialise the codebook from the first training batch's encoder vectors")
