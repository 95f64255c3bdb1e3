"""Built-in plugin dalle_vqgan: taming-transformers VQGAN and Gumbel-VQ (``vqgan``), ruDALL-E's
Sber VQGAN with its wavelet decoder (``rudalle-vqgan``) and min-dalle's VQGAN decoder (``min-dalle-vqgan``).

Convert a released checkpoint once with ``dalle convert vqgan last.ckpt config.yaml OUT``
(``dalle convert rudalle-vqgan FILE OUT``, ``dalle convert min-dalle-vqgan detoker.pt OUT``);
recipes then load ``OUT/model.safetensors``.

Registered by where they live, with their params: listing plugins and checking recipes import no torch.
"""

from dalle_framework import hookimpl, lazy_attributes

from .params import MinDalleVQGANParams, SberVQGANParams, VQGANParams


@hookimpl
def dalle_register_codecs(registry):
    registry.register("dalle_vqgan.model:VQGAN", name="vqgan", params=VQGANParams)
    registry.register("dalle_vqgan.model:SberVQGAN", name="rudalle-vqgan", params=SberVQGANParams)
    registry.register("dalle_vqgan.model:MinDalleVQGAN", name="min-dalle-vqgan", params=MinDalleVQGANParams)


__getattr__ = lazy_attributes(__name__, {"VQGAN": ".model", "MinDalleVQGAN": ".model", "SberVQGAN": ".model"})
__all__ = ["VQGAN", "MinDalleVQGAN", "SberVQGAN", "VQGANParams", "SberVQGANParams", "MinDalleVQGANParams"]
