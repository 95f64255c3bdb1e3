"""The DALL-E discrete VAE's convolutional encoder and decoder (Ramesh et al. 2021, appendix A.2).

Both are a stem, ``len(channel_mults)`` groups of bottleneck residual blocks and a
1x1 output conv. The encoder max-pools between groups and the decoder upsamples
(nearest neighbour) between groups, so the token grid is
``image_size / 2 ** (groups - 1)``. Each residual branch is scaled by
``1 / n_layers ** 2`` (``n_layers`` = total blocks), which keeps the network near
its identity path at initialisation and lets deep stacks train stably.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import torch
from torch import nn

if TYPE_CHECKING:
    from .params import Activation, ConvCodecParams


def _conv(n_in: int, n_out: int, kernel: int) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, kernel, padding=(kernel - 1) // 2)


# The paper uses ReLU; SiLU / GELU are the usual alternatives in later VQ models.
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU}


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

    @classmethod
    def from_params(cls, params: ConvCodecParams, out_channels: int) -> "ConvEncoder":
        """The encoder a convolutional codec's settings describe, with ``out_channels`` code logits or vectors."""
        return cls(
            out_channels=out_channels,
            width=params.width,
            channel_mults=params.channel_mults,
            blocks_per_group=params.blocks_per_group,
            stem_kernel=params.stem_kernel,
            stem_downsample=params.stem_downsample,
            residual_gain=params.residual_gain,
            activation=params.activation,
        )

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

    @classmethod
    def from_params(cls, params: ConvCodecParams, in_channels: int, out_channels: int) -> "ConvDecoder":
        """The decoder a convolutional codec's settings describe, from ``in_channels`` (codes) to ``out_channels``."""
        return cls(
            in_channels=in_channels,
            out_channels=out_channels,
            width=params.width,
            channel_mults=params.channel_mults,
            blocks_per_group=params.decoder_blocks_per_group or params.blocks_per_group,
            stem_width=params.decoder_stem_width,
            stem_downsample=params.stem_downsample,
            residual_gain=params.residual_gain,
            activation=params.activation,
        )

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
