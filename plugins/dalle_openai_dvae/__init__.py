"""Built-in plugin dalle_openai_dvae: OpenAI's released DALL-E dVAE (``openai-dvae``).

Convert the released ``encoder.pkl`` / ``decoder.pkl`` once with
``dalle convert openai-dvae encoder.pkl decoder.pkl OUT --trust-pickle``; recipes
then load ``OUT/model.safetensors``.

Registered by where it lives, with its params: listing plugins and checking recipes import no torch.
"""

from dalle_framework import hookimpl, lazy_attributes

from .params import OpenAIDVAEParams


@hookimpl
def dalle_register_codecs(registry):
    registry.register("dalle_openai_dvae.model:OpenAIDVAE", name="openai-dvae", params=OpenAIDVAEParams)


__getattr__ = lazy_attributes(__name__, {"OpenAIDVAE": ".model"})
__all__ = ["OpenAIDVAE", "OpenAIDVAEParams"]
