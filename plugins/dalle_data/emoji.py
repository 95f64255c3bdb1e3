"""Noto Color Emoji rendered with Pillow, captioned with their CLDR English names.

Images: Debian package ``fonts-noto-color-emoji`` (Apache-2.0 images, SIL OFL font).
Names: Debian package ``unicode-data`` (``emoji-test.txt``, Unicode licence).
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dalle_framework import DataSource, Sample, UsageError

from .params import FONT, NAMES, EmojiSourceParams

log = logging.getLogger(__name__)

FONT_SIZE = 109  # the only bitmap strike NotoColorEmoji carries
HELDOUT_EVERY = 10

_LINE = re.compile(r"^(?P<codes>[0-9A-F ]+?)\s*;\s*fully-qualified\s*#\s*\S+\s+E\d+\.\d+\s+(?P<name>.+?)\s*$")


@dataclass(frozen=True)
class Emoji:
    index: int  # position among all fully-qualified emoji (fixes the split)
    text: str
    name: str
    group: str
    subgroup: str


@lru_cache(maxsize=4)
def read_emoji_list(path: str = NAMES) -> tuple[Emoji, ...]:
    """Every fully-qualified line of ``emoji-test.txt``, in file (CLDR) order."""
    if not Path(path).is_file():
        raise UsageError(f"emoji names file {path} is missing: install it with `apt-get install unicode-data`")
    out: list[Emoji] = []
    group = subgroup = ""
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif (m := _LINE.match(line)) is not None:
            text = "".join(chr(int(c, 16)) for c in m["codes"].split())
            out.append(Emoji(len(out), text, m["name"], group, subgroup))
    if not out:
        raise UsageError(f"no fully-qualified emoji found in {path}: is it a Unicode emoji-test.txt?")
    return tuple(out)


# Rendered arrays, per process: (font path, image_size) -> {index: uint8 [S, S, 3]}.
_CACHE: dict[tuple[str, int], dict[int, np.ndarray]] = {}
_LOCK = threading.Lock()


@lru_cache(maxsize=2)
def _font(path: str) -> ImageFont.FreeTypeFont:
    if not Path(path).is_file():
        raise UsageError(f"emoji font {path} is missing: install it with `apt-get install fonts-noto-color-emoji`")
    return ImageFont.truetype(path, FONT_SIZE)


def render_emoji(text: str, image_size: int, font_path: str = FONT) -> np.ndarray:
    """One emoji -> uint8 ``[image_size, image_size, 3]``: glyph cropped to its box, centred on white."""
    font = _font(font_path)
    canvas = Image.new("RGBA", (FONT_SIZE * 3, FONT_SIZE * 2), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((FONT_SIZE // 2, FONT_SIZE // 4), text, font=font, embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    if box is None:
        raise ValueError(f"emoji {text!r} rendered empty")
    glyph = canvas.crop(box)
    side = max(glyph.size)
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    square.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    return np.array(square.convert("RGB").resize((image_size, image_size), Image.LANCZOS))


class EmojiSource(DataSource):
    """Noto Color Emoji images with CLDR names as captions (3,655 pairs).

    Split: fully-qualified emoji are numbered in ``emoji-test.txt`` order; index
    ``% 10 == 0`` is held out (366), the rest is train (3,289). The ``groups`` /
    ``subgroups`` filters select within that fixed split, so an emoji never
    changes side. Rendered images are cached in memory per process.
    """

    Params = EmojiSourceParams

    def __init__(self, params: Optional["EmojiSource.Params"] = None, **runtime) -> None:
        self.params = params or self.Params()
        self.skipped = 0
        self.image_size = self.params.image_size
        every = read_emoji_list(self.params.names_path)
        _font(self.params.font_path)  # fail early, with the package to install
        p = self.params
        for field, values, known in (
            ("groups", p.groups, {e.group for e in every}),
            ("subgroups", p.subgroups, {e.subgroup for e in every}),
        ):
            bad = sorted(set(values or ()) - known)
            if bad:
                raise UsageError(f"data.params.{field}: unknown {bad}; known: {sorted(known)}")
        keep = [
            e
            for e in every
            if (p.groups is None or e.group in p.groups) and (p.subgroups is None or e.subgroup in p.subgroups)
        ]
        self.emoji = {
            "train": [e for e in keep if e.index % HELDOUT_EVERY != 0],
            "heldout": [e for e in keep if e.index % HELDOUT_EVERY == 0],
        }

    def size(self, split: str) -> int:
        return len(self.emoji[split])

    def caption(self, e: Emoji) -> str:
        return self.params.caption_template.format(name=e.name, group=e.group, subgroup=e.subgroup)

    def captions(self, split: str) -> list[str]:
        return list(dict.fromkeys(self.caption(e) for e in self.emoji[split]))

    def image(self, e: Emoji) -> np.ndarray:
        """The rendered emoji (a writable copy of the per-process cache's read-only array)."""
        key = (self.params.font_path, self.params.image_size)
        with _LOCK:
            cache = _CACHE.setdefault(key, {})
            if e.index not in cache:
                cache[e.index] = render_emoji(e.text, self.params.image_size, self.params.font_path)
                cache[e.index].flags.writeable = False
            return cache[e.index].copy()

    def samples(self, split: str) -> Iterator[Sample]:
        assert split in ("train", "heldout"), f"split must be 'train' or 'heldout', got {split!r}"
        for e in self.emoji[split]:
            try:
                image = self.image(e)
            except Exception as exc:  # a glyph the font cannot draw: skip, never crash
                self.skipped += 1
                log.warning("emoji %s (%r) skipped: %s", e.index, e.name, exc)
                continue
            yield Sample(
                image=image,
                caption=self.caption(e),
                key=f"emoji-{e.index:04d}",
                meta={"group": e.group, "subgroup": e.subgroup},
            )
