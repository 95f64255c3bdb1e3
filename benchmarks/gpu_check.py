"""One short GPU check of the sparse attention and the priors (H100/H200); prints one JSON object.

1. flex_attention block-sparse kernels, forward and backward, against masked SDPA and
   a plain fp32 softmax reference, for every pattern (max abs differences);
2. timings (forward + backward) at the paper's 1280-token shape (256 text + 32x32
   image) in bf16: flex per pattern, masked SDPA per pattern, dense causal SDPA (flash);
3. one bf16 training step of the sparse prior (paper layers, flex kernels);
4. sampling speed at the 1280-token shape with and without the KV cache.

Sections share one shape (batch 2, 8 heads, head dim 64) so the compiled flex kernels
are reused by the prior instead of recompiled. Budget: well under 4 minutes; a section
that would start after ``--budget`` seconds is skipped with a message.

    python benchmarks/gpu_check.py               # on a CUDA machine
    python benchmarks/gpu_check.py --cpu-smoke   # tiny shapes on CPU, exercises every path
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
import warnings

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from dalle_framework import Sampling
from dalle_framework.attention import (
    PATTERNS,
    Layout,
    block_density,
    block_mask,
    causal_attention,
    dense_mask,
    flex_attention_fn,
    reference_attention,
)
from dalle_framework.plugins import get_plugin_manager

SHAPES = {
    "gpu": dict(layout=Layout(256, (32, 32)), batch=2, heads=8, head_dim=64, depth=4, text_vocab=16384, image_vocab=8192, probes=16),
    "cpu-smoke": dict(layout=Layout(8, (4, 4)), batch=2, heads=2, head_dim=16, depth=2, text_vocab=64, image_vocab=32, probes=4),
}


class Clock:
    """Wall-clock timer that synchronises CUDA around the measured region."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn, *, warmup: int = 2, iters: int = 10) -> float:
        """Median milliseconds of ``fn()``."""
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            self.sync()
            times.append((time.perf_counter() - start) * 1000)
        return round(sorted(times)[len(times) // 2], 3)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


def check_kernels(shape: dict, device: torch.device, clock: Clock, on_gpu: bool, deadline: float) -> dict:
    layout: Layout = shape["layout"]
    g = torch.Generator(device=device).manual_seed(0)
    dims = (shape["batch"], shape["heads"], layout.seq_len, shape["head_dim"])
    q, k, v = (torch.randn(dims, device=device, generator=g, dtype=torch.bfloat16) for _ in range(3))
    grad_out = torch.randn(dims, device=device, generator=g, dtype=torch.bfloat16)
    flex = flex_attention_fn(on_gpu)
    out: dict = {}

    def run(attend, backward: bool):
        qq, kk, vv = (t.detach().clone().requires_grad_(backward) for t in (q, k, v))
        o = attend(qq, kk, vv)
        if not backward:
            return o, None
        o.backward(grad_out)
        return o, (qq.grad, kk.grad, vv.grad)

    paper_first = ["row", "column", "conv"] + sorted(set(PATTERNS) - {"row", "column", "conv"})
    for name in paper_first:
        if time.perf_counter() > deadline:  # each pattern is a fresh flex compile (forward + backward)
            out[name] = {"skipped": "time budget for kernel checks used"}
            continue
        entry: dict = {"block_density": round(block_density(name, layout), 3)}
        mask = dense_mask(name, layout, device)
        bm = block_mask(name, layout, device)
        attend_flex = lambda a, b, c: flex(a, b, c, block_mask=bm)  # noqa: E731
        attend_sdpa = lambda a, b, c: torch.nn.functional.scaled_dot_product_attention(a, b, c, attn_mask=mask)  # noqa: E731
        attend_ref = lambda a, b, c: reference_attention(a.float(), b.float(), c.float(), mask)  # noqa: E731
        ref, ref_grads = run(attend_ref, True)
        sdpa, sdpa_grads = run(attend_sdpa, True)
        entry["sdpa_vs_ref"] = {"out": max_diff(sdpa, ref), "grads": [max_diff(a, b) for a, b in zip(sdpa_grads, ref_grads)]}
        with torch.set_grad_enabled(on_gpu):  # flex has no backward on CPU
            fl, fl_grads = run(attend_flex, on_gpu)
        entry["flex_vs_ref"] = {"out": max_diff(fl, ref)}
        if fl_grads is not None:
            entry["flex_vs_ref"]["grads"] = [max_diff(a, b) for a, b in zip(fl_grads, ref_grads)]
            entry["flex_vs_sdpa_grads"] = [max_diff(a, b) for a, b in zip(fl_grads, sdpa_grads)]
        else:
            entry["flex_backward"] = "skipped: flex_attention has no backward on CPU"
        entry["flex_vs_sdpa_out"] = max_diff(fl, sdpa)
        if on_gpu:
            entry["ms_fwd_bwd"] = {
                "flex": clock.time(lambda: run(attend_flex, True)),
                "sdpa_masked": clock.time(lambda: run(attend_sdpa, True)),
            }
        out[name] = entry
    if on_gpu:
        dense = lambda a, b, c: causal_attention(a, b, c)  # noqa: E731
        out["dense_causal_sdpa"] = {"ms_fwd_bwd": clock.time(lambda: run(dense, True))}
        with torch.no_grad():
            out["dense_causal_sdpa"]["ms_fwd"] = clock.time(lambda: dense(q, k, v))
    return out


def prior_registry():
    """The prior registry; on a bare GPU box without the installed distribution (no entry
    points) the built-in plugin is added by hand from the source tree."""
    manager = get_plugin_manager()
    registry = manager.registry("prior")
    if "sparse-transformer" not in registry:
        import dalle_transformer  # needs plugins/ on PYTHONPATH

        manager.add_plugin(dalle_transformer, name="transformer")
    return registry


def build_prior(name: str, shape: dict, device: torch.device, **extra):
    layout: Layout = shape["layout"]
    params = dict(dim=shape["heads"] * shape["head_dim"], heads=shape["heads"], depth=shape["depth"], **extra)
    torch.manual_seed(0)
    prior = prior_registry().build(
        {"name": name, "params": params},
        text_vocab_size=shape["text_vocab"], text_len=layout.text_len,
        image_vocab_size=shape["image_vocab"], grid=layout.grid,
    )
    return prior.to(device)


def tokens(shape: dict, rows: int, device: torch.device):
    layout: Layout = shape["layout"]
    g = torch.Generator().manual_seed(0)
    text = torch.randint(1, shape["text_vocab"], (rows, layout.text_len), generator=g)
    text[:, layout.text_len // 2 :] = 0
    image = torch.randint(0, shape["image_vocab"], (rows, layout.image_len), generator=g)
    return text.to(device), image.to(device)


def train_step(shape: dict, device: torch.device, clock: Clock, on_gpu: bool) -> dict:
    prior = build_prior("sparse-transformer", shape, device, attention_backend="auto" if on_gpu else "sdpa")
    opt = torch.optim.AdamW(prior.parameters(), lr=1e-4)
    text, image = tokens(shape, shape["batch"], device)
    losses = []

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = prior.loss(text, image)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"]))

    ms = clock.time(step, warmup=1, iters=3)
    return {
        "layers": prior.layer_patterns(),
        "params": sum(p.numel() for p in prior.parameters()),
        "losses": [round(x, 4) for x in losses],
        "finite": all(torch.isfinite(torch.tensor(losses)).tolist()),
        "ms_per_step": ms,
        "tokens_per_s": round(shape["batch"] * shape["layout"].seq_len / ms * 1000, 1),
        "backend": "flex (block-sparse, compiled)" if on_gpu else "sdpa + boolean mask",
    }


def sampling_speed(shape: dict, device: torch.device, clock: Clock) -> dict:
    layout: Layout = shape["layout"]
    out: dict = {}
    for name in ("dense-transformer", "sparse-transformer"):
        prior = build_prior(name, shape, device).eval()
        text, image = tokens(shape, 1, device)
        g = torch.Generator(device=device).manual_seed(0)
        # no cuDNN attention here: it builds a graph per new key length (tens of ms), which
        # would swamp the uncached baseline, whose prefix grows by one token every step
        no_cudnn = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        with torch.autocast(device.type, dtype=torch.bfloat16), sdpa_kernel(no_cudnn):
            clock.sync()
            start = time.perf_counter()
            prior.generate(text, Sampling(top_k=64), generator=g)
            clock.sync()
            cached_s = time.perf_counter() - start
            # uncached: each step is a forward over the whole known prefix; time a few
            # spread over the image and extrapolate (a full run would dominate the budget)
            seq = torch.cat([text, image], dim=1)
            lengths = [layout.text_len + int(i) for i in torch.linspace(0, layout.image_len - 1, shape["probes"])]
            clock.sync()
            start = time.perf_counter()
            with torch.no_grad():
                for end in lengths:
                    logits = prior.image_head(prior.hidden(seq[:, :end])[:, -1]).float()
                    torch.multinomial(logits.softmax(-1), 1, generator=g)
            clock.sync()
            per_step = (time.perf_counter() - start) / len(lengths)
        out[name] = {
            "cached_full_image_s": round(cached_s, 3),
            "cached_tokens_per_s": round(layout.image_len / cached_s, 1),
            "uncached_est_full_image_s": round(per_step * layout.image_len, 3),
            "uncached_tokens_per_s": round(1 / per_step, 1),
            "cache_speedup": round(per_step * layout.image_len / cached_s, 1),
            "uncached_note": f"{len(lengths)} steps timed at evenly spread prefixes, extrapolated",
            "sdpa_backends": "flash, mem-efficient, math (cuDNN off)",
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU (no timings of kernels)")
    parser.add_argument("--budget", type=float, default=200.0, help="seconds after which remaining sections are skipped")
    parser.add_argument("--out", help="also write the JSON here, after every section (survives a timeout)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")  # CPU smoke: eager on purpose
    on_gpu = torch.cuda.is_available() and not args.cpu_smoke
    if not on_gpu and not args.cpu_smoke:
        print(json.dumps({"skipped": "no CUDA device; run with --cpu-smoke to exercise the script on CPU"}))
        return 0
    if not on_gpu:
        torch.set_num_threads(1)  # tiny shapes: extra threads only spin on a shared machine
    device = torch.device("cuda" if on_gpu else "cpu")
    shape = SHAPES["gpu" if on_gpu else "cpu-smoke"]
    clock = Clock(device)
    report: dict = {
        "device": torch.cuda.get_device_name(device) if on_gpu else "cpu (smoke)",
        "torch": torch.__version__,
        "shape": {"text_len": shape["layout"].text_len, "grid": shape["layout"].grid, "seq_len": shape["layout"].seq_len,
                  "batch": shape["batch"], "heads": shape["heads"], "head_dim": shape["head_dim"], "dtype": "bf16"},
    }
    t0 = time.perf_counter()
    sections = {
        "kernels": lambda: check_kernels(shape, device, clock, on_gpu, deadline=t0 + 0.6 * args.budget),
        "train_step": lambda: train_step(shape, device, clock, on_gpu),
        "sampling": lambda: sampling_speed(shape, device, clock),
    }
    ok = True
    for name, section in sections.items():
        elapsed = time.perf_counter() - t0
        if elapsed > args.budget:
            report[name] = {"skipped": f"budget of {args.budget:.0f}s used ({elapsed:.0f}s)"}
            continue
        try:
            report[name] = section()
        except Exception as exc:  # report and go on: a partial result is still worth having
            ok = False
            report[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
        report[f"{name}_s"] = round(time.perf_counter() - t0 - elapsed, 1)
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(report, fh, indent=1)
    if on_gpu:
        report["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    report["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
