"""Drawing tokens from logits: temperature, top-k, nucleus, classifier-free guidance.

Shared by every prior so that the same :class:`~dalle_framework.Sampling` settings mean
the same thing whichever model draws the tokens.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .interfaces import Sampling


def filter_logits(logits: Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None) -> Tensor:
    """Set to ``-inf`` every logit outside the top ``k`` and outside the nucleus of mass ``p``.

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
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def sample_tokens(logits: Tensor, sampling: Sampling, generator: Optional[torch.Generator] = None) -> Tensor:
    """Draw one token per row. ``logits[B, V]`` -> ``LongTensor[B]``.

    Applies temperature, then top-k / top-p. The draw consumes ``generator`` the same
    way for the same shapes, so a seeded generator gives reproducible samples.
    """
    assert logits.dim() == 2, f"expected logits [B, V], got {tuple(logits.shape)}"
    scaled = filter_logits(logits.float() / sampling.temperature, sampling.top_k, sampling.top_p)
    probs = scaled.softmax(dim=-1)
    if generator is not None and generator.device != probs.device:
        # draw on the generator's device so results do not depend on where the model runs
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(-1).to(logits.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def guided_logits(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: ``uncond + scale * (cond - uncond)``; ``scale=1`` is ``cond``."""
    return uncond + scale * (cond - uncond)


def split_guidance(logits: Tensor, scale: float) -> Tensor:
    """Combine a ``[2B, V]`` batch laid out as ``[conditional; unconditional]`` into ``[B, V]``."""
    assert logits.shape[0] % 2 == 0, f"guided batch must be even, got {logits.shape[0]}"
    cond, uncond = logits.chunk(2, dim=0)
    return guided_logits(cond, uncond, scale)


__all__ = ["filter_logits", "guided_logits", "sample_tokens", "split_guidance"]
