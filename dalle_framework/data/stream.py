"""A split read from shard files as a stream: exact epochs over ranks and workers, bounded memory, exact resume.

A split that lives in shard files (webdataset tars, token shards) is never loaded
whole: each DataLoader worker of each rank reads its own part of it.

**The plan of an epoch.** The shards are put in an order drawn from the seed and the
epoch, and their records are numbered through in that order (positions ``0..N-1``).
Rank ``r`` of ``R`` takes the contiguous positions ``[N r // R, N (r+1) // R)`` and its
worker ``w`` of ``W`` the same cut of that share, so every record is read once per epoch
by one worker of one rank. The cut follows records, not shards: with fewer shards than
ranks x workers (one held-out shard on eight GPUs) a shard is read in parts.
Each worker shuffles its share in blocks of ``shuffle_block`` records, seeded by epoch,
rank, worker and block; memory is one block of raw records per worker, whatever the
size of the data.

**Position.** Per worker: the epoch and how many records it has handed out in it. A
checkpoint holds the positions of every rank (:meth:`StreamBatches.state_dict`). With the
same ranks and workers the stream continues exactly as an uninterrupted run would. With
others, the records not yet drawn in the epochs in progress are cut anew among the new
workers (the *remainder* of those epochs), so nothing is drawn twice or skipped, and
later epochs follow the new plan.

The framework opens the files itself: a path is a local file, never a URL, so no scheme
is interpreted and no command is ever run.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from .. import distributed
from ..errors import UsageError

log = logging.getLogger(__name__)

Intervals = list[tuple[int, int]]  # half-open ranges of positions in an epoch's order, sorted, disjoint


@dataclass(frozen=True)
class Skipped:
    """A record that could not be decoded; workers hand it on so the main process counts and names it."""

    key: str
    reason: str


# ----------------------------------------------------------------------------- shard formats


class ShardFormat(abc.ABC):
    """How the records of one kind of shard file are counted and read (picklable: it travels to workers)."""

    name: str = ""

    @abc.abstractmethod
    def count(self, path: str) -> int:
        """Records in the file."""

    @abc.abstractmethod
    def read(self, path: str, start: int, stop: int) -> Iterator[Any]:
        """Records ``start .. stop-1`` of the file, in file order."""


META = re.compile(r"__[^/]*__($|/)")  # webdataset's rule: members like __key__ are metadata, not data


def _member_key(name: str) -> tuple[Optional[str], Optional[str]]:
    from webdataset.tariterators import base_plus_ext  # webdataset's own key rule: dir/base up to the first dot

    return base_plus_ext(name)


class TarShards(ShardFormat):
    """webdataset tar shards: consecutive members sharing a key (``000001.jpg``, ``000001.txt``) form a record.

    A record is ``{"__key__": key, "__url__": path, ext: bytes, ...}`` with lower-cased extensions,
    as webdataset groups them, so img2dataset's ``jpg``/``png``/``webp`` + ``txt`` + ``json`` read as they
    are. Members are read only for records in the asked range (others are skipped by seeking), a
    member larger than ``max_member_bytes`` is left out of its record (the record is then usually
    skipped by the decoder for a missing image), and nothing is ever extracted to disk.
    """

    name = "webdataset-tar"

    def __init__(self, *, max_member_bytes: int = 256 * 2**20) -> None:
        self.max_member_bytes = max_member_bytes
        self._resume: dict[str, tuple[int, int]] = {}  # path -> (record index, byte offset of its header): the last read's end

    def _members(self, handle: tarfile.TarFile) -> Iterator[tuple[str, tarfile.TarInfo]]:
        for info in handle:
            handle.members = []  # tarfile remembers every member; a shard may hold millions
            if not info.isreg() or META.match(info.name):
                continue
            key, _ = _member_key(info.name)
            if key is not None:
                yield key, info

    def count(self, path: str) -> int:
        records, last = 0, None
        with _open_tar(path) as handle:
            for key, _ in self._members(handle):
                if key != last:
                    records, last = records + 1, key
        return records

    def read(self, path: str, start: int, stop: int) -> Iterator[dict]:
        # Where the last read of this file ended, if at or before `start`: consecutive blocks of a
        # worker's share continue there instead of skipping from the top again.
        index, offset = self._resume.pop(path, (0, 0))
        if index > start or not _plain_tar(path):
            index, offset = 0, 0
        record: Optional[dict] = None
        with _open_tar(path, offset) as handle:
            for key, info in self._members(handle):
                if record is None or key != record["__key__"]:
                    if record is not None:  # the previous record is complete
                        if index >= start:
                            yield record
                        index += 1
                    if index >= stop:
                        self._resume[path] = (index, info.offset)
                        return
                    record = {"__key__": key, "__url__": path}
                if index < start:
                    continue  # skipped by seeking, never read
                _, ext = _member_key(info.name)
                if info.size > self.max_member_bytes:
                    log.warning("%s: member %s is %d bytes (over %d); left out", path, info.name, info.size, self.max_member_bytes)
                    continue
                record[ext.lower()] = handle.extractfile(info).read()
            if record is not None and start <= index < stop:
                yield record


@contextlib.contextmanager
def _open_tar(path: str, offset: int = 0) -> Iterator[tarfile.TarFile]:
    """A local tar file read from ``offset`` (a member header; plain tars only), closed afterwards.

    Plain tars are opened seekable, so members outside the asked records are passed over without
    being read; compressed ones are read as a stream.
    """
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise UsageError(f"shard {path!r}: cannot open ({exc.strerror or exc})") from None
    try:
        handle.seek(offset)
        try:
            tar = tarfile.open(fileobj=handle, mode="r:" if _plain_tar(path) else "r|*")
        except tarfile.TarError as exc:
            raise UsageError(f"shard {path!r}: not a readable tar file ({exc})") from None
        try:
            yield tar
        except tarfile.TarError as exc:
            raise UsageError(f"shard {path!r}: damaged tar file ({exc})") from None
        finally:
            tar.close()
    finally:
        handle.close()


def _plain_tar(path: str) -> bool:
    return not path.endswith((".gz", ".tgz", ".bz2", ".xz", ".zst"))


class TokenShards(ShardFormat):
    """Token shards (:mod:`dalle_framework.data.tokens`): a record is ``(text[T], image_tokens[n])`` int64 rows."""

    name = "dalle-token-shard"

    def count(self, path: str) -> int:
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            return int(f.get_slice("image_tokens").get_shape()[0])

    def read(self, path: str, start: int, stop: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            text = f.get_slice("text")[start:stop].long()
            image_tokens = f.get_slice("image_tokens")[start:stop].long()
        yield from zip(text, image_tokens)


# ----------------------------------------------------------------------------- a split as shards


@dataclass
class ShardedSplit:
    """What a data source hands the framework to stream a split: its shard files, their format, and how
    a raw record becomes an item (a tuple of column values, or :class:`Skipped`). ``decode`` must be
    picklable or module-level: workers run it."""

    paths: list[str]
    format: ShardFormat
    decode: Callable[[Any], Any]

    def map(self, fn: Callable[[Any], Any]) -> "ShardedSplit":
        """The same shards, each decoded item passed through ``fn`` (skipped ones pass as they are)."""
        return ShardedSplit(self.paths, self.format, _Then(self.decode, fn))


class _Then:
    def __init__(self, first: Callable, then: Callable) -> None:
        self.first, self.then = first, then

    def __call__(self, raw: Any) -> Any:
        item = self.first(raw)
        return item if isinstance(item, Skipped) else self.then(item)


def _fingerprint(path: str) -> list[int]:
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns]


def count_records(split: ShardedSplit, *, cache: Optional[Path] = None, collective: bool = False) -> list[int]:
    """Records per shard, in ``split.paths`` order.

    Counting reads every member header once; ``cache`` (a JSON file) keeps the counts by path,
    size and modification time, so a changed shard is counted again and an unchanged one is not.
    With ``collective`` every rank calls this: each counts every ``world_size``-th shard, the counts
    are shared, and rank 0 writes the cache.
    """
    from ..rundir import read_json, write_json

    known: dict = {}
    if cache is not None and cache.is_file():
        try:
            stored = read_json(cache)
            if isinstance(stored, dict) and stored.get("format") == split.format.name and isinstance(stored.get("shards"), dict):
                known = stored["shards"]
        except UsageError:
            known = {}  # a damaged cache is counted again, never trusted
    rank, world = (distributed.rank(), distributed.world_size()) if collective else (0, 1)
    mine: dict[str, list[int]] = {}
    for i, path in enumerate(split.paths):
        if i % world != rank:
            continue
        try:
            fingerprint = _fingerprint(path)
        except OSError as exc:
            raise UsageError(f"shard {path!r}: {exc.strerror}") from None
        entry = known.get(path)
        if isinstance(entry, list) and len(entry) == 3 and entry[:2] == fingerprint and isinstance(entry[2], int):
            mine[path] = entry
        else:
            mine[path] = [*fingerprint, int(split.format.count(path))]
    if collective and world > 1:
        for part in distributed.all_gather_object(mine):
            mine.update(part)
    if cache is not None and (not collective or distributed.is_main()) and any(known.get(p) != v for p, v in mine.items()):
        write_json(cache, {"format": split.format.name, "shards": {**known, **mine}})
    return [mine[p][2] for p in split.paths]


# ----------------------------------------------------------------------------- the plan


def cut(total: int, parts: int, index: int) -> tuple[int, int]:
    """The ``index``-th of ``parts`` near-equal contiguous pieces of ``range(total)``."""
    return total * index // parts, total * (index + 1) // parts


def length(intervals: Intervals) -> int:
    return sum(b - a for a, b in intervals)


def take(intervals: Intervals, start: int, stop: int) -> Intervals:
    """The positions ``start .. stop-1`` of ``intervals`` flattened, as intervals."""
    out: Intervals = []
    seen = 0
    for a, b in intervals:
        lo, hi = max(a, a + start - seen), min(b, a + stop - seen)
        if lo < hi:
            out.append((lo, hi))
        seen += b - a
        if seen >= stop:
            break
    return out


def merge(intervals: Sequence[tuple[int, int]]) -> Intervals:
    out: Intervals = []
    for a, b in sorted(i for i in intervals if i[1] > i[0]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


class Plan:
    """Which records each worker of each rank reads in each epoch, in which order (see the module docstring).

    ``remainders`` maps an epoch to the positions still to be drawn in it when the plan was
    cut anew for other ranks or workers; every other epoch is whole.
    """

    def __init__(self, counts: Sequence[int], *, seed: int, ranks: int, workers: int, shuffle_block: int,
                 remainders: Optional[dict[int, Intervals]] = None) -> None:
        self.counts = [int(c) for c in counts]
        self.total = sum(self.counts)
        self.seed, self.ranks, self.workers, self.block = seed, ranks, workers, shuffle_block
        self.remainders = {int(e): [tuple(i) for i in v] for e, v in (remainders or {}).items()}

    def order(self, epoch: int) -> np.ndarray:
        """The shards in this epoch's order."""
        return _rng(self.seed, epoch, 0x5A4D).permutation(len(self.counts))

    def intervals(self, epoch: int) -> Intervals:
        return self.remainders.get(epoch, [(0, self.total)])

    def share(self, epoch: int, rank: int, worker: int) -> Intervals:
        """The positions of ``epoch`` that this worker of this rank reads: cut by rank, then by worker."""
        whole = self.intervals(epoch)
        mine = take(whole, *cut(length(whole), self.ranks, rank))
        return take(mine, *cut(length(mine), self.workers, worker))

    def permutation(self, epoch: int, rank: int, worker: int, block: int, size: int) -> np.ndarray:
        return _rng(self.seed, epoch, rank, worker, block, self.ranks, self.workers).permutation(size)

    def physical(self, epoch: int, intervals: Intervals) -> Iterator[tuple[int, int, int]]:
        """``(shard index, first record, record after last)`` for the positions in ``intervals``, in position order."""
        order = self.order(epoch)
        starts = np.concatenate([[0], np.cumsum([self.counts[s] for s in order])])
        for a, b in intervals:
            i = int(np.searchsorted(starts, a, side="right")) - 1
            while a < b:
                shard = int(order[i])
                end = min(b, int(starts[i + 1]))
                if end > a:
                    yield shard, a - int(starts[i]), end - int(starts[i])
                a = end
                i += 1

    def drawn(self, epoch: int, rank: int, worker: int, done: int) -> Intervals:
        """The positions of ``epoch`` a worker has handed out after ``done`` records (its blocks are shuffled)."""
        share = self.share(epoch, rank, worker)
        full = done // self.block * self.block
        out = take(share, 0, full)
        if done > full:
            size = min(self.block, length(share) - full)
            block = take(share, full, full + size)
            flat = [p for a, b in block for p in range(a, b)]
            picked = self.permutation(epoch, rank, worker, full // self.block, size)[: done - full]
            out += [(flat[j], flat[j] + 1) for j in picked.tolist()]
        return merge(out)


def worker_items(split: ShardedSplit, plan: Plan, rank: int, worker: int, epoch: int, done: int) -> Iterator[tuple[int, int, Any]]:
    """``(epoch, done, item)`` for one worker, forever, starting after ``done`` records of ``epoch``.

    ``done`` counts records handed out in that epoch, skipped ones included, so it is the
    position to resume from. A worker whose share of the whole epochs is empty stops.
    """
    while True:
        share = plan.share(epoch, rank, worker)
        size = length(share)
        if size == 0 and epoch not in plan.remainders and all(e < epoch for e in plan.remainders):
            return
        first = done // plan.block
        for block in range(first, -(-size // plan.block)):
            lo, hi = block * plan.block, min(size, (block + 1) * plan.block)
            raws = [raw for shard, a, b in plan.physical(epoch, take(share, lo, hi)) for raw in split.format.read(split.paths[shard], a, b)]
            if len(raws) != hi - lo:
                raise UsageError(
                    f"shards changed while being read: expected {hi - lo} records, read {len(raws)} "
                    f"(epoch {epoch}, rank {rank}, worker {worker}); do not rewrite shards during training"
                )
            perm = plan.permutation(epoch, rank, worker, block, hi - lo)
            for j in range(max(done, lo) - lo, hi - lo):
                done = lo + j + 1
                yield epoch, done, split.decode(raws[perm[j]])
        epoch, done = epoch + 1, 0


class _WorkerStream(torch.utils.data.IterableDataset):
    """The IterableDataset a DataLoader's workers run: worker ``i`` plays slot ``(i + phase) % W``."""

    def __init__(self, split: ShardedSplit, plan: Plan, rank: int, positions: list[list[int]], phase: int) -> None:
        super().__init__()
        self.split, self.plan, self.rank, self.positions, self.phase = split, plan, rank, positions, phase

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        slot = ((info.id if info else 0) + self.phase) % self.plan.workers
        epoch, done = self.positions[slot]
        for epoch, done, item in worker_items(self.split, self.plan, self.rank, slot, epoch, done):
            yield slot, epoch, done, _by_value(item)


def _by_value(item: Any) -> Any:
    """Tensors of an item as numpy arrays: pickled through the worker's pipe they arrive ~1.5x faster
    than as tensors, each of which would take a shared-memory segment of its own."""
    if isinstance(item, tuple):
        return tuple(v.numpy() if isinstance(v, torch.Tensor) else v for v in item)
    return item


def _identity(x: Any) -> Any:
    return x


def collate(items: list[tuple]) -> list[Any]:
    """Item tuples -> columns: tensors (or numpy arrays, as they come from workers) stacked into a tensor, anything else listed."""
    columns = list(zip(*items))
    return [_stack(c) if isinstance(c[0], (torch.Tensor, np.ndarray)) else list(c) for c in columns]


def _stack(values: Sequence[Any]) -> torch.Tensor:
    if isinstance(values[0], torch.Tensor):
        return torch.stack(list(values))
    return torch.from_numpy(np.stack(values))


class StreamBatches:
    """Endless training batches of a sharded split for one rank (see the module docstring).

    ``state_dict()`` is this rank's position; ``load_state_dict(states)`` takes the positions of
    *every* rank of the run that saved them (the training loop gathers them), so it can continue
    exactly on the same ranks and workers, or cut the remainder anew on others.
    """

    def __init__(self, split: ShardedSplit, counts: Sequence[int], *, batch_size: int, seed: int, rank: int, world_size: int,
                 workers: int = 0, shuffle_block: int = 1000, on_skip: Optional[Callable[[Skipped], None]] = None) -> None:
        total = sum(counts)
        if total < world_size:
            raise UsageError(
                f"the training split has {total} records in {len(counts)} shard(s), fewer than the {world_size} ranks: "
                "every rank needs data; add data or use fewer processes"
            )
        share = total // world_size
        self.workers_asked = workers
        workers = max(1, min(workers, share)) if workers else 0  # a worker with nothing to read would end the round robin
        self.split, self.batch_size, self.rank, self.world_size = split, batch_size, rank, world_size
        self.loader_workers = workers
        self.plan = Plan(counts, seed=seed, ranks=world_size, workers=max(1, workers), shuffle_block=shuffle_block)
        self.positions = [[0, 0] for _ in range(self.plan.workers)]
        self.drawn = 0  # items taken by this rank since the plan was made: whose turn it is in the round robin
        self.on_skip = on_skip
        self._items: Optional[Iterator] = None

    # ------------------------------------------------------------------ iteration

    def _start(self) -> Iterator:
        if self.loader_workers == 0:
            epoch, done = self.positions[0]
            return ((0, e, d, item) for e, d, item in worker_items(self.split, self.plan, self.rank, 0, epoch, done))
        stream = _WorkerStream(self.split, self.plan, self.rank, [list(p) for p in self.positions], self.drawn % self.plan.workers)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=self.loader_workers, collate_fn=_identity,
                                             prefetch_factor=4, multiprocessing_context="fork")
        return iter(loader)

    def __iter__(self) -> "StreamBatches":
        return self

    def __next__(self) -> list[Any]:
        if self._items is None:
            self._items = self._start()
        picked: list[tuple] = []
        while len(picked) < self.batch_size:
            slot, epoch, done, item = next(self._items)
            self.positions[slot] = [epoch, done]
            self.drawn += 1
            if isinstance(item, Skipped):
                if self.on_skip is not None:
                    self.on_skip(item)
                continue
            picked.append(item)
        return collate(picked)

    def close(self) -> None:
        """Stop the DataLoader's workers (they are restarted from the position when iterated again)."""
        items, self._items = self._items, None
        if hasattr(items, "_shutdown_workers"):
            items._shutdown_workers()

    # ------------------------------------------------------------------ position

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "stream",
            "rank": self.rank,
            "ranks": self.world_size,
            "workers": self.plan.workers,
            "positions": [list(p) for p in self.positions],
            "drawn": self.drawn,
            "remainders": {str(e): [list(i) for i in v] for e, v in self.plan.remainders.items()},
            "counts": list(self.plan.counts),
        }

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        """Continue from the positions of every rank of the saved run (``states[r]`` is rank ``r``'s)."""
        self.close()
        first = states[0]
        if first.get("kind") != "stream" or list(first.get("counts", [])) != self.plan.counts:
            raise UsageError(
                "the checkpoint's data position is for other data than this run's shards "
                f"({len(first.get('counts', []))} shards with {sum(first.get('counts', []))} records then, "
                f"{len(self.plan.counts)} with {self.plan.total} now); resume with the same data, or start over with --force"
            )
        old = Plan(first["counts"], seed=self.plan.seed, ranks=int(first["ranks"]), workers=int(first["workers"]),
                   shuffle_block=self.plan.block, remainders={int(e): v for e, v in first.get("remainders", {}).items()})
        if (old.ranks, old.workers) == (self.world_size, self.plan.workers) and len(states) == old.ranks:
            self.plan.remainders = old.remainders
            mine = states[self.rank]
            self.positions = [list(map(int, p)) for p in mine["positions"]]
            self.drawn = int(mine["drawn"])
            return
        self.plan.remainders, epoch = remainders(old, [s["positions"] for s in states])
        self.positions = [[epoch, 0] for _ in range(self.plan.workers)]
        self.drawn = 0
        if self.rank == 0:
            log.warning(
                "data: resuming %d rank(s) x %d worker(s) as %d x %d: the records not yet drawn in epoch(s) %s are cut anew",
                old.ranks, old.workers, self.world_size, self.plan.workers, sorted(self.plan.remainders) or [epoch],
            )


def remainders(old: Plan, positions: list[list[list[int]]]) -> tuple[dict[int, Intervals], int]:
    """What is left of each epoch in progress after the saved positions (``positions[rank][worker] = [epoch, done]``).

    Returns the remainders of the epochs from the earliest one a worker was in, and that epoch.
    """
    epochs = [int(e) for per_rank in positions for e, _ in per_rank]
    first, last = min(epochs), max(epochs)
    left: dict[int, Intervals] = {}
    for epoch in range(first, last + 1):
        taken: Intervals = []
        for rank, per_rank in enumerate(positions):
            for worker, (e, done) in enumerate(per_rank):
                if int(e) > epoch:
                    taken += old.share(epoch, rank, worker)
                elif int(e) == epoch:
                    taken += old.drawn(epoch, rank, worker, int(done))
        left[epoch] = subtract(old.intervals(epoch), merge(taken))
    left.update({e: v for e, v in old.remainders.items() if e > last})
    return left, first


def subtract(whole: Intervals, taken: Intervals) -> Intervals:
    """Positions in ``whole`` and not in ``taken`` (both sorted and disjoint)."""
    out: Intervals = []
    j = 0
    for a, b in whole:
        while j < len(taken) and taken[j][1] <= a:
            j += 1
        k = j
        while a < b:
            if k < len(taken) and taken[k][0] < b:
                if taken[k][0] > a:
                    out.append((a, taken[k][0]))
                a = max(a, taken[k][1])
                k += 1
            else:
                out.append((a, b))
                break
    return out


# ----------------------------------------------------------------------------- reading without a plan


def read_positions(split: ShardedSplit, counts: Sequence[int], start: int, stop: int) -> Iterator[Any]:
    """Decoded items ``start .. stop-1`` of the split in file order (held-out evaluation, one pass over a split)."""
    offset = 0
    for path, count in zip(split.paths, counts):
        lo, hi = max(start - offset, 0), min(stop - offset, count)
        if lo < hi:
            for raw in split.format.read(path, lo, hi):
                yield split.decode(raw)
        offset += count
        if offset >= stop:
            return


__all__ = [
    "Intervals",
    "Plan",
    "ShardFormat",
    "ShardedSplit",
    "Skipped",
    "StreamBatches",
    "TarShards",
    "TokenShards",
    "collate",
    "count_records",
    "cut",
    "read_positions",
    "remainders",
    "worker_items",
]
