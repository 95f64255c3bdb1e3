"""min-dalle's released prior (``encoder.pt`` + ``decoder.pt``, or ``encoder_mini.pt`` + ``decoder_mini.pt``) -> safetensors.

Each file is a state dict saved with ``torch.save`` (tensors only: read with
``weights_only=True``). The module names are min-dalle's, so tensors are copied under
``encoder.`` / ``decoder.``. min-dalle loads them with ``strict=False``; keys it would
ignore are ignored here too and listed in ``conversion.json``, missing ones are refused.
Shapes give every size but the head count, which comes from the released models by width
(2048: 32 heads, Mega; 1024: 16, Mini) or from ``--param heads=N``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from dalle_framework import UsageError
from dalle_framework.convert import read_released, write_converted

HEADS_BY_WIDTH = {2048: 32, 1024: 16}  # min-dalle 0.4.11's MinDalle: Mega, Mini
_LAYER = re.compile(r"layers\.(\d+)\.")


def _halves(files: list[Path], *, trust_pickle: bool) -> dict[str, dict[str, Any]]:
    """{"encoder": state, "decoder": state}, told apart by their keys (the decoder has lm_head)."""
    halves: dict[str, dict[str, Any]] = {}
    for path in files:
        state = read_released(path, trust_pickle=trust_pickle)
        if not isinstance(state, dict) or "embed_tokens.weight" not in state:
            raise UsageError(f"{path}: not one of min-dalle's encoder.pt / decoder.pt (no embed_tokens.weight)")
        half = "decoder" if "lm_head.weight" in state else "encoder"
        if half in halves:
            raise UsageError(f"{path}: a second {half}; give one encoder.pt and one decoder.pt")
        halves[half] = state
    return halves


def convert_min_dalle_prior(cls, files: list[Path], out_dir: Path, *, trust_pickle: bool, overrides=None) -> dict:
    if len(files) != 2:
        raise UsageError(f"{cls.name}: give min-dalle's two files and the output directory: dalle convert {cls.name} encoder.pt decoder.pt OUT")
    paths = [Path(f) for f in files]
    halves = _halves(paths, trust_pickle=trust_pickle)
    enc, dec = halves["encoder"], halves["decoder"]
    width = int(enc["embed_tokens.weight"].shape[1])
    heads = dict(overrides or {}).get("heads", HEADS_BY_WIDTH.get(width))
    if heads is None:
        raise UsageError(f"{paths[0]}: width {width} is not a released DALL-E Mini / Mega shape, so its head count is unknown; pass --param heads=N")
    params = {
        "dim": width,
        "layers": 1 + max(int(m.group(1)) for k in enc if (m := _LAYER.match(k))),
        "heads": heads,
        "glu_dim": int(enc["layers.0.glu.fc0.weight"].shape[0]),
        "text_vocab": int(enc["embed_tokens.weight"].shape[0]),
        "image_vocab": int(dec["embed_tokens.weight"].shape[0]) - 1,
    }
    image_len = int(dec["embed_positions.weight"].shape[0])
    side = int(round(image_len**0.5))
    runtime = {"text_vocab_size": params["text_vocab"] + 1, "text_len": int(enc["embed_positions.weight"].shape[0]),
               "image_vocab_size": min(16384, params["image_vocab"] + 1), "grid": (side, side)}
    state = {f"encoder.{k}": v for k, v in enc.items()} | {f"decoder.{k}": v for k, v in dec.items()}
    ignored = _unused(cls, params, runtime, state, overrides)
    state = {k: v for k, v in state.items() if k not in ignored}
    return write_converted(
        cls, out_dir, kind="prior", params=params, state=state, runtime=runtime, sources=paths, overrides=overrides,
        notes={"released_format": "min-dalle 0.4.11 DalleBartEncoder / DalleBartDecoder state dicts", "ignored_keys": sorted(ignored),
               "needs": "tokenizer min-dalle-bpe (text_len 64) and codec min-dalle-vqgan (16,384 codes on 16x16)"},
    )


def _unused(cls, params: dict, runtime: dict, state: dict, overrides) -> set[str]:
    """Keys min-dalle's ``load_state_dict(strict=False)`` would skip: those the model has no place for."""
    import torch

    with torch.device("meta"):
        expected = cls(cls.Params.model_validate({**params, **dict(overrides or {})}), **runtime).state_dict()
    return set(state) - set(expected)
