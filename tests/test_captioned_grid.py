"""Grids with their captions beside each row and reranker scores under each image."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from dalle_framework.data import captioned_grid, save_captioned_grid

COLOURS = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.6, 0.0], [0.0, 0.0, 1.0]])


def solid(C: int, K: int, size: int = 16) -> torch.Tensor:
    """``[C, K, 3, size, size]``: image k of every row is COLOURS[k]."""
    return COLOURS[:K, :, None, None].expand(K, 3, size, size).expand(C, K, 3, size, size).clone()


def ink(region: np.ndarray) -> bool:
    """Anything but white in an ``[h, w, 3]`` region (text was drawn)."""
    return bool((region < 200).any())


def test_rows_hold_caption_images_and_scores():
    scores = torch.tensor([[0.9, 0.5, 0.1], [math.nan] * 3])
    grid = np.asarray(captioned_grid(solid(2, 3), ["a red circle", "a blue square"], scores, padding=4, caption_width=180))
    cell, score_h, pad = 64, 15, 4  # 16 px images scaled x4 (nearest); one text line under each
    assert grid.shape == (pad + 2 * (cell + score_h + pad), pad + 180 + pad + 3 * (cell + pad), 3)
    for row in range(2):
        top = pad + row * (cell + score_h + pad)
        assert ink(grid[top : top + 15, pad : pad + 180]), "caption text beside the row"
        for k in range(3):
            left = 2 * pad + 180 + k * (cell + pad)
            expected = (COLOURS[k] * 255).round().numpy().astype(np.uint8)
            assert (grid[top : top + cell, left : left + cell] == expected).all(), (row, k)
            below = grid[top + cell + 1 : top + cell + score_h, left : left + cell]
            assert ink(below) == (row == 0), "a score under each scored image, none for NaN"


def test_without_scores_rows_are_shorter_and_long_captions_wrap():
    plain = captioned_grid(solid(1, 2), ["a red circle"])
    nan_scores = captioned_grid(solid(1, 2), ["a red circle"], torch.full((1, 2), math.nan))
    assert plain.size == nan_scores.size == (4 + 180 + 4 + 2 * 68, 4 + 64 + 4)
    long = " ".join(["a very long caption"] * 12)
    wrapped = captioned_grid(solid(1, 2), [long])
    assert wrapped.size[0] == plain.size[0] and wrapped.size[1] > plain.size[1]
    big = captioned_grid(solid(1, 1, size=100), ["x"])  # already over min_cell: not scaled
    assert big.size == (4 + 180 + 4 + 104, 4 + 100 + 4)


def test_uint8_images_and_saving(tmp_path):
    images = (solid(2, 1) * 255).to(torch.uint8)
    path = save_captioned_grid(images, ["one", "two"], tmp_path / "sub" / "grid.png", scores=torch.tensor([[1.0], [2.0]]))
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == captioned_grid(images, ["one", "two"], torch.tensor([[1.0], [2.0]])).size
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no temporary file left behind
