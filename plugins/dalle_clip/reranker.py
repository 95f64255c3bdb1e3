"""CLIP reranker (Radford et al. 2021) built on open_clip.

DALL-E draws many candidates per caption and keeps the ones a contrastive
image-text model likes best. This module wraps an open_clip model as the
framework's :class:`~dalle_framework.Reranker`:

- ``score(images[B,3,H,W] in [0,1], texts[B]) -> FloatTensor[B]``: the cosine
  similarity of each image with its own caption, in ``[-1, 1]``. Plain cosine
  (not multiplied by the learned logit scale) so scores compare across
  checkpoints and training steps.
- ``loss(images, texts) -> dict``: open_clip's symmetric contrastive loss
  (:class:`open_clip.loss.ClipLoss`), plus in-batch retrieval accuracies to log.
- ``similarity(images[N], texts[M]) -> FloatTensor[N, M]``: one embedding per
  image and per caption, so held-out retrieval (the contract's
  ``retrieval_metrics``) costs N + M encodings instead of N * M.

Models are never downloaded: an architecture is built untrained
(``pretrained=None``) or from a small config dict, and weights come only from a
local file. ``open_clip`` is imported inside functions because importing it costs
seconds and the plugin manager imports every plugin on each CLI start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import dalle_framework
from dalle_framework import UsageError, distributed

from .params import ClipParams, _pair


# open_clip clamps the learned temperature at 100 during training.
MAX_LOGIT_SCALE = 100.0


# ----------------------------------------------------------------------------- the reranker


class ClipReranker(dalle_framework.Reranker):
    """A CLIP image/text dual encoder that scores caption faithfulness.

    Built as ``ClipReranker(params)``; the open_clip model is ``self.clip`` so the
    framework's exported ``state_dict`` has keys ``clip.<open_clip key>``.
    """

    Params = ClipParams

    def __init__(self, params: ClipParams) -> None:
        super().__init__()
        self.params = params
        self.clip, self.tokenizer = _build(params)
        self.image_size: tuple[int, int] = _pair(self.clip.visual.image_size)
        self.context_length: int = int(self.clip.context_length)
        from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        # Buffers so .to(device) moves them; not persistent so weights files stay pure open_clip.
        self.register_buffer("mean", torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1), persistent=False)
        if params.weights is not None:
            self.load_weights(params.weights)

    # ------------------------------------------------------------------ inputs

    @property
    def device(self) -> torch.device:
        return self.clip.logit_scale.device

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``[B,3,H,W]`` in [0,1] -> ``[B,3,h,w]`` resized to the model's size and normalised like CLIP."""
        assert images.ndim == 4 and images.shape[1] == 3, f"images must be [B,3,H,W], got {tuple(images.shape)}"
        assert images.is_floating_point(), f"images must be float in [0,1], got {images.dtype}"
        images = images.to(self.device, self.mean.dtype)
        if tuple(images.shape[-2:]) != self.image_size:
            images = F.interpolate(images, size=self.image_size, mode=self.params.interpolation, antialias=True, align_corners=False)
        return (images - self.mean) / self.std

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """``list[str]`` of B -> ``LongTensor[B, context_length]`` (open_clip BPE, truncated)."""
        assert not isinstance(texts, str), "texts must be a list of captions, not one string"
        return self.tokenizer(list(texts), context_length=self.context_length).to(self.device)

    # ------------------------------------------------------------------ embeddings

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """``[B,3,H,W]`` in [0,1] -> unit vectors ``[B, embed_dim]``."""
        return self.clip.encode_image(self.preprocess(images), normalize=True)

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """B captions -> unit vectors ``[B, embed_dim]``."""
        return self.clip.encode_text(self.tokenize(texts), normalize=True)

    def logit_scale(self) -> torch.Tensor:
        """The learned inverse temperature, clamped at 100 as open_clip training does."""
        return self.clip.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    # ------------------------------------------------------------------ the contract

    @torch.no_grad()
    def score(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Cosine similarity of image i with caption i: ``FloatTensor[B]`` in [-1, 1], on the images' device.

        Runs in chunks of ``params.batch_size``; call ``.eval()`` first for models
        with batch norm (RN50) so a chunk's statistics don't leak into its scores.
        """
        assert len(images) == len(texts), f"{len(images)} images but {len(texts)} captions"
        chunk = self.params.batch_size
        scores = [
            (self.embed_images(images[i : i + chunk]) * self.embed_texts(texts[i : i + chunk])).sum(-1)
            for i in range(0, len(texts), chunk)
        ]
        return torch.cat(scores).float().to(images.device) if scores else images.new_zeros(0)

    def loss(self, images: torch.Tensor, texts: list[str]) -> dict[str, Any]:
        """Symmetric InfoNCE over the batch (open_clip ``ClipLoss``).

        Returns ``loss`` and, to log, ``i2t_acc`` / ``t2i_acc`` (in-batch top-1,
        where any pair with the same caption counts as a match) and ``logit_scale``.
        In training under torch.distributed the features of all ranks are gathered,
        as in open_clip training, so every rank contrasts against the global batch
        (in eval mode each rank scores its own batch: ranks evaluate the same data).
        """
        assert len(images) == len(texts), f"{len(images)} images but {len(texts)} captions"
        image_features = self.embed_images(images)
        text_features = self.embed_texts(texts)
        scale = self.logit_scale()
        loss = _clip_loss(gather=self.training)(image_features, text_features, scale)
        with torch.no_grad():
            logits = image_features @ text_features.T  # [B, B]
            same = _same_caption(texts, logits.device)
            rows = torch.arange(len(texts), device=logits.device)
            i2t = same[rows, logits.argmax(1)].float().mean()
            t2i = same[logits.argmax(0), rows].float().mean()
        return {"loss": loss, "i2t_acc": i2t, "t2i_acc": t2i, "logit_scale": scale.detach()}

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def similarity(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Cosine similarity of every image with every caption: ``[N, M]`` on CPU."""
        chunk = self.params.batch_size
        image_emb = torch.cat([self.embed_images(images[i : i + chunk]).float().cpu() for i in range(0, len(images), chunk)])
        text_emb = torch.cat([self.embed_texts(texts[i : i + chunk]).float().cpu() for i in range(0, len(texts), chunk)])
        return image_emb @ text_emb.T

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """The image tower's unit embeddings ``[B, embed_dim]`` (distribution metrics on the reranker's features)."""
        chunk = self.params.batch_size
        parts = [self.embed_images(images[i : i + chunk]).float() for i in range(0, len(images), chunk)]
        return torch.cat(parts) if parts else images.new_zeros(0, self.clip.visual.output_dim)

    # ------------------------------------------------------------------ weights

    def load_weights(self, path: str | Path) -> None:
        """Load an open_clip checkpoint (.pt/.bin, weights-only) or framework safetensors into ``self.clip``."""
        state = read_state_dict(path)
        own = self.clip.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        resized = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in own.items() if k in state and state[k].shape != v.shape]
        if missing or unexpected or resized:
            arch = repr(self.params.model) if self.params.model else "the `config` given"
            raise UsageError(
                f"reranker.params.weights: {str(path)!r} does not fit {arch}: {len(missing)} missing key(s) {missing[:3]}, "
                f"{len(unexpected)} unexpected {unexpected[:3]}, {len(resized)} of another shape {resized[:3]}; "
                "build the same architecture the checkpoint was trained with"
            )
        self.clip.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------- helpers


def _build(params: ClipParams) -> tuple[nn.Module, Any]:
    """The open_clip model (random init) and its tokenizer."""
    import open_clip

    if params.model is not None:
        # pretrained_text=False: never fetch a Hub text tower even if a config asks for one. The device is where
        # the caller builds (the meta device for `dalle inspect`): open_clip moves the model there when built.
        model = open_clip.create_model(params.model, pretrained=None, pretrained_text=False, device=torch.get_default_device())
        return model, open_clip.get_tokenizer(params.model)
    model = open_clip.CLIP(**params.config)
    return model, open_clip.SimpleTokenizer(context_length=params.config["text_cfg"].get("context_length", 77))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a local file without unpickling code.

    Accepts safetensors, or a ``torch.save`` file loaded with ``weights_only=True``;
    unwraps a ``state_dict`` key and strips the ``module.`` (DDP) and ``clip.``
    (this reranker's own state_dict) prefixes.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(
            f"reranker.params.weights: file {str(path)!r} not found; train the reranker first "
            "(`dalle train RECIPE --stage reranker`) or point `weights` at an existing open_clip/safetensors file"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickles with code objects are refused on purpose
            raise UsageError(
                f"reranker.params.weights: {str(path)!r} is not a weights-only torch checkpoint ({type(exc).__name__}); "
                "re-save it as a plain state_dict or as safetensors"
            ) from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not (isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise UsageError(f"reranker.params.weights: {str(path)!r} holds no tensor state_dict")
    for prefix in ("module.", "clip."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _clip_loss(*, gather: bool) -> nn.Module:
    """ClipLoss for this process: global-batch negatives when training distributed."""
    from open_clip import ClipLoss

    if gather and distributed.is_initialized() and distributed.world_size() > 1:
        return ClipLoss(local_loss=True, gather_with_grad=True, rank=distributed.rank(), world_size=distributed.world_size())
    return ClipLoss()


def _same_caption(texts: list[str], device: torch.device) -> torch.Tensor:
    """``BoolTensor[B, B]``: True where captions i and j are identical."""
    ids = {t: i for i, t in enumerate(dict.fromkeys(texts))}
    labels = torch.tensor([ids[t] for t in texts], device=device)
    return labels[:, None] == labels[None, :]
