"""Image conversions and in-memory splits.

Conventions: a *sample image* is uint8 ``[H, W, 3]`` (numpy, PIL or tensor); a
*model image* is float ``[3, H, W]`` in ``[0, 1]``; batches add a leading ``B``.
"""

from __future__ import annotations

import io
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch
from PIL import Image

from ..errors import UsageError
from ..rundir import atomic_path

ImageLike = Union[np.ndarray, Image.Image, torch.Tensor]
log = logging.getLogger(__name__)


def _as_uint8_hwc(img: ImageLike) -> np.ndarray:
    """Any sample image -> numpy uint8 ``[H, W, 3]``."""
    if isinstance(img, Image.Image):
        return np.asarray(img.convert("RGB"))
    if isinstance(img, torch.Tensor):
        img = img.detach().cpu()
        if img.dtype != torch.uint8:
            raise TypeError(f"expected a uint8 HWC tensor, got {img.dtype}; float CHW images are model images")
        img = img.numpy()
    arr = np.asarray(img)
    assert arr.dtype == np.uint8, f"expected uint8 image, got {arr.dtype}"
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    assert arr.ndim == 3 and arr.shape[2] in (3, 4), f"expected [H, W, 3], got {tuple(arr.shape)}"
    return arr[:, :, :3]


def to_tensor(img: ImageLike) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` (numpy / PIL / tensor) -> float ``[3, H, W]`` in ``[0, 1]``."""
    arr = _as_uint8_hwc(img)
    return torch.from_numpy(arr.astype(np.float32) / 255.0).permute(2, 0, 1).contiguous()


def image_tensor(img: ImageLike) -> torch.Tensor:
    """A sample image (uint8 ``[H, W, 3]``: numpy / PIL / tensor) as a uint8 ``[3, H, W]`` tensor, as batches hold them."""
    return torch.from_numpy(np.ascontiguousarray(_as_uint8_hwc(img))).permute(2, 0, 1).contiguous()


def to_pil(img: Union[ImageLike, torch.Tensor]) -> Image.Image:
    """A sample image, or a model image ``[3, H, W]`` float in ``[0, 1]``, as a PIL RGB image."""
    if isinstance(img, torch.Tensor) and img.dtype != torch.uint8:
        assert img.ndim == 3 and img.shape[0] == 3, f"expected [3, H, W], got {tuple(img.shape)}"
        img = img.detach().cpu().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0)
    return Image.fromarray(_as_uint8_hwc(img), "RGB")


def decode_image(data: bytes) -> np.ndarray:
    """Encoded bytes (png, jpg, webp...) -> uint8 ``[H, W, 3]``; alpha is composited on white."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.mode in ("RGBA", "LA", "P", "PA"):
            im = im.convert("RGBA")
            white = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(white, im)
        return np.array(im.convert("RGB"))


def square_resize(img: ImageLike, size: Optional[int]) -> np.ndarray:
    """Centre-crop to a square, then resize (LANCZOS; BOX when shrinking by an integer) to ``size``.

    ``size=None`` only crops. Returns uint8 ``[size, size, 3]``.
    """
    arr = _as_uint8_hwc(img)
    h, w = arr.shape[:2]
    if h != w:
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        arr = arr[top : top + side, left : left + side]
    if size is None or arr.shape[0] == size:
        return np.ascontiguousarray(arr)
    resample = Image.BOX if arr.shape[0] % size == 0 else Image.LANCZOS
    return np.array(Image.fromarray(arr, "RGB").resize((size, size), resample))


def load_split(
    source: Any, split: str, *, limit: Optional[int] = None, progress: bool = True
) -> tuple[torch.Tensor, list[str]]:
    """Materialise a split in memory: ``(uint8 [N, 3, H, W], captions list[str] of N)``.

    Reads at most ``limit`` samples. All images of a split must share one size
    (every image source resizes to its ``image_size``).
    """
    from ..progress import progress_bar

    total = source.size(split)
    if limit is not None:
        total = limit if total is None else min(total, limit)
    skipped_before = int(getattr(source, "skipped", 0))
    images: list[np.ndarray] = []
    captions: list[str] = []
    bar = progress_bar(total=total, desc=f"{getattr(source, 'name', 'data') or 'data'}/{split}", enabled=progress, unit="img")
    try:
        for sample in source.samples(split):
            if limit is not None and len(images) >= limit:
                break
            arr = _as_uint8_hwc(sample.image)
            if images and arr.shape != images[0].shape:
                raise UsageError(
                    f"{split} sample {sample.key!r} has shape {arr.shape}, expected {images[0].shape}: "
                    "set the data source's image_size so all images share one size"
                )
            images.append(arr)
            captions.append(sample.caption)
            bar.update(1)
    finally:
        bar.close()
    skipped = int(getattr(source, "skipped", 0)) - skipped_before
    if skipped:
        log.warning("%s/%s: skipped %d sample(s) that could not be read (named in the warnings above); kept %d",
                    getattr(source, "name", "data") or "data", split, skipped, len(images))
    if not images:
        return torch.empty(0, 3, 0, 0, dtype=torch.uint8), []
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return batch, captions


def fit_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize float ``[B,3,H,W]`` to ``size x size`` (antialiased bilinear) when it differs."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def as_model_images(images: torch.Tensor, size: int, device: torch.device | str) -> torch.Tensor:
    """uint8 ``[B,3,H,W]`` -> float in [0, 1] on ``device`` at ``size``."""
    return fit_images(images.to(device).float() / 255.0, size)


def split_batches(
    source: Any, split: str, batch_size: int, *, limit: Optional[int] = None, drop_last: bool = False
) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Stream a split as ``(uint8 [B, 3, H, W], captions)`` batches, without holding it all in memory."""
    assert batch_size >= 1, f"batch_size must be >= 1, got {batch_size}"
    images: list[np.ndarray] = []
    captions: list[str] = []
    for i, sample in enumerate(source.samples(split)):
        if limit is not None and i >= limit:
            break
        images.append(_as_uint8_hwc(sample.image))
        captions.append(sample.caption)
        if len(images) == batch_size:
            yield torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), captions
            images, captions = [], []
    if images and not drop_last:
        yield torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), captions


def save_grid(images: torch.Tensor, path: Union[str, os.PathLike], nrow: int = 8, padding: int = 2) -> Path:
    """Write ``images[B, 3, H, W]`` (float in ``[0, 1]`` or uint8) as one PNG grid; returns the path."""
    from torchvision.utils import make_grid

    assert images.ndim == 4 and images.shape[1] == 3, f"expected [B, 3, H, W], got {tuple(images.shape)}"
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    grid = make_grid(images.detach().cpu().clamp(0, 1), nrow=nrow, padding=padding)
    path = Path(path)
    with atomic_path(path) as tmp:
        to_pil(grid).save(tmp, format="PNG")
    return path


def save_image(image: torch.Tensor, path: Union[str, os.PathLike]) -> Path:
    """Write one ``image[3, H, W]`` in ``[0, 1]`` as a PNG, atomically; returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        to_pil(image.detach().cpu().clamp(0, 1)).save(tmp, format="PNG")
    return path


def _default_font(size: int):
    """Pillow's bundled font (no font file needed); older Pillow has only its fixed-size bitmap font."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap of ``text`` to lines at most ``width`` pixels wide (a longer word gets its own line)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def captioned_grid(
    images: torch.Tensor,
    captions: list[str],
    scores: Optional[torch.Tensor] = None,
    *,
    min_cell: int = 64,
    caption_width: int = 180,
    font_size: int = 12,
    padding: int = 4,
) -> Image.Image:
    """One row per caption: the caption (wrapped) on the left, then its images, each with its score below.

    ``images[C, K, 3, H, W]`` (float in ``[0, 1]`` or uint8), ``captions`` of length ``C``,
    ``scores[C, K]`` or None (NaN scores, as without a reranker, are left out). Images
    smaller than ``min_cell`` pixels are scaled up by a whole factor (nearest neighbour) so
    that pixels stay crisp and a score fits under each. Returns an RGB PIL image on white.
    """
    from PIL import ImageDraw

    assert images.ndim == 5 and images.shape[2] == 3, f"expected [C, K, 3, H, W], got {tuple(images.shape)}"
    C, K, _, H, W = images.shape
    assert len(captions) == C, f"{len(captions)} captions for {C} rows of images"
    assert scores is None or tuple(scores.shape) == (C, K), f"scores must be [C={C}, K={K}], got {tuple(scores.shape)}"
    if scores is not None and scores.float().isnan().all():
        scores = None
    scale = max(1, -(-min_cell // max(H, W)))  # ceil: the smallest whole factor reaching min_cell
    cell_h, cell_w = H * scale, W * scale
    font = _default_font(font_size)
    line_h = font_size + 3
    score_h = line_h if scores is not None else 0
    wrapped = [_wrap(c, font, caption_width) for c in captions]
    row_hs = [max(cell_h + score_h, len(lines) * line_h) for lines in wrapped]
    width = padding + caption_width + padding + K * (cell_w + padding)
    canvas = Image.new("RGB", (width, padding + sum(h + padding for h in row_hs)), "white")
    draw = ImageDraw.Draw(canvas)
    top = padding
    for c, (lines, row_h) in enumerate(zip(wrapped, row_hs)):
        for i, line in enumerate(lines):
            draw.text((padding, top + i * line_h), line, fill="black", font=font)
        for k in range(K):
            left = 2 * padding + caption_width + k * (cell_w + padding)
            img = images[c, k]
            img = img.float() / 255.0 if img.dtype == torch.uint8 else img
            canvas.paste(to_pil(img).resize((cell_w, cell_h), Image.NEAREST), (left, top))
            if scores is not None and not math.isnan(float(scores[c, k])):
                draw.text((left, top + cell_h + 1), f"{float(scores[c, k]):.3f}", fill="dimgray", font=font)
        top += row_h + padding
    return canvas


def save_captioned_grid(
    images: torch.Tensor, captions: list[str], path: Union[str, os.PathLike], scores: Optional[torch.Tensor] = None
) -> Path:
    """Write :func:`captioned_grid` as a PNG, atomically; returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        captioned_grid(images, captions, scores).save(tmp, format="PNG")
    return path
