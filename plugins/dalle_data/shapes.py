"""Procedural captioned shapes: the embedded default data set (no files needed).

A coloured shape on a black background, captioned "a red circle in the top left".
Because the generator knows the truth, :meth:`ShapesSource.judge` can check a
generated image against its caption without any model.
"""

from __future__ import annotations

import itertools
import logging
import re
from functools import cached_property
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from dalle_framework import DataSource, Sample

from .params import COLOURS, POSITIONS, SHAPE_NAMES, ShapesSourceParams

log = logging.getLogger(__name__)


# Each shape draws itself filling (roughly) the box of side ``s`` centred on (cx, cy).
def _circle(draw: ImageDraw.ImageDraw, cx: float, cy: float, s: float, fill) -> None:
    draw.ellipse([cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2], fill=fill)


def _square(draw: ImageDraw.ImageDraw, cx: float, cy: float, s: float, fill) -> None:
    half = 0.45 * s  # a little smaller than the circle's box so both look the same size
    draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=fill)


def _triangle(draw: ImageDraw.ImageDraw, cx: float, cy: float, s: float, fill) -> None:
    h = 0.87 * s  # equilateral; the centroid sits on (cx, cy)
    draw.polygon([(cx, cy - 2 * h / 3), (cx - s / 2, cy + h / 3), (cx + s / 2, cy + h / 3)], fill=fill)


def _diamond(draw: ImageDraw.ImageDraw, cx: float, cy: float, s: float, fill) -> None:
    draw.polygon([(cx, cy - s / 2), (cx + s / 2, cy), (cx, cy + s / 2), (cx - s / 2, cy)], fill=fill)


def _cross(draw: ImageDraw.ImageDraw, cx: float, cy: float, s: float, fill) -> None:
    arm = s / 6
    draw.rectangle([cx - s / 2, cy - arm, cx + s / 2, cy + arm], fill=fill)
    draw.rectangle([cx - arm, cy - s / 2, cx + arm, cy + s / 2], fill=fill)


SHAPES = dict(zip(SHAPE_NAMES, (_circle, _square, _triangle, _diamond, _cross), strict=True))

_CAPTION = re.compile(r"^an? (?P<colour>[a-z]+) (?P<shape>[a-z]+) in the (?P<position>[a-z ]+)$")


def caption_for(colour: str, shape: str, position: str) -> str:
    """``("red", "circle", "top left") -> "a red circle in the top left"``."""
    return f"a {colour} {shape} in the {position}"


def parse_caption(caption: str) -> Optional[dict[str, str]]:
    """``"a red circle in the top left" -> {"colour": "red", "shape": "circle", "position": "top left"}``.

    Returns None when the caption is not of that form or names an unknown value.
    """
    match = _CAPTION.match(" ".join(caption.lower().split()))
    if not match:
        return None
    parts = match.groupdict()
    known = (parts["colour"] in COLOURS, parts["shape"] in SHAPES, parts["position"] in POSITIONS)
    return parts if all(known) else None


class ShapesSource(DataSource):
    """Coloured shapes on black, captioned "a <colour> <shape> in the <position>".

    Split: a deterministic (given ``seed``) subset of (colour, shape, position)
    combinations is held out: ``heldout_count`` of them, else ``heldout_fraction``
    (rounded, at least one unless 0), chosen so that every single colour, shape
    and position still appears in train (fewer are held out, with a warning,
    when that is impossible). Train
    holds ``samples_per_caption`` renderings of every other combination; held-out
    holds ``heldout_samples_per_caption`` renderings of each held-out combination.
    Order: round-robin over combinations (sample ``i`` is combination
    ``i % n_combos``), so any prefix covers all captions. Sizes and positions are
    jittered per sample from a generator seeded by ``(seed, split)``.
    """

    Params = ShapesSourceParams

    def __init__(self, params: Optional["ShapesSource.Params"] = None, **runtime) -> None:
        self.params = params or self.Params()
        self.skipped = 0
        self.image_size = self.params.image_size

    # ------------------------------------------------------------------ split

    @cached_property
    def combos(self) -> dict[str, list[tuple[str, str, str]]]:
        """``{"train": [...], "heldout": [...]}`` lists of (colour, shape, position)."""
        p = self.params
        every = list(itertools.product(p.colours, p.shapes, p.positions))
        if p.heldout_count is not None:
            n_held = p.heldout_count
        else:
            n_held = 0 if p.heldout_fraction == 0 else max(1, round(p.heldout_fraction * len(every)))
        order = np.random.default_rng([p.seed, 7]).permutation(len(every))
        held: list[tuple[str, str, str]] = []
        for i in order:
            if len(held) == n_held:
                break
            candidate = held + [every[i]]
            train = [c for c in every if c not in candidate]
            # keep a combo out only if train still shows each of its values at least once
            if all({c[k] for c in train} == set(v[k] for v in every) for k in range(3)):
                held = candidate
        if len(held) < n_held:
            log.warning("shapes: held out %d of %d requested combinations (train must show every value)", len(held), n_held)
        held_set = set(held)
        return {"train": [c for c in every if c not in held_set], "heldout": sorted(held, key=every.index)}

    def size(self, split: str) -> int:
        per = self.params.samples_per_caption if split == "train" else self.params.heldout_samples_per_caption
        return len(self.combos[split]) * per

    def captions(self, split: str) -> list[str]:
        return [caption_for(*c) for c in self.combos[split]]

    # ------------------------------------------------------------------ rendering

    def render(
        self, colour: str, shape: str, position: str, size: float = 1.0, dx: float = 0.0, dy: float = 0.0
    ) -> np.ndarray:
        """One image, uint8 ``[S, S, 3]``: drawn at 4x then box-downsampled (anti-aliasing).

        ``size`` scales the shape; ``dx, dy`` shift the centre (fractions of the image).
        """
        side = self.params.image_size
        big = 4 * side
        canvas = Image.new("RGB", (big, big), (0, 0, 0))
        px, py = POSITIONS[position]
        SHAPES[shape](
            ImageDraw.Draw(canvas),
            (px + dx) * big,
            (py + dy) * big,
            self.params.shape_size * size * big,
            COLOURS[colour],
        )
        return np.array(canvas.resize((side, side), Image.BOX))

    def samples(self, split: str) -> Iterator[Sample]:
        assert split in ("train", "heldout"), f"split must be 'train' or 'heldout', got {split!r}"
        p = self.params
        combos = self.combos[split]
        n = self.size(split)
        rng = np.random.default_rng([p.seed, 1 if split == "train" else 2])
        sizes = 1.0 + rng.uniform(-p.size_jitter, p.size_jitter, n)
        shifts = rng.uniform(-p.position_jitter, p.position_jitter, (n, 2))
        for i in range(n):
            colour, shape, position = combos[i % len(combos)]
            image = self.render(colour, shape, position, sizes[i], shifts[i, 0], shifts[i, 1])
            meta = {"colour": colour, "shape": shape, "position": position}
            yield Sample(image=image, caption=caption_for(colour, shape, position), key=f"{split}-{i:06d}", meta=meta)

    # ------------------------------------------------------------------ oracle

    @cached_property
    def _templates(self) -> torch.Tensor:
        """``[n_shapes, 16, 16]`` mean canonical masks (see ``_canonical``) of each configured shape."""
        rng = np.random.default_rng(12345)
        p = self.params
        out = []
        for shape in p.shapes:
            imgs = [
                self.render(
                    "white",
                    shape,
                    "center",
                    1 + rng.uniform(-p.size_jitter, p.size_jitter),
                    *rng.uniform(-0.02, 0.02, 2),
                )
                for _ in range(8)
            ]
            images = torch.from_numpy(np.stack(imgs)).float().div(255).permute(0, 3, 1, 2)
            out.append(torch.stack([_canonical(_foreground(im)) for im in images]).mean(0))
        return torch.stack(out)

    def _judged_size(self, images: torch.Tensor) -> torch.Tensor:
        images = images.detach().float().cpu().clamp(0, 1)
        if images.shape[-1] != self.params.image_size or images.shape[-2] != self.params.image_size:
            images = F.interpolate(images, size=(self.params.image_size,) * 2, mode="area")
        return images

    def _measure(self, image: torch.Tensor) -> Optional[dict[str, torch.Tensor]]:
        """What the oracle reads from one ``image[3, S, S]``: mean solid colour, centroid, area and
        canonical mask (see :meth:`judge`); None when it has no foreground."""
        weight = _foreground(image)
        if weight.sum() < 1.0:
            return None
        solid = weight >= 0.99
        pick = solid if solid.sum() >= 1 else weight > 0
        side = image.shape[-1]
        coords = (torch.arange(side, dtype=torch.float32) + 0.5) / side
        total = weight.sum()
        centroid = torch.stack([(weight.sum(0) * coords).sum() / total, (weight.sum(1) * coords).sum() / total])
        return {"colour": image[:, pick].mean(1), "centroid": centroid, "area": total / side**2, "mask": _canonical(weight)}

    def judge(self, images: torch.Tensor, captions: list[str]) -> dict[str, list[bool]]:
        """Check ``images[B, 3, H, W]`` (float in ``[0, 1]``) against their captions, without a model.

        - foreground: pixels whose brightest channel is far from the black background
        - colour: nearest configured palette colour to the mean of solid foreground pixels
        - position: nearest configured position centre to the foreground centroid
        - shape: best match (soft IoU) of the mask, centred and scaled by its area, with templates
        A caption that does not parse, or an image without foreground, fails everything.
        Returns ``{"colour", "shape", "position", "all"}`` -> list of B bools.
        """
        assert images.ndim == 4 and images.shape[1] == 3, f"expected [B, 3, H, W], got {tuple(images.shape)}"
        assert len(captions) == images.shape[0], f"{len(captions)} captions for {images.shape[0]} images"
        images = self._judged_size(images)
        p = self.params
        palette = torch.tensor([COLOURS[c] for c in p.colours], dtype=torch.float32) / 255
        centres = torch.tensor([POSITIONS[q] for q in p.positions], dtype=torch.float32)
        verdict: dict[str, list[bool]] = {"colour": [], "shape": [], "position": [], "all": []}
        for image, caption in zip(images, captions):
            truth = parse_caption(caption)
            seen = self._measure(image)
            if truth is None or seen is None:
                for key in verdict:
                    verdict[key].append(False)
                continue
            colour = p.colours[int(torch.cdist(seen["colour"][None], palette).argmin())]
            position = p.positions[int(torch.cdist(seen["centroid"][None], centres).argmin())]
            mask = seen["mask"]
            iou = torch.minimum(mask, self._templates).sum((1, 2)) / torch.maximum(mask, self._templates).sum((1, 2))
            shape = p.shapes[int(iou.argmax())]
            ok = {
                "colour": colour == truth["colour"],
                "shape": shape == truth["shape"],
                "position": position == truth["position"],
            }
            ok["all"] = all(ok.values())
            for key in verdict:
                verdict[key].append(bool(ok[key]))
        return verdict

    def judge_features(self, images: torch.Tensor) -> torch.Tensor:
        """The oracle's measurements as ``[B, 70]``: mean solid colour (3), centroid (2), sqrt of the area (1)
        and the canonical mask pooled to 8x8 (64); zeros for an image without foreground."""
        rows = []
        for image in self._judged_size(images):
            seen = self._measure(image)
            if seen is None:
                rows.append(torch.zeros(70))
                continue
            mask = F.adaptive_avg_pool2d(seen["mask"][None, None], 8).flatten()
            rows.append(torch.cat([seen["colour"], seen["centroid"], seen["area"].sqrt()[None], mask]))
        return torch.stack(rows) if rows else torch.zeros(0, 70)

    def judge_identity(self) -> dict:
        return {
            "sha256": None,
            "rule": "shapes oracle measurements v1: colour, centroid, sqrt(area), canonical mask 8x8",
            "resize": {"filter": "area", "size": self.params.image_size},
        }


def _foreground(image: torch.Tensor) -> torch.Tensor:
    """Soft foreground mask ``[H, W]`` of ``image[3, H, W]``: 0 for the black background, 1 when the
    brightest channel is >= 0.65 (every palette colour has a full channel); noise below 0.35 is ignored."""
    return ((image.amax(0) - 0.35) / 0.3).clamp(0, 1)


def _canonical(mask: torch.Tensor, size: int = 16, reach: float = 1.1) -> torch.Tensor:
    """Resample a soft mask ``[H, W]`` to ``[size, size]`` centred on its centroid, spanning
    ``+/- reach * sqrt(area)``: a frame that ignores position and scale and, unlike a
    bounding box, is not thrown off by a few stray pixels (centroid and area are integrals)."""
    area = mask.sum()
    if area < 1.0:
        return torch.zeros(size, size)
    h, w = mask.shape
    ys, xs = torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32)
    cy, cx = (mask.sum(1) * ys).sum() / area, (mask.sum(0) * xs).sum() / area
    offsets = torch.linspace(-reach, reach, size) * area.sqrt()
    # grid_sample wants x, y in [-1, 1] (align_corners=True maps -1/1 to the first/last pixel)
    gy = (cy + offsets) / (h - 1) * 2 - 1
    gx = (cx + offsets) / (w - 1) * 2 - 1
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)[None]
    return F.grid_sample(mask[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0, 0]
