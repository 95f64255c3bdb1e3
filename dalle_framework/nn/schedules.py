"""Step schedules for annealed hyper-parameters (Gumbel temperature, KL weight...)."""

from __future__ import annotations

import math


def cosine_schedule(step: int, start: float, end: float, length: int) -> float:
    """Half-cosine from ``start`` (step 0) to ``end`` (step >= ``length``), then flat.

    ``length <= 0`` means "already at the end". DALL-E anneals the Gumbel
    temperature 1 -> 1/16 and the KL weight 0 -> 6.6 this way.
    """
    if length <= 0 or step >= length:
        return float(end)
    progress = max(step, 0) / length
    return float(end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress)))
