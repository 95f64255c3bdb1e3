"""Resumable batch streams over in-memory columns (the data position of a training run)."""

from __future__ import annotations

from typing import Any, Sequence

import torch


class ShuffledBatches:
    """Endless shuffled batches over equal-length columns (tensors or lists).

    Each epoch is a fresh permutation drawn from ``seed + epoch``, and the epochs'
    permutations are read one after the other: the *global position* counts the
    samples drawn by all ranks together. Each call draws the next
    ``world_size x batch_size`` positions and rank ``r`` takes the ``r``-th
    ``batch_size`` of them, so ranks never overlap and every sample is drawn once
    per epoch across ranks. The global position is the whole state: resuming on
    the same ranks replays exactly the batches an uninterrupted run would have
    drawn, and resuming on another number of ranks (or another batch size)
    continues from the same place, nothing drawn twice or skipped.
    """

    def __init__(self, columns: Sequence[Any], *, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        lengths = {len(c) for c in columns}
        assert len(lengths) == 1, f"columns differ in length: {sorted(lengths)}"
        self.columns = columns
        self.n = lengths.pop()
        assert self.n >= 1, "no samples to draw batches from"
        self.batch_size = batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.position = 0
        self._orders: dict[int, torch.Tensor] = {}

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}  # a batch spans at most two epochs
            self._orders[epoch] = torch.randperm(self.n, generator=g)
        return self._orders[epoch]

    def __iter__(self) -> "ShuffledBatches":
        return self

    def __next__(self) -> list[Any]:
        start = self.position + self.rank * self.batch_size
        positions = torch.arange(start, start + self.batch_size)
        epochs, offsets = positions // self.n, positions % self.n
        index = torch.cat([self._permutation(int(e))[offsets[epochs == e]] for e in epochs.unique().tolist()])
        self.position += self.world_size * self.batch_size
        return [_take(column, index) for column in self.columns]

    @property
    def epoch(self) -> int:
        return self.position // self.n

    def state_dict(self) -> dict[str, int]:
        return {"kind": "memory", "position": self.position, "samples": self.n}

    def load_state_dict(self, states: Any) -> None:
        """Continue from a saved position: every rank's state (a list, as the training loop saves them) or one
        rank's; a state from before global positions (``epoch``, ``offset`` of one process) reads the same."""
        state = states[0] if isinstance(states, list) else states
        if "position" in state:
            self.position = int(state["position"])
        else:
            self.position = int(state["epoch"]) * self.n + int(state["offset"])

    def close(self) -> None:
        """Nothing to stop (the stream of a sharded split has workers to end)."""


def _take(column: Any, index: torch.Tensor) -> Any:
    if isinstance(column, torch.Tensor):
        return column[index]
    return [column[i] for i in index.tolist()]


def chunks(columns: Sequence[Any], batch_size: int):
    """Fixed-order batches over columns, for evaluation."""
    n = len(columns[0])
    for start in range(0, n, batch_size):
        yield [c[start : start + batch_size] for c in columns]
