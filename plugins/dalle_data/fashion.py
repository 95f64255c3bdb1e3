"""Fashion-MNIST (Debian package ``dataset-fashion-mnist``, MIT) with template captions."""

from __future__ import annotations

import gzip
import logging
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from pydantic import Field, field_validator

from dalle_framework import DataSource, Params, Sample, UsageError
from dalle_framework.data import square_resize

log = logging.getLogger(__name__)

ROOT = "/usr/share/datasets/fashion-mnist"
FILES = {"train": "train", "heldout": "t10k"}
# Class names as they read in a caption ("a photo of a pair of trousers").
LABELS = ["t-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]


def with_article(label: str) -> str:
    """``"sneaker" -> "a sneaker"``, ``"ankle boot" -> "an ankle boot"``."""
    return f"{'an' if label[0] in 'aeiou' else 'a'} {label}"


def _read_idx(path: Path, offset: int) -> np.ndarray:
    if not path.is_file():
        raise UsageError(
            f"Fashion-MNIST file {path} is missing: install it with `apt-get install dataset-fashion-mnist`"
        )
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


@lru_cache(maxsize=4)
def read_fashion_mnist(root: str, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, 28, 28], labels uint8 [N])`` from the idx ``.gz`` files (cached per process)."""
    images = _read_idx(Path(root) / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    labels = _read_idx(Path(root) / f"{prefix}-labels-idx1-ubyte.gz", 8)
    assert len(images) == len(labels), f"{prefix}: {len(images)} images but {len(labels)} labels"
    return images, labels


class FashionMnistSource(DataSource):
    """Fashion-MNIST: 28x28 grey photos of clothes, as RGB, captioned from a template.

    Split: the official one: train = the 60,000-image train file, heldout = the
    10,000-image test file, each in file order (``limit`` keeps a prefix).
    """

    class Params(Params):
        image_size: int = Field(
            32, ge=8, le=256, description="square side; 32 is the nearest codec-friendly size to 28"
        )
        template: str = Field(
            "a photo of {a_label}", description="caption with {label} ('ankle boot') or {a_label} ('an ankle boot')"
        )
        limit: Optional[int] = Field(None, ge=1, description="at most this many samples per split (quick experiments)")
        root: str = Field(ROOT, description="folder of the idx .gz files (Debian: dataset-fashion-mnist)")

        @field_validator("template")
        @classmethod
        def _template(cls, value: str) -> str:
            try:
                value.format(label="x", a_label="a x")
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(f"template may only use {{label}} and {{a_label}}: {exc}") from exc
            return value

    def __init__(self, params: Optional["FashionMnistSource.Params"] = None, **runtime) -> None:
        self.params = params or self.Params()
        self.skipped = 0
        self.image_size = self.params.image_size
        read_fashion_mnist(self.params.root, FILES["heldout"])  # fail early, naming the package

    def _arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        assert split in FILES, f"split must be 'train' or 'heldout', got {split!r}"
        images, labels = read_fashion_mnist(self.params.root, FILES[split])
        n = len(images) if self.params.limit is None else min(self.params.limit, len(images))
        return images[:n], labels[:n]

    def size(self, split: str) -> int:
        return len(self._arrays(split)[1])

    def captions(self, split: str) -> list[str]:
        return [self.caption(label) for label in range(len(LABELS))]

    def caption(self, label: int) -> str:
        return self.params.template.format(label=LABELS[label], a_label=with_article(LABELS[label]))

    def samples(self, split: str) -> Iterator[Sample]:
        images, labels = self._arrays(split)
        for i, (grey, label) in enumerate(zip(images, labels)):
            rgb = np.repeat(grey[:, :, None], 3, axis=2)
            yield Sample(
                image=square_resize(rgb, self.params.image_size),
                caption=self.caption(label),
                key=f"{split}-{i:05d}",
                meta={"label": int(label)},
            )
