"""Built-in training engines: ``torch`` (single process / DDP) and ``deepspeed`` (ZeRO 0-3).

DeepSpeed is imported only when a deepspeed engine is prepared, so listing
plugins stays fast.
"""

from dalle_framework import hookimpl

from .deepspeed_engine import DeepSpeedEngine, DeepSpeedRun
from .torch_engine import TorchEngine, TorchRun


@hookimpl
def dalle_register_engines(registry):
    registry.register(TorchEngine, name="torch")
    registry.register(DeepSpeedEngine, name="deepspeed")


__all__ = ["DeepSpeedEngine", "DeepSpeedRun", "TorchEngine", "TorchRun"]
