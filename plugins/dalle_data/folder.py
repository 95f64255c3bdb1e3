"""Your own images: a folder tree of images with same-named ``.txt`` captions."""

from __future__ import annotations

import logging
import zlib
from pathlib import Path
from typing import Iterator

from dalle_framework import DataSource, Sample, UsageError
from dalle_framework.data import decode_image, square_resize

from .params import FolderSourceParams

log = logging.getLogger(__name__)


def is_heldout(relative_path: str, heldout_percent: float) -> bool:
    """The folder split rule: CRC-32 of the relative POSIX path, mod 10,000, below ``percent * 100``.

    A hash (not a sorted index) keeps every file on its side when files are added or removed.
    """
    return zlib.crc32(relative_path.encode("utf-8")) % 10_000 < heldout_percent * 100


class FolderSource(DataSource):
    """Images under ``root`` (searched recursively) captioned by same-named ``.txt`` files.

    ``photos/cat.jpg`` is captioned by ``photos/cat.txt`` (UTF-8; whitespace is
    collapsed to single spaces). Split: see :func:`is_heldout`: the CRC-32 of
    the image's path relative to ``root`` decides, stable as the folder grows;
    ``heldout_percent`` (default 10) of files are held out. Order: sorted
    relative paths. Skipped and counted (with a log warning), never fatal: an
    image without a ``.txt``, an empty caption, an image that cannot be decoded.
    Images are centre-cropped to a square, then resized to ``image_size``.
    """

    Params = FolderSourceParams

    def __init__(self, params: "FolderSource.Params", **runtime) -> None:
        self.params = params
        self.skipped = 0
        self.image_size = params.image_size
        self.root = Path(params.root).expanduser()
        if not self.root.is_dir():
            raise UsageError(f"data.params.root: folder {str(self.root)!r} does not exist")
        suffixes = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in params.extensions}
        files = sorted(
            (
                p.relative_to(self.root).as_posix()
                for p in self.root.rglob("*")
                if p.is_file() and p.suffix.lower() in suffixes
            )
        )
        if not files:
            raise UsageError(
                f"data.params.root: no images ({', '.join(sorted(suffixes))}) under {str(self.root)!r}; "
                "put images with same-named .txt captions there"
            )
        self.files = {
            "train": [f for f in files if not is_heldout(f, params.heldout_percent)],
            "heldout": [f for f in files if is_heldout(f, params.heldout_percent)],
        }

    def size(self, split: str) -> int:
        """Image files in the split (samples may be fewer: unreadable ones are skipped)."""
        return len(self.files[split])

    def _skip(self, rel: str, why: str) -> None:
        self.skipped += 1
        log.warning("folder %s: skipped %s: %s", self.root, rel, why)

    def samples(self, split: str) -> Iterator[Sample]:
        assert split in ("train", "heldout"), f"split must be 'train' or 'heldout', got {split!r}"
        for rel in self.files[split]:
            path = self.root / rel
            txt = path.with_suffix(".txt")
            if not txt.is_file():
                self._skip(rel, f"no caption file {txt.name}")
                continue
            try:
                caption = " ".join(txt.read_text(encoding="utf-8").split())
                image = square_resize(decode_image(path.read_bytes()), self.params.image_size)
            except Exception as exc:  # unreadable caption or image: skip, never crash
                self._skip(rel, f"{type(exc).__name__}: {exc}")
                continue
            if not caption:
                self._skip(rel, f"empty caption in {txt.name}")
                continue
            yield Sample(image=image, caption=caption, key=rel)
