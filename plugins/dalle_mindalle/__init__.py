"""Built-in plugin dalle_mindalle: DALL-E Mini / Mega as min-dalle runs them (``min-dalle`` prior, ``min-dalle-bpe`` tokenizer).

Convert the released files once, then name the blocks in a recipe (its codec is
``min-dalle-vqgan`` from ``dalle_vqgan``):

    dalle convert min-dalle-bpe vocab.json merges.txt OUT/tokenizer
    dalle convert min-dalle encoder.pt decoder.pt OUT/prior
"""

from dalle_framework import hookimpl

from .model import MinDallePrior
from .tokenizer import MinDalleTokenizer


@hookimpl
def dalle_register_priors(registry):
    registry.register(MinDallePrior, name="min-dalle")


@hookimpl
def dalle_register_tokenizers(registry):
    registry.register(MinDalleTokenizer, name="min-dalle-bpe")


__all__ = ["MinDallePrior", "MinDalleTokenizer"]
