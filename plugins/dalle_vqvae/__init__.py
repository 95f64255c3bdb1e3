"""Built-in plugin dalle_vqvae: VQ-VAE with EMA codebook and dead-code restarts (``vq-vae``).

Registered by where it lives, with its params: listing plugins and checking recipes import no torch.
"""

from dalle_framework import hookimpl, lazy_attributes

from .params import VQVAEParams


@hookimpl
def dalle_register_codecs(registry):
    registry.register("dalle_vqvae.model:VQVAE", name="vq-vae", params=VQVAEParams)


__getattr__ = lazy_attributes(__name__, {"VQVAE": ".model", "EMACodebook": ".model"})
__all__ = ["VQVAE", "EMACodebook", "VQVAEParams"]
