"""ruDALL-E's prior (Malevich and its siblings): a decoder-only transformer over ``[text | image]``.

The network of ``rudalle`` 1.1.3's ``DalleModel``, written with the same module names
so converted checkpoints load as they are. Its ``v3`` layout (Malevich v3, Surrealist XL,
Kandinsky) is described here; ``layout_version: v2`` (Malevich v2, Emojich) differs in
two ways: a BOS id is read before the caption, so the image starts one position later
while the masks are still built for ``text_len`` (they see every image token one place
late), and the last layer's 11x11 window wraps around the grid's edges.

1. Embed. Text ids get ``text_embeddings`` plus ``text_pos_embeddings``; a padded
   position (id 0) reads instead the id ``text_vocab + position`` (one learned padding
   token per position, the table's last ``text_len`` rows). Image codes get
   ``image_embeddings`` plus ``image_row_embeddings`` and ``image_col_embeddings``. The
   embeddings' gradient is scaled by ``embedding_grad_scale`` (CogView: 0.1).
2. ``depth`` pre-norm layers. CogView's sandwich norm adds a LayerNorm on the attention
   output and on the MLP output before each residual addition. The MLP is GELU (tanh
   form) at 4x width; the attention output is clamped to fp16's range. Each layer
   attends with one of ruDALL-E's masks (:mod:`dalle_framework.attention` patterns): every
   image query sees all text, and earlier image tokens by layer (ruDALL-E's order): layers
   1, 5, 9, ... ``rudalle-column`` (the query's own column), the last ``rudalle-conv`` (an
   11x11 window around the query), the rest ``row`` (the previous ``w + 1`` positions).
3. ``transformer.final_layernorm``, then ``to_logits`` (LayerNorm and one Linear over
   the text ids, the padding tokens and the image codes). Text logits are its first
   ``text_vocab + text_len`` rows, image logits the rest.

PB-relax (CogView section 2.4) rescales attention scores so fp16 cannot overflow
before the softmax: the query is divided by sqrt(head_dim) before its product with
the keys and each head's largest score is subtracted. PyTorch's SDPA kernels never
form fp16 scores either (the math kernel scales q and k before their product, the
fused kernels accumulate it in fp32, and all subtract the row maximum before
exponentiating), so the masks run through the framework's attention kernels and KV
cache unchanged; in fp32 the two agree to rounding (tests/test_pretrained_priors.py).

Loss: the framework's convention (text positions ``0..T-2`` predict text, positions
``T-1..L-2`` predict the image codes with the image logits, as ruDALL-E's sampling uses
them), weighted 1/8 text and 7/8 image as ruDALL-E weights its loss. ruDALL-E's own v3
training loss scores the first image code against the text logits instead.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dalle_framework import PAD_ID, Prior, Sampling, StepCallback
from dalle_framework.attention import Layout, Position, mean_keys_per_query, pattern_attention, positions
from dalle_framework.decoding import KVCache, all_padding, sample_image_tokens
from dalle_framework.metrics import activation_bytes, flops_per_token

from .params import RudalleParams

FP16_MAX = 65504.0


V2_PREFIX_ID = 2  # the id rudalle's v2 forward puts before every caption (its BOS)


def layer_pattern(layer: int, depth: int, version: str = "v3") -> str:
    """ruDALL-E's choice of mask per layer (``DalleTransformer._get_layer_mask``)."""
    if (layer - 1) % 4 == 0:
        return "rudalle-column"
    if layer != depth - 1:
        return "row"
    return "rudalle-conv-wrapped" if version == "v2" else "rudalle-conv"


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, layout: Layout, pattern: str, dropout: float) -> None:
        super().__init__()
        self.heads, self.layout, self.pattern, self.dropout = heads, layout, pattern, dropout
        self.query_key_value = nn.Linear(dim, 3 * dim)
        self.dense = nn.Linear(dim, dim)

    def forward(self, x: Tensor, start: Position, cache: Optional[KVCache]) -> Tensor:
        q, k, v = rearrange(self.query_key_value(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        if cache is not None:
            k, v = cache.update(k, v, start)
        dropout = self.dropout if self.training else 0.0
        out = pattern_attention(q, k, v, pattern=self.pattern, layout=self.layout, q_start=start, dropout_p=dropout)
        return self.dense(rearrange(out, "b h n d -> b n (h d)")).clamp(-FP16_MAX, FP16_MAX)


class MLP(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(dim, 4 * dim)
        self.dense_4h_to_h = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


class Layer(nn.Module):
    """Pre-norm layer with CogView's sandwich norms."""

    def __init__(self, p: RudalleParams, layout: Layout, pattern: str) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(p.dim)
        self.attention = SelfAttention(p.dim, p.heads, layout, pattern, p.attention_dropout)
        self.post_attention_layernorm = nn.LayerNorm(p.dim)
        self.mlp = MLP(p.dim)
        if p.sandwich_norm:
            self.before_first_addition_layernorm = nn.LayerNorm(p.dim)
            self.before_second_addition_layernorm = nn.LayerNorm(p.dim)
        self.drop = nn.Dropout(p.output_dropout)
        self.sandwich = p.sandwich_norm

    def forward(self, x: Tensor, start: Position = 0, cache: Optional[KVCache] = None) -> Tensor:
        attended = self.drop(self.attention(self.input_layernorm(x), start, cache))
        if self.sandwich:
            attended = self.before_first_addition_layernorm(attended)
        x = x + attended
        mixed = self.drop(self.mlp(self.post_attention_layernorm(x)))
        if self.sandwich:
            mixed = self.before_second_addition_layernorm(mixed)
        return x + mixed


class Transformer(nn.Module):
    def __init__(self, p: RudalleParams, layout: Layout) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Layer(p, layout, layer_pattern(i, p.depth, p.layout_version)) for i in range(p.depth))
        self.final_layernorm = nn.LayerNorm(p.dim)


class RudallePrior(Prior):
    """ruDALL-E Malevich's transformer (see the module docstring); ``loss`` / ``generate`` per the Prior contract.

    Built as ``cls(params, text_vocab_size=, text_len=, image_vocab_size=, grid=)``; the
    released Malevich has 16,384 text ids, 128 text tokens, 8,192 codes and a 32x32 grid.
    Convert ``pytorch_model_v3.bin`` once with ``dalle convert rudalle FILE OUT``.
    """

    Params = RudalleParams
    bound_params = ("heads", "layout_version")

    def __init__(self, params: RudalleParams, *, text_vocab_size: int, text_len: int, image_vocab_size: int, grid: tuple[int, int]):
        super().__init__()
        p = self.params = params
        assert p.dim % p.heads == 0, f"dim ({p.dim}) must be divisible by heads ({p.heads})"
        self.layout = Layout(text_len, (int(grid[0]), int(grid[1])))  # the masks' view of the sequence
        self.text_len, self.grid = text_len, self.layout.grid
        # Where the image starts in the sequence the layers read. v2 puts a BOS before the caption but
        # builds its masks for text_len, so the masks see each image token one position late.
        self.prefix = 1 if p.layout_version == "v2" else 0
        self.image_start = text_len + self.prefix
        self.text_vocab_size, self.image_vocab_size = text_vocab_size, image_vocab_size
        self.text_ids = text_vocab_size + text_len  # the text ids, then one padding token per position
        self.text_embeddings = nn.Embedding(self.text_ids, p.dim)
        self.image_embeddings = nn.Embedding(image_vocab_size, p.dim)
        self.text_pos_embeddings = nn.Embedding(text_len + 1, p.dim)  # v3 reads text_len rows of these, v2 all (its BOS)
        self.image_row_embeddings = nn.Embedding(self.grid[0], p.dim)
        self.image_col_embeddings = nn.Embedding(self.grid[1], p.dim)
        self.transformer = Transformer(p, self.layout)
        self.to_logits = nn.Sequential(nn.LayerNorm(p.dim), nn.Linear(p.dim, self.text_ids + image_vocab_size))
        self.apply(_init_weights)

    # -- embeddings and the stack -------------------------------------------------------------

    def text_ids_of(self, text: Tensor) -> Tensor:
        """Caption ids ``[B, T]`` -> the table's rows: padding at position ``p`` reads ``text_vocab + p``."""
        pads = torch.arange(self.text_len, device=text.device) + self.text_vocab_size
        return torch.where(text == PAD_ID, pads, text)

    def sequence(self, ids: Tensor, image: Tensor) -> Tensor:
        """Mapped caption ids ``[B, T]`` and image codes ``[B, n]`` -> the tokens the layers read (v2: BOS first)."""
        parts = [ids, image]
        if self.prefix:
            parts.insert(0, ids.new_full((ids.shape[0], self.prefix), V2_PREFIX_ID))
        return torch.cat(parts, dim=1)

    def embed(self, tokens: Tensor, start: Position = 0) -> Tensor:
        """Tokens ``[B, n]`` of :meth:`sequence` at positions ``start..`` -> ``[B, n, dim]``."""
        T, w = self.image_start, self.grid[1]
        if not isinstance(start, int):  # a decode step: one image token at a device position
            idx = positions(start - T, tokens.shape[1], tokens.device)
            out = self.image_embeddings(tokens) + self.image_row_embeddings(idx // w) + self.image_col_embeddings(idx % w)
        else:
            n_text = max(0, min(T - start, tokens.shape[1]))
            parts = []
            if n_text:
                pos = torch.arange(start, start + n_text, device=tokens.device)
                parts.append(self.text_embeddings(tokens[:, :n_text]) + self.text_pos_embeddings(pos))
            if tokens.shape[1] > n_text:
                idx = torch.arange(start + n_text - T, start + tokens.shape[1] - T, device=tokens.device)
                codes = tokens[:, n_text:]
                parts.append(self.image_embeddings(codes) + self.image_row_embeddings(idx // w) + self.image_col_embeddings(idx % w))
            out = torch.cat(parts, dim=1)
        scale = self.params.embedding_grad_scale
        return out * scale + out.detach() * (1 - scale)  # CogView: the embeddings learn at a tenth of the rate

    def hidden(self, tokens: Tensor, start: Position = 0, caches: Optional[list[KVCache]] = None) -> Tensor:
        """Tokens ``[B, n]`` of :meth:`sequence` at positions ``start..`` -> normed states ``[B, n, dim]``."""
        x = self.embed(tokens, start)
        for i, layer in enumerate(self.transformer.layers):
            cache = caches[i] if caches is not None else None
            if self.params.grad_checkpointing and self.training and cache is None:
                x = checkpoint(layer, x, start, None, use_reentrant=False)
            else:
                x = layer(x, start, cache)
        return self.to_logits[0](self.transformer.final_layernorm(x))

    def text_logits(self, states: Tensor) -> Tensor:
        head = self.to_logits[1]
        return F.linear(states, head.weight[: self.text_ids], head.bias[: self.text_ids])

    def image_logits(self, states: Tensor) -> Tensor:
        head = self.to_logits[1]
        return F.linear(states, head.weight[self.text_ids :], head.bias[self.text_ids :])

    # -- the Prior contract -----------------------------------------------------------------------

    def loss(self, text: Tensor, image_tokens: Tensor) -> dict[str, Any]:
        """text ``[B, T]``, image_tokens ``[B, N]`` -> ``loss`` (weighted), ``text_loss``, ``image_loss`` (nats)."""
        B, T, N = text.shape[0], self.text_len, self.layout.image_len
        assert text.shape == (B, T), f"text must be [B, {T}], got {tuple(text.shape)}"
        assert image_tokens.shape == (B, N), f"image_tokens must be [B, {N}], got {tuple(image_tokens.shape)}"
        ids, start = self.text_ids_of(text), self.image_start
        states = self.hidden(self.sequence(ids, image_tokens)[:, :-1])
        image_logits = self.image_logits(states[:, start - 1 :])
        image_loss = F.cross_entropy(image_logits.float().reshape(-1, self.image_vocab_size), image_tokens.reshape(-1))
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.params.text_loss_weight > 0):
            text_loss = self._text_loss(self.text_logits(states[:, start - T : start - 1]), text, ids)
        loss = self.params.text_loss_weight * text_loss + self.params.image_loss_weight * image_loss
        return {"loss": loss, "text_loss": text_loss.detach(), "image_loss": image_loss.detach()}

    def _text_loss(self, logits: Tensor, text: Tensor, ids: Tensor) -> Tensor:
        """Mean nats over real words and the first padding token (later padding is trivially predictable)."""
        keep = (text[:, 1:] != PAD_ID) | (text[:, :-1] != PAD_ID)
        per_token = F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")
        return (per_token * keep).sum() / keep.sum().clamp(min=1)

    @torch.no_grad()
    def generate(
        self,
        text: Tensor,
        sampling: Sampling,
        prime: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
        on_step: Optional[StepCallback] = None,
    ) -> Tensor:
        """text ``[B, T]`` -> codes ``[B, h*w]`` by the framework's cached sampler (guidance: all-padding captions)."""
        assert text.shape[1:] == (self.text_len,), f"text must be [B, {self.text_len}], got {tuple(text.shape)}"
        return sample_image_tokens(self, text, sampling, image_len=self.layout.image_len, prime=prime, generator=generator, on_step=on_step)

    # -- what the framework's cached sampler calls ------------------------------------------------

    unconditional_text = staticmethod(all_padding)

    def next_logits(self, text: Tensor, image: Tensor) -> Tensor:
        return self.image_logits(self.hidden(self.sequence(self.text_ids_of(text), image))[:, -1])

    def prefill(self, text: Tensor, image: Tensor) -> tuple[Tensor, list[KVCache]]:
        caches = [KVCache(text.shape[0], self.params.heads, self.layout.seq_len, self.params.dim // self.params.heads)
                  for _ in self.transformer.layers]
        states = self.hidden(self.sequence(self.text_ids_of(text), image), 0, caches)
        return self.image_logits(states[:, -1]), caches

    def decode_step(self, caches: list[KVCache], token: Tensor, index: Tensor) -> Tensor:
        return self.image_logits(self.hidden(token[:, None], index + self.image_start, caches)[:, -1])

    # -- statistics for `dalle inspect` ------------------------------------------------------------

    @classmethod
    def convert_released(cls, files, out_dir, *, trust_pickle: bool, params=None) -> dict:
        from .convert import convert_rudalle_prior

        return convert_rudalle_prior(cls, files, out_dir, trust_pickle=trust_pickle, overrides=params)

    def layer_patterns(self) -> list[str]:
        return [layer.attention.pattern for layer in self.transformer.layers]

    def flops_per_token(self) -> dict[str, Any]:
        embeddings = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        non_embedding = sum(p.numel() for p in self.parameters() if id(p) not in embeddings)
        attended = [mean_keys_per_query(pattern, self.layout) for pattern in self.layer_patterns()]
        return flops_per_token(non_embedding, n_layers=self.params.depth, seq_len=self.layout.seq_len,
                               d_attn=self.params.dim, attended=sum(attended) / len(attended))

    def activation_bytes(self, batch_size: int, bytes_per_value: int) -> int:
        p, layout = self.params, self.layout
        logits = (layout.text_len * self.text_ids + layout.image_len * self.image_vocab_size) / layout.seq_len
        return activation_bytes(layers=p.depth, dim=p.dim, tokens=layout.seq_len - 1, batch=batch_size, bytes_per_value=bytes_per_value,
                                checkpointing=p.grad_checkpointing, extra_per_layer=2 if p.sandwich_norm else 0, logits=int(logits))


def _init_weights(module: nn.Module) -> None:
    """GPT-style initialisation for fresh (unconverted) priors: normal(0.02) matrices, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


__all__ = ["RudallePrior", "layer_pattern"]
