"""Pretrained codecs: OpenAI's dVAE and taming's VQGAN / Gumbel-VQ, converted with `dalle convert`.

The reference implementations (the `dall-e` 0.1 and `taming-transformers-rom1504`
0.0.6 packages, installed by scripts/env.sh without their dependencies) build each
model with random weights; it is saved the way the released files are (OpenAI:
whole pickled modules; taming: a Lightning-style checkpoint + config.yaml),
converted by the real command, loaded from the safetensors it wrote, and compared
on real images: tokens must be equal and decoded pixels equal to float tolerance.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from pydantic import ValidationError
from safetensors.torch import load_file

from conftest import run_cli
from dalle_framework import UsageError
from dalle_framework.cli import main as dalle_main
from dalle_framework.rundir import load_into
from dalle_framework.plugins import registry

PIXEL_ATOL = 1e-4


def reference(module: str):
    """Import a reference package; CI (DALLE_REQUIRE_DATA=1, scripts/env.sh) must have it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        message = f"reference package missing ({exc}); scripts/env.sh installs dall-e==0.1 and taming-transformers-rom1504==0.0.6"
        if os.environ.get("DALLE_REQUIRE_DATA") == "1":
            pytest.fail(message)
        pytest.skip(message)


def real_images(source: str, size: int, n: int) -> torch.Tensor:
    """``n`` held-out images of a Debian-packaged source, float ``[n, 3, size, size]`` in [0, 1]."""
    from dalle_framework.data.images import load_split

    data = registry("data").build({"name": source, "params": {"image_size": size}})
    images, _ = load_split(data, "heldout", limit=n, progress=False)
    return images.float() / 255


@pytest.fixture
def dalle(capsys):
    """The `dalle` command in this process (for the error paths; conversions run it as a subprocess)."""

    def run(*args: str) -> subprocess.CompletedProcess:
        code = dalle_main([str(a) for a in args])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return run


def convert(component: str, *files: Path, out: Path, trust: bool = False) -> dict:
    """Run `dalle convert` as a user would; returns the codec block it wrote."""
    args = ["convert", component, *map(str, files), str(out)] + (["--trust-pickle"] if trust else [])
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["component"] == component and Path(summary["weights"]).is_file()
    return yaml.safe_load((out / "codec.yaml").read_text())


def load_block(block: dict, **param_overrides):
    """A codec built from a converted block, with its safetensors loaded (what a recipe's `weights:` does)."""
    assert block["frozen"] is True and Path(block["weights"]).is_absolute()
    codec = registry("codec").build({"name": block["name"], "params": {**block["params"], **param_overrides}})
    load_into(codec, block["weights"])
    return codec.eval()


# ----------------------------------------------------------------------------- OpenAI dVAE

# The smallest shapes dall_e accepts (n_hid >= 64, vocab >= 512); the released ones are 256 / 8192.
DVAE_SMALL = dict(n_hid=64, n_blk_per_group=1, vocab_size=512)


def save_openai_dvae(directory: Path, *, n_init: int = 32, **shape) -> tuple[Path, Path, torch.nn.Module, torch.nn.Module]:
    """Random-weight dall_e Encoder / Decoder, pickled whole like the released encoder.pkl / decoder.pkl."""
    reference("dall_e")
    from dall_e.decoder import Decoder
    from dall_e.encoder import Encoder

    torch.manual_seed(0)
    shape = shape or DVAE_SMALL
    encoder, decoder = Encoder(**shape), Decoder(n_init=n_init, **shape)
    # Released weights are trained; random ones with zero biases give near-constant
    # outputs, so spread the biases a little to make the comparison meaningful.
    for module in (encoder, decoder):
        for name, param in module.named_parameters():
            if name.endswith(".b"):
                param.data.normal_(0, 0.1)
    paths = directory / "encoder.pkl", directory / "decoder.pkl"
    torch.save(encoder, paths[0])
    torch.save(decoder, paths[1])
    return paths[0], paths[1], encoder.eval(), decoder.eval()


def dall_e_reference(encoder, decoder, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The dall_e README's recipe: argmax codes of map_pixels(x); unmap_pixels(sigmoid(mu)) of their one-hot."""
    from dall_e import map_pixels, unmap_pixels

    with torch.no_grad():
        codes = encoder(map_pixels(images)).argmax(dim=1)
        one_hot = F.one_hot(codes, num_classes=encoder.vocab_size).permute(0, 3, 1, 2).float()
        pixels = unmap_pixels(torch.sigmoid(decoder(one_hot)[:, :3]))
    return codes.flatten(1), pixels


@pytest.fixture(scope="module")
def openai_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("openai")
    enc_path, dec_path, encoder, decoder = save_openai_dvae(directory)
    block = convert("openai-dvae", enc_path, dec_path, out=directory / "converted", trust=True)
    return enc_path, dec_path, encoder, decoder, block


@pytest.mark.parametrize(
    "source, size",
    [pytest.param("emoji", 64, marks=pytest.mark.debian_data("emoji")), pytest.param("fashion-mnist", 32, marks=pytest.mark.debian_data("fashion-mnist"))],
)
def test_openai_dvae_matches_reference_on_real_images(openai_files, source, size):
    _, _, encoder, decoder, block = openai_files
    assert block["params"] == {**block["params"], "vocab_size": 512, "hidden": 64, "blocks_per_group": 1, "decoder_init": 32, "image_size": 256}
    codec = load_block(block, image_size=size)
    images = real_images(source, size, 8)
    ref_codes, ref_pixels = dall_e_reference(encoder, decoder, images)
    tokens = codec.encode(images)
    assert tokens.shape == (8, (size // 8) ** 2)
    assert len(ref_codes.unique()) > 8, "the reference uses many codes: the comparison is not trivial"
    assert torch.equal(tokens, ref_codes)
    pixels = codec.decode(tokens)
    assert pixels.shape == images.shape
    assert torch.allclose(pixels, ref_pixels, atol=PIXEL_ATOL, rtol=0), float((pixels - ref_pixels).abs().max())
    assert float(ref_pixels.std()) > 0.01, "decoded pixels vary: the comparison is not trivial"


def test_openai_dvae_reads_pickles_without_the_dall_e_package(openai_files):
    """With --trust-pickle the dall_e classes are inert stand-ins: the package is never imported."""
    enc_path = openai_files[0]
    script = (
        "import sys; from pathlib import Path; from dalle_framework.convert import read_released, module_state\n"
        f"obj = read_released(Path({str(enc_path)!r}), trust_pickle=True)\n"
        "state = module_state(obj)\n"
        "print(obj.source, len(state), 'dall_e' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["dall_e.encoder.Encoder", str(len(torch.load(enc_path, weights_only=False).state_dict())), "False"]
    assert "--trust-pickle was given" in result.stderr


def test_openai_dvae_conversion_needs_trust_pickle(openai_files, tmp_path, dalle):
    enc_path, dec_path = openai_files[:2]
    out = tmp_path / "out"
    result = dalle("convert", "openai-dvae", enc_path, dec_path, out)
    assert result.returncode == 2
    assert "--trust-pickle" in result.stderr and "dall_e.encoder.Encoder" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_openai_dvae_conversion_output(openai_files):
    enc_path, dec_path, encoder, decoder, block = openai_files
    out = Path(block["weights"]).parent
    record = json.loads((out / "conversion.json").read_text())
    assert record["component"] == "openai-dvae" and record["date"]
    import hashlib

    assert [s["sha256"] for s in record["sources"]] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in (enc_path, dec_path)]
    weights = load_file(block["weights"])
    assert len(weights) == len(encoder.state_dict()) + len(decoder.state_dict())
    assert torch.equal(weights["encoder.blocks.0.weight"], encoder.blocks.input.w)
    # one block per group: stem 0, group 1 = 1 + upsample 2, group 2 = 3 + upsample 4, group 3 = 5
    assert torch.equal(weights["decoder.blocks.5.res_path.5.weight"], decoder.blocks.group_3.block_1.res_path.conv_3.w)


def test_openai_dvae_refuses_wrong_files(openai_files, tmp_path, dalle):
    enc_path, dec_path = openai_files[:2]
    twice = dalle("convert", "openai-dvae", enc_path, enc_path, tmp_path / "a", "--trust-pickle")
    assert twice.returncode == 2 and "a second encoder" in twice.stderr
    one = dalle("convert", "openai-dvae", enc_path, tmp_path / "b", "--trust-pickle")
    assert one.returncode == 2 and "encoder.pkl decoder.pkl OUT" in one.stderr


def test_openai_dvae_defaults_are_the_released_shape():
    reference("dall_e")
    from dall_e.decoder import Decoder
    from dall_e.encoder import Encoder

    codec = registry("codec").build({"name": "openai-dvae", "params": {}})
    assert (codec.vocab_size, codec.grid, codec.image_size) == (8192, (32, 32), 256)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    # dall_e's defaults are the released encoder.pkl / decoder.pkl (53.8M and 43.8M parameters).
    assert (count(codec.encoder), count(codec.decoder)) == (count(Encoder()), count(Decoder()))


def test_openai_dvae_loss_is_the_papers_and_trains():
    torch.manual_seed(0)
    codec = registry("codec").build({"name": "openai-dvae", "params": {"image_size": 16, "vocab_size": 32, "hidden": 16, "blocks_per_group": 1, "decoder_init": 8}})
    images = torch.rand(4, 3, 16, 16)
    out = codec.loss(images)
    assert {"loss", "recon", "kl", "perplexity", "usage", "psnr"} <= set(out)
    assert torch.isclose(out["loss"], out["recon"] + 6.6 * out["kl"])
    out["loss"].backward()
    assert codec.encoder.blocks[0].weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- taming VQGAN / Gumbel-VQ

# Small ddconfigs (GroupNorm needs multiples of 32 channels): f4, attention at 16.
TAMING_SMALL = dict(
    double_z=False, z_channels=64, resolution=64, in_channels=3, out_ch=3,
    ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[16], dropout=0.0,
)  # fmt: skip
TARGETS = {"vq": "taming.models.vqgan.VQModel", "gumbel": "taming.models.vqgan.GumbelVQ"}


class TamingModel(torch.nn.Module):
    """The modules of taming's VQModel / GumbelVQ under their names (the Lightning module itself needs pytorch-lightning)."""

    def __init__(self, kind: str, ddconfig: dict, n_embed: int, embed_dim: int) -> None:
        from taming.modules.diffusionmodules.model import Decoder, Encoder
        from taming.modules.vqvae.quantize import GumbelQuantize, VectorQuantizer2

        super().__init__()
        self.encoder, self.decoder = Encoder(**ddconfig), Decoder(**ddconfig)
        self.loss = torch.nn.Conv2d(3, 8, 4)  # stands for the LPIPS / discriminator weights released checkpoints carry
        if kind == "vq":
            self.quantize = VectorQuantizer2(n_embed, embed_dim, beta=0.25)
        else:
            self.quantize = GumbelQuantize(ddconfig["z_channels"], embed_dim, n_embed=n_embed)
        self.quant_conv = torch.nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = torch.nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.kind = kind

    @torch.no_grad()
    def spread_codebook(self, side: int, signed: bool = True) -> None:
        """A trained codebook lies among the encoder's outputs: draw it from them, so that many codes are used."""
        images = torch.rand(2, 3, side, side)
        h = self.quant_conv(self.encoder(images * 2 - 1 if signed else images))
        vectors = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
        picked = vectors[torch.randint(len(vectors), (self.quantize.embedding.num_embeddings,))]
        self.quantize.embedding.weight.copy_(picked + 0.1 * picked.std() * torch.randn_like(picked))

    @torch.no_grad()
    def reference(self, images: torch.Tensor, signed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """taming's own path: tokens of images in [0, 1], and the images decoded from them. ``signed=False`` is
        dalle-mini's use of the same network: images go in and come out in [0, 1] as they are."""
        h = self.quant_conv(self.encoder(images * 2 - 1 if signed else images))
        if self.kind == "vq":
            codes = self.quantize(h)[2][2].view(len(images), -1)
        else:  # taming's Gumbel quantiser samples even in eval mode; the deterministic code is the logits' argmax
            codes = self.quantize.proj(h).argmax(dim=1).flatten(1)
        side = h.shape[-1]
        z = self.quantize.get_codebook_entry(codes.flatten(), (len(images), side, side, h.shape[1]))
        decoded = self.decoder(self.post_quant_conv(z))
        pixels = (decoded.clamp(-1, 1) + 1) / 2 if signed else decoded.clamp(0, 1)
        return codes, pixels


def save_taming(directory: Path, kind: str, *, ddconfig=None, n_embed: int = 512, embed_dim: int = 64, extra: dict | None = None):
    """A random-weight taming model saved as a Lightning checkpoint + its config.yaml."""
    reference("taming.modules.diffusionmodules.model")
    torch.manual_seed(0)
    ddconfig = ddconfig or TAMING_SMALL
    model = TamingModel(kind, ddconfig, n_embed, embed_dim).eval()
    for name, param in model.named_parameters():
        if name.endswith("bias") and not name.startswith("loss"):
            param.data.normal_(0, 0.05)
    if kind == "vq":
        model.spread_codebook(64)
    checkpoint = {
        "epoch": 7,
        "global_step": 1000,
        "pytorch-lightning_version": "1.0.8",
        "state_dict": model.state_dict(),
        "optimizer_states": [],
        "lr_schedulers": [],
        **(extra or {}),
    }
    ckpt, config = directory / f"{kind}-last.ckpt", directory / f"{kind}-config.yaml"
    torch.save(checkpoint, ckpt)
    params = {"embed_dim": embed_dim, "n_embed": n_embed, "ddconfig": ddconfig, "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"}}
    config.write_text(yaml.safe_dump({"model": {"base_learning_rate": 4.5e-6, "target": TARGETS[kind], "params": params}}))
    return ckpt, config, model


@pytest.fixture(scope="module", params=["vq", "gumbel"])
def taming_files(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"taming-{request.param}")
    ckpt, config, model = save_taming(directory, request.param)
    block = convert("vqgan", config, ckpt, out=directory / "converted")  # tensors only: no --trust-pickle needed
    return request.param, ckpt, config, model, block


@pytest.mark.parametrize(
    "source, size",
    [pytest.param("emoji", 64, marks=pytest.mark.debian_data("emoji")), pytest.param("fashion-mnist", 32, marks=pytest.mark.debian_data("fashion-mnist"))],
)
def test_vqgan_matches_reference_on_real_images(taming_files, source, size):
    kind, _, _, model, block = taming_files
    assert block["params"]["quantizer"] == kind and block["params"]["n_embed"] == 512 and block["params"]["image_size"] == 64
    codec = load_block(block, image_size=size)
    images = real_images(source, size, 8)
    ref_codes, ref_pixels = model.reference(images)
    tokens = codec.encode(images)
    assert tokens.shape == (8, (size // 4) ** 2)
    assert len(ref_codes.unique()) > 8, "the reference uses many codes: the comparison is not trivial"
    assert torch.equal(tokens, ref_codes)
    pixels = codec.decode(tokens)
    assert torch.allclose(pixels, ref_pixels, atol=PIXEL_ATOL, rtol=0), float((pixels - ref_pixels).abs().max())
    assert float(ref_pixels.std()) > 0.01


def test_vqgan_drops_training_loss_weights_and_records_sources(taming_files):
    kind, ckpt, config, model, block = taming_files
    weights = load_file(block["weights"])
    assert not any(k.startswith("loss.") for k in weights)
    assert set(weights) == {k for k in model.state_dict() if not k.startswith("loss.")}
    record = json.loads((Path(block["weights"]).parent / "conversion.json").read_text())
    assert [Path(s["path"]).name for s in record["sources"]] == [ckpt.name, config.name]
    assert record["taming_target"] == TARGETS[kind]


def test_vqgan_checkpoint_with_objects_needs_trust_and_then_converts(tmp_path, dalle):
    """A checkpoint that pickles a Python object (hyper-parameters, say) is refused without the flag."""
    import argparse

    ckpt, config, model = save_taming(tmp_path, "vq", extra={"hparams": argparse.Namespace(lr=1e-4)})
    refused = dalle("convert", "vqgan", ckpt, config, tmp_path / "refused")
    assert refused.returncode == 2 and "--trust-pickle" in refused.stderr and "argparse.Namespace" in refused.stderr
    block = convert("vqgan", ckpt, config, out=tmp_path / "out", trust=True)
    weights = load_file(block["weights"])
    assert torch.equal(weights["quantize.embedding.weight"], model.quantize.embedding.weight)


def test_vqgan_conversion_usage_errors(tmp_path, dalle):
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, ckpt)
    alone = dalle("convert", "vqgan", ckpt, tmp_path / "out")
    assert alone.returncode == 2 and "config.yaml" in alone.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {params: {n_embed: 4}}\n")
    wrong = dalle("convert", "vqgan", ckpt, bad, tmp_path / "out")
    assert wrong.returncode == 2 and "ddconfig" in wrong.stderr
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model": {"params": {"n_embed": 512, "embed_dim": 64, "ddconfig": TAMING_SMALL}}}))
    misfit = dalle("convert", "vqgan", ckpt, config, tmp_path / "out")
    assert misfit.returncode == 2 and "do not fit the codec: missing keys" in misfit.stderr and "unexpected keys ['w']" in misfit.stderr
    assert not (tmp_path / "out").exists()


def test_vqgan_shapes_and_refuses_training():
    codec = registry("codec").build({"name": "vqgan", "params": {**{k: v for k, v in TAMING_SMALL.items()}, "n_embed": 64, "embed_dim": 64, "image_size": 32}})
    assert codec.grid == (8, 8) and codec.vocab_size == 64
    tokens = codec.eval().encode(torch.rand(2, 3, 32, 32))
    assert tokens.shape == (2, 64) and int(tokens.max()) < 64
    assert codec.decode(tokens).shape == (2, 3, 32, 32)
    with pytest.raises(UsageError, match="cannot be trained"):
        codec.loss(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValidationError, match="embed_dim == z_channels"):
        registry("codec").get("vqgan").Params(quantizer="gumbel", embed_dim=4)


def test_vqgan_defaults_are_the_imagenet_f16_shape():
    codec = registry("codec").build({"name": "vqgan", "params": {}})
    assert (codec.vocab_size, codec.grid) == (1024, (16, 16))
    reference("taming.modules.diffusionmodules.model")
    f16 = dict(TAMING_SMALL, z_channels=256, resolution=256, ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16])
    released = TamingModel("vq", f16, n_embed=1024, embed_dim=256)
    shapes = {k: tuple(v.shape) for k, v in released.state_dict().items() if not k.startswith("loss.")}
    assert {k: tuple(v.shape) for k, v in codec.state_dict().items()} == shapes


# ----------------------------------------------------------------------------- the command and pickles


class Payload:
    """What an attacker plants: unpickling it runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("component", ["openai-dvae", "vqgan"])
def test_planted_pickle_never_runs(tmp_path, component, dalle):
    marker = tmp_path / "pwned"
    evil = tmp_path / ("encoder.pkl" if component == "openai-dvae" else "last.ckpt")
    torch.save({"state_dict": {}, "hook": Payload(marker)}, evil)
    other = tmp_path / ("decoder.pkl" if component == "openai-dvae" else "config.yaml")
    other.write_text("model: {params: {n_embed: 8, embed_dim: 8, ddconfig: {ch: 32}}}\n")

    refused = dalle("convert", component, evil, other, tmp_path / "out")
    assert refused.returncode == 2 and "--trust-pickle" in refused.stderr and "system" in refused.stderr
    assert not marker.exists()

    # Even trusted, the unpickler imports nothing: os.system becomes an inert stand-in.
    trusted = dalle("convert", component, evil, other, tmp_path / "out", "--trust-pickle")
    assert trusted.returncode == 2 and "Traceback" not in trusted.stderr
    assert not marker.exists()
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_read_released_prefers_the_restricted_readers(tmp_path):
    from safetensors.torch import save_file

    from dalle_framework.convert import StandIn, read_released

    tensors = {"w": torch.arange(4.0)}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": tensors}, tmp_path / "w.ckpt")
    assert torch.equal(read_released(tmp_path / "w.safetensors", trust_pickle=False)["w"], tensors["w"])
    assert torch.equal(read_released(tmp_path / "w.ckpt", trust_pickle=False)["state_dict"]["w"], tensors["w"])
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match="--trust-pickle"):
        read_released(tmp_path / "junk.ckpt", trust_pickle=False)
    with pytest.raises(UsageError, match="cannot read it as a torch pickle"):
        read_released(tmp_path / "junk.ckpt", trust_pickle=True)
    with pytest.raises(UsageError, match="no such file"):
        read_released(tmp_path / "missing.pkl", trust_pickle=True)
    torch.save({"x": Payload(tmp_path / "m")}, tmp_path / "evil.pt")
    loaded = read_released(tmp_path / "evil.pt", trust_pickle=True)
    assert isinstance(loaded["x"], StandIn) and loaded["x"].source.endswith(".system") and not (tmp_path / "m").exists()


def test_convert_command_is_generic(dalle):
    no_converter = dalle("convert", "gumbel-dvae", "a.pkl", "out")
    assert no_converter.returncode == 2 and "codec 'gumbel-dvae' has no converter" in no_converter.stderr
    unknown = dalle("convert", "openai-dvea", "a.pkl", "out")
    assert unknown.returncode == 2 and "did you mean 'openai-dvae'" in unknown.stderr
    too_few = dalle("convert", "openai-dvae", "out")
    assert too_few.returncode == 2 and "FILE [FILE ...] OUT" in too_few.stderr
    listing = dalle("components", "codec")
    assert listing.returncode == 0
    assert "openai-dvae" in listing.stdout and "vqgan" in listing.stdout


# ----------------------------------------------------------------------------- released shapes


@pytest.mark.slow
@pytest.mark.debian_data("emoji")
def test_released_shapes_match_reference(tmp_path):
    """Full-size OpenAI dVAE (8192 codes, 256px), VQGAN f16-16384 and Gumbel f8-8192, on a 256px emoji."""
    images = real_images("emoji", 256, 1)

    enc_path, dec_path, encoder, decoder = save_openai_dvae(tmp_path, n_init=128, n_hid=256, n_blk_per_group=2, vocab_size=8192)
    block = convert("openai-dvae", enc_path, dec_path, out=tmp_path / "openai", trust=True)
    codec = load_block(block)
    ref_codes, ref_pixels = dall_e_reference(encoder, decoder, images)
    tokens = codec.encode(images)
    assert tokens.shape == (1, 1024) and torch.equal(tokens, ref_codes)
    assert torch.allclose(codec.decode(tokens), ref_pixels, atol=PIXEL_ATOL, rtol=0)

    f16 = dict(TAMING_SMALL, z_channels=256, resolution=256, ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16])
    f8 = dict(f16, ch_mult=[1, 1, 2, 4], attn_resolutions=[32])
    for kind, ddconfig, n_embed, side in (("vq", f16, 16384, 16), ("gumbel", f8, 8192, 32)):
        ckpt, config, model = save_taming(tmp_path, kind, ddconfig=ddconfig, n_embed=n_embed, embed_dim=256)
        codec = load_block(convert("vqgan", ckpt, config, out=tmp_path / kind))
        ref_codes, ref_pixels = model.reference(images)
        tokens = codec.encode(images)
        assert tokens.shape == (1, side * side) and torch.equal(tokens, ref_codes)
        assert torch.allclose(codec.decode(tokens), ref_pixels, atol=PIXEL_ATOL, rtol=0)


# ----------------------------------------------------------------------------- recipes on converted codecs


def test_a_recipe_with_a_converted_frozen_codec_trains_only_the_prior_and_generates(openai_files, tmp_path):
    """`weights:` + `frozen: true`: stage 1 is never trained; `dalle run` copies the converted weights
    into the run, encodes tokens with them, trains the prior and generates."""
    from test_train import tiny_recipe

    *_, encoder, decoder, block = openai_files
    recipe = tiny_recipe(tmp_path / "run", **{"data.params.image_size": 32, "prior.train.steps": 3})
    recipe["codec"] = {**block, "params": {**block["params"], "image_size": 32}, "train": {"steps": 1000}}
    recipe["evaluate"] = {"captions": 2, "candidates": 2, "batches": 1, "batch_size": 8}
    path = tmp_path / "converted.yaml"
    path.write_text(yaml.safe_dump(recipe))
    done = run_cli("run", str(path), "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    meta = json.loads((tmp_path / "run" / "codec" / "meta.json").read_text())
    assert meta["frozen"] and meta["step"] == 0 and meta["source"] == block["weights"]
    copied, converted = load_file(tmp_path / "run" / "codec" / "model.safetensors"), load_file(block["weights"])
    assert copied.keys() == converted.keys() and all(torch.equal(copied[k], converted[k]) for k in copied)
    # the prior trained on the converted codec's tokens: the reference dVAE encodes the same images the same way
    from dalle_framework.data import load_token_shard
    from dalle_framework.pipeline import Pipeline

    shard = load_token_shard(tmp_path / "run" / "tokens" / "heldout" / "000000.safetensors")
    pipe = Pipeline.load(tmp_path / "run")
    images = pipe.split("heldout")[0][:4].float() / 255
    reference_codes, _ = dall_e_reference(encoder, decoder, images)
    assert torch.equal(shard["image_tokens"][:4], reference_codes)
    report = json.loads(done.stdout)
    assert report["prior"]["bits_per_image_token"] > 0 and Path(report["samples"]).is_file()
    # a missing converted file is a clear error, not a traceback
    recipe["codec"]["weights"] = str(tmp_path / "nope.safetensors")
    recipe["output_dir"] = str(tmp_path / "other")
    path.write_text(yaml.safe_dump(recipe))
    missing = run_cli("run", str(path), "--quiet")
    assert missing.returncode == 2 and "codec.weights" in missing.stderr and "dalle convert openai-dvae" in missing.stderr
