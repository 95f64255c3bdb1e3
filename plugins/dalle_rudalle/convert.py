"""ruDALL-E's released prior (``pytorch_model_v3.bin``) -> this prior's safetensors.

The released file is ``DalleModel``'s state dict saved with ``torch.save``: tensors only,
so it is read with ``weights_only=True`` (no ``--trust-pickle``). A Lightning-style dict
with a ``state_dict`` (a fine-tuning checkpoint) is read the same way. Module names are
ruDALL-E's, so tensors are copied as they are; the three attention-mask buffers are
dropped (the masks are rebuilt from the layout). Shapes give every size but the head
count, which comes from the released configurations by width (2048: 16 heads, Malevich
and Surrealist; 3840: 60, Kandinsky; 768: 12) or from ``--param heads=N``.

Nor do the tensors tell rudalle's two layouts apart: Malevich v2 and Emojich (``v2``) hold
the same shapes as Malevich v3 and Surrealist XL (``v3``) but read their sequence
differently. The release's file name says it (``pytorch_model_v2.bin``,
``pytorch_model_v3.bin``), Kandinsky's width does (v3 only); any other file must say
``--param layout_version=v2|v3``, since guessing wrong converts cleanly and generates noise.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from dalle_framework import UsageError
from dalle_framework.convert import read_released, write_converted

HEADS_BY_WIDTH = {2048: 16, 3840: 60, 768: 12}  # rudalle 1.1.3's MODELS table
V3_ONLY_WIDTHS = {3840}  # Kandinsky
_VERSION_IN_NAME = re.compile(r"_(v[23])\b")
MASK_BUFFERS = ("transformer.row_mask", "transformer.col_mask", "transformer.conv_mask")
_LAYER = re.compile(r"transformer\.layers\.(\d+)\.")


def released_state(path: Path, *, trust_pickle: bool) -> dict[str, torch.Tensor]:
    content = read_released(path, trust_pickle=trust_pickle)
    state = content.get("state_dict", content) if isinstance(content, dict) else None
    if not isinstance(state, dict) or "text_embeddings.weight" not in state:
        raise UsageError(f"{path}: not a ruDALL-E prior state dict (no text_embeddings.weight); give pytorch_model_v3.bin")
    return {k: v for k, v in state.items() if k not in MASK_BUFFERS}


def inferred(state: dict[str, torch.Tensor], overrides: dict[str, Any], path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(params, runtime) from the tensors' shapes."""
    text_pos, width = state["text_pos_embeddings.weight"].shape
    text_len = text_pos - 1
    runtime = {
        "text_vocab_size": int(state["text_embeddings.weight"].shape[0] - text_len),
        "text_len": int(text_len),
        "image_vocab_size": int(state["image_embeddings.weight"].shape[0]),
        "grid": (int(state["image_row_embeddings.weight"].shape[0]), int(state["image_col_embeddings.weight"].shape[0])),
    }
    depth = 1 + max((int(m.group(1)) for k in state if (m := _LAYER.match(k))), default=-1)
    heads = overrides.get("heads", HEADS_BY_WIDTH.get(int(width)))
    if heads is None:
        raise UsageError(f"{path}: width {width} is not a released ruDALL-E shape, so its head count is unknown; pass --param heads=N")
    sandwich = "transformer.layers.0.before_first_addition_layernorm.weight" in state
    version = layout_version(path, int(width), overrides)
    return {"dim": int(width), "depth": depth, "heads": heads, "sandwich_norm": sandwich, "layout_version": version}, runtime


def layout_version(path: Path, width: int, overrides: dict[str, Any]) -> str:
    """v2 or v3, from ``--param layout_version``, the release's file name or its width; else refused."""
    if "layout_version" in overrides:
        return str(overrides["layout_version"])
    named = _VERSION_IN_NAME.search(path.stem)
    if named:
        return named.group(1)
    if width in V3_ONLY_WIDTHS:
        return "v3"
    raise UsageError(
        f"{path}: ruDALL-E's v2 and v3 releases hold the same tensors and the file name does not say which this is; "
        "pass --param layout_version=v3 (Malevich v3, Surrealist XL) or --param layout_version=v2 (Malevich v2, Emojich)"
    )


def convert_rudalle_prior(cls, files: list[Path], out_dir: Path, *, trust_pickle: bool, overrides=None) -> dict:
    if len(files) != 1:
        raise UsageError(f"{cls.name}: give the released weights and the output directory: dalle convert {cls.name} pytorch_model_v3.bin OUT")
    path = Path(files[0])
    state = released_state(path, trust_pickle=trust_pickle)
    params, runtime = inferred(state, dict(overrides or {}), path)
    return write_converted(
        cls, out_dir, kind="prior", params=params, state=state, runtime=runtime, sources=[path], overrides=overrides,
        notes={"released_format": f"rudalle 1.1.3 DalleModel state dict ({params['layout_version']} layout)",
               "needs": "tokenizer rudalle-bpe (text_len as runtime.text_len) and a codec with runtime.image_vocab_size codes on runtime.grid"},
    )
