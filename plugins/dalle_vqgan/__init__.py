"""Built-in plugin dalle_vqgan: taming-transformers VQGAN and Gumbel-VQ (``vqgan``), ruDALL-E's
Sber VQGAN with its wavelet decoder (``rudalle-vqgan``) and min-dalle's VQGAN decoder (``min-dalle-vqgan``).

Convert a released checkpoint once with ``dalle convert vqgan last.ckpt config.yaml OUT``
(``dalle convert rudalle-vqgan FILE OUT``, ``dalle convert min-dalle-vqgan detoker.pt OUT``);
recipes then load ``OUT/model.safetensors``.
"""

from dalle_framework import hookimpl

from .model import VQGAN, MinDalleVQGAN, SberVQGAN


@hookimpl
def dalle_register_codecs(registry):
    registry.register(VQGAN, name="vqgan")
    registry.register(SberVQGAN, name="rudalle-vqgan")
    registry.register(MinDalleVQGAN, name="min-dalle-vqgan")


__all__ = ["VQGAN", "MinDalleVQGAN", "SberVQGAN"]
