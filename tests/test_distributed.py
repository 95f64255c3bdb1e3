"""Two-process DeepSpeed ZeRO-2 and ZeRO-3 training of a tiny prior on CPU (gloo), through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from test_train import tiny_recipe

pytestmark = pytest.mark.slow


def torchrun(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    from dalle_framework.distributed import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "dalle_framework", *args]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


def scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) pairs from every event file of the prior's TensorBoard directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pairs = []
    for path in sorted((run / "tb" / "prior").glob("events.*")):
        events = EventAccumulator(str(path))
        events.Reload()
        pairs += [(e.step, e.value) for e in events.Scalars(tag)]
    return sorted(pairs)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_deepspeed_two_processes_train_resume_and_load(manager, tmp_path, zero_stage):
    from dalle_framework.pipeline import Pipeline
    from dalle_framework.recipe import recipe_from_dict
    from dalle_framework.train.loop import train_stage

    run = tmp_path / "run"
    recipe = tiny_recipe(run)
    recipe["prior"]["train"].update(
        {"steps": 30, "lr": 3e-3, "lr_schedule": "constant", "log_every": 1, "eval_every": 10, "ckpt_every": 10, "engine": {"name": "deepspeed", "params": {"zero_stage": zero_stage}}}
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    train_stage(Pipeline(recipe_from_dict(recipe)), "codec", progress=False)  # stage 1 in this process

    first = torchrun("train", str(path), "--stage", "prior", "--quiet")
    assert first.returncode == 0, first.stderr[-3000:]
    meta = json.loads((run / "prior" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == 30
    losses = [value for _, value in scalars(run, "train/loss")]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses

    resumed = torchrun("train", str(path), "prior.train.steps=40", "--stage", "prior", "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    meta = json.loads((run / "prior" / "meta.json").read_text())
    assert meta["step"] == 40
    steps = [step for step, _ in scalars(run, "train/loss")]
    assert steps == list(range(1, 41)), "the resumed run must continue at step 31, not start over"

    # consolidated weights load into a single-process pipeline and generate
    pipe = Pipeline.load(run)
    out = pipe.generate(["a red circle in the top left"], candidates=2, keep=1, seed=0)
    assert out.tokens.shape == (1, 2, pipe.codec.tokens_per_image)
    assert int(out.tokens.max()) < pipe.codec.vocab_size
