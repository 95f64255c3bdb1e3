"""Built-in plugin dalle_stages: the three stages of DALL-E, each described in one class.

- ``codec``: stage 1, an image codec trained on the recipe's images;
- ``prior``: stage 2, a transformer over text and the frozen codec's image tokens;
- ``reranker``: a contrastive image-text model that ranks generated candidates.

It also registers how a run is measured: the built-in metrics of ``dalle evaluate``
(each stage's held-out report, faithfulness, reranker score, FD, KID, precision/recall)
and the feature networks distribution metrics read (the run's reranker and judge,
Inception-v3 from a weights file).

A plugin adds a stage the same way: a :class:`dalle_framework.Stage` subclass
registered through ``dalle_register_stages`` (a metric: a :class:`dalle_framework.Metric`
through ``dalle_register_metrics``).
"""

from dalle_framework import hookimpl

from .codec import CodecStage, CodecTrain
from .features import JudgeFeatures, RerankerFeatures
from .inception import InceptionV3Features
from .metrics import (
    BitsPerToken,
    Faithfulness,
    FrechetDistance,
    KernelInceptionDistance,
    PrecisionRecall,
    Reconstruction,
    RerankerScore,
    Retrieval,
)
from .prior import PriorStage, encode_split
from .reranker import RerankerStage


@hookimpl
def dalle_register_stages(registry):
    registry.register(CodecStage, name="codec")
    registry.register(PriorStage, name="prior")
    registry.register(RerankerStage, name="reranker")


@hookimpl
def dalle_register_metrics(registry):
    registry.register(Reconstruction, name="reconstruction")
    registry.register(BitsPerToken, name="bits-per-token")
    registry.register(Retrieval, name="retrieval")
    registry.register(Faithfulness, name="faithfulness")
    registry.register(RerankerScore, name="reranker-score")
    registry.register(FrechetDistance, name="fd")
    registry.register(KernelInceptionDistance, name="kid")
    registry.register(PrecisionRecall, name="prdc")


@hookimpl
def dalle_register_feature_networks(registry):
    registry.register(RerankerFeatures, name="reranker")
    registry.register(JudgeFeatures, name="judge")
    registry.register(InceptionV3Features, name="inception-v3")


__all__ = ["CodecStage", "CodecTrain", "PriorStage", "RerankerStage", "encode_split"]
