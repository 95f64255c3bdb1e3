"""A word tokenizer with an explicit vocabulary: tiny, readable, ideal for small caption sets."""

from __future__ import annotations

import re
from typing import Iterable, Optional

import torch
from pydantic import Field, field_validator

from dalle_framework import PAD_ID, CaptionReading, Params, Tokenizer

UNK_ID = 1
_TOKEN = re.compile(r"[\w']+|[^\w\s]")  # words (with apostrophes) or single punctuation marks

# The shapes demo's words: every caption "a <colour> <shape> in the <position>" is in vocabulary.
SHAPES_VOCAB = (
    "a in the red green blue yellow magenta cyan white orange purple "
    "circle square triangle diamond cross top bottom left right middle center"
).split()


def split_words(text: str) -> list[str]:
    """Lower-case, then words and single punctuation marks: ``"Flag: Lebanon" -> ["flag", ":", "lebanon"]``."""
    return _TOKEN.findall(text.lower())


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

    class Params(Params):
        vocab: list[str] = Field(
            SHAPES_VOCAB, min_length=1, description="the words, in id order; default: the shapes demo's words"
        )
        text_len: int = Field(16, ge=1, le=4096, description="tokens per caption; shapes captions need 8")

        @field_validator("vocab")
        @classmethod
        def _clean(cls, vocab: list[str]) -> list[str]:
            bad = [w for w in vocab if split_words(w) != [w]]
            if bad:
                raise ValueError(f"vocab entries must be single lower-case words or punctuation marks: {bad[:5]}")
            dupes = sorted({w for w in vocab if vocab.count(w) > 1})
            if dupes:
                raise ValueError(f"duplicate vocab entries: {dupes[:5]}")
            return vocab

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
