"""The CLIP reranker's settings, importable without torch: recipes are checked with them alone.

A ``model`` name is checked against the architecture files open_clip bundles, read without importing
it; a custom ``config`` is built on the meta device to check it, which imports open_clip and torch
the first time that config (with these versions of open_clip and torch) is checked on this machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from dalle_framework import Params


# The BPE vocabulary bundled with open_clip (49,408 ids); a custom config's text
# tower must embed at least this many ids.
BPE_VOCAB_SIZE = 49408

# Top-level keys of open_clip.CLIP(**config) a recipe may set (dtype/output
# plumbing stays ours).
CONFIG_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias", "nonscalar_logit_scale"}
# Tower options that would fetch weights or tokenizers from the Hub.
DOWNLOADING_KEYS = {"timm_model_name", "timm_model_pretrained", "hf_model_name", "hf_tokenizer_name", "hf_model_pretrained"}


class ClipParams(Params):
    """Which CLIP to build, where its weights come from, how to score."""

    model: Optional[str] = Field(
        None,
        description="open_clip architecture name (e.g. 'ViT-B-32', 'RN50'; see open_clip.list_models()), "
        "built untrained with pretrained=None because nothing is downloaded; give `weights` to load a checkpoint",
    )
    config: Optional[dict[str, Any]] = Field(
        None,
        description="custom CLIP config for open_clip.CLIP(**config): embed_dim, vision_cfg {image_size, patch_size, "
        "width, layers, ...}, text_cfg {context_length, vocab_size, width, heads, layers}; small models for small "
        "images and short captions",
    )
    weights: Optional[str] = Field(
        None,
        description="local weights file loaded after building: an open_clip .pt/.bin checkpoint (weights-only) or "
        "a .safetensors file exported by the framework; null keeps the random init (train it first)",
    )
    batch_size: int = Field(
        256, ge=1, description="pairs per forward pass in score()/similarity(); bounds memory when reranking many candidates"
    )
    interpolation: Literal["bicubic", "bilinear"] = Field(
        "bicubic", description="resize filter (antialiased) when images differ from the model's image size; CLIP used bicubic"
    )

    @model_validator(mode="after")
    def _one_source(self) -> "ClipParams":
        if (self.model is None) == (self.config is None):
            raise ValueError(
                "give exactly one of `model` (an open_clip architecture name such as 'ViT-B-32') "
                "or `config` (a custom CLIP config dict with embed_dim, vision_cfg, text_cfg)"
                + (", not both" if self.model is not None else "")
            )
        if self.model is not None:
            _check_model_name(self.model)
        else:
            self.config = _check_config(self.config)
        return self


def _architectures() -> dict[str, dict[str, Any]]:
    """open_clip's architecture configs by name, as ``open_clip.list_models()`` finds them: read from the
    JSON files it bundles, without importing it (and torch), unless it is loaded already, when a caller
    may have added configs of its own (``open_clip.add_model_config``)."""
    loaded = sys.modules.get("open_clip")
    if loaded is not None:
        return {name: loaded.get_model_config(name) for name in loaded.list_models()}
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the clip reranker needs open_clip: pip install open-clip-torch")
    configs = {}
    for path in sorted((Path(spec.submodule_search_locations[0]) / "model_configs").glob("*.json")):
        config = json.loads(path.read_text())
        if all(key in config for key in ("embed_dim", "vision_cfg", "text_cfg")):  # open_clip's own rule
            configs[path.stem] = config
    return configs


def _check_model_name(name: str) -> None:
    architectures = _architectures()
    if name not in architectures:
        import difflib

        close = difflib.get_close_matches(name, list(architectures), n=3)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown open_clip architecture {name!r}{hint} (see open_clip.list_models())")
    cfg = architectures[name]
    towers = {**cfg.get("vision_cfg", {}), **cfg.get("text_cfg", {})}
    needs_hub = sorted(k for k in DOWNLOADING_KEYS if towers.get(k))
    if needs_hub:
        raise ValueError(f"open_clip architecture {name!r} needs Hugging Face/timm downloads ({', '.join(needs_hub)}); pick a CLIP-native one such as 'ViT-B-32' or 'RN50'")


def _check_config(config: dict[str, Any]) -> dict[str, Any]:
    """Validate a custom config against open_clip's dataclasses and build it on the meta device; returns it
    with defaults filled in. Both need open_clip and torch, so a config that passed them is remembered
    (:func:`_built_before`) and later checks of it import neither."""
    missing = sorted({"embed_dim", "vision_cfg", "text_cfg"} - set(config))
    if missing:
        raise ValueError(f"config needs {', '.join(missing)}")
    unknown = sorted(set(config) - CONFIG_KEYS)
    if unknown:
        raise ValueError(f"config has unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(CONFIG_KEYS))}")
    for key in ("vision_cfg", "text_cfg"):
        if not isinstance(config[key], dict):
            raise ValueError(f"config.{key} must be a mapping")
    text = {"vocab_size": BPE_VOCAB_SIZE, **config["text_cfg"]}
    if not isinstance(text["vocab_size"], int) or text["vocab_size"] < BPE_VOCAB_SIZE:
        raise ValueError(
            f"config.text_cfg.vocab_size is {text['vocab_size']} but open_clip's BPE tokenizer emits ids up to "
            f"{BPE_VOCAB_SIZE - 1}; set it to {BPE_VOCAB_SIZE} (or leave it out)"
        )
    config = {**config, "text_cfg": text}
    _check_sizes(config)
    key = _build_key(config)
    if key is not None and _built_before(key):
        return config
    from open_clip import CLIPTextCfg, CLIPVisionCfg

    for name, dataclass in (("vision_cfg", CLIPVisionCfg), ("text_cfg", CLIPTextCfg)):
        allowed = {f.name for f in dataclasses.fields(dataclass)} - DOWNLOADING_KEYS
        bad = sorted(set(config[name]) - allowed)
        if bad:
            raise ValueError(f"config.{name} has unknown or unsupported key(s) {', '.join(bad)} (see open_clip.{dataclass.__name__})")
    _check_builds(config)
    if key is not None:
        _remember_built(key)
    return config


# ----------------------------------------------------------------------------- configs known to build

BUILT_FILE = "clip-configs-built.json"  # in the user's cache directory: hashes of configs that built
MAX_REMEMBERED = 1000


def cache_dir() -> Path:
    """``$DALLE_CACHE_DIR``, else ``$XDG_CACHE_HOME/dalle-framework``, else ``~/.cache/dalle-framework``."""
    explicit = os.environ.get("DALLE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dalle-framework"


def _build_key(config: dict[str, Any]) -> Optional[str]:
    """What a build check depends on: the config and the installed open_clip and torch (None if unknown)."""
    try:
        versions = [importlib.metadata.version(package) for package in ("open_clip_torch", "torch")]
        text = json.dumps({"config": config, "versions": versions}, sort_keys=True, allow_nan=False)
    except (importlib.metadata.PackageNotFoundError, TypeError, ValueError):
        return None
    return hashlib.sha256(text.encode()).hexdigest()


def _remembered() -> list[str]:
    try:
        with open(cache_dir() / BUILT_FILE, "rb") as f:
            keys = json.loads(f.read(MAX_REMEMBERED * 80))
    except (OSError, ValueError):  # none yet, unreadable or damaged: check again
        return []
    return [k for k in keys if isinstance(k, str) and len(k) == 64] if isinstance(keys, list) else []


def _built_before(key: str) -> bool:
    return key in _remembered()


def _remember_built(key: str) -> None:
    """Add a key atomically (a failed write only means the next check builds again)."""
    keys = [k for k in _remembered() if k != key][-(MAX_REMEMBERED - 1):] + [key]
    try:
        directory = cache_dir()
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=directory, prefix=f".{BUILT_FILE}.", delete=False) as f:
            json.dump(keys, f)
        os.replace(f.name, directory / BUILT_FILE)
    except OSError:
        with contextlib.suppress(OSError, NameError):
            os.unlink(f.name)


# Upper bounds that keep a recipe from asking for more than any machine has.
SIZE_LIMITS = {"embed_dim": 16384, "width": 16384, "layers": 512, "heads": 1024, "head_width": 4096,
               "patch_size": 1024, "image_size": 4096, "context_length": 4096, "vocab_size": 10**6}


def _check_sizes(config: dict[str, Any]) -> None:
    towers = {"": config, "vision_cfg.": config["vision_cfg"], "text_cfg.": config["text_cfg"]}
    for prefix, tower in towers.items():
        for key, limit in SIZE_LIMITS.items():
            values = tower.get(key)
            for value in values if isinstance(values, (list, tuple)) else [values]:
                if value is None or isinstance(value, dict):
                    continue
                if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
                    raise ValueError(f"config.{prefix}{key} must be a whole number from 1 to {limit}, got {value!r}")


def _check_builds(config: dict[str, Any]) -> None:
    """Build the model on the meta device and run one image and one caption through it:
    a config that validates must build (a patch larger than the image, say, would not)."""
    import open_clip
    import torch

    try:
        with torch.device("meta"):
            model = open_clip.CLIP(**config)
            size = _pair(model.visual.image_size)
            model.encode_image(torch.empty(1, 3, *size))
            model.encode_text(torch.zeros(1, int(model.context_length), dtype=torch.long))
    except Exception as exc:  # open_clip's own complaint, whatever its type
        raise ValueError(f"config does not build an open_clip CLIP: {type(exc).__name__}: {str(exc)[:300]}") from None


def _pair(size: Any) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
