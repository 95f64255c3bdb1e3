"""The plain PyTorch engine: one process, or DDP when launched with ``torchrun``.

Precision: ``fp32``; ``bf16`` autocast (CPU or GPU, weights and optimizer stay
fp32); ``fp16`` autocast with a ``GradScaler`` (GPU only).

Checkpoint layout (a directory): ``model.safetensors`` (the bare module) and
``state.pt`` (optimizer, scheduler, scaler, micro-step count and the caller's
client state), read back with ``torch.load(weights_only=True)`` so loading
never unpickles code. Client state must therefore hold tensors and plain
Python values (numbers, strings, lists, dicts, tuples).

A NaN/inf loss raises before backward (nothing applied); a NaN/inf gradient
norm drops the accumulated gradients before the optimizer step (fp16 leaves
that to its GradScaler, which skips such steps by design).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Optional

import torch
from safetensors.torch import save_model
from torch import nn

from dalle_framework import Engine, EngineRun, NonFiniteError, TrainConfig, UsageError, distributed, rundir

from . import common
from .params import TorchEngineParams



class TorchRun(EngineRun):
    """A module trained with torch AdamW, optionally inside DDP.

    Its checkpoint holds the one (replicated) optimizer state, so it resumes on any number of ranks.
    """

    resumes_on_other_world_sizes = True

    def __init__(self, module: nn.Module, train: TrainConfig, params: "TorchEngine.Params") -> None:
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
        self.autocast_dtype = common.PRECISION_DTYPES[train.precision]
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
        boundary = (self.micro + 1) % accum == 0
        lr = self.lr()
        # DDP all-reduces gradients on every backward unless told to wait for the last micro-batch.
        sync = contextlib.nullcontext() if boundary or self.model is self.module else self.model.no_sync()
        self.model.train()
        with sync:
            with self._autocast():
                out = self.model(*common.to_device(batch, self.device))
            common.check_loss(out["loss"])
            self.scaler.scale(out["loss"] / accum).backward()
        self.micro += 1
        if boundary:
            self.scaler.unscale_(self.optimizer)
            limit = self.train.grad_clip if self.train.grad_clip is not None else float("inf")
            norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), limit))
            if not (math.isfinite(norm) or self.scaler.is_enabled()):
                # DDP already averaged the gradients: every rank sees this norm and drops the step.
                self.optimizer.zero_grad(set_to_none=True)
                self.micro -= accum
                raise NonFiniteError("the gradient norm", norm, applied=False, step_discarded=True)
            self.last_grad_norm = norm
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
            with rundir.atomic_directory(directory, collective=False) as tmp:
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
        path = rundir.find_checkpoint(directory)
        if path is None or not (path / "state.pt").is_file():
            raise UsageError(f"{directory}: not a torch-engine checkpoint (no state.pt)")
        rundir.load_into(self.module, path / "model.safetensors")
        # On the CPU: optimizer.load_state_dict moves its state to the parameters; client state stays on CPU.
        state = rundir.load_torch(path / "state.pt")
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            self.micro = int(state["micro"])
            self.last_grad_norm = float(state["last_grad_norm"])
            client = state["client_state"]
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise UsageError(f"{path / 'state.pt'}: does not hold this run's optimizer state ({type(exc).__name__}: {exc})") from None
        self.barrier()
        return client

    def full_state_dict(self, *, rank: Optional[int] = None) -> dict[str, torch.Tensor]:
        """Every rank holds the whole model (DDP replicas); copied only on ``rank`` when given."""
        if rank is not None and rank != self.rank:
            return {}
        return {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).clone()
                for k, v in self.module.state_dict().items()}


class TorchEngine(Engine):
    """Plain PyTorch: AdamW + LambdaLR; DDP when ``WORLD_SIZE`` > 1 (``torchrun``)."""

    Params = TorchEngineParams

    def __init__(self, params: Optional[Params] = None) -> None:
        self.params = params or self.Params()

    def prepare(self, module: nn.Module, train: TrainConfig) -> TorchRun:
        return TorchRun(module, train, self.params)

    def memory_estimate(self, *, total_params: int, largest_layer_params: int, gpus_per_node: int, nodes: int) -> dict[str, Any]:
        """Every process holds fp32 weights, gradients and both AdamW moments: 16 bytes per parameter."""
        return {
            "engine": "torch",
            "gpus_per_node": gpus_per_node,
            "nodes": nodes,
            "gpu": {"gpu_gib_per_gpu": round(16 * total_params / 2**30, 2), "cpu_gib_per_node": 0.0},
            "note": "model states only (fp32 weights, gradients, AdamW moments on every process); activations extra",
        }

    def model_context(self, train: TrainConfig):
        """Nothing to do while the module is built (see the deepspeed engine's ZeRO-3 use)."""
        return contextlib.nullcontext()
