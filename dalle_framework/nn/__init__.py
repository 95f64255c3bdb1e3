"""Core neural building blocks shared by image codecs (and open to third-party plugins).

- :mod:`.conv`: the DALL-E discrete VAE's encoder / decoder (bottleneck residual
  groups, max-pool down, nearest-neighbour up).
- :mod:`.codebook`: nearest-code lookup, data-dependent sampling of code vectors, token grids,
  the KL to a uniform prior over codes, the check of a codec's input images.
- :mod:`.recon`: reconstruction likelihoods (logit-Laplace, MSE) behind one interface.
- :mod:`.schedules`: step schedules (cosine) for temperature, KL weight, etc.
"""

from .codebook import check_images, kl_to_uniform, nearest_code, sample_rows, token_grid
from .conv import BottleneckBlock, ConvCodecParams, ConvDecoder, ConvEncoder
from .recon import RECONSTRUCTIONS, LogitLaplace, MeanSquaredError, Reconstruction
from .schedules import cosine_schedule

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
