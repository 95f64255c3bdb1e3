"""Built-in plugin dalle_vqvae: VQ-VAE with EMA codebook and dead-code restarts (``vq-vae``)."""

from dalle_framework import hookimpl

from .model import VQVAE, EMACodebook


@hookimpl
def dalle_register_codecs(registry):
    registry.register(VQVAE, name="vq-vae")


__all__ = ["VQVAE", "EMACodebook"]
