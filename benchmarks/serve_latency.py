"""Latency of `dalle serve` on a trained run, through the app in-process; prints one JSON object.

For each request size (candidates, keep), posts ``--repeats`` jobs one after another and
reports seconds from ``POST /generate`` until ``GET /jobs/{id}`` says done (median and
min), the same for ``Pipeline.generate`` called directly (the server's overhead is the
difference), and how many distinct progress values a client polling every 50 ms saw.

    .venv/bin/python benchmarks/serve_latency.py runs/shapes-demo [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from dalle_framework.pipeline import Pipeline
from dalle_framework.serve import Limits, create_app

SIZES = [(4, 4), (16, 4), (64, 8)]
CAPTION = "a green square in the top left"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run directory (codec and prior trained)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=3, help="jobs per request size")
    parser.add_argument("--device", default=None, help="cpu, cuda (default: the recipe's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from fastapi.testclient import TestClient

    pipe = Pipeline.load(args.run, device=args.device)
    results = []
    with TestClient(create_app(pipe, Limits())) as client:
        for candidates, keep in SIZES:
            served, direct, seen = [], [], []
            for seed in range(args.repeats):
                body = {"caption": CAPTION, "candidates": candidates, "keep": keep, "seed": seed}
                start = time.perf_counter()
                job_id = client.post("/generate", json=body).json()["id"]
                progress = set()
                while (job := client.get(f"/jobs/{job_id}").json())["status"] not in ("done", "failed"):
                    progress.add(job["progress"]["done"])
                    time.sleep(0.05)
                assert job["status"] == "done", job["error"]
                served.append(time.perf_counter() - start)
                seen.append(len(progress))
                start = time.perf_counter()
                pipe.generate([CAPTION], candidates=candidates, keep=keep, seed=seed)
                direct.append(time.perf_counter() - start)
            results.append(
                {
                    "candidates": candidates,
                    "keep": keep,
                    "served_s_median": round(statistics.median(served), 3),
                    "served_s_min": round(min(served), 3),
                    "direct_s_median": round(statistics.median(direct), 3),
                    "direct_s_min": round(min(direct), 3),
                    "progress_values_seen_median": statistics.median(seen),
                }
            )
    print(
        json.dumps(
            {
                "run": args.run,
                "device": str(pipe.device),
                "threads": args.threads,
                "tokens_per_image": pipe.codec.tokens_per_image,
                "repeats": args.repeats,
                "sizes": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
