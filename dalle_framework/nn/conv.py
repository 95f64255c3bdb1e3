"""The DALL-E discrete VAE's convolutional encoder and decoder (Ramesh et al. 2021, appendix A.2).

Both are a stem, ``len(channel_mults)`` groups of bottleneck residual blocks and a
1x1 output conv. The encoder max-pools between groups and the decoder upsamples
(nearest neighbour) between groups, so the token grid is
``image_size / 2 ** (groups - 1)``. Each residual branch is scaled by
``1 / n_layers ** 2`` (``n_layers`` = total blocks), which keeps the network near
its identity path at initialisation and lets deep stacks train stably.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Sequence

import torch
from pydantic import Field, model_validator
from torch import nn

from ..interfaces import CodecFacts, Params


def _conv(n_in: int, n_out: int, kernel: int) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, kernel, padding=(kernel - 1) // 2)


# The paper uses ReLU; SiLU / GELU are the usual alternatives in later VQ models.
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU}
Activation = Literal["relu", "silu", "gelu"]


class BottleneckBlock(nn.Module):
    """``x -> id(x) + post_gain * res(x)``; res = 4 x (activation, conv) with hidden width ``n_out // 4``.

    ``kernels`` are the four conv sizes: the paper's encoder uses (3, 3, 3, 1), its
    decoder (1, 3, 3, 3). ``id`` is a 1x1 conv when the width changes.
    Shapes: ``[B, n_in, H, W] -> [B, n_out, H, W]``.
    """

    def __init__(
        self, n_in: int, n_out: int, *, post_gain: float, kernels: Sequence[int] = (3, 3, 3, 1), activation: Activation = "relu"
    ) -> None:
        super().__init__()
        assert len(kernels) == 4, f"a bottleneck block has 4 convs, got kernels={kernels}"
        assert n_out % 4 == 0, f"block width {n_out} must be a multiple of 4 (hidden = width / 4)"
        hidden = n_out // 4
        widths = [n_in, hidden, hidden, hidden, n_out]
        layers: list[nn.Module] = []
        for i, k in enumerate(kernels):
            layers += [ACTIVATIONS[activation](), _conv(widths[i], widths[i + 1], k)]
        self.res_path = nn.Sequential(*layers)
        self.id_path = nn.Identity() if n_in == n_out else _conv(n_in, n_out, 1)
        self.post_gain = post_gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _group_widths(width: int, channel_mults: Sequence[int]) -> list[int]:
    assert len(channel_mults) >= 1, "need at least one group (channel_mults is empty)"
    return [width * m for m in channel_mults]


class ConvEncoder(nn.Module):
    """Image ``[B, in_channels, H, W]`` -> ``[B, out_channels, H / 2**(G-1), W / 2**(G-1)]``.

    Stem: 7x7 conv to ``width * channel_mults[0]`` (after a lossless space-to-depth
    by ``stem_downsample`` when > 1: an extension for CPUs, where full-resolution
    convs with few channels dominate the time). Group ``g`` has ``blocks_per_group``
    blocks of width ``width * channel_mults[g]``; a 2x2 max-pool follows every group but
    the last. Output: activation + 1x1 conv (codebook logits for the dVAE, code vectors for VQ).
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        out_channels: int,
        width: int,
        channel_mults: Sequence[int],
        blocks_per_group: int,
        stem_kernel: int = 7,
        stem_downsample: int = 1,
        residual_gain: Optional[float] = None,
        activation: Activation = "relu",
    ) -> None:
        super().__init__()
        widths = _group_widths(width, channel_mults)
        n_layers = len(widths) * blocks_per_group
        gain = residual_gain if residual_gain is not None else 1.0 / n_layers**2
        s = stem_downsample
        space_to_depth: list[nn.Module] = [nn.PixelUnshuffle(s)] if s > 1 else []
        layers: list[nn.Module] = [*space_to_depth, _conv(in_channels * s * s, widths[0], stem_kernel)]
        n_in = widths[0]
        for g, w in enumerate(widths):
            for _ in range(blocks_per_group):
                layers.append(BottleneckBlock(n_in, w, post_gain=gain, kernels=(3, 3, 3, 1), activation=activation))
                n_in = w
            if g < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
        layers += [ACTIVATIONS[activation](), _conv(n_in, out_channels, 1)]
        self.blocks = nn.Sequential(*layers)
        self.downsample = s * 2 ** (len(widths) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ConvDecoder(nn.Module):
    """Code grid ``[B, in_channels, h, w]`` -> ``[B, out_channels, h * 2**(G-1), w * 2**(G-1)]``.

    Stem: 1x1 conv to ``stem_width`` (the paper's n_init = 128). Groups mirror the
    encoder (widest first); nearest-neighbour 2x upsampling follows every group but
    the last. Output: activation + 1x1 conv (6 channels for logit-Laplace: mu and log-scale),
    then depth-to-space by ``stem_downsample`` when > 1.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        width: int,
        channel_mults: Sequence[int],
        blocks_per_group: int,
        stem_width: int,
        stem_downsample: int = 1,
        residual_gain: Optional[float] = None,
        activation: Activation = "relu",
    ) -> None:
        super().__init__()
        widths = list(reversed(_group_widths(width, channel_mults)))
        n_layers = len(widths) * blocks_per_group
        gain = residual_gain if residual_gain is not None else 1.0 / n_layers**2
        layers: list[nn.Module] = [_conv(in_channels, stem_width, 1)]
        n_in = stem_width
        for g, w in enumerate(widths):
            for _ in range(blocks_per_group):
                layers.append(BottleneckBlock(n_in, w, post_gain=gain, kernels=(1, 3, 3, 3), activation=activation))
                n_in = w
            if g < len(widths) - 1:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
        s = stem_downsample
        depth_to_space: list[nn.Module] = [nn.PixelShuffle(s)] if s > 1 else []
        layers += [ACTIVATIONS[activation](), _conv(n_in, out_channels * s * s, 1), *depth_to_space]
        self.blocks = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.blocks(z)

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Hard codes ``LongTensor[B, h, w]`` -> output, same as ``forward(one_hot(tokens))``.

        The 1x1 stem over one-hot inputs is a table lookup: no ``[B, K, h, w]`` tensor
        (2 GB for a batch of 64 at the paper's 8192 codes and 32x32 grid).
        """
        stem = self.blocks[0]
        table = stem.weight[:, :, 0, 0].t()  # [K, stem_width]
        assert int(tokens.max()) < table.shape[0], "token id beyond the decoder's input channels"
        x = torch.nn.functional.embedding(tokens, table).permute(0, 3, 1, 2) + stem.bias[None, :, None, None]
        return self.blocks[1:](x)


# --------------------------------------------------------------------------- shared codec params


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

    def facts(self) -> CodecFacts:
        """Codes, grid and input size: what a convolutional codec hands the prior."""
        return CodecFacts(self.vocab_size, self.grid, self.image_size)

    def build_encoder(self, out_channels: int) -> ConvEncoder:
        return ConvEncoder(
            out_channels=out_channels,
            width=self.width,
            channel_mults=self.channel_mults,
            blocks_per_group=self.blocks_per_group,
            stem_kernel=self.stem_kernel,
            stem_downsample=self.stem_downsample,
            residual_gain=self.residual_gain,
            activation=self.activation,
        )

    def build_decoder(self, in_channels: int, out_channels: int) -> ConvDecoder:
        return ConvDecoder(
            in_channels=in_channels,
            out_channels=out_channels,
            width=self.width,
            channel_mults=self.channel_mults,
            blocks_per_group=self.decoder_blocks_per_group or self.blocks_per_group,
            stem_width=self.decoder_stem_width,
            stem_downsample=self.stem_downsample,
            residual_gain=self.residual_gain,
            activation=self.activation,
        )
