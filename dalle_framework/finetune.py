"""Fine-tuning pretrained weights: LoRA adapters (through ``peft``) or chosen parameters frozen.

A stage block that names ``weights`` may add

- ``freeze: [glob, ...]``: parameters whose names match stay as loaded (and are exported
  exactly as loaded, though an engine training in bf16 computes with rounded copies);
- ``lora: {targets, rank, alpha, dropout, merge}``: peft's LoRA layers wrap the linear
  modules matching ``targets``; only their low-rank matrices train.

The training loop calls :func:`prepare` on the loaded module, evaluates from
:func:`plain_weights` (adapters merged into a plain state dict) and publishes with
:func:`save_trained`. A LoRA run's ``<stage>/model.safetensors`` is then the adapter
alone (``lora_A`` / ``lora_B`` per layer, small) with the sha256 of the base weights it
was trained on in its metadata; loading it (:func:`load_trained`) reads the base
``weights``, checks that sha256 and adds ``(alpha / rank) * B @ A`` to each adapted
weight, so generation runs a plain module (and needs no peft). With ``merge: true`` the
merged full weights are exported instead and the adapter is kept beside them
(``adapter.safetensors``).
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from . import rundir
from .errors import UsageError

ADAPTER_FILE = "adapter.safetensors"
ADAPTER_KIND = "lora"
PEFT_ADAPTER = "default"  # peft's name for the one adapter injected here


def _matching(names: list[str], patterns: list[str], what: str) -> set[str]:
    found = {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)}
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        example = ", ".join(names[:4])
        raise UsageError(f"{what}: {unmatched} match nothing in this component (names look like: {example}, ...)")
    return found


def prepare(module: nn.Module, block: Any) -> nn.Module:
    """The module as it trains: ``freeze`` patterns fixed, LoRA adapters injected (in place; returned)."""
    if block.freeze:
        frozen = _matching([n for n, _ in module.named_parameters()], block.freeze, f"{block.name}: freeze")
        for name, param in module.named_parameters():
            if name in frozen:
                param.requires_grad_(False)
    if block.lora is not None:
        from peft import LoraConfig, inject_adapter_in_model

        spec = block.lora
        linears = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
        targets = sorted(_matching(linears, spec.targets, f"{block.name}: lora.targets"))
        config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets, bias="none")
        inject_adapter_in_model(config, module, adapter_name=PEFT_ADAPTER)  # every other parameter stops training
    return module


# ----------------------------------------------------------------------------- adapted state dicts

_A, _B = f".lora_A.{PEFT_ADAPTER}.weight", f".lora_B.{PEFT_ADAPTER}.weight"


def _adapted_layers(weights: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k[: -len(_A)] for k in weights if k.endswith(_A))


def adapter_of(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LoRA matrices of an adapted state dict: ``{layer}.lora_A`` ``[r, in]`` and ``{layer}.lora_B`` ``[out, r]``."""
    out = {}
    for layer in _adapted_layers(weights):
        out[f"{layer}.lora_A"], out[f"{layer}.lora_B"] = weights[layer + _A], weights[layer + _B]
    return out


def plain_weights(weights: dict[str, torch.Tensor], block: Any) -> dict[str, torch.Tensor]:
    """A trained state dict as the plain component's: peft's ``base_layer`` names undone, adapters merged,
    and every parameter that was kept fixed (``freeze``, or all but the adapters under LoRA) exactly as
    loaded from ``weights`` (an engine that trains in bf16 holds rounded copies of them)."""
    if block.lora is None and not block.freeze:
        return weights
    out = {key.replace(".base_layer.", "."): value for key, value in weights.items() if ".lora_" not in key}
    fixed = set(out) if block.lora is not None else {k for k in out if any(fnmatch.fnmatchcase(k, p) for p in block.freeze)}
    if block.weights and fixed:
        loaded = rundir.load_weights(block.weights)
        out.update({key: loaded[key].to(out[key].dtype) for key in fixed if key in loaded})
    if block.lora is not None:
        scale = block.lora.alpha / block.lora.rank
        for layer in _adapted_layers(weights):
            weight = out[f"{layer}.weight"]
            delta = weights[layer + _B].float() @ weights[layer + _A].float()
            out[f"{layer}.weight"] = weight + (scale * delta).to(weight.dtype)
    return out


def save_trained(path: Path, weights: dict[str, torch.Tensor], block: Any, metadata: dict[str, str]) -> None:
    """Publish a stage's trained weights: the whole state dict, or (LoRA) the adapter and what it adapts."""
    if block.lora is None:
        rundir.save_weights(path, plain_weights(weights, block), metadata=metadata)
        return
    spec = block.lora
    about = {**metadata, "adapter": ADAPTER_KIND, "rank": str(spec.rank), "alpha": repr(spec.alpha),
             "base": str(Path(block.weights).resolve()), "base_sha256": _sha256(Path(block.weights))}
    adapter = adapter_of(weights)
    if spec.merge:
        rundir.save_weights(path, plain_weights(weights, block), metadata=metadata)
        rundir.save_weights(Path(path).with_name(ADAPTER_FILE), adapter, metadata=about)
    else:
        rundir.save_weights(path, adapter, metadata=about)


def load_trained(module: nn.Module, path: Path, *, base: Optional[str]) -> None:
    """Load a stage's published weights into the plain component: whole, or base ``weights`` plus an adapter."""
    about = rundir.weights_metadata(path)
    if about.get("adapter") != ADAPTER_KIND:
        rundir.load_into(module, path)
        return
    if not base or not Path(base).is_file():
        raise UsageError(f"{path}: a LoRA adapter of {about.get('base')}; the block's `weights` must name those base weights")
    if _sha256(Path(base)) != about.get("base_sha256"):
        raise UsageError(f"{path}: the adapter was trained on other base weights than {base} (sha256 differs); point `weights` at {about.get('base')}")
    rundir.load_into(module, base)
    apply_adapter(module, rundir.load_weights(path), scale=float(about["alpha"]) / int(about["rank"]), source=path)


@torch.no_grad()
def apply_adapter(module: nn.Module, adapter: dict[str, torch.Tensor], *, scale: float, source: Path) -> None:
    """Add ``scale * B @ A`` to the weight of every layer ``adapter`` names."""
    layers = sorted({k.rsplit(".lora_", 1)[0] for k in adapter})
    for layer in layers:
        try:
            weight = module.get_submodule(layer).weight
        except AttributeError:
            raise UsageError(f"{source}: adapts {layer!r}, which this component does not have") from None
        delta = adapter[f"{layer}.lora_B"].float() @ adapter[f"{layer}.lora_A"].float()
        if delta.shape != weight.shape:
            raise UsageError(f"{source}: the adapter of {layer!r} is {tuple(delta.shape)}, the weight {tuple(weight.shape)}")
        weight.add_((scale * delta).to(weight.device, weight.dtype))


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def _sha256(path: Path) -> str:
    """sha256 of a (large) weights file, once per file version in this process."""
    from .convert import sha256

    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256(path)
    return _SHA_CACHE[key]


__all__ = ["ADAPTER_FILE", "adapter_of", "apply_adapter", "load_trained", "plain_weights", "prepare", "save_trained"]
