"""A word tokenizer with an explicit vocabulary: tiny, readable, ideal for small caption sets."""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from dalle_framework import PAD_ID, CaptionReading, Tokenizer

from .params import WordTokenizerParams, split_words

UNK_ID = 1


def vocab_from_captions(captions: Iterable[str], min_count: int = 1) -> list[str]:
    """The words of ``captions`` seen at least ``min_count`` times, most frequent first (ties: alphabetical)."""
    counts: dict[str, int] = {}
    for caption in captions:
        for word in split_words(caption):
            counts[word] = counts.get(word, 0) + 1
    return [w for w, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c >= min_count]


class WordTokenizer(Tokenizer):
    """Lower-cased word / punctuation tokens from an explicit vocabulary.

    Ids: 0 = padding, 1 = unknown word, then ``vocab`` in order (``vocab[i]`` is id ``i + 2``).
    ``encode(list[str]) -> LongTensor[B, text_len]``; ``decode`` joins words with spaces
    (unknown words read ``<unk>``).
    """

    Params = WordTokenizerParams

    def __init__(self, params: Optional["WordTokenizer.Params"] = None, **runtime) -> None:
        self.params = params or self.Params()
        self.text_len = self.params.text_len
        self.words = ["<pad>", "<unk>", *self.params.vocab]
        self.ids = {w: i for i, w in enumerate(self.words) if i > UNK_ID}
        self.vocab_size = len(self.words)

    def encode(self, texts: list[str]) -> torch.Tensor:
        assert not isinstance(texts, str), "encode takes a list of captions"
        out = torch.full((len(texts), self.text_len), PAD_ID, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.ids.get(w, UNK_ID) for w in split_words(text)][: self.text_len]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids: torch.Tensor) -> list[str]:
        assert ids.ndim == 2, f"expected [B, T], got {tuple(ids.shape)}"
        return [" ".join(self.words[i] for i in row.tolist() if i != PAD_ID) for row in ids]

    def read(self, texts: list[str]) -> list[CaptionReading]:
        readings = []
        for text in texts:
            words = split_words(text)
            readings.append(CaptionReading(tokens=len(words), units=len(words), unknown_words=[w for w in words if w not in self.ids]))
        return readings
