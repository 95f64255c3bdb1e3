"""Core neural building blocks shared by image codecs (and open to third-party plugins).

- :mod:`.conv`: the DALL-E discrete VAE's encoder / decoder (bottleneck residual
  groups, max-pool down, nearest-neighbour up).
- :mod:`.codebook`: nearest-code lookup, data-dependent sampling of code vectors, token grids,
  the KL to a uniform prior over codes, the check of a codec's input images.
- :mod:`.recon`: reconstruction likelihoods (logit-Laplace, MSE) behind one interface.
- :mod:`.schedules`: step schedules (cosine) for temperature, KL weight, etc.
- :mod:`.params`: ``ConvCodecParams``, the convolutional codecs' shared settings (no torch).
"""

from ..lazy import lazy_attributes

# The layers import torch: loaded on first use (PEP 562), so that a codec plugin's params module can
# import ``ConvCodecParams`` while recipes are checked without it.
_LAZY = {
    **dict.fromkeys(("check_images", "kl_to_uniform", "nearest_code", "sample_rows", "token_grid"), "codebook"),
    **dict.fromkeys(("BottleneckBlock", "ConvDecoder", "ConvEncoder"), "conv"),
    **dict.fromkeys(("RECONSTRUCTIONS", "LogitLaplace", "MeanSquaredError", "Reconstruction"), "recon"),
    "ConvCodecParams": "params",
    "cosine_schedule": "schedules",
}


__getattr__ = lazy_attributes(__name__, {name: f".{module}" for name, module in _LAZY.items()})


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "RECONSTRUCTIONS",
    "BottleneckBlock",
    "ConvCodecParams",
    "ConvDecoder",
    "ConvEncoder",
    "LogitLaplace",
    "MeanSquaredError",
    "Reconstruction",
    "check_images",
    "cosine_schedule",
    "kl_to_uniform",
    "nearest_code",
    "sample_rows",
    "token_grid",
]
