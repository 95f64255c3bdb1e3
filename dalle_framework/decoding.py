"""Running one fixed-shape decode step many times: eagerly, compiled, or replayed from a CUDA graph.

Sampling an image is ``h*w`` steps of the same small computation. On a GPU each eager
step is dozens of kernel launches of a few microseconds of work each, so the host's
launch overhead, not the GPU, sets the speed. A step whose shapes and tensor addresses
never change can be recorded once as a CUDA graph and replayed with one launch, or
compiled by ``torch.compile`` into fewer, fused kernels (or both).

A step here is a function of no arguments that reads its inputs from state tensors and
updates them in place (KV caches, the current token, its position as a 0-d device
tensor). It must be device work only: no ``.item()``, no ``.cpu()``, no new shapes.
Re-running a step that failed before its last statement must be harmless (a KV-cache
write at the same position is), so a failed capture or compile falls back to eager.
"""

from __future__ import annotations

import warnings
from typing import Callable, Literal, Optional

import torch
from torch import Tensor

from .interfaces import Sampling

Mode = Literal["eager", "graph", "compile"]
Step = Callable[[], Optional[Tensor]]


def resolve_decode(sampling: Sampling, device: torch.device) -> Mode:
    """``Sampling.decode`` with ``auto`` resolved: a CUDA graph on CUDA, eager elsewhere.
    ``graph`` asked for off CUDA runs eagerly (there is nothing to capture)."""
    mode = sampling.decode
    if mode == "auto":
        return "graph" if device.type == "cuda" else "eager"
    if mode == "graph" and device.type != "cuda":
        return "eager"
    return mode


class StepRunner:
    """Calls ``step()`` repeatedly in one of three modes; ``runner()`` returns what ``step`` returns.

    - ``eager``: plain calls.
    - ``compile``: ``torch.compile(step)``; on CUDA the compiled step is then captured
      as in ``graph`` mode (inductor's own CUDA graphs skip steps that mutate their inputs).
    - ``graph`` (CUDA): the first ``warmup`` calls run eagerly on a side stream (library
      handles and workspaces get allocated), the next one is captured into a
      ``torch.cuda.CUDAGraph`` and every call from then on replays it. The returned
      tensor is then the graph's static output: valid until the next call.

    ``used`` says what actually ran (``graph``, ``compile``, ``compile+graph`` or
    ``eager``); ``fallback`` holds the error that made it fall back to eager, if any.
    """

    def __init__(self, step: Step, mode: Mode, device: torch.device, *, warmup: int = 2) -> None:
        self.step, self.mode, self.device, self.warmup = step, mode, device, warmup
        self.calls = 0
        self.fallback: Optional[str] = None
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.output: Optional[Tensor] = None
        self.fn: Step = step
        self.capture = device.type == "cuda" and mode in ("graph", "compile")
        if mode == "compile":
            self.fn = torch.compile(step, dynamic=False)
            self.used = "compile+graph" if self.capture else "compile"
        else:
            self.used = "graph" if self.capture else "eager"

    def _fall_back(self, exc: BaseException) -> Optional[Tensor]:
        self.fallback = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"decode step: {self.used} failed, running eagerly ({self.fallback})", stacklevel=3)
        self.fn, self.graph, self.capture, self.used = self.step, None, False, "eager"
        return self.step()

    def __call__(self) -> Optional[Tensor]:
        self.calls += 1
        if self.graph is not None:
            self.graph.replay()
            return self.output
        try:
            if not self.capture:
                return self.fn()
            if self.calls <= self.warmup:
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    out = self.fn()
                torch.cuda.current_stream(self.device).wait_stream(side)
                return out
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.output = self.fn()
            self.graph = graph
            graph.replay()  # capturing records the kernels without running them
            return self.output
        except Exception as exc:  # compile or capture failed: the step itself still works eagerly
            if self.fn is self.step and not self.capture:
                raise
            return self._fall_back(exc)


__all__ = ["Mode", "StepRunner", "resolve_decode"]
