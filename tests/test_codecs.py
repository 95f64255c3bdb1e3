"""Stage-1 image codecs: gumbel-dvae (DALL-E's discrete VAE) and vq-vae, plus their core helpers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dalle_framework import ImageCodec
from dalle_framework.metrics import codebook_usage, psnr
from dalle_framework.nn import ConvCodecParams, LogitLaplace, cosine_schedule, nearest_code
from dalle_framework.plugins import registry
from pydantic import ValidationError

# Small, fast configs (16x16 images -> 4x4 grid for the shape tests; 64px emoji for learning).
TINY = dict(image_size=16, vocab_size=32, width=16, channel_mults=[1, 2, 2], blocks_per_group=1, decoder_stem_width=16)
SMALL64 = dict(
    image_size=64, vocab_size=64, width=32, channel_mults=[1], blocks_per_group=1,
    stem_downsample=8, stem_kernel=3, decoder_stem_width=32,
)
CODECS = ["gumbel-dvae", "vq-vae"]


def build(name: str, **params) -> ImageCodec:
    return registry("codec").build({"name": name, "params": params})


@pytest.fixture(scope="module")
def emoji() -> torch.Tensor:
    """16 real Noto emoji at 64x64, float [0, 1]."""
    from dalle_framework.data.images import load_split

    source = registry("data").build({"name": "emoji", "params": {"image_size": 64}})
    images, captions = load_split(source, "train", limit=16, progress=False)
    assert len(captions) == 16
    return images.float() / 255


# --------------------------------------------------------------------------- contract


@pytest.mark.parametrize("name", CODECS)
def test_registered_and_shapes(name):
    torch.manual_seed(0)
    codec = build(name, **TINY)
    assert isinstance(codec, ImageCodec) and codec.name == name
    assert codec.grid == (4, 4) and codec.image_size == 16 and codec.vocab_size == 32
    images = torch.rand(3, 3, 16, 16)
    codec.loss(images, 0)  # a training step initialises the VQ codebook from data
    codec.eval()
    tokens = codec.encode(images)
    assert tokens.shape == (3, 16) and tokens.dtype == torch.long
    assert int(tokens.min()) >= 0 and int(tokens.max()) < 32
    out = codec.decode(tokens)
    assert out.shape == (3, 3, 16, 16)
    assert float(out.min()) >= 0 and float(out.max()) <= 1


@pytest.mark.parametrize("name", CODECS)
def test_encode_is_deterministic(name):
    torch.manual_seed(0)
    codec = build(name, **TINY)
    images = torch.rand(4, 3, 16, 16)
    codec.loss(images, 0)
    codec.eval()
    first = codec.encode(images)
    assert torch.equal(first, codec.encode(images))
    assert torch.equal(first[1:], codec.encode(images[1:]))  # independent of the batch it sits in


@pytest.mark.parametrize("name", CODECS)
def test_loss_dict_has_logged_terms(name):
    codec = build(name, **TINY)
    out = codec(torch.rand(2, 3, 16, 16), 5)  # forward == loss
    assert out["loss"].requires_grad and torch.isfinite(out["loss"])
    expected = {"recon", "perplexity", "usage", "psnr"} | ({"kl", "tau", "beta"} if name == "gumbel-dvae" else {"commitment"})
    assert expected <= set(out), f"missing {expected - set(out)}"


def test_bad_params_are_reported_with_the_field():
    with pytest.raises(ValidationError, match="image_size 60 is not divisible"):
        registry("codec").validate_params("gumbel-dvae", {"image_size": 60, "channel_mults": [1, 2, 4, 8]})
    with pytest.raises(ValidationError, match="straight_thru"):
        registry("codec").validate_params("gumbel-dvae", {"straight_thru": True})
    assert ConvCodecParams(image_size=64, channel_mults=[1, 2], stem_downsample=4).grid == (8, 8)


def test_activation_and_decoder_depth_options_shape_the_networks():
    from dalle_framework.nn import BottleneckBlock

    codec = build("vq-vae", image_size=32, vocab_size=16, width=16, channel_mults=[1], blocks_per_group=1,
                  decoder_blocks_per_group=3, stem_downsample=4, activation="silu")
    enc = [m for m in codec.encoder.modules() if isinstance(m, BottleneckBlock)]
    dec = [m for m in codec.decoder.modules() if isinstance(m, BottleneckBlock)]
    assert (len(enc), len(dec)) == (1, 3)
    assert not any(isinstance(m, torch.nn.ReLU) for m in codec.modules())
    assert sum(isinstance(m, torch.nn.SiLU) for m in codec.decoder.modules()) == 3 * 4 + 1
    images = torch.rand(2, 3, 32, 32)
    assert codec.decode(codec.encode(images)).shape == images.shape
    with pytest.raises(ValidationError, match="activation"):
        registry("codec").validate_params("vq-vae", {"activation": "tanh"})


def test_paper_configuration_builds():
    """256x256 images, 8192 codes, 32x32 grid, n_hid 256: the paper's dVAE (defaults)."""
    codec = build("gumbel-dvae")
    assert codec.grid == (32, 32) and codec.vocab_size == 8192 and codec.image_size == 256
    n = sum(p.numel() for p in codec.parameters())
    assert 90e6 < n < 100e6, n  # the released dall_e encoder (53.8M) + decoder (43.8M) hold ~97.6M weights


# --------------------------------------------------------------------------- learning on real images


@pytest.mark.debian_data("emoji")
@pytest.mark.parametrize("name", CODECS)
def test_loss_falls_on_real_emoji(name, emoji):
    torch.manual_seed(0)
    params = dict(SMALL64, loss="mse")
    if name == "gumbel-dvae":
        params.update(tau_steps=30, kl_steps=30, kl_end=0.5, straight_through=True)
    codec = build(name, **params)
    codec.loss(emoji, 0)  # VQ: codebook from data, so the untrained baseline is fair
    codec.eval()
    untrained = psnr(codec.decode(codec.encode(emoji)), emoji)
    codec.train()
    opt = torch.optim.AdamW(codec.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        out = codec.loss(emoji, step)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        assert torch.isfinite(out["loss"]), f"step {step}: {out}"
        losses.append(float(out["recon"]))
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses
    codec.eval()
    trained = psnr(codec.decode(codec.encode(emoji)), emoji)
    assert trained > untrained + 1.0, (untrained, trained)


# --------------------------------------------------------------------------- schedules


def test_cosine_schedule_curve():
    assert cosine_schedule(0, 1.0, 1 / 16, 100) == pytest.approx(1.0)
    assert cosine_schedule(50, 1.0, 1 / 16, 100) == pytest.approx((1 + 1 / 16) / 2)
    assert cosine_schedule(25, 0.0, 4.0, 100) == pytest.approx(4.0 * (1 - math.cos(math.pi / 4)) / 2)
    assert cosine_schedule(100, 1.0, 1 / 16, 100) == pytest.approx(1 / 16)
    assert cosine_schedule(10**6, 1.0, 1 / 16, 100) == pytest.approx(1 / 16)
    assert cosine_schedule(3, 1.0, 0.5, 0) == 0.5
    values = [cosine_schedule(s, 0.0, 6.6, 40) for s in range(41)]
    assert all(a <= b for a, b in zip(values, values[1:])), "a rising schedule must not fall"


def test_dvae_tau_and_beta_follow_their_schedules():
    codec = build("gumbel-dvae", **TINY, tau_steps=200, kl_steps=80)
    assert codec.tau(0) == pytest.approx(1.0) and codec.beta(0) == pytest.approx(0.0)
    assert codec.tau(100) == pytest.approx((1 + 1 / 16) / 2) and codec.beta(40) == pytest.approx(3.3)
    assert codec.tau(200) == pytest.approx(1 / 16) and codec.beta(80) == pytest.approx(6.6)
    out = codec.loss(torch.rand(2, 3, 16, 16), 40)
    assert out["tau"] == pytest.approx(codec.tau(40)) and out["beta"] == pytest.approx(3.3)


def test_dvae_defaults_are_the_papers():
    p = registry("codec").get("gumbel-dvae").Params()
    assert (p.tau_start, p.tau_end, p.kl_start, p.kl_end, p.eps) == (1.0, 1 / 16, 0.0, 6.6, 0.1)
    assert p.loss == "logit-laplace"


# --------------------------------------------------------------------------- likelihood and KL


def test_logit_laplace_matches_direct_formula():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 2, 2)
    out = torch.randn(1, 6, 2, 2)
    eps = 0.1
    expected = 0.0
    for c in range(3):
        for i in range(2):
            for j in range(2):
                y = (1 - 2 * eps) * float(x[0, c, i, j]) + eps
                mu, log_b = float(out[0, c, i, j]), float(out[0, c + 3, i, j])
                b = math.exp(log_b)
                density = math.exp(-abs(math.log(y / (1 - y)) - mu) / b) / (2 * b * y * (1 - y))
                expected += -math.log(density)
    assert float(LogitLaplace(eps).nll(out, x)) == pytest.approx(expected / 12, rel=1e-5)
    # to_image undoes the pixel map: mu = logit(map(x)) decodes to x.
    y = (1 - 2 * eps) * x + eps
    mu = torch.log(y / (1 - y))
    assert torch.allclose(LogitLaplace(eps).to_image(torch.cat([mu, mu], 1)), x, atol=1e-5)


def test_dvae_kl_is_normalised_per_pixel_dimension():
    codec = build("gumbel-dvae", **TINY, kl_steps=0)  # beta = 6.6 from step 0
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        for p in codec.encoder.blocks[-1].parameters():
            p.zero_()  # uniform posterior: KL = 0
        assert float(codec.loss(images, 0)["kl"]) == pytest.approx(0.0, abs=1e-6)
        codec.encoder.blocks[-1].bias[3] = 1e4  # one-hot posterior: KL = log K per cell
        kl = float(codec.loss(images, 0)["kl"])
    assert kl == pytest.approx(16 * math.log(32) / (3 * 16 * 16), rel=1e-4)


# --------------------------------------------------------------------------- VQ codebook


def _vq(**extra):
    return build("vq-vae", **TINY, code_dim=8, **extra)


def test_vq_initialises_from_data_and_ema_moves_codes():
    torch.manual_seed(0)
    codec = _vq(restart_after=None)
    quantiser = codec.quantiser
    before = quantiser.codebook.clone()
    images = torch.rand(4, 3, 16, 16)
    codec.loss(images, 0)
    assert bool(quantiser.initialised)
    after_init = quantiser.codebook.clone()
    assert not torch.allclose(before, after_init)
    z = codec.embed(images).detach()
    codec.loss(images, 1)
    moved = (quantiser.codebook - after_init).norm(dim=1)
    used = torch.unique(quantiser.quantise(z))
    assert float(moved.max()) > 0, "EMA update did not change the codebook"
    # Codes are parameters of no optimizer: only EMA changes them, and only in training mode.
    assert not any(p is quantiser.codebook for p in codec.parameters())
    codec.eval()
    frozen = quantiser.codebook.clone()
    codec.loss(images, 2)
    assert torch.equal(frozen, quantiser.codebook)
    assert len(used) > 1


def test_vq_ema_matches_closed_form():
    """One EMA step: code k -> (decay * sum_k + (1 - decay) * batch_sum_k) / smoothed count."""
    torch.manual_seed(0)
    q = _vq(decay=0.5, restart_after=None, init_from_data=False).quantiser
    flat = torch.randn(64, 8)
    codes = nearest_code(flat, q.codebook)
    k = int(codes[0])
    count0, sum0 = q.ema_count.clone(), q.ema_sum.clone()
    q._update(flat)
    count = 0.5 * count0 + 0.5 * torch.bincount(codes, minlength=32).float()
    total = 0.5 * sum0[k] + 0.5 * flat[codes == k].sum(0)
    n = count.sum()
    smoothed = (count[k] + q.eps) / (n + 32 * q.eps) * n
    assert torch.allclose(q.codebook[k], total / smoothed, atol=1e-5)


def test_vq_dead_codes_are_restarted_from_batch_vectors():
    torch.manual_seed(0)
    q = _vq(restart_after=2, init_from_data=False).quantiser
    with torch.no_grad():
        q.codebook.zero_()
        q.codebook[0] = 100.0  # far away: never the nearest code
        q.ema_sum.copy_(q.codebook)
    flat = torch.randn(200, 8)
    q._update(flat)  # code 0 unused for 1 step
    assert int(q.unused_steps[0]) == 1 and torch.allclose(q.codebook[0], torch.full((8,), 100.0))
    q._update(flat)  # 2 steps: restarted onto one of the batch vectors
    assert int(q.unused_steps[0]) == 0
    assert float((flat - q.codebook[0]).norm(dim=1).min()) < 1e-5, "restart must pick a batch vector"


# --------------------------------------------------------------------------- metrics


def test_psnr_and_codebook_usage():
    a = torch.zeros(1, 3, 4, 4)
    assert psnr(a, a + 0.1) == pytest.approx(20.0)
    assert psnr(a, a) == math.inf
    stats = codebook_usage(torch.tensor([[0, 1], [2, 3]]), 8)
    assert stats["usage"] == 0.5 and stats["used"] == 4 and stats["perplexity"] == pytest.approx(4.0)
    assert codebook_usage(torch.zeros(10, dtype=torch.long), 8)["perplexity"] == pytest.approx(1.0)
    with pytest.raises(AssertionError):
        codebook_usage(torch.tensor([8]), 8)


def test_dvae_decode_is_the_decoder_on_one_hot_codes():
    """decode() looks codes up in the decoder's 1x1 stem instead of building [B, K, h, w] one-hots."""
    torch.manual_seed(0)
    codec = build("gumbel-dvae", **TINY).eval()
    tokens = torch.randint(32, (2, 16))
    one_hot = torch.nn.functional.one_hot(tokens.view(2, 4, 4), 32).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        expected = codec.recon.to_image(codec.decoder(one_hot))
    assert torch.allclose(codec.decode(tokens), expected, atol=1e-6)


@pytest.mark.slow
def test_codec_quality_benchmark_trains_with_the_framework_loop(tmp_path, capsys):
    """The benchmark runs `dalle train --stage codec` itself: the shapes-dvae codec passes 20 dB
    held-out hard-token PSNR in 400 steps, and an A/B variant is measured beside it."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "codec_quality.py"
    spec = importlib.util.spec_from_file_location("codec_quality", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main([
        "shapes-dvae", "codec.train.steps=400", "codec.params.tau_steps=350", "--threads", "1", "--runs", str(tmp_path),
        "--variant", "", "--variant", "codec.train.steps=50",
    ])
    full, short = result["variants"]
    assert full["steps"] == 400 and short["steps"] == 50
    assert full["psnr"] > 20.0 and full["codebook_usage"] > 0.3, full
    assert full["psnr"] > short["psnr"], (full, short)
    assert (tmp_path / "variant-0" / "codec" / "meta.json").is_file()
    assert json.loads(capsys.readouterr().out)["variants"][0]["psnr"] == full["psnr"]
