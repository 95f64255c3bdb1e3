"""Built-in plugin dalle_dvae: the DALL-E paper's Gumbel-softmax discrete VAE (``gumbel-dvae``)."""

from dalle_framework import hookimpl

from .model import GumbelDVAE


@hookimpl
def dalle_register_codecs(registry):
    registry.register(GumbelDVAE, name="gumbel-dvae")


__all__ = ["GumbelDVAE"]
