"""A pipeline: the components a recipe names, built and (when trained) loaded.

    >>> pipe = Pipeline.load("runs/shapes-demo")
    >>> result = pipe.generate(["a red circle in the top left"], candidates=16, keep=4, seed=0)
    >>> result.images.shape        # [captions, keep, 3, H, W] in [0, 1]
    >>> result.pil()[0][0].save("best.png")

Each stage of the recipe is reachable by its name (``pipe.codec``, ``pipe.prior``)
and by ``pipe.component(name)``. Generation takes its parts by contract: the
first stage (in training order) whose component is a :class:`Prior` draws
tokens, the first :class:`ImageCodec` decodes them and the first
:class:`Reranker`, when trained, ranks the candidates.
"""

from __future__ import annotations

import inspect
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from . import distributed, finetune, rundir
from .candidates import RunningBest
from .data.images import fit_images, load_split
from .data.stream import ShardedSplit, count_records
from .errors import UsageError
from .interfaces import DataSource, ImageCodec, Prior, Reranker, Sampling, Tokenizer
from .plugins import PluginManager, get_plugin_manager
from .recipe import Recipe, apply_overrides, load_recipe, read_yaml, validate
from .stage import Stage

TOKENIZER_DIR = "tokenizer"


def resolve_device(name: str) -> torch.device:
    """A recipe's or the CLI's device name, checked against this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"device {name!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {name!r}: this machine has no CUDA GPU; use --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"device {name!r}: only {torch.cuda.device_count()} GPU(s) here")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device {name!r}: this machine has no Apple GPU; use --device cpu (or auto)")
    elif device.type not in ("cpu", "mps"):
        raise UsageError(f"device {name!r}: use auto, cpu, cuda or cuda:N")
    return device


@dataclass
class Generation:
    """What :meth:`Pipeline.generate` returns.

    ``images[C, keep, 3, H, W]`` in [0, 1] and ``scores[C, keep]`` are the kept
    candidates of each caption, best first, and ``best[C, keep]`` says which candidates
    they are; ``candidate_scores[C, N]`` and ``tokens[C, N, h*w]`` cover all ``N`` drawn
    per caption in sampling order (scores are NaN without a reranker). ``candidates``
    holds all ``N`` images only when asked for (``keep_candidates=True``), else None.
    """

    captions: list[str]
    images: torch.Tensor
    scores: torch.Tensor
    candidates: Optional[torch.Tensor]
    candidate_scores: torch.Tensor
    tokens: torch.Tensor
    best: Optional[torch.Tensor] = None

    def pil(self) -> list[list[Any]]:
        from torchvision.transforms.functional import to_pil_image

        return [[to_pil_image(img) for img in row] for row in self.images]


class Pipeline:
    """The components of one recipe, on one device.

    Components are built lazily; when ``run_dir`` holds trained weights for a
    stage they are loaded (``<stage>/model.safetensors``), else a block's
    pretrained ``weights``, else the component keeps its fresh initialisation.
    """

    def __init__(
        self,
        recipe: Recipe,
        *,
        run_dir: Optional[str | Path] = None,
        device: Optional[str | torch.device] = None,
        manager: Optional[PluginManager] = None,
    ) -> None:
        self.recipe = recipe
        self.run_dir = Path(run_dir) if run_dir is not None else recipe.run_dir
        self.device = resolve_device(str(device)) if device is not None else resolve_device(recipe.device)
        self.manager = manager or get_plugin_manager()
        classes = self.manager.stages()
        self.stages: dict[str, Stage] = {name: classes[name](self) for name in classes if name in recipe.stages}
        self._components: dict[str, Any] = {}
        self._splits: dict[str, tuple[torch.Tensor, list[str]]] = {}
        self._counts: dict[tuple, list[int]] = {}

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_recipe(cls, ref: str | Path, overrides: Iterable[str] = (), **kwargs: Any) -> "Pipeline":
        return cls(load_recipe(ref, overrides), **kwargs)

    @classmethod
    def load(cls, run_dir: str | Path, *, device: Optional[str] = None, overrides: Iterable[str] = ()) -> "Pipeline":
        """Load a run directory written by ``dalle train``."""
        run_dir = Path(run_dir)
        recipe_file = run_dir / rundir.RECIPE_FILE
        if not recipe_file.is_file():
            raise UsageError(f"{run_dir}: not a run directory (no {rundir.RECIPE_FILE}); train one with `dalle train RECIPE`")
        recipe = validate(apply_overrides(read_yaml(recipe_file), overrides), source=str(recipe_file))
        return cls(recipe, run_dir=run_dir, device=device)

    def build(self, kind: str, block: Any, **runtime: Any) -> Any:
        return self.manager.registry(kind).build(block, **runtime)

    def stage(self, name: str) -> Stage:
        if name not in self.stages:
            known = ", ".join(self.stages) or "none"
            raise UsageError(f"recipe {self.recipe.name!r} has no {name!r} stage (its stages: {known}); add a `{name}:` block")
        return self.stages[name]

    @property
    def data(self) -> DataSource:
        if "data" not in self._components:
            self._components["data"] = self.build("data", self.recipe.data)
        return self._components["data"]

    @property
    def tokenizer(self) -> Tokenizer:
        """The recipe's tokenizer; one learned from data is loaded from the run directory
        (its ``vocab_size`` and ``text_len`` are known before, from its params)."""
        if "tokenizer" not in self._components:
            tokenizer = self.build("tokenizer", self.recipe.tokenizer)
            fitted = self.run_dir / TOKENIZER_DIR
            if tokenizer.needs_fit and fitted.is_dir():
                tokenizer.load(fitted)
            self._components["tokenizer"] = tokenizer
        return self._components["tokenizer"]

    def fit_tokenizer(self, *, force: bool = False) -> Optional[dict[str, Any]]:
        """Fit a tokenizer that learns from data on the training captions and save it in the run; None if it needs no fit.

        Under several processes rank 0 fits and saves it while the others wait, then load it.
        """
        tokenizer = self.build("tokenizer", self.recipe.tokenizer)
        target = self.run_dir / TOKENIZER_DIR
        if not tokenizer.needs_fit:
            return None
        fit = distributed.broadcast_object(force or not target.is_dir())  # one decision for all ranks
        result: dict[str, Any] = {"tokenizer": str(target), "reused": True}
        if fit and distributed.is_main():
            streamed = self.data.stream("train") is not None
            captions = list(self.data.caption_stream("train")) if streamed else self.split("train")[1]
            tokenizer.fit(captions)
            with rundir.atomic_directory(target, collective=False) as tmp:
                tokenizer.save(tmp)
            result = {"tokenizer": str(target), "captions": len(captions), "vocab_size": tokenizer.vocab_size}
        if fit:
            distributed.barrier()
        if not (fit and distributed.is_main()):
            if not target.is_dir():
                raise UsageError(f"{target}: rank 0's fitted tokenizer is not visible here; the run directory must be shared by all nodes")
            tokenizer.load(target)
        self._components["tokenizer"] = tokenizer
        return result

    def shard_counts(self, stream: ShardedSplit, *, collective: bool = False) -> list[int]:
        """Records per shard of a streamed split, counted once per pipeline and cached in ``<run>/data``
        (see :func:`~dalle_framework.data.stream.count_records`; ``collective``: every rank calls it)."""
        key = (stream.format.name, tuple(stream.paths))
        if key not in self._counts:
            cache = self.run_dir / "data" / f"counts-{stream.format.name}.json"
            self._counts[key] = count_records(stream, cache=cache, collective=collective)
        return self._counts[key]

    def caption_sample(self, split: str, limit: int) -> list[str]:
        """The first ``limit`` captions of a split (read without images where the source can)."""
        if split not in self._splits and self.data.stream(split) is not None:
            return list(itertools.islice(self.data.caption_stream(split), limit))
        return self.split(split)[1][:limit]

    def split(self, split: str) -> tuple[torch.Tensor, list[str]]:
        """A split of the recipe's data as uint8 ``[N,3,H,W]`` plus captions, read once per pipeline."""
        if split not in self._splits:
            self._splits[split] = load_split(self.data, split, progress=True)
        return self._splits[split]

    def has_weights(self, stage: str) -> bool:
        return (self.run_dir / stage / rundir.WEIGHTS_FILE).is_file()

    def component(self, stage: str, *, require_trained: bool = True) -> torch.nn.Module:
        """The stage's component on this pipeline's device, in eval mode, with its weights."""
        if stage not in self._components:
            spec = self.stage(stage)
            with torch.random.fork_rng(devices=[]):  # the random init is overwritten: leave the caller's RNG alone
                module = spec.build()
            if self.has_weights(stage):
                self._check_fresh(stage)
                finetune.load_trained(module, self.run_dir / stage / rundir.WEIGHTS_FILE, base=spec.block.weights)
            elif spec.block.weights:
                rundir.load_into(module, spec.block.weights)
            elif require_trained:
                raise UsageError(
                    f"{self.run_dir}: the {stage} is not trained yet; run `dalle train {self.run_dir / rundir.RECIPE_FILE} --stage {stage}`"
                )
            self._components[stage] = module.to(self.device).eval()
        return self._components[stage]

    def _check_fresh(self, stage: str) -> None:
        """Refuse weights trained on inputs the run no longer holds (a retrained codec under a prior, say)."""
        meta = rundir.read_meta(self.run_dir, stage)
        if meta is None:  # weights without their record: an export cut short, or files put there by hand
            raise UsageError(
                f"{self.run_dir / stage}: {rundir.WEIGHTS_FILE} has no {rundir.META_FILE} record of the run that made it, so "
                f"nothing says what it was trained on; retrain it: `dalle train {self.run_dir / rundir.RECIPE_FILE} --stage {stage}`"
            )
        recorded = meta.get("identity")
        if not isinstance(recorded, dict):
            return  # a run written before stages recorded their inputs
        current = self.stage(stage).identity()
        changed = [dep for dep, run in current["after"].items() if (recorded.get("after") or {}).get(dep) != run]
        changed += [block for block, value in current["uses"].items() if (recorded.get("uses") or {}).get(block) != value]
        if changed:
            raise UsageError(
                f"{self.run_dir / stage}: trained on another {' and '.join(changed)} than this run now has, so it is stale; "
                f"retrain it: `dalle train {self.run_dir / rundir.RECIPE_FILE} --stage {stage}` (or `dalle run`, which does)"
            )

    def forget(self, stage: str) -> None:
        """Drop a loaded component so the next access reads the newest weights."""
        self._components.pop(stage, None)

    def __getattr__(self, name: str) -> Any:
        stages = self.__dict__.get("stages", {})
        if name in stages:
            return self.component(name)
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    # ------------------------------------------------------------------ roles in generation

    def role(self, contract: type) -> Optional[str]:
        """The first stage (in training order) whose component implements ``contract``, or None."""
        for name, spec in self.stages.items():
            if issubclass(self.manager.registry(spec.kind).base, contract):
                return name
        return None

    def part(self, contract: type) -> Any:
        """The trained component that plays ``contract`` in generation (``pipe.part(Prior)``)."""
        name = self.role(contract)
        if name is None:
            raise UsageError(f"recipe {self.recipe.name!r} has no stage with a {contract.__name__}; generation needs one")
        return self.component(name)

    def check_can_generate(self, what: str = "cannot generate") -> None:
        """Refuse, before anything is loaded, a run whose codec or prior has no weights: neither trained
        here nor pretrained (`dalle convert`)."""
        for contract in (ImageCodec, Prior):
            if self._usable(contract) is None:
                raise UsageError(f"{what}: no trained {contract.__name__}; train the run first (`dalle train {self.run_dir}`)")

    def scorer(self) -> Optional[Reranker]:
        """The trained reranker, or None when the recipe has none or it is not trained."""
        name = self._usable(Reranker)
        return None if name is None else self.component(name)

    def _usable(self, contract: type) -> Optional[str]:
        """The stage playing ``contract`` when it has weights: trained here or pretrained (`dalle convert`)."""
        name = self.role(contract)
        return name if name is not None and (self.has_weights(name) or self.stage(name).block.weights) else None

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(
        self,
        captions: list[str],
        *,
        candidates: Optional[int] = None,
        keep: Optional[int] = None,
        sampling: Optional[Sampling] = None,
        seed: Optional[int] = None,
        prime_images: Optional[torch.Tensor] = None,
        prime_rows: int = 0,
        batch_size: Optional[int] = None,
        progress: bool = False,
        keep_candidates: bool = False,
        on_progress: Optional[Callable[[int, int], None]] = None,
        on_batch: Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]] = None,
    ) -> Generation:
        """Draw ``candidates`` images per caption, rerank, keep the best ``keep``.

        ``prime_images[C or 1, 3, H, W]`` in [0, 1] with ``prime_rows > 0`` keeps the top
        rows of each image's tokens and lets the prior complete the rest.
        Candidates of all captions are drawn ``batch_size`` at a time and only the best
        ``keep`` images per caption are held (all of them with ``keep_candidates``), so
        ``candidates=512`` needs the memory of one batch. The same ``seed`` gives the same
        images (on the same device and build). ``on_progress(done_tokens, total_tokens)``
        counts image tokens drawn over all candidates of all captions (after each token;
        after each batch for a prior whose ``generate`` takes no ``on_step``). An exception
        it raises stops generation. ``on_batch(caption, number, images, scores)`` sees every
        decoded batch as it is drawn (which caption and candidate each row is, the images and
        their scores), so a caller can measure all candidates while only the best are held.
        """
        if not captions:
            raise UsageError("give at least one caption")
        n, keep, batch_size = self._generation_counts(candidates, keep, batch_size)
        codec: ImageCodec = self.part(ImageCodec)
        prior: Prior = self.part(Prior)
        # a CPU generator: host draws are then the same on every device; device draws take one seed from it
        generator = torch.Generator().manual_seed(self.recipe.seed if seed is None else seed)
        prime = self._prime_tokens(codec, len(captions), prime_images, prime_rows)
        draw = _Drawing(self, prior, codec, list(captions), n, keep, sampling or self.recipe.generate.sampling, generator,
                        prime, keep_candidates=keep_candidates, on_batch=on_batch)
        from .progress import progress_bar

        bar = progress_bar(total=draw.total_tokens, desc="generate", unit="tok", enabled=progress, leave=False)

        def counted(tokens_done: int) -> None:
            bar.update(tokens_done - bar.n)
            if on_progress is not None:
                on_progress(tokens_done, draw.total_tokens)

        for start in range(0, draw.total_rows, batch_size):
            draw.batch(start, min(start + batch_size, draw.total_rows), counted, tracked=progress or on_progress is not None)
        bar.close()
        return draw.result()

    def _generation_counts(self, candidates: Optional[int], keep: Optional[int], batch_size: Optional[int]) -> tuple[int, int, int]:
        """Candidates per caption, images kept, candidates per forward pass: the arguments, else the recipe's."""
        cfg = self.recipe.generate
        n = cfg.candidates if candidates is None else candidates
        if keep is not None and keep > n:  # asked for: an error; the recipe's default keep shrinks to fit
            raise UsageError(f"keep ({keep}) is more than the {n} candidates drawn per caption; draw more (-n / candidates) or keep fewer")
        keep = min(cfg.keep if keep is None else keep, n)
        if n < 1 or keep < 1:
            raise UsageError(f"candidates ({n}) and keep ({keep}) must be at least 1")
        batch_size = cfg.batch_size if batch_size is None else batch_size
        if batch_size < 1:
            raise UsageError(f"batch size (--batch-size, generate.batch_size) must be at least 1, got {batch_size}")
        return n, keep, batch_size

    def _prime_tokens(self, codec: ImageCodec, count: int, images: Optional[torch.Tensor], rows: int) -> Optional[torch.Tensor]:
        """The top ``rows`` token rows of each prime image, one row of tokens per caption (None: no priming)."""
        if not rows:
            return None
        if images is None:
            raise UsageError("prime_rows needs prime_images")
        h, w = codec.grid
        if not 0 < rows < h:
            raise UsageError(f"prime rows must be between 1 and {h - 1} (the token grid has {h} rows)")
        codes = codec.encode(fit_images(images.to(self.device), codec.image_size))
        codes = codes.expand(count, -1) if len(codes) == 1 else codes
        if len(codes) != count:
            raise UsageError(f"{len(codes)} prime images for {count} captions; give one or one per caption")
        return codes[:, : rows * w]

    @torch.no_grad()
    def score(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """Reranker scores ``[B]``; NaN when the recipe has no trained reranker."""
        reranker = self.scorer()
        if reranker is None:
            return torch.full((len(images),), math.nan, device=images.device)
        return reranker.score(images, captions).float()


class _Drawing:
    """The candidates of one ``Pipeline.generate`` call, drawn a batch at a time: every candidate's tokens,
    the running best images per caption, and every decoded image when the caller keeps them."""

    def __init__(self, pipe: Pipeline, prior: Prior, codec: ImageCodec, captions: list[str], n: int, keep: int,
                 sampling: Sampling, generator: torch.Generator, prime: Optional[torch.Tensor], *, keep_candidates: bool,
                 on_batch: Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]]) -> None:
        self.pipe, self.prior, self.codec, self.captions, self.n = pipe, prior, codec, captions, n
        self.sampling, self.generator, self.prime, self.on_batch = sampling, generator, prime, on_batch
        self.text = pipe.tokenizer.encode(captions).to(pipe.device)
        self.image_len = codec.grid[0] * codec.grid[1]
        self.total_rows = len(captions) * n
        self.total_tokens = self.total_rows * self.image_len
        self.best = RunningBest(len(captions), keep, n)
        self.tokens = torch.zeros(len(captions), n, self.image_len, dtype=torch.long)
        self.kept: Optional[list[torch.Tensor]] = [] if keep_candidates else None
        self.stepwise = "on_step" in inspect.signature(prior.generate).parameters

    def batch(self, start: int, stop: int, counted: Callable[[int], None], *, tracked: bool) -> None:
        """Draw, decode and score candidates ``start:stop`` (over all captions' candidates, caption-major)."""
        flat = torch.arange(start, stop)
        caption_of, number = flat // self.n, flat % self.n  # which caption, which of its candidates
        rows = caption_of.to(self.pipe.device)

        def step(done: int, total: int) -> None:
            counted(start * self.image_len + len(flat) * done)

        track = {"on_step": step} if self.stepwise and tracked else {}
        prime = None if self.prime is None else self.prime[rows]
        part = self.prior.generate(self.text[rows], self.sampling, prime=prime, generator=self.generator, **track)
        if not self.stepwise:  # a prior written before the on_step contract: progress per batch
            step(self.image_len, self.image_len)
        decoded = self.codec.decode(part).clamp(0, 1)
        scores = self.pipe.score(decoded, [self.captions[c] for c in caption_of.tolist()])
        self.tokens[caption_of, number] = part.cpu()
        if self.on_batch is not None:
            self.on_batch(caption_of, number, decoded, scores)
        if self.kept is not None:
            self.kept.append(decoded.cpu())
        for c in caption_of.unique().tolist():
            mine = (caption_of == c).nonzero().squeeze(1)
            self.best.add(c, number[mine], decoded[mine.to(decoded.device)], scores[mine.to(scores.device)])

    def result(self) -> Generation:
        candidates = None
        if self.kept is not None:
            candidates = torch.cat(self.kept).view(len(self.captions), self.n, *self.kept[0].shape[1:])
        return Generation(
            captions=self.captions,
            images=self.best.images().cpu(),
            scores=self.best.best_scores().cpu(),
            candidates=candidates,
            candidate_scores=self.best.scores,
            tokens=self.tokens,
            best=self.best.index().cpu(),
        )
