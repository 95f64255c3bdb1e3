"""Built-in plugin dalle_transformer: the dense and sparse transformer priors (stage 2).

Registered by where they live, with their params: listing plugins and checking recipes import no torch.
"""

from dalle_framework import hookimpl, lazy_attributes

from .params import SparseParams, TransformerParams


@hookimpl
def dalle_register_priors(registry):
    registry.register("dalle_transformer.model:DenseTransformer", name="dense-transformer", params=TransformerParams)
    registry.register("dalle_transformer.model:SparseTransformer", name="sparse-transformer", params=SparseParams)


__getattr__ = lazy_attributes(__name__, {"DenseTransformer": ".model", "SparseTransformer": ".model", "TransformerPrior": ".model"})
__all__ = ["DenseTransformer", "SparseParams", "SparseTransformer", "TransformerParams", "TransformerPrior"]
