"""Built-in plugin dalle_vqgan: taming-transformers VQGAN and Gumbel-VQ (``vqgan``).

Convert a released checkpoint once with
``dalle convert vqgan last.ckpt config.yaml OUT``; recipes then load
``OUT/model.safetensors``.
"""

from dalle_framework import hookimpl

from .model import VQGAN


@hookimpl
def dalle_register_codecs(registry):
    registry.register(VQGAN, name="vqgan")


__all__ = ["VQGAN"]
