"""Token shards for stage 2: pre-computed text and image tokens in safetensors.

A shard holds ``text`` int32 ``[N, T]``, ``image_tokens`` int32 ``[N, n]``, and in
the safetensors metadata the captions (JSON list) and a free ``meta`` dict (JSON).
Loading never unpickles.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Union

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..errors import UsageError
from ..rundir import write_bytes

FORMAT = "dalle-token-shard/1"


def save_token_shard(
    path: Union[str, os.PathLike],
    text: torch.Tensor,
    image_tokens: torch.Tensor,
    captions: list[str],
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``text[N, T]`` and ``image_tokens[N, n]`` (integer) plus N captions and ``meta``.

    Ids are stored as int32 (vocabularies are far below 2**31).
    """
    assert text.ndim == 2 and image_tokens.ndim == 2, (
        f"expected 2-D tensors, got {tuple(text.shape)} and {tuple(image_tokens.shape)}"
    )
    assert text.shape[0] == image_tokens.shape[0] == len(captions), (
        f"row counts differ: text {text.shape[0]}, image_tokens {image_tokens.shape[0]}, captions {len(captions)}"
    )
    for name, t in (("text", text), ("image_tokens", image_tokens)):
        assert not t.is_floating_point(), f"{name} must hold integer ids, got {t.dtype}"
        if t.numel():
            assert int(t.min()) >= 0 and int(t.max()) < 2**31, f"{name} ids out of int32 range"
    tensors = {
        "text": text.detach().cpu().to(torch.int32).contiguous(),
        "image_tokens": image_tokens.detach().cpu().to(torch.int32).contiguous(),
    }
    metadata = {"format": FORMAT, "captions": json.dumps(list(captions)), "meta": json.dumps(meta or {})}
    write_bytes(path, st_save(tensors, metadata=metadata))
    return Path(path)


def load_token_shard(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """Read a shard: ``{"text": LongTensor[N, T], "image_tokens": LongTensor[N, n], "captions": [...], "meta": {...}}``."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"token shard {str(path)!r} does not exist")
    data = path.read_bytes()
    try:
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
    except Exception as exc:
        raise UsageError(f"token shard {str(path)!r} is not a readable safetensors file ({exc}); delete it to re-encode") from None
    if metadata.get("format") != FORMAT or not {"text", "image_tokens"} <= set(tensors):
        raise UsageError(f"{str(path)!r} is not a dalle token shard (format {metadata.get('format')!r}); delete it to re-encode")
    try:
        captions, meta = json.loads(metadata["captions"]), json.loads(metadata["meta"])
    except (KeyError, ValueError) as exc:
        raise UsageError(f"token shard {str(path)!r} has damaged metadata ({exc}); delete it to re-encode") from None
    text, image_tokens = tensors["text"], tensors["image_tokens"]
    if not (isinstance(captions, list) and text.ndim == image_tokens.ndim == 2 and len(text) == len(image_tokens) == len(captions)):
        raise UsageError(f"token shard {str(path)!r}: its tensors and captions disagree; delete it to re-encode")
    return {"text": text.long(), "image_tokens": image_tokens.long(), "captions": captions, "meta": meta}


def token_shard_header(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """A shard's rows, captions and ``meta`` read from its header alone (the tensors stay on disk)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            rows = int(f.get_slice("image_tokens").get_shape()[0])
        if metadata.get("format") != FORMAT:
            raise ValueError(f"format {metadata.get('format')!r}")
        return {"rows": rows, "captions": json.loads(metadata["captions"]), "meta": json.loads(metadata["meta"])}
    except Exception as exc:  # anything unreadable is a shard to encode again, named
        raise UsageError(f"token shard {str(path)!r} is not readable ({type(exc).__name__}: {exc}); delete it to re-encode") from None


def load_token_shards(paths: Union[str, os.PathLike, list]) -> dict[str, Any]:
    """Several shards (a list, or a glob like ``tokens/train-*.safetensors``) concatenated in sorted order.

    Returns the keys of :func:`load_token_shard`; ``meta`` is the first shard's.
    """
    import glob

    if isinstance(paths, (str, os.PathLike)):
        found = sorted(glob.glob(str(paths))) or [str(paths)]
    else:
        found = [str(p) for p in paths]
    shards = [load_token_shard(p) for p in found]
    if not shards:
        raise UsageError("no token shards given")
    for name in ("text", "image_tokens"):
        widths = {s[name].shape[1] for s in shards}
        if len(widths) > 1:
            raise UsageError(f"token shards {found} disagree on {name} length: {sorted(widths)}")
    return {
        "text": torch.cat([s["text"] for s in shards]),
        "image_tokens": torch.cat([s["image_tokens"] for s in shards]),
        "captions": [c for s in shards for c in s["captions"]],
        "meta": shards[0]["meta"],
    }
