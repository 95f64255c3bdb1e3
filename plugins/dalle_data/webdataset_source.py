"""Webdataset tar shards on local disk: ``dalle data shards`` output and img2dataset's layout read as they are.

The framework opens the shard files itself (:class:`dalle_framework.data.stream.TarShards`):
a shard is a local path after brace expansion, never a URL, so no ``pipe:``, ``http:`` or
other scheme is ever interpreted and no command can run, however a pattern is written.
Training streams the shards (every rank and DataLoader worker reads its own part; see
:mod:`dalle_framework.data.stream`); ``samples`` reads a split once, in file order.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Iterator, Optional, Union

import torch.utils.data

from dalle_framework import DataSource, Sample, UsageError
from dalle_framework.data import decode_image, square_resize
from dalle_framework.data.stream import ShardedSplit, Skipped, TarShards

from .params import WebDatasetSourceParams, expand

log = logging.getLogger(__name__)


class DecodeSample:
    """A tar record -> :class:`Sample`, or :class:`Skipped` naming why (picklable: workers run it)."""

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
            caption = " ".join(raw[self.caption_key].decode("utf-8").split())
            if not caption:
                return Skipped(key, f"empty caption {self.caption_key!r}")
            image = square_resize(decode_image(raw[image_key]), self.image_size)
        except Exception as exc:  # a damaged image or caption is skipped and named, never fatal
            return Skipped(key, f"{type(exc).__name__}: {exc}")
        return Sample(image=image, caption=caption, key=str(raw.get("__key__", "")))


class CaptionOnly:
    """A tar record -> its caption (``None`` when it has none); images are never read."""

    def __init__(self, caption_key: str) -> None:
        self.caption_key = caption_key

    def __call__(self, raw: dict[str, Any]) -> Optional[str]:
        try:
            caption = " ".join(raw[self.caption_key].decode("utf-8").split())
        except (KeyError, UnicodeDecodeError):
            return None
        return caption or None


class WebDatasetSource(DataSource):
    """Image-caption pairs from webdataset tar shards (``NNNNNN.png`` + ``NNNNNN.txt`` [+ ``.json``]).

    Split: fixed by the shards: ``train_urls`` for train, ``heldout_urls`` for
    held-out (``dalle data shards`` writes ``train-*.tar`` and ``heldout-*.tar``;
    img2dataset's ``00000.tar`` with ``jpg``/``txt``/``json`` read as they are).
    Paths: local files with brace expansion (``shards/train-{000000..000009}.tar``).
    ``samples`` reads a split in shard order, then tar order; training streams it
    (``stream``). A sample that cannot be decoded is skipped, named and counted.
    """

    Params = WebDatasetSourceParams

    def __init__(self, params: "WebDatasetSource.Params", **runtime) -> None:
        self.params = params
        self.skipped = 0
        self.image_size = params.image_size
        self.format = TarShards()
        for field in ("train_urls", "heldout_urls"):
            for path in expand(getattr(params, field) or []):
                if not os.path.isfile(path):
                    raise UsageError(f"data.params.{field}: shard {path!r} does not exist (write shards with `dalle data shards`)")

    def urls(self, split: str) -> list[str]:
        assert split in ("train", "heldout"), f"split must be 'train' or 'heldout', got {split!r}"
        urls = self.params.train_urls if split == "train" else self.params.heldout_urls
        if urls is None:
            raise UsageError(f"data.params.heldout_urls is not set: the webdataset source has no {split} split")
        return expand(urls)

    def _decoder(self) -> DecodeSample:
        return DecodeSample(self.params.image_keys, self.params.caption_key, self.params.image_size)

    def stream(self, split: str) -> ShardedSplit:
        return ShardedSplit(self.urls(split), self.format, self._decoder())

    def size(self, split: str) -> Optional[int]:
        """From the ``stats.json`` that ``write_shards`` leaves beside the shards, when the
        split's paths are exactly that split's shards; else None (unknown until read)."""
        from dalle_framework.rundir import read_json

        paths = self.urls(split)
        folders = {os.path.dirname(os.path.abspath(p)) for p in paths}
        if len(folders) != 1:
            return None
        try:
            entry = read_json(os.path.join(folders.pop(), "stats.json"))[split]
            written = {os.path.abspath(p) for p in expand(entry["pattern"])}
            count = int(entry["count"])
        except (UsageError, ValueError, KeyError, TypeError):
            return None
        return count if written == {os.path.abspath(p) for p in paths} else None

    def _records(self, split: str, decode) -> Iterator[Any]:
        """Decoded records of a split in file order; with ``num_workers``, workers take whole shards in turn."""
        paths = self.urls(split)
        workers = min(self.params.num_workers, len(paths))
        if workers == 0:
            for path in paths:
                for raw in self.format.read(path, 0, 2**62):
                    yield decode(raw)
            return
        loader = torch.utils.data.DataLoader(_ShardsInTurn(paths, self.format, decode), batch_size=None, num_workers=workers, collate_fn=_identity)
        yield from loader

    def samples(self, split: str) -> Iterator[Sample]:
        for item in self._records(split, self._decoder()):
            if isinstance(item, Skipped):
                self.skipped += 1
                log.warning("webdataset: skipped %s: %s", item.key, item.reason)
                continue
            yield item

    def caption_stream(self, split: str) -> Iterator[str]:
        for caption in self._records(split, CaptionOnly(self.params.caption_key)):
            if caption is not None:
                yield caption

    def captions(self, split: str) -> list[str]:
        return list(dict.fromkeys(self.caption_stream(split)))


def _identity(x: Any) -> Any:
    return x


class _ShardsInTurn(torch.utils.data.IterableDataset):
    """An IterableDataset over whole shards: DataLoader worker ``i`` of ``n`` reads shards ``i, i+n, ...``."""

    def __init__(self, paths: list[str], format: TarShards, decode) -> None:
        super().__init__()
        self.paths, self.format, self.decode = paths, format, decode

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        mine = self.paths[info.id :: info.num_workers] if info else self.paths
        for path in mine:
            for raw in self.format.read(path, 0, 2**62):
                yield self.decode(raw)
