"""Attention masks for ``[text | image]`` sequences, and the kernels that run them.

A prior's input is ``L = T + N`` positions: ``T`` text tokens then ``N = h*w`` image
tokens in raster order. The output at position ``p`` predicts token ``p + 1``, so the
last text position predicts the first image token and image position ``j`` (0-based,
inside the image part) predicts image token ``j + 1`` (its *target*).

Every pattern shares three rules (paper, Ramesh et al. 2021, Fig. 11):

- causal: a query never sees a later key;
- text queries attend causally to text only;
- every image query sees all text.

Patterns differ only in which earlier *image* keys an image query sees. A pattern is
a ``rule(q, k, layout) -> BoolTensor`` on image-relative integer index tensors (they
broadcast), written with tensor arithmetic only, so the same function builds the
dense boolean mask for SDPA and the ``mask_mod`` that flex_attention turns into a
block-sparse ``BlockMask``: both execute exactly one definition.

Patterns (``PATTERNS``, a name -> rule dict; add one with :func:`register_pattern`):

- ``causal``: every earlier image token (dense).
- ``row``: the previous ``w + 1`` positions including the query itself; for the
  target that is everything from the token directly above it to its left neighbour.
- ``column``: the target's column in earlier rows, plus the query itself (the
  target's left neighbour).
- ``conv``: a ``k x k`` causal neighbourhood around the target, ``k`` the paper's 11 at
  a 32x32 grid scaled to the grid (odd, at least 3; :func:`conv_kernel`), plus the query.
- ``fixed``: Child et al.'s fixed pattern: the query's own stride block (one image
  row) plus the last ``c`` "summary" columns of every earlier block.
- ``bigbird``: a local window, the first image row as global tokens, and
  deterministic pseudo-random row blocks.

Masks and block masks are built once per (pattern, layout, device) and cached:
Dynamo recompiles flex kernels per new block mask shape and falls back to eager
after 8 recompiles.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import UsageError

Backend = Literal["auto", "flex", "sdpa"]


@dataclass(frozen=True)
class Layout:
    """Shape of a ``[text | image]`` sequence: ``text_len`` tokens then an ``h x w`` grid."""

    text_len: int
    grid: tuple[int, int]

    @property
    def image_len(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def seq_len(self) -> int:
        return self.text_len + self.image_len


PatternRule = Callable[[Tensor, Tensor, Layout], Tensor]
PATTERNS: dict[str, PatternRule] = {}


def register_pattern(name: str) -> Callable[[PatternRule], PatternRule]:
    """Decorator adding an image-to-image rule to :data:`PATTERNS`."""

    def add(rule: PatternRule) -> PatternRule:
        assert name not in PATTERNS, f"attention pattern {name!r} is already registered"
        PATTERNS[name] = rule
        return rule

    return add


def conv_kernel(grid: tuple[int, int]) -> int:
    """The paper's 11x11 conv mask at a 32x32 grid, scaled to ``grid`` (odd, >= 3)."""
    scaled = 11 * grid[0] / 32
    return max(3, 2 * int(scaled // 2) + 1)


# ----------------------------------------------------------------------------- image rules
# q, k: image-relative indices (0 = first image position), already with k <= q.


@register_pattern("causal")
def causal_rule(q: Tensor, k: Tensor, layout: Layout) -> Tensor:
    return k >= 0


@register_pattern("row")
def row_rule(q: Tensor, k: Tensor, layout: Layout) -> Tensor:
    return q - k <= layout.grid[1]  # extent w + 1: from above the target to its left


@register_pattern("column")
def column_rule(q: Tensor, k: Tensor, layout: Layout) -> Tensor:
    w = layout.grid[1]
    return ((k % w) == ((q + 1) % w)) | (k == q)


@register_pattern("conv")
def conv_rule(q: Tensor, k: Tensor, layout: Layout) -> Tensor:
    w = layout.grid[1]
    radius = conv_kernel(layout.grid) // 2
    target = q + 1
    near_row = (torch.div(k, w, rounding_mode="floor") - torch.div(target, w, rounding_mode="floor")).abs() <= radius
    near_col = ((k % w) - (target % w)).abs() <= radius
    return (near_row & near_col) | (k == q)


@register_pattern("fixed")
def fixed_rule(q: Tensor, k: Tensor, layout: Layout) -> Tensor:
    stride = layout.grid[1]  # one block per image row
    summary = max(1, stride // 8)  # Child et al.'s c
    same_block = torch.div(q, stride, rounding_mode="floor") == torch.div(k, stride, rounding_mode="floor")
    return same_block | ((k % stride) >= stride - summary)


@register_pattern("bigbird")
def bigbird_rule(q: Tensor, k: Tensor, layout: Layout) -> Tensor:
    w = layout.grid[1]
    window = q - k <= max(1, w // 2)
    global_keys = k < w  # the first image row
    qb, kb = torch.div(q, w, rounding_mode="floor"), torch.div(k, w, rounding_mode="floor")
    # deterministic "random" blocks: a fixed hash of (query block, key block); ~2 per query block
    keep_per_mille = min(1000, 2000 // max(1, layout.grid[0]))
    random_blocks = ((qb * 7919 + kb * 104729 + qb * kb * 31) % 1000) < keep_per_mille
    return window | global_keys | random_blocks


# ----------------------------------------------------------------------------- full masks


def allowed(q: Tensor, k: Tensor, layout: Layout, rule: PatternRule) -> Tensor:
    """Whether sequence position ``q`` may attend to ``k`` (broadcasting int tensors)."""
    t = layout.text_len
    image_pair = (q >= t) & (k >= t)
    return (k <= q) & ((k < t) | (image_pair & rule(q - t, k - t, layout)))


def get_rule(pattern: str) -> PatternRule:
    if pattern not in PATTERNS:
        raise UsageError(f"unknown attention pattern {pattern!r} (known: {', '.join(sorted(PATTERNS))})")
    return PATTERNS[pattern]


def mask_mod(pattern: str, layout: Layout) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """A flex_attention ``mask_mod(b, h, q_idx, kv_idx)`` for ``pattern``."""
    rule = get_rule(pattern)

    def mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return allowed(q_idx, kv_idx, layout, rule)

    mod.__name__ = f"{pattern}_mask"
    return mod


@functools.lru_cache(maxsize=64)
def _dense_mask(pattern: str, layout: Layout, device: str) -> Tensor:
    idx = torch.arange(layout.seq_len, device=device)
    mask = allowed(idx[:, None], idx[None, :], layout, get_rule(pattern))
    return mask


def _device_key(device: torch.device | str) -> str:
    """``cuda`` and ``cuda:0`` are one device: one cache entry (and one flex compile)."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return str(dev)


def dense_mask(pattern: str, layout: Layout, device: torch.device | str = "cpu") -> Tensor:
    """Boolean mask ``[L, L]`` (True = may attend), built once per pattern/layout/device."""
    return _dense_mask(pattern, layout, _device_key(device))


@functools.lru_cache(maxsize=64)
def _block_mask(pattern: str, layout: Layout, device: str, block_size: int, compile_mask: bool):
    from torch.nn.attention.flex_attention import create_block_mask

    n = layout.seq_len
    return create_block_mask(
        mask_mod(pattern, layout), None, None, n, n, device=device, BLOCK_SIZE=block_size, _compile=compile_mask
    )


def block_mask(pattern: str, layout: Layout, device: torch.device | str, block_size: int = 128):
    """flex_attention ``BlockMask`` for ``pattern`` (empty blocks are skipped), cached."""
    key = _device_key(device)
    return _block_mask(pattern, layout, key, block_size, key.startswith("cuda"))


def mean_keys_per_query(pattern: str, layout: Layout) -> float:
    """How many keys a query attends to on average: ``(L + 1) / 2`` for dense causal, less when sparse."""
    return dense_mask(pattern, layout).sum(dim=1).float().mean().item()


def block_density(pattern: str, layout: Layout, block_size: int = 128) -> float:
    """Fraction of (query block, key block) pairs that must be computed."""
    mask = dense_mask(pattern, layout)
    n = layout.seq_len
    nb = math.ceil(n / block_size)
    padded = F.pad(mask, (0, nb * block_size - n, 0, nb * block_size - n))
    blocks = padded.reshape(nb, block_size, nb, block_size).any(dim=(1, 3))
    return blocks.float().mean().item()


# ----------------------------------------------------------------------------- kernels


@functools.lru_cache(maxsize=2)
def flex_attention_fn(compiled: bool) -> Callable[..., Tensor]:
    """flex_attention, compiled once per process (eager flex materialises the scores)."""
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    # each (pattern, shape, dtype) is one compile of the same frame; past the default limit
    # of 8 Dynamo silently runs eager flex (materialised scores, ~10x slower)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(flex_attention, dynamic=False)


def reference_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Plain softmax attention, the ground truth in tests. q ``[B,H,Lq,D]``, k/v ``[B,H,Lk,D]``."""
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


def pattern_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    pattern: str,
    layout: Layout,
    q_start: int = 0,
    backend: Backend = "auto",
    dropout_p: float = 0.0,
    compiled: Optional[bool] = None,
) -> Tensor:
    """Masked attention of queries at positions ``[q_start, q_start + Lq)`` over keys ``[0, Lk)``.

    q ``[B, H, Lq, D]``, k/v ``[B, H, Lk, D]`` -> ``[B, H, Lq, D]``. Full-sequence calls
    (training, ``Lq == Lk == L``) run block-sparse flex_attention on GPU (``auto``) or
    when ``backend="flex"``; partial ones (KV-cache steps, prefixes) use SDPA with the
    matching rows of the cached boolean mask. flex has no dropout and no CPU backward,
    so ``auto`` picks SDPA for those.
    """
    lq, lk = q.shape[-2], k.shape[-2]
    assert q_start + lq <= layout.seq_len and lk <= layout.seq_len, (
        f"positions {q_start}+{lq} / {lk} exceed sequence length {layout.seq_len}"
    )
    full = q_start == 0 and lq == lk == layout.seq_len
    use_flex = full and dropout_p == 0.0 and (backend == "flex" or (backend == "auto" and q.is_cuda))
    if use_flex:
        compile_kernel = q.is_cuda if compiled is None else compiled
        return flex_attention_fn(compile_kernel)(q, k, v, block_mask=block_mask(pattern, layout, q.device))
    mask = dense_mask(pattern, layout, q.device)[q_start : q_start + lq, :lk]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, *, q_start: int = 0, dropout_p: float = 0.0) -> Tensor:
    """Dense causal attention of queries at ``[q_start, q_start + Lq)`` over keys ``[0, Lk)``.

    ``is_causal`` (flash) when queries and keys line up; otherwise (KV-cache steps, whose
    keys may run past the queries into unwritten cache slots) an explicit causal mask.
    """
    lq, lk = q.shape[-2], k.shape[-2]
    if q_start == 0 and lq == lk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    rows = torch.arange(q_start, q_start + lq, device=q.device)[:, None]
    mask = torch.arange(lk, device=q.device)[None, :] <= rows
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


__all__ = [
    "PATTERNS",
    "Backend",
    "Layout",
    "allowed",
    "block_density",
    "block_mask",
    "causal_attention",
    "conv_kernel",
    "dense_mask",
    "flex_attention_fn",
    "get_rule",
    "mask_mod",
    "mean_keys_per_query",
    "pattern_attention",
    "reference_attention",
    "register_pattern",
]
