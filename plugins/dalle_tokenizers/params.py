"""The tokenizers' settings, importable without torch: recipes are checked with them alone."""

from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import Field, field_validator

from dalle_framework import Params

_TOKEN = re.compile(r"[\w']+|[^\w\s]")  # words (with apostrophes) or single punctuation marks
BYTES = 256  # byte-level alphabet: every UTF-8 byte is a token before any merge

# The shapes demo's words: every caption "a <colour> <shape> in the <position>" is in vocabulary.
SHAPES_VOCAB = (
    "a in the red green blue yellow magenta cyan white orange purple "
    "circle square triangle diamond cross top bottom left right middle center"
).split()


def split_words(text: str) -> list[str]:
    """Lower-case, then words and single punctuation marks: ``"Flag: Lebanon" -> ["flag", ":", "lebanon"]``."""
    return _TOKEN.findall(text.lower())


class WordTokenizerParams(Params):
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


class ByteTokenizerParams(Params):
    text_len: int = Field(64, ge=1, le=4096, description="bytes per caption; 64 covers most short captions")


class ClipBpeTokenizerParams(Params):
    text_len: int = Field(256, ge=1, le=4096, description="BPE tokens per caption; 256 as in the DALL-E paper")
    start_end: bool = Field(False, description="wrap captions in CLIP's start/end tokens")


class BpeTokenizerParams(Params):
    path: Optional[str] = Field(None, description="an existing tokenizer.json to load; null = fit on the training captions")
    vocab_size: int = Field(16384, ge=BYTES + 2, le=1 << 20, description="ids including <pad> and the 256 bytes (paper: 16,384)")
    text_len: int = Field(256, ge=1, le=4096, description="tokens per caption (paper: 256)")
    lowercase: bool = Field(True, description="lower-case captions before tokenising")
    normalization: Literal["nfkc", "nfc", "none"] = Field(
        "nfkc", description="Unicode normalisation: nfkc folds compatibility forms (ﬁ -> fi, full-width letters)"
    )
    min_frequency: int = Field(2, ge=1, description="a pair must occur this often in the captions to be merged")
