"""The DeepSpeed engine: ZeRO stages 0-3, bf16/fp16, optional CPU/NVMe offload.

The DeepSpeed config is built from the stage's ``TrainConfig`` and this
engine's ``Params``; ``Params.config`` (a raw DeepSpeed config dict) is merged
last so power users can set anything DeepSpeed knows. The optimizer is always
torch's AdamW with the project's parameter groups (no decay on biases, norms
and embeddings); the schedule is a torch ``LambdaLR`` (identical to the torch
engine's) unless ``scheduler: deepspeed`` asks for DeepSpeed's own
``WarmupCosineLR`` / ``WarmupLR``.

Checkpoints are DeepSpeed's own (``save_checkpoint`` / ``load_checkpoint``
with tag ``state``), written by all ranks into a temporary directory that rank
0 renames into place; a shared file system is assumed, as DeepSpeed does.
DeepSpeed's own checkpoint engine unpickles whatever its files hold; this
engine swaps in a loader that reads them weights-only, allowing just the
three DeepSpeed classes its checkpoints contain (:data:`CHECKPOINT_CLASSES`).

A NaN/inf loss raises before backward (nothing applied). A NaN/inf gradient
norm is only seen after DeepSpeed's step has used it (bf16/fp32), so it stops
the run; fp16 keeps DeepSpeed's own overflow skipping.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from dalle_framework import Engine, EngineRun, NonFiniteError, TrainConfig, UsageError, deep_merge, distributed, rundir

from . import common
from .params import NVME_SUBDIR, DeepSpeedEngineParams

TAG = "state"  # one checkpoint per directory; the training loop names the directories
PRECISION_CONFIG = {
    "fp32": {},
    "bf16": {"bf16": {"enabled": True}},
    "fp16": {"fp16": {"enabled": True, "initial_scale_power": 16, "loss_scale_window": 1000}},
}


def import_deepspeed():
    """Import DeepSpeed quietly and ready for this machine.

    - ``DS_ACCELERATOR=cpu`` when there is no CUDA silences the accelerator
      detection warning.
    - On the CPU, DeepSpeed's communication backend JIT-compiles the
      ``deepspeed_shm_comm`` C++ op with g++ the first time in every fresh
      environment (~55 s, and it fails without a compiler). It only speeds up
      collectives between processes of one node; plain gloo works, so
      ``build_shm_op`` is replaced by a function returning None (DeepSpeed's
      own "op not available" answer).
    - DeepSpeed's INFO logging is turned down to warnings, and torch's
      per-step deprecation warnings about DeepSpeed's collectives are hidden.
    """
    cpu = not torch.cuda.is_available()
    if cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.utils import logger

    # Not ``import deepspeed.comm.torch as m``: ``deepspeed.comm`` has an attribute
    # ``torch`` (the torch package) that such an import would bind instead.
    ds_comm_torch = importlib.import_module("deepspeed.comm.torch")

    logger.setLevel(logging.WARNING)
    # DeepSpeed still calls collectives torch 2.14 renamed; the warning repeats every step.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    if cpu:
        ds_comm_torch.build_shm_op = lambda: None
    return deepspeed


def checkpoint_classes() -> tuple[type, ...]:
    """The non-tensor classes DeepSpeed 0.19 stores in its checkpoints (found by reading
    checkpoints of ZeRO 0-3 in fp32 and bf16; fp16 adds the dynamic loss scaler)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address)


class WeightsOnlyLoads:
    """DeepSpeed's checkpoint engine with ``load`` reading weights-only (everything else delegated)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def load(self, path: str, map_location: Any = None) -> Any:
        return rundir.load_torch(path, allowed=checkpoint_classes(), map_location=map_location)


class DeepSpeedRun(EngineRun):
    """A module inside ``deepspeed.initialize``; ``module`` is the bare model."""

    def __init__(self, module: nn.Module, train: TrainConfig, params: "DeepSpeedEngine.Params") -> None:
        deepspeed = import_deepspeed()
        self.device = distributed.default_device()
        if train.precision == "fp16" and self.device.type != "cuda":
            raise common.fp16_on_cpu(self.device, "train.precision (deepspeed engine)")
        self.rank, self.world_size, _ = distributed.init_distributed(always=True)
        deepspeed.init_distributed(dist_backend=distributed.default_backend())
        self.train = train
        self.params = params
        self.config = build_config(train, params)
        optimizer = common.adamw(module, train, fused=self.device.type == "cuda")  # DeepSpeed moves the module there
        scheduler = SCHEDULERS[params.scheduler](train)
        self.engine, _, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=self.config
        )
        self.engine.checkpoint_engine = WeightsOnlyLoads(self.engine.checkpoint_engine)
        self.module = self.engine.module
        self.device = self.engine.device
        self.stage = self.engine.zero_optimization_stage()
        self.sharded_forward = self.stage == 3  # each forward gathers the weights from every rank
        self.float_dtype = common.PRECISION_DTYPES[train.precision]  # inputs follow the (cast) weights
        self.last_grad_norm = 0.0

    # ------------------------------------------------------------------ training

    def step(self, *batch: Any) -> dict[str, float]:
        """One micro-batch; DeepSpeed scales the loss by 1/grad_accum and steps at the boundary.

        Returns the loss terms as floats plus ``lr`` (of this step),
        ``grad_norm`` (at the latest optimizer step) and ``optimizer_step`` (0/1).
        """
        self.engine.train()
        lr = self.lr()
        boundary = self.engine.is_gradient_accumulation_boundary()
        out = self.engine(*common.to_device(batch, self.device, self.float_dtype))
        common.check_loss(out["loss"])  # before backward: DeepSpeed's counters have not moved
        self.engine.backward(out["loss"])
        self.engine.step()
        if boundary:
            norm = self.engine.get_global_grad_norm()
            self.last_grad_norm = float(norm) if norm is not None else float("nan")  # None: clipping off, not measured
            if norm is not None and not math.isfinite(self.last_grad_norm) and self.train.precision != "fp16":
                raise NonFiniteError("the gradient norm", self.last_grad_norm, applied=True)
        return {**common.as_floats(out), "lr": lr, "grad_norm": self.last_grad_norm, "optimizer_step": float(boundary)}

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    # ------------------------------------------------------------------ checkpoints

    def save(self, directory: str, client_state: dict) -> None:
        """All ranks write their shards with DeepSpeed's ``save_checkpoint``."""
        client = {"client_state": client_state, "last_grad_norm": self.last_grad_norm}
        with rundir.atomic_directory(directory, collective=True) as tmp:
            self.engine.save_checkpoint(str(tmp), tag=TAG, client_state=client)

    def load(self, directory: str) -> dict:
        where = rundir.find_checkpoint(directory)
        if where is None or not (where / TAG).is_dir():
            raise UsageError(f"{directory}: not a deepspeed-engine checkpoint (no {TAG}/ directory)")
        try:
            path, client = self.engine.load_checkpoint(str(where), tag=TAG)
        except UsageError:
            raise
        except (RuntimeError, KeyError, ValueError, TypeError, AssertionError, OSError) as exc:
            raise UsageError(f"{where}: DeepSpeed could not load this checkpoint ({type(exc).__name__}: {str(exc)[:300]})") from None
        if path is None or not isinstance(client, dict):
            raise UsageError(f"{directory}: DeepSpeed could not load this checkpoint")
        self.last_grad_norm = float(client.get("last_grad_norm", 0.0))
        return client.get("client_state", {})

    def full_state_dict(self, *, rank: Optional[int] = None) -> dict[str, torch.Tensor]:
        """Full fp32 weights on CPU, keyed like ``module.state_dict()``; on ``rank`` only when given.

        Collective at ZeRO-1/2/3 and with bf16/fp16: all ranks call it. Gathered one
        parameter at a time, so a rank that does not keep them holds one parameter more
        at most. A trainable parameter comes from the fp32 master copy held by the
        optimizer (``safe_get_full_fp32_param`` gathers its shards); one without such a
        copy (fp32 at stage 0, a frozen one) is read from the module, gathered first under
        ZeRO-3. Buffers are never partitioned. A tied weight appears under each of its
        state-dict names.
        """
        from deepspeed.utils import safe_get_full_fp32_param

        keep = rank is None or rank == self.rank
        full: dict[int, torch.Tensor] = {}
        for param in self.module.parameters():  # each tensor once, in a fixed order on every rank
            value = safe_get_full_fp32_param(param) if param.requires_grad else None
            value = value if value is not None else self._gathered(param)
            if keep:
                full[id(param)] = value.detach().to("cpu", torch.float32).clone()
            del value
        if not keep:
            return {}
        state = {}
        for key, tensor in self.module.state_dict(keep_vars=True).items():
            if id(tensor) in full:
                state[key] = full[id(tensor)]
            else:  # a buffer
                dtype = torch.float32 if tensor.is_floating_point() else tensor.dtype
                state[key] = tensor.detach().to("cpu", dtype).clone()
        return state

    def evaluating(self):
        """Held-out passes through the engine's own (bf16 / fp16) weights: autocast lets fp32 inputs meet them."""
        dtype = self.float_dtype
        return torch.autocast(device_type=self.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def _gathered(self, param: nn.Parameter) -> torch.Tensor:
        if self.stage < 3:
            return param.data
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            return param.data.clone()


def build_config(train, params: "DeepSpeedEngine.Params") -> dict:
    """The DeepSpeed config dict for a stage (``params.config`` merged last)."""
    zero: dict[str, Any] = {"stage": params.zero_stage}
    if params.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": params.offload_optimizer, **_nvme(params, params.offload_optimizer)}
    if params.offload_param != "none":
        zero["offload_param"] = {"device": params.offload_param, **_nvme(params, params.offload_param)}
    config = {
        "train_micro_batch_size_per_gpu": params.micro_batch_size or train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.grad_clip or 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # a torch AdamW is passed in
        # Offload normally insists on DeepSpeedCPUAdam (a C++ build); torch AdamW works too.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # the training loop does the logging
        "wall_clock_breakdown": False,
        **PRECISION_CONFIG[train.precision],
    }
    if params.scheduler == "deepspeed":
        config["scheduler"] = DS_SCHEDULERS[train.lr_schedule](train)
    return deep_merge(config, params.config)  # the recipe's merge: the raw config wins, section by section


def _nvme(params, device: str) -> dict:
    """ZeRO-Infinity's swap files, confined to a directory of their own inside ``nvme_path`` (they can
    never replace a file elsewhere); the path must be an existing directory."""
    if device != "nvme":
        return {}
    root = Path(params.nvme_path).expanduser()
    if not root.is_absolute() or not root.is_dir():
        raise UsageError(f"<stage>.train.engine.params.nvme_path: {params.nvme_path!r} is not an existing directory given by its "
                         "absolute path; point it at a directory on a local NVMe drive")
    return {"nvme_path": str(rundir.make_dirs(root / NVME_SUBDIR))}


def _torch_scheduler(train):
    # A callable: DeepSpeed builds it on the optimizer it actually steps (after wrapping).
    return lambda optimizer: common.lambda_lr(optimizer, train)


SCHEDULERS = {"torch": _torch_scheduler, "deepspeed": lambda train: None}
DS_SCHEDULERS = {
    "cosine": lambda t: {
        "type": "WarmupCosineLR",
        "params": {
            "total_num_steps": max(1, t.steps),
            "warmup_num_steps": max(1, t.warmup_steps),
            "warmup_type": "linear",
            "cos_min_ratio": t.min_lr_ratio,
        },
    },
    "constant": lambda t: {
        "type": "WarmupLR",
        "params": {"warmup_min_lr": 0.0, "warmup_max_lr": t.lr, "warmup_num_steps": max(1, t.warmup_steps), "warmup_type": "linear"},
    },
}


GiB = 2**30
# name -> (offload optimizer states to CPU, offload weights to CPU)
ZERO3_VARIANTS = {"gpu": (False, False), "offload_optimizer": (True, False), "offload_optimizer_and_params": (True, True)}


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO (stage 0-3), launched with ``deepspeed`` or ``torchrun`` (or one process)."""

    Params = DeepSpeedEngineParams

    def __init__(self, params: Optional[Params] = None) -> None:
        self.params = params or self.Params()

    def prepare(self, module: nn.Module, train: TrainConfig) -> DeepSpeedRun:
        return DeepSpeedRun(module, train, self.params)

    def memory_estimate(self, *, total_params: int, largest_layer_params: int, gpus_per_node: int, nodes: int) -> dict[str, Any]:
        """DeepSpeed's own estimate of model-state memory (weights, gradients, Adam states; not activations).

        ZeRO-3: per GPU and per node's CPU, for each offload choice; ZeRO-1/2:
        DeepSpeed's stage-2 estimator (stage 1 keeps full gradients: a little more);
        stage 0: every GPU holds everything (16 bytes per parameter with Adam).
        """
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # silences DeepSpeed's accelerator warning
        out: dict[str, Any] = {"engine": "deepspeed", "zero_stage": self.params.zero_stage, "gpus_per_node": gpus_per_node,
                               "nodes": nodes, "note": "model states only; activations extra"}
        if self.params.zero_stage == 3:
            from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

            for name, (offload_optimizer, offload_params) in ZERO3_VARIANTS.items():
                cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
                    total_params, largest_layer_params, num_gpus_per_node=gpus_per_node, num_nodes=nodes,
                    cpu_offload=offload_optimizer, cpu_offload_params=offload_params, zero_init=True,
                )
                out[name] = {"gpu_gib_per_gpu": round(gpu / GiB, 2), "cpu_gib_per_node": round(cpu / GiB, 2)}
        elif self.params.zero_stage in (1, 2):
            from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

            for name, offload in (("gpu", False), ("offload_optimizer", True)):
                cpu, gpu = estimate_zero2_model_states_mem_needs(total_params, num_gpus_per_node=gpus_per_node, num_nodes=nodes, cpu_offload=offload)
                out[name] = {"gpu_gib_per_gpu": round(gpu / GiB, 2), "cpu_gib_per_node": round(cpu / GiB, 2)}
        else:
            out["gpu"] = {"gpu_gib_per_gpu": round(16 * total_params / GiB, 2), "cpu_gib_per_node": 0.0}
        return out

    def model_context(self, train: TrainConfig):
        """Build the module inside this to shard it while it is created (ZeRO-3 only).

        ``with engine.model_context(train): module = build()`` makes each rank
        hold only its partition from the start (``deepspeed.zero.Init``), so a
        model larger than one GPU or host can be built; other stages need nothing.
        """
        if self.params.zero_stage != 3:
            return contextlib.nullcontext()
        deepspeed = import_deepspeed()
        distributed.init_distributed(always=True)
        deepspeed.init_distributed(dist_backend=distributed.default_backend())
        return deepspeed.zero.Init(config_dict_or_path=build_config(train, self.params))
