"""Model statistics of a recipe without allocating it: parameters, FLOPs, training memory.

Every stage's component is built on PyTorch's ``meta`` device (shapes only, no
storage), so even the paper's 12B prior is inspected in a second on a laptop.

- Parameters: :func:`parameter_counts` (lookup tables apart from compute).
- FLOPs per token: a prior reports its own (``Prior.flops_per_token``), since only
  it knows which tokens each layer attends to; otherwise the 2N rule of
  :func:`dalle_framework.metrics.flops_per_token` without the attention term.
- Memory: the stage's training engine estimates it (``Engine.memory_estimate``:
  DeepSpeed's ZeRO estimators for the deepspeed engine).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import finetune
from .errors import UsageError
from .metrics import flops_per_token

COMPUTE_LAYERS = (nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def parameter_counts(module: nn.Module) -> dict[str, int]:
    """``total`` (tied weights once), ``embedding`` (lookup tables), ``non_embedding``,
    ``trainable`` and ``largest_layer`` (the most parameters held directly by one
    module: what ZeRO-3 must gather at once)."""
    unique = {id(p): p for p in module.parameters()}
    in_compute = {id(p) for m in module.modules() if isinstance(m, COMPUTE_LAYERS) for p in m.parameters(recurse=False)}
    embedding = sum(p.numel() for i, p in unique.items() if p.ndim >= 2 and i not in in_compute)
    total = sum(p.numel() for p in unique.values())
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in module.modules()), default=0)
    return {
        "total": total,
        "embedding": embedding,
        "non_embedding": total - embedding,
        "trainable": sum(p.numel() for p in unique.values() if p.requires_grad),
        "largest_layer": largest,
    }


def human(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return str(int(n))


def _as_recipe(recipe: Any):
    from .recipe import Recipe, load_recipe, recipe_from_dict

    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return recipe_from_dict(recipe)
    if isinstance(recipe, (str, Path)):
        return load_recipe(recipe)
    raise UsageError(f"inspect_recipe: expected a Recipe, a dict or a recipe name/path, got {type(recipe).__name__}")


def inspect_recipe(recipe: Any, *, gpus_per_node: int = 8, nodes: int = 1) -> dict[str, Any]:
    """Statistics of every stage of ``recipe`` (a Recipe, dict, name or path), built on ``meta``.

    Returns JSON-ready ``{"recipe", "tokenizer", <stage>: {...}}``. A stage gets
    ``params``, ``memory`` (its engine's estimate at ``gpus_per_node * nodes``
    processes), and when its component reports FLOPs, ``flops_per_token`` and
    ``train`` (tokens and FLOPs of the whole run). A component that cannot be
    built reports ``{"error": ...}`` instead.
    """
    from .pipeline import Pipeline

    if gpus_per_node < 1 or nodes < 1:
        raise UsageError(f"inspect: gpus_per_node ({gpus_per_node}) and nodes ({nodes}) must be >= 1")
    recipe = _as_recipe(recipe)
    pipe = Pipeline(recipe, device="cpu")
    report: dict[str, Any] = {"recipe": recipe.name}
    with torch.device("meta"):  # shapes only: nothing is allocated
        tokenizer = pipe.tokenizer  # sized from its params: inspecting needs no fitted vocabulary
        report["tokenizer"] = {"class": type(tokenizer).__name__, "vocab_size": tokenizer.vocab_size, "text_len": tokenizer.text_len}
        for name, stage in pipe.stages.items():
            try:
                module = stage.build()
            except Exception as exc:  # one stage that cannot be built on meta must not hide the rest
                report[name] = {"error": f"cannot be built on the meta device: {type(exc).__name__}: {exc}"}
                continue
            module = finetune.prepare(module, stage.block)  # trainable counts under LoRA / freeze
            report[name] = _stage_stats(pipe, stage, module, gpus_per_node=gpus_per_node, nodes=nodes)
    return report


def _stage_stats(pipe, stage, module: nn.Module, *, gpus_per_node: int, nodes: int) -> dict[str, Any]:
    counts = parameter_counts(module)
    stats: dict[str, Any] = {"class": type(module).__name__, "params": counts, "params_human": human(counts["total"])}
    for key in ("vocab_size", "image_size"):
        if isinstance(getattr(module, key, None), int):
            stats[key] = getattr(module, key)
    if isinstance(getattr(module, "grid", None), tuple):
        stats["grid"] = list(module.grid)
    reported = getattr(module, "flops_per_token", None)
    flops = reported() if callable(reported) else None
    if flops is None and hasattr(module, "generate"):
        flops = {**flops_per_token(counts["non_embedding"], n_layers=None, seq_len=0, d_attn=None),
                 "note": "the prior does not report its attention FLOPs: 2N only"}
    train = stage.train
    if flops is not None:
        seq_len = int(flops.get("seq_len") or 0)
        tokens_per_step = train.batch_size * train.grad_accum * gpus_per_node * nodes * seq_len
        stats["flops_per_token"] = flops
        stats["train"] = {
            "steps": train.steps,
            "tokens_per_step": tokens_per_step,
            "tokens": tokens_per_step * train.steps,
            "flops": float(flops["train"]) * tokens_per_step * train.steps,
        }
    memory = _memory(pipe, stage, module, counts, gpus_per_node=gpus_per_node, nodes=nodes)
    if memory is not None:
        stats["memory"] = memory
    return stats


GiB = 2**30


def _memory(pipe, stage, module: nn.Module, counts: dict[str, int], *, gpus_per_node: int, nodes: int) -> dict[str, Any] | None:
    """Memory per GPU while training: the engine's model states for the trainable parameters,
    frozen weights (held whole by every process), and the activations of one micro-batch."""
    train = stage.train
    engine = pipe.build("engine", train.engine)
    memory = engine.memory_estimate(
        total_params=counts["trainable"], largest_layer_params=counts["largest_layer"], gpus_per_node=gpus_per_node, nodes=nodes
    )
    if memory is None:
        return None
    half = train.precision in ("bf16", "fp16")
    extra = 0.0
    frozen = counts["total"] - counts["trainable"]
    if frozen:
        # the torch engine keeps fp32 weights under autocast; DeepSpeed keeps frozen ones in its compute
        # dtype, and ZeRO-3 shards them like the rest
        weight_bytes = 2 if half and train.engine.name == "deepspeed" else 4
        shards = gpus_per_node * nodes if memory.get("zero_stage") == 3 else 1
        extra += memory.setdefault("frozen_weights_gib_per_gpu", round(frozen * weight_bytes / shards / GiB, 2))
    activations = getattr(module, "activation_bytes", lambda *a: None)(train.batch_size, 2 if half else 4)
    if activations is not None:
        extra += memory.setdefault("activations_gib_per_gpu", round(activations / GiB, 2))
        memory["activations_note"] = f"one micro-batch of {train.batch_size} at {'bf16/fp16' if half else 'fp32'} (an estimate)"
    variants = {name: v["gpu_gib_per_gpu"] for name, v in memory.items() if isinstance(v, dict) and "gpu_gib_per_gpu" in v}
    memory["total_gib_per_gpu"] = {name: round(gib + extra, 2) for name, gib in variants.items()}
    return memory


__all__ = ["flops_per_token", "human", "inspect_recipe", "parameter_counts"]
