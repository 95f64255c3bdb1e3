"""What evaluation costs on this machine: feature extraction per network, and a 10k-image evaluation.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/eval_cost.py [--threads 1] [--images 128]

Prints one JSON object:

- ``feature_networks``: images per second of each built-in feature network on 32x32 images
  (the demos' size): the shapes judge's measurements, the Fashion-MNIST judge's hidden layer,
  the shapes-demo reranker's image tower, and Inception-v3 (299x299 inputs). Speed does not
  depend on the weights, so every network has random weights here (nothing is downloaded).
- ``evaluation_10k``: the wall time of an evaluation that draws 10,000 candidates with the
  shapes-demo architecture (random weights, same cost as trained ones), measures judge and
  reranker features and computes FD, KID and precision/recall with their default intervals.
  Drawing is timed on ``--images`` candidates and scaled linearly to 10,000 (it is linear:
  fixed batches); the metrics are timed on 10,000 random feature rows of each network's width,
  except FD on Inception's 2048 dimensions, whose bootstrap is timed on a few resamples and
  scaled to the default 200. Every extrapolated number says so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

TARGET = 10_000


def _rate(fn, images: torch.Tensor, repeats: int = 2) -> float:
    fn(images[:2])  # warm up (first-call allocations)
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        fn(images)
        best = min(best, time.perf_counter() - started)
    return len(images) / best


def _random_run(root: Path):
    """The shapes-demo recipe with every stage holding random weights, as a run directory."""
    from dalle_framework import rundir
    from dalle_framework.pipeline import Pipeline
    from dalle_framework.recipe import dump, load_recipe

    recipe = load_recipe("shapes-demo", [f"output_dir={root}/{{name}}"])
    pipe = Pipeline(recipe)
    rundir.write_text(pipe.run_dir / rundir.RECIPE_FILE, dump(recipe))
    for name, stage in pipe.stages.items():
        torch.manual_seed(0)
        rundir.save_weights(pipe.run_dir / name / rundir.WEIGHTS_FILE, stage.build().state_dict())
    return Pipeline.load(pipe.run_dir)


def feature_rates(pipe, n: int) -> dict[str, dict]:
    from dalle_data.fashion_judge import JudgeConfig, JudgeNet
    from dalle_stages.inception import FidInception

    images = torch.rand(n, 3, 32, 32)
    reranker = pipe.component("reranker")
    judge = JudgeNet(image_size=32, width=JudgeConfig.width, classes=10, hidden=JudgeConfig.hidden).eval()
    inception = FidInception().eval()

    def fashion(x):
        with torch.no_grad():
            return judge.embed(x.mean(1, keepdim=True))

    def incept(x):
        with torch.no_grad():
            return inception(2 * torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1)

    small = max(4, n // 16)  # Inception is ~100x dearer: fewer images, the same method
    return {
        "shapes-judge (rules, 70-d)": {"images": n, "images_per_s": round(_rate(pipe.data.judge_features, images), 1)},
        "fashion-judge (hidden layer, 256-d)": {"images": n, "images_per_s": round(_rate(fashion, images), 1)},
        "reranker (shapes-demo CLIP, 64-d)": {"images": n, "images_per_s": round(_rate(reranker.image_features, images), 1)},
        "inception-v3 (299px, 2048-d)": {"images": small, "images_per_s": round(_rate(incept, images[:small], repeats=1), 2)},
    }


def draw_cost(pipe, n: int) -> dict:
    from dalle_framework.evaluation import Evaluation, draw

    evaluation = Evaluation(pipe)
    candidates = 16
    captions = pipe.data.captions("heldout")
    rounds = max(1, math.ceil(n / candidates / len(captions)))
    networks = {name: evaluation.network(name) for name in ("judge", "reranker")}
    started = time.perf_counter()
    draws = draw(pipe, captions, rounds=rounds, candidates=candidates, seed=0, networks=networks, progress=False)
    seconds = time.perf_counter() - started
    drawn = draws.units * draws.candidates
    return {"images": drawn, "seconds": round(seconds, 2), "images_per_s": round(drawn / seconds, 2),
            "includes": "sampling, decoding, reranking, judge verdicts, judge and reranker features"}


def metric_cost(dims: int, fd_resamples: int) -> dict:
    from dalle_framework.metrics import bootstrap_interval, frechet_distance, feature_statistics, kernel_inception_distance, neighbourhood_scores

    real, fake = torch.randn(TARGET, dims), torch.randn(TARGET, dims) + 0.1
    out = {}
    started = time.perf_counter()
    stats = feature_statistics(real)
    frechet_distance(*stats, *feature_statistics(fake))
    one = time.perf_counter() - started
    started = time.perf_counter()
    bootstrap_interval(lambda i: frechet_distance(*stats, *feature_statistics(fake[i])), TARGET, resamples=fd_resamples)
    per_resample = (time.perf_counter() - started) / fd_resamples
    out["fd_seconds"] = round(one + 200 * per_resample, 1)
    out["fd_note"] = f"1 FD + 200 bootstrap resamples ({'measured' if fd_resamples == 200 else f'{fd_resamples} timed, scaled to 200'})"
    started = time.perf_counter()
    kernel_inception_distance(real, fake)
    one = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(3):
        kernel_inception_distance(real, fake, subsets=5)
    out["kid_seconds"] = round(one + 200 * (time.perf_counter() - started) / 3, 1)
    out["kid_note"] = "100 subsets of 1000 + 200 resamples of 5 subsets (3 resamples timed, scaled to 200)"
    started = time.perf_counter()
    neighbourhood_scores(real, fake)
    out["prdc_seconds"] = round(time.perf_counter() - started, 1)
    out["prdc_note"] = "k=5 neighbourhoods of 10k x 10k; its intervals resample per-image values (negligible)"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--images", type=int, default=128, help="candidates drawn to time drawing (scaled to 10,000)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = _random_run(Path(tmp))
        rates = feature_rates(pipe, 256)
        drawing = draw_cost(pipe, args.images)
    metrics = {"judge (70-d)": metric_cost(70, 200), "reranker (64-d)": metric_cost(64, 200), "inception-v3 (2048-d)": metric_cost(2048, 3)}
    draw_10k = TARGET / drawing["images_per_s"]
    judged = sum(m["fd_seconds"] + m["kid_seconds"] + m["prdc_seconds"] for name, m in metrics.items() if "inception" not in name)
    inception = TARGET * 2 / rates["inception-v3 (299px, 2048-d)"]["images_per_s"] + sum(metrics["inception-v3 (2048-d)"][k] for k in ("fd_seconds", "kid_seconds", "prdc_seconds"))
    print(json.dumps({
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": args.threads,
                    "torch": torch.__version__, "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
                    "note": "the machine is shared: a load above 1 per core means other work slowed these timings"},
        "feature_networks": rates,
        "drawing": drawing,
        "metrics_on_10k": metrics,
        "evaluation_10k": {
            "candidates": TARGET,
            "draw_seconds": round(draw_10k, 1),
            "draw_note": f"extrapolated linearly from {drawing['images']} candidates",
            "metrics_seconds": round(judged, 1),
            "total_minutes": round((draw_10k + judged) / 60, 1),
            "with_inception_extra_minutes": round(inception / 60, 1),
            "inception_note": "features of 10k generated + 10k real images at the measured rate, plus FD/KID/PRDC on 2048-d",
        },
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
