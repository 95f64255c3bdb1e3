"""Throughput of the image codecs at 64x64: encode, decode and training steps, images per second.

    .venv/bin/python benchmarks/codec_speed.py [--threads 2] [--batch-size 32]

Prints one JSON object with, per codec, images/s for ``encode``, ``decode`` and a
full training step (loss + backward + AdamW), plus wall and process-CPU seconds
per training image (CPU time stays meaningful on a machine shared with other jobs).
Both codecs use the same small CPU configuration (8x8 grid, 512 codes).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dalle_framework.plugins import registry

SMALL = dict(
    image_size=64, vocab_size=512, width=128, channel_mults=[1, 2], blocks_per_group=1,
    stem_downsample=4, stem_kernel=3, decoder_stem_width=256, loss="mse",
)


def timed(fn, repeats: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per call, after one warm-up call."""
    fn()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - wall) / repeats, (time.process_time() - cpu) / repeats


def measure(name: str, batch_size: int, repeats: int) -> dict:
    torch.manual_seed(0)
    codec = registry("codec").build({"name": name, "params": SMALL})
    images = torch.rand(batch_size, 3, 64, 64)
    opt = torch.optim.AdamW(codec.parameters(), lr=1e-3)

    def train_step():
        out = codec.loss(images, 100)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()

    train_wall, train_cpu = timed(train_step, repeats)
    codec.eval()
    tokens = codec.encode(images)
    enc_wall, _ = timed(lambda: codec.encode(images), repeats)
    dec_wall, _ = timed(lambda: codec.decode(tokens), repeats)
    return {
        "grid": list(codec.grid),
        "parameters": sum(p.numel() for p in codec.parameters()),
        "encode_images_per_s": round(batch_size / enc_wall, 1),
        "decode_images_per_s": round(batch_size / dec_wall, 1),
        "train_images_per_s": round(batch_size / train_wall, 1),
        "train_cpu_ms_per_image": round(1000 * train_cpu / batch_size, 2),
    }


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = {
        "threads": args.threads,
        "batch_size": args.batch_size,
        "params": SMALL,
        "codecs": {name: measure(name, args.batch_size, args.repeats) for name in ("gumbel-dvae", "vq-vae")},
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
