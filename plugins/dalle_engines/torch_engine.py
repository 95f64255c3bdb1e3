"""The plain PyTorch engine: one process, or DDP when launched with ``torchrun``.

Precision: ``fp32``; ``bf16`` autocast (CPU or GPU, weights and optimizer stay
fp32); ``fp16`` autocast with a ``GradScaler`` (GPU only).

Checkpoint layout (a directory): ``model.safetensors`` (the bare module) and
``state.pt`` (optimizer, scheduler, scaler, micro-step count and the caller's
client state), read back with ``torch.load(weights_only=True)`` so loading
never unpickles code. Client state must therefore hold tensors and plain
Python values (numbers, strings, lists, dicts, tuples).
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
from pydantic import Field
from safetensors.torch import load_model, save_model
from torch import nn

import dalle_framework
from dalle_framework import Engine, EngineRun, UsageError, distributed

from . import common

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TorchRun(EngineRun):
    """A module trained with torch AdamW, optionally inside DDP."""

    def __init__(self, module: nn.Module, train, params: "TorchEngine.Params") -> None:
        self.rank, self.world_size, _ = distributed.init_distributed()
        self.device = torch.device(params.device) if params.device != "auto" else distributed.default_device()
        if train.precision == "fp16" and self.device.type != "cuda":
            raise common.fp16_on_cpu(self.device, "train.precision")
        self.train = train
        self.module = module.to(self.device)
        self.model: nn.Module = self.module
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(
                self.module, device_ids=ids, find_unused_parameters=params.find_unused_parameters
            )
        self.optimizer = common.adamw(self.module, train, fused=self.device.type == "cuda")
        self.scheduler = common.lambda_lr(self.optimizer, train)
        self.autocast_dtype = AUTOCAST_DTYPES[train.precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=train.precision == "fp16")
        self.micro = 0  # micro-batches seen; the optimizer steps every grad_accum of them
        self.last_grad_norm = 0.0

    # ------------------------------------------------------------------ training

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def step(self, *batch: Any) -> dict[str, float]:
        """One micro-batch: forward, backward; every ``grad_accum`` calls also clip and step.

        Returns the module's loss terms as floats plus ``lr`` (of this step),
        ``grad_norm`` (total norm before clipping, at the latest optimizer step)
        and ``optimizer_step`` (1 when this call stepped, else 0).
        """
        accum = self.train.grad_accum
        self.micro += 1
        boundary = self.micro % accum == 0
        lr = self.lr()
        # DDP all-reduces gradients on every backward unless told to wait for the last micro-batch.
        sync = contextlib.nullcontext() if boundary or self.model is self.module else self.model.no_sync()
        self.model.train()
        with sync:
            with self._autocast():
                out = self.model(*common.to_device(batch, self.device))
            self.scaler.scale(out["loss"] / accum).backward()
        if boundary:
            self.scaler.unscale_(self.optimizer)
            limit = self.train.grad_clip if self.train.grad_clip is not None else float("inf")
            norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), limit)
            self.last_grad_norm = float(norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
        return {**common.as_floats(out), "lr": lr, "grad_norm": self.last_grad_norm, "optimizer_step": float(boundary)}

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------ checkpoints

    def save(self, directory: str, client_state: dict) -> None:
        """Rank 0 writes (DDP replicas are identical); every rank must call."""
        if self.rank == 0:
            with common.atomic_directory(directory, collective=False) as tmp:
                save_model(self.module, str(tmp / "model.safetensors"))
                state = {
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict(),
                    "micro": self.micro,
                    "last_grad_norm": self.last_grad_norm,
                    "client_state": client_state,
                }
                torch.save(state, tmp / "state.pt")
        self.barrier()

    def load(self, directory: str) -> dict:
        path = common.checkpoint_path(directory)
        if not (path / "state.pt").is_file():
            raise UsageError(f"{directory}: not a torch-engine checkpoint (no state.pt)")
        missing, unexpected = load_model(self.module, str(path / "model.safetensors"), strict=True, device=str(self.device))
        # On the CPU: optimizer.load_state_dict moves its state to the parameters; client state stays on CPU.
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.micro = int(state["micro"])
        self.last_grad_norm = float(state["last_grad_norm"])
        self.barrier()
        return state["client_state"]

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).clone()
                for k, v in self.module.state_dict().items()}


class TorchEngine(Engine):
    """Plain PyTorch: AdamW + LambdaLR; DDP when ``WORLD_SIZE`` > 1 (``torchrun``)."""

    class Params(dalle_framework.Params):
        device: str = Field("auto", description="auto = cuda:LOCAL_RANK when CUDA is available, else cpu")
        find_unused_parameters: bool = Field(
            False, description="DDP: set when some parameters get no gradient in a step (costs a graph walk)"
        )

    def __init__(self, params: Optional[Params] = None) -> None:
        self.params = params or self.Params()

    def prepare(self, module: nn.Module, train) -> TorchRun:
        return TorchRun(module, train, self.params)

    def model_context(self, train):
        """Nothing to do while the module is built (see the deepspeed engine's ZeRO-3 use)."""
        return contextlib.nullcontext()
