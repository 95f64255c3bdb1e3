"""Codebook helpers: nearest-code lookup and sampling of vectors for (re-)initialisation."""

from __future__ import annotations

import math

from typing import Optional

import torch


def nearest_code(vectors: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code (squared L2) for each row.

    vectors ``[N, D]``, codebook ``[K, D]`` -> LongTensor ``[N]``.
    Uses ``|v|^2 - 2 v.c + |c|^2`` (one matmul, no ``[N, K, D]`` tensor).
    """
    assert vectors.dim() == 2 and codebook.dim() == 2, "nearest_code wants [N, D] and [K, D]"
    assert vectors.shape[1] == codebook.shape[1], f"dims differ: {vectors.shape[1]} vs {codebook.shape[1]}"
    distance = (
        vectors.pow(2).sum(1, keepdim=True)
        - 2 * vectors @ codebook.t()
        + codebook.pow(2).sum(1)[None, :]
    )
    return distance.argmin(dim=1)


def sample_rows(vectors: torch.Tensor, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``n`` rows drawn from ``vectors [N, D]`` (without replacement when N >= n) -> ``[n, D]``."""
    assert vectors.shape[0] > 0, "need at least one vector to sample from"
    if vectors.shape[0] >= n:
        idx = torch.randperm(vectors.shape[0], generator=generator, device="cpu")[:n]
    else:
        idx = torch.randint(vectors.shape[0], (n,), generator=generator, device="cpu")
    return vectors[idx.to(vectors.device)]


def token_grid(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A codec's flat tokens ``[B, h*w]`` as the grid its decoder reads: LongTensor ``[B, h, w]``."""
    h, w = grid
    assert tokens.shape[-1] == h * w, f"expected {h * w} tokens per image, got {tokens.shape[-1]}"
    return tokens.long().reshape(*tokens.shape[:-1], h, w)


def kl_to_uniform(probs: torch.Tensor, log_probs: torch.Tensor, dim: int) -> torch.Tensor:
    """KL(q || uniform over the ``K`` entries of ``dim``) = ``sum_k q log q + log K``, reducing ``dim``."""
    return (probs * log_probs).sum(dim=dim) + math.log(probs.shape[dim])


def check_images(images: torch.Tensor, image_size: int) -> None:
    """A codec's input: float ``[B, 3, image_size, image_size]``; anything else is named."""
    assert images.dim() == 4 and images.shape[1] == 3, f"images must be [B,3,H,W], got {tuple(images.shape)}"
    assert images.shape[-1] == image_size, f"codec expects {image_size}px images, got {images.shape[-1]}"
