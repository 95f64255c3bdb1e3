"""Built-in plugin dalle_rudalle: ruDALL-E's prior (``rudalle``) and tokenizer (``rudalle-bpe``).

Convert the released files once, then name the blocks in a recipe (its codec is
``rudalle-vqgan`` from ``dalle_vqgan``):

    dalle convert rudalle-bpe bpe.model OUT/tokenizer
    dalle convert rudalle pytorch_model_v3.bin OUT/prior
"""

from dalle_framework import hookimpl

from .model import RudallePrior
from .tokenizer import RudalleTokenizer


@hookimpl
def dalle_register_priors(registry):
    registry.register(RudallePrior, name="rudalle")


@hookimpl
def dalle_register_tokenizers(registry):
    registry.register(RudalleTokenizer, name="rudalle-bpe")


__all__ = ["RudallePrior", "RudalleTokenizer"]
