"""Train a recipe's codec with the framework's own loop and measure held-out quality; A/B variants side by side.

    .venv/bin/python benchmarks/codec_quality.py emoji-vqvae-8x8 \
        --variant "codec.train.lr=2e-3" --variant "codec.train.lr=1e-3" codec.train.max_minutes=3

Each variant is the recipe plus the common overrides plus its own, trained by
exactly what ``dalle train RECIPE --stage codec`` runs (engine, schedule, EMA,
augmentation) into a fresh run directory, then measured as ``dalle evaluate
--stage codec`` measures: hard-token PSNR on the whole held-out split (mean of
per-image PSNR, and of the split's mean squared error), codebook usage and
perplexity. Prints one JSON object with a row per variant, in order.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch


def measure(recipe: str, overrides: list[str], run_dir: Path) -> dict[str, Any]:
    from dalle_framework.pipeline import Pipeline
    from dalle_framework.train.loop import train_stage

    pipe = Pipeline.from_recipe(recipe, [*overrides, f"output_dir={run_dir}"], device="cpu")
    started = time.monotonic()
    train_stage(pipe, "codec", force=True, progress=False)
    seconds = time.monotonic() - started
    stage = pipe.stage("codec")
    heldout = len(stage.columns("heldout")[0])
    cfg = pipe.recipe.evaluate.model_copy(update={"batches": 1, "batch_size": heldout})  # the whole split at once
    report = stage.report(pipe.component("codec"), pipe.device, cfg)
    meta = json.loads((run_dir / "codec" / "meta.json").read_text())
    return {
        "overrides": overrides,
        "psnr": round(report["psnr"], 3),
        "psnr_of_mean_mse": round(report["psnr_of_mean_mse"], 3),
        "codebook_usage": round(report["codebook_usage"], 4),
        "perplexity": round(report["perplexity"], 1),
        "heldout_images": report["images"],
        "steps": meta["step"],
        "stopped_early": meta.get("stopped_early", False),
        "train_seconds": round(seconds, 1),
    }


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("recipe", help="recipe name or file whose codec block is trained")
    ap.add_argument("overrides", nargs="*", help="key.path=value overrides common to every variant")
    ap.add_argument("--variant", action="append", default=[], help="one variant's own overrides, space-separated (repeatable)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (the target machine has 2 cores)")
    ap.add_argument("--runs", help="keep the run directories here (default: a temporary directory)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = [shlex.split(v) for v in args.variant] or [[]]
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.runs or scratch)
        rows = [measure(args.recipe, [*args.overrides, *own], root / f"variant-{i}") for i, own in enumerate(variants)]
    result = {"benchmark": "codec_quality", "recipe": args.recipe, "threads": args.threads, "variants": rows}
    json.dump(result, sys.stdout, indent=2)
    print()
    return result


if __name__ == "__main__":
    main()
