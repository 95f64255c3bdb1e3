"""Train the Fashion-MNIST judge with given settings and measure it on the real held-out split.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fashion_judge.py --set epochs=3 --set hidden=256

Prints one JSON object: the judge's settings (``JudgeConfig``, defaults unless set),
its accuracy on the 10,000 real held-out images (overall and per class), and the
training time, wall and CPU (all threads). Nothing is cached: every call trains.
Needs `apt-get install dataset-fashion-mnist`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch
import yaml

from dalle_data.fashion import LABELS, FashionMnistSource
from dalle_data.fashion_judge import FashionJudge, JudgeConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a JudgeConfig field (YAML value)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--tag", default="", help="a name for this measurement in the JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    fields = {f.name for f in dataclasses.fields(JudgeConfig)}
    changes = {}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in fields:
            parser.error(f"--set {key}: not a JudgeConfig field ({', '.join(sorted(fields))})")
        changes[key] = yaml.safe_load(value)
    config = JudgeConfig(**changes)
    source = FashionMnistSource(FashionMnistSource.Params(image_size=config.image_size))
    judge = FashionJudge.load_or_train(None, config, LABELS, source.split_tensors("train"), source.split_tensors("heldout"))
    print(json.dumps({"tag": args.tag, "threads": args.threads, "config": dataclasses.asdict(config), **judge.ceiling}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
