"""Train an image codec on real data for a step / time budget and measure held-out quality.

    .venv/bin/python benchmarks/codec_quality.py --codec gumbel-dvae \
        --params '{"image_size": 64, "vocab_size": 512, ...}' --steps 2000 --minutes 10

Prints one JSON object: held-out hard-token PSNR (argmax / nearest codes decoded,
pixels in [0, 1]; PSNR of the mean squared error over the whole split, and the mean
of per-image PSNRs), codebook usage and perplexity of the held-out tokens, the
steps done and the wall time. The loop is deliberately minimal and self-contained
(AdamW, linear warmup then cosine decay, optional weight EMA and horizontal flips) so
the benchmark runs without the framework's trainer.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from typing import Any, Optional

import torch

from dalle_framework.metrics import codebook_usage, psnr


def lr_at(step: int, *, lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warmup to ``lr`` over ``warmup`` steps, then half-cosine to ``lr * min_ratio`` at ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class WeightEMA:
    """EMA of parameters; buffers (e.g. a VQ codebook, itself an EMA) are copied from the live model."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay, self.updates = decay, 0
        self.model = copy.deepcopy(module).eval()

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        shadow, live = list(self.model.parameters()), [p.detach() for p in module.parameters()]
        torch._foreach_lerp_(shadow, live, 1 - decay)
        for shadow, live in zip(self.model.buffers(), module.buffers()):
            shadow.copy_(live)


def train(
    codec: torch.nn.Module,
    images: torch.Tensor,
    *,
    steps: Optional[int],
    minutes: Optional[float],
    batch_size: int,
    lr: float,
    warmup: int,
    ema: Optional[float] = None,
    weight_decay: float = 0.0,
    flip: bool = False,
    seed: int = 0,
    log_every: int = 0,
    device: str = "cpu",
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train on ``images`` (uint8 ``[N, 3, H, W]``). Returns (model to evaluate, log).

    With ``steps=None`` the step count is calibrated from the first 20 steps' speed
    so that training fills ``minutes``; ``minutes`` also stops training early.
    """
    assert steps is not None or minutes is not None, "give a step budget, a time budget, or both"
    gen = torch.Generator().manual_seed(seed)
    codec.to(device).train()
    opt = torch.optim.AdamW(codec.parameters(), lr=lr, weight_decay=weight_decay)
    shadow = WeightEMA(codec, ema) if ema else None
    data = images.to(device)
    total = steps if steps is not None else 10**9
    history: list[dict[str, float]] = []
    start, cpu_start, step = time.perf_counter(), time.process_time(), 0
    while step < total:
        idx = torch.randint(len(data), (batch_size,), generator=gen).to(device)
        batch = data[idx].float() / 255
        if flip:
            mask = (torch.rand(batch_size, generator=gen) < 0.5).to(device)
            batch = torch.where(mask[:, None, None, None], batch.flip(-1), batch)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr=lr, warmup=warmup, total=total)
        out = codec.loss(batch, step)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(codec.parameters(), 1.0)
        opt.step()
        if shadow is not None:
            shadow.update(codec)
        step += 1
        elapsed = time.perf_counter() - start
        if steps is None and step == 20:
            total = max(20, int(minutes * 60 / (elapsed / 20)))
        if log_every and (step % log_every == 0 or step == total):
            row = {k: round(float(v.detach() if torch.is_tensor(v) else v), 5) for k, v in out.items()}
            row.update(step=step, seconds=round(elapsed, 1))
            history.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        if minutes is not None and elapsed > minutes * 60:
            break
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    model = shadow.model if shadow is not None else codec
    return model.eval(), {"live": codec, "steps": step, "planned_steps": total, "train_seconds": round(seconds, 1), "train_cpu_seconds": round(cpu_seconds, 1), "history": history}


@torch.no_grad()
def evaluate(codec: torch.nn.Module, images: torch.Tensor, *, batch_size: int = 128, device: str = "cpu") -> dict[str, float]:
    """Hard-token reconstruction quality of uint8 ``images [N, 3, H, W]``."""
    codec.eval()
    recons, tokens, per_image = [], [], []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(device).float() / 255
        t = codec.encode(x)
        y = codec.decode(t).clamp(0, 1)
        tokens.append(t.cpu())
        recons.append(y.cpu())
        mse = ((y - x) ** 2).flatten(1).mean(1).clamp_min(1e-10)
        per_image += (-10 * torch.log10(mse)).tolist()
    x_all = images.float() / 255
    stats = codebook_usage(torch.cat(tokens), codec.vocab_size)
    return {
        "psnr": round(psnr(torch.cat(recons), x_all), 3),
        "psnr_mean_per_image": round(sum(per_image) / len(per_image), 3),
        "usage": round(stats["usage"], 4),
        "codes_used": int(stats["used"]),
        "perplexity": round(stats["perplexity"], 1),
        "images": len(images),
    }


def load_images(source_name: str, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from dalle_framework.data.images import load_split
    from dalle_framework.plugins import registry

    source = registry("data").build({"name": source_name, "params": {"image_size": image_size}})
    train_images, _ = load_split(source, "train", progress=False)
    held_images, _ = load_split(source, "heldout", progress=False)
    return train_images, held_images


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--codec", default="gumbel-dvae", help="registered codec name")
    ap.add_argument("--params", default="{}", help="codec params as JSON")
    ap.add_argument("--data", default="emoji", help="registered data source (needs train / heldout splits)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default: fill --minutes)")
    ap.add_argument("--minutes", type=float, default=None, help="wall-time budget for training")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ema", type=float, default=None, help="weight EMA decay for evaluation (off by default)")
    ap.add_argument("--flip", action="store_true", help="mirror half of each batch (cost ~0.4 dB on emoji, where codecs underfit)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (the target machine has 2 cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--log-every", type=int, default=0, help="print training losses to stderr every N steps")
    args = ap.parse_args(argv)
    if args.steps is None and args.minutes is None:
        args.minutes = 10.0

    from dalle_framework.plugins import registry

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    params = json.loads(args.params)
    codec = registry("codec").build({"name": args.codec, "params": params})
    train_images, held_images = load_images(args.data, codec.image_size)
    model, log = train(
        codec,
        train_images,
        steps=args.steps,
        minutes=args.minutes,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        ema=args.ema,
        flip=args.flip,
        seed=args.seed,
        log_every=args.log_every,
        device=args.device,
    )
    result = {
        "codec": args.codec,
        "params": codec.params.model_dump(),
        "grid": list(codec.grid),
        "train": {k: v for k, v in vars(args).items() if k not in ("codec", "params")},
        "parameters": sum(p.numel() for p in codec.parameters()),
        "steps": log["steps"],
        "train_seconds": log["train_seconds"],
        # process CPU time: robust to other jobs on the machine; with --threads 1 it is the free-machine wall time
        "train_cpu_seconds": log["train_cpu_seconds"],
        "threads": torch.get_num_threads(),
        "train_images": len(train_images),
        "heldout": evaluate(model, held_images, device=args.device),
        # spread over the split: sources list similar images together (emoji: all faces first)
        "train_subset": evaluate(model, train_images[:: max(1, len(train_images) // len(held_images))][: len(held_images)], device=args.device),
    }
    if args.ema:  # the live weights too, to show what the EMA adds
        result["heldout_live_weights"] = evaluate(log["live"], held_images, device=args.device)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
