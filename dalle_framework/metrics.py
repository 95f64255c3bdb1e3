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
