"""Core data IO shared by data sources, training and the CLI.

- :mod:`.images`: image conversions, ``square_resize``, ``load_split``, ``batches``, ``save_grid``,
  ``captioned_grid`` (a caption beside each row of images, scores under them)
- :mod:`.shards`: write any :class:`~dalle_framework.DataSource` as webdataset tar shards
- :mod:`.tokens`: safetensors shards of pre-computed text + image tokens (stage 2)
"""

from .images import batches, captioned_grid, decode_image, load_split, save_captioned_grid, save_grid, square_resize, to_pil, to_tensor
from .shards import folder_to_shards, shards_command, write_shards
from .tokens import atomic_write_bytes, load_token_shard, load_token_shards, save_token_shard

__all__ = [
    "atomic_write_bytes",
    "batches",
    "captioned_grid",
    "decode_image",
    "folder_to_shards",
    "load_split",
    "load_token_shard",
    "load_token_shards",
    "save_captioned_grid",
    "save_grid",
    "save_token_shard",
    "shards_command",
    "square_resize",
    "to_pil",
    "to_tensor",
    "write_shards",
]
