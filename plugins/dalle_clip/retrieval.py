"""Held-out retrieval accuracy for any reranker.

Captions repeat in captioned-shape data ("a red circle in the top left" has many
images), so retrieval runs over the *distinct* captions and an image counts as
retrieved correctly whenever it carries the query caption.
"""

from __future__ import annotations

import torch


def retrieval_accuracy(reranker, images: torch.Tensor, captions: list[str], *, batch_size: int = 256) -> dict[str, float]:
    """Image->text and text->image top-1 / top-5 accuracy.

    ``images[N,3,H,W]`` in [0,1] with their ``captions`` (N strings). Uses
    ``reranker.similarity(images, texts) -> [N, M]`` when it exists, else builds
    the matrix from ``reranker.score`` on all image-caption pairs (any Reranker).

    Returns ``i2t_top1``, ``i2t_top5`` (is the image's caption among the k best of
    the M distinct captions), ``t2i_top1``, ``t2i_top5`` (is one of the k best
    images for a caption an image with that caption), and ``images`` / ``captions``
    (N, M) so chance levels (1/M for i2t) can be read off.
    """
    assert len(images) == len(captions), f"{len(images)} images but {len(captions)} captions"
    distinct = list(dict.fromkeys(captions))
    index = {c: j for j, c in enumerate(distinct)}
    labels = torch.tensor([index[c] for c in captions])  # [N] caption id of each image
    sim = _similarity(reranker, images, distinct, batch_size).float().cpu()  # [N, M]
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


def _similarity(reranker, images: torch.Tensor, texts: list[str], batch_size: int) -> torch.Tensor:
    if hasattr(reranker, "similarity"):
        return reranker.similarity(images, texts)
    # Generic path: score every (image, caption) pair, row-major, in chunks.
    n, m = len(images), len(texts)
    pairs = [(i, j) for i in range(n) for j in range(m)]
    out = torch.empty(n * m)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        idx = torch.tensor([i for i, _ in chunk])
        out[start : start + len(chunk)] = reranker.score(images[idx], [texts[j] for _, j in chunk]).float().cpu()
    return out.view(n, m)
