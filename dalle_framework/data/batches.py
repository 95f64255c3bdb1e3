"""Resumable batch streams over in-memory columns (the data position of a training run)."""

from __future__ import annotations

from typing import Any, Sequence

import torch


class ShuffledBatches:
    """Endless shuffled batches over equal-length columns (tensors or lists).

    Each epoch draws a fresh permutation from ``seed + epoch``; under data
    parallelism rank ``r`` of ``w`` takes every ``w``-th index, so ranks never
    overlap. The position (epoch, offset) is the whole state: resuming replays
    exactly the batches an uninterrupted run would have drawn.
    """

    def __init__(self, columns: Sequence[Any], *, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        lengths = {len(c) for c in columns}
        assert len(lengths) == 1, f"columns differ in length: {sorted(lengths)}"
        self.columns = columns
        self.n = lengths.pop()
        assert self.n >= world_size, f"{self.n} samples cannot be split over {world_size} ranks"
        self.batch_size = batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.offset = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g)[self.rank :: self.world_size]

    def __iter__(self) -> "ShuffledBatches":
        return self

    def __next__(self) -> list[Any]:
        picked: list[torch.Tensor] = []
        need = self.batch_size
        while need:
            chunk = self._order[self.offset : self.offset + need]
            picked.append(chunk)
            need -= len(chunk)
            self.offset += len(chunk)
            if self.offset >= len(self._order):
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._permutation()
        index = torch.cat(picked)
        return [_take(column, index) for column in self.columns]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._order = self._permutation()


def _take(column: Any, index: torch.Tensor) -> Any:
    if isinstance(column, torch.Tensor):
        return column[index]
    return [column[i] for i in index.tolist()]


def chunks(columns: Sequence[Any], batch_size: int):
    """Fixed-order batches over columns, for evaluation."""
    n = len(columns[0])
    for start in range(0, n, batch_size):
        yield [c[start : start + batch_size] for c in columns]
