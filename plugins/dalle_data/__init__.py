"""Built-in plugin dalle_data: the data sources.

- ``shapes``: procedural coloured shapes with an oracle (the embedded default, no files)
- ``emoji``: Noto Color Emoji with CLDR names (apt: fonts-noto-color-emoji, unicode-data)
- ``fashion-mnist``: Fashion-MNIST with template captions (apt: dataset-fashion-mnist)
- ``folder``: your images with same-named ``.txt`` captions
- ``webdataset``: local tar shards
"""

from dalle_framework import hookimpl

from .emoji import EmojiSource
from .fashion import FashionMnistSource
from .folder import FolderSource
from .shapes import ShapesSource, caption_for, parse_caption
from .webdataset_source import WebDatasetSource

__all__ = [
    "EmojiSource",
    "FashionMnistSource",
    "FolderSource",
    "ShapesSource",
    "WebDatasetSource",
    "caption_for",
    "parse_caption",
]


@hookimpl
def dalle_register_datasources(registry):
    registry.register(ShapesSource, name="shapes")
    registry.register(EmojiSource, name="emoji")
    registry.register(FashionMnistSource, name="fashion-mnist")
    registry.register(FolderSource, name="folder")
    registry.register(WebDatasetSource, name="webdataset")
