"""CLIP's byte-pair encoding (open_clip's bundled vocabulary; works offline)."""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch

from dalle_framework import PAD_ID, CaptionReading, Tokenizer

from .params import ClipBpeTokenizerParams

SHIFT = 1  # BPE id k is token k + 1: CLIP's id 0 is "!", and 0 must mean padding here


@lru_cache(maxsize=1)
def simple_tokenizer():
    """open_clip's SimpleTokenizer (loading the merges takes a second: one per process)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


class ClipBpeTokenizer(Tokenizer):
    """open_clip's ``SimpleTokenizer`` (49,408 BPE ids, lower-cased), shifted by one so 0 is padding.

    ``vocab_size`` = 49,409. By default captions are encoded *without* CLIP's
    start/end tokens, like DALL-E's text block: padding already marks the end and
    the prior learns a separate embedding per padded position. Set
    ``start_end: true`` to wrap each caption in ``<start_of_text> ... <end_of_text>``
    (the end token is kept when truncating).
    """

    Params = ClipBpeTokenizerParams

    def __init__(self, params: Optional["ClipBpeTokenizer.Params"] = None, **runtime) -> None:
        self.params = params or self.Params()
        assert not self.params.start_end or self.params.text_len >= 2, "start_end needs text_len >= 2"
        self.text_len = self.params.text_len
        self.bpe = simple_tokenizer()
        self.vocab_size = len(self.bpe.encoder) + SHIFT
        self.special = {self.bpe.sot_token_id, self.bpe.eot_token_id}

    def encode(self, texts: list[str]) -> torch.Tensor:
        assert not isinstance(texts, str), "encode takes a list of captions"
        out = torch.full((len(texts), self.text_len), PAD_ID, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.bpe.encode(text)
            if self.params.start_end:
                ids = [self.bpe.sot_token_id, *ids[: self.text_len - 2], self.bpe.eot_token_id]
            ids = ids[: self.text_len]
            if ids:
                out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long) + SHIFT
        return out

    def decode(self, ids: torch.Tensor) -> list[str]:
        assert ids.ndim == 2, f"expected [B, T], got {tuple(ids.shape)}"
        texts = []
        for row in ids.tolist():
            bpe = [i - SHIFT for i in row if i != PAD_ID and i - SHIFT not in self.special]
            texts.append(self.bpe.decode(bpe).strip())
        return texts

    def read(self, texts: list[str]) -> list[CaptionReading]:
        extra = 2 if self.params.start_end else 0
        return [CaptionReading(tokens=len(self.bpe.encode(t)) + extra, units=len(t.split())) for t in texts]
