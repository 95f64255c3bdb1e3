"""taming-transformers' VQGAN (Esser et al. 2021) and Gumbel-VQ, as a frozen codec.

The network is the one taming builds from its ``ddconfig`` (the encoder /
decoder of DDPM without time embedding), written here with the same module
names so its checkpoints load after conversion:

- encoder: 3x3 stem to ``ch``; per level ``num_res_blocks`` ResNet blocks
  (GroupNorm(32) -> swish -> 3x3 conv, twice; 1x1 shortcut when the width
  changes) to ``ch * ch_mult[level]`` channels, with a single-head self-attention
  block after each ResNet block at the resolutions in ``attn_resolutions``; a
  strided 3x3 conv halves the size between levels. Then ResNet, attention,
  ResNet at the bottom, GroupNorm, swish and a 3x3 conv to ``z_channels``.
- decoder: the mirror image with ``num_res_blocks + 1`` blocks per level and
  nearest-neighbour 2x upsampling followed by a 3x3 conv.
- ``quant_conv`` (1x1, ``z_channels -> embed_dim``) feeds the quantiser;
  ``post_quant_conv`` (1x1, back) feeds the decoder.
- quantiser ``vq``: nearest of ``n_embed`` codes (``quantize.embedding``);
  ``gumbel``: argmax of a 1x1 projection to ``n_embed`` logits
  (``quantize.proj``), codes embedded by ``quantize.embed``. taming's Gumbel
  quantiser adds Gumbel noise before the argmax even in eval mode; ``encode``
  here takes the noiseless argmax, so tokens are deterministic.

So an image of side ``image_size`` becomes a grid of side
``image_size / 2**(len(ch_mult) - 1)``: f16 (ch_mult of 5 levels) turns 256px
into 16x16 tokens, f8 (4 levels) into 32x32. Pixels are mapped to ``[-1, 1]``
on the way in and back to ``[0, 1]`` (clamped) on the way out.

Two released variants change the ends of the network:

- ``wavelet`` (ruDALL-E's Sber VQGAN, ``rudalle-vqgan``): the decoder predicts 12
  channels, the four Haar wavelet subbands of each colour, and an inverse Haar
  transform turns them into an image of twice the side: 32x32 tokens decode to 512px.
- ``pixels: unit`` (dalle-mini's VQGAN as min-dalle decodes it, ``min-dalle-vqgan``):
  the network sees and returns pixels in [0, 1] instead of [-1, 1], as dalle-mini encoded its
  training images. min-dalle ships only the decoder (``encoder: false``); encoding needs the
  encoder of the same VQGAN, from its taming checkpoint.

Training the VQGAN (perceptual + adversarial losses) is not supported: the
codec is for converted checkpoints (``dalle convert vqgan model.ckpt config.yaml OUT``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from dalle_framework import CodecFacts, ImageCodec, UsageError
from dalle_framework.nn import check_images, token_grid

from .params import MinDalleVQGANParams, SberVQGANParams, VQGANParams


def _norm(channels: int, eps: float) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=eps, affine=True)


def _conv3(n_in: int, n_out: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, kernel_size=3, stride=stride, padding=padding)


def _conv1(n_in: int, n_out: int) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, kernel_size=1)


class ResnetBlock(nn.Module):
    """``[B, n_in, H, W] -> [B, n_out, H, W]``: two (GroupNorm, swish, 3x3 conv) plus a shortcut."""

    def __init__(self, n_in: int, n_out: int, dropout: float, eps: float) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(n_in, eps), _conv3(n_in, n_out)
        self.norm2, self.dropout, self.conv2 = _norm(n_out, eps), nn.Dropout(dropout), _conv3(n_out, n_out)
        if n_in != n_out:
            self.nin_shortcut = _conv1(n_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the ``H * W`` positions, residual: ``[B, C, H, W] -> same``."""

    def __init__(self, channels: int, eps: float) -> None:
        super().__init__()
        self.norm = _norm(channels, eps)
        self.q, self.k, self.v, self.proj_out = (_conv1(channels, channels) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q, k, v = (rearrange(f(h), "b c y x -> b 1 (y x) c") for f in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(C), as taming
        return x + self.proj_out(rearrange(out, "b 1 (y x) c -> b c y x", y=x.shape[2]))


class Downsample(nn.Module):
    """Halve the side: pad right/bottom by one, then a stride-2 3x3 conv (or 2x2 average pooling)."""

    def __init__(self, channels: int, with_conv: bool) -> None:
        super().__init__()
        if with_conv:
            self.conv = _conv3(channels, channels, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "conv"):
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class Upsample(nn.Module):
    """Double the side: nearest neighbour, then a 3x3 conv (when ``with_conv``)."""

    def __init__(self, channels: int, with_conv: bool) -> None:
        super().__init__()
        if with_conv:
            self.conv = _conv3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if hasattr(self, "conv") else x


class Level(nn.Module):
    """One resolution: ``block`` (ResNet blocks), ``attn`` (one per block, or none) and a resampler."""

    def __init__(self) -> None:
        super().__init__()
        self.block, self.attn = nn.ModuleList(), nn.ModuleList()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class Middle(nn.Module):
    """ResNet, attention, ResNet at the lowest resolution."""

    def __init__(self, channels: int, dropout: float, eps: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, eps)
        self.attn_1 = AttnBlock(channels, eps)
        self.block_2 = ResnetBlock(channels, channels, dropout, eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """``[B, in_channels, S, S]`` in [-1, 1] -> ``[B, z_channels, S / 2**(L-1), S / 2**(L-1)]``."""

    def __init__(self, p: "VQGAN.Params") -> None:
        super().__init__()
        eps = p.norm_eps if p.encoder_norm_eps is None else p.encoder_norm_eps
        self.conv_in = _conv3(p.in_channels, p.ch)
        self.down = nn.ModuleList()
        n_in, res = p.ch, p.resolution
        for level, mult in enumerate(p.ch_mult):
            stage = Level()
            for _ in range(p.num_res_blocks):
                stage.block.append(ResnetBlock(n_in, p.ch * mult, p.dropout, eps))
                n_in = p.ch * mult
                if res in p.attn_resolutions:
                    stage.attn.append(AttnBlock(n_in, eps))
            if level < len(p.ch_mult) - 1:
                stage.downsample = Downsample(n_in, p.resamp_with_conv)
                res //= 2
            self.down.append(stage)
        self.mid = Middle(n_in, p.dropout, eps)
        self.norm_out = _norm(n_in, eps)
        self.conv_out = _conv3(n_in, 2 * p.z_channels if p.double_z else p.z_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            h = stage(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """``[B, z_channels, s, s] -> [B, out_ch, s * 2**(L-1), s * 2**(L-1)]`` (about [-1, 1])."""

    def __init__(self, p: "VQGAN.Params") -> None:
        super().__init__()
        n_in = p.ch * p.ch_mult[-1]
        res = p.resolution // 2 ** (len(p.ch_mult) - 1)
        self.conv_in = _conv3(p.z_channels, n_in)
        self.mid = Middle(n_in, p.dropout, p.norm_eps)
        levels: list[Level] = []
        for level in reversed(range(len(p.ch_mult))):  # built from the bottom up, stored top-down
            stage = Level()
            for _ in range(p.num_res_blocks + 1):
                stage.block.append(ResnetBlock(n_in, p.ch * p.ch_mult[level], p.dropout, p.norm_eps))
                n_in = p.ch * p.ch_mult[level]
                if res in p.attn_resolutions:
                    stage.attn.append(AttnBlock(n_in, p.norm_eps))
            if level > 0:
                stage.upsample = Upsample(n_in, p.resamp_with_conv)
                res *= 2
            levels.insert(0, stage)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(n_in, p.norm_eps)
        self.conv_out = _conv3(n_in, p.out_ch)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            h = stage(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class NearestQuantizer(nn.Module):
    """VQ: code = nearest of ``n_embed`` vectors (``embedding``), by taming's distance arithmetic."""

    def __init__(self, n_embed: int, embed_dim: int, z_channels: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """``[B, D, h, w] -> LongTensor[B, h, w]``."""
        flat = rearrange(z, "b d h w -> (b h w) d")
        e = self.embedding.weight
        # |z|^2 + |e|^2 - 2 z.e, summed in this order so near-ties resolve as in the released code.
        distance = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * flat @ e.t()
        return distance.argmin(dim=1).view(z.shape[0], *z.shape[2:])

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """``LongTensor[B, h, w] -> [B, D, h, w]``."""
        return rearrange(self.embedding(codes), "b h w d -> b d h w")


class GumbelQuantizer(nn.Module):
    """Gumbel-VQ: code = argmax of ``proj`` logits over ``n_embed``; vectors from ``embed``."""

    def __init__(self, n_embed: int, embed_dim: int, z_channels: int) -> None:
        super().__init__()
        self.proj = _conv1(z_channels, n_embed)
        self.embed = nn.Embedding(n_embed, embed_dim)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        return self.proj(z).argmax(dim=1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        return rearrange(self.embed(codes), "b h w d -> b d h w")


QUANTIZERS: dict[str, type[nn.Module]] = {"vq": NearestQuantizer, "gumbel": GumbelQuantizer}
HAAR = 2**-0.5  # db1's synthesis filters: low [s, s], high [s, -s]


def inverse_haar(subbands: torch.Tensor) -> torch.Tensor:
    """One level of the inverse 2-D Haar transform: ``[B, 12, h, w] -> [B, 3, 2h, 2w]``.

    Channels are the three colours' low-pass band, then per colour its LH, HL and HH
    bands (ruDALL-E's layout). Rows are synthesised first, then columns, as
    pytorch_wavelets' ``DWTInverse(wave="db1", mode="zero")`` does.
    """
    b, _, h, w = subbands.shape
    ll = subbands[:, :3]
    lh, hl, hh = subbands[:, 3:].reshape(b, 3, 3, h, w).unbind(2)

    def synthesise(low: torch.Tensor, high: torch.Tensor, dim: int) -> torch.Tensor:
        pair = torch.stack([low * HAAR + high * HAAR, low * HAAR - high * HAAR], dim=dim + 1)
        return pair.flatten(dim, dim + 1)

    rows_low, rows_high = synthesise(ll, lh, 2), synthesise(hl, hh, 2)
    return synthesise(rows_low, rows_high, 3)


class VQGAN(ImageCodec):
    """taming-transformers VQGAN / Gumbel-VQ (frozen; load converted weights).

    - ``encode(images[B,3,S,S] in [0,1]) -> LongTensor[B, (S/f)**2]``, f = 2**(len(ch_mult)-1)
    - ``decode(LongTensor[B, h*w]) -> images[B,3,h*f,w*f]`` in [0,1] (twice that side with ``wavelet``)
    - ``loss``: not supported (raises UsageError)

    Released shapes: ImageNet f16 with 1024 or 16384 codes (ch 128, ch_mult
    1,1,2,2,4, attention at 16, z 256, embed 256); OpenImages Gumbel f8 with 8192
    codes (ch 128, ch_mult 1,1,2,4, no attention above the middle, z 256, embed 256).
    """

    Params = VQGANParams

    @classmethod
    def describe(cls, params: "VQGAN.Params") -> CodecFacts:
        side = params.image_size // 2 ** (len(params.ch_mult) - 1)  # one downsampling between levels
        return CodecFacts(params.n_embed, (side, side), params.image_size)

    def __init__(self, params: Optional["VQGAN.Params"] = None, **runtime: Any) -> None:
        super().__init__()
        self.params = p = params or self.Params()
        self.adopt(self.describe(p))
        if p.encoder:
            self.encoder = Encoder(p)
            self.quant_conv = _conv1(p.z_channels, p.embed_dim)
        self.decoder = Decoder(p)
        self.quantize = QUANTIZERS[p.quantizer](p.n_embed, p.embed_dim, p.z_channels)
        self.post_quant_conv = _conv1(p.embed_dim, p.z_channels)

    def pre_quant(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` in [0, 1] -> quantiser input ``[B, embed_dim, h, w]``."""
        check_images(images, self.image_size)
        if not self.params.encoder:
            raise UsageError(
                f"codec {self.name or 'vqgan'!r} holds only a decoder (min-dalle ships no encoder), so it cannot encode images; "
                "convert it together with the taming checkpoint of the same VQGAN (see docs/pretrained-priors.md)"
            )
        return self.quant_conv(self.encoder(images * 2 - 1 if self.params.pixels == "signed" else images))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return rearrange(self.quantize.codes(self.pre_quant(images)), "b h w -> b (h w)")

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        z = self.quantize.lookup(token_grid(tokens, self.grid))
        out = self.decoder(self.post_quant_conv(z))
        if self.params.wavelet:
            out = inverse_haar(out)
        if self.params.pixels == "unit":
            return out.clamp(0, 1).float()
        return ((out.clamp(-1, 1) + 1) / 2).float()

    def loss(self, images: torch.Tensor, step: int = 0) -> dict[str, Any]:
        raise UsageError(
            f"codec {self.name or 'vqgan'!r} cannot be trained here (VQGAN training needs perceptual and adversarial "
            "losses); convert released weights with `dalle convert vqgan model.ckpt config.yaml OUT` and use its "
            "codec block (weights, frozen: true)"
        )

    @classmethod
    def convert_released(cls, files, out_dir, *, trust_pickle: bool, params=None) -> dict:
        from .convert import convert_taming_files

        return convert_taming_files(cls, files, out_dir, trust_pickle=trust_pickle, overrides=params)


class SberVQGAN(VQGAN):
    """ruDALL-E's Sber VQGAN: Gumbel f8, 8,192 codes, the wavelet decoder (256px in, 32x32 tokens, 512px out).

    Convert ``vqgan.gumbelf8-sber-dwt.model.ckpt`` (or the plain ``vqgan.gumbelf8-sber.model.ckpt``,
    256px out) with ``dalle convert rudalle-vqgan FILE OUT``: no config file is needed.
    """

    Params = SberVQGANParams

    @classmethod
    def convert_released(cls, files, out_dir, *, trust_pickle: bool, params=None) -> dict:
        from .convert import convert_rudalle_files

        return convert_rudalle_files(cls, files, out_dir, trust_pickle=trust_pickle, overrides=params)


class MinDalleVQGAN(VQGAN):
    """dalle-mini's VQGAN f16 (16,384 codes, pixels in [0, 1]) as min-dalle ships it: the decoder alone.

    Convert ``detoker.pt`` with ``dalle convert min-dalle-vqgan detoker.pt OUT``; to encode
    images (fine-tuning) add the taming checkpoint of the same VQGAN as a second file: its
    encoder is taken once every tensor both files hold matches.
    """

    Params = MinDalleVQGANParams

    @classmethod
    def convert_released(cls, files, out_dir, *, trust_pickle: bool, params=None) -> dict:
        from .convert import convert_min_dalle_files

        return convert_min_dalle_files(cls, files, out_dir, trust_pickle=trust_pickle, overrides=params)
