"""How much a demo's figures move with the seed: the whole recipe trained and evaluated once per seed.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/demo_seeds.py [--recipe shapes-demo] [--seeds 0 1 2]
        [--root /tmp/seed-runs] [--out FILE] [override ...]

Each seed is a fresh ``dalle run RECIPE seed=S output_dir=ROOT/RECIPE-seed-S`` in its own process
(as ``scripts/demo.sh`` runs it; a run already finished is reused), so the seed moves everything
the recipe draws: the held-out split's renderings stay (the data source has its own seed), the
initial weights, the batches, dropout and the evaluation's draws change. Prints one JSON object:
per figure the value under each seed, their mean, min and max; and each seed's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("codec", "prior", "reranker", "generation")
SKIP = ("interval", "figures", "per_caption", "settings", "grid", "kid_std", "kid_subset_size", "images", "captions", "candidates")


def headline(report: dict) -> dict[str, float]:
    """The report's numbers a README table states: each section's numeric fields, and one level below
    for the generation's grouped ones (faithfulness_before_rerank.all, fd.judge...)."""
    out: dict[str, float] = {}
    for section in SECTIONS:
        for key, value in (report.get(section) or {}).items():
            if any(part in key for part in SKIP):
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{section}.{key}"] = float(value)
            elif isinstance(value, dict):
                out.update({f"{section}.{key}.{k}": float(v) for k, v in value.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return out


def run_seed(recipe: str, seed: int, root: Path, overrides: list[str]) -> tuple[dict, float]:
    run_dir = root / f"{recipe}-seed-{seed}"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dalle_framework", "run", recipe, f"seed={seed}", f"output_dir={run_dir}", *overrides, "-q"],
                   cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    seconds = time.perf_counter() - started
    return json.loads((run_dir / "eval" / "report.json").read_text()), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="shapes-demo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--root", type=Path, default=Path("/tmp/seed-runs"))
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("overrides", nargs="*", help="recipe overrides (key=value), applied to every seed")
    args = parser.parse_args()
    per_seed, seconds = {}, {}
    for seed in args.seeds:
        report, seconds[seed] = run_seed(args.recipe, seed, args.root, args.overrides)
        per_seed[seed] = headline(report)
    keys = sorted(set.intersection(*(set(v) for v in per_seed.values())))
    figures = {}
    for key in keys:
        values = [per_seed[s][key] for s in args.seeds]
        figures[key] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "by_seed": dict(zip(map(str, args.seeds), values))}
    result = {
        "recipe": args.recipe, "seeds": args.seeds, "overrides": args.overrides,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "omp_threads": os.environ.get("OMP_NUM_THREADS", "1")},
        "wall_seconds": {str(s): round(t, 1) for s, t in seconds.items()},
        "figures": figures,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
