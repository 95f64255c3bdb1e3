"""Core neural building blocks shared by image codecs (and open to third-party plugins).

- :mod:`.conv`: the DALL-E discrete VAE's encoder / decoder (bottleneck residual
  groups, max-pool down, nearest-neighbour up).
- :mod:`.codebook`: nearest-code lookup, data-dependent sampling of code vectors, token grids.
- :mod:`.recon`: reconstruction likelihoods (logit-Laplace, MSE) behind one interface.
- :mod:`.schedules`: step schedules (cosine) for temperature, KL weight, etc.
"""

from .codebook import nearest_code, sample_rows, token_grid
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
    "cosine_schedule",
    "nearest_code",
    "sample_rows",
    "token_grid",
]
