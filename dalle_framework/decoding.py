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

:func:`sample_image_tokens` is the framework's KV-cached sampler, shared by every prior
that implements :class:`CachedImageModel` (decoder-only ones and encoder-decoders alike):
it batches classifier-free guidance, keeps primed tokens, prefills once and then runs one
fixed-shape step per image token through a :class:`StepRunner`, drawing with
:class:`~dalle_framework.sampling.TokenDrawer`.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Literal, Optional, Protocol

import torch
from torch import Tensor

from .attention import Position, positions
from .interfaces import PAD_ID, Sampling, StepCallback
from .sampling import TokenDrawer, split_guidance

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


# ----------------------------------------------------------------------------- key/value caches


class KVCache:
    """Keys and values of one attention layer for ``rows`` sequences, preallocated to ``max_len``.

    Storage is allocated on the first write with that write's dtype, so sampling under
    autocast (bf16 keys) works as well as in fp32.
    """

    def __init__(self, rows: int, heads: int, max_len: int, head_dim: int) -> None:
        self.shape = (rows, heads, max_len, head_dim)
        self.k: Optional[Tensor] = None
        self.v: Optional[Tensor] = None

    def update(self, k: Tensor, v: Tensor, start: Position) -> tuple[Tensor, Tensor]:
        """Write ``k/v [B, H, n, D]`` at ``start``; return the whole buffers ``[B, H, max_len, D]``.

        Every step sees all ``max_len`` slots (masks hide the unwritten ones) so attention
        shapes never change while decoding: on GPU a new key length per step would rebuild
        SDPA's cuDNN graph (tens of ms) at every token, and a CUDA graph needs fixed shapes.
        A device-tensor ``start`` writes by index, without reading the position on the host.
        """
        if self.k is None:
            self.k = k.new_zeros(self.shape)
            self.v = v.new_zeros(self.shape)
        if isinstance(start, int):
            end = start + k.shape[-2]
            self.k[:, :, start:end] = k
            self.v[:, :, start:end] = v
        else:
            idx = positions(start, k.shape[-2], k.device)
            self.k.index_copy_(2, idx, k)
            self.v.index_copy_(2, idx, v)
        return self.k, self.v


# ----------------------------------------------------------------------------- the sampler


class CachedImageModel(Protocol):
    """What a prior implements to sample with :func:`sample_image_tokens`.

    ``text`` is ``[rows, T]`` (caption ids, ``PAD_ID``-padded), ``image`` ``[rows, n]`` the
    image tokens known so far (``n`` may be 0). Every method returns float logits
    ``[rows, image_vocab]`` for image position ``n`` (or ``index + 1``).

    - ``unconditional_text(text)``: the captions of guidance's unconditional branch;
    - ``next_logits(text, image)``: an uncached forward pass (the reference the cache must match);
    - ``prefill(text, image) -> (logits, state)``: the same, filling caches held in ``state``;
    - ``decode_step(state, token[rows], index)``: feed image token ``index`` (a 0-d device
      tensor); fixed shapes, device work only, so it can be compiled or captured.
    """

    training: bool

    def unconditional_text(self, text: Tensor) -> Tensor: ...

    def next_logits(self, text: Tensor, image: Tensor) -> Tensor: ...

    def prefill(self, text: Tensor, image: Tensor) -> tuple[Tensor, Any]: ...

    def decode_step(self, state: Any, token: Tensor, index: Tensor) -> Tensor: ...


def all_padding(text: Tensor) -> Tensor:
    """Guidance's default unconditional caption: every position padding."""
    return torch.full_like(text, PAD_ID)


@torch.no_grad()
def sample_image_tokens(
    model: Any,
    text: Tensor,
    sampling: Sampling,
    *,
    image_len: int,
    prime: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    on_step: Optional[StepCallback] = None,
) -> Tensor:
    """Draw ``image_len`` image tokens per caption: ``text[B, T]`` -> ``LongTensor[B, image_len]``.

    ``prime[B, n]`` is kept as the first ``n`` tokens. Guidance runs the conditional and
    unconditional captions as one ``2B`` batch sharing the drawn tokens. ``use_cache=False``
    recomputes the whole prefix at every step. The model runs in eval mode (restored after)
    and ``model.last_decode`` records how the steps ran (draws, decode mode, any fallback).
    """
    B, N = text.shape[0], image_len
    guided = sampling.guidance_scale != 1.0
    rows_text = torch.cat([text, model.unconditional_text(text)]) if guided else text
    image = torch.zeros(B, N, dtype=torch.long, device=text.device)
    n0 = 0
    if prime is not None:
        n0 = prime.shape[1]
        assert prime.shape[0] == B and n0 <= N, f"prime must be [B={B}, n<={N}], got {tuple(prime.shape)}"
        image[:, :n0] = prime
    drawer = TokenDrawer(sampling, text.device, generator)
    record = {"draws": drawer.mode, "decode": "recompute", "fallback": None}
    steps = _Steps(model, rows_text, image, sampling, drawer, on_step or (lambda done, total: None), record)
    was_training = model.training
    model.eval()  # dropout off: cached and recomputed sampling must agree
    try:
        if n0 < N:
            steps.cached(n0) if sampling.use_cache else steps.recomputed(n0)
    finally:
        model.train(was_training)
    model.last_decode = record
    return image


class _Steps:
    """One :func:`sample_image_tokens` call's two ways of filling ``image`` in place."""

    def __init__(self, model, rows_text: Tensor, image: Tensor, sampling: Sampling, drawer: TokenDrawer, on_step, record) -> None:
        self.model, self.text, self.image, self.sampling = model, rows_text, image, sampling
        self.drawer, self.on_step, self.record = drawer, on_step, record
        self.reps = rows_text.shape[0] // image.shape[0]

    def guide(self, logits: Tensor) -> Tensor:
        logits = logits.float()
        return split_guidance(logits, self.sampling.guidance_scale) if self.reps == 2 else logits

    def recomputed(self, n0: int) -> None:
        """The reference: every step is a forward over the whole known prefix."""
        image, N = self.image, self.image.shape[1]
        for i in range(n0, N):
            logits = self.model.next_logits(self.text, image[:, :i].repeat(self.reps, 1))
            image[:, i] = self.drawer.draw(self.guide(logits), i)
            self.on_step(i + 1, N)

    def cached(self, n0: int) -> None:
        """Prefill the caches with the known prefix, then one fixed-shape step per token."""
        model, image, drawer, reps, N = self.model, self.image, self.drawer, self.reps, self.image.shape[1]
        logits, state = model.prefill(self.text, image[:, :n0].repeat(reps, 1))
        image[:, n0] = drawer.draw(self.guide(logits), n0)
        self.on_step(n0 + 1, N)
        if n0 + 1 == N:
            return
        # step state, updated in place: the newest token of every row and its image position
        current = image[:, n0].repeat(reps)
        index = torch.full((), n0, dtype=torch.long, device=image.device)

        def forward_step() -> Tensor:
            return self.guide(model.decode_step(state, current, index))

        def accept(token: Tensor) -> None:  # token [B] -> every row at image position index + 1
            current.copy_(token.repeat(reps))
            index.add_(1)
            image.index_copy_(1, index.view(1), token[:, None])

        def step_and_draw() -> None:
            accept(drawer.draw(forward_step(), index + 1))

        runner = StepRunner(step_and_draw if drawer.on_device else forward_step, resolve_decode(self.sampling, image.device), image.device)
        for i in range(n0 + 1, N):
            logits = runner()
            if not drawer.on_device:  # host draws: a sync per token, outside the captured step
                accept(drawer.draw(logits, i))
            self.on_step(i + 1, N)
        self.record.update(decode=runner.used, fallback=runner.fallback)


__all__ = ["CachedImageModel", "KVCache", "Mode", "StepRunner", "all_padding", "resolve_decode", "sample_image_tokens"]
