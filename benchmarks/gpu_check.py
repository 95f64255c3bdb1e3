"""The one GPU check: sampling and training speed at the paper's shapes, against what the
hardware allows; prints one JSON summary and writes it to ``benchmarks/results/``.

    python benchmarks/gpu_check.py                       # one CUDA GPU: every section, under 8 minutes on an H200
    python benchmarks/gpu_check.py --sections peak,sampling
    python benchmarks/gpu_check.py --quick               # the same code at tiny shapes on the CPU (< 1 minute)

Sections, in the order they run (each in its own forked process with its own time
limit, so one that fails or hangs records its error and the rest still run):

- ``peak``: what the hardware allows, measured in this run: a bf16 matrix product
  (TFLOP/s, the compute ceiling for MFU) and a device-to-device copy (GB/s counting
  bytes read and written, the memory ceiling for decoding).
- ``kernels``: attention at the training length (``L - 1 = 1279`` of 256 text + 32x32
  image tokens, 16 heads of 64, bf16): block-sparse flex against masked SDPA and an
  fp32 reference, forward and backward, per pattern; forward+backward time of flex
  and of dense causal attention (flash); block density per pattern at block sizes 128
  and 64, and the share of keys a query needs; which kernel training picks.
- ``sampling``: the 38M prior of this check (width 512, 4 layers, 8 heads) at the
  paper's shape, bf16: image tokens/s at batch 1 and with 64 candidates in one batch
  (targets 1,000 and 30,000), dense and sparse, with the decode step as a CUDA graph,
  eagerly, with guidance and with host draws.
- ``equivalence``: cached == recomputed, token for token, on the device (fp32, small
  shapes): every pattern, guidance, top-k/top-p, priming, device and host draws, the
  decode step captured in a CUDA graph (and compiled, when time is left).
- ``decode_1b``: a ~1.3B prior (width 2048, 24 layers, 32 heads): ms per decode step at
  batch 1 and 64, dense and sparse, against the memory-bandwidth bound (bytes of the
  weights, and of the keys/values a step must read, over the measured copy bandwidth).
- ``train_1b``: the ~1.3B prior trained with DeepSpeed ZeRO-2 in bf16 on one GPU at
  1280 tokens, sparse (paper layers) and dense side by side: tokens/s, MFU against the
  measured bf16 matmul rate, and which attention kernels ran.
- ``released_priors``: the converted ruDALL-E Malevich (1.3B, fp16) and DALL-E Mega (2.6B,
  bf16, guidance 16) at their released shapes with random weights: ms per decode step and
  image tokens/s at batch 1 and 64, then training steps of the -zero recipes (their layers
  frozen) in the same precision: step time, tokens/s, peak memory, finite losses.
- ``train_1b_compiled``: the sparse one again with ``compile_blocks`` (torch.compile).
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import gc
import importlib
import json
import math
import multiprocessing
import os
import re
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
for extra in (ROOT, ROOT / "plugins"):  # a bare GPU box may not have the project installed
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from dalle_framework import Sampling  # noqa: E402
from dalle_framework.attention import (  # noqa: E402
    PATTERNS,
    Layout,
    block_density,
    block_mask,
    causal_attention,
    dense_mask,
    flex_attention_fn,
    kernel_calls,
    kernel_for,
    mask_density,
    reference_attention,
    reset_kernel_calls,
)
from dalle_framework.plugins import get_plugin_manager  # noqa: E402

PAPER = Layout(256, (32, 32))
PAPER_FIRST = ["row", "column", "conv"] + sorted(set(PATTERNS) - {"row", "column", "conv"})
SHAPES: dict[str, dict[str, Any]] = {
    "gpu": dict(
        layout=PAPER, text_vocab=16384, image_vocab=8192,
        small=dict(dim=512, heads=8, depth=4),  # the 38M prior of this check
        big=dict(dim=2048, heads=32, depth=24),  # ~1.3B
        kernel_heads=16, kernel_batch=4, head_dim=64,
        candidates=64, train_batch=8, decode_steps=256, train_steps=(2, 4),
        equiv=dict(layout=Layout(16, (8, 8)), dim=64, heads=4, depth=3, text_vocab=64, image_vocab=32),
        matmul=8192, copy_bytes=2**31,
        released=dict(  # the converted priors at their released shapes (random weights), as the -zero recipes train them
            malevich=dict(name="rudalle", params={"grad_checkpointing": True}, text_vocab=16384, text_len=128, image_vocab=8192, grid=(32, 32),
                          dtype="fp16", guidance=1.0, train_batch=8),
            mega=dict(name="min-dalle", params={"grad_checkpointing": True}, text_vocab=50273, text_len=64, image_vocab=16384, grid=(16, 16),
                      dtype="bf16", guidance=16.0, train_batch=8),
        ),
        released_steps=128,
    ),
    "quick": dict(
        layout=Layout(8, (4, 4)), text_vocab=64, image_vocab=32,
        small=dict(dim=32, heads=2, depth=2),
        big=dict(dim=64, heads=4, depth=2),
        kernel_heads=2, kernel_batch=1, head_dim=16,
        candidates=4, train_batch=2, decode_steps=8, train_steps=(1, 2),
        equiv=dict(layout=Layout(6, (4, 4)), dim=32, heads=4, depth=2, text_vocab=24, image_vocab=16),
        matmul=256, copy_bytes=2**22,
        released=dict(
            malevich=dict(name="rudalle", params=dict(dim=64, depth=2, heads=4), text_vocab=64, text_len=8, image_vocab=32,
                          grid=(4, 4), dtype="fp16", guidance=1.0, train_batch=2),
            mega=dict(name="min-dalle", params=dict(dim=32, layers=2, heads=4, glu_dim=48, text_vocab=300), text_vocab=301,
                      text_len=8, image_vocab=16384, grid=(4, 4), dtype="bf16", guidance=16.0, train_batch=2),
        ),
        released_steps=8,
    ),
}
# seconds each section may run; the run's --budget caps the total
LIMITS = {"peak": 60, "kernels": 150, "sampling": 120, "equivalence": 90, "decode_1b": 120, "train_1b": 240, "released_priors": 150,
          "train_1b_compiled": 150}
# what the released priors' -zero recipes freeze (tests/test_gpu_check.py holds these and the shapes to the recipes)
RELEASED_FREEZE = {
    "malevich": ["text_embeddings.*", "image_embeddings.*", "text_pos_embeddings.*", "image_row_embeddings.*", "image_col_embeddings.*"],
    "mega": ["encoder.*", "decoder.embed_tokens.*", "decoder.embed_positions.*"],
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
SLOW_ON_CPU = {"train_1b_compiled"}  # inductor compiles for minutes on a small CPU: --quick runs it only when named
TARGETS = {"sampling_b1": 1000.0, "sampling_batch": 30000.0, "bandwidth_share": 0.5, "mfu": 0.4, "sparse_speedup": 1.5}


# ----------------------------------------------------------------------------- helpers


@dataclass
class Context:
    """What a section gets: device, shapes, the ``peak`` results, its deadline, its output."""

    device: torch.device
    quick: bool
    shape: dict[str, Any]
    peaks: dict[str, Any]
    deadline: float
    engine: str
    send: Callable[[dict], None]
    out: dict[str, Any] = field(default_factory=dict)

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def publish(self) -> None:
        """Send what is measured so far (kept if the section is later killed at its limit)."""
        self.send(self.out)

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def near_end(self, seconds: float) -> bool:
        """Whether less than ``seconds`` (what the next GPU measurement may take) is left; tiny with --quick."""
        return self.time_left() < (2 if self.quick else seconds)

    def sync(self) -> None:
        if self.on_gpu:
            torch.cuda.synchronize(self.device)

    def mean_ms(self, fn: Callable[[], Any], *, warmup: int = 2, iters: int = 10) -> float:
        """Mean milliseconds of back-to-back calls (one sync at the end: no per-call sync cost)."""
        for _ in range(warmup):
            fn()
        self.sync()
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        self.sync()
        return round((time.perf_counter() - start) / iters * 1000, 4)

    def seconds(self, fn: Callable[[], Any]) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(float((a.detach().float() - b.detach().float()).abs().max()), 6)


def registry(kind: str):
    """A registry of the built-in plugins; added from the source tree when the project is
    not installed (no entry points), as on a bare GPU machine."""
    manager = get_plugin_manager()
    wanted = {"prior": {"sparse-transformer": "dalle_transformer", "rudalle": "dalle_rudalle", "min-dalle": "dalle_mindalle"},
              "engine": {"deepspeed": "dalle_engines"}}.get(kind, {})
    for component, module in wanted.items():
        if component not in manager.registry(kind):
            manager.add_plugin(importlib.import_module(module), name=module.removeprefix("dalle_"))
    return manager.registry(kind)


def build_prior(kind: str, ctx: Context, size: dict, *, layout: Optional[Layout] = None, vocab: Optional[tuple] = None,
                dtype: Optional[torch.dtype] = torch.bfloat16, **params):
    """A ``dense`` or ``sparse`` (paper layers) prior built directly on the device."""
    layout = layout or ctx.shape["layout"]
    text_vocab, image_vocab = vocab or (ctx.shape["text_vocab"], ctx.shape["image_vocab"])
    name = {"dense": "dense-transformer", "sparse": "sparse-transformer"}[kind]
    torch.manual_seed(0)
    with torch.device(ctx.device):
        prior = registry("prior").build(
            {"name": name, "params": {**size, **params}},
            text_vocab_size=text_vocab, text_len=layout.text_len, image_vocab_size=image_vocab, grid=layout.grid,
        )
    return prior.to(dtype) if dtype is not None else prior


def tokens(ctx: Context, rows: int, layout: Optional[Layout] = None, vocab: Optional[tuple] = None):
    """Captions (half padding) ``[rows, T]`` and image codes ``[rows, N]`` on the device."""
    layout = layout or ctx.shape["layout"]
    text_vocab, image_vocab = vocab or (ctx.shape["text_vocab"], ctx.shape["image_vocab"])
    g = torch.Generator().manual_seed(0)
    text = torch.randint(1, text_vocab, (rows, layout.text_len), generator=g)
    text[:, max(1, layout.text_len // 2):] = 0
    image = torch.randint(0, image_vocab, (rows, layout.image_len), generator=g)
    return text.to(ctx.device), image.to(ctx.device)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def decode_weight_bytes(prior: torch.nn.Module) -> int:
    """Bytes of the weights one decode step reads: every block, the final norm and the image
    head; embedding tables are looked up one row at a time and the text head is unused."""
    skip = {"text_emb", "text_pad_emb", "text_pos", "image_emb", "image_row", "image_col", "text_head"}
    return sum(p.numel() * p.element_size() for name, p in prior.named_parameters() if name.split(".")[0] not in skip)


def decode_step_ms(ctx: Context, prior, text: torch.Tensor, image: torch.Tensor, steps: int, sampling: Sampling) -> float:
    """Milliseconds per decode step over the last ``steps - 1`` image positions: the first ones are primed
    from ``image``, and the clock starts once the prefill's token is drawn (a step costs the same at
    every position). A first, shorter call pays the first-use costs."""
    n = image.shape[1]
    prior.generate(text, sampling, prime=image[:, : n - 4], generator=torch.Generator().manual_seed(1))
    marks: dict[str, float] = {}

    def after_prefill(done: int, total: int) -> None:
        if done == n - steps + 1:
            ctx.sync()
            marks["start"] = time.perf_counter()

    prior.generate(text, sampling, prime=image[:, : n - steps], generator=torch.Generator().manual_seed(0), on_step=after_prefill)
    ctx.sync()
    return (time.perf_counter() - marks["start"]) / (steps - 1) * 1000


def kv_bytes_needed(prior, rows: int, first: int, last: int) -> float:
    """Mean bytes of keys and values one step must read, over image positions ``first..last-1``
    (a position's allowed keys in each layer: its causal prefix, or its pattern's mask row)."""
    layout = prior.layout
    per_key = 2 * prior.heads * prior.head_dim * next(prior.parameters()).element_size()  # k and v
    patterns = prior.layer_patterns() if hasattr(prior, "layer_patterns") else ["causal"] * len(prior.blocks)
    total = 0.0
    for pattern in patterns:
        rows_allowed = dense_mask(pattern, layout)[layout.text_len + first - 1 : layout.text_len + last - 1].sum(dim=1)
        total += float(rows_allowed.float().mean())
    return total * per_key * rows


# ----------------------------------------------------------------------------- sections


def section_peak(ctx: Context) -> None:
    out = ctx.out
    out["device"] = torch.cuda.get_device_name(ctx.device) if ctx.on_gpu else "cpu"
    if ctx.on_gpu:
        props = torch.cuda.get_device_properties(ctx.device)
        out["multiprocessors"], out["memory_gib"] = props.multi_processor_count, round(props.total_memory / 2**30, 1)
    n = ctx.shape["matmul"]
    g = torch.Generator(ctx.device).manual_seed(0)
    a, b = (torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16, generator=g) for _ in range(2))
    ms = ctx.mean_ms(lambda: a @ b, warmup=3, iters=10)
    out["matmul"] = {"n": n, "dtype": "bf16", "ms": ms, "tflops": round(2 * n**3 / (ms / 1000) / 1e12, 6)}  # 6 places: a small CPU matmul is a few GFLOPS
    ctx.publish()
    del a, b
    nbytes = ctx.shape["copy_bytes"]
    x = torch.randn(nbytes // 2, device=ctx.device, dtype=torch.bfloat16, generator=g)
    y = torch.empty_like(x)
    ms = ctx.mean_ms(lambda: y.copy_(x), warmup=3, iters=10)
    out["copy"] = {"bytes": nbytes, "ms": ms, "gb_per_s": round(2 * nbytes / (ms / 1000) / 1e9, 1), "counts": "bytes read + written"}


def section_kernels(ctx: Context) -> None:
    out, shape = ctx.out, ctx.shape
    layout: Layout = shape["layout"]
    n = layout.seq_len - 1  # what training feeds: the last token predicts nothing
    B, H, D = shape["kernel_batch"], shape["kernel_heads"], shape["head_dim"]
    out["shape"] = {"batch": B, "heads": H, "head_dim": D, "length": n, "dtype": "bf16"}
    out["training_kernel"] = {p: kernel_for(layout=layout, lq=n, lk=n, device_type=ctx.device.type, pattern=p) for p in PAPER_FIRST}
    out["density"] = {
        p: {
            "blocks_128": round(block_density(p, layout, 128), 3),
            "blocks_64": round(block_density(p, layout, 64), 3),
            "keys_per_image_query": round(mask_density(p, layout), 3),
        }
        for p in PAPER_FIRST
    }
    ctx.publish()
    g = torch.Generator(ctx.device).manual_seed(0)
    q, k, v, grad = (torch.randn(B, H, n, D, device=ctx.device, dtype=torch.bfloat16, generator=g) for _ in range(4))
    backward = ctx.on_gpu  # flex has no backward on the CPU
    flex = flex_attention_fn(ctx.on_gpu)

    def run(attend, with_grad: bool = backward):
        qq, kk, vv = (t.detach().requires_grad_(with_grad) for t in (q, k, v))
        with torch.set_grad_enabled(with_grad):
            o = attend(qq, kk, vv)
            grads = torch.autograd.grad(o, (qq, kk, vv), grad) if with_grad else None
        return o, grads

    reps = {"warmup": 1, "iters": 2} if ctx.quick else {"warmup": 3, "iters": 20}
    dense_ms = ctx.mean_ms(lambda: run(lambda a, b, c: causal_attention(a, b, c)), **reps)
    out["dense_causal_ms_fwd_bwd" if backward else "dense_causal_ms_fwd"] = dense_ms
    ctx.publish()
    patterns: dict[str, Any] = {}
    out["patterns"] = patterns
    for name in PAPER_FIRST[:3] if ctx.quick else PAPER_FIRST:
        if ctx.near_end(15):
            patterns[name] = {"skipped": "section time limit near"}
            continue
        entry: dict[str, Any] = {}
        patterns[name] = entry
        mask = dense_mask(name, layout, ctx.device)[:n, :n]
        bm = block_mask(name, layout, ctx.device, length=n)
        attend_flex = lambda a, b, c: flex(a, b, c, block_mask=bm)  # noqa: E731
        attend_sdpa = lambda a, b, c: torch.nn.functional.scaled_dot_product_attention(a, b, c, attn_mask=mask)  # noqa: E731
        ref, ref_grads = run(lambda a, b, c: reference_attention(a.float(), b.float(), c.float(), mask))
        fl, fl_grads = run(attend_flex)
        sd, _ = run(attend_sdpa)
        entry["max_diff"] = {"flex_vs_fp32_reference": max_diff(fl, ref), "sdpa_vs_fp32_reference": max_diff(sd, ref)}
        if fl_grads is not None:
            entry["max_diff"]["flex_grads_vs_fp32_reference"] = [max_diff(a, b) for a, b in zip(fl_grads, ref_grads)]
        del ref, ref_grads
        key = "ms_fwd_bwd" if backward else "ms_fwd"
        timing = {"flex_128": ctx.mean_ms(lambda: run(attend_flex), **reps), "sdpa_mask": ctx.mean_ms(lambda: run(attend_sdpa), **reps)}
        try:
            bm64 = block_mask(name, layout, ctx.device, block_size=64, length=n)
            timing["flex_64"] = ctx.mean_ms(lambda: run(lambda a, b, c: flex(a, b, c, block_mask=bm64)), **reps)
        except Exception as exc:  # smaller blocks need kernel options some torch versions do not pick themselves
            timing["flex_64"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        entry[key] = timing
        entry["speedup_vs_dense_causal"] = round(dense_ms / max(timing["flex_128"], 1e-6), 2)
        ctx.publish()
    paper = [patterns[p]["speedup_vs_dense_causal"] for p in ("row", "column", "conv") if "speedup_vs_dense_causal" in patterns.get(p, {})]
    if paper and min(paper) > 0:
        out["paper_layers_speedup_vs_dense_causal"] = round(len(paper) / sum(1 / s for s in paper), 2)  # harmonic: time-weighted


def section_sampling(ctx: Context) -> None:
    out, shape = ctx.out, ctx.shape
    N, C = shape["layout"].image_len, shape["candidates"]
    priors = {kind: build_prior(kind, ctx, shape["small"]).eval() for kind in ("sparse", "dense")}
    out["params"] = n_params(priors["sparse"])
    out["weight_bytes"] = decode_weight_bytes(priors["sparse"])
    bandwidth = ctx.peaks.get("copy", {}).get("gb_per_s")
    if bandwidth:
        out["batch1_weight_bound_tokens_per_s"] = round(bandwidth * 1e9 / out["weight_bytes"], 1)
    cases = [  # (label, prior, rows, Sampling fields); the first two are the targets
        ("sparse_batch1", "sparse", 1, {}), (f"sparse_batch{C}", "sparse", C, {}),
        ("dense_batch1", "dense", 1, {}), (f"dense_batch{C}", "dense", C, {}),
        ("sparse_batch1_eager", "sparse", 1, {"decode": "eager"}),
        (f"sparse_batch{C}_guided", "sparse", C, {"guidance_scale": 2.0}),
        ("sparse_batch1_host_draws", "sparse", 1, {"draws": "host"}),
    ]
    runs: dict[str, Any] = {}
    out["runs"] = runs
    for label, kind, rows, extra in cases:
        if ctx.near_end(15):
            runs[label] = {"skipped": "section time limit near"}
            continue
        prior = priors[kind]
        sampling = Sampling(top_k=64, **extra)
        text, image = tokens(ctx, rows)
        prior.generate(text, sampling, prime=image[:, : N - 4], generator=torch.Generator().manual_seed(1))  # first-use costs
        g = torch.Generator().manual_seed(0)
        reset_kernel_calls()  # eager calls only: prefill and the steps before a graph's capture
        seconds = ctx.seconds(lambda: prior.generate(text, sampling, generator=g))
        runs[label] = {
            "rows": rows, "sampling": {"top_k": 64, **extra},
            "image_tokens_per_s": round(rows * N / seconds, 1),
            "ms_per_step": round(seconds / N * 1000, 4),
            "seconds": round(seconds, 3),
            "ran": dict(prior.last_decode),
            "attention_kernels": kernel_calls(),
        }
        ctx.publish()
    for label in ("sparse_batch1", f"sparse_batch{C}"):
        out[f"{label}_tokens_per_s"] = runs.get(label, {}).get("image_tokens_per_s")


def section_equivalence(ctx: Context) -> None:
    out, small = ctx.out, ctx.shape["equiv"]
    layout, vocab = small["layout"], (small["text_vocab"], small["image_vocab"])
    size = {k: small[k] for k in ("dim", "heads", "depth")}
    patterns = ["row"] if ctx.quick else sorted(PATTERNS)  # --quick: the code path, not the coverage
    configs = [("dense", "dense", {})] + [(f"sparse-{p}", "sparse", {"layers": [p], "final_layer": None}) for p in patterns]
    configs.append(("sparse-paper-rotary", "sparse", {"depth": 5, "rotary": True}))
    samplings = {
        "device": Sampling(draws="device"),
        "device-guided-topk-topp": Sampling(draws="device", guidance_scale=3.0, top_k=5, top_p=0.9, temperature=0.8),
        "host": Sampling(draws="host"),
    }
    cases, used = [], set()
    out["cases"] = cases
    for label, kind, params in configs:
        prior = build_prior(kind, ctx, size, layout=layout, vocab=vocab, dtype=None, **params).eval()
        text, image = tokens(ctx, 3, layout, vocab)
        for s_name, sampling in samplings.items():
            for primed in (False, True):
                prime = image[:, :3] if primed else None
                cached = prior.generate(text, sampling, prime=prime, generator=torch.Generator().manual_seed(7))
                used.add(f"{prior.last_decode['decode']}/{prior.last_decode['draws']}")
                recomputed = prior.generate(
                    text, sampling.model_copy(update={"use_cache": False}), prime=prime, generator=torch.Generator().manual_seed(7)
                )
                differ = (cached != recomputed).sum().item()
                cases.append({"prior": label, "sampling": s_name, "primed": primed, "differing_tokens": differ})
        ctx.publish()
    out["decode_used"] = sorted(used)
    out["all_equal"] = all(c["differing_tokens"] == 0 for c in cases)
    out["tokens_compared"] = len(cases) * 3 * layout.image_len
    ctx.publish()
    # the compiled step too, when there is time (a compile takes tens of seconds)
    compiled = []
    for label, kind, params in (("dense", "dense", {}), ("sparse-paper", "sparse", {})):
        if ctx.quick or ctx.time_left() < 45:
            compiled.append({"prior": label, "skipped": "not with --quick" if ctx.quick else "section time limit near"})
            continue
        prior = build_prior(kind, ctx, size, layout=layout, vocab=vocab, dtype=None, **params).eval()
        text, _ = tokens(ctx, 3, layout, vocab)
        sampling = Sampling(draws="device", guidance_scale=2.0, top_k=6, decode="compile")
        a = prior.generate(text, sampling, generator=torch.Generator().manual_seed(3))
        ran = dict(prior.last_decode)
        b = prior.generate(text, sampling.model_copy(update={"use_cache": False}), generator=torch.Generator().manual_seed(3))
        compiled.append({"prior": label, "ran": ran, "differing_tokens": (a != b).sum().item()})
    out["compiled_step"] = compiled


def section_decode_1b(ctx: Context) -> None:
    out, shape = ctx.out, ctx.shape
    N, C, steps = shape["layout"].image_len, shape["candidates"], shape["decode_steps"]
    bandwidth = ctx.peaks.get("copy", {}).get("gb_per_s")
    out["steps_timed"] = f"the last {steps - 1} of {N} image positions, after a prefill (a step costs the same at every position)"
    runs = []
    out["runs"] = runs
    for kind in ("sparse", "dense"):
        if ctx.near_end(20):
            runs.append({"prior": kind, "skipped": "section time limit near"})
            continue
        prior = build_prior(kind, ctx, shape["big"]).eval()
        weights = decode_weight_bytes(prior)
        out.setdefault("params", n_params(prior))
        out.setdefault("weight_bytes", weights)
        for rows in (1, C):
            text, image = tokens(ctx, rows)
            reset_kernel_calls()
            ms = decode_step_ms(ctx, prior, text, image, steps, Sampling(top_k=64))
            kv = kv_bytes_needed(prior, rows, N - steps + 1, N)
            entry = {"prior": kind, "rows": rows, "ms_per_step": round(ms, 4), "image_tokens_per_s": round(rows / ms * 1000, 1),
                     "kv_bytes_needed_per_step": round(kv), "ran": dict(prior.last_decode), "attention_kernels": kernel_calls()}
            if bandwidth:
                entry["bound_ms_weights"] = round(weights / (bandwidth * 1e9) * 1000, 4)
                entry["bound_ms_weights_and_kv"] = round((weights + kv) / (bandwidth * 1e9) * 1000, 4)
                entry["share_of_bound"] = round(entry["bound_ms_weights_and_kv"] / ms, 3)
                entry["share_of_weights_bound"] = round(entry["bound_ms_weights"] / ms, 3)
            runs.append(entry)
            ctx.publish()
        del prior
        gc.collect()
        if ctx.on_gpu:
            torch.cuda.empty_cache()


def time_training(ctx: Context, prior, text: torch.Tensor, image: torch.Tensor, *, precision: str, entry: dict[str, Any]):
    """A few training steps of ``prior`` on one batch through the run's engine (DeepSpeed ZeRO-2 unless
    ``--engine torch``), the last ones timed; fills ``entry`` and returns the run and the tokens/s."""
    from dalle_framework import TrainConfig

    engine = ctx.engine
    if engine == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError as exc:
            entry["engine_fallback"] = f"deepspeed not importable ({exc}); the torch engine ran"
            engine = "torch"
    params = {"zero_stage": 2} if engine == "deepspeed" else {}
    config = TrainConfig(steps=100, lr=1e-4, batch_size=len(text), precision=precision, grad_clip=1.0,
                         warmup_steps=0, engine={"name": engine, "params": params})
    run = registry("engine").build(config.engine).prepare(prior, config)
    entry["engine"] = f"{engine} (ZeRO-2)" if engine == "deepspeed" else engine
    optimizer = getattr(run, "optimizer", None) or getattr(getattr(run, "engine", None), "optimizer", None)
    inner = getattr(optimizer, "optimizer", optimizer)
    if inner is not None and hasattr(inner, "defaults"):
        entry["optimizer"] = f"{type(inner).__name__}(fused={inner.defaults.get('fused')})"
    warm, timed = ctx.shape["train_steps"]
    losses = [run.step(text, image)["loss"] for _ in range(warm)]  # compiles the flex kernels
    reset_kernel_calls()
    ctx.sync()
    start = time.perf_counter()
    losses += [run.step(text, image)["loss"] for _ in range(timed)]  # each step returns floats: synchronised
    seconds = (time.perf_counter() - start) / timed
    tok_s = len(text) * (text.shape[1] + image.shape[1]) / seconds
    entry.update(kernels_ran=kernel_calls(), step_ms=round(seconds * 1000, 2), tokens_per_s=round(tok_s, 1),
                 losses=[round(x, 4) for x in losses], finite=all(math.isfinite(x) for x in losses))
    if ctx.on_gpu:
        entry["max_memory_gib"] = round(torch.cuda.max_memory_allocated(ctx.device) / 2**30, 1)
    return run, tok_s


def free(ctx: Context) -> None:
    gc.collect()
    if ctx.on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(ctx.device)


def _train(ctx: Context, kind: str, *, compile_blocks: bool = False) -> dict[str, Any]:
    prior = build_prior(kind, ctx, ctx.shape["big"], dtype=None, compile_blocks=compile_blocks)  # fp32 master weights: the engine casts
    entry: dict[str, Any] = {"prior": kind, "compile_blocks": compile_blocks, "params": n_params(prior)}
    text, image = tokens(ctx, ctx.shape["train_batch"])
    run, tok_s = time_training(ctx, prior, text, image, precision="bf16", entry=entry)
    flops = run.module.flops_per_token()  # the prior's own count: each layer's attention over the keys its mask allows
    entry.update(train_flops_per_token=flops["train"], flops_formula=flops["formula"] + " (sparse layers counted by the keys they attend to)")
    peak = ctx.peaks.get("matmul", {}).get("tflops")
    if peak:
        entry["mfu"] = round(flops["train"] * tok_s / (peak * 1e12), 3)
    del run, prior
    free(ctx)
    return entry


def section_train_1b(ctx: Context) -> None:
    out = ctx.out
    out["shape"] = {"tokens": ctx.shape["layout"].seq_len, "batch": ctx.shape["train_batch"], **ctx.shape["big"], "precision": "bf16"}
    runs = []
    out["runs"] = runs
    for kind in ("sparse", "dense"):
        if ctx.near_end(40):
            runs.append({"prior": kind, "skipped": "section time limit near"})
            continue
        runs.append(_train(ctx, kind))
        ctx.publish()


def build_released(ctx: Context, spec: dict[str, Any], dtype: Optional[torch.dtype]):
    """A converted prior's plugin at its released shape (``spec``), random weights, built on the device."""
    torch.manual_seed(0)
    with torch.device(ctx.device):
        prior = registry("prior").build({"name": spec["name"], "params": spec["params"]}, text_vocab_size=spec["text_vocab"],
                                        text_len=spec["text_len"], image_vocab_size=spec["image_vocab"], grid=spec["grid"])
    return prior.to(dtype) if dtype is not None else prior


def released_tokens(ctx: Context, spec: dict[str, Any], rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    text = torch.randint(1, spec["text_vocab"], (rows, spec["text_len"]), generator=g)
    text[:, max(2, spec["text_len"] // 4):] = 0  # a short caption, as most are
    image = torch.randint(0, spec["image_vocab"], (rows, spec["grid"][0] * spec["grid"][1]), generator=g)
    return text.to(ctx.device), image.to(ctx.device)


def section_released_priors(ctx: Context) -> None:
    """ruDALL-E Malevich (1.3B, fp16 as released) and DALL-E Mega (2.6B, bf16, guidance 16 as min-dalle samples)
    at their released shapes: cached sampling at batch 1 and with the candidates in one batch, and the -zero
    recipes' fine-tuning (their layers frozen) in the same precision."""
    out, C, steps = ctx.out, ctx.shape["candidates"], ctx.shape["released_steps"]
    for name, spec in ctx.shape["released"].items():
        entry: dict[str, Any] = {"dtype": spec["dtype"], "shape": {"text_len": spec["text_len"], "grid": list(spec["grid"])}}
        out[name] = entry
        if ctx.near_end(40):
            entry["skipped"] = "section time limit near"
            continue
        prior = build_released(ctx, spec, DTYPES[spec["dtype"]]).eval()
        entry["params"] = n_params(prior)
        sampling = Sampling(top_k=256, guidance_scale=spec["guidance"])
        runs = entry.setdefault("sampling", {})
        for rows in (1, C):
            if ctx.near_end(20):
                runs[f"batch{rows}"] = {"skipped": "section time limit near"}
                continue
            text, image = released_tokens(ctx, spec, rows)
            ms = decode_step_ms(ctx, prior, text, image, steps, sampling)
            runs[f"batch{rows}"] = {"ms_per_step": round(ms, 4), "image_tokens_per_s": round(rows / ms * 1000, 1),
                                    "guidance_scale": spec["guidance"], "ran": dict(prior.last_decode)}
            ctx.publish()
        del prior
        free(ctx)
        if ctx.near_end(40):
            entry["training"] = {"skipped": "section time limit near"}
            continue
        prior = build_released(ctx, spec, None)  # fp32 master weights: the engine casts
        for param_name, param in prior.named_parameters():
            if any(fnmatch.fnmatchcase(param_name, glob) for glob in RELEASED_FREEZE[name]):
                param.requires_grad_(False)
        precision = spec["dtype"] if ctx.on_gpu else "bf16"  # fp16 loss scaling needs CUDA
        training = {"freeze": RELEASED_FREEZE[name], "trainable": sum(p.numel() for p in prior.parameters() if p.requires_grad),
                    "precision": precision}
        entry["training"] = training
        text, image = released_tokens(ctx, spec, spec["train_batch"])
        run, _ = time_training(ctx, prior.train(), text, image, precision=precision, entry=training)
        del run, prior
        free(ctx)
        ctx.publish()


def section_train_1b_compiled(ctx: Context) -> None:
    ctx.out["runs"] = [_train(ctx, "sparse", compile_blocks=True)]


SECTIONS: dict[str, Callable[[Context], None]] = {
    "peak": section_peak,
    "kernels": section_kernels,
    "sampling": section_sampling,
    "equivalence": section_equivalence,
    "decode_1b": section_decode_1b,
    "train_1b": section_train_1b,
    "released_priors": section_released_priors,
    "train_1b_compiled": section_train_1b_compiled,
}


# ----------------------------------------------------------------------------- running sections apart


def _child(name: str, quick: bool, peaks: dict, limit: float, engine: str, conn) -> None:
    """One section in a forked process: CUDA is first touched here, never in the parent."""
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")  # CPU: eager on purpose
    if quick:
        torch.set_num_threads(1)
    ctx = Context(
        device=torch.device("cpu" if quick else "cuda"), quick=quick, shape=SHAPES["quick" if quick else "gpu"], peaks=peaks,
        deadline=time.monotonic() + limit, engine=engine, send=conn.send,
    )
    try:
        if not quick and not torch.cuda.is_available():
            raise RuntimeError("no CUDA device; run with --quick to exercise the script on the CPU")
        SECTIONS[name](ctx)
        ctx.out["ok"] = True
    except BaseException as exc:  # recorded, and the parent runs the next section
        ctx.out["error"] = f"{type(exc).__name__}: {str(exc)[:1000]}"
        ctx.out["trace"] = traceback.format_exc()[-3000:]
    try:
        conn.send(ctx.out)
    finally:
        conn.close()


def run_section(name: str, *, quick: bool, peaks: dict, limit: float, engine: str) -> dict:
    """Run a section in a forked process for at most ``limit`` seconds; its last published results."""
    mp = multiprocessing.get_context("fork")
    receive, send = mp.Pipe(duplex=False)
    process = mp.Process(target=_child, args=(name, quick, peaks, limit, engine, send))  # not daemonic: compilers start workers
    process.start()
    send.close()
    result: dict = {}
    grace = min(10.0, limit)
    deadline = time.monotonic() + limit + grace  # the section watches its own limit; this is the hard stop
    while True:
        if receive.poll(max(0.0, min(1.0, deadline - time.monotonic()))):
            try:
                result = receive.recv()
            except EOFError:
                break
            continue
        if time.monotonic() > deadline:
            process.kill()
            result["timed_out"] = f"killed after {limit + grace:.0f} s"
            break
        if not process.is_alive() and not receive.poll(0):
            break
    process.join(10)
    if process.exitcode not in (0, None) and "error" not in result and "timed_out" not in result:
        result["error"] = f"the section's process died (exit code {process.exitcode})"
    return result


def summary(sections: dict[str, dict], candidates: int) -> list[dict]:
    """One line per issue target: value, target, met."""

    def line(what: str, value, target, higher: bool = True) -> dict:
        met = None if value is None else (value >= target if higher else value <= target)
        return {"what": what, "value": value, "target": target, "met": met}

    sampling = sections.get("sampling", {})
    decode = {(r.get("prior"), r.get("rows")): r for r in sections.get("decode_1b", {}).get("runs", []) if "rows" in r}
    train = {r.get("prior"): r for r in sections.get("train_1b", {}).get("runs", [])}
    equivalence = sections.get("equivalence", {})
    return [
        line("sampling, 38M sparse prior, batch 1: image tokens/s", sampling.get("sparse_batch1_tokens_per_s"), TARGETS["sampling_b1"]),
        line(f"sampling, 38M sparse prior, {candidates} candidates: image tokens/s",
             sampling.get(f"sparse_batch{candidates}_tokens_per_s"), TARGETS["sampling_batch"]),
        line("decode, 1.3B dense, batch 1: share of the bandwidth bound", decode.get(("dense", 1), {}).get("share_of_bound"), TARGETS["bandwidth_share"]),
        line(f"decode, 1.3B dense, batch {candidates}: share of the bandwidth bound",
             decode.get(("dense", candidates), {}).get("share_of_bound"), TARGETS["bandwidth_share"]),
        line("decode, 1.3B sparse, batch 1: share of the bandwidth bound", decode.get(("sparse", 1), {}).get("share_of_bound"), TARGETS["bandwidth_share"]),
        line(f"decode, 1.3B sparse, batch {candidates}: share of the bandwidth bound",
             decode.get(("sparse", candidates), {}).get("share_of_bound"), TARGETS["bandwidth_share"]),
        line("training, 1.3B sparse, ZeRO-2 bf16: MFU", train.get("sparse", {}).get("mfu"), TARGETS["mfu"]),
        line("training, 1.3B dense, ZeRO-2 bf16: MFU", train.get("dense", {}).get("mfu"), TARGETS["mfu"]),
        line("sparse attention fwd+bwd (row, column, conv): speedup over dense causal",
             sections.get("kernels", {}).get("paper_layers_speedup_vs_dense_causal"), TARGETS["sparse_speedup"]),
        line("cached == recomputed on the device, token for token", equivalence.get("all_equal"), True),
    ]


def device_slug(name: str) -> str:
    """'NVIDIA H200' -> 'h200'."""
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w and w not in {"nvidia", "tesla", "geforce"}]
    return "-".join(words[:2]) or "device"


def write_atomically(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU (the same code; seconds per section)")
    parser.add_argument("--sections", help=f"comma-separated subset of: {', '.join(SECTIONS)} (peak always runs first)")
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 460 on a GPU, 120 with --quick)")
    parser.add_argument("--engine", choices=("deepspeed", "torch"), default=None,
                        help="training engine (default: deepspeed on a GPU, torch with --quick)")
    parser.add_argument("--out", help="JSON path (default: benchmarks/results/gpu_check-<device>-<date>.json)")
    args = parser.parse_args(argv)
    default = [s for s in SECTIONS if not (args.quick and s in SLOW_ON_CPU)]
    wanted = default if not args.sections else [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    if "peak" not in wanted:
        wanted.insert(0, "peak")  # the ceilings every other figure is measured against
    budget = args.budget if args.budget is not None else (120.0 if args.quick else 460.0)
    engine = args.engine or ("torch" if args.quick else "deepspeed")
    candidates = SHAPES["quick" if args.quick else "gpu"]["candidates"]
    report: dict[str, Any] = {
        "script": "benchmarks/gpu_check.py" + (" --quick" if args.quick else ""),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "quick": args.quick,
        "sections": {},
    }
    t0 = time.monotonic()
    peaks: dict = {}
    out_path: Optional[Path] = Path(args.out) if args.out else None
    for name in SECTIONS:
        if name not in wanted:
            report["sections"][name] = {"skipped": "not asked for (--sections)" if args.sections else "not run with --quick"}
            continue
        left = budget - (time.monotonic() - t0)
        if left < (5 if args.quick else 20):
            report["sections"][name] = {"skipped": f"the run's budget of {budget:.0f} s is used"}
            continue
        limit = min(LIMITS[name], left)
        start = time.monotonic()
        result = run_section(name, quick=args.quick, peaks=peaks, limit=limit, engine=engine)
        result["seconds"] = round(time.monotonic() - start, 1)
        report["sections"][name] = result
        if name == "peak":
            peaks = result
            report["device"] = result.get("device", "unknown")
        if out_path is None and "device" in report:
            slug = "cpu-quick" if args.quick else device_slug(report["device"])
            out_path = ROOT / "benchmarks" / "results" / f"gpu_check-{slug}-{report['date']}.json"
        if out_path is not None:
            write_atomically(out_path, report)  # after every section: a partial report survives a timeout
    report["targets"] = summary(report["sections"], candidates)
    report["kernels_ran_in_training"] = {
        run.get("prior"): run.get("kernels_ran") for run in report["sections"].get("train_1b", {}).get("runs", []) if "prior" in run
    }
    report["failed_sections"] = [n for n, r in report["sections"].items() if "error" in r or "timed_out" in r]
    report["total_s"] = round(time.monotonic() - t0, 1)
    if out_path is not None:
        write_atomically(out_path, report)
        report["written"] = str(out_path)
    print(json.dumps(report, indent=1))
    return 1 if report["failed_sections"] else 0


if __name__ == "__main__":
    sys.exit(main())
