"""Built-in plugin dalle_dvae: the DALL-E paper's Gumbel-softmax discrete VAE (``gumbel-dvae``).

Registered by where it lives, with its params: listing plugins and checking recipes import no torch.
"""

from dalle_framework import hookimpl, lazy_attributes

from .params import GumbelDVAEParams


@hookimpl
def dalle_register_codecs(registry):
    registry.register("dalle_dvae.model:GumbelDVAE", name="gumbel-dvae", params=GumbelDVAEParams)


__getattr__ = lazy_attributes(__name__, {"GumbelDVAE": ".model"})
__all__ = ["GumbelDVAE", "GumbelDVAEParams"]
