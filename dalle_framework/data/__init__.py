"""Core data IO shared by data sources, training and the CLI.

- :mod:`.batches`: resumable shuffled batches (the data position of a run)
- :mod:`.images`: image conversions, ``square_resize``, ``load_split``, ``split_batches``, ``save_grid``,
  ``captioned_grid`` (a caption beside each row of images, scores under them)
- :mod:`.shards`: write any :class:`~dalle_framework.DataSource` as webdataset tar shards
- :mod:`.tokens`: safetensors shards of pre-computed text + image tokens (stage 2)
- :mod:`.stream`: a split read from shard files as a stream (exact epochs over ranks and workers, resumable)
"""

from .batches import ShuffledBatches, chunks
from .images import (
    as_model_images,
    captioned_grid,
    decode_image,
    fit_images,
    image_tensor,
    load_split,
    save_captioned_grid,
    save_grid,
    split_batches,
    square_resize,
    to_pil,
    to_tensor,
)
from .shards import write_shards
from .tokens import load_token_shard, load_token_shards, save_token_shard, token_shard_header

__all__ = [
    "ShuffledBatches",
    "as_model_images",
    "chunks",
    "captioned_grid",
    "decode_image",
    "fit_images",
    "image_tensor",
    "load_split",
    "load_token_shard",
    "load_token_shards",
    "save_captioned_grid",
    "save_grid",
    "save_token_shard",
    "split_batches",
    "square_resize",
    "to_pil",
    "to_tensor",
    "token_shard_header",
    "write_shards",
]
