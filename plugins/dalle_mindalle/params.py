"""DALL-E Mini / Mega's settings, importable without torch: recipes are checked with them alone."""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from dalle_framework import Params


class MinDalleParams(Params):
    dim: int = Field(2048, ge=8, le=65536, description="width (Mega: 2048, Mini: 1024)")
    layers: int = Field(24, ge=1, le=1024, description="encoder layers and decoder layers each (Mega: 24, Mini: 12)")
    heads: int = Field(32, ge=1, le=1024, description="attention heads (Mega: 32, Mini: 16)")
    glu_dim: int = Field(4096, ge=1, le=1 << 20, description="GLU hidden width (Mega: 4096, Mini: 2730)")
    text_vocab: int = Field(50272, ge=2, le=1 << 21, description="rows of the encoder's token table (Mega: 50272, Mini: 50264)")
    image_vocab: int = Field(16415, ge=2, le=1 << 21, description="decoder token table rows minus one (Mega: 16415, Mini: 16384)")
    start_token: int = Field(16383, ge=0, description="the token every image starts from (min-dalle: 2**14 - 1)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on attention weights and branch outputs in training")
    grad_checkpointing: bool = Field(False, description="recompute layers in backward to save activation memory")


class MinDalleTokenizerParams(Params):
    vocab: Optional[str] = Field(None, max_length=4096, description="min-dalle's vocab.json (subword -> BART id)")
    merges: Optional[str] = Field(None, max_length=4096, description="min-dalle's merges.txt (one merge per line, after a header line)")
    vocab_size: int = Field(50266, ge=5, le=1 << 21, description="entries of vocab.json plus one (the padding id 0)")
    text_len: int = Field(64, ge=2, le=4096, description="tokens per caption with <s> and </s> (min-dalle: 64)")
