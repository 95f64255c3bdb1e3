"""Exponential moving average of a module's weights, used for evaluation and export."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """Shadow copy of ``module.state_dict()``: parameters are averaged, buffers copied.

    Buffers are copied, not averaged: they are running statistics that are
    already averages (a VQ codebook's EMA) or discrete state (restarted codes).

    The decay ramps up as ``min(decay, (1 + n) / (10 + n))`` so the average is not
    anchored to the random initialisation during the first hundred updates.
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.averaged = {name for name, _ in module.named_parameters()}
        self.shadow = {k: v.detach().clone().float() if k in self.averaged else v.detach().clone() for k, v in module.state_dict().items()}
        empty = [k for k, v in self.shadow.items() if v.numel() == 0 and k]
        if empty:
            raise ValueError(f"EMA needs full weights on every rank; {empty[0]!r} is sharded (ZeRO-3?)")

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for key, value in module.state_dict().items():
            shadow = self.shadow[key]
            if key in self.averaged:
                shadow.lerp_(value.detach().to(shadow.device, shadow.dtype), 1 - decay)
            else:
                shadow.copy_(value)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        for key, value in state["shadow"].items():
            self.shadow[key].copy_(value)

    def weights(self, like: nn.Module) -> dict[str, torch.Tensor]:
        """Shadow weights cast back to the dtypes of ``like``'s state dict."""
        return {k: self.shadow[k].to(v.dtype) for k, v in like.state_dict().items()}
