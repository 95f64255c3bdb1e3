"""UTF-8 bytes as tokens: no vocabulary to build, any language, long sequences."""

from __future__ import annotations

from typing import Optional

import torch

from dalle_framework import PAD_ID, CaptionReading, Tokenizer

from .params import ByteTokenizerParams

OFFSET = 1  # byte b is id b + 1, so id 0 stays padding


class ByteTokenizer(Tokenizer):
    """Each UTF-8 byte is one token, id = byte + 1 (``vocab_size`` 257; 0 is padding).

    Truncation to ``text_len`` never splits a multi-byte character.
    """

    Params = ByteTokenizerParams

    def __init__(self, params: Optional["ByteTokenizer.Params"] = None, **runtime) -> None:
        self.params = params or self.Params()
        self.text_len = self.params.text_len
        self.vocab_size = 256 + OFFSET

    def encode(self, texts: list[str]) -> torch.Tensor:
        assert not isinstance(texts, str), "encode takes a list of captions"
        out = torch.full((len(texts), self.text_len), PAD_ID, dtype=torch.long)
        for row, text in enumerate(texts):
            data = text.encode("utf-8")[: self.text_len]
            data = data.decode("utf-8", errors="ignore").encode("utf-8")  # drop a cut character
            out[row, : len(data)] = torch.tensor(list(data), dtype=torch.long) + OFFSET
        return out

    def decode(self, ids: torch.Tensor) -> list[str]:
        assert ids.ndim == 2, f"expected [B, T], got {tuple(ids.shape)}"
        return [bytes(i - OFFSET for i in row.tolist() if i != PAD_ID).decode("utf-8", errors="replace") for row in ids]

    def read(self, texts: list[str]) -> list[CaptionReading]:
        return [CaptionReading(tokens=len(t.encode("utf-8")), units=len(t.encode("utf-8"))) for t in texts]
