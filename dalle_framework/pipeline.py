"""A pipeline: the components a recipe names, built and (when trained) loaded.

    >>> pipe = Pipeline.load("runs/shapes-demo")
    >>> result = pipe.generate(["a red circle in the top left"], candidates=16, keep=4, seed=0)
    >>> result.images.shape        # [captions, keep, 3, H, W] in [0, 1]
    >>> result.pil()[0][0].save("best.png")
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from . import checkpoint as ckpt
from .candidates import RunningBest
from .errors import UsageError
from .interfaces import DataSource, ImageCodec, Prior, Reranker, Sampling, Tokenizer
from .plugins import PluginManager, get_plugin_manager
from .recipe import Recipe, TrainedBlock, apply_overrides, load_recipe, read_yaml, validate

STAGES = ("codec", "prior", "reranker")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
    """Tokenizer, codec, prior and reranker of one recipe, on one device.

    Components are built lazily; when ``run_dir`` holds trained weights for a
    stage they are loaded (``<stage>/model.safetensors``), otherwise the
    component keeps its fresh initialisation.
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
        self.device = torch.device(device) if device is not None else resolve_device(recipe.device)
        self.manager = manager or get_plugin_manager()
        self._cache: dict[str, Any] = {}

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_recipe(cls, ref: str | Path, overrides: Iterable[str] = (), **kwargs: Any) -> "Pipeline":
        return cls(load_recipe(ref, overrides), **kwargs)

    @classmethod
    def load(cls, run_dir: str | Path, *, device: Optional[str] = None, overrides: Iterable[str] = ()) -> "Pipeline":
        """Load a run directory written by ``dalle train``."""
        run_dir = Path(run_dir)
        recipe_file = run_dir / ckpt.RECIPE_FILE
        if not recipe_file.is_file():
            raise UsageError(f"{run_dir}: not a run directory (no {ckpt.RECIPE_FILE}); train one with `dalle train RECIPE`")
        recipe = validate(apply_overrides(read_yaml(recipe_file), overrides), source=str(recipe_file))
        return cls(recipe, run_dir=run_dir, device=device)

    def build(self, kind: str, block: Any, **runtime: Any) -> Any:
        return self.manager.registry(kind).build(block, **runtime)

    def _cached(self, key: str, make) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def data(self) -> DataSource:
        return self._cached("data", lambda: self.build("data", self.recipe.data))

    @property
    def tokenizer(self) -> Tokenizer:
        return self._cached("tokenizer", lambda: self.build("tokenizer", self.recipe.tokenizer))

    def runtime(self, stage: str) -> dict[str, Any]:
        """Facts a component gets from the others (vocabulary sizes, lengths, grid)."""
        if stage != "prior":
            return {}
        codec = self.new_component("codec") if "codec" not in self._cache else self.codec
        return {
            "text_vocab_size": self.tokenizer.vocab_size,
            "text_len": self.tokenizer.text_len,
            "image_vocab_size": codec.vocab_size,
            "grid": tuple(codec.grid),
        }

    def block(self, stage: str) -> TrainedBlock:
        block = getattr(self.recipe, stage)
        if block is None:
            raise UsageError(f"recipe {self.recipe.name!r} has no {stage!r} block; add one to train or use it")
        return block

    def new_component(self, stage: str) -> torch.nn.Module:
        """A freshly initialised component for ``stage`` (on the CPU)."""
        return self.build(stage, self.block(stage), **self.runtime(stage))

    def has_weights(self, stage: str) -> bool:
        return (self.run_dir / stage / ckpt.WEIGHTS_FILE).is_file()

    def component(self, stage: str, *, require_trained: bool = True) -> torch.nn.Module:
        def make() -> torch.nn.Module:
            module = self.new_component(stage)
            if self.has_weights(stage):
                ckpt.load_into(module, self.run_dir / stage / ckpt.WEIGHTS_FILE)
            elif require_trained:
                raise UsageError(
                    f"{self.run_dir}: the {stage} is not trained yet; run `dalle train {self.run_dir / ckpt.RECIPE_FILE} --stage {stage}`"
                )
            return module.to(self.device).eval()

        return self._cached(stage, make)

    @property
    def codec(self) -> ImageCodec:
        return self.component("codec")

    @property
    def prior(self) -> Prior:
        return self.component("prior")

    @property
    def reranker(self) -> Optional[Reranker]:
        if self.recipe.reranker is None or not self.has_weights("reranker"):
            return None
        return self.component("reranker")

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
    ) -> Generation:
        """Draw ``candidates`` images per caption, rerank, keep the best ``keep``.

        ``prime_images[C or 1, 3, H, W]`` in [0, 1] with ``prime_rows > 0`` keeps the top
        rows of each image's tokens and lets the prior complete the rest.
        Candidates of all captions are drawn ``batch_size`` at a time and only the best
        ``keep`` images per caption are held (all of them with ``keep_candidates``), so
        ``candidates=512`` needs the memory of one batch. ``on_progress(done, total)``
        counts image tokens over all candidates of all captions.
        The same ``seed`` gives the same images (on the same device and build).
        """
        if not captions:
            raise UsageError("give at least one caption")
        cfg = self.recipe.generate
        n = candidates or cfg.candidates
        keep = min(keep or cfg.keep, n)
        sampling = sampling or cfg.sampling
        batch_size = cfg.batch_size if batch_size is None else batch_size
        if batch_size < 1:
            raise UsageError(f"batch size (--batch-size, generate.batch_size) must be at least 1, got {batch_size}")
        codec, prior, tokenizer = self.codec, self.prior, self.tokenizer
        # a CPU generator: host draws are then the same on every device; device draws take one seed from it
        generator = torch.Generator().manual_seed(self.recipe.seed if seed is None else seed)

        prime = None
        if prime_rows:
            if prime_images is None:
                raise UsageError("prime_rows needs prime_images")
            h, w = codec.grid
            if not 0 < prime_rows < h:
                raise UsageError(f"prime rows must be between 1 and {h - 1} (the token grid has {h} rows)")
            codes = codec.encode(_fit(prime_images.to(self.device), codec.image_size))
            codes = codes.expand(len(captions), -1) if len(codes) == 1 else codes
            if len(codes) != len(captions):
                raise UsageError(f"{len(codes)} prime images for {len(captions)} captions; give one or one per caption")
            prime = codes[:, : prime_rows * w]

        text = tokenizer.encode(captions).to(self.device)
        image_len = codec.grid[0] * codec.grid[1]
        total_rows, total_tokens = len(captions) * n, len(captions) * n * image_len
        best = RunningBest(len(captions), keep, n)
        tokens = torch.zeros(len(captions), n, image_len, dtype=torch.long)
        all_images: list[torch.Tensor] = []
        from tqdm.auto import tqdm

        bar = tqdm(total=total_tokens, desc="generate", unit="tok", disable=not progress, leave=False)
        for start in range(0, total_rows, batch_size):
            flat = torch.arange(start, min(start + batch_size, total_rows))
            caption_of, number = flat // n, flat % n  # which caption, which of its candidates
            rows_here = caption_of.to(self.device)

            def step(done: int, total: int, rows: int = len(flat), before: int = start * image_len) -> None:
                tokens_done = before + rows * done
                bar.update(tokens_done - bar.n)
                if on_progress is not None:
                    on_progress(tokens_done, total_tokens)

            track = {"on_step": step} if (progress or on_progress is not None) else {}
            part_prime = None if prime is None else prime[rows_here]
            part = prior.generate(text[rows_here], sampling, prime=part_prime, generator=generator, **track)
            decoded = codec.decode(part).clamp(0, 1)
            scores = self.score(decoded, [captions[c] for c in caption_of.tolist()])
            tokens[caption_of, number] = part.cpu()
            if keep_candidates:
                all_images.append(decoded.cpu())
            for c in caption_of.unique().tolist():
                mine = (caption_of == c).nonzero().squeeze(1)
                best.add(c, number[mine], decoded[mine.to(decoded.device)], scores[mine.to(scores.device)])
        bar.close()
        candidates_t = None
        if keep_candidates:
            candidates_t = torch.cat(all_images).view(len(captions), n, *all_images[0].shape[1:])
        return Generation(
            captions=list(captions),
            images=best.images().cpu(),
            scores=best.best_scores().cpu(),
            candidates=candidates_t,
            candidate_scores=best.scores,
            tokens=tokens,
            best=best.index().cpu(),
        )

    @torch.no_grad()
    def score(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """Reranker scores ``[B]``; NaN when the recipe has no trained reranker."""
        reranker = self.reranker
        if reranker is None:
            return torch.full((len(images),), math.nan, device=images.device)
        return reranker.score(images, captions).float()


def _fit(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``[B,3,H,W]`` to the codec's square size when they differ."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
