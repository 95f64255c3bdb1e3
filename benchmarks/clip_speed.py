"""Speed of the `clip` reranker on this machine (CPU by default); prints one JSON object.

- training: image-caption pairs/s of loss + backward + AdamW step at batch 128;
- scoring: candidates/s of ``score()`` in chunks of ``batch_size`` (256) against the
  baseline of scoring one candidate per forward pass, in the same process.

Configs: ``shapes`` and ``emoji`` are the recipes' recommended tiny CLIPs; ``vit-b-32``
(scoring only, pretrained=None) shows what a full-size open_clip model costs here.

    .venv/bin/python benchmarks/clip_speed.py [--threads N] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dalle_framework.plugins import get_plugin_manager

CONFIGS = {
    "shapes": {
        "image": 32,
        "params": {
            "config": {
                "embed_dim": 64,
                "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
                "text_cfg": {"context_length": 16, "width": 64, "heads": 2, "layers": 2},
            }
        },
    },
    "emoji": {
        "image": 64,
        "params": {
            "config": {
                "embed_dim": 128,
                "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 128, "layers": 4},
                "text_cfg": {"context_length": 24, "width": 128, "heads": 4, "layers": 3},
            }
        },
    },
    "vit-b-32": {"image": 64, "params": {"model": "ViT-B-32"}, "train": False},
}
CAPTIONS = ["a red circle in the top left", "a blue square in the center", "grinning face with big eyes", "flag: Japan"]


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def bench(name: str, spec: dict, quick: bool) -> dict:
    registry = get_plugin_manager().registry("reranker")
    torch.manual_seed(0)
    model = registry.build({"name": "clip", "params": spec["params"]})
    out: dict = {"params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}
    size = spec["image"]
    if spec.get("train", True):
        batch = 128
        images, texts = torch.rand(batch, 3, size, size), [CAPTIONS[i % 4] for i in range(batch)]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            loss = model.loss(images, texts)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()

        seconds = timed(step, 2 if quick else 5)
        out["train_s_per_step_b128"] = round(seconds, 4)
        out["train_pairs_per_s"] = round(batch / seconds, 1)
    model.eval()
    n = 32 if quick or name == "vit-b-32" else 256
    images, texts = torch.rand(n, 3, size, size), [CAPTIONS[i % 4] for i in range(n)]
    batched = timed(lambda: model.score(images, texts), 2)
    model.params.batch_size = 1  # baseline: one candidate per forward pass
    single = timed(lambda: model.score(images, texts), 1)
    out.update(
        score_candidates=n,
        score_batched_per_s=round(n / batched, 1),
        score_one_at_a_time_per_s=round(n / single, 1),
        batched_speedup=round(single / batched, 2),
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: fair on a shared 2-core box)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, skip ViT-B-32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = [n for n in CONFIGS if not (args.quick and n == "vit-b-32")]
    result = {"device": "cpu", "threads": args.threads, "torch": torch.__version__}
    result.update({name: bench(name, CONFIGS[name], args.quick) for name in names})
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
