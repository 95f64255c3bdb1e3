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


def convert_taming_files(codec_cls, files: list[Path], out_dir: Path, *, trust_pickle: bool) -> dict:
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
        params=params,
        state=state,
        sources=[checkpoint_path, config_path],
        notes={"released_format": "taming-transformers Lightning checkpoint + config.yaml", "taming_target": target},
    )
