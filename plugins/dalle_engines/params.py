"""The engines' settings, importable without torch or DeepSpeed: recipes are checked with them alone."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, field_validator, model_validator

from dalle_framework import Params


NVME_SUBDIR = "dalle-zero-swap"  # ZeRO-Infinity's swap files go in a directory of this name inside nvme_path
# Sections of a DeepSpeed config a recipe may set: numerics and memory only. Monitors
# (tensorboard, wandb, csv), profilers, autotuning, elasticity and checkpoint
# engines write files where a stranger's recipe says or start other work.
CONFIG_SECTIONS = {
    "zero_optimization", "bf16", "fp16", "gradient_clipping", "gradient_accumulation_steps",
    "train_micro_batch_size_per_gpu", "train_batch_size", "communication_data_type", "prescale_gradients",
    "gradient_predivide_factor", "sparse_gradients", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
    "activation_checkpointing", "aio", "data_types", "memory_breakdown", "wall_clock_breakdown", "steps_per_print",
    "torch_autocast", "seq_parallel_communication_data_type",
}


def _has_key(tree: Any, key: str) -> bool:
    if isinstance(tree, dict):
        return key in tree or any(_has_key(v, key) for v in tree.values())
    return isinstance(tree, list) and any(_has_key(v, key) for v in tree)


class TorchEngineParams(Params):
    device: str = Field("auto", description="auto = cuda:LOCAL_RANK when CUDA is available, else cpu")
    find_unused_parameters: bool = Field(
        False, description="DDP: set when some parameters get no gradient in a step (costs a graph walk)"
    )


class DeepSpeedEngineParams(Params):
    zero_stage: int = Field(2, ge=0, le=3, description="0 = DDP-like, 1 = shard optimizer, 2 = + gradients, 3 = + weights")
    offload_optimizer: Literal["none", "cpu", "nvme"] = Field(
        "none", description="keep optimizer states off the GPU (ZeRO-Offload; stage >= 1)"
    )
    offload_param: Literal["none", "cpu", "nvme"] = Field(
        "none", description="keep weights off the GPU between uses (ZeRO-Infinity; stage 3 only)"
    )
    nvme_path: Optional[str] = Field(
        None, max_length=4096,
        description=f"an existing local NVMe directory for nvme offload; the swap files go in a fresh {NVME_SUBDIR}/ inside it",
    )
    micro_batch_size: Optional[int] = Field(
        None, ge=1, description="train_micro_batch_size_per_gpu; default: the stage's train.batch_size"
    )
    scheduler: Literal["torch", "deepspeed"] = Field(
        "torch", description="torch = the project's LambdaLR (same as the torch engine); deepspeed = WarmupCosineLR/WarmupLR"
    )
    config: dict[str, Any] = Field(
        default_factory=dict, description="raw DeepSpeed config merged last (power users; wins over everything)"
    )

    @field_validator("config")
    @classmethod
    def _safe_sections(cls, config: dict[str, Any]) -> dict[str, Any]:
        if _has_key(config, "nvme_path"):
            raise ValueError("config: nvme_path is the engine's own param (nvme_path:), which keeps the swap files "
                             f"in a {NVME_SUBDIR}/ directory of their own; drop it from config")
        refused = sorted(k for k in config if k not in CONFIG_SECTIONS)
        if refused:
            raise ValueError(
                f"config: {', '.join(refused)} not allowed in a recipe (only {', '.join(sorted(CONFIG_SECTIONS))}): "
                "other sections make DeepSpeed write files elsewhere, profile, launch jobs or reach the network; "
                "the framework does the logging and checkpoints"
            )
        return config

    @model_validator(mode="after")
    def _consistent(self):
        if self.offload_param != "none" and self.zero_stage != 3:
            raise ValueError("offload_param needs zero_stage: 3 (only stage 3 partitions the weights)")
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage >= 1")
        if "nvme" in (self.offload_optimizer, self.offload_param) and not self.nvme_path:
            raise ValueError("nvme offload needs nvme_path (a directory on a local NVMe drive)")
        return self
