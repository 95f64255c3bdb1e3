"""Released priors converted with `dalle convert`, equal to their reference packages.

ruDALL-E (rudalle 1.1.3 + youtokentome 1.0.6) and DALL-E Mega / Mini (min-dalle 0.4.11):
each reference model is built small with random weights, saved the way the released
files are, converted by the real command, loaded from what it wrote and compared:
identical tokenizer ids, logits within float tolerance, identical greedy samples,
identical codec tokens and decoded pixels within 1e-4. The references are imported as
tests/references.py explains (offline, without their download helpers).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import run_cli
from dalle_framework import Sampling, UsageError
from dalle_framework.plugins import registry
from dalle_framework.rundir import load_into
from references import reference, rudalle, rudalle_loop
from releases import EN, RU, convert
from releases import bart_files as bart_bpe

PIXEL_ATOL = 1e-4
LOGIT_ATOL = 1e-4


def build_block(kind: str, block: dict, **runtime):
    """A component built from a converted block, its weights loaded (what a recipe's `weights:` does)."""
    component = registry(kind).build(block, **runtime)
    if "weights" in block:
        assert Path(block["weights"]).is_absolute()
        load_into(component, block["weights"])
        component.eval()
    return component


# ----------------------------------------------------------------------------- ruDALL-E: tokenizer

@pytest.fixture(scope="module")
def yttm_files(tmp_path_factory):
    """A YouTokenToMe BPE trained by youtokentome itself on Russian and English captions, converted."""
    yttm = reference("youtokentome")
    import random

    directory = tmp_path_factory.mktemp("yttm")
    rng = random.Random(0)
    lines = [" ".join(rng.choices(RU + EN, k=rng.randint(3, 12))) for _ in range(400)]
    (directory / "corpus.txt").write_text("\n".join(lines) + "\n")
    model = directory / "bpe.model"
    yttm.BPE.train(data=str(directory / "corpus.txt"), model=str(model), vocab_size=300)
    block = convert("rudalle-bpe", model, out=directory / "converted", kind="tokenizer")
    return yttm.BPE(str(model)), block, lines


def rudalle_frame(bpe, text: str, text_len: int) -> list[int]:
    """rudalle's generate_images + YTTMTokenizerWrapper.encode_text: lower, strip, [BOS] ids [EOS], zeros, cut."""
    import youtokentome as yttm

    ids = [2, *bpe.encode([text.lower().strip()], output_type=yttm.OutputType.ID)[0], 3]
    return (ids + [0] * text_len)[:text_len]


def test_rudalle_tokenizer_matches_youtokentome(yttm_files):
    bpe, block, lines = yttm_files
    tokenizer = build_block("tokenizer", block)
    assert block["params"]["vocab_size"] == bpe.vocab_size() == tokenizer.vocab_size
    assert Path(block["params"]["path"]).parent == Path(block["params"]["path"]).parent.resolve()
    edge = ["", "   ", "Красная  Машина\tна\nулице ", "a▁red▁car", "x Ω ☺ car", "\u00a0кот\u3000сидит\u2003", "AAAA" * 40]
    texts = lines[:50] + edge
    ids = tokenizer.encode(texts)
    assert ids.shape == (len(texts), tokenizer.text_len)
    for row, text in zip(ids.tolist(), texts):
        assert row == rudalle_frame(bpe, text, tokenizer.text_len), text
    assert ids[-1, -1] != 3, "a long caption is cut, EOS included, as rudalle cuts it"
    assert (ids == 1).any(), "unknown characters map to <UNK>"
    decoded = tokenizer.decode(ids[:50])
    assert decoded == [bpe.decode([row], ignore_ids=[0, 1, 2, 3])[0] for row in ids[:50].tolist()]
    assert decoded[:3] == [line.lower() for line in lines[:3]]


ALPHABET = "".join(sorted(set("".join(RU + EN)))) + string.ascii_uppercase + " \t\n\u00a0\u2581\u3000Ωж☺ё"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=ALPHABET, max_size=60))
def test_rudalle_tokenizer_matches_youtokentome_on_any_text(yttm_files, text):
    bpe, block, _ = yttm_files
    tokenizer = build_block("tokenizer", block)
    assert tokenizer.encode([text])[0].tolist() == rudalle_frame(bpe, text, tokenizer.text_len)


def test_rudalle_tokenizer_refuses_other_files(tmp_path):
    bad = tmp_path / "bpe.model"
    bad.write_text("not a model\n")
    result = run_cli("convert", "rudalle-bpe", str(bad), str(tmp_path / "out"))
    assert result.returncode == 2 and "not a YouTokenToMe model" in result.stderr and "Traceback" not in result.stderr
    unset = registry("tokenizer").build({"name": "rudalle-bpe", "params": {}})
    assert unset.vocab_size == 16384 and unset.text_len == 128  # known from params: recipes inspect without the file
    from dalle_framework import UsageError

    with pytest.raises(UsageError, match="tokenizer.params.path"):
        unset.encode(["a caption"])


# ----------------------------------------------------------------------------- ruDALL-E: prior

RUDALLE_SMALL = dict(text_vocab=300, text_len=12, side=8, image_vocab=64, layers=5, width=64, heads=4)


def rudalle_reference(*, text_vocab, text_len, side, image_vocab, layers, width, heads, spread: float = 0.2, version: str = "v3"):
    """rudalle's DalleModel (sandwich norm, PB-relax) with random weights; norms and biases spread so outputs vary."""
    model = rudalle("rudalle.dalle.model")
    torch.manual_seed(0)
    ref = model.DalleModel(
        device="cpu", num_layers=layers, vocab_size=text_vocab + text_len, hidden_size=width, num_attention_heads=heads,
        embedding_dropout_prob=0.1, attention_dropout_prob=0.1, output_dropout_prob=0.1, text_seq_length=text_len,
        image_tokens_per_dim=side, image_vocab_size=image_vocab, cogview_sandwich_layernorm=True, cogview_pb_relax=True,
        hf_version=version,
    )
    with torch.no_grad():
        for name, param in ref.named_parameters():
            if "layernorm" in name or name.startswith("to_logits.0"):
                param.add_(torch.randn_like(param) * spread)
            if name.endswith("bias"):
                param.normal_(0, spread / 2)
    return ref.eval()


def rudalle_captions(text_len: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    rows = []
    for length in (3, text_len - 2, 6):
        words = torch.randint(4, 300, (length,), generator=g).tolist()
        rows.append(([2, *words, 3] + [0] * text_len)[:text_len])
    return torch.tensor(rows)


# Malevich v3 as released; Malevich v2 (BOS before the caption, wrapped window) saved as its file is named.
RUDALLE_RELEASES = {"v3": "pytorch_model_v3.bin", "v2": "pytorch_model_v2.bin"}


@pytest.fixture(scope="module", params=sorted(RUDALLE_RELEASES))
def rudalle_files(request, tmp_path_factory):
    version = request.param
    directory = tmp_path_factory.mktemp(f"rudalle-{version}")
    # a grid wider than the 11x11 window, so that v2's wrapping and v3's clamped edges differ
    ref = rudalle_reference(**{**RUDALLE_SMALL, "side": 12}, version=version)
    released = directory / RUDALLE_RELEASES[version]
    torch.save(ref.state_dict(), released)  # as released: the model's state dict
    block = convert("rudalle", released, out=directory / "converted", kind="prior", params={"heads": 4})
    assert block["params"]["layout_version"] == version  # from the file's name
    s = RUDALLE_SMALL
    runtime = dict(text_vocab_size=s["text_vocab"], text_len=s["text_len"], image_vocab_size=s["image_vocab"], grid=(12, 12))
    return ref, block, runtime


def test_rudalle_masks_are_rudalles_at_the_released_layout():
    """Row, column and 11x11 conv masks over 128 text + 32x32 image tokens, position for position."""
    from dalle_framework.attention import Layout, dense_mask

    masks = rudalle("rudalle.dalle.image_attention")
    layout = Layout(128, (32, 32))
    theirs = {
        "row": masks.get_row_mask(128, 32, is_bool_mask=True),
        "rudalle-column": masks.get_col_mask(128, 32, is_bool_mask=True),
        "rudalle-conv": masks.get_conv_mask(128, 32, is_bool_mask=True, hf_version="v3"),
        "rudalle-conv-wrapped": masks.get_conv_mask(128, 32, is_bool_mask=True, hf_version="v2"),
    }
    for pattern, mask in theirs.items():
        assert torch.equal(dense_mask(pattern, layout), mask), pattern


def test_rudalle_prior_logits_match_the_reference(rudalle_files):
    ref, block, runtime = rudalle_files
    prior = build_block("prior", block, **runtime)
    assert block["params"] == {**block["params"], "dim": 64, "depth": 5, "heads": 4, "sandwich_norm": True}
    last = {"v3": "rudalle-conv", "v2": "rudalle-conv-wrapped"}[ref.hf_version]
    assert prior.layer_patterns() == ["row", "rudalle-column", "row", "row", last]
    text = rudalle_captions(runtime["text_len"])
    image = torch.randint(0, runtime["image_vocab_size"], (len(text), prior.layout.image_len), generator=torch.Generator().manual_seed(4))
    mask = torch.tril(torch.ones(len(text), 1, prior.layout.seq_len, prior.layout.seq_len))
    with torch.no_grad():
        expected, _ = ref(torch.cat([text, image], dim=1), mask, return_loss=False)  # v2: BOS first, the last code dropped
        states = prior.hidden(prior.sequence(prior.text_ids_of(text), image)[:, : prior.layout.seq_len])
        logits = torch.cat([prior.text_logits(states), prior.image_logits(states)], dim=-1)
        ours = prior.eval().loss(text, image)
        _, theirs = ref(torch.cat([text, image], dim=1), mask, return_loss=True)
    assert logits.shape == expected.shape
    assert torch.allclose(logits, expected, atol=LOGIT_ATOL, rtol=0), float((logits - expected).abs().max())
    assert float(expected.std()) > 0.1
    if ref.hf_version == "v2":  # v2's image loss is over every code, as here (v3's skips the first)
        assert torch.allclose(ours["image_loss"], theirs["image"], atol=1e-5), (ours["image_loss"], theirs["image"])


def test_rudalle_layouts_differ_so_the_wrong_one_is_not_a_near_miss():
    """v2 and v3 at the same weights give other logits: the layout is worth getting right, and the tests can tell."""
    from dalle_framework.plugins import registry

    runtime = dict(text_vocab_size=300, text_len=12, image_vocab_size=64, grid=(12, 12))
    priors = {}
    for version in ("v3", "v2"):
        torch.manual_seed(0)
        priors[version] = registry("prior").build({"name": "rudalle", "params": {"dim": 32, "depth": 4, "heads": 2, "layout_version": version}}, **runtime).eval()
    text = rudalle_captions(12)
    image = torch.randint(0, 64, (len(text), 144), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        v3, v2 = (priors[v].next_logits(text, image[:, :100]) for v in ("v3", "v2"))
    assert (v3 - v2).abs().max() > 1e-2


def test_rudalle_conversion_asks_which_layout_a_file_has(tmp_path):
    """Emojich and Surrealist XL both ship `pytorch_model.bin` at width 2048, one v2 and one v3: the file cannot say."""
    ref = rudalle_reference(**RUDALLE_SMALL)
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    asked = run_cli("convert", "rudalle", str(tmp_path / "pytorch_model.bin"), str(tmp_path / "out"), "--param", "heads=4")
    assert asked.returncode == 2, asked.stderr
    assert "--param layout_version=v3" in asked.stderr and "Emojich" in asked.stderr and not (tmp_path / "out").exists()
    wrong = run_cli("convert", "rudalle", str(tmp_path / "pytorch_model.bin"), str(tmp_path / "out"), "--param", "heads=4", "--param", "layout_version=v4")
    assert wrong.returncode == 2 and "layout_version" in wrong.stderr, wrong.stderr
    told = convert("rudalle", tmp_path / "pytorch_model.bin", out=tmp_path / "out", kind="prior", params={"heads": 4, "layout_version": "v2"})
    assert told["params"]["layout_version"] == "v2"
    assert "v2 layout" in json.loads((tmp_path / "out" / "conversion.json").read_text())["released_format"]


def test_rudalle_prior_greedy_samples_match_the_reference(rudalle_files):
    ref, block, runtime = rudalle_files
    prior = build_block("prior", block, **runtime)
    text = rudalle_captions(runtime["text_len"])
    expected = rudalle_loop(ref, text, prior.layout.image_len)
    for use_cache in (True, False):
        tokens = prior.generate(text, Sampling(top_k=1, use_cache=use_cache), generator=torch.Generator().manual_seed(0))
        assert torch.equal(tokens, expected), use_cache
    assert len(expected.unique()) > 4 and not torch.equal(expected[0], expected[1]), "the greedy samples vary: the comparison is not trivial"


def test_rudalle_prior_trains_and_refuses_what_does_not_fit(rudalle_files, tmp_path):
    ref, block, runtime = rudalle_files
    prior = build_block("prior", block, **runtime).train()
    text = rudalle_captions(runtime["text_len"])
    image = torch.randint(0, runtime["image_vocab_size"], (len(text), prior.layout.image_len))
    out = prior.loss(text, image)
    assert {"loss", "text_loss", "image_loss"} <= set(out) and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert prior.transformer.layers[0].attention.query_key_value.weight.grad.abs().sum() > 0
    unknown = torch.save({"anything": torch.zeros(1)}, tmp_path / "other.bin")
    result = run_cli("convert", "rudalle", str(tmp_path / "other.bin"), str(tmp_path / "out"))
    assert result.returncode == 2 and "not a ruDALL-E prior" in result.stderr and unknown is None
    headless = run_cli("convert", "rudalle", block["weights"], str(tmp_path / "again"))
    assert headless.returncode == 2 and "--param heads=N" in headless.stderr


# ----------------------------------------------------------------------------- ruDALL-E: codec (Sber VQGAN)

SBER_SMALL = dict(double_z=False, z_channels=32, resolution=64, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1, 2],
                  num_res_blocks=1, attn_resolutions=[16], dropout=0.0)  # fmt: skip


def sber_reference(dwt: bool):
    """rudalle's VQGanGumbelVAE (the Sber Gumbel-VQ, optionally with its wavelet decoder), random weights."""
    from omegaconf import OmegaConf

    vae_model = rudalle("rudalle.vae.model")
    torch.manual_seed(0)
    config = OmegaConf.create({"model": {"params": {"ddconfig": dict(SBER_SMALL), "n_embed": 128, "embed_dim": 32, "kl_weight": 1e-8}}})
    vae = vae_model.VQGanGumbelVAE(config, dwt=dwt)
    with torch.no_grad():
        for name, param in vae.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.05)
    return vae.eval()


def sber_reference_codes(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        codes = vae.get_codebook_indices(images, disable_gumbel_softmax=True)
        return codes, vae.decode(codes)


@pytest.mark.debian_data("emoji")
@pytest.mark.parametrize("dwt", [True, False], ids=["wavelet", "plain"])
def test_sber_vqgan_matches_rudalle_on_real_images(dwt, tmp_path):
    from test_pretrained_codecs import real_images

    vae = sber_reference(dwt)
    # released layouts: the wavelet file is the VAE's state dict (model.*), the plain one GumbelVQ's
    state = vae.state_dict() if dwt else vae.model.state_dict()
    torch.save({"state_dict": state}, tmp_path / "vqgan.ckpt")
    block = convert("rudalle-vqgan", tmp_path / "vqgan.ckpt", out=tmp_path / "converted", kind="codec")
    assert block["params"]["wavelet"] is dwt and block["frozen"] is True
    codec = build_block("codec", {**block, "params": {**block["params"], "image_size": 64}})
    images = real_images("emoji", 64, 6)
    ref_codes, ref_pixels = sber_reference_codes(vae, images)
    tokens = codec.encode(images)
    assert torch.equal(tokens, ref_codes) and len(ref_codes.unique()) > 8
    pixels = codec.decode(tokens)
    assert pixels.shape == ref_pixels.shape == (6, 3, 128 if dwt else 64, 128 if dwt else 64)
    assert torch.allclose(pixels, ref_pixels, atol=PIXEL_ATOL, rtol=0), float((pixels - ref_pixels).abs().max())
    assert float(ref_pixels.std()) > 0.01


def test_sber_vqgan_defaults_are_the_released_shape():
    rudalle("rudalle.vae.model")
    from omegaconf import OmegaConf

    import rudalle.vae.model as vae_model

    config = OmegaConf.load(Path(vae_model.__file__).parent / "vqgan.gumbelf8-sber.config.yml")
    with torch.device("meta"):
        reference_vae = vae_model.VQGanGumbelVAE(config, dwt=True)
        codec = registry("codec").build({"name": "rudalle-vqgan", "params": {}})
    ours = {k: tuple(v.shape) for k, v in codec.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in reference_vae.state_dict().items()}
    from dalle_vqgan.convert import sber_state

    assert ours == {k: v for k, v in ((k, tuple(t.shape)) for k, t in sber_state(reference_vae.state_dict()).items())}
    assert len(theirs) > len(ours)  # theirs also holds the unused outer post_quant_conv and the wavelet filters
    assert (codec.vocab_size, codec.grid, codec.image_size) == (8192, (32, 32), 256)


# ----------------------------------------------------------------------------- DALL-E Mini / Mega (min-dalle)

MINI_SMALL = dict(layers=2, width=32, heads=4, glu=48, text_vocab=300, image_vocab=16384, std=0.3, spread=0.2)
MIN_DALLE_CAPTIONS = ["a red car near a house", "Painting of an AVOCADO chair", "cat 🐈 on a window", "naïve café", "  two  spaces ",
                      "sky " * 40, "zebra quux"]


@pytest.fixture(scope="module")
def bart_files(tmp_path_factory):
    """A BART-style byte-level BPE (vocab.json + merges.txt, <s> <pad> </s> <unk> first), converted."""
    directory = tmp_path_factory.mktemp("bart")
    vocab, merges = bart_bpe(directory, EN + ["painting", "of", "avocado", "chair"])
    return directory, convert("min-dalle-bpe", vocab, merges, out=directory / "converted", kind="tokenizer")


@pytest.fixture(scope="module")
def min_dalle_run(bart_files, tmp_path_factory):
    """A small random min-dalle model saved as encoder.pt / decoder.pt, converted, and min-dalle's own answers for it."""
    bart, tokenizer_block = bart_files
    block, runtime, answers, image = min_dalle_answers(MINI_SMALL, tmp_path_factory.mktemp("min-dalle"), bart, params={"heads": MINI_SMALL["heads"]})
    return tokenizer_block, block, runtime, answers, image


def min_dalle_answers(shape: dict, directory: Path, bart: Path, *, params: dict | None = None, drop_release: bool = False):
    """A random min-dalle model of ``shape`` saved as its files, converted, and min-dalle's own answers for it."""
    from references import MIN_DALLE_RELEASE, MIN_DALLE_SAMPLE, run_min_dalle

    run_min_dalle(MIN_DALLE_RELEASE, shape=shape, seed=0, out=str(directory))
    image = torch.randint(0, 16384, (256,), generator=torch.Generator().manual_seed(5)).tolist()
    run_min_dalle(MIN_DALLE_SAMPLE, shape=shape, dir=str(directory), vocab=str(bart / "vocab.json"), merges=str(bart / "merges.txt"),
                  captions=MIN_DALLE_CAPTIONS, sample=MIN_DALLE_CAPTIONS[:2], factor=4, image=image, result=str(directory / "answers.pt"))
    block = convert("min-dalle", directory / "encoder.pt", directory / "decoder.pt", out=directory / "converted", kind="prior", params=params)
    if drop_release:  # only one copy of a large model on disk at a time
        for name in ("encoder.pt", "decoder.pt"):
            (directory / name).unlink()
    answers = torch.load(directory / "answers.pt", weights_only=True)
    runtime = dict(text_vocab_size=shape["text_vocab"] + 1, text_len=64, image_vocab_size=shape["image_vocab"], grid=(16, 16))
    return block, runtime, answers, image


def test_min_dalle_tokenizer_matches_min_dalle(min_dalle_run):
    tokenizer_block, _, _, answers, _ = min_dalle_run
    tokenizer = build_block("tokenizer", tokenizer_block)
    assert tokenizer.vocab_size == MINI_SMALL["text_vocab"] + 1
    ids = tokenizer.encode(MIN_DALLE_CAPTIONS)
    for row, text in zip(ids.tolist(), MIN_DALLE_CAPTIONS):
        expected = [i + 1 for i in answers["tokens"][text][:64]]  # BART ids shifted past padding
        assert row == expected + [0] * (64 - len(expected)), text
    assert tokenizer.decode(ids[:1]) == ["a red car near a house"]


def test_min_dalle_prior_logits_and_greedy_samples_match_min_dalle(min_dalle_run):
    tokenizer_block, block, runtime, answers, image = min_dalle_run
    assert_min_dalle_answers(build_block("tokenizer", tokenizer_block), build_block("prior", block, **runtime), answers, image)


# DALL-E Mini as min-dalle 0.4.11 builds it (MinDalle(is_mega=False)); random weights, spread so outputs vary
MINI_RELEASED = dict(layers=12, width=1024, heads=16, glu=2730, text_vocab=50264, image_vocab=16384, std=0.03, spread=0.1)


@pytest.mark.slow  # about two minutes and 4 GB: a 0.44B model, once in min-dalle and once here
def test_dalle_mini_at_its_released_shape_matches_min_dalle(bart_files, tmp_path):
    """12 + 12 layers at width 1024, 16 heads, the 50,264-row text table: logits of a whole image sequence and
    min-dalle's own greedy, guided samples, with the head count taken from the width as for the released files."""
    bart, tokenizer_block = bart_files
    block, runtime, answers, image = min_dalle_answers(MINI_RELEASED, tmp_path, bart, drop_release=True)
    assert block["params"] == {**block["params"], "dim": 1024, "layers": 12, "heads": 16, "glu_dim": 2730}
    assert_min_dalle_answers(build_block("tokenizer", tokenizer_block), build_block("prior", block, **runtime), answers, image,
                            atol=LOGIT_ATOL * 10, caches=(True,))  # uncached, 256 steps would recompute for ten minutes


def assert_min_dalle_answers(tokenizer, prior, answers: dict, image: list[int], atol: float = LOGIT_ATOL, caches=(True, False)) -> None:
    text = tokenizer.encode(MIN_DALLE_CAPTIONS[:1])
    rows = torch.cat([prior.unconditional_text(text), text])  # min-dalle's row order: unconditional, then the caption
    with torch.no_grad():
        cross = prior.cross_inputs(*prior.encode_text(rows))
        logits = prior.image_logits(prior.decode(prior.with_start(torch.tensor([image[:255]]).repeat(2, 1)), 0, cross))
    expected = answers["logits"]
    assert torch.allclose(logits, expected, atol=atol, rtol=0), float((logits - expected).abs().max())
    assert float(expected.std()) > 0.1
    text = tokenizer.encode(MIN_DALLE_CAPTIONS[:2])
    for use_cache in caches:
        tokens = prior.generate(text, Sampling(top_k=1, guidance_scale=4, use_cache=use_cache), generator=torch.Generator().manual_seed(0))
        for row, caption in zip(tokens.tolist(), MIN_DALLE_CAPTIONS[:2]):
            assert row == answers["samples"][caption][0], (caption, use_cache)
    assert len(set(tokens[0].tolist())) > 4 and not torch.equal(tokens[0], tokens[1])


def test_min_dalle_vqgan_decodes_as_min_dalle(tmp_path):
    from references import run_min_dalle

    script = '''
import json, os, torch
inputs = json.loads(os.environ["INPUTS"])
from min_dalle.models import VQGanDetokenizer
torch.manual_seed(0)
detoker = VQGanDetokenizer().eval()
torch.save(detoker.state_dict(), inputs["out"])
tokens = torch.tensor([inputs["tokens"]])
print(json.dumps({"pixels": (detoker.forward(False, tokens) / 255).tolist()}))
'''
    tokens = torch.randint(0, 16384, (256,), generator=torch.Generator().manual_seed(6))
    answer = run_min_dalle(script, out=str(tmp_path / "detoker.pt"), tokens=tokens.tolist())
    block = convert("min-dalle-vqgan", tmp_path / "detoker.pt", out=tmp_path / "converted", kind="codec")
    assert block["params"] == {**block["params"], "pixels": "unit", "encoder": False, "n_embed": 16384, "ch_mult": [1, 1, 2, 2, 4]}
    codec = build_block("codec", block)
    assert (codec.vocab_size, codec.grid, codec.image_size) == (16384, (16, 16), 256)
    pixels = codec.decode(tokens[None])[0].permute(1, 2, 0)  # [256, 256, 3] as min-dalle returns it
    expected = torch.tensor(answer["pixels"])
    assert torch.allclose(pixels, expected, atol=PIXEL_ATOL, rtol=0), float((pixels - expected).abs().max())
    assert float(expected.std()) > 0.01
    from dalle_framework import UsageError

    with pytest.raises(UsageError, match="holds only a decoder"):
        codec.encode(torch.rand(1, 3, 256, 256))


# A VQGAN f2 at 32px with Mega's 16,384 codes: the taming layout min-dalle's detoker.pt also uses.
MEGA_VQGAN_TINY = dict(double_z=False, z_channels=32, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                       num_res_blocks=1, attn_resolutions=[16], dropout=0.0)  # fmt: skip


@pytest.mark.debian_data("emoji")
def test_mega_codec_takes_its_encoder_from_the_taming_checkpoint_its_decoder_came_from(tmp_path):
    """Fine-tuning Mega needs its VQGAN's encoder, which min-dalle does not ship: it comes from that VQGAN's
    taming checkpoint. Codes equal taming's for images in [0, 1] (as dalle-mini encoded its data), decoding at
    taming's GroupNorm eps equals taming's decoder, and a checkpoint of another VQGAN, or one without a codebook,
    is refused."""
    from test_pretrained_codecs import TamingModel, real_images

    reference("taming.modules.diffusionmodules.model")

    def release(seed: int) -> TamingModel:
        torch.manual_seed(seed)
        model = TamingModel("vq", MEGA_VQGAN_TINY, n_embed=16384, embed_dim=32).eval()
        model.spread_codebook(32, signed=False)
        torch.save({"epoch": 1, "global_step": 10, "state_dict": model.state_dict()}, tmp_path / f"last-{seed}.ckpt")
        return model

    model, _ = release(0), release(1)
    state = model.state_dict()
    detoker = {"embedding.weight": state["quantize.embedding.weight"]}
    detoker |= {k: v for k, v in state.items() if k.startswith(("decoder.", "post_quant_conv."))}
    torch.save(detoker, tmp_path / "detoker.pt")
    block = convert("min-dalle-vqgan", tmp_path / "detoker.pt", tmp_path / "last-0.ckpt", out=tmp_path / "codec", kind="codec")
    assert block["params"] == {**block["params"], "encoder": True, "pixels": "unit", "n_embed": 16384, "ch_mult": [1, 2]}
    record = json.loads((Path(block["weights"]).parent / "conversion.json").read_text())
    assert record["tensors_matched_with_the_encoder_file"] == len(detoker)
    def codec_with(**params):
        return build_block("codec", {**block, "params": {**block["params"], "image_size": 32, **params}})

    codec, images = codec_with(), real_images("emoji", 32, 6)
    codes, pixels = model.reference(images, signed=False)
    with torch.no_grad():
        features = model.quant_conv(model.encoder(images))
        # the encoder is dalle-mini's, at taming's GroupNorm eps: min-dalle's 1e-5 would move every feature
        assert torch.allclose(codec.pre_quant(images), features, atol=1e-5, rtol=0)
        assert not torch.allclose(codec_with(encoder_norm_eps=1e-5).pre_quant(images), features, atol=1e-5, rtol=0)
    tokens = codec.encode(images)
    assert len(codes.unique()) > 32, "many codes are used: the comparison is not trivial"
    # 16,384 codes in 32 dimensions hold near-ties that float32 rounding may break either way: a code may differ
    # only where it is as near as taming's to 1e-4, and rarely.
    distances = torch.cdist(features.permute(0, 2, 3, 1).reshape(-1, 32).double(), model.quantize.embedding.weight.detach().double())
    ours, theirs = distances.gather(1, tokens.view(-1, 1)), distances.gather(1, codes.view(-1, 1))
    assert torch.all(ours <= theirs * (1 + 1e-4)) and (tokens != codes).float().mean() < 0.01
    # The decoder is min-dalle's port (GroupNorm eps 1e-5, matched to min-dalle above); at taming's 1e-6, which
    # dalle-mini's own decoder uses, it decodes as taming does.
    decoded = codec_with(norm_eps=1e-6).decode(codes)
    assert torch.allclose(decoded, pixels, atol=1e-4, rtol=0), float((decoded - pixels).abs().max())
    assert not torch.allclose(codec.decode(codes), pixels, atol=1e-4, rtol=0)

    other = run_cli("convert", "min-dalle-vqgan", str(tmp_path / "detoker.pt"), str(tmp_path / "last-1.ckpt"), str(tmp_path / "other"))
    assert other.returncode == 2 and "last-1.ckpt: not the VQGAN detoker.pt decodes" in other.stderr, other.stderr
    assert "quantize.embedding.weight" in other.stderr and not (tmp_path / "other").exists()
    encoder_only = {k: v for k, v in state.items() if k.startswith(("encoder.", "quant_conv."))}
    torch.save(encoder_only, tmp_path / "encoder.pt")
    bare = run_cli("convert", "min-dalle-vqgan", str(tmp_path / "detoker.pt"), str(tmp_path / "encoder.pt"), str(tmp_path / "bare"))
    assert bare.returncode == 2 and "encoder.pt: holds no codebook" in bare.stderr, bare.stderr


# ----------------------------------------------------------------------------- the released shapes, on the meta device


@pytest.mark.slow  # about two minutes: five `dalle inspect` processes
def test_released_recipes_have_the_reference_models_parameters():
    """`dalle inspect` on the shipped recipes counts what rudalle's Malevich and min-dalle's Mega hold, built on meta."""
    from references import run_min_dalle

    model = rudalle("rudalle.dalle.model")
    malevich = dict(num_layers=24, hidden_size=2048, num_attention_heads=16, embedding_dropout_prob=0.1, output_dropout_prob=0.1,
                    attention_dropout_prob=0.1, image_tokens_per_dim=32, text_seq_length=128, cogview_sandwich_layernorm=True,
                    cogview_pb_relax=True, vocab_size=16384 + 128, image_vocab_size=8192)  # rudalle's MODELS["Malevich"]
    with torch.device("meta"):
        reference_malevich = sum(p.numel() for p in model.DalleModel(device="meta", **malevich).parameters())
    script = '''
import json, torch
from min_dalle.models import DalleBartEncoder, DalleBartDecoder
with torch.device("meta"):  # MinDalle(is_mega=True)'s shapes
    enc = DalleBartEncoder(layer_count=24, embed_count=2048, attention_head_count=32, text_vocab_count=50272, text_token_count=64, glu_embed_count=4096, device="meta")
    dec = DalleBartDecoder(image_vocab_count=16415, embed_count=2048, attention_head_count=32, glu_embed_count=4096, layer_count=24, device="meta")
print(json.dumps({"params": sum(p.numel() for m in (enc, dec) for p in m.parameters())}))
'''
    reference_mega = run_min_dalle(script)["params"]
    for recipe, expected in (("rudalle-malevich", reference_malevich), ("dalle-mega", reference_mega)):
        released = json.loads(run_cli("inspect", recipe, "--gpus", "1").stdout)["prior"]
        assert released["params"]["total"] == expected, recipe
        result = run_cli("inspect", f"{recipe}-lora", "--gpus", "1")
        assert result.returncode == 0, result.stderr
        prior = json.loads(result.stdout)["prior"]
        adapters = prior["params"]["trainable"]
        assert prior["params"]["total"] == expected + adapters and 0 < adapters < expected / 20  # only the adapters train
        memory = prior["memory"]
        assert memory["frozen_weights_gib_per_gpu"] > 4 and memory["activations_gib_per_gpu"] > 0
        assert memory["total_gib_per_gpu"]["gpu"] > memory["frozen_weights_gib_per_gpu"]
    assert 1.2e9 < reference_malevich < 1.4e9 and 2.4e9 < reference_mega < 2.8e9
    zero = json.loads(run_cli("inspect", "dalle-mega-zero", "--gpus", "8").stdout)["prior"]
    assert zero["params"]["trainable"] > reference_mega / 3 and zero["memory"]["zero_stage"] == 2


@pytest.mark.slow  # minutes, and about 11 GB at its peak: run it alone
def test_rudalle_malevich_at_its_released_shape_matches_the_reference(tmp_path):
    """The whole 1.3B Malevich (random weights): 24 layers, 128 text + 32x32 image tokens, the 11x11 conv mask
    at its real grid. The reference is built, measured, saved and freed before the converted copy is loaded,
    so only one 5 GB model lives at a time."""
    import gc

    from dalle_framework.decoding import sample_image_tokens

    ref = rudalle_reference(text_vocab=16384, text_len=128, side=32, image_vocab=8192, layers=24, width=2048, heads=16)
    text = rudalle_captions(128)[:2]
    image = torch.randint(0, 8192, (2, 64), generator=torch.Generator().manual_seed(4))
    mask = torch.tril(torch.ones(2, 1, 192, 192))
    with torch.no_grad():
        expected_logits, _ = ref(torch.cat([text, image], dim=1), mask, return_loss=False)
    expected_tokens = rudalle_loop(ref, text, 8)
    torch.save(ref.state_dict(), tmp_path / "pytorch_model_v3.bin")
    del ref
    gc.collect()

    block = convert("rudalle", tmp_path / "pytorch_model_v3.bin", out=tmp_path / "converted", kind="prior")  # heads from the width
    (tmp_path / "pytorch_model_v3.bin").unlink()
    assert block["params"] == {**block["params"], "dim": 2048, "depth": 24, "heads": 16}
    prior = build_block("prior", block, text_vocab_size=16384, text_len=128, image_vocab_size=8192, grid=(32, 32))
    assert prior.layer_patterns()[:5] == ["row", "rudalle-column", "row", "row", "row"] and prior.layer_patterns()[-1] == "rudalle-conv"
    with torch.no_grad():
        states = prior.hidden(torch.cat([prior.text_ids_of(text), image], dim=1))
        logits = torch.cat([prior.text_logits(states), prior.image_logits(states)], dim=-1)
    assert torch.allclose(logits, expected_logits, atol=LOGIT_ATOL * 10, rtol=1e-4), float((logits - expected_logits).abs().max())
    tokens = sample_image_tokens(prior, text, Sampling(top_k=1), image_len=8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tokens, expected_tokens)


def test_weights_converted_for_another_layout_or_head_count_are_refused(rudalle_files, tmp_path):
    """Neither the layout nor the head count shows in a shape: a block that differs from the conversion is exit 2."""
    from safetensors.torch import load_file, save_file

    ref, block, runtime = rudalle_files
    other = {"v2": "v3", "v3": "v2"}[block["params"]["layout_version"]]
    for change in ({"layout_version": other}, {"heads": 2}):
        wrong = {**block, "params": {**block["params"], **change}}
        with pytest.raises(UsageError) as refused:
            build_block("prior", wrong, **runtime)
        (key,) = change
        assert block["weights"] in str(refused.value) and f"{key}: {block['params'][key]!r}" in str(refused.value)
    assert build_block("prior", {**block, "params": {**block["params"], "output_dropout": 0.0}}, **runtime) is not None  # a free param
    for recorded in ("[1]", "{not json"):  # a stranger's file with damaged metadata
        save_file(load_file(block["weights"]), str(tmp_path / "odd.safetensors"), metadata={"bound_params": recorded})
        with pytest.raises(UsageError, match="damaged metadata"):
            build_block("prior", {**block, "weights": str(tmp_path / "odd.safetensors")}, **runtime)
