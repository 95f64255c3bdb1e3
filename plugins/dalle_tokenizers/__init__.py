"""Built-in plugin dalle_tokenizers: ``words``, ``bytes``, ``clip-bpe`` and ``bpe`` (trained on your captions).

All reserve id 0 (``dalle_framework.PAD_ID``) for padding on the right.
"""

from dalle_framework import hookimpl

from .bpe import BpeTokenizer
from .bytes import ByteTokenizer
from .clip_bpe import ClipBpeTokenizer
from .words import SHAPES_VOCAB, WordTokenizer, split_words, vocab_from_captions

__all__ = ["SHAPES_VOCAB", "BpeTokenizer", "ByteTokenizer", "ClipBpeTokenizer", "WordTokenizer", "split_words", "vocab_from_captions"]


@hookimpl
def dalle_register_tokenizers(registry):
    registry.register(WordTokenizer, name="words")
    registry.register(ByteTokenizer, name="bytes")
    registry.register(ClipBpeTokenizer, name="clip-bpe")
    registry.register(BpeTokenizer, name="bpe")
