"""Built-in plugin dalle_mindalle: DALL-E Mini / Mega as min-dalle runs them (``min-dalle`` prior, ``min-dalle-bpe`` tokenizer).

Convert the released files once, then name the blocks in a recipe (its codec is
``min-dalle-vqgan`` from ``dalle_vqgan``):

    dalle convert min-dalle-bpe vocab.json merges.txt OUT/tokenizer
    dalle convert min-dalle encoder.pt decoder.pt OUT/prior

Registered by where they live, with their params: listing plugins and checking recipes import no torch.
"""

from dalle_framework import hookimpl, lazy_attributes

from .params import MinDalleParams, MinDalleTokenizerParams


@hookimpl
def dalle_register_priors(registry):
    registry.register("dalle_mindalle.model:MinDallePrior", name="min-dalle", params=MinDalleParams)


@hookimpl
def dalle_register_tokenizers(registry):
    registry.register("dalle_mindalle.tokenizer:MinDalleTokenizer", name="min-dalle-bpe", params=MinDalleTokenizerParams)


__getattr__ = lazy_attributes(__name__, {"MinDallePrior": ".model", "MinDalleTokenizer": ".tokenizer"})
__all__ = ["MinDalleParams", "MinDallePrior", "MinDalleTokenizer", "MinDalleTokenizerParams"]
