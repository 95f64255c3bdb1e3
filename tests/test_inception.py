"""Inception-v3 as FID's network: the same features and the same FID as the field's reference code.

The references (pytorch-fid 0.3.0, torch-fidelity 0.4.0; installed for tests only) download
the TensorFlow-ported weights at run time. Here they get random weights instead, saved where
and how each expects its file, so both paths run on the same network with nothing downloaded.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch

from dalle_framework import UsageError

pytest.importorskip("pytorch_fid")
pytest.importorskip("torch_fidelity")
PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"  # the name pytorch-fid looks for in torch's hub cache


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """Random FID-Inception weights as a plain state dict, in torch's hub cache as pytorch-fid names it.

    He-scaled convolutions and varied batch-norm statistics, so features neither vanish nor
    explode through the 94 layers and a wrong pooling or scaling would show.
    """
    from dalle_stages.inception import FidInception

    torch.manual_seed(0)
    net = FidInception()
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
            torch.nn.init.normal_(module.weight, std=math.sqrt(2 / fan_in))
        elif isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.1, 0.1)
    path = tmp_path_factory.mktemp("torch-home") / "hub" / "checkpoints" / PYTORCH_FID_FILE
    path.parent.mkdir(parents=True)
    torch.save(net.net.state_dict(), path)
    return path


def images(n: int, seed: int, brightness: float = 1.0) -> torch.Tensor:
    """8-bit images ``[n, 3, 32, 32]`` in [0, 1], as a generator's output read back from PNG files."""
    return (torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * brightness).mul(255).round() / 255


def ours(weights: Path, preset: str = "pytorch-fid"):
    from dalle_stages.inception import InceptionV3Features

    class Run:  # the network reads no run; only the device
        device = torch.device("cpu")

    return InceptionV3Features(InceptionV3Features.Params(weights=str(weights), preset=preset), pipe=Run())


@pytest.fixture(scope="module")
def pytorch_fid_net(weights):
    import os

    from pytorch_fid.inception import InceptionV3

    previous = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = str(weights.parent.parent.parent)  # <home>/hub/checkpoints/<file>: found, not fetched
    try:
        return InceptionV3().eval()
    finally:
        os.environ.pop("TORCH_HOME") if previous is None else os.environ.__setitem__("TORCH_HOME", previous)


def test_features_equal_pytorch_fid(weights, pytorch_fid_net):
    network = ours(weights)
    batch = images(4, seed=1)
    with torch.no_grad():
        reference = pytorch_fid_net(batch)[0].flatten(1)
    mine = network.features(batch)
    assert mine.shape == (4, 2048) and mine.std() > 1.0, "the random network's features carry signal"
    assert torch.allclose(mine, reference, atol=1e-4, rtol=1e-5)
    described = network.describe()
    assert described["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert described["resize"]["size"] == 299 and "bilinear" in described["resize"]["filter"] and described["preset"] == "pytorch-fid"


@pytest.mark.slow
def test_fid_equals_pytorch_fid(weights, pytorch_fid_net):
    """Images to FID end to end, ours against pytorch-fid's network and its scipy Fréchet distance."""
    import numpy as np
    from pytorch_fid.fid_score import calculate_frechet_distance

    from dalle_framework.metrics import frechet_distance_of

    network = ours(weights)
    a, b = images(10, seed=2), images(10, seed=3, brightness=0.6)
    with torch.no_grad():
        ref_a, ref_b = (pytorch_fid_net(x)[0].flatten(1).double().numpy() for x in (a, b))
    reference_fid = calculate_frechet_distance(ref_a.mean(0), np.cov(ref_a, rowvar=False), ref_b.mean(0), np.cov(ref_b, rowvar=False))
    assert frechet_distance_of(network.features(a), network.features(b)) == pytest.approx(reference_fid, abs=1e-3)


def test_torch_fidelity_preset_equals_torch_fidelity(weights):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    from dalle_stages.inception import resize_tf1

    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 255
    expected = interpolate_bilinear_2d_like_tensorflow1x(pixels, size=(299, 299), align_corners=False)
    assert torch.allclose(resize_tf1(pixels, 299), expected, atol=1e-3)
    reference = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))
    batch = images(4, seed=4)
    with torch.no_grad():
        theirs = reference(batch.mul(255).round().to(torch.uint8))[0]
    mine = ours(weights, "torch-fidelity").features(batch)
    assert torch.allclose(mine, theirs, atol=1e-3, rtol=1e-4)
    assert not torch.allclose(mine, ours(weights).features(batch), atol=1e-2), "the two references feed the network differently"


def test_weights_are_read_weights_only_and_checked(weights, tmp_path):
    from safetensors.torch import save_file

    copy = tmp_path / "inception.safetensors"
    save_file(torch.load(weights, weights_only=True), str(copy))
    batch = images(2, seed=5)
    assert torch.equal(ours(copy).features(batch), ours(weights).features(batch))
    with pytest.raises(UsageError, match="missing.pth not found"):
        ours(tmp_path / "missing.pth")
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in torch.load(weights, weights_only=True).items() if not k.startswith("Mixed_7c")}, partial)
    with pytest.raises(UsageError, match="does not fit Inception-v3"):
        ours(partial).features(batch)
    planted = tmp_path / "planted.pth"
    torch.save({"fc.weight": torch.zeros(1), "payload": PlantedPayload()}, planted)
    with pytest.raises(UsageError, match="refused to load"):
        ours(planted).features(batch)
    assert not (tmp_path / "ran").exists()


class PlantedPayload:
    def __reduce__(self):
        import os

        return os.mkdir, ("ran",)
