"""What each pretrained codec costs on a CPU: tokens per image, encode / decode images per second.

    .venv/bin/python benchmarks/pretrained_codecs.py [--threads 2] [--batch-size 4] [--repeats 2] [--sizes 256,128,64]

Prints one JSON object: per codec and image size, images/s (wall clock) and process
CPU seconds per image (steadier than wall time on a machine shared with other jobs).
Every codec is built at its released shape with random
weights (speed does not depend on the weights): OpenAI's dVAE, taming's ImageNet
VQGAN f16 with 1024 and 16384 codes and the OpenImages Gumbel-VQ f8 with 8192
codes. Each convolutional codec also runs on smaller images (``--sizes``): the
grid shrinks with the image, which is how the emoji recipes afford them on a CPU.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dalle_framework.plugins import registry

F16 = dict(ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16], z_channels=256, embed_dim=256, resolution=256)
RELEASED = {
    "openai-dvae (8192 codes)": {"name": "openai-dvae", "params": {}},
    "vqgan imagenet f16-1024": {"name": "vqgan", "params": {**F16, "n_embed": 1024}},
    "vqgan imagenet f16-16384": {"name": "vqgan", "params": {**F16, "n_embed": 16384}},
    "vqgan openimages gumbel f8-8192": {
        "name": "vqgan",
        "params": {**F16, "ch_mult": [1, 1, 2, 4], "attn_resolutions": [32], "n_embed": 8192, "quantizer": "gumbel"},
    },
}


def per_call(fn, repeats: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per call, after one warm-up call."""
    fn()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - wall) / repeats, (time.process_time() - cpu) / repeats


def measure(block: dict, size: int, batch_size: int, repeats: int) -> dict:
    torch.manual_seed(0)
    codec = registry("codec").build({"name": block["name"], "params": {**block["params"], "image_size": size}}).eval()
    images = torch.rand(batch_size, 3, size, size)
    with torch.inference_mode():
        tokens = codec.encode(images)
        encode = per_call(lambda: codec.encode(images), repeats)
        decode = per_call(lambda: codec.decode(tokens), repeats)
    return {
        "image_size": size,
        "grid": list(codec.grid),
        "tokens_per_image": codec.tokens_per_image,
        "vocab_size": codec.vocab_size,
        "parameters_m": round(sum(p.numel() for p in codec.parameters()) / 1e6, 1),
        "encode_images_per_s": round(batch_size / encode[0], 2),
        "decode_images_per_s": round(batch_size / decode[0], 2),
        "encode_cpu_s_per_image": round(encode[1] / batch_size, 2),
        "decode_cpu_s_per_image": round(decode[1] / batch_size, 2),
    }


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--sizes", default="256,128,64", help="image sides to measure; the first is the released one")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    result = {
        "threads": args.threads,
        "batch_size": args.batch_size,
        "device": "cpu",
        "weights": "random (speed only)",
        "codecs": {label: [measure(block, size, args.batch_size, args.repeats) for size in sizes] for label, block in RELEASED.items()},
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
