"""Built-in plugin dalle_openai_dvae: OpenAI's released DALL-E dVAE (``openai-dvae``).

Convert the released ``encoder.pkl`` / ``decoder.pkl`` once with
``dalle convert openai-dvae encoder.pkl decoder.pkl OUT --trust-pickle``; recipes
then load ``OUT/model.safetensors``.
"""

from dalle_framework import hookimpl

from .model import OpenAIDVAE


@hookimpl
def dalle_register_codecs(registry):
    registry.register(OpenAIDVAE, name="openai-dvae")


__all__ = ["OpenAIDVAE"]
