"""Built-in plugin dalle_tokenizers: ``words``, ``bytes``, ``clip-bpe`` and ``bpe`` (trained on your captions).

All reserve id 0 (``dalle_framework.PAD_ID``) for padding on the right.
Registered by where they live, with their params: listing plugins and checking recipes import no torch.
"""

from dalle_framework import hookimpl, lazy_attributes

from .params import BpeTokenizerParams, ByteTokenizerParams, ClipBpeTokenizerParams, WordTokenizerParams


@hookimpl
def dalle_register_tokenizers(registry):
    registry.register("dalle_tokenizers.words:WordTokenizer", name="words", params=WordTokenizerParams)
    registry.register("dalle_tokenizers.bytes:ByteTokenizer", name="bytes", params=ByteTokenizerParams)
    registry.register("dalle_tokenizers.clip_bpe:ClipBpeTokenizer", name="clip-bpe", params=ClipBpeTokenizerParams)
    registry.register("dalle_tokenizers.bpe:BpeTokenizer", name="bpe", params=BpeTokenizerParams)


__getattr__ = lazy_attributes(
    __name__,
    {
        "SHAPES_VOCAB": ".params",
        "split_words": ".params",
        "BpeTokenizer": ".bpe",
        "ByteTokenizer": ".bytes",
        "ClipBpeTokenizer": ".clip_bpe",
        "WordTokenizer": ".words",
        "vocab_from_captions": ".words",
    },
)
__all__ = [
    "SHAPES_VOCAB",
    "BpeTokenizer",
    "BpeTokenizerParams",
    "ByteTokenizer",
    "ByteTokenizerParams",
    "ClipBpeTokenizer",
    "ClipBpeTokenizerParams",
    "WordTokenizer",
    "WordTokenizerParams",
    "split_words",
    "vocab_from_captions",
]
