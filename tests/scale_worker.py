"""Worker for the multi-rank training-loop tests: ``torchrun --nproc_per_node 2 tests/scale_worker.py TASK ARGS.json``.

Tasks (each writes ``OUT/<task>-rank{R}.json``):

- ``init``: build the recipe's stage as the training loop does (ZeRO-3 shards a model that
  initialises through ``Module.apply`` while it is built), then gather its weights on rank 0
  and save them (``OUT/init.safetensors``), with the peak RSS growth of every rank during
  that consolidation and a few numbers from each rank's random stream.
- ``timeout``: join the job with the recipe's ``distributed.timeout_minutes``; rank 1 sleeps,
  rank 0 waits in a barrier and reports how long it waited.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def peak_rss_reset() -> int:
    """Reset this process's peak resident set size (Linux) and return the current RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def task_init(args: dict, out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from dalle_framework import distributed
    from dalle_framework.pipeline import Pipeline
    from dalle_framework.recipe import recipe_from_dict
    from dalle_framework.train.loop import _Training

    pipe = Pipeline(recipe_from_dict(args["recipe"]))
    training = _Training(pipe, pipe.stage(args["stage"]), resume=False, force=True, progress=False)
    run, _ = training._prepare_engine()
    draws = torch.rand(4).tolist()
    before = peak_rss_reset()
    weights = run.full_state_dict(rank=0)
    growth = _status("VmHWM") - before
    rank = distributed.rank()
    if rank == 0:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "init.safetensors"))
    params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in run.module.parameters())
    (out / f"init-rank{rank}.json").write_text(json.dumps({"draws": draws, "rss_growth": growth, "params": params}))


def task_timeout(args: dict, out: Path) -> None:
    from dalle_framework import distributed

    distributed.set_timeout(args["timeout_minutes"])
    distributed.init_distributed(backend="gloo")
    rank = distributed.rank()
    if rank == 1:
        time.sleep(args["sleep"])
        (out / f"timeout-rank{rank}.json").write_text(json.dumps({"slept": args["sleep"]}))
        return
    started = time.monotonic()
    try:
        distributed.barrier()
        outcome = "passed"
    except Exception as exc:  # gloo raises when the barrier times out
        outcome = f"{type(exc).__name__}: {str(exc)[:200]}"
    (out / f"timeout-rank{rank}.json").write_text(json.dumps({"waited": time.monotonic() - started, "outcome": outcome}))


def main() -> None:
    task, args_file = sys.argv[1], Path(sys.argv[2])
    args = json.loads(args_file.read_text())
    {"init": task_init, "timeout": task_timeout}[task](args, Path(args["out"]))


if __name__ == "__main__":
    main()
