"""Built-in plugin dalle_data: the data sources.

- ``shapes``: procedural coloured shapes with an oracle (the embedded default, no files)
- ``emoji``: Noto Color Emoji with CLDR names (apt: fonts-noto-color-emoji, unicode-data)
- ``fashion-mnist``: Fashion-MNIST with template captions (apt: dataset-fashion-mnist)
- ``folder``: your images with same-named ``.txt`` captions
- ``webdataset``: local tar shards

Registered by where they live, with their params: listing plugins and checking recipes import no torch.
"""

from dalle_framework import hookimpl, lazy_attributes

from .params import (
    EmojiSourceParams,
    FashionMnistSourceParams,
    FolderSourceParams,
    ShapesSourceParams,
    WebDatasetSourceParams,
)


@hookimpl
def dalle_register_datasources(registry):
    registry.register("dalle_data.shapes:ShapesSource", name="shapes", params=ShapesSourceParams)
    registry.register("dalle_data.emoji:EmojiSource", name="emoji", params=EmojiSourceParams)
    registry.register("dalle_data.fashion:FashionMnistSource", name="fashion-mnist", params=FashionMnistSourceParams)
    registry.register("dalle_data.folder:FolderSource", name="folder", params=FolderSourceParams)
    registry.register("dalle_data.webdataset_source:WebDatasetSource", name="webdataset", params=WebDatasetSourceParams)


__getattr__ = lazy_attributes(
    __name__,
    {
        "EmojiSource": ".emoji",
        "FashionMnistSource": ".fashion",
        "FolderSource": ".folder",
        "ShapesSource": ".shapes",
        "WebDatasetSource": ".webdataset_source",
        "caption_for": ".shapes",
        "parse_caption": ".shapes",
    },
)
__all__ = [
    "EmojiSource",
    "EmojiSourceParams",
    "FashionMnistSource",
    "FashionMnistSourceParams",
    "FolderSource",
    "FolderSourceParams",
    "ShapesSource",
    "ShapesSourceParams",
    "WebDatasetSource",
    "WebDatasetSourceParams",
    "caption_for",
    "parse_caption",
]
