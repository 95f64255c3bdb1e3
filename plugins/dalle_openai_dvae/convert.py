"""OpenAI's ``encoder.pkl`` / ``decoder.pkl`` -> this codec's safetensors.

The released files are whole pickled ``dall_e.encoder.Encoder`` /
``dall_e.decoder.Decoder`` modules. They are read with
:func:`dalle_framework.convert.read_released` (needs ``--trust-pickle``; the
``dall_e`` classes become inert stand-ins, so the package is not needed) and
their parameters renamed to the core's convolutional layout:

    blocks.input.w                          -> blocks.0.weight
    blocks.group_G.block_I.id_path.w        -> blocks.N.id_path.weight
    blocks.group_G.block_I.res_path.conv_J.w -> blocks.N.res_path.(2J-1).weight
    blocks.output.conv.w                    -> blocks.(last).weight

where ``N`` counts the stem, the blocks and the pooling / upsampling layers before
the block (``res_path`` alternates ReLU and conv, so conv J sits at 2J - 1).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from dalle_framework import UsageError
from dalle_framework.convert import module_state, read_released, write_converted

from .layout import GROUPS

RELEASED_CLASSES = {"dall_e.encoder.Encoder": "encoder", "dall_e.decoder.Decoder": "decoder"}
_KEY = re.compile(r"blocks\.(?:(input)|(output)\.conv|group_(\d+)\.block_(\d+)\.(?:(id_path)|res_path\.conv_(\d)))\.([wb])$")
_TENSOR = {"w": "weight", "b": "bias"}


def renamed(key: str, blocks_per_group: int) -> str:
    """A released key (``blocks.group_2.block_1.res_path.conv_3.w``) -> the core layout's (``blocks.3.res_path.5.weight``)."""
    match = _KEY.match(key)
    if match is None:
        raise UsageError(f"unexpected parameter {key!r}: not the released dVAE's layout")
    stem, output, group, block, id_path, conv, tensor = match.groups()
    # Layer indices: stem 0; group g (1-based) holds blocks_per_group blocks and then
    # one resampling layer unless it is the last; then ReLU and the output conv.
    if stem:
        index, inner = 0, ""
    elif output:
        index, inner = 1 + GROUPS * blocks_per_group + (GROUPS - 1) + 1, ""
    else:
        g, i = int(group), int(block)
        if not (1 <= g <= GROUPS and 1 <= i <= blocks_per_group):
            raise UsageError(f"unexpected parameter {key!r}: {GROUPS} groups of {blocks_per_group} blocks expected")
        index = 1 + (g - 1) * (blocks_per_group + 1) + (i - 1)
        inner = ".id_path" if id_path else f".res_path.{2 * int(conv) - 1}"
    return f"blocks.{index}{inner}.{_TENSOR[tensor]}"


def _blocks_per_group(state: dict[str, torch.Tensor]) -> int:
    return len({k.split(".")[2] for k in state if k.startswith("blocks.group_1.block_")})


def convert_openai_files(codec_cls, files: list[Path], out_dir: Path, *, trust_pickle: bool, overrides=None) -> dict:
    """Read both pickles, infer the shapes, rename, and write via :func:`write_converted`."""
    if len(files) != 2:
        raise UsageError(
            f"{codec_cls.name}: give OpenAI's two files and the output directory: "
            f"dalle convert {codec_cls.name} encoder.pkl decoder.pkl OUT --trust-pickle"
        )
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for path in files:
        obj = read_released(Path(path), trust_pickle=trust_pickle)
        source = getattr(obj, "source", type(obj).__name__)
        if source not in RELEASED_CLASSES:
            raise UsageError(
                f"{path}: expected OpenAI's pickled {' or '.join(RELEASED_CLASSES)}, found {source!r} "
                "(the released files are encoder.pkl and decoder.pkl)"
            )
        part = RELEASED_CLASSES[source]
        if part in parts:
            raise UsageError(f"{path}: a second {part}; give one encoder.pkl and one decoder.pkl")
        parts[part] = module_state(obj, str(path))
    enc, dec = parts["encoder"], parts["decoder"]

    try:
        params = {
            "vocab_size": enc["blocks.output.conv.w"].shape[0],
            "hidden": enc["blocks.input.w"].shape[0],
            "blocks_per_group": _blocks_per_group(enc),
            "decoder_init": dec["blocks.input.w"].shape[0],
        }
        decoder_shape = {
            "vocab_size": dec["blocks.input.w"].shape[1],
            "hidden": dec["blocks.output.conv.w"].shape[1],
            "blocks_per_group": _blocks_per_group(dec),
        }
    except KeyError as exc:
        raise UsageError(f"the released dVAE has no parameter {exc}: not OpenAI's encoder / decoder layout") from None
    mismatched = {k: (params[k], v) for k, v in decoder_shape.items() if params[k] != v}
    if mismatched:
        raise UsageError(f"encoder and decoder do not belong together: (encoder, decoder) {mismatched}")

    state = {f"encoder.{renamed(k, params['blocks_per_group'])}": v for k, v in enc.items()}
    state.update({f"decoder.{renamed(k, params['blocks_per_group'])}": v for k, v in dec.items()})
    return write_converted(
        codec_cls,
        out_dir,
        kind="codec",
        overrides=overrides,
        params={**params, "image_size": 256},
        state=state,
        sources=[Path(f) for f in files],
        notes={"released_format": "OpenAI dall_e 0.1 pickled Encoder / Decoder modules"},
    )
