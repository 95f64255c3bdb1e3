"""ruDALL-E's settings, importable without torch: recipes are checked with them alone."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from dalle_framework import Params


class RudalleParams(Params):
    dim: int = Field(2048, ge=8, le=65536, description="width (Malevich: 2048, Kandinsky: 3840)")
    depth: int = Field(24, ge=1, le=1024, description="layers (Malevich: 24, Kandinsky: 64)")
    heads: int = Field(16, ge=1, le=1024, description="attention heads (Malevich: 16, Kandinsky: 60)")
    sandwich_norm: bool = Field(True, description="CogView's LayerNorms on each branch output before its residual addition")
    layout_version: Literal["v3", "v2"] = Field(
        "v3", description="rudalle's layout: v3 (Malevich v3, Surrealist XL, Kandinsky); v2 (Malevich v2, Emojich) reads "
                          "a BOS before the caption, which shifts the image one position against its masks, and its 11x11 window wraps")
    attention_dropout: float = Field(0.1, ge=0, lt=1, description="dropout on attention weights in training (ruDALL-E: 0.1)")
    output_dropout: float = Field(0.1, ge=0, lt=1, description="dropout on each branch output in training (ruDALL-E: 0.1)")
    embedding_grad_scale: float = Field(0.1, gt=0, le=1, description="gradient scale of the input embeddings (CogView, ruDALL-E: 0.1)")
    text_loss_weight: float = Field(1 / 8, ge=0, description="weight of the text cross-entropy (ruDALL-E: 1/8)")
    image_loss_weight: float = Field(7 / 8, ge=0, description="weight of the image cross-entropy (ruDALL-E: 7/8)")
    grad_checkpointing: bool = Field(False, description="recompute layers in backward to save activation memory")


class RudalleTokenizerParams(Params):
    path: Optional[str] = Field(None, max_length=4096, description="ruDALL-E's YouTokenToMe bpe.model (e.g. from `dalle convert rudalle-bpe`)")
    vocab_size: int = Field(16384, ge=5, le=1 << 20, description="ids in the model file (ruDALL-E: 16,384)")
    text_len: int = Field(128, ge=2, le=4096, description="tokens per caption with BOS and EOS (ruDALL-E: 128)")
    lowercase: bool = Field(True, description="lower-case (and strip) captions first, as ruDALL-E's generation does")
