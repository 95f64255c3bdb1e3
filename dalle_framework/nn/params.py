"""The convolutional codecs' shared settings, importable without torch (a codec plugin's params
module reads them while recipes are checked; :mod:`.conv` builds the layers from them,
``ConvEncoder.from_params`` and ``ConvDecoder.from_params``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal, Optional

from pydantic import Field, model_validator

from ..schema import Params

if TYPE_CHECKING:
    from ..interfaces import CodecFacts

# The paper uses ReLU; SiLU / GELU are the usual alternatives in later VQ models.
Activation = Literal["relu", "silu", "gelu"]


class ConvCodecParams(Params):
    """Architecture and likelihood fields shared by the convolutional codecs.

    Defaults are the DALL-E paper's dVAE (256x256 images, 8192 codes, 32x32 grid,
    n_hid = 256, 2 blocks per group, 4 groups, decoder stem 128).
    """

    image_size: int = Field(256, gt=0, le=4096, description="square input side in pixels; a multiple of stem_downsample * 2**(groups-1)")
    vocab_size: int = Field(8192, ge=2, le=2**20, description="codebook size K (paper: 8192)")
    width: int = Field(256, ge=4, le=8192, description="base channels n_hid; group g has width * channel_mults[g] (paper: 256)")
    channel_mults: list[Annotated[int, Field(ge=1, le=64)]] = Field(
        default_factory=lambda: [1, 2, 4, 8],
        min_length=1,
        max_length=8,
        description="width multiplier per group; grid = image_size / (stem_downsample * 2**(groups-1))",
    )
    blocks_per_group: int = Field(2, ge=1, le=64, description="bottleneck residual blocks per group (paper: 2)")
    decoder_blocks_per_group: Optional[int] = Field(
        None, ge=1, le=64, description="the decoder's blocks per group; null = blocks_per_group (a heavier decoder sharpens short runs)"
    )
    activation: Activation = Field("relu", description="nonlinearity of every block (paper: relu)")
    stem_downsample: int = Field(
        1, ge=1, le=16, description="space-to-depth factor before the encoder stem / depth-to-space after the decoder (paper: 1; "
        "2 quarters the cost of full-resolution convs on CPU)"
    )
    stem_kernel: int = Field(7, ge=1, le=31, description="encoder stem conv size (paper: 7); odd")
    decoder_stem_width: int = Field(128, ge=1, le=8192, description="channels of the decoder's 1x1 input conv / code embedding (paper n_init: 128)")
    residual_gain: float | None = Field(
        None, gt=0, description="scale of each residual branch; null = the paper's 1 / n_layers**2 (stable when deep)"
    )
    loss: Literal["logit-laplace", "mse"] = Field(
        "logit-laplace", description="reconstruction likelihood: the paper's logit-Laplace, or MSE (optimises PSNR directly)"
    )
    eps: float = Field(0.1, gt=0, lt=0.5, description="logit-Laplace squeezes pixels into [eps, 1-eps] (paper: 0.1)")

    @model_validator(mode="after")
    def _grid_divides(self) -> "ConvCodecParams":
        factor = self.stem_downsample * 2 ** (len(self.channel_mults) - 1)
        if self.image_size % factor:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by stem_downsample * 2**(groups-1) = {factor} "
                f"(groups = len(channel_mults) = {len(self.channel_mults)})"
            )
        if self.stem_kernel % 2 == 0:
            raise ValueError(f"stem_kernel must be odd, got {self.stem_kernel}")
        if any(self.width * m % 4 for m in self.channel_mults):
            raise ValueError(f"width * each channel_mult must be a multiple of 4 (got width={self.width})")
        return self

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // (self.stem_downsample * 2 ** (len(self.channel_mults) - 1))
        return (side, side)

    def facts(self) -> "CodecFacts":
        """Codes, grid and input size: what a convolutional codec hands the prior."""
        from ..interfaces import CodecFacts

        return CodecFacts(self.vocab_size, self.grid, self.image_size)
