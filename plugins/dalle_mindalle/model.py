"""DALL-E Mini / Mega's prior as min-dalle runs it: a BART encoder and an image-token decoder.

The network of ``min-dalle`` 0.4.11 (``DalleBartEncoder`` / ``DalleBartDecoder``), written
with the same module names under ``encoder.`` and ``decoder.`` so converted weights load
as they are:

- encoder: BART ids (the tokenizer's ids minus one; padding reads BART's ``<pad>``, 1)
  embedded with learned positions, a LayerNorm, then ``layers`` blocks of
  (LayerNorm, self-attention over the caption's non-padding tokens, LayerNorm, residual)
  and (GLU, residual), a final LayerNorm.
- decoder: ``[start, image tokens...]`` embedded with learned positions and a LayerNorm,
  then ``layers`` blocks of causal self-attention, cross-attention to the encoder
  states and a GLU, each a (LayerNorm, branch, LayerNorm, residual) sandwich; a final
  LayerNorm and ``lm_head``. Its logits over the codec's codes predict the next token.
- GLU: LayerNorm, ``gelu(fc0(x)) * fc1(x)``, LayerNorm, ``fc2``. Attention has no biases.

min-dalle starts every image from token 16383 (``2**14 - 1``, the ``start_token`` param)
and samples with "supercondition" guidance against the caption reduced to its first and
last tokens; here the framework's cached sampler draws (KV cache for self-attention,
cross-attention keys and values computed once per caption) with that same unconditional
caption. The loss is the image tokens' cross-entropy (the encoder models no text).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dalle_framework import PAD_ID, Prior, Sampling, StepCallback, UsageError
from dalle_framework.attention import Position, positions
from dalle_framework.decoding import KVCache, sample_image_tokens
from dalle_framework.metrics import activation_bytes, flops_per_token

from .params import MinDalleParams

BART_PAD = 1  # BART's <pad>: the encoder ignores keys holding it
SHIFT = 1  # tokenizer ids are BART's plus one (0 = the framework's padding)


def attention(module: nn.Module, q_in: Tensor, k: Tensor, v: Tensor, mask: Tensor, dropout: float) -> Tensor:
    """Multi-head attention of ``q_in [B, n, dim]`` over keys/values ``[B, H, m, d]`` (``mask`` True = attend)."""
    q = rearrange(module.q_proj(q_in), "b n (h d) -> b h n d", h=module.heads)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    return module.out_proj(rearrange(out, "b h n d -> b n (h d)"))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.k_proj, self.v_proj, self.q_proj, self.out_proj = (nn.Linear(dim, dim, bias=False) for _ in range(4))

    def keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        split = lambda t: rearrange(t, "b n (h d) -> b h n d", h=self.heads)  # noqa: E731
        return split(self.k_proj(x)), split(self.v_proj(x))


class GLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.ln0, self.ln1 = nn.LayerNorm(dim), nn.LayerNorm(hidden)
        self.fc0, self.fc1 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.ln0(x)
        return self.fc2(self.ln1(F.gelu(self.fc0(x)) * self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, p: MinDalleParams) -> None:
        super().__init__()
        self.pre_self_attn_layer_norm, self.self_attn_layer_norm = nn.LayerNorm(p.dim), nn.LayerNorm(p.dim)
        self.self_attn = Attention(p.dim, p.heads)
        self.glu = GLU(p.dim, p.glu_dim)
        self.drop = p.dropout

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        dropout = self.drop if self.training else 0.0
        h = self.pre_self_attn_layer_norm(x)
        k, v = self.self_attn.keys_values(h)
        x = x + F.dropout(self.self_attn_layer_norm(attention(self.self_attn, h, k, v, keep, dropout)), dropout, self.training)
        return x + F.dropout(self.glu(x), dropout, self.training)


class DecoderLayer(nn.Module):
    def __init__(self, p: MinDalleParams) -> None:
        super().__init__()
        self.pre_self_attn_layer_norm, self.self_attn_layer_norm = nn.LayerNorm(p.dim), nn.LayerNorm(p.dim)
        self.self_attn = Attention(p.dim, p.heads)
        self.pre_encoder_attn_layer_norm, self.encoder_attn_layer_norm = nn.LayerNorm(p.dim), nn.LayerNorm(p.dim)
        self.encoder_attn = Attention(p.dim, p.heads)
        self.glu = GLU(p.dim, p.glu_dim)
        self.drop = p.dropout

    def forward(self, x: Tensor, start: Position, cross: tuple[Tensor, Tensor, Tensor], cache: Optional[KVCache]) -> Tensor:
        """``x [B, n, dim]`` at decoder positions ``start..``; ``cross`` = encoder keys, values and their mask."""
        dropout = self.drop if self.training else 0.0
        h = self.pre_self_attn_layer_norm(x)
        k, v = self.self_attn.keys_values(h)
        if cache is not None:
            k, v = cache.update(k, v, start)
        rows = positions(start, x.shape[1], x.device)[:, None]
        causal = torch.arange(k.shape[2], device=x.device)[None, :] <= rows
        x = x + F.dropout(self.self_attn_layer_norm(attention(self.self_attn, h, k, v, causal, dropout)), dropout, self.training)
        h = self.pre_encoder_attn_layer_norm(x)
        x = x + F.dropout(self.encoder_attn_layer_norm(attention(self.encoder_attn, h, *cross, dropout)), dropout, self.training)
        return x + F.dropout(self.glu(x), dropout, self.training)


class Encoder(nn.Module):
    def __init__(self, p: MinDalleParams, text_len: int) -> None:
        super().__init__()
        self.embed_tokens, self.embed_positions = nn.Embedding(p.text_vocab, p.dim), nn.Embedding(text_len, p.dim)
        self.layers = nn.ModuleList(EncoderLayer(p) for _ in range(p.layers))
        self.layernorm_embedding, self.final_ln = nn.LayerNorm(p.dim), nn.LayerNorm(p.dim)


class Decoder(nn.Module):
    def __init__(self, p: MinDalleParams, image_len: int) -> None:
        super().__init__()
        self.embed_tokens, self.embed_positions = nn.Embedding(p.image_vocab + 1, p.dim), nn.Embedding(image_len, p.dim)
        self.layers = nn.ModuleList(DecoderLayer(p) for _ in range(p.layers))
        self.layernorm_embedding, self.final_ln = nn.LayerNorm(p.dim), nn.LayerNorm(p.dim)
        self.lm_head = nn.Linear(p.dim, p.image_vocab + 1, bias=False)


class MinDallePrior(Prior):
    """DALL-E Mini / Mega (see the module docstring); ``loss`` / ``generate`` per the Prior contract.

    Built as ``cls(params, text_vocab_size=, text_len=, image_vocab_size=, grid=)``; the
    released models read 64 caption tokens and write a 16x16 grid of 16,384 codes.
    Convert ``encoder.pt`` and ``decoder.pt`` once with ``dalle convert min-dalle FILES OUT``.
    """

    Params = MinDalleParams
    bound_params = ("heads",)

    def __init__(self, params: MinDalleParams, *, text_vocab_size: int, text_len: int, image_vocab_size: int, grid: tuple[int, int]):
        super().__init__()
        p = self.params = params
        if p.dim % p.heads:
            raise UsageError(f"prior.params: dim ({p.dim}) must be divisible by heads ({p.heads})")
        if text_vocab_size - SHIFT > p.text_vocab or image_vocab_size > p.image_vocab + 1 or p.start_token > p.image_vocab:
            raise UsageError(
                f"prior.params: the tokenizer's {text_vocab_size - SHIFT} BART ids and the codec's {image_vocab_size} codes "
                f"must fit text_vocab ({p.text_vocab}) and image_vocab + 1 ({p.image_vocab + 1}), with start_token inside"
            )
        self.text_len, self.grid = text_len, (int(grid[0]), int(grid[1]))
        self.image_len = self.grid[0] * self.grid[1]
        self.text_vocab_size, self.image_vocab_size = text_vocab_size, image_vocab_size
        self.encoder = Encoder(p, text_len)
        self.decoder = Decoder(p, self.image_len)
        self.apply(_init_weights)

    # -- the two halves ---------------------------------------------------------------------------

    def encode_text(self, text: Tensor) -> tuple[Tensor, Tensor]:
        """Caption ids ``[B, T]`` -> encoder states ``[B, T, dim]`` and the key mask ``[B, 1, 1, T]``."""
        ids = torch.where(text == PAD_ID, BART_PAD, text - SHIFT)
        keep = (ids != BART_PAD)[:, None, None, :]
        enc = self.encoder
        x = enc.layernorm_embedding(enc.embed_tokens(ids) + enc.embed_positions(torch.arange(text.shape[1], device=text.device)))
        for layer in enc.layers:
            x = checkpoint(layer, x, keep, use_reentrant=False) if self._checkpointing() else layer(x, keep)
        return enc.final_ln(x), keep

    def cross_inputs(self, states: Tensor, keep: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per decoder layer: the encoder states' keys and values and their mask (computed once per caption)."""
        return [(*layer.encoder_attn.keys_values(states), keep) for layer in self.decoder.layers]

    def decode(self, tokens: Tensor, start: Position, cross, caches: Optional[list[KVCache]] = None) -> Tensor:
        """Decoder tokens ``[B, n]`` at positions ``start..`` -> final states ``[B, n, dim]``."""
        dec = self.decoder
        x = dec.layernorm_embedding(dec.embed_tokens(tokens) + dec.embed_positions(positions(start, tokens.shape[1], tokens.device)))
        for i, layer in enumerate(dec.layers):
            cache = caches[i] if caches is not None else None
            if self._checkpointing() and cache is None:
                x = checkpoint(layer, x, start, cross[i], None, use_reentrant=False)
            else:
                x = layer(x, start, cross[i], cache)
        return dec.final_ln(x)

    def image_logits(self, states: Tensor) -> Tensor:
        """Logits over the codec's codes only (min-dalle reads the first 2**14 of ``lm_head``'s outputs)."""
        return F.linear(states, self.decoder.lm_head.weight[: self.image_vocab_size])

    def _checkpointing(self) -> bool:
        return self.params.grad_checkpointing and self.training

    def with_start(self, image: Tensor) -> Tensor:
        start = torch.full((len(image), 1), self.params.start_token, dtype=torch.long, device=image.device)
        return torch.cat([start, image], dim=1)

    # -- the Prior contract -----------------------------------------------------------------------

    def loss(self, text: Tensor, image_tokens: Tensor) -> dict[str, Any]:
        """text ``[B, T]``, image_tokens ``[B, N]`` -> ``loss`` = ``image_loss`` (nats per image token)."""
        B, N = text.shape[0], self.image_len
        assert text.shape == (B, self.text_len), f"text must be [B, {self.text_len}], got {tuple(text.shape)}"
        assert image_tokens.shape == (B, N), f"image_tokens must be [B, {N}], got {tuple(image_tokens.shape)}"
        cross = self.cross_inputs(*self.encode_text(text))
        logits = self.image_logits(self.decode(self.with_start(image_tokens[:, :-1]), 0, cross))
        image_loss = F.cross_entropy(logits.float().reshape(-1, self.image_vocab_size), image_tokens.reshape(-1))
        return {"loss": image_loss, "image_loss": image_loss.detach()}

    @torch.no_grad()
    def generate(
        self,
        text: Tensor,
        sampling: Sampling,
        prime: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
        on_step: Optional[StepCallback] = None,
    ) -> Tensor:
        """text ``[B, T]`` -> codes ``[B, h*w]`` by the framework's cached sampler (guidance: min-dalle's unconditional caption)."""
        assert text.shape[1:] == (self.text_len,), f"text must be [B, {self.text_len}], got {tuple(text.shape)}"
        return sample_image_tokens(self, text, sampling, image_len=self.image_len, prime=prime, generator=generator, on_step=on_step)

    # -- what the framework's cached sampler calls ------------------------------------------------

    def unconditional_text(self, text: Tensor) -> Tensor:
        """min-dalle's supercondition caption: each caption's first and last tokens, then padding."""
        last = (text != PAD_ID).long().cumsum(1).argmax(1)  # the last non-padding position
        out = torch.full_like(text, PAD_ID)
        out[:, 0] = text[:, 0]
        out[:, 1] = text.gather(1, last[:, None]).squeeze(1)
        return out

    def next_logits(self, text: Tensor, image: Tensor) -> Tensor:
        cross = self.cross_inputs(*self.encode_text(text))
        return self.image_logits(self.decode(self.with_start(image), 0, cross)[:, -1])

    def prefill(self, text: Tensor, image: Tensor) -> tuple[Tensor, tuple[list, list[KVCache]]]:
        cross = self.cross_inputs(*self.encode_text(text))
        caches = [KVCache(len(text), self.params.heads, self.image_len, self.params.dim // self.params.heads) for _ in self.decoder.layers]
        states = self.decode(self.with_start(image), 0, cross, caches)
        return self.image_logits(states[:, -1]), (cross, caches)

    def decode_step(self, state, token: Tensor, index: Tensor) -> Tensor:
        cross, caches = state
        return self.image_logits(self.decode(token[:, None], index + 1, cross, caches)[:, -1])

    @classmethod
    def convert_released(cls, files, out_dir, *, trust_pickle: bool, params=None) -> dict:
        from .convert import convert_min_dalle_prior

        return convert_min_dalle_prior(cls, files, out_dir, trust_pickle=trust_pickle, overrides=params)

    # -- statistics for `dalle inspect` ------------------------------------------------------------

    def flops_per_token(self) -> dict[str, Any]:
        """Per image token: the decoder's matrices and its attention over image and caption tokens, plus the
        encoder's work spread over the image tokens it serves."""
        p = self.params
        lookups = {id(m.weight) for m in (self.encoder.embed_tokens, self.encoder.embed_positions, self.decoder.embed_tokens, self.decoder.embed_positions)}
        encoder = sum(q.numel() for q in self.encoder.parameters() if id(q) not in lookups)
        decoder = sum(q.numel() for q in self.decoder.parameters() if id(q) not in lookups)
        per_token = decoder + encoder * self.text_len / self.image_len
        attended = (self.image_len + 1) / 2 + self.text_len  # causal self-attention, then the whole caption
        return flops_per_token(int(per_token), n_layers=p.layers, seq_len=self.image_len, d_attn=p.dim, attended=attended)

    def activation_bytes(self, batch_size: int, bytes_per_value: int) -> int:
        p = self.params
        common = dict(dim=p.dim, batch=batch_size, bytes_per_value=bytes_per_value, checkpointing=p.grad_checkpointing,
                      mlp_ratio=p.glu_dim / p.dim * 1.5)  # a GLU keeps three hidden-width tensors
        encoder = activation_bytes(layers=p.layers, tokens=self.text_len, **common)
        decoder = activation_bytes(layers=p.layers, tokens=self.image_len, extra_per_layer=8, logits=self.image_vocab_size, **common)
        return encoder + decoder  # extra 8: cross-attention's input, q, output, and two more sandwich norms


def _init_weights(module: nn.Module) -> None:
    """BART-style initialisation for fresh (unconverted) priors: normal(0.02) matrices."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)


__all__ = ["MinDallePrior"]
