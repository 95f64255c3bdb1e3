"""The stream's plan in one process: which worker of which rank reads which records, and what is
left of an epoch when a run stops (tests/test_scale.py runs the same under torchrun)."""

from __future__ import annotations

import itertools
import random

import pytest

from dalle_framework.data.stream import Plan, ShardedSplit, ShardFormat, Skipped, StreamBatches, length, remainders, subtract, take, worker_items


class Numbered(ShardFormat):
    """Shards of numbered records, no files: record ``i`` of shard ``s`` is ``(s, i)``."""

    name = "numbered"

    def __init__(self, counts: list[int]) -> None:
        self.counts = counts

    def count(self, path: str) -> int:
        return self.counts[int(path)]

    def read(self, path: str, start: int, stop: int):
        for i in range(start, min(stop, self.counts[int(path)])):
            yield (int(path), i)


def split_of(counts: list[int]) -> ShardedSplit:
    return ShardedSplit([str(i) for i in range(len(counts))], Numbered(counts), lambda record: record)


COUNTS = [30, 30, 20, 10, 6, 0, 1]


@pytest.mark.parametrize("ranks,workers,block", [(1, 1, 1000), (2, 2, 7), (3, 2, 5), (4, 3, 1000), (8, 4, 3)])
def test_every_record_once_per_epoch(ranks, workers, block):
    split, plan = split_of(COUNTS), Plan(COUNTS, seed=3, ranks=ranks, workers=workers, shuffle_block=block)
    every = sorted((s, i) for s, n in enumerate(COUNTS) for i in range(n))
    orders = []
    for epoch in range(3):
        drawn = []
        for rank, worker in itertools.product(range(ranks), range(workers)):
            share = length(plan.share(epoch, rank, worker))
            items = list(itertools.islice(worker_items(split, plan, rank, worker, epoch, 0), share))
            assert all(e == epoch for e, _, _ in items)
            drawn += [item for _, _, item in items]
        assert sorted(drawn) == every
        orders.append(drawn)
    assert orders[0] != orders[1], "every epoch is shuffled anew"
    sizes = [length(plan.share(0, r, w)) for r in range(ranks) for w in range(workers)]
    assert max(sizes) - min(sizes) <= 1 + 1, sizes  # cut by rank, then by worker: near-equal shares


def test_a_worker_resumes_exactly_from_its_position():
    split, plan = split_of(COUNTS), Plan(COUNTS, seed=1, ranks=2, workers=2, shuffle_block=7)
    whole = list(itertools.islice(worker_items(split, plan, 1, 0, 0, 0), 60))  # past the end of its epoch-0 share
    for cut in (0, 5, 7, 13, 24, 40):
        epoch, done, _ = whole[cut - 1] if cut else (0, 0, None)
        assert list(itertools.islice(worker_items(split, plan, 1, 0, epoch, done), 60 - cut)) == whole[cut:]


@pytest.mark.parametrize("new_ranks,new_workers", [(1, 1), (1, 3), (3, 2), (2, 2)])
def test_a_stopped_run_cut_anew_draws_every_record_of_its_epochs_once(new_ranks, new_workers):
    """Workers stopped at different places, some already in the next epoch, resumed on other ranks or workers."""
    split, old = split_of(COUNTS), Plan(COUNTS, seed=5, ranks=2, workers=2, shuffle_block=7)
    rng = random.Random(0)
    positions, drawn = [], {0: [], 1: [], 2: []}
    for rank in range(2):
        per_rank = []
        for worker in range(2):
            taken = rng.randrange(1, 60)  # a share is ~24: some workers are well into epoch 1
            items = list(itertools.islice(worker_items(split, old, rank, worker, 0, 0), taken))
            for epoch, _, item in items:
                drawn[epoch].append(item)
            per_rank.append(list(items[-1][:2]))
        positions.append(per_rank)
    left, first = remainders(old, positions)
    new = Plan(COUNTS, seed=5, ranks=new_ranks, workers=new_workers, shuffle_block=7, remainders=left)
    for rank, worker in itertools.product(range(new_ranks), range(new_workers)):
        todo = sum(length(new.share(e, rank, worker)) for e in left)
        for epoch, _, item in itertools.islice(worker_items(split, new, rank, worker, first, 0), todo):
            drawn[epoch].append(item)
    every = sorted((s, i) for s, n in enumerate(COUNTS) for i in range(n))
    for epoch in left:
        assert sorted(drawn[epoch]) == every, epoch


def test_interval_arithmetic():
    assert take([(0, 5), (10, 15)], 3, 8) == [(3, 5), (10, 13)]
    assert subtract([(0, 10), (20, 30)], [(2, 4), (8, 22), (29, 30)]) == [(0, 2), (4, 8), (22, 29)]
    assert subtract([(0, 10)], []) == [(0, 10)] and subtract([(0, 10)], [(0, 10)]) == []


def test_batches_skip_undecodable_records_and_count_them():
    counts = [10, 10]
    split = ShardedSplit(["0", "1"], Numbered(counts), lambda r: Skipped(str(r), "bad") if r[1] % 5 == 0 else (r[1],))
    skipped = []
    stream = StreamBatches(split, counts, batch_size=4, seed=0, rank=0, world_size=1, on_skip=skipped.append)
    seen = [value for _ in range(4) for value in next(stream)[0]]
    assert 0 not in seen and 5 not in seen and len(seen) == 16 and len(skipped) == 4
