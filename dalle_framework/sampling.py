"""Drawing tokens from logits: temperature, top-k, nucleus, classifier-free guidance.

Shared by every prior so that the same :class:`~dalle_framework.Sampling` settings mean
the same thing whichever model draws the tokens.

Two ways to draw (``Sampling.draws``):

- ``host``: ``torch.multinomial`` with the caller's generator on the generator's device
  (a CPU generator: the probabilities are copied to the host every token). The same
  seed draws the same tokens from the same probabilities on any device.
- ``device``: Gumbel-max on the model's device, ``argmax(logits / T + g)``, with noise
  ``g`` a pure function of ``(seed, image position, row, token id)`` computed by
  integer hashing (:func:`counter_uniform`). Nothing leaves the device, nothing syncs,
  and a decode step that draws this way can be compiled or captured in a CUDA graph.
  The seed is drawn once per ``generate`` call from the caller's generator.
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence, Union

import torch
from torch import Tensor

from .errors import UsageError, validation_problems
from .interfaces import LogitFilter, Sampling

MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # < 2**31: products of 32-bit values stay inside int64, so no overflow anywhere


def filter_logits(logits: Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None, filters: Sequence[LogitFilter] = ()) -> Tensor:
    """Set to ``-inf`` every logit outside the top ``k``, outside the nucleus of mass ``p``, and every
    one a registered filter drops (in order, after top-k / top-p).

    ``logits[..., V]`` -> same shape. The most likely token always survives.
    """
    out = logits
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
        drop_sorted = mass_before >= top_p  # keeps the smallest prefix reaching top_p
        drop_sorted[..., 0] = False  # the cumsum's rounding can put the top token's mass_before above a tiny top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    if filters:
        top = logits.argmax(dim=-1, keepdim=True)
        for rule in filters:
            filtered = rule.apply(out)
            if not isinstance(filtered, Tensor) or filtered.shape != out.shape:
                got = tuple(filtered.shape) if isinstance(filtered, Tensor) else type(filtered).__name__
                raise UsageError(f"logit filter {rule.name!r}: apply() returned {got} for logits of shape {tuple(out.shape)}")
            out = filtered
        out = out.scatter(-1, top, logits.gather(-1, top))  # whatever a filter did, a row keeps its most likely token
    return out


def build_filters(sampling: Sampling) -> tuple[LogitFilter, ...]:
    """``sampling.filters`` built from the filter registry (once per ``generate`` call); an unknown name
    or wrong params is a UsageError naming the entry."""
    if not sampling.filters:
        return ()
    from pydantic import ValidationError

    from .plugins import get_plugin_manager

    registry = get_plugin_manager().registry("filter")
    built = []
    for index, block in enumerate(sampling.filters):
        where = f"sampling.filters.{index}"
        if block.name not in registry:
            raise UsageError(f"{where}.name: {registry.unknown_message(block.name)}")
        try:
            built.append(registry.build(block))
        except ValidationError as exc:
            raise UsageError(validation_problems(exc, f"{where}.params")) from None
    return tuple(built)


def sample_tokens(logits: Tensor, sampling: Sampling, generator: Optional[torch.Generator] = None, filters: Sequence[LogitFilter] = ()) -> Tensor:
    """Draw one token per row. ``logits[B, V]`` -> ``LongTensor[B]``.

    Applies temperature, then top-k / top-p and ``filters``. The draw consumes ``generator`` the same
    way for the same shapes, so a seeded generator gives reproducible samples.
    """
    assert logits.dim() == 2, f"expected logits [B, V], got {tuple(logits.shape)}"
    scaled = filter_logits(logits.float() / sampling.temperature, sampling.top_k, sampling.top_p, filters)
    probs = scaled.softmax(dim=-1)
    if generator is not None and generator.device != probs.device:
        # draw on the generator's device so results do not depend on where the model runs
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(-1).to(logits.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _mix32(x):
    """A 32-bit integer hash (xor-shift-multiply) of values in ``[0, 2**32)``: Python ints or
    int64 tensors, exact on every device."""
    x = (((x >> 16) ^ x) * _MIX) & MASK32
    x = (((x >> 16) ^ x) * _MIX) & MASK32
    return (x >> 16) ^ x


def counter_uniform(seed: Union[int, Tensor], step: Union[int, Tensor], rows: int, vocab: int, device: torch.device) -> Tensor:
    """Uniforms ``[rows, vocab]`` in (0, 1), a pure function of ``(seed, step, row, column)``.

    ``seed`` and ``step`` are ints or 0-d int64 tensors on ``device``. Integer hashing
    gives the same bits on every device; 23 bits per value make ``k + 0.5`` exact in float32.
    """
    key = _mix32((_mix32(step & MASK32) ^ seed) & MASK32)  # an int when both are ints: no host-to-device copy
    row_keys = _mix32(key ^ _mix32(torch.arange(rows, device=device) + 0x3C6EF372))  # [rows]
    col_keys = _mix32(torch.arange(vocab, device=device) + 0x1B873593)  # [vocab]
    bits = _mix32(row_keys[:, None] ^ col_keys[None, :])
    return ((bits >> 9).float() + 0.5) * (1.0 / (1 << 23))


def gumbel_tokens(
    logits: Tensor, sampling: Sampling, *, seed: Union[int, Tensor], step: Union[int, Tensor], filters: Sequence[LogitFilter] = ()
) -> Tensor:
    """Draw one token per row on the logits' device. ``logits[B, V]`` -> ``LongTensor[B]``.

    Gumbel-max over the temperature-scaled, top-k/top-p filtered logits: the same
    distribution as :func:`sample_tokens`, with noise from :func:`counter_uniform`
    for ``(seed, step)`` so recomputing a step redraws the same token.
    """
    assert logits.dim() == 2, f"expected logits [B, V], got {tuple(logits.shape)}"
    scaled = filter_logits(logits.float() / sampling.temperature, sampling.top_k, sampling.top_p, filters)
    u = counter_uniform(seed, step, logits.shape[0], logits.shape[1], logits.device)
    return (scaled - torch.log(-torch.log(u))).argmax(dim=-1)


Draws = Literal["device", "host"]


def resolve_draws(sampling: Sampling, device: torch.device) -> Draws:
    """``Sampling.draws`` with ``auto`` resolved: device draws on CUDA, host draws elsewhere
    (on the CPU the host is the device, and host draws match earlier versions' samples)."""
    if sampling.draws != "auto":
        return sampling.draws
    return "device" if device.type == "cuda" else "host"


class TokenDrawer:
    """Draws image tokens for one ``generate`` call, by ``Sampling.draws``.

    ``draw(logits[B, V], step) -> LongTensor[B]`` where ``step`` is the image position
    (an int, or a 0-d device tensor inside a static decode step). Host draws consume
    ``generator`` once per call, in step order; device draws take one seed from it here.
    """

    def __init__(self, sampling: Sampling, device: torch.device, generator: Optional[torch.Generator] = None) -> None:
        self.sampling, self.generator = sampling, generator
        self.filters = build_filters(sampling)
        self.mode: Draws = resolve_draws(sampling, device)
        self.seed: Optional[Tensor] = None
        if self.mode == "device":
            where = generator.device if generator is not None else device
            seed = torch.randint(0, 2**31 - 1, (), generator=generator, device=where)
            self.seed = seed.to(device, non_blocking=True)

    @property
    def on_device(self) -> bool:
        """Whether drawing needs nothing from the host (can run inside a captured step)."""
        return self.mode == "device"

    def draw(self, logits: Tensor, step: Union[int, Tensor]) -> Tensor:
        if self.mode == "device":
            return gumbel_tokens(logits, self.sampling, seed=self.seed, step=step, filters=self.filters)
        return sample_tokens(logits, self.sampling, self.generator, self.filters)


def guided_logits(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: ``uncond + scale * (cond - uncond)``; ``scale=1`` is ``cond``."""
    return uncond + scale * (cond - uncond)


def split_guidance(logits: Tensor, scale: float) -> Tensor:
    """Combine a ``[2B, V]`` batch laid out as ``[conditional; unconditional]`` into ``[B, V]``."""
    assert logits.shape[0] % 2 == 0, f"guided batch must be even, got {logits.shape[0]}"
    cond, uncond = logits.chunk(2, dim=0)
    return guided_logits(cond, uncond, scale)


__all__ = [
    "Draws",
    "TokenDrawer",
    "counter_uniform",
    "build_filters",
    "filter_logits",
    "guided_logits",
    "gumbel_tokens",
    "resolve_draws",
    "sample_tokens",
    "split_guidance",
]
