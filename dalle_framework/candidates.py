"""Keeping the best candidates per caption while they are drawn, in bounded memory.

The paper draws 512 samples per caption and keeps the best 32 by CLIP score. Holding
every decoded image until the end costs ``captions * 512`` images; :class:`RunningBest`
keeps only the running best ``keep`` of each caption (plus every candidate's score), so
memory is bounded by the batch size and ``keep``, whatever the number of candidates.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


class RunningBest:
    """The best ``keep`` candidates of each of ``captions`` captions seen so far, best first.

    Order is by score, descending; equal scores keep the earlier candidate first, exactly
    as a stable sort of all candidates would. NaN scores (no reranker) rank last, so
    without scores the first ``keep`` candidates drawn are kept.
    """

    def __init__(self, captions: int, keep: int, candidates: int) -> None:
        self.keep, self.candidates = keep, candidates
        self.scores = torch.full((captions, candidates), math.nan)  # every candidate's score, on the CPU
        self._best: list[Optional[tuple[Tensor, Tensor, Tensor]]] = [None] * captions  # (images, scores, index)

    def add(self, caption: int, index: Tensor, images: Tensor, scores: Tensor) -> None:
        """Candidates ``index[n]`` (numbers within the caption, increasing) with ``images[n, ...]`` and ``scores[n]``."""
        self.scores[caption, index.cpu()] = scores.detach().float().cpu()
        new = (images, scores.float(), index.to(scores.device))
        if self._best[caption] is not None:  # the kept ones were drawn earlier: they come first
            new = tuple(torch.cat([old, part]) for old, part in zip(self._best[caption], new))
        images, scores, index = new
        order = torch.nan_to_num(scores, nan=-math.inf).argsort(descending=True, stable=True)[: self.keep]
        self._best[caption] = (images[order], scores[order], index[order])

    def images(self) -> Tensor:
        """``[captions, keep, ...]``, best first."""
        return torch.stack([best[0] for best in self._best])

    def best_scores(self) -> Tensor:
        """``[captions, keep]``, matching :meth:`images`."""
        return torch.stack([best[1] for best in self._best])

    def index(self) -> Tensor:
        """``[captions, keep]``: which candidate (in drawing order) each kept image is."""
        return torch.stack([best[2] for best in self._best])


__all__ = ["RunningBest"]
