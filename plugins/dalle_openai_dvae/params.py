"""The released dVAE's settings, importable without torch: recipes are checked with them alone."""

from __future__ import annotations

from pydantic import Field, model_validator

from dalle_framework import Params

from .layout import GROUPS


class OpenAIDVAEParams(Params):
    image_size: int = Field(256, gt=0, description="square input side; a multiple of 8 (released: trained at 256)")
    vocab_size: int = Field(8192, ge=2, description="codes (released: 8192)")
    hidden: int = Field(256, ge=4, description="base channels n_hid; groups are 1, 2, 4, 8 times this (released: 256)")
    blocks_per_group: int = Field(2, ge=1, description="residual blocks per group (released: 2)")
    decoder_init: int = Field(128, ge=1, description="channels of the decoder's 1x1 stem over one-hot codes (released: 128)")
    tau: float = Field(1 / 16, gt=0, description="Gumbel-softmax temperature of loss() (paper's final value: 1/16)")
    kl_weight: float = Field(6.6, ge=0, description="weight of KL(q || uniform) in loss() (paper: 6.6)")

    @model_validator(mode="after")
    def _shapes(self) -> "OpenAIDVAEParams":
        factor = 2 ** (GROUPS - 1)
        if self.image_size % factor:
            raise ValueError(f"image_size {self.image_size} must be a multiple of {factor} (the encoder pools 3 times)")
        if self.hidden % 4:
            raise ValueError(f"hidden must be a multiple of 4 (bottleneck width = hidden / 4), got {self.hidden}")
        return self
