"""Inception-v3 as FID's feature network (Heusel et al. 2017), from a weights file the user points at.

FID's network is the 2015-12-05 TensorFlow Inception graph, not torchvision's: its
average-pooling branches do not count the padding, and the last block pools its branch
with a max instead of an average. The reference ports (pytorch-fid, torch-fidelity) ship
those weights as a torch state dict with torchvision's ``Inception3`` key names (1008
classes, no auxiliary head); this module builds torchvision's layers, runs them with the
TensorFlow pooling, and reads such a file (weights-only, never unpickling) or a
safetensors copy of it. Nothing is downloaded.

The two references also differ in how they feed the network, which moves FID: pytorch-fid
resizes with torch's bilinear filter and scales to [-1, 1] by ``2x - 1``; torch-fidelity
resizes like TensorFlow 1 (no half-pixel centres) and scales by ``(255x - 128) / 128``.
``preset`` picks one; images are rounded to 8 bits first, as both see them from files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalle_framework import FeatureNetwork, UsageError, rundir

from .params import InceptionV3Params

SIZE = 299  # the network's input side
PRESETS = {
    "pytorch-fid": {"filter": "bilinear (torch, align_corners=False, no antialiasing)", "scale": "2x - 1"},
    "torch-fidelity": {"filter": "bilinear (TensorFlow 1 legacy, align_corners=False)", "scale": "(255x - 128) / 128"},
}


def _avg_pool(x: Tensor) -> Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)  # TensorFlow ignores the padding


def _max_pool(x: Tensor) -> Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


def _chain(x: Tensor, block: nn.Module, *names: str) -> Tensor:
    for name in names:
        x = getattr(block, name)(x)
    return x


def _block_a(block: nn.Module, x: Tensor) -> Tensor:
    return torch.cat([
        block.branch1x1(x),
        _chain(x, block, "branch5x5_1", "branch5x5_2"),
        _chain(x, block, "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"),
        block.branch_pool(_avg_pool(x)),
    ], 1)


def _block_c(block: nn.Module, x: Tensor) -> Tensor:
    return torch.cat([
        block.branch1x1(x),
        _chain(x, block, "branch7x7_1", "branch7x7_2", "branch7x7_3"),
        _chain(x, block, *(f"branch7x7dbl_{i}" for i in range(1, 6))),
        block.branch_pool(_avg_pool(x)),
    ], 1)


def _block_e(block: nn.Module, x: Tensor, pool) -> Tensor:
    wide = block.branch3x3_1(x)
    deep = _chain(x, block, "branch3x3dbl_1", "branch3x3dbl_2")
    return torch.cat([
        block.branch1x1(x),
        block.branch3x3_2a(wide), block.branch3x3_2b(wide),
        block.branch3x3dbl_3a(deep), block.branch3x3dbl_3b(deep),
        block.branch_pool(pool(x)),
    ], 1)


class FidInception(nn.Module):
    """torchvision's ``Inception3`` layers (1008 classes, no auxiliary head) run as FID's TensorFlow graph.

    ``forward(x[B, 3, 299, 299] scaled to [-1, 1]) -> [B, 2048]``: the final average pool.
    """

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import inception_v3

        self.net = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)

    def forward(self, x: Tensor) -> Tensor:
        net = self.net
        x = _chain(x, net, "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3", "maxpool2")
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
            x = _block_a(getattr(net, name), x)
        x = net.Mixed_6a(x)
        for name in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
            x = _block_c(getattr(net, name), x)
        x = net.Mixed_7a(x)
        x = _block_e(net.Mixed_7b, x, _avg_pool)
        x = _block_e(net.Mixed_7c, x, _max_pool)  # the graph's quirk: a max pool in the last block
        return x.mean((2, 3))


def resize_tf1(x: Tensor, size: int) -> Tensor:
    """Bilinear resize as TensorFlow 1's ``resize_bilinear(align_corners=False)``: source = target * in / out, no half-pixel shift."""
    for dim in (-2, -1):
        n = x.shape[dim]
        source = torch.arange(size, dtype=torch.float64) * (n / size)
        low = source.floor().long().clamp(max=n - 1)
        high = (low + 1).clamp(max=n - 1)
        weight = (source - low).to(x.dtype)
        shape = [1] * x.ndim
        shape[dim] = size
        weight = weight.view(shape)
        x = x.index_select(dim, low) * (1 - weight) + x.index_select(dim, high) * weight
    return x


def read_inception_weights(path: Path) -> dict[str, Tensor]:
    """A state dict from ``.safetensors`` or a torch file read weights-only (a pickle with code is refused)."""
    if not path.is_file():
        raise UsageError(
            f"evaluate.features: Inception weights {path} not found; point `weights` at the FID Inception file "
            "(pt_inception-2015-12-05-6726825d.pth as pytorch-fid ships it, or a safetensors copy)"
        )
    state = rundir.load_weights(path) if path.suffix == ".safetensors" else rundir.load_torch(path)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UsageError(f"evaluate.features: {path} is not a state dict of tensors")
    return state


class InceptionV3Features(FeatureNetwork):
    """Inception-v3's 2048-d pool features, FID's network, loaded from a weights file (nothing is downloaded)."""

    Params = InceptionV3Params

    def __init__(self, params: InceptionV3Params, *, pipe: Any) -> None:
        super().__init__(params, pipe=pipe)
        self.path = Path(params.weights).expanduser()
        if not self.path.is_file():  # a network the user configured and cannot have is an error, not a skipped figure
            read_inception_weights(self.path)
        self._net: FidInception | None = None

    @property
    def net(self) -> FidInception:
        if self._net is None:
            net = FidInception()
            state = read_inception_weights(self.path)
            result = net.net.load_state_dict(state, strict=False)
            if result.missing_keys or result.unexpected_keys:
                raise UsageError(
                    f"evaluate.features: {self.path} does not fit Inception-v3 (torchvision Inception3, 1008 classes, no aux head): "
                    f"missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}"
                )
            self._net = net.eval().to(self.pipe.device if self.pipe is not None else "cpu")
        return self._net

    def prepare(self, images: Tensor) -> Tensor:
        """``images[B, 3, H, W]`` in [0, 1] -> the network's input ``[B, 3, 299, 299]`` under the preset."""
        pixels = images.detach().float().clamp(0, 1).mul(255).round()  # 8 bits, as from an image file
        if self.params.preset == "pytorch-fid":
            x = F.interpolate(pixels / 255, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
            return 2 * x - 1
        return (resize_tf1(pixels, SIZE) - 128) / 128

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        device = next(self.net.parameters()).device
        step = self.params.batch_size
        parts = [self.net(self.prepare(images[i : i + step].to(device))).float().cpu() for i in range(0, len(images), step)]
        return torch.cat(parts) if parts else torch.zeros(0, 2048)

    def describe(self) -> dict[str, Any]:
        preset = PRESETS[self.params.preset]
        return {
            "file": str(self.path),
            "sha256": rundir.sha256_file(self.path),
            "preset": self.params.preset,
            "resize": {"filter": preset["filter"], "size": SIZE},
            "scale": preset["scale"],
            "layer": "pool3 (2048)",
        }
