"""The transformer priors' settings, importable without torch: recipes are checked with them alone."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from dalle_framework import AttentionBackend, Params, attention_patterns

class TransformerParams(Params):
    dim: int = Field(512, ge=8, le=65536, description="model width; the paper's 12B model uses 3968")
    depth: int = Field(8, ge=1, le=1024, description="number of transformer blocks (paper: 64)")
    heads: int = Field(8, ge=1, le=1024, description="attention heads (paper: 62)")
    head_dim: Optional[int] = Field(None, ge=2, le=4096, description="per-head width; null = dim // heads (paper: 64)")
    mlp_ratio: float = Field(4.0, gt=0, le=64, description="MLP hidden width / dim (GEGLU uses 2/3 of it per branch to match params)")
    mlp: Literal["gelu", "geglu"] = Field("gelu", description="MLP nonlinearity; GEGLU often trains a bit better per parameter")
    rotary: bool = Field(False, description="add rotary position embeddings to q/k on top of the learned ones")
    emb_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the summed input embeddings")
    attn_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on attention weights (SDPA only; flex has none)")
    resid_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on each residual branch output")
    text_loss_weight: float = Field(
        1 / 8, ge=0, description="weight of the text cross-entropy (paper: 1/8); 0 skips its backward (cheaper with a 49k BPE vocab)"
    )
    image_loss_weight: float = Field(7 / 8, ge=0, description="weight of the image cross-entropy (paper: 7/8)")
    caption_dropout: float = Field(
        0.0, ge=0, lt=1, description="training-only probability of an all-padding caption; enables classifier-free guidance"
    )
    tie_image_embedding: bool = Field(False, description="share the image code embedding with the image output head")
    grad_checkpointing: bool = Field(False, description="recompute blocks in backward to save activation memory")
    compile_blocks: bool = Field(
        False, description="torch.compile each block for training (fuses norms, MLP and residuals; the first steps compile)"
    )
    init_std: float = Field(0.02, gt=0, le=10, description="std of the normal init of weights (GPT-2 style)")

    @model_validator(mode="after")
    def _heads_fit(self) -> "TransformerParams":
        head_dim = self.head_dim or self.dim // self.heads
        if self.head_dim is None and head_dim * self.heads != self.dim:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads}), or set head_dim")
        if self.rotary and head_dim % 2:
            raise ValueError(f"rotary needs an even head_dim, got {head_dim}")
        return self


PAPER_LAYERS = ["row", "column", "row", "row"]


class SparseParams(TransformerParams):
    layers: list[str] = Field(
        default_factory=lambda: list(PAPER_LAYERS),
        min_length=1,
        description="attention pattern per layer, cycled over depth (paper: row, column, row, row)",
    )
    final_layer: Optional[str] = Field("conv", description="pattern forced on the last layer (paper: conv); null = keep the cycle")
    attention_backend: AttentionBackend = Field(
        "auto",
        description="auto = block-sparse flex_attention for training shapes on GPU, masked SDPA on CPU and for sampling; "
        "flex | sdpa forces one (see dalle_framework.attention.kernel_for)",
    )

    @field_validator("layers")
    @classmethod
    def _known_layers(cls, value: list[str]) -> list[str]:
        known = attention_patterns()
        unknown = [name for name in value if name not in known]
        if unknown:
            raise ValueError(f"unknown attention pattern(s) {unknown}; known: {sorted(known)}")
        return value

    @field_validator("final_layer")
    @classmethod
    def _known_final(cls, value: Optional[str]) -> Optional[str]:
        known = attention_patterns()
        if value is not None and value not in known:
            raise ValueError(f"unknown attention pattern {value!r}; known: {sorted(known)}")
        return value
