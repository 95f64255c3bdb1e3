"""Image and codebook metrics shared by codecs, benchmarks and evaluation."""

from __future__ import annotations

import math

import torch


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in ``[0, 1]`` (mean squared error over all pixels).

    ``a``, ``b``: same shape, e.g. ``[B, 3, H, W]``. Identical images give ``inf``.
    """
    assert a.shape == b.shape, f"psnr needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}"
    mse = torch.mean((a.detach().double() - b.detach().double()) ** 2).item()
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def codebook_usage(tokens: torch.Tensor, vocab_size: int) -> dict[str, float]:
    """How much of a codebook a set of tokens uses.

    ``tokens``: LongTensor of any shape with values in ``[0, vocab_size)``.
    Returns ``usage`` (fraction of codes seen at least once), ``used`` (count) and
    ``perplexity`` (exp of the entropy of the code histogram; = vocab_size when uniform).
    """
    flat = tokens.detach().reshape(-1).long()
    assert flat.numel() > 0, "codebook_usage needs at least one token"
    assert int(flat.min()) >= 0 and int(flat.max()) < vocab_size, "tokens out of [0, vocab_size)"
    counts = torch.bincount(flat.cpu(), minlength=vocab_size).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    used = int((counts > 0).sum())
    return {"usage": used / vocab_size, "used": float(used), "perplexity": math.exp(entropy)}
