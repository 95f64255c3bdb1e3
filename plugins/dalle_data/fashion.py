"""Fashion-MNIST (Debian package ``dataset-fashion-mnist``, MIT) with template captions and a judge."""

from __future__ import annotations

import gzip
import logging
import re
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from PIL import Image

from dalle_framework import DataSource, Sample, UsageError

from .fashion_judge import FashionJudge, JudgeConfig
from .params import FashionMnistSourceParams

log = logging.getLogger(__name__)

FILES = {"train": "train", "heldout": "t10k"}
# Class names as they read in a caption ("a photo of a pair of trousers").
LABELS = ["t-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
# Other words a caption may use for a class.
ALIASES = {1: ["trousers"]}
# A label matches as whole words; "shirt" inside "t-shirt" is not a match.
_NAME_PATTERNS = [
    (label, re.compile(rf"(?<![\w-]){re.escape(name)}(?![\w-])"))
    for label, names in enumerate([[name, *ALIASES.get(i, [])] for i, name in enumerate(LABELS)])
    for name in names
]


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


@lru_cache(maxsize=4)
def resized_grey(root: str, prefix: str, size: int, count: Optional[int] = None) -> np.ndarray:
    """The first ``count`` (default: all) images of a file as uint8 ``[N, size, size]``.

    Resampled like :func:`dalle_framework.data.square_resize`: LANCZOS, BOX when 28 is a multiple of ``size``.
    """
    images = read_fashion_mnist(root, prefix)[0][:count]
    if size == images.shape[-1]:
        return images
    resample = Image.BOX if images.shape[-1] % size == 0 else Image.LANCZOS
    return np.stack([np.asarray(Image.fromarray(grey, "L").resize((size, size), resample)) for grey in images])


def label_of(caption: str) -> Optional[int]:
    """The class a caption names (``"a photo of a sneaker" -> 7``), or None when it names none or several."""
    text = " ".join(caption.lower().split())
    found = {label for label, pattern in _NAME_PATTERNS if pattern.search(text)}
    return found.pop() if len(found) == 1 else None


class FashionMnistSource(DataSource):
    """Fashion-MNIST: 28x28 grey photos of clothes, as RGB, captioned from a template.

    Split: the official one: train = the 60,000-image train file, heldout = the
    10,000-image test file, each in file order (``limit`` keeps a prefix).
    Captions: image ``i`` of a split uses template ``i % n`` of ``[template, *extra_templates]``.
    Judge: a small CNN trained on the real train split (see :mod:`.fashion_judge`)
    names the class of a generated image; ``prepare_judge`` trains or loads it.
    """

    Params = FashionMnistSourceParams

    def __init__(self, params: Optional["FashionMnistSource.Params"] = None, **runtime) -> None:
        self.params = params or self.Params()
        self.skipped = 0
        self.image_size = self.params.image_size
        self.templates = [self.params.template, *self.params.extra_templates]
        self._judge: Optional[FashionJudge] = None
        read_fashion_mnist(self.params.root, FILES["heldout"])  # fail early, naming the package

    def _arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        assert split in FILES, f"split must be 'train' or 'heldout', got {split!r}"
        images, labels = read_fashion_mnist(self.params.root, FILES[split])
        n = len(images) if self.params.limit is None else min(self.params.limit, len(images))
        return images[:n], labels[:n]

    def size(self, split: str) -> int:
        return len(self._arrays(split)[1])

    def captions(self, split: str) -> list[str]:
        """Every class under the first template, then under the next: a prefix of 10 covers each class once."""
        return [self.caption(label, t) for t in range(len(self.templates)) for label in range(len(LABELS))]

    def caption(self, label: int, template: int = 0) -> str:
        return self.templates[template].format(label=LABELS[label], a_label=with_article(LABELS[label]))

    def samples(self, split: str) -> Iterator[Sample]:
        _, labels = self._arrays(split)
        # with a limit only its prefix is resized; without, the whole file (shared with the judge)
        images = resized_grey(self.params.root, FILES[split], self.params.image_size, self.params.limit and len(labels))
        for i, label in enumerate(labels):
            yield Sample(
                image=np.repeat(images[i][:, :, None], 3, axis=2),
                caption=self.caption(label, i % len(self.templates)),
                key=f"{split}-{i:05d}",
                meta={"label": int(label)},
            )

    # ------------------------------------------------------------------ judge

    def split_tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split (``limit`` ignored), uint8 ``[N, S, S]`` and labels ``[N]``."""
        images = resized_grey(self.params.root, FILES[split], self.params.image_size)
        labels = read_fashion_mnist(self.params.root, FILES[split])[1]
        return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))

    def prepare_judge(self, cache_dir: Optional[Path]) -> dict:
        """Load the judge cached in ``cache_dir`` or train it on the real train split (and cache it).

        Returns its accuracy on the real held-out images, the ceiling for generated ones:
        ``{"all", "images", "per_class": {name: share}, "per_caption": {caption: share}}``.
        """
        if self.image_size % 8:
            raise UsageError(f"data.params.image_size: the fashion-mnist judge needs a multiple of 8, got {self.image_size}")
        config = JudgeConfig(image_size=self.image_size, epochs=self.params.judge_epochs, seed=self.params.judge_seed)
        if self._judge is None or self._judge.config != config:
            self._judge = FashionJudge.load_or_train(
                cache_dir, config, LABELS, self.split_tensors("train"), self.split_tensors("heldout")
            )
        ceiling = dict(self._judge.ceiling)
        labels = {caption: label_of(caption) for caption in self.captions("heldout")}
        ceiling["per_caption"] = {c: None if i is None else ceiling["per_class"][LABELS[i]] for c, i in labels.items()}
        return ceiling

    def judge_features(self, images: torch.Tensor) -> torch.Tensor:
        """The judge's last hidden layer ``[B, 256]`` for ``images[B, 3, H, W]`` in [0, 1] (trained here without ``prepare_judge``)."""
        if self._judge is None:
            self.prepare_judge(None)
        return self._judge.features(images)

    def judge_identity(self) -> dict:
        return {} if self._judge is None else self._judge.identity()

    def judge(self, images: torch.Tensor, captions: list[str]) -> dict[str, list[bool]]:
        """``{"class", "all"}`` -> B bools: the judge names the class the caption names.

        ``images[B, 3, H, W]`` in [0, 1]. A caption that names no class (or several) fails.
        Without ``prepare_judge`` first, the judge is trained here (a minute or two) and not cached.
        """
        assert len(captions) == images.shape[0], f"{len(captions)} captions for {images.shape[0]} images"
        if self._judge is None:
            self.prepare_judge(None)
        predicted = self._judge.classify(images).tolist()
        wanted = [label_of(caption) for caption in captions]
        verdict = [w is not None and p == w for p, w in zip(predicted, wanted)]
        return {"class": verdict, "all": list(verdict)}
