"""dalle-framework: a plugin-based framework for DALL-E style text-to-image models.

The public API for plugin authors is what this module exports.
"""

from .errors import DalleError, RecipeError, RegistryError, UsageError
from .hookspecs import hookimpl
from .interfaces import (
    PAD_ID,
    Component,
    DataSource,
    Engine,
    EngineRun,
    ImageCodec,
    Params,
    Prior,
    Reranker,
    Sample,
    Sampling,
    Tokenizer,
)
from .registry import Registry

__version__ = "0.1.0"

__all__ = [
    "PAD_ID",
    "Component",
    "DalleError",
    "DataSource",
    "Engine",
    "EngineRun",
    "ImageCodec",
    "Params",
    "Prior",
    "RecipeError",
    "Registry",
    "RegistryError",
    "Reranker",
    "Sample",
    "Sampling",
    "Tokenizer",
    "UsageError",
    "hookimpl",
]
