"""The README's multi-node commands, run for real on this machine: the deepspeed launcher with
``--module``, a hostfile with one launcher per node (``--no_ssh --node_rank``), the SLURM
script (srun stood in for by one bash loop: SLURM is not installed here; torchrun and the
training are real), and the paper's recipe, shrunk, starting on two ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from test_scale import torchrun, wds_shards  # noqa: F401  (a fixture)
from test_train import tiny_recipe

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent


def env(**extra) -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", **extra}


def tiny(tmp_path: Path) -> tuple[Path, Path]:
    run = tmp_path / "run"
    recipe = tiny_recipe(run)
    recipe["codec"]["train"]["steps"] = 4
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return run, path


def world_size(run: Path, stage: str = "codec") -> int:
    return json.loads((run / stage / "meta.json").read_text())["world_size"]


def test_deepspeed_launcher_runs_the_module(tmp_path):
    from dalle_framework.distributed import free_port

    run, recipe = tiny(tmp_path)
    done = subprocess.run(
        ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--module", "dalle_framework",
         "train", str(recipe), "--stage", "codec", "--quiet"],
        capture_output=True, text=True, cwd=ROOT, env=env(), timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert world_size(run) == 2


def test_a_hostfile_with_one_deepspeed_launcher_per_node(tmp_path):
    from dalle_framework.distributed import free_port

    run, recipe = tiny(tmp_path)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")  # two "nodes" of one process, both this machine
    port = str(free_port())
    nodes = [
        subprocess.Popen(
            ["deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node), "--master_addr", "127.0.0.1",
             "--master_port", port, "--module", "dalle_framework", "train", str(recipe), "--stage", "codec", "--quiet"],
            cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for node in range(2)
    ]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[1][-2000:]
    assert world_size(run) == 2


SRUN = """#!/usr/bin/env bash
# srun, stood in for on one machine: run the command once per node of the allocation, concurrently
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node "$@" & pids+=($!); done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""


def test_the_slurm_script_starts_one_torchrun_per_node(tmp_path):
    from dalle_framework.distributed import free_port

    run, recipe = tiny(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(SRUN)
    (bin_dir / "srun").chmod(0o755)
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "slurm.sbatch"), str(recipe), "--stage", "codec", "--quiet"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
        env=env(PATH=f"{bin_dir}{os.pathsep}{VENV_BIN}{os.pathsep}{os.environ['PATH']}", SLURM_NNODES="2", GPUS_PER_NODE="1",
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert world_size(run) == 2


def test_the_papers_recipe_starts_on_two_ranks_with_one_held_out_shard(tmp_path, wds_shards):  # noqa: F811
    """dalle-paper as it is (sparse prior under ZeRO-3 in bf16, EMA codec, one held-out shard), only smaller."""
    shrink = [
        f"output_dir={tmp_path / 'paper'}", "device=cpu",
        f"data.params.train_urls={wds_shards['train']['pattern']}", f"data.params.heldout_urls={wds_shards['heldout']['pattern']}",
        "data.params.image_size=16", "codec.params.image_size=16", "codec.params.vocab_size=32", "codec.params.width=16",
        "codec.params.channel_mults=[1,1]", "codec.params.blocks_per_group=1", "codec.params.decoder_stem_width=16",
        "codec.train.steps=2", "codec.train.batch_size=4", "prior.params.dim=32", "prior.params.depth=4", "prior.params.heads=2",
        "prior.params.head_dim=16", "prior.train.steps=2", "prior.train.batch_size=4", "prior.train.warmup_steps=1",
    ]
    for stage in ("codec", "prior"):
        done = torchrun("train", "dalle-paper", *shrink, "--stage", stage, "--quiet", module=True)
        assert done.returncode == 0, done.stderr[-3000:]
        assert world_size(tmp_path / "paper", stage) == 2
    meta = json.loads((tmp_path / "paper" / "prior" / "meta.json").read_text())
    assert meta["metrics"]["bits_per_image_token"] > 0
