"""The data sources' settings, importable without torch: recipes are checked with them alone."""

from __future__ import annotations

import itertools
import re
from typing import Optional, Union

from pydantic import Field, field_validator, model_validator

from dalle_framework import Params, UsageError

# ---------------------------------------------------------------------------- shapes

# Clearly separable RGB colours (every pair is >= 128 apart in some channel).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
    "white": (255, 255, 255),
    "orange": (255, 128, 0),
    "purple": (128, 0, 255),
}

# Position name -> centre (x, y) as a fraction of the image side: a 3 x 3 grid.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top middle": (0.5, 0.25),
    "top right": (0.75, 0.25),
    "middle left": (0.25, 0.5),
    "center": (0.5, 0.5),
    "middle right": (0.75, 0.5),
    "bottom left": (0.25, 0.75),
    "bottom middle": (0.5, 0.75),
    "bottom right": (0.75, 0.75),
}

# The drawn shapes, in order (shapes.SHAPES maps each to its drawing function).
SHAPE_NAMES = ("circle", "square", "triangle", "diamond", "cross")


class ShapesSourceParams(Params):
    image_size: int = Field(
        32, ge=8, le=512, description="square side in pixels; the paper's 256 is far too slow on CPU"
    )
    colours: list[str] = Field(
        ["red", "green", "blue", "yellow", "magenta", "cyan", "white"],
        min_length=1,
        description=f"colour names, from {sorted(COLOURS)}; defaults are the pure primaries/secondaries, easy to tell apart",
    )
    shapes: list[str] = Field(
        ["circle", "square", "triangle"], min_length=1, description=f"shape names, from {sorted(SHAPE_NAMES)}"
    )
    positions: list[str] = Field(
        ["top left", "top right", "bottom left", "bottom right", "center"],
        min_length=1,
        description=f"position names (a 3x3 grid), from {list(POSITIONS)}; corners + centre keep shapes apart at 32px",
    )
    samples_per_caption: int = Field(
        100, ge=1, description="train renderings per (colour, shape, position) combination"
    )
    heldout_samples_per_caption: int = Field(10, ge=1, description="held-out renderings per held-out combination")
    heldout_fraction: float = Field(
        0.1, ge=0, lt=1, description="share of combinations never seen in train (compositional generalisation)"
    )
    heldout_count: Optional[int] = Field(
        None, ge=0, description="hold out exactly this many combinations instead of heldout_fraction"
    )
    shape_size: float = Field(
        0.36, gt=0.05, le=0.5, description="shape box side as a fraction of the image; fits a grid cell"
    )
    size_jitter: float = Field(0.15, ge=0, le=0.5, description="relative +/- jitter of the shape size")
    position_jitter: float = Field(
        0.04, ge=0, le=0.1, description="+/- jitter of the centre, as a fraction of the image"
    )
    seed: int = Field(0, description="fixes the held-out combinations and every rendering")

    @field_validator("colours", "shapes", "positions")
    @classmethod
    def _known(cls, values: list[str], info) -> list[str]:
        known = {"colours": COLOURS, "shapes": SHAPE_NAMES, "positions": POSITIONS}[info.field_name]
        bad = [v for v in values if v not in known]
        if bad:
            raise ValueError(f"unknown {info.field_name} {bad}; choose from {list(known)}")
        if len(set(values)) != len(values):
            raise ValueError(f"duplicate {info.field_name} in {values}")
        return values

    @model_validator(mode="after")
    def _fits(self) -> "ShapesSourceParams":
        n = len(self.colours) * len(self.shapes) * len(self.positions)
        if self.heldout_count is not None and self.heldout_count >= n:
            raise ValueError(f"heldout_count {self.heldout_count} leaves no train combination (there are {n})")
        wants_heldout = self.heldout_count if self.heldout_count is not None else self.heldout_fraction > 0
        if n < 2 and wants_heldout:
            raise ValueError("need at least 2 combinations to hold one out (or set heldout_fraction: 0)")
        return self


# ---------------------------------------------------------------------------- emoji

FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
NAMES = "/usr/share/unicode/emoji/emoji-test.txt"


class EmojiSourceParams(Params):
    image_size: int = Field(64, ge=8, le=256, description="square side; 64 keeps glyph detail at CPU-friendly cost")
    caption_template: str = Field(
        "{name}", description="caption format with {name}, {group}, {subgroup}; e.g. 'an emoji of {name}'"
    )
    groups: Optional[list[str]] = Field(
        None, description="keep only these groups (e.g. 'Animals & Nature'); None keeps all"
    )
    subgroups: Optional[list[str]] = Field(
        None, description="keep only these subgroups (e.g. 'face-smiling'); None keeps all"
    )
    font_path: str = Field(FONT, description="NotoColorEmoji.ttf (Debian: fonts-noto-color-emoji)")
    names_path: str = Field(NAMES, description="emoji-test.txt (Debian: unicode-data)")

    @field_validator("caption_template")
    @classmethod
    def _template(cls, value: str) -> str:
        try:
            value.format(name="x", group="x", subgroup="x")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"caption_template may only use {{name}}, {{group}}, {{subgroup}}: {exc}") from exc
        return value


# ---------------------------------------------------------------------------- fashion-mnist

ROOT = "/usr/share/datasets/fashion-mnist"


def check_template(value: str) -> str:
    """A caption template must format with ``{label}`` / ``{a_label}`` and name the class."""
    try:
        value.format(label="x", a_label="a x")
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"template may only use {{label}} and {{a_label}}: {exc}") from exc
    if "{label}" not in value and "{a_label}" not in value:
        raise ValueError(f"template {value!r} must name the class with {{label}} or {{a_label}}")
    return value


class FashionMnistSourceParams(Params):
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
        return check_template(value)

    extra_templates: list[str] = Field(
        default_factory=list,
        description="more caption templates, e.g. 'a black and white photo of {a_label}'; image i uses template i % n",
    )
    judge_seed: int = Field(0, description="seed of the judge's training (the judge is the oracle, not part of the model)")
    judge_epochs: int = Field(2, ge=1, le=50, description="judge training passes over the 60k real training images")

    @field_validator("extra_templates")
    @classmethod
    def _extra_templates(cls, values: list[str]) -> list[str]:
        return [check_template(value) for value in values]


# ---------------------------------------------------------------------------- folder

EXTENSIONS = [".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"]


class FolderSourceParams(Params):
    root: str = Field(..., description="folder holding the images and their .txt captions")
    image_size: int = Field(64, ge=8, le=1024, description="square side every image is cropped and resized to")
    heldout_percent: float = Field(10.0, gt=0, lt=100, description="share of files held out, by path hash (every stage is measured on held-out data)")
    extensions: list[str] = Field(EXTENSIONS, description="image file suffixes to read (case-insensitive)")


# ---------------------------------------------------------------------------- webdataset

URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
MAX_SHARDS = 100_000


def expand(urls: Union[str, list[str]]) -> list[str]:
    """Brace-expanded shard paths (``file:`` dropped), at most :data:`MAX_SHARDS`.

    Checked after expansion: a pattern like ``{pipe:,x}cmd`` names a scheme only once expanded.
    """
    import braceexpand

    out: list[str] = []
    for url in [urls] if isinstance(urls, str) else urls:
        out.extend(itertools.islice(braceexpand.braceexpand(url), MAX_SHARDS + 1 - len(out)))
        if len(out) > MAX_SHARDS:
            raise UsageError(f"data.params: {url[:80]!r} names more than {MAX_SHARDS} shards")
    paths = []
    for path in out:
        scheme = URL_SCHEME.match(path)
        if scheme and scheme.group(1).lower() == "file":
            path = path[len(scheme.group(0)):]
        elif scheme and len(scheme.group(1)) > 1:  # "C:" would be a drive letter elsewhere; a scheme here
            raise ValueError(
                f"{path[:80]!r}: {scheme.group(1)}: names a URL; shards are local files only "
                "(a recipe may not run a command or reach the network): copy the shards to a local folder and give their paths"
            )
        paths.append(path)
    return paths


class WebDatasetSourceParams(Params):
    train_urls: Union[str, list[str]] = Field(..., description="train shards: local path pattern(s) with {a..b}")
    heldout_urls: Optional[Union[str, list[str]]] = Field(
        None, description="held-out shards; None: the source has no held-out split"
    )
    image_keys: list[str] = Field(
        ["png", "jpg", "jpeg", "webp"], min_length=1, description="image extensions to look for, first match wins"
    )
    caption_key: str = Field("txt", description="extension of the caption entry")
    image_size: Optional[int] = Field(
        None, ge=8, le=1024, description="resize to this square side; None keeps the stored size (centre-cropped square)"
    )
    num_workers: int = Field(
        0, ge=0, le=256,
        description="worker processes decoding `samples` (a whole split read once); training uses train.num_workers",
    )

    @field_validator("train_urls", "heldout_urls")
    @classmethod
    def _local_only(cls, urls):
        if urls is not None:
            expand(urls)
        return urls
