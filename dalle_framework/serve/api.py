"""The JSON API's models: the server's bounds (:class:`Limits`, also ``dalle serve``'s options), a
generation request, a job as the page sees it. pydantic only, so the CLI builds its options from them
without loading anything else."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, create_model

from ..schema import Sampling


class Limits(BaseModel):
    """What one server accepts. Each field is a ``dalle serve`` option of the same name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_queue: int = Field(8, ge=1, description="jobs waiting or running at once; one more is refused with 429")
    max_candidates: int = Field(64, ge=1, description="images drawn per request")
    max_keep: int = Field(16, ge=1, description="best images kept per request")
    max_caption_chars: int = Field(200, ge=1, description="characters in a caption")
    max_seconds: float = Field(120.0, gt=0, description="run time of one job; a job that takes longer is stopped and failed")
    max_results: int = Field(32, ge=1, description="finished jobs whose images are kept in memory; older ones are evicted")


# ----------------------------------------------------------------------------- API models


# The Sampling fields a request may change, each with what the page shows beside its box: what raising
# or lowering the value does. The request's fields are made from Sampling's (name, type, bounds).
PAGE_SETTINGS = {
    "temperature": "softmax temperature of each token draw: higher gives more varied, stranger images; lower, safer and more alike ones",
    "top_k": "draw only among the k most likely tokens: higher (or none) gives more varied images; lower, safer and more alike ones",
    "top_p": "draw only within this nucleus probability mass: higher (up to 1, or none) gives more varied images; lower, safer and more alike ones",
    "guidance_scale": "classifier-free guidance scale: higher follows the caption more closely but varies less; lower, toward 1 (off), varies more",
}
OLDER_NAMES = {"guidance_scale": "guidance"}  # what the page sent before its fields were Sampling's


class _Request(BaseModel):
    """One caption to draw images for. Options left out take the recipe's ``generate`` defaults (``GET /run``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    caption: str = Field(..., min_length=1, description="the text to draw; at most limits.max_caption_chars characters")
    candidates: Optional[int] = Field(None, ge=1, description="images drawn, then ranked by the reranker; at most limits.max_candidates")
    keep: Optional[int] = Field(None, ge=1, description="best candidates returned; at most candidates and limits.max_keep")
    seed: Optional[int] = Field(
        None, ge=0, lt=2**63, description="random seed; the same seed and options give byte-identical PNGs. Default: a fresh one, reported in the job"
    )


def _setting(name: str, effect: str) -> tuple[Any, Any]:
    """A request field for one Sampling field: its type and bounds, optional, with the page's line on it."""
    field = Sampling.model_fields[name]
    kind = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation  # bounds stay
    alias = AliasChoices(name, OLDER_NAMES[name]) if name in OLDER_NAMES else None
    return Optional[kind], Field(None, validation_alias=alias, description=effect)


GenerateRequest = create_model("GenerateRequest", __base__=_Request, __module__=__name__, __doc__=_Request.__doc__,
                               **{name: _setting(name, effect) for name, effect in PAGE_SETTINGS.items()})


class Progress(BaseModel):
    done: int = Field(description="image tokens drawn so far, over all candidates")
    total: int = Field(description="image tokens to draw: candidates x tokens per image")


class ImageOut(BaseModel):
    rank: int = Field(description="1 = best by reranker score")
    url: str = Field(description="the PNG at the image's size, served as image/png")
    score: Optional[float] = Field(description="reranker score (higher matches the caption better); null without a reranker")


class JobOut(BaseModel):
    id: str = Field(description="random job id")
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    caption: str
    seen_as: str = Field(description="the caption as the tokenizer reads it (unknown words, truncation)")
    candidates: int
    keep: int
    sampling: dict[str, Any] = Field(description="the sampling options used (recipe defaults with the request's changes)")
    seed: int = Field(description="the seed used; send it again to get the same images")
    queue_position: Optional[int] = Field(description="1 = next to run; null once running")
    progress: Progress
    elapsed: Optional[float] = Field(description="seconds since the job started running")
    error: Optional[str] = Field(description="why a failed job failed; null otherwise")
    cancel_requested: bool = Field(description="a cancel was asked for; a running job stops at its next drawn token")
    images: list[ImageOut] = Field(description="best first; empty until done (and for a failed or cancelled job)")
    grid_url: Optional[str] = Field(description="all kept images in one PNG with the caption and scores; null until done")


class ErrorOut(BaseModel):
    detail: str = Field(description="what is wrong, naming the field and the bound or the fix")


