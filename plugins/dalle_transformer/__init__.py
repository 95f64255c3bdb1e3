"""Built-in plugin dalle_transformer: the dense and sparse transformer priors (stage 2)."""

from dalle_framework import hookimpl

from .model import DenseTransformer, SparseTransformer, TransformerPrior


@hookimpl
def dalle_register_priors(registry):
    registry.register(DenseTransformer, name="dense-transformer")
    registry.register(SparseTransformer, name="sparse-transformer")


__all__ = ["DenseTransformer", "SparseTransformer", "TransformerPrior"]
