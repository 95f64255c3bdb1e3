"""Image and codebook metrics shared by codecs, benchmarks and evaluation."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in ``[0, 1]`` (mean squared error over all pixels).

    ``a``, ``b``: same shape, e.g. ``[B, 3, H, W]``. Identical images give ``inf``.
    """
    assert a.shape == b.shape, f"psnr needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}"
    mse = torch.mean((a.detach().double() - b.detach().double()) ** 2).item()
    return math.inf if mse == 0 else psnr_from_mse(mse)


def psnr_from_mse(mse: "float | torch.Tensor") -> "float | torch.Tensor":
    """PSNR in dB of pixels in ``[0, 1]`` from mean squared errors (a float, or a tensor of them
    element-wise); an error below 1e-10 counts as 1e-10 (100 dB), so an exact match stays finite."""
    if isinstance(mse, torch.Tensor):
        return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))
    return 10 * math.log10(1.0 / max(mse, 1e-10))


def codebook_usage(tokens: torch.Tensor, vocab_size: int) -> dict[str, float]:
    """How much of a codebook a set of tokens uses.

    ``tokens``: LongTensor of any shape with values in ``[0, vocab_size)``.
    Returns ``usage`` (fraction of codes seen at least once), ``used`` (count) and
    ``perplexity`` (exp of the entropy of the code histogram; = vocab_size when uniform).
    """
    flat = tokens.detach().reshape(-1).long()
    assert flat.numel() > 0, "codebook_usage needs at least one token"
    assert int(flat.min()) >= 0 and int(flat.max()) < vocab_size, "tokens out of [0, vocab_size)"
    return histogram_usage(torch.bincount(flat.cpu(), minlength=vocab_size))


def histogram_usage(counts: torch.Tensor) -> dict[str, float]:
    """:func:`codebook_usage` from a histogram of codes (``counts[vocab_size]``, e.g. summed over ranks)."""
    counts = counts.double()
    p = counts / counts.sum().clamp_min(1e-12)
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    used = int((counts > 0).sum())
    return {"usage": used / len(counts), "used": float(used), "perplexity": math.exp(entropy)}


def retrieval_accuracy(similarity, images: torch.Tensor, captions: list[str]) -> dict[str, float]:
    """Image->text and text->image top-1 / top-5 accuracy over the *distinct* captions.

    ``similarity(images[N], texts[M]) -> [N, M]`` scores every image against
    every distinct caption. Captions repeat in captioned-shape data, so an image
    counts as retrieved whenever it carries the query caption. Returns
    ``i2t_top1``, ``i2t_top5`` (is the image's caption among the k best),
    ``t2i_top1``, ``t2i_top5`` (is one of the k best images for a caption an
    image with that caption), and ``images`` / ``captions`` (N, M) so chance
    levels (1/M for i2t) can be read off.
    """
    assert len(images) == len(captions), f"{len(images)} images but {len(captions)} captions"
    distinct = list(dict.fromkeys(captions))
    index = {c: j for j, c in enumerate(distinct)}
    labels = torch.tensor([index[c] for c in captions])  # [N] caption id of each image
    sim = similarity(images, distinct).float().cpu()  # [N, M]
    n, m = sim.shape

    def hits(k: int) -> tuple[float, float]:
        text_top = sim.topk(min(k, m), dim=1).indices  # [N, k] best captions per image
        i2t = (text_top == labels[:, None]).any(1).float().mean().item()
        image_top = sim.topk(min(k, n), dim=0).indices  # [k, M] best images per caption
        t2i = (labels[image_top] == torch.arange(m)[None, :]).any(0).float().mean().item()
        return i2t, t2i

    i2t1, t2i1 = hits(1)
    i2t5, t2i5 = hits(5)
    return {"i2t_top1": i2t1, "i2t_top5": i2t5, "t2i_top1": t2i1, "t2i_top5": t2i5, "images": n, "captions": m}


def flops_per_token(non_embedding: int, *, n_layers: Optional[int], seq_len: int, d_attn: Optional[int], attended: Optional[float] = None) -> dict[str, Any]:
    """Forward and training FLOPs per token of a decoder (Kaplan et al. 2020, table 1).

    One multiply-add is 2 FLOPs: ``forward = 2 * N + 2 * n_layers * n_ctx * d_attn``,
    ``train = 3 * forward`` (backward costs about twice the forward). ``N`` counts
    non-embedding parameters (lookups cost no multiply-adds). The attention term
    uses ``n_ctx = 2 * attended``, the mean number of keys a query sees (``seq_len``
    for dense causal attention, less for sparse masks); unknown shapes give 2N.
    """
    context = 2 * attended if attended is not None else seq_len
    attention = 2 * n_layers * context * d_attn if n_layers and d_attn else 0
    forward = 2 * non_embedding + attention
    return {
        "forward": forward,
        "train": 3 * forward,
        "attention_forward": attention,
        "formula": "forward = 2*N_non_embedding + 2*n_layers*n_ctx*d_attn (n_ctx = 2 * mean keys per query); train = 3*forward",
        "n_layers": n_layers,
        "d_attn": d_attn,
        "seq_len": seq_len,
    }


# ----------------------------------------------------------------------------- distribution metrics
#
# Features are float tensors ``[N, D]``; every statistic is computed in float64 on the CPU,
# so a figure does not depend on the device that extracted the features.


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (divided by N - 1) of ``features[N, D]``."""
    x = features.detach().double().cpu()
    assert x.ndim == 2 and len(x) >= 2, f"need features [N >= 2, D], got {tuple(x.shape)}"
    mean = x.mean(0)
    centred = x - mean
    return mean, centred.T @ centred / (len(x) - 1)


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix (tiny negative eigenvalues clipped)."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(mean_a: torch.Tensor, cov_a: torch.Tensor, mean_b: torch.Tensor, cov_b: torch.Tensor) -> float:
    """Fréchet distance between the Gaussians ``N(mean_a, cov_a)`` and ``N(mean_b, cov_b)`` (Heusel et al. 2017).

    ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))``. The trace of the square
    root is taken from the eigenvalues of the symmetric ``S_a^(1/2) S_b S_a^(1/2)``, which has
    the same spectrum as ``S_a S_b`` and stays real where a general matrix square root of
    ``S_a S_b`` (singular when there are fewer samples than dimensions) goes complex.
    """
    mean_a, mean_b, cov_a, cov_b = (t.detach().double().cpu() for t in (mean_a, mean_b, cov_a, cov_b))
    root_a = _sqrt_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    value = (mean_a - mean_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt
    return float(value)


def frechet_distance_of(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between the Gaussians fitted to ``a[N, D]`` and ``b[M, D]``."""
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


def _polynomial_mmd2(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2 of two equal-size samples under the kernel ``(x.y / D + 1)^3``."""
    d = x.shape[1]
    k_xx, k_yy, k_xy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    m = len(x)
    off_diagonal = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return float(off_diagonal - 2 * k_xy.mean())


def kernel_inception_distance(
    a: torch.Tensor, b: torch.Tensor, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> dict[str, float]:
    """KID (Binkowski et al. 2018): the unbiased MMD^2 with a cubic polynomial kernel, averaged over random subsets.

    Each of ``subsets`` draws ``min(subset_size, N, M)`` rows of each set without replacement
    (seeded); returns ``kid`` (the mean), ``std`` (the standard deviation over subsets, as
    the field reports it), ``stderr`` (std / sqrt(subsets)) and ``subset_size``. Unbiased:
    two samples of one distribution give 0 on average, negative values included.
    """
    x, y = a.detach().double().cpu(), b.detach().double().cpu()
    size = min(subset_size, len(x), len(y))
    assert size >= 2, f"KID needs at least 2 samples in each set, got {len(x)} and {len(y)}"
    generator = torch.Generator().manual_seed(seed)
    values = torch.tensor(
        [
            _polynomial_mmd2(x[torch.randperm(len(x), generator=generator)[:size]], y[torch.randperm(len(y), generator=generator)[:size]])
            for _ in range(subsets)
        ],
        dtype=torch.float64,
    )
    std = float(values.std()) if subsets > 1 else 0.0
    return {"kid": float(values.mean()), "std": std, "stderr": std / math.sqrt(subsets), "subset_size": size}


def _kth_neighbour_distance(x: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """Distance of each row of ``x`` to its ``k``-th nearest other row."""
    out = []
    for start in range(0, len(x), chunk):
        d = torch.cdist(x[start : start + chunk], x)
        out.append(d.kthvalue(k + 1, dim=1).values)  # the 0 to itself is the first
    return torch.cat(out)


def _within(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """``[Q, C]``-reduced counts: for each query, how many balls ``(centres, radii)`` contain it."""
    counts = []
    for start in range(0, len(queries), chunk):
        d = torch.cdist(queries[start : start + chunk], centres)
        counts.append((d <= radii[None]).sum(1))
    return torch.cat(counts)


def neighbourhood_scores(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> dict[str, torch.Tensor]:
    """Per-sample quantities behind precision/recall (Kynkäänniemi et al. 2019) and density/coverage (Naeem et al. 2020).

    Each real sample's ball reaches its ``k``-th nearest real neighbour; each fake one's its
    ``k``-th nearest fake neighbour. Returns, per fake sample, ``precision`` (in some real
    ball: 0/1) and ``density`` (real balls containing it, / k), and per real sample ``recall``
    (in some fake ball) and ``coverage`` (its nearest fake sample inside its own ball). The
    four figures are the means of these; keeping them per sample lets intervals resample them.
    """
    r, f = real.detach().float().cpu(), fake.detach().float().cpu()
    assert len(r) > k and len(f) > k, f"need more than k={k} real and fake samples, got {len(r)} and {len(f)}"
    real_radii, fake_radii = _kth_neighbour_distance(r, k), _kth_neighbour_distance(f, k)
    in_real = _within(f, r, real_radii)
    nearest_fake = torch.cat([torch.cdist(r[s : s + 2048], f).min(1).values for s in range(0, len(r), 2048)])
    return {
        "precision": (in_real > 0).double(),
        "density": in_real.double() / k,
        "recall": (_within(r, f, fake_radii) > 0).double(),
        "coverage": (nearest_fake <= real_radii).double(),
    }


# ----------------------------------------------------------------------------- intervals


def normal_quantile(level: float) -> float:
    """``z`` with ``P(|Z| <= z) = level`` for a standard normal ``Z`` (1.96 for 0.95)."""
    assert 0 < level < 1, f"level must be in (0, 1), got {level}"
    return math.sqrt(2) * float(torch.erfinv(torch.tensor(level, dtype=torch.float64)))


def wilson_interval(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial share ``successes / trials`` (Wilson 1927).

    Unlike the normal approximation it stays inside [0, 1] and does not collapse to a point
    at 0 or n successes (40 of 40 gives [0.912, 1] at 95%). ``trials=0`` gives [0, 1].
    """
    if trials == 0:
        return 0.0, 1.0
    z = normal_quantile(level)
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z / (1 + z * z / trials) * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(
    statistic, *sizes: int, resamples: int = 200, level: float = 0.95, seed: int = 0, centre: Optional[float] = None
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(*indices)``, each set of ``sizes`` resampled with replacement.

    ``statistic(index_1, index_2, ...) -> float`` recomputes the figure on the groups each
    ``LongTensor[size_i]`` names: a group is one caption's draw for generated images (its
    candidates stay together, so their correlation is kept) or one real image. Resampling
    both sides of a two-sample figure counts the reference set's own noise too.
    With ``centre`` the interval is the bootstrap's spread around it (its quantiles shifted so
    that their median is ``centre``), for a figure whose resamples are biased: FD and KID
    of a resample with repeated images run high, and a plain percentile interval would miss
    the estimate itself. Deterministic for a ``seed``; non-finite resamples are dropped.
    """
    generator = torch.Generator().manual_seed(seed)
    values = torch.tensor(
        [statistic(*(torch.randint(0, n, (n,), generator=generator) for n in sizes)) for _ in range(resamples)],
        dtype=torch.float64,
    )
    values = values[values.isfinite()]
    if len(values) == 0:
        return math.nan, math.nan
    tail = (1 - level) / 2
    shift = 0.0 if centre is None else centre - float(values.median())
    return float(values.quantile(tail)) + shift, float(values.quantile(1 - tail)) + shift


def activation_bytes(
    *, layers: int, dim: int, tokens: int, batch: int, bytes_per_value: int, checkpointing: bool,
    mlp_ratio: float = 4.0, extra_per_layer: float = 0.0, logits: int = 0,
) -> int:
    """What backward keeps of one micro-batch of a transformer, in bytes (an estimate).

    Per layer and token, after Korthikanti et al. 2022 (section 4.1) with attention
    scores not stored (SDPA's fused kernels recompute them): the attention block keeps
    ``5 * dim`` values (its input, q, k, v, the output projection's input), the MLP
    ``(1 + 2 * mlp_ratio) * dim`` (its input, the hidden layer before and after the
    nonlinearity), each LayerNorm ``dim``, two dropout masks ``dim`` bytes each;
    ``extra_per_layer`` adds values per ``dim`` (sandwich norms, cross-attention).
    With ``checkpointing`` only each layer's input stays, plus one layer recomputed.
    ``logits`` (vocabulary entries per token) adds the fp32 logits and their gradient.
    """
    values = (5 + 1 + 2 * mlp_ratio + 2 + extra_per_layer) * dim
    per_layer = tokens * batch * (values * bytes_per_value + 2 * dim)
    if checkpointing:
        kept = layers * tokens * batch * dim * bytes_per_value + per_layer
    else:
        kept = layers * per_layer
    return int(kept + 2 * 4 * tokens * batch * logits)
