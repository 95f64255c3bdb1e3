"""The stage-2 prior: a decoder-only transformer over ``[text tokens | image tokens]``.

Reads like the paper (Ramesh et al. 2021, section 2.2 and appendix B):

1. Embed. Text ids get a token embedding plus a position embedding; where a text id
   is padding (``PAD_ID``), the token embedding is replaced by a learned vector *per
   position*, so padding still says where it is. Image codes get a code embedding
   plus row and column embeddings (optionally rotary on top).
2. A stack of pre-norm blocks (LayerNorm -> attention -> residual, LayerNorm -> MLP ->
   residual). The dense prior attends causally (SDPA ``is_causal``); the sparse prior
   gives each layer a mask pattern from :mod:`dalle_framework.attention`.
3. Two heads so text and image logits never mix: the output at position ``p``
   predicts token ``p + 1``; text positions ``0..T-2`` predict text, positions
   ``T-1..L-2`` predict the ``h*w`` image codes (the last text position sees the whole
   caption and predicts the first image code). ``loss = w_text * text + w_image * image``
   with the paper's 1/8 and 7/8 by default.

Sampling draws image codes one at a time. With ``use_cache`` a prefill pass runs the
caption (and any primed codes), then every step computes q/k/v only for the newest
token and attends over a preallocated key/value cache. A step's shapes never change:
its position is a 0-d device tensor, the cache is written at that index, dense layers
mask the unwritten slots and sparse layers gather only the keys their pattern allows.
So the step can be replayed from a CUDA graph or compiled (``Sampling.decode``), and
with device draws (``Sampling.draws``) nothing in the loop waits for the host.
Classifier-free guidance batches the conditional and the all-padding (unconditional)
captions together as ``2B`` rows.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dalle_framework import PAD_ID, Prior, Sampling, StepCallback
from dalle_framework.attention import (
    Layout,
    Position,
    causal_attention,
    mean_keys_per_query,
    pattern_attention,
    positions,
)
from dalle_framework.decoding import KVCache, all_padding, sample_image_tokens
from dalle_framework.metrics import activation_bytes, flops_per_token

from .params import SparseParams, TransformerParams

AttentionKernel = Callable[..., Tensor]  # (q, k, v, *, q_start, dropout_p) -> out


# ----------------------------------------------------------------------------- building blocks


class Rotary(nn.Module):
    """Rotary position embedding over sequence positions ``0..max_len-1`` (half-split form)."""

    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0) -> None:
        super().__init__()
        assert head_dim % 2 == 0, f"rotary needs an even head_dim, got {head_dim}"
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
        angles = torch.outer(torch.arange(max_len).float(), inv_freq)  # [L, D/2]
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: Tensor, start: Position) -> Tensor:
        """x ``[B, H, n, D]`` at positions ``start..start+n-1`` -> rotated, same shape."""
        n = x.shape[-2]
        if isinstance(start, int):
            cos, sin = self.cos[start : start + n], self.sin[start : start + n]
        else:  # a device position (static decode step): gather instead of slicing
            idx = positions(start, n, x.device)
            cos, sin = self.cos.index_select(0, idx), self.sin.index_select(0, idx)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, *, dim: int, heads: int, head_dim: int, kernel: AttentionKernel, dropout: float, rotary: Optional[Rotary]):
        super().__init__()
        self.heads, self.head_dim, self.kernel, self.dropout = heads, head_dim, kernel, dropout
        self.qkv = nn.Linear(dim, 3 * heads * head_dim, bias=False)
        self.out = nn.Linear(heads * head_dim, dim, bias=False)
        self.out.residual_projection = True  # initialised smaller with depth (see TransformerPrior)
        self.rotary = rotary

    def forward(self, x: Tensor, start: Position = 0, cache: Optional[KVCache] = None) -> Tensor:
        """x ``[B, n, dim]`` holding positions ``start..start+n-1`` -> ``[B, n, dim]``."""
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        if self.rotary is not None:
            q, k = self.rotary(q, start), self.rotary(k, start)
        if cache is not None:
            k, v = cache.update(k, v, start)
        out = self.kernel(q, k, v, q_start=start, dropout_p=self.dropout if self.training else 0.0)
        return self.out(rearrange(out, "b h n d -> b n (h d)"))


class GeluMLP(nn.Module):
    def __init__(self, dim: int, ratio: float) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.up, self.down = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.down.residual_projection = True

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))


class GegluMLP(nn.Module):
    def __init__(self, dim: int, ratio: float) -> None:
        super().__init__()
        hidden = int(dim * ratio * 2 / 3)  # two input branches: keep the parameter count of GELU
        self.up, self.down = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)
        self.down.residual_projection = True

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.up(x).chunk(2, dim=-1)
        return self.down(value * F.gelu(gate))


MLPS: dict[str, type[nn.Module]] = {"gelu": GeluMLP, "geglu": GegluMLP}


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, p: TransformerParams, *, head_dim: int, kernel: AttentionKernel, rotary: Optional[Rotary]):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(p.dim), nn.LayerNorm(p.dim)
        self.attn = SelfAttention(dim=p.dim, heads=p.heads, head_dim=head_dim, kernel=kernel, dropout=p.attn_dropout, rotary=rotary)
        self.mlp = MLPS[p.mlp](p.dim, p.mlp_ratio)
        self.drop = nn.Dropout(p.resid_dropout)

    def forward(self, x: Tensor, start: Position = 0, cache: Optional[KVCache] = None) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x), start, cache))
        return x + self.drop(self.mlp(self.norm2(x)))


# ----------------------------------------------------------------------------- the prior


class TransformerPrior(Prior):
    """Shared body of the dense and sparse priors; subclasses choose each layer's attention.

    ``loss(text[B,T], image_tokens[B,h*w]) -> {loss, text_loss, image_loss}`` (nats/token);
    ``generate(text[B,T], sampling, prime[B,n]=None, generator=None) -> LongTensor[B,h*w]``.
    """

    Params = TransformerParams
    partitioned_init = True  # every init goes through Module.apply (see __init__)

    def __init__(self, params: TransformerParams, *, text_vocab_size: int, text_len: int, image_vocab_size: int, grid: tuple[int, int]):
        super().__init__()
        p = self.params = params
        assert text_len >= 1 and image_vocab_size >= 2, f"bad runtime shapes: text_len={text_len}, image_vocab={image_vocab_size}"
        self.text_vocab_size, self.image_vocab_size = text_vocab_size, image_vocab_size
        self.layout = Layout(text_len, (int(grid[0]), int(grid[1])))
        self.text_len, self.grid = text_len, self.layout.grid
        head_dim = p.head_dim or p.dim // p.heads  # the params' validator checked it divides
        self.heads, self.head_dim = p.heads, head_dim
        L = self.layout.seq_len

        # 1. embeddings
        self.text_emb = nn.Embedding(text_vocab_size, p.dim)
        self.text_pad_emb = nn.Parameter(torch.zeros(text_len, p.dim))  # one learned padding token per position
        self.text_pos = nn.Parameter(torch.zeros(text_len, p.dim))
        self.image_emb = nn.Embedding(image_vocab_size, p.dim)
        self.image_row = nn.Parameter(torch.zeros(self.grid[0], p.dim))
        self.image_col = nn.Parameter(torch.zeros(self.grid[1], p.dim))
        self.emb_drop = nn.Dropout(p.emb_dropout)

        # 2. blocks, each with the attention its subclass chose
        rotary = Rotary(head_dim, L) if p.rotary else None
        kernels = self.attention_kernels()
        assert len(kernels) == p.depth, f"{type(self).__name__} gave {len(kernels)} attention kernels for depth {p.depth}"
        self.blocks = nn.ModuleList(Block(p, head_dim=head_dim, kernel=k, rotary=rotary) for k in kernels)

        # 3. separate heads: text logits cover only text ids, image logits only image codes
        self.norm = nn.LayerNorm(p.dim)
        self.text_head = nn.Linear(p.dim, text_vocab_size, bias=False)
        self.image_head = nn.Linear(p.dim, image_vocab_size, bias=False)
        # Every init goes through Module.apply, which ZeRO-3 wraps to gather the weights it shards while
        # the model is built; three passes draw in the same order as initialising them one after another.
        self.apply(self._init_weights)
        self.apply(self._scale_residual_projections)
        self.apply(self._init_bare_embeddings)
        if p.tie_image_embedding:
            self.image_head.weight = self.image_emb.weight

    def attention_kernels(self) -> list[AttentionKernel]:
        """One attention function per layer: ``f(q, k, v, *, q_start, dropout_p)``."""
        raise NotImplementedError

    def layer_patterns(self) -> list[str]:
        """The attention pattern of each layer (see :mod:`dalle_framework.attention`)."""
        return ["causal"] * self.params.depth

    def no_weight_decay_parameters(self) -> list[nn.Parameter]:
        """Embeddings held as bare parameters: a lookup each, not a matrix to shrink."""
        return [self.text_pad_emb, self.text_pos, self.image_row, self.image_col]

    def flops_per_token(self) -> dict[str, Any]:
        """Forward/training FLOPs per token, counting only the keys each layer's mask lets a query see."""
        lookups = {id(p) for p in (self.text_emb.weight, self.image_emb.weight, *self.no_weight_decay_parameters())}
        if self.params.tie_image_embedding:
            lookups.discard(id(self.image_emb.weight))  # also the image head: a matmul
        unique = {id(p): p for p in self.parameters()}
        non_embedding = sum(p.numel() for i, p in unique.items() if i not in lookups)
        attended = [mean_keys_per_query(pattern, self.layout) for pattern in self.layer_patterns()]
        return flops_per_token(
            non_embedding,
            n_layers=self.params.depth,
            seq_len=self.layout.seq_len,
            d_attn=self.heads * self.head_dim,
            attended=sum(attended) / len(attended),
        )

    def activation_bytes(self, batch_size: int, bytes_per_value: int) -> int:
        p, layout = self.params, self.layout
        logits = (layout.text_len * self.text_vocab_size + layout.image_len * self.image_vocab_size) / layout.seq_len
        return activation_bytes(layers=p.depth, dim=p.dim, tokens=layout.seq_len - 1, batch=batch_size, bytes_per_value=bytes_per_value,
                                checkpointing=p.grad_checkpointing, mlp_ratio=p.mlp_ratio, logits=int(logits))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.params.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def _scale_residual_projections(self, module: nn.Module) -> None:
        if getattr(module, "residual_projection", False):  # GPT-2: scale residual projections by depth
            nn.init.normal_(module.weight, std=self.params.init_std / math.sqrt(2 * self.params.depth))

    def _init_bare_embeddings(self, module: nn.Module) -> None:
        if module is self:
            for param in self.no_weight_decay_parameters():
                nn.init.normal_(param, std=self.params.init_std)

    # -- 1. embeddings ----------------------------------------------------------------------

    def embed(self, tokens: Tensor, start: Position = 0) -> Tensor:
        """tokens ``[B, n]`` at sequence positions ``start..start+n-1`` -> ``[B, n, dim]``.

        A device-tensor ``start`` (a decode step) must point into the image part.
        """
        T, w = self.text_len, self.grid[1]
        if not isinstance(start, int):
            idx = positions(start - T, tokens.shape[1], tokens.device)
            return self.emb_drop(self.image_emb(tokens) + self.image_row[idx // w] + self.image_col[idx % w])
        n_text = max(0, min(T - start, tokens.shape[1]))
        parts = []
        if n_text:
            ids = tokens[:, :n_text]
            pos = slice(start, start + n_text)
            word = torch.where((ids == PAD_ID)[..., None], self.text_pad_emb[pos], self.text_emb(ids))
            parts.append(word + self.text_pos[pos])
        if tokens.shape[1] > n_text:
            codes = tokens[:, n_text:]
            idx = torch.arange(start + n_text - T, start + tokens.shape[1] - T, device=tokens.device)
            pos = self.image_row[idx // w] + self.image_col[idx % w]
            parts.append(self.image_emb(codes) + pos)
        return self.emb_drop(torch.cat(parts, dim=1))

    # -- 2. the stack -----------------------------------------------------------------------

    def hidden(self, tokens: Tensor, start: Position = 0, caches: Optional[list[KVCache]] = None) -> Tensor:
        """tokens ``[B, n]`` (positions ``start..``) -> final-normed states ``[B, n, dim]``."""
        x = self.embed(tokens, start)
        # compiled blocks only in training: sampling's shapes vary (prefill lengths, steps)
        run = compiled_block_call() if self.params.compile_blocks and self.training else call_block
        for i, block in enumerate(self.blocks):
            cache = caches[i] if caches is not None else None
            if self.params.grad_checkpointing and self.training and cache is None:
                x = checkpoint(run, block, x, start, None, use_reentrant=False)
            else:
                x = run(block, x, start, cache)
        return self.norm(x)

    # -- 3. loss ----------------------------------------------------------------------------

    def states(self, text: Tensor, image_tokens: Tensor) -> tuple[Tensor, Tensor]:
        """-> states predicting text ``1..T-1`` ``[B, T-1, dim]`` and image ``0..N-1`` ``[B, N, dim]``."""
        T = self.text_len
        h = self.hidden(torch.cat([text, image_tokens], dim=1)[:, :-1])  # the last token predicts nothing
        return h[:, : T - 1], h[:, T - 1 :]

    def logits(self, text: Tensor, image_tokens: Tensor) -> tuple[Tensor, Tensor]:
        """-> text logits ``[B, T-1, text_vocab]`` (for text ``1..T-1``), image logits ``[B, N, image_vocab]``."""
        text_states, image_states = self.states(text, image_tokens)
        return self.text_head(text_states), self.image_head(image_states)

    def loss(self, text: Tensor, image_tokens: Tensor) -> dict[str, Any]:
        """text ``[B, T]``, image_tokens ``[B, N]`` -> ``loss`` (weighted), ``text_loss``, ``image_loss`` (nats)."""
        B, T, N = text.shape[0], self.text_len, self.layout.image_len
        assert text.shape == (B, T), f"text must be [B, {T}], got {tuple(text.shape)}"
        assert image_tokens.shape == (B, N), f"image_tokens must be [B, {N}], got {tuple(image_tokens.shape)}"
        if self.training and self.params.caption_dropout > 0:
            drop = torch.rand(B, device=text.device) < self.params.caption_dropout
            text = torch.where(drop[:, None], torch.full_like(text, PAD_ID), text)
        text_states, image_states = self.states(text, image_tokens)
        image_logits = self.image_head(image_states)
        image_loss = F.cross_entropy(image_logits.float().reshape(-1, self.image_vocab_size), image_tokens.reshape(-1))
        # a large text vocabulary (BPE: 49k) makes the text head costly: with weight 0 it is
        # only measured, without a backward pass
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.params.text_loss_weight > 0):
            text_loss = self.text_loss(self.text_head(text_states), text)
        loss = self.params.text_loss_weight * text_loss + self.params.image_loss_weight * image_loss
        return {"loss": loss, "text_loss": text_loss.detach(), "image_loss": image_loss.detach()}

    def text_loss(self, text_logits: Tensor, text: Tensor) -> Tensor:
        """Mean nats over real words and the first padding (the end of the caption); later pads are trivial."""
        target, previous = text[:, 1:], text[:, :-1]
        keep = (target != PAD_ID) | (previous != PAD_ID)
        per_token = F.cross_entropy(
            text_logits.float().reshape(-1, self.text_vocab_size), target.reshape(-1), reduction="none"
        ).reshape(target.shape)
        return (per_token * keep).sum() / keep.sum().clamp(min=1)

    # -- sampling ---------------------------------------------------------------------------

    def new_caches(self, rows: int) -> list[KVCache]:
        """One empty key/value cache per block for ``rows`` sequences of the full length."""
        return [KVCache(rows, self.heads, self.layout.seq_len, self.head_dim) for _ in self.blocks]

    # what the framework's cached sampler (dalle_framework.decoding.sample_image_tokens) calls

    unconditional_text = staticmethod(all_padding)

    def next_logits(self, text: Tensor, image: Tensor) -> Tensor:
        """Uncached: text ``[rows, T]`` + image ``[rows, n]`` -> logits ``[rows, image_vocab]`` for image token ``n``."""
        return self.image_head(self.hidden(torch.cat([text, image], dim=1))[:, -1])

    def prefill(self, text: Tensor, image: Tensor) -> tuple[Tensor, list[KVCache]]:
        caches = self.new_caches(text.shape[0])
        h = self.hidden(torch.cat([text, image], dim=1), 0, caches)
        return self.image_head(h[:, -1]), caches

    def decode_step(self, caches: list[KVCache], token: Tensor, index: Tensor) -> Tensor:
        """Image token ``index`` (a 0-d device tensor) of every row -> logits for ``index + 1``."""
        return self.image_head(self.hidden(token[:, None], index + self.text_len, caches)[:, -1])

    @torch.no_grad()
    def generate(
        self,
        text: Tensor,
        sampling: Sampling,
        prime: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
        on_step: Optional[StepCallback] = None,
    ) -> Tensor:
        """text ``[B, T]`` (+ ``prime[B, n]`` kept as the first image codes) -> codes ``[B, h*w]``.

        The framework's cached sampler draws them: guidance runs ``[text; all-padding]``
        as one ``2B`` batch, ``use_cache=False`` recomputes the whole prefix at every step
        (the reference the cache must match) and ``self.last_decode`` records how the steps ran.
        """
        B, T = text.shape[0], self.text_len
        assert text.shape == (B, T), f"text must be [B, {T}], got {tuple(text.shape)}"
        return sample_image_tokens(
            self, text, sampling, image_len=self.layout.image_len, prime=prime, generator=generator, on_step=on_step
        )


def call_block(block: Block, x: Tensor, start: Position, cache: Optional[KVCache]) -> Tensor:
    return block(x, start, cache)


@functools.lru_cache(maxsize=1)
def compiled_block_call() -> Callable[..., Tensor]:
    """:func:`call_block` compiled once per process; the compiled code is shared by every prior.

    Held here, not on the module, so ``copy.deepcopy`` of a prior (EMA weights) never
    copies a compiled wrapper that still points at the original blocks. Blocks of one
    configuration share one graph; each attention pattern is its own compile.
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(call_block, dynamic=False)


# ----------------------------------------------------------------------------- the two priors


class DenseTransformer(TransformerPrior):
    """Every layer attends causally to all earlier tokens (SDPA ``is_causal``)."""

    def attention_kernels(self) -> list[AttentionKernel]:
        return [causal_attention] * self.params.depth


class SparseTransformer(TransformerPrior):
    """Each layer uses a sparse mask pattern from :mod:`dalle_framework.attention`."""

    Params = SparseParams

    def layer_patterns(self) -> list[str]:
        """The paper's cycle (row, column, row, row) over depth, conv on the last layer."""
        p = self.params
        names = [p.layers[i % len(p.layers)] for i in range(p.depth)]
        if p.final_layer is not None:
            names[-1] = p.final_layer
        return names

    def attention_kernels(self) -> list[AttentionKernel]:
        backend = self.params.attention_backend
        return [
            functools.partial(pattern_attention, pattern=name, layout=self.layout, backend=backend)
            for name in self.layer_patterns()
        ]
