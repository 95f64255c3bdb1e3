"""Speed of the transformer priors on this machine (CPU by default); prints one JSON object.

- training: tokens/s of forward + backward + AdamW step, dense vs sparse (paper layers);
- sampling: image tokens/s with the KV cache and without it (the uncached baseline
  recomputes the whole prefix every step), measured in the same process.

Shapes: ``small`` = 16 text + 8x8 image tokens; ``paper`` = 256 text + 32x32 image
tokens (the paper's sequence, at a small width). The uncached paper-shape baseline
would take minutes, so it times 8 uncached steps at evenly spread prefix lengths and
extrapolates to all 1024 steps; the JSON says so.

    .venv/bin/python benchmarks/prior_speed.py [--threads N] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dalle_framework import Sampling
from dalle_framework.plugins import get_plugin_manager

SHAPES = {
    "small": dict(text_len=16, grid=(8, 8), text_vocab=256, image_vocab=128, dim=128, depth=4, heads=4, batch=8),
    "paper": dict(text_len=256, grid=(32, 32), text_vocab=16384, image_vocab=8192, dim=128, depth=4, heads=4, batch=2),
}
PRIORS = {"dense": "dense-transformer", "sparse": "sparse-transformer"}


def build(prior_name: str, shape: dict):
    registry = get_plugin_manager().registry("prior")
    torch.manual_seed(0)
    params = dict(dim=shape["dim"], depth=shape["depth"], heads=shape["heads"])
    return registry.build(
        {"name": prior_name, "params": params},
        text_vocab_size=shape["text_vocab"], text_len=shape["text_len"],
        image_vocab_size=shape["image_vocab"], grid=shape["grid"],
    )


def batch(shape: dict, rows: int):
    g = torch.Generator().manual_seed(0)
    n = shape["grid"][0] * shape["grid"][1]
    text = torch.randint(1, shape["text_vocab"], (rows, shape["text_len"]), generator=g)
    text[:, shape["text_len"] // 2 :] = 0  # half padding, as real captions have
    return text, torch.randint(0, shape["image_vocab"], (rows, n), generator=g)


def train_speed(prior, shape: dict, steps: int) -> dict:
    text, image = batch(shape, shape["batch"])
    opt = torch.optim.AdamW(prior.parameters(), lr=1e-4)
    prior.train()

    def step():
        loss = prior.loss(text, image)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up (allocations, mask construction)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    tokens = shape["batch"] * (shape["text_len"] + image.shape[1])
    return {"step_s": round(seconds, 4), "tokens_per_s": round(tokens / seconds, 1), "batch": shape["batch"]}


def sample_speed(prior, shape: dict, *, use_cache: bool, rows: int, probes: int | None = None) -> dict:
    """Image tokens/s of ``generate``; with ``probes`` (uncached only) estimated, see below."""
    text, image = batch(shape, rows)
    n = image.shape[1]
    sampling = Sampling(use_cache=use_cache, top_k=32)
    prior.eval()
    g = torch.Generator().manual_seed(0)
    if probes:
        # one uncached step = a forward over the whole known prefix (what generate() runs);
        # time `probes` steps at evenly spread prefix lengths and extrapolate to all n steps
        seq = torch.cat([text, image], dim=1)
        lengths = [text.shape[1] + int(i) for i in torch.linspace(0, n - 1, probes)]
        start = time.perf_counter()
        with torch.no_grad():
            for end in lengths:
                logits = prior.image_head(prior.hidden(seq[:, :end])[:, -1])
                torch.multinomial(logits.softmax(-1), 1, generator=g)
        per_token = (time.perf_counter() - start) / probes
        return {
            "image_tokens_per_s": round(rows / per_token, 2),
            "rows": rows,
            "estimated": f"timed {probes} uncached steps at evenly spread prefix lengths, extrapolated to {n} steps",
            "est_full_image_s": round(per_token * n, 1),
        }
    start = time.perf_counter()
    prior.generate(text, sampling, generator=g)
    seconds = time.perf_counter() - start
    return {"image_tokens_per_s": round(rows * n / seconds, 1), "rows": rows, "full_image_s": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the cores here are shared; a second thread mostly spins)")
    parser.add_argument("--quick", action="store_true", help="small shape only (a smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report: dict = {"device": "cpu", "threads": args.threads, "torch": torch.__version__, "shapes": {}}
    t0 = time.perf_counter()
    for shape_name, shape in SHAPES.items():
        if args.quick and shape_name != "small":
            continue
        paper = shape_name == "paper"
        entry: dict = {k: v for k, v in shape.items() if k != "batch"}
        entry["seq_len"] = shape["text_len"] + shape["grid"][0] * shape["grid"][1]
        for label, prior_name in PRIORS.items():
            prior = build(prior_name, shape)
            result = {"params": sum(p.numel() for p in prior.parameters())}
            result["train"] = train_speed(prior, shape, steps=2 if paper else 5)
            cached = sample_speed(prior, shape, use_cache=True, rows=1 if paper else 4)
            uncached = sample_speed(prior, shape, use_cache=False, rows=1 if paper else 4, probes=8 if paper else None)
            result["sample_cached"], result["sample_uncached"] = cached, uncached
            result["cache_speedup"] = round(cached["image_tokens_per_s"] / uncached["image_tokens_per_s"], 1)
            if hasattr(prior, "layer_patterns"):
                result["layers"] = prior.layer_patterns()
            entry[label] = result
        report["shapes"][shape_name] = entry
    report["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
