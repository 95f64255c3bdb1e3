"""What both engines share: AdamW parameter groups, the LR schedule, moving a
batch to the device, and agreeing on non-finite losses."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from dalle_framework import NonFiniteError, TrainConfig, UsageError, distributed


PRECISION_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # train.precision -> the low-precision dtype


# ----------------------------------------------------------------------------- optimizer


def no_decay(module: nn.Module) -> set[int]:
    """Ids of the parameters that get no weight decay.

    Decay shrinks *matrices* (linear and conv weights). It is not applied to
      - 1-d parameters: biases, LayerNorm/RMSNorm gains, learned scalars;
      - ``nn.Embedding`` weights: a lookup table row only gets gradient when its
        token occurs, so decay would erase rare tokens (minGPT's rule);
      - what the component lists in ``no_weight_decay_parameters()`` (e.g. a
        positional embedding held as a bare ``nn.Parameter``).
    """
    skip: set[int] = set()
    for sub in module.modules():
        listed = getattr(sub, "no_weight_decay_parameters", None)
        if callable(listed):
            skip.update(id(p) for p in listed())
        for param in sub.parameters(recurse=False):
            if param.ndim < 2 or isinstance(sub, nn.Embedding):
                skip.add(id(param))
    return skip


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: matrices with ``weight_decay``, everything else without."""
    skip = no_decay(module)
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if id(p) not in skip]
    rest = [p for p in params if id(p) in skip]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def adamw(module: nn.Module, train: TrainConfig, *, fused: bool = False) -> torch.optim.AdamW:
    """torch AdamW over :func:`param_groups` with the stage's lr and betas.

    ``fused``: one kernel for the whole update (engines set it on CUDA; DeepSpeed's own
    FusedAdam would first JIT-build a CUDA extension). The CPU keeps the foreach update.
    """
    if not any(p.requires_grad for p in module.parameters()):
        raise UsageError(
            f"{type(module).__name__} has no trainable parameters, so there is nothing to train; "
            "give the stage pretrained `weights` and `frozen: true` instead"
        )
    return torch.optim.AdamW(
        param_groups(module, train.weight_decay), lr=train.lr, betas=tuple(train.betas), weight_decay=train.weight_decay,
        fused=fused or None,
    )


# ----------------------------------------------------------------------------- schedule


def _warmup(step: int, warmup: int) -> float:
    """Linear ramp: optimizer step ``s`` (0-based) runs at ``(s + 1) / warmup`` of the peak."""
    return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def cosine_factor(step: int, train) -> float:
    """Warmup, then half a cosine from 1 down to ``min_lr_ratio`` at ``train.steps``."""
    if step < train.warmup_steps:
        return _warmup(step, train.warmup_steps)
    span = max(1, train.steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    r = train.min_lr_ratio
    return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * progress))


def constant_factor(step: int, train) -> float:
    """Warmup, then the peak lr for good."""
    return _warmup(step, train.warmup_steps)


SCHEDULES = {"cosine": cosine_factor, "constant": constant_factor}


def lr_factor(train):
    """The ``LambdaLR`` multiplier of optimizer step ``s`` (0-based) for a stage's schedule.

    A closure, not a callable object: ``LambdaLR.state_dict`` stores only plain
    functions by reference (as None) and would pickle an object's attributes,
    which ``torch.load(weights_only=True)`` refuses. The state keeps the step count.
    """
    schedule = SCHEDULES[train.lr_schedule]

    def factor(step: int) -> float:
        return schedule(step, train)

    return factor


def lr_at(step: int, train) -> float:
    """Learning rate used by optimizer step ``step`` (0-based)."""
    return train.lr * lr_factor(train)(step)


def lambda_lr(optimizer: torch.optim.Optimizer, train) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(train))


# ----------------------------------------------------------------------------- batches and outputs


def to_device(batch: tuple, device: torch.device, float_dtype: torch.dtype | None = None) -> tuple:
    """Tensors moved to ``device`` (floating ones cast to ``float_dtype`` if given); other args pass through."""

    def move(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        if float_dtype is not None and x.is_floating_point():
            return x.to(device=device, dtype=float_dtype, non_blocking=True)
        return x.to(device=device, non_blocking=True)

    return tuple(move(x) for x in batch)


def as_floats(out: dict) -> dict[str, float]:
    """A loss dict with every scalar term as a Python float."""
    assert isinstance(out, dict) and "loss" in out, f"the module must return a dict with key 'loss', got {type(out)}"
    result = {}
    for key, value in out.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue  # only scalars are logged
            value = value.detach().float().item()
        if isinstance(value, (int, float, bool)):
            result[key] = float(value)
    return result


def check_loss(loss: torch.Tensor) -> None:
    """Raise :class:`NonFiniteError` on every rank when any rank's loss is NaN or infinite.

    Checked before backward, so nothing reached the gradients yet and the
    micro-batch can be skipped; the ranks agree so none waits in a collective.
    """
    value = float(loss.detach().float())
    bad = not math.isfinite(value)
    if distributed.any_rank(bad):
        raise NonFiniteError("the loss" if bad else "the loss on another rank", value if bad else math.nan, applied=False)


def fp16_on_cpu(device: torch.device, where: str) -> UsageError:
    return UsageError(
        f"{where}: precision fp16 needs a CUDA GPU (loss scaling of fp16 is not supported on {device.type}); "
        "use precision: bf16 or fp32 on the CPU"
    )
