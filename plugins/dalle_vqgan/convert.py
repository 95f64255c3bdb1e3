"""taming-transformers checkpoints -> this codec's safetensors.

A released VQGAN is a Lightning checkpoint (``last.ckpt``: a dict whose
``state_dict`` holds the model) plus the ``config.yaml`` it was trained with
(``model.params`` holds ``n_embed``, ``embed_dim`` and the ``ddconfig``). The
module names here are taming's, so the state dict is copied as it is, minus the
training loss (``loss.*``: LPIPS and the discriminator). The quantiser kind comes
from the weights: a Gumbel-VQ has ``quantize.proj``.

A checkpoint holding only tensors and containers is read without unpickling
code; one that stores other objects (hyper-parameters as OmegaConf, say) needs
``--trust-pickle``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dalle_framework import UsageError
from dalle_framework.convert import read_config, read_released, write_converted

CONFIG_SUFFIXES = (".yaml", ".yml")
DDCONFIG_KEYS = (
    "ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "resamp_with_conv",
    "in_channels", "out_ch", "resolution", "z_channels", "double_z",
)  # fmt: skip
TRAINING_ONLY = ("loss.",)  # perceptual loss and discriminator weights


def _split_files(codec_name: str, files: list[Path]) -> tuple[Path, Path]:
    configs = [f for f in files if f.suffix in CONFIG_SUFFIXES]
    checkpoints = [f for f in files if f.suffix not in CONFIG_SUFFIXES]
    if len(configs) != 1 or len(checkpoints) != 1:
        raise UsageError(
            f"{codec_name}: give the checkpoint and its taming config, then the output directory: "
            f"dalle convert {codec_name} last.ckpt config.yaml OUT (got {', '.join(map(str, files)) or 'no files'})"
        )
    return checkpoints[0], configs[0]


def params_from_config(config: dict, path: Path) -> dict[str, Any]:
    """taming's ``model.params`` -> this codec's params (without the quantiser kind)."""
    model = config.get("model", config)
    params = model.get("params") if isinstance(model, dict) else None
    if not isinstance(params, dict) or not isinstance(params.get("ddconfig"), dict):
        raise UsageError(f"{path}: not a taming model config (expected model.params.ddconfig)")
    if params.get("remap") is not None:
        raise UsageError(f"{path}: model.params.remap (a remapped codebook) is not supported")
    dd = params["ddconfig"]
    unknown = sorted(set(dd) - set(DDCONFIG_KEYS))
    if unknown:
        raise UsageError(f"{path}: model.params.ddconfig has keys this codec does not know: {unknown}")
    missing = [k for k in ("n_embed", "embed_dim") if k not in params]
    if missing:
        raise UsageError(f"{path}: model.params lacks {missing}")
    out = {k: dd[k] for k in DDCONFIG_KEYS if k in dd}
    out.update(n_embed=params["n_embed"], embed_dim=params["embed_dim"])
    out["image_size"] = out.get("resolution", 256)
    return out


def convert_taming_files(codec_cls, files: list[Path], out_dir: Path, *, trust_pickle: bool, overrides=None) -> dict:
    checkpoint_path, config_path = _split_files(codec_cls.name, [Path(f) for f in files])
    config = read_config(config_path)
    params = params_from_config(config, config_path)
    content = read_released(checkpoint_path, trust_pickle=trust_pickle)
    state = content.get("state_dict", content) if isinstance(content, dict) else None
    if not isinstance(state, dict) or not state:
        raise UsageError(f"{checkpoint_path}: expected a Lightning checkpoint with a state_dict, found {type(content).__name__}")
    state = {k: v for k, v in state.items() if not k.startswith(TRAINING_ONLY)}
    params["quantizer"] = "gumbel" if "quantize.proj.weight" in state else "vq"
    model = config.get("model")
    target = model.get("target") if isinstance(model, dict) else None  # recorded, not used: the weights decide
    return write_converted(
        codec_cls,
        out_dir,
        kind="codec",
        overrides=overrides,
        params=params,
        state=state,
        sources=[checkpoint_path, config_path],
        notes={"released_format": "taming-transformers Lightning checkpoint + config.yaml", "taming_target": target},
    )


# ----------------------------------------------------------------------------- checkpoints without a config


def _count(state: dict, prefix: str) -> int:
    """How many ``prefix.N`` children the state holds (``decoder.up`` -> levels)."""
    return len({k[len(prefix) + 1 :].split(".")[0] for k in state if k.startswith(prefix + ".")})


def params_from_state(state: dict[str, Any], path: Path, resolution: int = 256) -> dict[str, Any]:
    """The ddconfig and quantiser of a taming-layout state dict, from its shapes alone.

    ``resolution`` only places attention (``attn_resolutions`` are sides at it); the
    released VQGANs were all trained at 256.
    """
    try:
        levels = _count(state, "decoder.up")
        conv_out = state["decoder.conv_out.weight"]
        encoder = "encoder.conv_in.weight" in state
        ch = state["encoder.conv_in.weight"].shape[0] if encoder else conv_out.shape[1]  # released: ch_mult[0] == 1
        params: dict[str, Any] = {
            "ch": int(ch),
            "ch_mult": [int(state[f"decoder.up.{i}.block.0.conv2.weight"].shape[0] // ch) for i in range(levels)],
            "num_res_blocks": _count(state, "decoder.up.0.block") - 1,
            "attn_resolutions": [resolution // 2**i for i in range(levels) if f"decoder.up.{i}.attn.0.q.weight" in state],
            "resamp_with_conv": levels < 2 or "decoder.up.1.upsample.conv.weight" in state,
            "in_channels": int(state["encoder.conv_in.weight"].shape[1]) if encoder else 3,
            "out_ch": int(conv_out.shape[0]),
            "resolution": resolution,
            "z_channels": int(state["decoder.conv_in.weight"].shape[1]),
            "encoder": encoder,
            "image_size": resolution,
        }
    except KeyError as exc:
        raise UsageError(f"{path}: not a VQGAN in taming's layout (no {exc})") from None
    gumbel = "quantize.proj.weight" in state
    embed = state["quantize.embed.weight" if gumbel else "quantize.embedding.weight"]
    params.update(quantizer="gumbel" if gumbel else "vq", n_embed=int(embed.shape[0]), embed_dim=int(embed.shape[1]))
    return params


def _checkpoint_state(path: Path, *, trust_pickle: bool) -> dict[str, Any]:
    content = read_released(path, trust_pickle=trust_pickle)
    state = content.get("state_dict", content) if isinstance(content, dict) else None
    if not isinstance(state, dict) or not state:
        raise UsageError(f"{path}: expected a state dict (or a checkpoint holding one), found {type(content).__name__}")
    return {k: v for k, v in state.items() if not k.startswith(TRAINING_ONLY)}


def check_haar(state: dict[str, Any], path: Path) -> None:
    """The wavelet decoder's stored synthesis filters must be Haar's (db1), which this codec applies."""
    for key, value in state.items():
        if key.startswith(("decoder.idwt.", "model.decoder.idwt.")):
            if not torch.allclose(value.abs().double().flatten(), torch.full((value.numel(),), 2**-0.5, dtype=torch.double)):
                raise UsageError(f"{path}: its wavelet filters are not Haar's (db1); only ruDALL-E's db1 decoder is supported")


def sber_state(state: dict[str, Any]) -> dict[str, Any]:
    """ruDALL-E's Sber VQGAN in taming's layout: the wavelet file nests the decoder and has a ``model.`` prefix."""
    state = {k.removeprefix("model."): v for k, v in state.items()}
    if "decoder.decoder.conv_in.weight" not in state:
        return state  # the plain Gumbel-VQ file is taming's layout already
    out = {k: v for k, v in state.items() if not k.startswith(("decoder.", "post_quant_conv."))}  # the outer one is unused
    for key, value in state.items():
        if key.startswith("decoder.decoder."):
            out["decoder." + key.removeprefix("decoder.decoder.")] = value
        elif key.startswith("decoder.post_quant_conv."):
            out[key.removeprefix("decoder.")] = value
    return out


def convert_rudalle_files(codec_cls, files: list[Path], out_dir: Path, *, trust_pickle: bool, overrides=None) -> dict:
    """ruDALL-E's ``vqgan.gumbelf8-sber-dwt.model.ckpt`` (wavelet) or ``vqgan.gumbelf8-sber.model.ckpt``; no config needed."""
    if len(files) != 1:
        raise UsageError(f"{codec_cls.name}: give the checkpoint and the output directory: dalle convert {codec_cls.name} vqgan.gumbelf8-sber-dwt.model.ckpt OUT")
    path = Path(files[0])
    released = _checkpoint_state(path, trust_pickle=trust_pickle)
    check_haar(released, path)
    state = sber_state(released)
    params = params_from_state(state, path)
    params["wavelet"] = params["out_ch"] == 12
    return write_converted(codec_cls, out_dir, kind="codec", params=params, state=state, sources=[path], overrides=overrides,
                           notes={"released_format": "rudalle 1.1.3 Sber VQGAN (Gumbel f8) state dict"})


def convert_min_dalle_files(codec_cls, files: list[Path], out_dir: Path, *, trust_pickle: bool, overrides=None) -> dict:
    """min-dalle's ``detoker.pt`` (the decoder), optionally with the taming checkpoint of the same VQGAN for its encoder."""
    if not 1 <= len(files) <= 2:
        raise UsageError(f"{codec_cls.name}: give detoker.pt (and, to encode images, the same VQGAN's taming checkpoint), then OUT: "
                         f"dalle convert {codec_cls.name} detoker.pt [last.ckpt] OUT")
    paths = [Path(f) for f in files]
    decoder = _checkpoint_state(paths[0], trust_pickle=trust_pickle)
    if "embedding.weight" not in decoder or "decoder.conv_in.weight" not in decoder:
        raise UsageError(f"{paths[0]}: not min-dalle's detoker.pt (expected embedding.weight and decoder.*)")
    state = {("quantize.embedding.weight" if k == "embedding.weight" else k): v for k, v in decoder.items()}
    notes = {"released_format": "min-dalle 0.4.11 VQGanDetokenizer state dict (decoder of dalle-mini's VQGAN f16)"}
    if len(paths) == 2:
        taming = _checkpoint_state(paths[1], trust_pickle=trust_pickle)
        wanted = {k: v for k, v in taming.items() if k.startswith(("encoder.", "quant_conv."))}
        if not wanted:
            raise UsageError(f"{paths[1]}: holds no encoder.* / quant_conv.* weights (taming's layout)")
        notes["tensors_matched_with_the_encoder_file"] = check_same_vqgan(state, taming, paths[0], paths[1])
        state.update(wanted)
    params = {**params_from_state(state, paths[0]), "pixels": "unit"}
    return write_converted(codec_cls, out_dir, kind="codec", params=params, state=state, sources=paths, overrides=overrides, notes=notes)


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to a half-precision rounding (a copy saved in fp16); another VQGAN's weights differ far more."""
    if a.shape != b.shape:
        return False
    a, b = a.double(), b.double()
    return bool((a - b).abs().max() <= 1e-3 * max(float(b.abs().max()), 1e-12))


def check_same_vqgan(decoder: dict[str, Any], taming: dict[str, Any], decoder_path: Path, taming_path: Path) -> int:
    """The encoder must be of the VQGAN whose decoder ``detoker.pt`` is: an encoder of another one turns images
    into codes the prior never saw, and nothing downstream would notice. Every tensor both files hold (the
    codebook at least, the decoder too in a whole checkpoint) must match; returns how many were compared."""
    if "quantize.embedding.weight" not in taming:
        raise UsageError(f"{taming_path}: holds no codebook (quantize.embedding.weight), so nothing shows it is the VQGAN "
                         f"{decoder_path.name} decodes; give the whole taming checkpoint the encoder comes from (its last.ckpt)")
    shared = sorted(set(decoder) & set(taming), key=lambda k: (k != "quantize.embedding.weight", k))  # the codebook first
    differing = [k for k in shared if not _same_tensor(taming[k], decoder[k])]
    if differing:
        listed = ", ".join(differing[:3]) + (f" and {len(differing) - 3} more" if len(differing) > 3 else "")
        raise UsageError(f"{taming_path}: not the VQGAN {decoder_path.name} decodes ({listed} differ of the {len(shared)} tensors "
                         "both hold); its encoder would give codes the prior was not trained on. For DALL-E Mega / Mini the "
                         "encoder is that of dalle-mini's vqgan_imagenet_f16_16384 (docs/pretrained-priors.md)")
    return len(shared)
