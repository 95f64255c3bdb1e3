"""The VQGAN codecs' settings, importable without torch: recipes are checked with them alone."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from dalle_framework import Params


class VQGANParams(Params):
    # taming's ddconfig
    ch: int = Field(128, ge=32, description="base channels; a multiple of 32 (GroupNorm with 32 groups)")
    ch_mult: list[int] = Field(
        default_factory=lambda: [1, 1, 2, 2, 4], min_length=1, description="channel multiplier per level; f = 2**(levels-1)"
    )
    num_res_blocks: int = Field(2, ge=1, description="ResNet blocks per encoder level (decoder: one more)")
    attn_resolutions: list[int] = Field(default_factory=lambda: [16], description="sides (relative to resolution) with attention")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout inside ResNet blocks (inactive in eval mode)")
    resamp_with_conv: bool = Field(True, description="strided / post-upsampling convs (else average pooling / plain upsampling)")
    in_channels: int = Field(3, ge=1, description="image channels in")
    out_ch: int = Field(3, ge=1, description="image channels out")
    resolution: int = Field(256, gt=0, description="training side: decides where attention sits (attn_resolutions)")
    z_channels: int = Field(256, ge=1, description="encoder output / decoder input channels")
    double_z: bool = Field(False, description="taming's VQ models use false")
    # quantiser
    n_embed: int = Field(1024, ge=2, description="codes (released f16: 1024 or 16384; Gumbel f8: 8192)")
    embed_dim: int = Field(256, ge=1, description="code vector size")
    quantizer: Literal["vq", "gumbel"] = Field("vq", description="vq: nearest code (VQModel); gumbel: argmax of logits (GumbelVQ)")
    # released variants
    wavelet: bool = Field(False, description="ruDALL-E's wavelet decoder: 12 output channels (Haar subbands), images of twice the side")
    pixels: Literal["signed", "unit"] = Field("signed", description="pixel range the network works in: signed [-1, 1] (taming) or unit [0, 1] (dalle-mini)")
    encoder: bool = Field(True, description="false: decoder only (min-dalle's detoker.pt); encoding is refused")
    norm_eps: float = Field(1e-6, gt=0, lt=1, description="GroupNorm epsilon (taming: 1e-6; min-dalle's port: PyTorch's default 1e-5)")
    encoder_norm_eps: Optional[float] = Field(None, gt=0, lt=1, description="the encoder's GroupNorm epsilon where it differs from norm_eps")
    # this framework
    image_size: int = Field(256, gt=0, description="side of the images this codec encodes; a multiple of 2**(levels-1)")

    @model_validator(mode="after")
    def _shapes(self) -> "VQGANParams":
        factor = 2 ** (len(self.ch_mult) - 1)
        if self.image_size % factor or self.resolution % factor:
            raise ValueError(f"image_size and resolution must be multiples of 2**(levels-1) = {factor}")
        if any(self.ch * m % 32 for m in self.ch_mult):
            raise ValueError(f"ch * each ch_mult must be a multiple of 32 (GroupNorm groups), got ch={self.ch}")
        if self.double_z:
            raise ValueError("double_z: true belongs to KL autoencoders; taming's VQ models use false")
        if self.quantizer == "gumbel" and self.embed_dim != self.z_channels:
            raise ValueError("quantizer gumbel needs embed_dim == z_channels (taming projects quant_conv's output)")
        if self.wavelet and self.out_ch != 12:
            raise ValueError("wavelet: true needs out_ch: 12 (four Haar subbands of three colours)")
        return self


class SberVQGANParams(VQGANParams):
    ch_mult: list[int] = Field(default_factory=lambda: [1, 1, 2, 4], min_length=1, description="channel multiplier per level (Sber: 1,1,2,4)")
    attn_resolutions: list[int] = Field(default_factory=lambda: [32], description="sides with attention (Sber: 32)")
    out_ch: int = Field(12, ge=1, description="decoder channels out (wavelet: 12)")
    n_embed: int = Field(8192, ge=2, description="codes (Sber: 8,192)")
    quantizer: Literal["vq", "gumbel"] = Field("gumbel", description="Sber: gumbel")
    wavelet: bool = Field(True, description="ruDALL-E's wavelet decoder (false: the plain decoder file, out_ch 3)")


class MinDalleVQGANParams(VQGANParams):
    n_embed: int = Field(16384, ge=2, description="codes (dalle-mini: 16,384)")
    pixels: Literal["signed", "unit"] = Field("unit", description="dalle-mini's VQGAN works in [0, 1]")
    encoder: bool = Field(False, description="min-dalle's detoker.pt has no encoder")
    norm_eps: float = Field(1e-5, gt=0, lt=1, description="GroupNorm epsilon (min-dalle: PyTorch's default 1e-5)")
    encoder_norm_eps: Optional[float] = Field(
        1e-6, gt=0, lt=1, description="the encoder's: dalle-mini's (taming's 1e-6), which encoded the images the prior was trained on"
    )
