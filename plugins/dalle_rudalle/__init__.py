"""Built-in plugin dalle_rudalle: ruDALL-E's prior (``rudalle``) and tokenizer (``rudalle-bpe``).

Convert the released files once, then name the blocks in a recipe (its codec is
``rudalle-vqgan`` from ``dalle_vqgan``):

    dalle convert rudalle-bpe bpe.model OUT/tokenizer
    dalle convert rudalle pytorch_model_v3.bin OUT/prior

Registered by where they live, with their params: listing plugins and checking recipes import no torch.
"""

from dalle_framework import hookimpl, lazy_attributes

from .params import RudalleParams, RudalleTokenizerParams


@hookimpl
def dalle_register_priors(registry):
    registry.register("dalle_rudalle.model:RudallePrior", name="rudalle", params=RudalleParams)


@hookimpl
def dalle_register_tokenizers(registry):
    registry.register("dalle_rudalle.tokenizer:RudalleTokenizer", name="rudalle-bpe", params=RudalleTokenizerParams)


__getattr__ = lazy_attributes(__name__, {"RudallePrior": ".model", "RudalleTokenizer": ".tokenizer"})
__all__ = ["RudalleParams", "RudallePrior", "RudalleTokenizer", "RudalleTokenizerParams"]
