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
- ``rudalle-column``, ``rudalle-conv``: ruDALL-E's variants of the last two, centred on
  the query instead of its target: its own column, and an 11x11 window (any grid);
  ``rudalle-conv-wrapped`` is its v2 window, which wraps around the grid's edges.
- ``fixed``: Child et al.'s fixed pattern: the query's own stride block (one image
  row) plus the last ``c`` "summary" columns of every earlier block.
- ``bigbird``: a local window, the first image row as global tokens, and
  deterministic pseudo-random row blocks.

Masks and block masks are built once per (pattern, layout, device) and cached:
Dynamo recompiles flex kernels per new block mask shape and falls back to eager
after 8 recompiles.

Which kernel runs is decided by :func:`kernel_for` (one place, testable) and every
eager call is counted per pattern in :func:`kernel_calls`, so a benchmark can report
what actually ran rather than what was intended.
"""

from __future__ import annotations

import collections
import functools
import math
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import UsageError
from .schema import BUILTIN_PATTERNS
from .schema import AttentionBackend as Backend

Kernel = Literal["flex", "sdpa-mask", "sdpa-gather", "sdpa-causal"]
Position = Union[int, Tensor]  # a Python int, or a 0-d LongTensor on the device (static decode steps)


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


@register_pattern("rudalle-column")
def rudalle_column_rule(q: Tensor, k: Tensor, layout: Layout) -> Tensor:
    return (q - k) % layout.grid[1] == 0  # the query's own column (ruDALL-E's get_col_mask)


RUDALLE_CONV_RADIUS = 5  # ruDALL-E's 11x11 window, whatever the grid


@register_pattern("rudalle-conv")
def rudalle_conv_rule(q: Tensor, k: Tensor, layout: Layout) -> Tensor:
    w = layout.grid[1]
    near_row = (torch.div(q, w, rounding_mode="floor") - torch.div(k, w, rounding_mode="floor")).abs() <= RUDALLE_CONV_RADIUS
    near_col = ((q % w) - (k % w)).abs() <= RUDALLE_CONV_RADIUS
    return near_row & near_col  # around the query (ruDALL-E's v3 get_conv_mask: edges clamp, never wrap)


@register_pattern("rudalle-conv-wrapped")
def rudalle_conv_wrapped_rule(q: Tensor, k: Tensor, layout: Layout) -> Tensor:
    (h, w), r = layout.grid, RUDALLE_CONV_RADIUS
    rows = (torch.div(q, w, rounding_mode="floor") - torch.div(k, w, rounding_mode="floor")) % h
    cols = ((q % w) - (k % w)) % w
    # the same window on a torus (ruDALL-E's v2 get_conv_mask): the bottom rows also see the top ones
    return ((rows <= r) | (rows >= h - r)) & ((cols <= r) | (cols >= w - r))


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


if sorted(PATTERNS) != sorted(BUILTIN_PATTERNS):  # recipes are checked against schema's list, without this module
    raise ImportError(f"dalle_framework.schema.BUILTIN_PATTERNS {sorted(BUILTIN_PATTERNS)} must name the built-in patterns {sorted(PATTERNS)}")


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
def _block_mask(pattern: str, layout: Layout, device: str, block_size: int, compile_mask: bool, length: int):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(
        mask_mod(pattern, layout), None, None, length, length, device=device, BLOCK_SIZE=block_size, _compile=compile_mask
    )


def block_mask(
    pattern: str, layout: Layout, device: torch.device | str, block_size: int = 128, length: Optional[int] = None
):
    """flex_attention ``BlockMask`` for ``pattern`` over positions ``[0, length)`` (default: all ``L``), cached.

    Training feeds ``L - 1`` tokens (the last one predicts nothing), so block masks are
    built for the length actually fed; empty blocks are skipped.
    """
    key = _device_key(device)
    n = layout.seq_len if length is None else length
    assert 0 < n <= layout.seq_len, f"block mask length {n} outside 1..{layout.seq_len}"
    return _block_mask(pattern, layout, key, block_size, key.startswith("cuda"), n)


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


@functools.lru_cache(maxsize=64)
def _key_table(pattern: str, layout: Layout, device: str) -> Optional[tuple[Tensor, Tensor]]:
    if device != "cpu":  # built on the host once, then copied: no device sync
        table = _key_table(pattern, layout, "cpu")
        return None if table is None else (table[0].to(device), table[1].to(device))
    mask = _dense_mask(pattern, layout, device)
    counts = mask.sum(dim=1)
    width = int(counts.max())
    if width > layout.seq_len // 2:
        return None  # gathering would read about as much as attending over every slot
    # stable sort of "not allowed" puts each row's allowed keys first, in position order
    order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    valid = torch.arange(width)[None, :] < counts[:, None]
    return torch.where(valid, order, torch.zeros_like(order)), valid


def key_table(pattern: str, layout: Layout, device: torch.device | str = "cpu") -> Optional[tuple[Tensor, Tensor]]:
    """Per query position, the keys it may attend: ``(index [L, K], valid [L, K])``, or None.

    ``K`` is the most keys any position sees. A decode step gathers those ``K`` cached
    keys instead of attending over all ``L`` slots: at the paper's shape a row or
    column layer reads 289 of 1280. None when ``K > L / 2`` (dense-like patterns),
    where gathering would not pay. Padding entries point at key 0 with ``valid`` False.
    """
    return _key_table(pattern, layout, _device_key(device))


def mask_density(pattern: str, layout: Layout) -> float:
    """Mean number of keys an image query attends to, over ``L`` (what a decode step needs)."""
    mask = dense_mask(pattern, layout)
    return float(mask[layout.text_len :].sum(dim=1).float().mean() / layout.seq_len)


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


_KERNEL_CALLS: collections.Counter = collections.Counter()
# A decode step gathers its pattern's keys only when that skips at least this many cached
# key elements (rows * heads * head_dim per slot): a gather is four extra ops, which cost
# more than they save at small batches (measured: 1 row x 4 heads at 1280 tokens on a CPU
# gathers 15% slower; 8 rows x 8 heads x 64 gathers 5x faster). Tests set it to 0.
GATHER_MIN_ELEMENTS = 1 << 20


def kernel_calls() -> dict[str, dict[str, int]]:
    """Eager attention calls in this process so far: ``{pattern: {kernel: count}}``.

    Dense priors count under ``"dense"``. Calls traced by ``torch.compile`` or replayed
    from a CUDA graph are not counted (their Python does not run), only recorded ones.
    """
    out: dict[str, dict[str, int]] = {}
    for (pattern, kernel), count in sorted(_KERNEL_CALLS.items()):
        out.setdefault(pattern, {})[kernel] = count
    return out


def reset_kernel_calls() -> None:
    _KERNEL_CALLS.clear()


def _record(pattern: str, kernel: str) -> None:
    if not torch.compiler.is_compiling():
        _KERNEL_CALLS[pattern, kernel] += 1


def kernel_for(
    *,
    layout: Layout,
    lq: int,
    lk: int,
    q_start: Position = 0,
    backend: Backend = "auto",
    device_type: str = "cpu",
    dropout_p: float = 0.0,
    pattern: Optional[str] = None,
    slot_elements: int = 0,
) -> Kernel:
    """The kernel :func:`pattern_attention` runs for this call (decided here only).

    - ``flex`` (block-sparse): self-attention over a prefix (``q_start == 0``, ``Lq == Lk``)
      without dropout, when forced (``backend="flex"``) or, with ``auto``, on CUDA for the
      training shapes: ``L - 1`` fed tokens (the last predicts nothing) or all ``L``.
      Shorter prefixes (sampling's prefill) stay on SDPA: one flex compile per prompt
      length would cost more than it saves. flex has no CPU backward, so ``auto`` never
      picks it on the CPU.
    - ``sdpa-gather``: one query at a device-tensor position (a static decode step) under
      a pattern whose :func:`key_table` is narrow, when the keys it skips hold at least
      :data:`GATHER_MIN_ELEMENTS` (``slot_elements`` = batch * heads * head_dim per key
      slot): SDPA over the gathered keys only.
    - ``sdpa-mask``: SDPA with the matching rows of the cached boolean mask.
    """
    static_prefix = isinstance(q_start, int) and q_start == 0 and lq == lk and dropout_p == 0.0
    if static_prefix and (backend == "flex" or (backend == "auto" and device_type == "cuda" and lq >= layout.seq_len - 1)):
        return "flex"
    if isinstance(q_start, Tensor) and lq == 1 and pattern is not None and slot_elements * lk >= GATHER_MIN_ELEMENTS:
        table = key_table(pattern, layout, "cpu")
        if table is not None and slot_elements * (lk - table[0].shape[1]) >= GATHER_MIN_ELEMENTS:
            return "sdpa-gather"
    return "sdpa-mask"


@functools.lru_cache(maxsize=64)
def _arange(n: int, device: str) -> Tensor:
    return torch.arange(n, device=device)


def positions(start: Position, n: int, device: torch.device) -> Tensor:
    """LongTensor ``[n]`` of positions ``start..start+n-1`` (``start`` an int or a 0-d tensor).

    A decode step's single position is a view of its 0-d tensor (no new op: these run
    in every layer of every step).
    """
    if n == 1 and isinstance(start, Tensor):
        return start.view(1)
    return _arange(n, _device_key(device)) + start


def pattern_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    pattern: str,
    layout: Layout,
    q_start: Position = 0,
    backend: Backend = "auto",
    dropout_p: float = 0.0,
    compiled: Optional[bool] = None,
) -> Tensor:
    """Masked attention of queries at positions ``[q_start, q_start + Lq)`` over keys ``[0, Lk)``.

    q ``[B, H, Lq, D]``, k/v ``[B, H, Lk, D]`` -> ``[B, H, Lq, D]``. ``q_start`` is an int,
    or a 0-d LongTensor on the device for decode steps whose shapes never change (so
    they can be compiled or captured in a CUDA graph). :func:`kernel_for` picks the
    kernel: block-sparse flex_attention for training shapes on GPU, SDPA over gathered
    keys for decode steps of sparse patterns, SDPA with mask rows otherwise.
    """
    run = _untraced_pattern_attention if torch.compiler.is_compiling() else _pattern_attention
    return run(q, k, v, pattern=pattern, layout=layout, q_start=q_start, backend=backend, dropout_p=dropout_p, compiled=compiled)


def _pattern_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    pattern: str,
    layout: Layout,
    q_start: Position,
    backend: Backend,
    dropout_p: float,
    compiled: Optional[bool],
) -> Tensor:
    lq, lk = q.shape[-2], k.shape[-2]
    if isinstance(q_start, int):
        assert q_start + lq <= layout.seq_len and lk <= layout.seq_len, (
            f"positions {q_start}+{lq} / {lk} exceed sequence length {layout.seq_len}"
        )
    kernel = kernel_for(
        layout=layout, lq=lq, lk=lk, q_start=q_start, backend=backend, device_type=q.device.type,
        dropout_p=dropout_p, pattern=pattern, slot_elements=q.shape[0] * q.shape[1] * q.shape[-1],
    )
    _record(pattern, kernel)
    if kernel == "flex":
        compile_kernel = q.is_cuda if compiled is None else compiled
        return flex_attention_fn(compile_kernel)(q, k, v, block_mask=block_mask(pattern, layout, q.device, length=lq))
    if kernel == "sdpa-gather":
        index, valid = key_table(pattern, layout, q.device)
        keys = index.index_select(0, q_start.view(1)).view(-1)  # [K] cached slots this position may see
        mask = valid.index_select(0, q_start.view(1))  # [1, K]
        k, v = k.index_select(2, keys), v.index_select(2, keys)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    table = dense_mask(pattern, layout, q.device)
    if isinstance(q_start, int):
        mask = table[q_start : q_start + lq, :lk]
    else:
        mask = table.index_select(0, positions(q_start, lq, q.device))[:, :lk]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


# Not traced by torch.compile (a compiled block or decode step breaks its graph here): the
# mask tables and block masks come from caches that Dynamo would otherwise rebuild inside
# every graph, and flex_attention is compiled on its own (flex_attention_fn). Only entered
# while compiling: the wrapper costs microseconds per eager call.
_untraced_pattern_attention = torch.compiler.disable(_pattern_attention)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, *, q_start: Position = 0, dropout_p: float = 0.0) -> Tensor:
    """Dense causal attention of queries at ``[q_start, q_start + Lq)`` over keys ``[0, Lk)``.

    ``is_causal`` (flash) when queries and keys line up; otherwise (KV-cache steps, whose
    keys may run past the queries into unwritten cache slots) an explicit causal mask.
    ``q_start`` may be a 0-d device tensor (static decode steps).
    """
    lq, lk = q.shape[-2], k.shape[-2]
    if isinstance(q_start, int) and q_start == 0 and lq == lk:
        _record("dense", "sdpa-causal")
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    _record("dense", "sdpa-mask")
    rows = positions(q_start, lq, q.device)[:, None]
    # eager steps reuse one cached arange; under torch.compile it is simply part of the graph
    keys = torch.arange(lk, device=q.device) if torch.compiler.is_compiling() else _arange(lk, _device_key(q.device))
    mask = keys[None, :] <= rows
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


__all__ = [
    "PATTERNS",
    "Backend",
    "GATHER_MIN_ELEMENTS",
    "Kernel",
    "Layout",
    "Position",
    "allowed",
    "block_density",
    "block_mask",
    "causal_attention",
    "conv_kernel",
    "dense_mask",
    "flex_attention_fn",
    "get_rule",
    "kernel_calls",
    "kernel_for",
    "key_table",
    "mask_density",
    "mask_mod",
    "mean_keys_per_query",
    "pattern_attention",
    "positions",
    "reference_attention",
    "register_pattern",
    "reset_kernel_calls",
]
