"""Model statistics of a recipe without allocating it: parameters, FLOPs, ZeRO-3 memory.

Components are built on PyTorch's ``meta`` device (shapes only, no storage), so
even the paper's 12B prior is inspected in a second on a laptop.

FLOPs per token (Kaplan et al. 2020, "Scaling laws", table 1), one multiply-add
counted as 2 FLOPs:

    forward  ~ 2 * N + 2 * n_layers * seq_len * d_attn
    training ~ 3 * forward  (the backward pass costs about twice the forward)

``N`` counts the non-embedding parameters: every parameter except lookup
tables (``nn.Embedding`` weights and matrices held directly by a model rather
than by a Linear/Conv layer, such as learned positional embeddings), because a
lookup costs no multiply-adds. Output heads are matmuls and are counted. The
attention term is the score and weighted-sum work of dense causal attention
over the whole sequence; sparse attention does less, so it is an upper bound
there. Heads applied only to part of the sequence (separate text and image
heads) are counted for every token: a slight over-estimate.

ZeRO-3 memory comes from DeepSpeed's own estimator
(``estimate_zero3_model_states_mem_needs``, the variant taking counts): model
states only (fp16/bf16 weights, fp32 master weights, Adam moments, gradients),
not activations.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .errors import UsageError

GiB = 2**30
COMPUTE_LAYERS = (nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
LAYER_KEYS = ("depth", "n_layers", "num_layers", "layers")  # names priors use for their depth
WIDTH_KEYS = ("dim", "d_model", "width", "hidden_size", "n_embd")
# name -> (cpu_offload of optimizer states, cpu_offload_params)
ZERO3_VARIANTS = {
    "gpu": (False, False),
    "offload_optimizer": (True, False),
    "offload_optimizer_and_params": (True, True),
}


# ----------------------------------------------------------------------------- parameter counts


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


def _first_int(params: dict, keys: tuple[str, ...]) -> Optional[int]:
    for key in keys:
        value = params.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def attention_shape(prior: nn.Module) -> tuple[Optional[int], Optional[int]]:
    """``(n_layers, d_attn)`` read from the prior's params (``depth``, ``heads * head_dim`` or ``dim``)."""
    raw = getattr(prior, "params", None)
    params = raw.model_dump() if hasattr(raw, "model_dump") else dict(raw or {})
    n_layers = _first_int(params, LAYER_KEYS)
    heads, head_dim = params.get("heads"), params.get("head_dim")
    width = _first_int(params, WIDTH_KEYS)
    if isinstance(heads, int) and isinstance(head_dim, int):
        return n_layers, heads * head_dim
    return n_layers, width


def flops_per_token(non_embedding: int, *, n_layers: Optional[int], seq_len: int, d_attn: Optional[int]) -> dict[str, Any]:
    """Forward and training FLOPs per token (see the module docstring for the formula)."""
    attention = 2 * n_layers * seq_len * d_attn if n_layers and d_attn else 0
    forward = 2 * non_embedding + attention
    return {
        "forward": forward,
        "train": 3 * forward,
        "attention_forward": attention,
        "formula": "forward = 2*N_non_embedding + 2*n_layers*seq_len*d_attn; train = 3*forward",
        "n_layers": n_layers,
        "d_attn": d_attn,
        "seq_len": seq_len,
    }


# ----------------------------------------------------------------------------- ZeRO-3 memory


def zero3_memory(total_params: int, largest_layer_params: int, *, gpus_per_node: int, nodes: int) -> dict[str, Any]:
    """DeepSpeed's ZeRO-3 model-state estimate per GPU and per node's CPU, for each offload choice."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # silences DeepSpeed's accelerator warning
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    out: dict[str, Any] = {"gpus_per_node": gpus_per_node, "nodes": nodes, "note": "model states only; activations extra"}
    for name, (offload_optimizer, offload_params) in ZERO3_VARIANTS.items():
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            total_params,
            largest_layer_params,
            num_gpus_per_node=gpus_per_node,
            num_nodes=nodes,
            cpu_offload=offload_optimizer,
            cpu_offload_params=offload_params,
            zero_init=True,
        )
        out[name] = {"gpu_gib_per_gpu": round(gpu / GiB, 2), "cpu_gib_per_node": round(cpu / GiB, 2)}
    return out


# ----------------------------------------------------------------------------- recipes


def _as_recipe(recipe: Any):
    from .recipe import Recipe, load_recipe, recipe_from_dict

    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return recipe_from_dict(recipe)
    if isinstance(recipe, (str, Path)):
        return load_recipe(recipe)
    raise UsageError(f"inspect_recipe: expected a Recipe, a dict or a recipe name/path, got {type(recipe).__name__}")


def _module_stats(module: nn.Module) -> dict[str, Any]:
    counts = parameter_counts(module)
    return {"class": type(module).__name__, "params": counts, "params_human": human(counts["total"])}


def human(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return str(int(n))


def inspect_recipe(recipe: Any, *, gpus_per_node: int = 8, nodes: int = 1) -> dict[str, Any]:
    """Statistics of every component of ``recipe`` (a Recipe, dict, name or path), built on ``meta``.

    Returns JSON-ready ``{"recipe", "tokenizer", "codec", "prior", "reranker"}``;
    the prior also gets ``flops_per_token``, ``train`` (tokens and FLOPs of the
    whole run at ``gpus_per_node * nodes`` processes) and ``zero3_memory``.
    A component that cannot be built reports ``{"error": ...}`` instead.
    """
    from .plugins import registry

    if gpus_per_node < 1 or nodes < 1:
        raise UsageError(f"inspect: gpus_per_node ({gpus_per_node}) and nodes ({nodes}) must be >= 1")
    recipe = _as_recipe(recipe)
    report: dict[str, Any] = {"recipe": recipe.name}
    with torch.device("meta"):  # shapes only: nothing is allocated
        tokenizer = registry("tokenizer").build(recipe.tokenizer)
        report["tokenizer"] = {"class": type(tokenizer).__name__, "vocab_size": tokenizer.vocab_size, "text_len": tokenizer.text_len}
        codec = registry("codec").build(recipe.codec)
        report["codec"] = {
            **_module_stats(codec),
            "vocab_size": codec.vocab_size,
            "grid": list(codec.grid),
            "image_size": codec.image_size,
        }
        if recipe.prior is not None:
            runtime = {
                "text_vocab_size": tokenizer.vocab_size,
                "text_len": tokenizer.text_len,
                "image_vocab_size": codec.vocab_size,
                "grid": tuple(codec.grid),
            }
            prior = registry("prior").build(recipe.prior, **runtime)
            report["prior"] = _prior_stats(prior, runtime, recipe.prior.train, gpus_per_node=gpus_per_node, nodes=nodes)
        if recipe.reranker is not None:
            try:
                report["reranker"] = _module_stats(registry("reranker").build(recipe.reranker))
            except Exception as exc:  # optional part: its failure must not hide the rest
                report["reranker"] = {"error": f"cannot be built on the meta device: {type(exc).__name__}: {exc}"}
    return report


def _prior_stats(prior: nn.Module, runtime: dict, train, *, gpus_per_node: int, nodes: int) -> dict[str, Any]:
    stats = _module_stats(prior)
    counts = stats["params"]
    seq_len = runtime["text_len"] + runtime["grid"][0] * runtime["grid"][1]
    n_layers, d_attn = attention_shape(prior)
    flops = flops_per_token(counts["non_embedding"], n_layers=n_layers, seq_len=seq_len, d_attn=d_attn)
    tokens_per_step = train.batch_size * train.grad_accum * gpus_per_node * nodes * seq_len
    stats["flops_per_token"] = flops
    stats["train"] = {
        "steps": train.steps,
        "tokens_per_step": tokens_per_step,
        "tokens": tokens_per_step * train.steps,
        "flops": float(flops["train"]) * tokens_per_step * train.steps,
    }
    stats["zero3_memory"] = zero3_memory(counts["total"], counts["largest_layer"], gpus_per_node=gpus_per_node, nodes=nodes)
    return stats


__all__ = ["attention_shape", "flops_per_token", "human", "inspect_recipe", "parameter_counts", "zero3_memory"]
