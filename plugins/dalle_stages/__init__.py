"""Built-in plugin dalle_stages: the three stages of DALL-E, each described in one class.

- ``codec``: stage 1, an image codec trained on the recipe's images;
- ``prior``: stage 2, a transformer over text and the frozen codec's image tokens;
- ``reranker``: a contrastive image-text model that ranks generated candidates.

A plugin adds a stage the same way: a :class:`dalle_framework.Stage` subclass
registered through ``dalle_register_stages``.
"""

from dalle_framework import hookimpl

from .codec import CodecStage, CodecTrain
from .prior import PriorStage, encode_split
from .reranker import RerankerStage


@hookimpl
def dalle_register_stages(registry):
    registry.register(CodecStage, name="codec")
    registry.register(PriorStage, name="prior")
    registry.register(RerankerStage, name="reranker")


__all__ = ["CodecStage", "CodecTrain", "PriorStage", "RerankerStage", "encode_split"]
