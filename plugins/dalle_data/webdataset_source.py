"""Webdataset tar shards: local files, with brace expansion.

Only local files (or ``file:`` paths) are read. webdataset would also open
``pipe:`` URLs with a shell, and ``http(s):``/``s3:`` ones with a program;
a recipe is data from anyone, so those are refused when it is validated:
fetch or copy shards to a local folder first.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional, Union

from pydantic import Field, field_validator

from dalle_framework import DataSource, Params, Sample, UsageError, distributed
from dalle_framework.data import decode_image, square_resize

log = logging.getLogger(__name__)


@dataclass
class Skipped:
    """Marker a worker yields for a sample it could not decode (the parent process counts it)."""

    key: str
    reason: str


class DecodeSample:
    """Raw webdataset dict -> :class:`Sample`, or :class:`Skipped` (a picklable callable for workers)."""

    def __init__(self, image_keys: list[str], caption_key: str, image_size: Optional[int]) -> None:
        self.image_keys, self.caption_key, self.image_size = image_keys, caption_key, image_size

    def __call__(self, raw: dict[str, Any]) -> Union[Sample, Skipped]:
        key = f"{raw.get('__url__', '')}:{raw.get('__key__', '?')}"
        try:
            image_key = next((k for k in self.image_keys if k in raw), None)
            if image_key is None:
                return Skipped(key, f"no image (looked for {self.image_keys})")
            if self.caption_key not in raw:
                return Skipped(key, f"no caption {self.caption_key!r}")
            caption = raw[self.caption_key].decode("utf-8").strip()
            image = square_resize(decode_image(raw[image_key]), self.image_size)
        except Exception as exc:
            return Skipped(key, f"{type(exc).__name__}: {exc}")
        return Sample(image=image, caption=caption, key=str(raw.get("__key__", "")))


class WarnAndContinue:
    """webdataset handler for shard-level errors (unreadable tar, failed pipe): log, count, go on."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, exc: BaseException) -> bool:
        self.count += 1
        log.warning("webdataset: skipping after %s: %s", type(exc).__name__, exc)
        return True


def _identity(x: Any) -> Any:
    return x


URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
MAX_SHARDS = 100_000


def _expand(urls: Union[str, list[str]]) -> list[str]:
    """Brace-expanded shard paths, at most :data:`MAX_SHARDS` (a pattern may not expand without end)."""
    import braceexpand

    out: list[str] = []
    for url in [urls] if isinstance(urls, str) else urls:
        out.extend(itertools.islice(braceexpand.braceexpand(url), MAX_SHARDS + 1 - len(out)))
        if len(out) > MAX_SHARDS:
            raise UsageError(f"data.params: {url[:80]!r} names more than {MAX_SHARDS} shards")
    return out


class WebDatasetSource(DataSource):
    """Image-caption pairs from webdataset tar shards (``NNNNNN.png`` + ``NNNNNN.txt``).

    Split: fixed by the shards: ``train_urls`` for train, ``heldout_urls`` for
    held-out (``dalle data shards`` writes ``train-*.tar`` and ``heldout-*.tar``).
    Order: shard order, then tar order (no shuffling). URLs: local paths with
    brace expansion (``shards/train-{000000..000009}.tar``).
    Under torch.distributed each rank reads its own shards (``split_by_node``);
    with ``num_workers > 0`` a DataLoader's workers split them again
    (``split_by_worker``), so every sample is read once in all. A sample that
    cannot be decoded is skipped and counted; shard-level errors are logged and
    counted when ``num_workers == 0`` (a worker's count stays in the worker).
    """

    class Params(Params):
        train_urls: Union[str, list[str]] = Field(
            ..., description="train shards: local path pattern(s) with {a..b}"
        )
        heldout_urls: Optional[Union[str, list[str]]] = Field(
            None, description="held-out shards; None: the source has no held-out split"
        )
        image_keys: list[str] = Field(
            ["png", "jpg", "jpeg", "webp"], min_length=1, description="image extensions to look for, first match wins"
        )
        caption_key: str = Field("txt", description="extension of the caption entry")
        image_size: Optional[int] = Field(
            None,
            ge=8,
            le=1024,
            description="resize to this square side; None keeps the stored size (centre-cropped square)",
        )
        num_workers: int = Field(
            0, ge=0, le=256, description="DataLoader worker processes decoding shards in parallel; 0 reads in-process"
        )

        @field_validator("train_urls", "heldout_urls")
        @classmethod
        def _local_only(cls, urls):
            for url in [urls] if isinstance(urls, str) else (urls or []):
                scheme = URL_SCHEME.match(url)
                if scheme and scheme.group(1).lower() != "file":
                    raise ValueError(
                        f"{url[:80]!r}: {scheme.group(1)}: URLs run a command or reach the network, and a recipe may not; "
                        "copy the shards to a local folder and give their paths"
                    )
            return urls

    def __init__(self, params: "WebDatasetSource.Params", **runtime) -> None:
        self.params = params
        self.skipped = 0
        self.image_size = params.image_size
        for field in ("train_urls", "heldout_urls"):
            urls = getattr(params, field)
            if urls is None:
                continue
            for url in _expand(urls):
                local = url.removeprefix("file:")
                if not os.path.exists(local):
                    raise UsageError(
                        f"data.params.{field}: shard {local!r} does not exist (write shards with `dalle data shards`)"
                    )

    def urls(self, split: str) -> list[str]:
        assert split in ("train", "heldout"), f"split must be 'train' or 'heldout', got {split!r}"
        urls = self.params.train_urls if split == "train" else self.params.heldout_urls
        if urls is None:
            raise UsageError(f"data.params.heldout_urls is not set: the webdataset source has no {split} split")
        return _expand(urls)

    def size(self, split: str) -> Optional[int]:
        """From the ``stats.json`` that ``write_shards`` leaves beside the shards, when the
        split's URLs are exactly that split's local shards; else None (unknown until read)."""
        urls = self.urls(split)
        folders = {os.path.dirname(os.path.abspath(u.removeprefix("file:"))) for u in urls}
        if len(folders) != 1:
            return None
        stats_path = os.path.join(folders.pop(), "stats.json")
        try:
            with open(stats_path, encoding="utf-8") as f:
                entry = json.load(f)[split]
            written = {os.path.abspath(u) for u in _expand(entry["pattern"])}
        except (OSError, ValueError, KeyError, TypeError):
            return None
        mine = {os.path.abspath(u.removeprefix("file:")) for u in urls}
        return int(entry["count"]) if written == mine else None

    def dataset(self, split: str, handler: Any = None):
        """The webdataset pipeline (an IterableDataset) yielding :class:`Sample` or :class:`Skipped`."""
        import webdataset as wds

        return wds.WebDataset(
            self.urls(split),
            shardshuffle=False,
            nodesplitter=split_by_rank,
            workersplitter=wds.split_by_worker,
            empty_check=False,
            handler=handler or WarnAndContinue(),
        ).map(DecodeSample(self.params.image_keys, self.params.caption_key, self.params.image_size))

    def samples(self, split: str) -> Iterator[Sample]:
        handler = WarnAndContinue()
        dataset = self.dataset(split, handler)
        if self.params.num_workers > 0:
            from torch.utils.data import DataLoader

            dataset = DataLoader(dataset, batch_size=None, num_workers=self.params.num_workers, collate_fn=_identity)
        try:
            for item in dataset:
                if isinstance(item, Skipped):
                    self.skipped += 1
                    log.warning("webdataset: skipped %s: %s", item.key, item.reason)
                    continue
                yield item
        finally:
            self.skipped += handler.count


def split_by_rank(urls: Iterable[Any]) -> Iterator[Any]:
    """Every ``world_size``-th shard, starting at this process's rank.

    webdataset's own ``split_by_node`` trusts the RANK / WORLD_SIZE variables
    before the process group; a stale pair left in the environment (say by a
    single-process DeepSpeed run earlier in the same interpreter) would give
    every rank all shards. The process group, when there is one, is the truth.
    """
    yield from itertools.islice(urls, distributed.rank(), None, distributed.world_size())
