"""dalle-framework: a plugin-based framework for DALL-E style text-to-image models.

The plugin API is what this module exports plus the modules named in
``PLUGIN_API``; a plugin imports nothing else of the framework (the test suite
checks every built-in plugin against this list):

- ``dalle_framework``: the contracts, ``Params``, ``Stage`` and ``StageSpec``, ``Registry``, errors, ``hookimpl``, ``deep_merge``;
- ``dalle_framework.attention``: ``[text | image]`` layouts, sparse patterns and their kernels;
- ``dalle_framework.sampling``: temperature, top-k/top-p and guidance over logits, token draws;
- ``dalle_framework.decoding``: fixed-shape decode steps run eagerly, compiled or as CUDA graphs;
- ``dalle_framework.nn``: convolutional codec blocks, schedules, reconstruction losses;
- ``dalle_framework.metrics``: PSNR, codebook usage, retrieval accuracy, FD, KID, precision/recall, intervals;
- ``dalle_framework.data``: image conversions, splits, shards, token shards, batches;
- ``dalle_framework.rundir``: atomic files and directories, weights, weights-only torch files;
- ``dalle_framework.distributed``: ranks, barriers and agreement between processes;
- ``dalle_framework.convert``: reading released weights (restricted unpicklers) for ``dalle convert``;
- ``dalle_framework.progress``: progress bars that ``dalle -q`` silences.
"""

from .errors import DalleError, NonFiniteError, RecipeError, RegistryError, UsageError
from .hookspecs import hookimpl
from .lazy import lazy_attributes

# The contracts import torch: loaded on first use (PEP 562), so that `dalle --help` and other
# commands that build no model start without it. The settings models (`schema`) need no torch:
# a plugin's params module imports them without loading the contracts.
_LAZY = {
    **dict.fromkeys(
        ("CaptionReading", "CodecFacts", "Component", "DataSource", "Engine", "EngineRun",
         "FeatureNetwork", "Figure", "ImageCodec", "LogitFilter", "Measurement", "Metric", "ModuleComponent", "Prior",
         "Reranker", "Sample", "StepCallback", "Tokenizer"),
        "interfaces",
    ),
    **dict.fromkeys(("PAD_ID", "AttentionBackend", "EngineSpec", "Params", "Sampling", "StageSpec", "TrainConfig",
                     "attention_patterns"), "schema"),
    "deep_merge": "recipe",
    "Registry": "registry",
    "Preview": "stage",
    "Stage": "stage",
}


__getattr__ = lazy_attributes(__name__, {name: f".{module}" for name, module in _LAZY.items()})


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.2.0"

PLUGIN_API = (
    "dalle_framework",
    "dalle_framework.attention",
    "dalle_framework.sampling",
    "dalle_framework.decoding",
    "dalle_framework.nn",
    "dalle_framework.metrics",
    "dalle_framework.data",
    "dalle_framework.rundir",
    "dalle_framework.distributed",
    "dalle_framework.convert",
    "dalle_framework.progress",
)

__all__ = [
    "PAD_ID",
    "AttentionBackend",
    "PLUGIN_API",
    "CaptionReading",
    "CodecFacts",
    "Component",
    "DalleError",
    "DataSource",
    "Engine",
    "EngineRun",
    "EngineSpec",
    "FeatureNetwork",
    "Figure",
    "ImageCodec",
    "LogitFilter",
    "Measurement",
    "Metric",
    "ModuleComponent",
    "NonFiniteError",
    "Params",
    "Preview",
    "Prior",
    "RecipeError",
    "Registry",
    "RegistryError",
    "Reranker",
    "Sample",
    "Sampling",
    "Stage",
    "StageSpec",
    "StepCallback",
    "Tokenizer",
    "TrainConfig",
    "UsageError",
    "attention_patterns",
    "deep_merge",
    "hookimpl",
    "lazy_attributes",
]
