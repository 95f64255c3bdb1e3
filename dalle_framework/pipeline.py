"""A pipeline: the components a recipe names, built and (when trained) loaded.

    >>> pipe = Pipeline.load("runs/shapes-demo")
    >>> result = pipe.generate(["a red circle in the top left"], candidates=16, keep=4, seed=0)
    >>> result.images.shape        # [captions, keep, 3, H, W] in [0, 1]
    >>> result.pil()[0][0].save("best.png")
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from . import checkpoint as ckpt
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
    candidates of each caption, best first; ``candidates`` / ``candidate_scores``
    hold all ``N`` drawn per caption in sampling order (scores are NaN without a reranker).
    """

    captions: list[str]
    images: torch.Tensor
    scores: torch.Tensor
    candidates: torch.Tensor
    candidate_scores: torch.Tensor
    tokens: torch.Tensor

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
        on_progress: Optional[Callable[[int, int], None]] = None,
    ) -> Generation:
        """Draw ``candidates`` images per caption, rerank, keep the best ``keep``.

        ``prime_images[C or 1, 3, H, W]`` in [0, 1] with ``prime_rows > 0`` keeps the top
        rows of each image's tokens and lets the prior complete the rest.
        The same ``seed`` gives the same images (on the same device and build).
        ``on_progress(done_tokens, total_tokens)`` counts image tokens drawn over all
        candidates of all captions (after each token; after each batch for a prior whose
        ``generate`` takes no ``on_step``). An exception it raises stops generation.
        """
        if not captions:
            raise UsageError("give at least one caption")
        cfg = self.recipe.generate
        n = candidates or cfg.candidates
        keep = min(keep or cfg.keep, n)
        sampling = sampling or cfg.sampling
        batch_size = batch_size or cfg.batch_size
        codec, prior, tokenizer = self.codec, self.prior, self.tokenizer
        generator = torch.Generator(self.device).manual_seed(self.recipe.seed if seed is None else seed)

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
            prime = codes[:, : prime_rows * w].repeat_interleave(n, dim=0)

        text = tokenizer.encode(captions).to(self.device).repeat_interleave(n, dim=0)
        flat_captions = [c for c in captions for _ in range(n)]
        tokens, images, scores = [], [], []
        from tqdm.auto import tqdm

        batches = range(0, len(text), batch_size)
        per_image = codec.tokens_per_image
        stepwise = on_progress is not None and "on_step" in inspect.signature(prior.generate).parameters
        for start in tqdm(batches, desc="generate", disable=not progress, leave=False):
            end = start + batch_size
            rows = len(text[start:end])
            hook = {}
            if stepwise:
                hook["on_step"] = lambda done, _total, start=start, rows=rows: on_progress(
                    start * per_image + done * rows, len(text) * per_image
                )
            part = prior.generate(
                text[start:end], sampling, prime=None if prime is None else prime[start:end], generator=generator, **hook
            )
            if on_progress is not None and not stepwise:
                on_progress((start + rows) * per_image, len(text) * per_image)
            decoded = codec.decode(part).clamp(0, 1)
            tokens.append(part)
            images.append(decoded)
            scores.append(self.score(decoded, flat_captions[start:end]))
        tokens_t = torch.cat(tokens).view(len(captions), n, -1)
        images_t = torch.cat(images).view(len(captions), n, *images[0].shape[1:])
        scores_t = torch.cat(scores).view(len(captions), n)
        if scores_t.isnan().all():  # no reranker: keep the first candidates drawn
            order = torch.arange(n, device=scores_t.device).expand(len(captions), n)
        else:
            order = scores_t.argsort(dim=1, descending=True, stable=True)
        best = order[:, :keep]
        rows = torch.arange(len(captions), device=best.device)[:, None]
        return Generation(
            captions=list(captions),
            images=images_t[rows, best].cpu(),
            scores=scores_t.gather(1, best).cpu(),
            candidates=images_t.cpu(),
            candidate_scores=scores_t.cpu(),
            tokens=tokens_t.cpu(),
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
