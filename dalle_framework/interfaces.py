"""The contracts every plugin implements.

Shapes are the contract. Images are float tensors ``[B, 3, H, W]`` in ``[0, 1]``
unless stated otherwise; token tensors are ``torch.long``.

Every component class carries a nested pydantic ``Params`` model with
``extra="forbid"``; a recipe's ``params`` block is validated against it once and
the same ``Params`` object reaches the constructor: ``cls(params, **runtime)``,
where ``runtime`` holds exactly the facts the component's stage hands it from
other components (a prior gets ``text_vocab_size``, ``text_len``,
``image_vocab_size`` and ``grid``; the other kinds get nothing).

Methods with a default body are optional: a plugin overrides them when it can
do better (say, a codec that knows its grid without being built).
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, ClassVar, Iterable, Iterator, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from .errors import UsageError
from .schema import PAD_ID, EngineSpec, FilterBlock, GuidanceScale, Params, Sampling, Strict, Temperature, TopK, TopP, TrainConfig  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from .data.stream import ShardedSplit



class Component:
    """Mixin shared by all registered classes.

    ``name`` and ``plugin`` are filled in by the registry on registration.
    Construction: ``cls(params, **runtime)`` (see the module docstring).
    """

    Params: ClassVar[type[Params]] = Params
    name: ClassVar[str] = ""
    plugin: ClassVar[str] = ""

    @classmethod
    def convert_released(cls, files: list[Path], out_dir: Path, *, trust_pickle: bool, params: Optional[dict] = None) -> dict:
        """Convert files released elsewhere (``dalle convert NAME FILE... OUT``); any kind may offer it.

        Writes into ``out_dir`` what a recipe then loads: ``model.safetensors`` (this
        class's state dict, for components with weights) or the files it reads (a
        tokenizer's vocabulary), ``<kind>.yaml`` (a recipe block naming them) and
        ``conversion.json``; returns a summary. Helpers: :mod:`dalle_framework.convert`.
        A pickle may only be read when ``trust_pickle``. ``params`` (``--param key=value``)
        are applied over what the files say, for facts they do not hold (a head count).
        """
        raise UsageError(f"{cls.name or cls.__name__!r} has no converter for released files")

    @classmethod
    def converts_released(cls) -> bool:
        """Whether this class overrides :meth:`convert_released`."""
        return cls.convert_released.__func__ is not Component.convert_released.__func__


class ModuleComponent(nn.Module, Component):
    """A component with weights (codec, prior, reranker).

    ``partitioned_init``: True when the class initialises every parameter in its constructor
    or through ``Module.apply`` (never with ``nn.init`` on a parameter reached otherwise), so
    ZeRO-3 may shard it while it is built: only then is a model larger than one device built at
    all. Otherwise it is built whole on each rank and sharded afterwards, which is always right.
    """

    partitioned_init: ClassVar[bool] = False
    # Params that weights are bound to although no shape shows them (ruDALL-E's layout version): a
    # conversion records their values in the safetensors, and loading those weights into a module
    # built with other values is refused, instead of loading cleanly and computing nonsense.
    bound_params: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        nn.Module.__init__(self)

    def no_weight_decay_parameters(self) -> Iterable[nn.Parameter]:
        """Matrices that must not be decayed although they are not in an ``nn.Embedding``
        (say, a positional table held as a bare parameter). Engines already skip biases,
        norms and embeddings."""
        return ()


# --------------------------------------------------------------------------- text


@dataclass
class CaptionReading:
    """How a tokenizer reads one caption: ``tokens`` it needs before truncation to ``text_len``,
    and how many of its ``units`` (words, bytes) became the unknown token (``unknown_words``)."""

    tokens: int
    units: int
    unknown_words: list[str] = field(default_factory=list)

    @property
    def unknown(self) -> int:
        return len(self.unknown_words)


class Tokenizer(Component, abc.ABC):
    """Turns captions into fixed-length id tensors.

    ``encode(list[str]) -> LongTensor[B, text_len]``: padded on the right with
    ``PAD_ID`` (0) and truncated to ``text_len``. Ids are in ``[0, vocab_size)``;
    ``vocab_size`` and ``text_len`` are known from the params alone.

    A tokenizer learned from data (a BPE) says so with ``needs_fit``; the pipeline
    then calls ``fit`` on the training captions once, ``save``s it into the run
    directory and ``load``s it from there afterwards.
    """

    vocab_size: int
    text_len: int

    @abc.abstractmethod
    def encode(self, texts: list[str]) -> torch.Tensor: ...

    @abc.abstractmethod
    def decode(self, ids: torch.Tensor) -> list[str]: ...

    def read(self, texts: list[str]) -> list[CaptionReading]:
        """How each caption is read (coverage and length reports, ``dalle generate``'s note).

        The default counts the ids ``encode`` gives (so it cannot see truncation) and knows of no
        unknown token; tokenizers with one, or that can count untruncated ids, override it.
        """
        ids = self.encode(list(texts))
        return [CaptionReading(tokens=int((row != PAD_ID).sum()), units=len(text.split())) for row, text in zip(ids, texts)]

    @property
    def learned_vocab_size(self) -> Optional[int]:
        """Ids a fitted tokenizer learned (may be fewer than ``vocab_size`` asked for); None when it learns none."""
        return None

    # Tokenizers that learn a vocabulary from captions (BPE) override the four below;
    # the rest are fully described by their params and store nothing.

    @property
    def needs_fit(self) -> bool:
        """True while the tokenizer must be fitted (``fit``) or loaded (``load``) before use."""
        return False

    def fit(self, captions: list[str]) -> None:
        """Learn the vocabulary from training captions; ``vocab_size`` does not change."""
        raise UsageError(f"tokenizer {self.name or type(self).__name__!r} learns nothing from captions")

    def save(self, directory: Path) -> None:
        """Write what ``fit`` learned to ``directory/tokenizer.json`` (atomically)."""

    def load(self, directory: Path) -> None:
        """Read what ``save`` wrote to ``directory``."""


# --------------------------------------------------------------------------- stage 1


@dataclass(frozen=True)
class CodecFacts:
    """What a codec hands the prior, known from its params: codes, grid and input size."""

    vocab_size: int
    grid: tuple[int, int]
    image_size: int


class ImageCodec(ModuleComponent):
    """Maps images to a grid of discrete tokens and back.

    - ``encode(images[B,3,H,W] in [0,1]) -> LongTensor[B, h*w]`` (hard codes)
    - ``decode(LongTensor[B, h*w]) -> images[B,3,H',W'] in [0,1]``: usually the size it
      encodes; a decoder may return larger images (ruDALL-E's wavelet decoder: twice the
      side), and reconstruction is then measured at the input size
    - ``loss(images, step) -> dict``: key ``loss`` (scalar to minimise) plus named
      terms to log (floats or 0-d tensors). ``forward`` is ``loss`` so that
      training engines (DeepSpeed) can call the module directly.
    """

    vocab_size: int
    grid: tuple[int, int]
    image_size: int

    @abc.abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def decode(self, tokens: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def loss(self, images: torch.Tensor, step: int = 0) -> dict[str, Any]: ...

    def forward(self, images: torch.Tensor, step: int = 0) -> dict[str, Any]:
        return self.loss(images, step)

    @property
    def tokens_per_image(self) -> int:
        return self.grid[0] * self.grid[1]

    def adopt(self, facts: CodecFacts) -> None:
        """Take ``vocab_size``, ``grid`` and ``image_size`` from ``facts``: a constructor calls
        ``self.adopt(self.describe(params))`` where ``describe`` reads them from the params, so the
        two never disagree."""
        self.vocab_size, self.grid, self.image_size = facts.vocab_size, tuple(facts.grid), facts.image_size

    @classmethod
    def describe(cls, params: Params) -> CodecFacts:
        """Vocabulary, grid and image size from ``params``.

        The default builds the codec on the meta device (no memory, no init cost);
        codecs whose params already say it override this.
        """
        with torch.device("meta"):
            codec = cls(params)
        return CodecFacts(int(codec.vocab_size), (int(codec.grid[0]), int(codec.grid[1])), int(codec.image_size))


# --------------------------------------------------------------------------- stage 2


class LogitFilter(Component, abc.ABC):
    """A rule that drops unlikely tokens before each draw (min-p, typical sampling...), named in
    ``generate.sampling.filters``. Built as ``cls(params)``.

    - ``apply(logits[B, V]) -> logits[B, V]``: the temperature-scaled logits after top-k / top-p, a
      dropped token's logit set to ``-inf``. Tensor operations on the logits' device only (no host
      sync), so a filtered decode step can still be captured; each row's most likely token is kept
      whatever it returns.
    """

    def __init__(self, params: Params) -> None:
        self.params = params

    @abc.abstractmethod
    def apply(self, logits: torch.Tensor) -> torch.Tensor: ...


StepCallback = Callable[[int, int], None]  # (image positions drawn, positions in all) per batch


class Prior(ModuleComponent):
    """Autoregressive model of image tokens given a caption's tokens.

    How the caption conditions the image is the prior's business: a decoder-only prior
    models ``[text tokens | image tokens]`` as one sequence (the DALL-E paper, ruDALL-E),
    an encoder-decoder encodes the caption and cross-attends to it (DALL-E Mini / Mega).

    Built as ``cls(params, text_vocab_size=, text_len=, image_vocab_size=, grid=)``.

    - ``loss(text[B,T], image_tokens[B,h*w]) -> dict``: ``loss`` (weighted) and
      ``image_loss`` in nats per image token; ``text_loss`` (nats per text token) from
      priors that also model the caption.
    - ``generate(text[B,T], sampling, prime=None, generator=None, on_step=None) -> LongTensor[B,h*w]``;
      ``prime[B, n]`` holds the first ``n`` image tokens to keep (image priming);
      ``on_step(done, total)`` is called after each image token position is drawn for the
      whole batch, with ``total = h*w`` and ``done`` the positions filled so far (primed ones included).
      :func:`dalle_framework.decoding.sample_image_tokens` implements it (KV cache,
      guidance, draws) for a prior with ``prefill`` / ``decode_step``.
    """

    @abc.abstractmethod
    def loss(self, text: torch.Tensor, image_tokens: torch.Tensor) -> dict[str, Any]: ...

    @abc.abstractmethod
    def generate(
        self,
        text: torch.Tensor,
        sampling: Sampling,
        prime: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
        on_step: Optional[StepCallback] = None,
    ) -> torch.Tensor: ...

    def forward(self, text: torch.Tensor, image_tokens: torch.Tensor) -> dict[str, Any]:
        return self.loss(text, image_tokens)

    def flops_per_token(self) -> Optional[dict[str, Any]]:
        """Forward and training FLOPs per token (``{"forward": ..., "train": ...}``), or None if unknown."""
        return None

    def activation_bytes(self, batch_size: int, bytes_per_value: int) -> Optional[int]:
        """Activation memory backward keeps for one training micro-batch of ``batch_size`` pairs
        (values of ``bytes_per_value`` bytes), per process; None if unknown. Helper:
        :func:`dalle_framework.metrics.activation_bytes`."""
        return None


# --------------------------------------------------------------------------- reranking


class Reranker(ModuleComponent):
    """Scores how well images match captions.

    - ``score(images[B,3,H,W] in [0,1], texts: list[str] of B) -> FloatTensor[B]``
    - ``loss(images, texts) -> dict`` for training from a recipe (contrastive).
    - ``similarity(images[N], texts[M]) -> FloatTensor[N, M]`` and
      ``retrieval_metrics(images, captions)`` (held-out evaluation) have generic
      defaults built on ``score``; dual encoders override ``similarity``.
    """

    @abc.abstractmethod
    def score(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor: ...

    @abc.abstractmethod
    def loss(self, images: torch.Tensor, texts: list[str]) -> dict[str, Any]: ...

    def forward(self, images: torch.Tensor, texts: list[str]) -> dict[str, Any]:
        return self.loss(images, texts)

    @torch.no_grad()
    def similarity(self, images: torch.Tensor, texts: list[str], *, batch_size: int = 256) -> torch.Tensor:
        """Score of every image with every text, ``[N, M]`` on the CPU (scores all pairs in chunks)."""
        n, m = len(images), len(texts)
        rows = torch.arange(n).repeat_interleave(m)
        cols = torch.arange(m).repeat(n)
        out = torch.empty(n * m)
        for start in range(0, n * m, batch_size):
            i, j = rows[start : start + batch_size], cols[start : start + batch_size]
            out[start : start + len(i)] = self.score(images[i], [texts[k] for k in j.tolist()]).float().cpu()
        return out.view(n, m)

    def retrieval_metrics(self, images: torch.Tensor, captions: list[str]) -> dict[str, float]:
        """Held-out image->text and text->image top-1/top-5 accuracy over the distinct captions."""
        from .metrics import retrieval_accuracy

        return retrieval_accuracy(self.similarity, images, captions)

    def image_features(self, images: torch.Tensor) -> Optional[torch.Tensor]:
        """The image tower's embedding ``[B, D]`` of ``images[B,3,H,W]`` in [0,1] (distribution
        metrics on the reranker's features), or None for a reranker that has no image tower."""
        return None


# --------------------------------------------------------------------------- data

Split = Literal["train", "heldout"]


@dataclass
class Sample:
    """One image-caption pair: ``image`` is uint8 ``[H, W, 3]`` (numpy or tensor)."""

    image: Any
    caption: str
    key: str = ""
    meta: dict = field(default_factory=dict)


class DataSource(Component, abc.ABC):
    """Yields image-caption pairs for a fixed, documented train / held-out split.

    ``samples(split)`` iterates once over that split, in a deterministic order.
    A sample that cannot be decoded is skipped and counted in ``skipped``.
    Sources whose truth is known may implement ``judge`` (an oracle).
    """

    skipped: int = 0

    @abc.abstractmethod
    def samples(self, split: Split) -> Iterator[Sample]: ...

    def size(self, split: Split) -> Optional[int]:
        """Number of samples in ``split`` when known without reading it, else None."""
        return None

    def stream(self, split: Split) -> Optional["ShardedSplit"]:
        """The split as shard files the framework streams (:mod:`dalle_framework.data.stream`): training
        then reads it in parts, every rank and worker its own, never all of it into memory. Its items
        are :class:`Sample` (or ``Skipped``). None (the default): the split is read into memory
        through ``samples``, which suits generated or small data."""
        return None

    def caption_stream(self, split: Split) -> Iterator[str]:
        """Every caption of the split in ``samples`` order (fitting a tokenizer); sources that can read
        captions without decoding images override it."""
        for sample in self.samples(split):
            yield sample.caption

    def captions(self, split: Split) -> list[str]:
        """Distinct captions of a split, in a stable order (used to evaluate generation)."""
        seen: dict[str, None] = {}
        for sample in self.samples(split):
            seen.setdefault(sample.caption, None)
        return list(seen)

    def judge(self, images: torch.Tensor, captions: list[str]) -> Optional[dict[str, list[bool]]]:
        """Oracle verdicts per attribute (e.g. ``colour``, ``shape``, ``position``): one bool per image
        each, or None. ``all`` (the caption met as a whole) is the AND of the attributes unless given."""
        return None

    def prepare_judge(self, cache_dir: Optional[Path]) -> Optional[dict]:
        """Get ``judge`` ready: a learned judge is trained, or loaded from ``cache_dir`` where cached
        (None: train without caching).

        Returns the judge's own accuracy on real held-out images, the ceiling for generated
        ones: ``{"all": share}``, optionally with ``per_caption: {caption: share}``; None when
        the judge is exact (rules, no model) or there is none.
        """
        return None

    def judge_features(self, images: torch.Tensor) -> Optional[torch.Tensor]:
        """What the judge reads from ``images[B,3,H,W]`` in [0,1] as feature vectors ``[B, D]``
        (a learned judge's last hidden layer, a rule judge's measurements), or None."""
        return None

    def judge_identity(self) -> dict[str, Any]:
        """What makes two runs' judge features the same: its settings and weights digest (call after ``prepare_judge``)."""
        return {}


# --------------------------------------------------------------------------- training configuration


# --------------------------------------------------------------------------- training engines


class EngineRun(abc.ABC):
    """A model and its optimizer wrapped for one training stage.

    ``step(*batch)`` runs forward (``module(*batch)`` must return a loss dict),
    backward, clipping, accumulation and the optimizer step; it returns the
    loss dict detached to floats. A NaN or infinite loss or gradient norm raises
    :class:`~dalle_framework.errors.NonFiniteError` (on every rank at once),
    saying whether the values already reached the weights.
    """

    module: nn.Module
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    sharded_forward: bool = False  # a forward pass of `module` is a collective (ZeRO-3): every rank must run the same ones
    resumes_on_other_world_sizes: bool = False  # its checkpoints load on another number of ranks

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @abc.abstractmethod
    def step(self, *batch: Any) -> dict[str, float]: ...

    @abc.abstractmethod
    def save(self, directory: str, client_state: dict) -> None:
        """Write optimizer + model state under ``directory`` (all ranks call this)."""

    @abc.abstractmethod
    def load(self, directory: str) -> dict:
        """Restore what ``save`` wrote; returns the client state. Never unpickles."""

    @abc.abstractmethod
    def full_state_dict(self, *, rank: Optional[int] = None) -> dict[str, torch.Tensor]:
        """The whole model's fp32 weights on CPU, consolidated across ranks when sharded.

        Collective: every rank calls it. With ``rank``, only that rank receives them (others get
        ``{}``) and the others' memory grows by one parameter at a time at most; None: every rank.
        """

    def evaluating(self) -> contextlib.AbstractContextManager:
        """Context for held-out forward passes of ``module`` (say, autocast where its weights are bf16)."""
        return contextlib.nullcontext()

    def lr(self) -> float:
        return float("nan")

    def barrier(self) -> None:
        from . import distributed

        distributed.barrier()


class Engine(Component, abc.ABC):
    """Builds an :class:`EngineRun` for a module and a stage's train config."""

    @abc.abstractmethod
    def prepare(self, module: nn.Module, train: TrainConfig) -> EngineRun: ...

    def model_context(self, train: TrainConfig) -> contextlib.AbstractContextManager:
        """Context the module is built in (ZeRO-3 shards weights as they are created)."""
        return contextlib.nullcontext()

    def memory_estimate(self, *, total_params: int, largest_layer_params: int, gpus_per_node: int, nodes: int) -> Optional[dict[str, Any]]:
        """Memory of the model states per GPU (and CPU) under this engine, or None if unknown."""
        return None


# --------------------------------------------------------------------------- evaluation


class FeatureNetwork(Component, abc.ABC):
    """Maps images to feature vectors, on which distribution metrics (FD, KID, precision/recall) are computed.

    Built as ``cls(params, pipe=pipeline)``: a network may use the run it measures (its reranker's
    image tower, its data source's judge) or a weights file of its own (Inception-v3).

    - ``features(images[B,3,H,W] in [0,1]) -> FloatTensor[B, D]`` on the CPU;
    - ``describe() -> dict``: everything that makes two sets of its features comparable, recorded in
      every report and part of the reference statistics' cache key: at least ``sha256`` of the
      weights (None for a rule) and ``resize`` (``{"filter", "size"}``, None when images are used as drawn);
    - ``unavailable() -> Optional[str]``: why it cannot run on this run (no trained reranker, say), or None.
    """

    def __init__(self, params: Params, *, pipe: Any) -> None:
        self.params, self.pipe = params, pipe

    @abc.abstractmethod
    def features(self, images: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]: ...

    def unavailable(self) -> Optional[str]:
        return None


@dataclass
class Figure:
    """One reported number with its confidence interval: ``value`` in ``[low, high]`` at ``level``.

    ``method`` says how the interval was made (``wilson``, ``bootstrap``, ...) and ``n`` over how
    many independent units; ``network`` names the feature network a distribution figure is
    measured on (figures on differing networks are never compared).
    """

    value: Optional[float]
    low: Optional[float] = None
    high: Optional[float] = None
    method: str = ""
    n: int = 0
    level: float = 0.95
    network: Optional[str] = None

    def as_dict(self) -> dict[str, Any]:
        out = {"value": self.value, "low": self.low, "high": self.high, "method": self.method, "n": self.n, "level": self.level}
        return out | ({"network": self.network} if self.network else {})


@dataclass
class Measurement:
    """What a :class:`Metric` adds to a report: keys and named figures, per report section."""

    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    figures: dict[str, dict[str, Figure]] = field(default_factory=dict)


class Metric(Component, abc.ABC):
    """One kind of figure of ``dalle evaluate``, selected by the recipe's ``evaluate.metrics`` or ``--metrics``.

    Built as ``cls(params)``. ``measure(evaluation)`` returns a :class:`Measurement`; the
    ``evaluation`` (:class:`dalle_framework.evaluation.Evaluation`) holds the pipeline, the
    evaluate block, the candidates drawn for held-out captions when ``generation`` is true
    (drawn once, shared by every metric), the features of the networks ``feature_networks()``
    names, the cached features of real held-out images, and helpers for intervals.
    """

    generation: ClassVar[bool] = False  # needs generated images
    default: ClassVar[bool] = True  # measured when the recipe names no metrics

    def __init__(self, params: Params) -> None:
        self.params = params

    def applies(self, pipe: Any) -> bool:
        """Whether this run has what the metric measures (a trained prior, a judge...)."""
        return True

    def sections(self, pipe: Any) -> list[str]:
        """The report sections it writes (``dalle evaluate --stage`` keeps only some): generation, or stage names."""
        return ["generation"]

    def feature_networks(self, evaluation: Any) -> list[str]:
        """Names of ``evaluate.features`` networks whose features of generated and real images it reads."""
        return []

    @abc.abstractmethod
    def measure(self, evaluation: Any) -> Measurement: ...
