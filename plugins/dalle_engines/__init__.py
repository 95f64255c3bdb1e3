"""Built-in training engines: ``torch`` (single process / DDP) and ``deepspeed`` (ZeRO 0-3).

DeepSpeed is imported only when a deepspeed engine is prepared, so listing
plugins stays fast. Registered by where they live, with their params: listing
plugins and checking recipes import no torch.
"""

from dalle_framework import hookimpl, lazy_attributes

from .params import DeepSpeedEngineParams, TorchEngineParams


@hookimpl
def dalle_register_engines(registry):
    registry.register("dalle_engines.torch_engine:TorchEngine", name="torch", params=TorchEngineParams)
    registry.register("dalle_engines.deepspeed_engine:DeepSpeedEngine", name="deepspeed", params=DeepSpeedEngineParams)


__getattr__ = lazy_attributes(
    __name__,
    {
        "DeepSpeedEngine": ".deepspeed_engine",
        "DeepSpeedRun": ".deepspeed_engine",
        "TorchEngine": ".torch_engine",
        "TorchRun": ".torch_engine",
    },
)
__all__ = ["DeepSpeedEngine", "DeepSpeedRun", "TorchEngine", "TorchRun", "DeepSpeedEngineParams", "TorchEngineParams"]
