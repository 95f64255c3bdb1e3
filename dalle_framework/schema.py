"""The settings models that need no torch: component ``Params``, sampling settings, a stage's
``train:`` block and what a stage declares of itself (:class:`StageSpec`). Recipes are validated with these alone, so commands that build no model
(``dalle recipes``, ``--help``) start without loading torch; ``interfaces`` re-exports them.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any, ClassVar, Collection, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field


PAD_ID = 0  # every tokenizer reserves id 0 for padding; priors give each padded position its own learned token


class Params(BaseModel):
    """Base for component parameters: unknown keys are errors, never ignored; NaN and infinity are refused."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


# The bounds of each sampling setting, for every model that takes one (Sampling, dalle serve's requests).
# Past these a draw is already greedy, uniform or guidance alone, and logits / temperature or the guided
# logits only come closer to overflowing.
Temperature = Annotated[float, Field(ge=1e-4, le=1e4)]
TopK = Annotated[int, Field(ge=1, le=2**31)]
TopP = Annotated[float, Field(gt=0, le=1)]
GuidanceScale = Annotated[float, Field(ge=0, le=1000)]


# What a prior's params may name of dalle_framework.attention, here so that recipes are checked without
# torch: that module implements them (and refuses to load if its built-in patterns differ from these).
AttentionBackend = Literal["auto", "flex", "sdpa"]
BUILTIN_PATTERNS = ("bigbird", "causal", "column", "conv", "fixed", "row", "rudalle-column", "rudalle-conv", "rudalle-conv-wrapped")


def attention_patterns() -> Collection[str]:
    """The attention pattern names a layer may use. A plugin adds one through ``dalle_framework.attention``,
    which it must import to do so: until that module is loaded the built-ins are all there are."""
    attention = sys.modules.get("dalle_framework.attention")
    return attention.PATTERNS if attention is not None else BUILTIN_PATTERNS


class FilterBlock(BaseModel):
    """One logit filter a plugin registered (``dalle components filter``), with its params."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(..., description="a registered logit filter, e.g. min-p")
    params: Any = Field(default_factory=dict, description="validated against the filter's own Params")


MAX_FILTERS = 16


class Sampling(BaseModel):
    """How image tokens are drawn. Shared by priors, the pipeline and the CLI."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    temperature: Temperature = Field(1.0, description="softmax temperature (1e-4 is greedy)")
    top_k: Optional[TopK] = Field(None, description="keep the k most likely tokens")
    top_p: Optional[TopP] = Field(None, description="nucleus mass to keep (the most likely token always stays)")
    guidance_scale: GuidanceScale = Field(1.0, description="classifier-free guidance; 1 = off")
    filters: list[FilterBlock] = Field(
        default_factory=list, max_length=MAX_FILTERS,
        description="registered logit filters applied in order after top-k / top-p (the most likely token always stays)",
    )
    use_cache: bool = Field(True, description="key/value cache for incremental decoding")
    draws: Literal["auto", "device", "host"] = Field(
        "auto",
        description="device = Gumbel-max with counter-based noise on the model's device (no host sync per token); "
        "host = multinomial with a CPU generator (same draws on every device, one host sync per token); "
        "auto = device on CUDA, host elsewhere",
    )
    decode: Literal["auto", "eager", "graph", "compile"] = Field(
        "auto",
        description="how each cached decode step runs: eager; graph = captured once in a CUDA graph and replayed; "
        "compile = torch.compile (then captured on CUDA); auto = graph on CUDA, eager elsewhere",
    )

    def with_changes(self, changes: dict[str, Any]) -> "Sampling":
        """These settings with ``changes`` (field -> value) applied and checked as a recipe's are (raises
        pydantic's ValidationError): the one merge of a recipe's defaults with what a command line, a
        request of the page or a sweep changes."""
        return type(self).model_validate({**self.model_dump(), **changes})


class Strict(BaseModel):
    """Recipe sections: unknown keys and non-finite numbers are errors."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


class EngineSpec(Strict):
    name: str = Field("torch", description="a registered engine: torch (single process / DDP) or deepspeed")
    params: Any = Field(default_factory=dict, description="validated against the engine's own Params")


class TrainConfig(Strict):
    """How one stage trains: the ``train:`` block of a stage. Engines read the optimisation fields.

    Stages that need more (the codec's ``hflip``) subclass it as their ``Params``.
    """

    steps: int = Field(1000, ge=1, le=10**9, description="optimizer steps (a stage that is not trained: frozen: true with its weights)")
    batch_size: int = Field(32, ge=1, le=2**20, description="samples per step per process")
    lr: float = Field(3e-4, gt=0, description="peak learning rate")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decays to lr * this")
    lr_schedule: Literal["cosine", "constant"] = Field("cosine", description="after warmup: half a cosine, or constant")
    warmup_steps: int = Field(0, ge=0, le=10**9, description="linear warmup steps")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decay of matrices (not biases, norms, embeddings)")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    grad_clip: Optional[float] = Field(1.0, gt=0, description="max grad norm; null = off")
    grad_accum: int = Field(1, ge=1, le=2**16, description="micro-batches per optimizer step")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="fp16 needs a CUDA GPU")
    ema: Optional[float] = Field(None, gt=0, lt=1, description="EMA decay of weights used for evaluation")
    engine: EngineSpec = Field(default_factory=EngineSpec, description="torch or deepspeed, with its params")
    max_minutes: Optional[float] = Field(None, gt=0, description="stop early after this wall time")
    log_every: int = Field(10, ge=1, description="training scalars to TensorBoard every N steps")
    eval_every: Optional[int] = Field(
        None, ge=1, description="held-out metrics and a preview image grid every N steps; null: ten times over the run"
    )
    ckpt_every: int = Field(500, ge=1, description="resumable checkpoint every N steps")
    eval_batches: int = Field(4, ge=1, le=10**6, description="held-out batches per evaluation")
    nonfinite: Literal["stop", "skip"] = Field(
        "stop",
        description="a NaN/inf loss or gradient: stop (keep the last finite checkpoint, exit non-zero) "
        "or skip that micro-batch and go on (gives up after max_skipped in a row)",
    )
    max_skipped: int = Field(10, ge=1, le=10**6, description="with nonfinite: skip, stop after this many non-finite micro-batches in a row")
    num_workers: int = Field(
        0, ge=0, le=256,
        description="DataLoader worker processes reading and decoding a streamed (sharded) split; 0 reads in the training process",
    )
    shuffle_block: int = Field(
        1000, ge=1, le=10**7,
        description="a streamed split is shuffled in blocks of this many records per worker (memory: one block of raw records)",
    )


class StageSpec:
    """What a stage is, readable before its code loads: the ``train:`` block it takes (``Params``), the
    component kind its block names, the stages it comes after, the blocks it uses, whether every
    recipe needs it. :class:`dalle_framework.Stage` subclasses it; a stage registered by where it
    lives (``"package.module:Class"``) is declared with such a torch-free base, so that a recipe is
    checked and stages are ordered without importing their code."""

    Params: ClassVar[type[TrainConfig]] = TrainConfig
    kind: ClassVar[str] = ""
    after: ClassVar[tuple[str, ...]] = ()
    uses: ClassVar[tuple[str, ...]] = ("data",)
    required: ClassVar[bool] = False


def stage_order(stages: dict[str, Any]) -> list[str]:
    """Stage names with every stage after those it depends on (``after``), otherwise in the given order.

    A dependency that is not among ``stages`` is ignored here (the recipe check
    reports it); a cycle is an error naming it.
    """
    order: list[str] = []
    visiting: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise ValueError(f"stages depend on each other in a circle: {' -> '.join([*visiting, name])}")
        visiting.append(name)
        for dep in stages[name].after:
            if dep in stages:
                visit(dep)
        visiting.pop()
        order.append(name)

    for name in stages:
        visit(name)
    return order
