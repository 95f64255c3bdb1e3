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

from dalle_framework import Params, hookimpl, lazy_attributes

from .params import (
    CodecSpec,
    CodecTrain,
    DistributionParams,
    InceptionV3Params,
    KidParams,
    PrdcParams,
    PriorSpec,
    RerankerFeaturesParams,
    RerankerSpec,
    StageParams,
)

# Each class is registered by where it lives, with what it declares (a stage's spec, a metric's
# params): listing plugins and checking recipes import none of this plugin's torch code.


@hookimpl
def dalle_register_stages(registry):
    registry.register("dalle_stages.codec:CodecStage", name="codec", declared=CodecSpec)
    registry.register("dalle_stages.prior:PriorStage", name="prior", declared=PriorSpec)
    registry.register("dalle_stages.reranker:RerankerStage", name="reranker", declared=RerankerSpec)


@hookimpl
def dalle_register_metrics(registry):
    for name, target, params in (
        ("reconstruction", "Reconstruction", StageParams),
        ("bits-per-token", "BitsPerToken", StageParams),
        ("retrieval", "Retrieval", StageParams),
        ("faithfulness", "Faithfulness", Params),
        ("reranker-score", "RerankerScore", Params),
        ("fd", "FrechetDistance", DistributionParams),
        ("kid", "KernelInceptionDistance", KidParams),
        ("prdc", "PrecisionRecall", PrdcParams),
    ):
        registry.register(f"dalle_stages.metrics:{target}", name=name, params=params)


@hookimpl
def dalle_register_feature_networks(registry):
    registry.register("dalle_stages.features:RerankerFeatures", name="reranker", params=RerankerFeaturesParams)
    registry.register("dalle_stages.features:JudgeFeatures", name="judge", params=Params)
    registry.register("dalle_stages.inception:InceptionV3Features", name="inception-v3", params=InceptionV3Params)


__getattr__ = lazy_attributes(__name__, {"CodecStage": ".codec", "PriorStage": ".prior", "RerankerStage": ".reranker", "encode_split": ".prior"})
__all__ = ["CodecStage", "CodecTrain", "PriorStage", "RerankerStage", "encode_split"]
