"""Tiny random-weight releases of ruDALL-E and DALL-E Mega, saved as the real files are and converted
with `dalle convert`, plus a folder of captioned images: what the fine-tuning tests start from."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import yaml

from conftest import run_cli
from references import reference, rudalle

RU = "красная машина стоит на улице возле дома кот сидит на окне собака бежит по полю зелёное дерево синее небо".split()
EN = "a red car stands on the street near a house cat sits window dog runs field green tree blue sky".split()
COLOURS = {"красный": (220, 30, 30), "синий": (30, 60, 220), "зелёный": (30, 180, 60), "жёлтый": (230, 210, 40)}


def convert(component: str, *files: Path, out: Path, kind: str, params: dict | None = None, trust: bool = False) -> dict:
    """Run `dalle convert` as a user would; returns the block it wrote."""
    args = ["convert", component, *map(str, files), str(out)] + (["--trust-pickle"] if trust else [])
    for key, value in (params or {}).items():
        args += ["--param", f"{key}={value}"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["component"] == component and summary["kind"] == kind
    return yaml.safe_load((out / f"{kind}.yaml").read_text())


def image_folder(directory: Path, n: int = 24, size: int = 32) -> Path:
    """``n`` coloured squares on white with Russian captions ("красный квадрат слева"), as `folder` reads them."""
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i in range(n):
        colour = rng.choice(list(COLOURS))
        left = rng.random() < 0.5
        image = Image.new("RGB", (size, size), (255, 255, 255))
        x0 = 2 if left else size // 2
        image.paste(COLOURS[colour], (x0, size // 4, x0 + size // 2 - 2, size * 3 // 4))
        image.save(directory / f"{i:03d}.png")
        (directory / f"{i:03d}.txt").write_text(f"{colour} квадрат {'слева' if left else 'справа'}\n", encoding="utf-8")
    return directory


# ----------------------------------------------------------------------------- ruDALL-E


def rudalle_release(directory: Path, *, text_len: int = 12, side: int = 4) -> dict[str, dict]:
    """ruDALL-E's three files at a tiny shape (YTTM bpe.model, a Sber VQGAN f8 with the wavelet
    decoder at 32px, a 3-layer prior), converted: ``{"tokenizer": block, "codec": block, "prior": block}``."""
    yttm = reference("youtokentome")
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    words = RU + EN + [w for c in COLOURS for w in (c, "квадрат", "слева", "справа")]
    (directory / "corpus.txt").write_text("\n".join(" ".join(rng.choices(words, k=6)) for _ in range(300)) + "\n")
    yttm.BPE.train(data=str(directory / "corpus.txt"), model=str(directory / "bpe.model"), vocab_size=200)
    vocab = yttm.BPE(str(directory / "bpe.model")).vocab_size()

    from omegaconf import OmegaConf

    vae_model = rudalle("rudalle.vae.model")
    torch.manual_seed(0)
    ddconfig = dict(double_z=False, z_channels=32, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1, 2, 2],
                    num_res_blocks=1, attn_resolutions=[4], dropout=0.0)  # fmt: skip
    config = OmegaConf.create({"model": {"params": {"ddconfig": ddconfig, "n_embed": 64, "embed_dim": 32, "kl_weight": 1e-8}}})
    vae = vae_model.VQGanGumbelVAE(config, dwt=True)
    torch.save({"state_dict": vae.state_dict()}, directory / "vqgan.gumbelf8-sber-dwt.model.ckpt")

    dalle_model = rudalle("rudalle.dalle.model")
    prior = dalle_model.DalleModel(
        device="cpu", num_layers=3, vocab_size=vocab + text_len, hidden_size=32, num_attention_heads=2,
        embedding_dropout_prob=0.1, attention_dropout_prob=0.1, output_dropout_prob=0.1, text_seq_length=text_len,
        image_tokens_per_dim=side, image_vocab_size=64, cogview_sandwich_layernorm=True, cogview_pb_relax=True, hf_version="v3",
    )
    torch.save(prior.state_dict(), directory / "pytorch_model_v3.bin")
    out = directory / "converted"
    return {
        "tokenizer": {**convert("rudalle-bpe", directory / "bpe.model", out=out / "tokenizer", kind="tokenizer"),
                      "params": {"path": str(out / "tokenizer" / "bpe.model"), "vocab_size": vocab, "text_len": text_len}},
        "codec": _with(convert("rudalle-vqgan", directory / "vqgan.gumbelf8-sber-dwt.model.ckpt", out=out / "codec", kind="codec"), image_size=32),
        "prior": convert("rudalle", directory / "pytorch_model_v3.bin", out=out / "prior", kind="prior", params={"heads": 2}),
    }


def _with(block: dict, **params) -> dict:
    return {**block, "params": {**block["params"], **params}}


def recipe(directory: Path, release: dict[str, dict], data: Path, *, name: str, prior: dict | None = None, steps: int = 3) -> Path:
    """A fine-tuning recipe over a converted release: the codec frozen, the prior trained from its weights."""
    prior_block = {k: v for k, v in release["prior"].items() if k != "frozen"}
    prior_block.update(train={"steps": steps, "batch_size": 4, "lr": 1e-3, "eval_every": 1000, "ckpt_every": 1000, "eval_batches": 1},
                       **(prior or {}))
    body = {
        "name": name,
        "output_dir": str(directory / "runs" / "{name}"),
        "device": "cpu",
        "data": {"name": "folder", "params": {"root": str(data), "image_size": 32, "heldout_percent": 25}},
        "tokenizer": release["tokenizer"],
        "codec": release["codec"],
        "prior": prior_block,
        "generate": {"candidates": 2, "keep": 1, "batch_size": 2},
        "evaluate": {"captions": 2, "candidates": 2, "batches": 1, "batch_size": 4},
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False, allow_unicode=True))
    return path


# ----------------------------------------------------------------------------- DALL-E Mega (min-dalle)

MEGA_TINY = dict(layers=2, width=32, heads=4, glu=48, text_vocab=300, image_vocab=16384, std=0.05, spread=0.1)
BART_WORDS = "a red blue green yellow square on the left right of picture car house cat dog tree sky".split()


def bart_files(directory: Path, words: list[str] = BART_WORDS) -> tuple[Path, Path]:
    """A BART-style byte-level BPE (``<s> <pad> </s> <unk>`` first) saved as vocab.json + merges.txt."""
    from tokenizers import ByteLevelBPETokenizer

    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([" ".join(rng.choices(words, k=8)) for _ in range(300)], vocab_size=300, min_frequency=2,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
    bpe.save_model(str(directory))
    return directory / "vocab.json", directory / "merges.txt"


def mega_release(directory: Path) -> dict[str, dict]:
    """DALL-E Mega's files at a tiny shape (BART BPE, min-dalle's encoder.pt / decoder.pt, a VQGAN f2 at 32px
    whose decoder is saved as detoker.pt and the whole of it as a taming checkpoint beside it), converted."""
    from references import MIN_DALLE_RELEASE, run_min_dalle

    reference("taming.modules.diffusionmodules.model")
    from taming.modules.diffusionmodules.model import Decoder, Encoder

    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = bart_files(directory / "bart")
    run_min_dalle(MIN_DALLE_RELEASE, shape=MEGA_TINY, seed=0, out=str(directory))
    torch.manual_seed(0)
    ddconfig = dict(double_z=False, z_channels=32, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                    num_res_blocks=1, attn_resolutions=[], dropout=0.0)  # fmt: skip
    encoder, decoder = Encoder(**ddconfig), Decoder(**ddconfig)
    codebook, quant_conv, post_quant_conv = torch.nn.Embedding(16384, 32), torch.nn.Conv2d(32, 32, 1), torch.nn.Conv2d(32, 32, 1)
    detoker = {"embedding.weight": codebook.weight, **_prefixed("post_quant_conv", post_quant_conv), **_prefixed("decoder", decoder)}
    torch.save(detoker, directory / "detoker.pt")  # min-dalle's layout: the decoder side only
    whole = {**_prefixed("encoder", encoder), **_prefixed("quant_conv", quant_conv), **_prefixed("quantize.embedding", codebook),
             **_prefixed("post_quant_conv", post_quant_conv), **_prefixed("decoder", decoder)}
    torch.save({"global_step": 1, "state_dict": whole}, directory / "vqgan-last.ckpt")  # the same VQGAN's taming checkpoint
    out = directory / "converted"
    return {
        "tokenizer": convert("min-dalle-bpe", vocab, merges, out=out / "tokenizer", kind="tokenizer"),
        "codec": _with(convert("min-dalle-vqgan", directory / "detoker.pt", directory / "vqgan-last.ckpt", out=out / "codec", kind="codec"),
                       image_size=32),
        "prior": convert("min-dalle", directory / "encoder.pt", directory / "decoder.pt", out=out / "prior", kind="prior",
                         params={"heads": MEGA_TINY["heads"]}),
    }


def _prefixed(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def english_folder(directory: Path, n: int = 24, size: int = 32) -> Path:
    """Like :func:`image_folder`, captioned in English ("a red square on the left")."""
    names = {"красный": "red", "синий": "blue", "зелёный": "green", "жёлтый": "yellow"}
    image_folder(directory, n, size)
    for caption in directory.glob("*.txt"):
        colour, _, side = caption.read_text(encoding="utf-8").split()
        caption.write_text(f"a {names[colour]} square on the {'left' if side == 'слева' else 'right'}\n")
    return directory
