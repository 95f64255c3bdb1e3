"""Scale: the streaming data path under real processes (torchrun, gloo, 2 ranks, 2 DataLoader workers).

Every training sample once per epoch across ranks and workers, with uneven shards and with
fewer shards than ranks x workers; exact resume on the same ranks; resume on another number
of ranks drawing nothing twice.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow

WORKER = ROOT / "tests" / "stream_worker.py"


def torchrun(*args: str, nproc: int = 2, timeout: int = 600, cwd: Path = ROOT, env: dict | None = None, module: bool = False):
    from dalle_framework.distributed import free_port

    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port())]
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {})}
    command = [*launch, *(["-m", "dalle_framework"] if module else []), *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=full_env, timeout=timeout)


def write_uneven_shards(folder: Path, counts: list[int], size: int = 16) -> list[str]:
    """Real shapes images (PNG) in tar shards holding ``counts`` samples each; keys ``s{shard}-{i}``."""
    import io

    import webdataset as wds
    from PIL import Image

    from dalle_framework.plugins import PluginManager

    shapes = PluginManager().registry("data").build({"name": "shapes", "params": {"image_size": size, "samples_per_caption": 2}})
    samples = iter(shapes.samples("train"))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, count in enumerate(counts):
        path = folder / f"part-{shard:03d}.tar"
        with open(path, "wb") as stream:
            writer = wds.TarWriter(stream, encoder=False)
            for i in range(count):
                sample = next(samples)
                png = io.BytesIO()
                Image.fromarray(sample.image).save(png, format="PNG")
                writer.write({"__key__": f"s{shard}-{i:03d}", "png": png.getvalue(), "txt": sample.caption.encode()})
            writer.close()
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> list[str]:
    return write_uneven_shards(tmp_path_factory.mktemp("uneven"), [30, 30, 20, 10, 6])  # 96 samples


def stream(tmp_path: Path, name: str, *, urls, batches: int, batch_size: int, workers: int = 2, nproc: int = 2, **extra) -> list[list[list[str]]]:
    """Run the stream worker; returns per rank the keys of each batch."""
    out = tmp_path / name
    out.mkdir()
    args = out / "args.json"
    args.write_text(json.dumps({"urls": urls, "batches": batches, "batch_size": batch_size, "workers": workers, "out": str(out), **extra}))
    done = torchrun(str(WORKER), str(args), nproc=nproc)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def flat(batches: list[list[str]]) -> list[str]:
    return [key for batch in batches for key in batch]


def test_every_sample_once_per_epoch_across_ranks_and_workers(tmp_path, uneven):
    # 96 samples in shards of 30, 30, 20, 10, 6: each of 2 ranks x 2 workers reads 24 per epoch,
    # so 12 batches of 4 per rank are exactly one epoch
    ranks = stream(tmp_path, "a", urls=uneven, batches=24, batch_size=4)
    everything = sorted(f"s{s}-{i:03d}" for s, n in enumerate([30, 30, 20, 10, 6]) for i in range(n))
    epochs = [sorted(flat(ranks[0][e * 12 : (e + 1) * 12]) + flat(ranks[1][e * 12 : (e + 1) * 12])) for e in range(2)]
    assert epochs[0] == everything and epochs[1] == everything
    assert set(flat(ranks[0][:12])).isdisjoint(flat(ranks[1][:12]))
    assert flat(ranks[0][:12]) != flat(ranks[0][12:]), "each epoch is shuffled anew"
    # the same seed draws the same stream
    assert stream(tmp_path, "b", urls=uneven, batches=24, batch_size=4) == ranks


def test_one_shard_serves_more_ranks_x_workers_than_it_has_shards(tmp_path, uneven):
    # the 20-sample shard alone: 2 ranks x 2 workers each read 5 of it per epoch
    ranks = stream(tmp_path, "one", urls=[uneven[2]], batches=4, batch_size=5)
    for epoch in range(2):
        drawn = flat(ranks[0][epoch * 2 : epoch * 2 + 2]) + flat(ranks[1][epoch * 2 : epoch * 2 + 2])
        assert sorted(drawn) == sorted(f"s2-{i:03d}" for i in range(20))


def test_fewer_samples_than_ranks_is_refused_naming_the_counts(tmp_path):
    paths = write_uneven_shards(tmp_path / "tiny", [1])
    out = tmp_path / "refused"
    out.mkdir()
    args = out / "args.json"
    args.write_text(json.dumps({"urls": paths, "batches": 1, "batch_size": 1, "workers": 0, "out": str(out)}))
    done = torchrun(str(WORKER), str(args))
    assert done.returncode != 0 and "has 1 records in 1 shard(s), fewer than the 2 ranks" in done.stderr


def test_resume_on_the_same_ranks_continues_exactly(tmp_path, uneven):
    whole = stream(tmp_path, "whole", urls=uneven, batches=17, batch_size=4)
    saved = tmp_path / "state.json"
    stream(tmp_path, "first", urls=uneven, batches=5, batch_size=4, save=str(saved))
    rest = stream(tmp_path, "rest", urls=uneven, batches=12, batch_size=4, load=str(saved))
    assert [r[5:] for r in whole] == rest


def test_resume_on_one_rank_draws_nothing_twice(tmp_path, uneven):
    saved = tmp_path / "state.json"
    before = stream(tmp_path, "two", urls=uneven, batches=5, batch_size=4, save=str(saved))  # 40 of epoch 0 drawn
    (after,) = stream(tmp_path, "one", urls=uneven, batches=14, batch_size=4, load=str(saved), nproc=1)  # the other 56
    drawn = flat(before[0]) + flat(before[1]) + flat(after)
    everything = sorted(f"s{s}-{i:03d}" for s, n in enumerate([30, 30, 20, 10, 6]) for i in range(n))
    assert sorted(drawn) == everything


# ----------------------------------------------------------------------------- the training loop on 2 ranks


WORDS = ["a", "in", "the", "red", "green", "blue", "circle", "square", "triangle", "top", "bottom", "left", "right", "center"]
SCALE_WORKER = ROOT / "tests" / "scale_worker.py"


@pytest.fixture(scope="module")
def wds_shards(tmp_path_factory) -> dict:
    """Shapes written as webdataset shards: 123 training samples in 4 shards, 8 held out in one shard."""
    from dalle_framework.data import write_shards
    from dalle_framework.plugins import PluginManager

    shapes = PluginManager().registry("data").build(
        {"name": "shapes", "params": {"image_size": 16, "colours": ["red", "green", "blue"], "samples_per_caption": 3, "heldout_samples_per_caption": 2}}
    )
    return write_shards(shapes, tmp_path_factory.mktemp("wds"), max_per_shard=40, progress=False)


def wds_recipe(run_dir, shards: dict, **changes) -> dict:
    from test_train import tiny_recipe

    recipe = tiny_recipe(run_dir)
    recipe["data"] = {"name": "webdataset", "params": {"train_urls": shards["train"]["pattern"], "heldout_urls": shards["heldout"]["pattern"], "image_size": 16}}
    recipe["codec"]["train"].update({"num_workers": 2, "eval_batches": 2})
    recipe["prior"]["params"].update({"resid_dropout": 0.1, "caption_dropout": 0.2})  # randomness each rank draws for itself
    recipe["prior"]["train"].update({"steps": 24, "ckpt_every": 4, "eval_every": 8, "log_every": 1, "eval_batches": 2, "num_workers": 2})
    for path, value in changes.items():
        node = recipe
        *parents, last = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def codec_run(tmp_path_factory, wds_shards) -> Path:
    """A run directory whose codec is trained (one process, streamed with 2 workers)."""
    from dalle_framework.pipeline import Pipeline
    from dalle_framework.plugins import PluginManager, set_plugin_manager
    from dalle_framework.recipe import recipe_from_dict
    from dalle_framework.train.loop import train_stage

    run = tmp_path_factory.mktemp("codec-run") / "run"
    set_plugin_manager(PluginManager())
    try:
        train_stage(Pipeline(recipe_from_dict(wds_recipe(run, wds_shards))), "codec", progress=False)
    finally:
        set_plugin_manager(None)
    return run


def run_copy(codec_run: Path, tmp_path: Path, shards: dict, name: str = "run", **changes) -> tuple[Path, Path]:
    """A copy of the trained codec run under ``tmp_path``, with its recipe file."""
    import shutil

    run = tmp_path / name
    shutil.copytree(codec_run, run)
    recipe = wds_recipe(run, shards, **changes)
    return run, write_recipe(tmp_path / f"{name}.yaml", recipe)


def train_prior(recipe: Path, *extra: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """``dalle train RECIPE --stage prior`` on ``nproc`` ranks (torchrun), or in one plain process (its own exit code)."""
    args = ("train", str(recipe), "--stage", "prior", "--quiet", *extra)
    if nproc == 1:
        from conftest import run_cli

        return run_cli(*args, env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    return torchrun(*args, nproc=nproc, module=True)


def prior_weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "prior" / "model.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def two_rank_prior(codec_run, tmp_path_factory, wds_shards) -> Path:
    """The prior trained on 2 ranks x 2 workers, streamed, uninterrupted (torch engine, DDP)."""
    run, recipe = run_copy(codec_run, tmp_path_factory.mktemp("uninterrupted"), wds_shards)
    done = train_prior(recipe)
    assert done.returncode == 0, done.stderr[-3000:]
    return run


def kill_after_checkpoint(command: list[str], stage_dir: Path, env: dict, timeout: float = 300) -> None:
    """Start ``command`` in its own process group and kill -9 all of it once a checkpoint is written."""
    import signal
    import time

    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not (stage_dir / "resume.json").is_file():
            assert process.poll() is None, "training ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not (stage_dir / "meta.json").is_file(), "the run finished before it was killed"


def test_kill_9_of_a_two_rank_streamed_run_resumes_to_the_uninterrupted_weights(codec_run, two_rank_prior, tmp_path, wds_shards):
    from dalle_framework.distributed import free_port

    run, recipe = run_copy(codec_run, tmp_path, wds_shards)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               "-m", "dalle_framework", "train", str(recipe), "--stage", "prior", "--quiet"]
    kill_after_checkpoint(command, run / "prior", {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    resumed = train_prior(recipe, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(prior_weights(run), prior_weights(two_rank_prior))
    meta = json.loads((run / "prior" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == 24


def test_two_launchers_as_two_nodes_train_the_same_weights(codec_run, two_rank_prior, tmp_path, wds_shards):
    from dalle_framework.distributed import free_port

    run, recipe = run_copy(codec_run, tmp_path, wds_shards)
    port = str(free_port())
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
             "--master_addr", "127.0.0.1", "--master_port", port, "-m", "dalle_framework", "train", str(recipe), "--stage", "prior", "--quiet"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for node in range(2)
    ]
    outputs = [node.communicate(timeout=600) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[1][1][-2000:]
    assert_same_weights(prior_weights(run), prior_weights(two_rank_prior))


def test_nodes_that_do_not_share_the_run_directory_are_refused(codec_run, tmp_path, wds_shards):
    """Two launchers whose relative output_dir lands in different folders, as on nodes without a shared disk."""
    import shutil

    from dalle_framework.distributed import free_port

    recipe = wds_recipe("runs/not-shared", wds_shards)
    port = str(free_port())
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins"), os.environ.get("PYTHONPATH", "")])}
    nodes = []
    for node in range(2):
        home = tmp_path / f"node{node}"
        (home / "runs").mkdir(parents=True)
        shutil.copytree(codec_run, home / "runs" / "not-shared")
        path = write_recipe(home / "recipe.yaml", recipe)
        nodes.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
             "--master_addr", "127.0.0.1", "--master_port", port, "-m", "dalle_framework", "train", str(path), "--stage", "prior", "--quiet"],
            cwd=home, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    outputs = [node.communicate(timeout=600) for node in nodes]
    assert all(node.returncode != 0 for node in nodes)
    assert "need the run directory on a file system shared by all nodes" in outputs[1][1], outputs[1][1][-2000:]
    # Both launchers report the usage error's code; neither process dies in the interpreter's teardown (SIGABRT).
    assert all(re.search(r"exit ?code *: *2\b", err) for _, err in outputs), [err[-1500:] for _, err in outputs]
    assert not (tmp_path / "node0" / "runs" / "not-shared" / "prior" / "state").exists()


def test_held_out_figures_do_not_depend_on_the_world_size(two_rank_prior, manager):
    import math

    from dalle_framework.pipeline import Pipeline

    pipe = Pipeline.load(two_rank_prior)
    stage = pipe.stage("prior")
    alone = stage.evaluate(pipe.component("prior"), pipe.device)  # this process evaluates every held-out batch
    on_two = json.loads((two_rank_prior / "prior" / "meta.json").read_text())["metrics"]  # each rank its share, summed
    assert {k: round(v, 5) for k, v in alone.items()} == {k: round(v, 5) for k, v in on_two.items()}
    assert math.isfinite(alone["bits_per_image_token"])


def test_every_rank_encodes_its_own_shards_and_the_tokens_hold_every_sample_once(codec_run, tmp_path, wds_shards):
    from safetensors.torch import load_file

    def tokens(run: Path) -> dict:
        manifest = json.loads((run / "tokens" / "train.json").read_text())
        files = [run / "tokens" / "train" / entry["file"] for entry in manifest["shards"]]
        return {"manifest": manifest, "shards": [load_file(f) for f in files]}

    two, _ = run_copy(codec_run, tmp_path, wds_shards, "two")
    done = torchrun("data", "encode", str(two), module=True)
    assert done.returncode == 0, done.stderr[-3000:]
    one, _ = run_copy(codec_run, tmp_path, wds_shards, "one")
    done = torchrun("data", "encode", str(one), module=True, nproc=1)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = tokens(two), tokens(one)
    assert a["manifest"]["count"] == 123 == sum(len(s["image_tokens"]) for s in a["shards"])
    assert [s["count"] for s in a["manifest"]["shards"]] == [40, 40, 40, 3]
    for x, y in zip(a["shards"], b["shards"]):
        assert_same_weights(x, y)
    # an interrupted encode (one shard and the manifest missing) continues: only the missing shard is encoded
    folder = two / "tokens" / "train"
    (two / "tokens" / "train.json").unlink()
    (folder / "000001.safetensors").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    done = torchrun("data", "encode", str(two), module=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.name in kept} == kept
    assert_same_weights(load_file(folder / "000001.safetensors"), b["shards"][1])


def test_torch_engine_resumes_on_one_rank_after_two_and_says_the_global_batch_changed(codec_run, tmp_path, wds_shards):
    run, recipe = run_copy(codec_run, tmp_path, wds_shards, **{"prior.train.steps": 8})
    assert train_prior(recipe).returncode == 0
    longer = write_recipe(tmp_path / "longer.yaml", wds_recipe(run, wds_shards, **{"prior.train.steps": 12}))
    resumed = train_prior(longer, "--resume", nproc=1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "the global batch was 16 samples per optimizer step and is 8 now" in resumed.stderr
    assert "are cut anew" in resumed.stderr  # the data's remainder, redistributed to the one rank
    meta = json.loads((run / "prior" / "meta.json").read_text())
    assert meta["step"] == 12 and meta["world_size"] == 1


def test_deepspeed_zero3_streams_resumes_and_refuses_another_world_size(codec_run, tmp_path, wds_shards):
    engine = {"name": "deepspeed", "params": {"zero_stage": 3, "config": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}}}
    run, recipe = run_copy(codec_run, tmp_path, wds_shards, **{"prior.train.steps": 4, "prior.train.engine": engine})
    first = train_prior(recipe)
    assert first.returncode == 0, first.stderr[-3000:]
    more = write_recipe(tmp_path / "more.yaml", wds_recipe(run, wds_shards, **{"prior.train.steps": 6, "prior.train.engine": engine}))
    resumed = train_prior(more, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run / "prior" / "meta.json").read_text())["step"] == 6
    refused = train_prior(more, "--resume", "prior.train.steps=8", nproc=1)
    assert refused.returncode == 2
    assert "saved by 2 process(es), resumed by 1" in refused.stderr and "Traceback" not in refused.stderr


def test_logged_training_loss_is_the_mean_over_ranks(manager, tmp_path):
    """2 ranks x 4 samples draw the same 8 samples per step as 1 rank x 8: the logged loss is the whole batch's."""
    from test_distributed import scalars
    from test_train import tiny_recipe

    runs = {}
    for nproc, batch in ((2, 4), (1, 8)):
        run = tmp_path / f"run{nproc}"
        recipe = tiny_recipe(run)
        recipe["codec"]["train"]["steps"] = 2
        recipe["prior"]["train"].update({"steps": 3, "batch_size": batch, "log_every": 1})
        path = write_recipe(tmp_path / f"r{nproc}.yaml", recipe)
        torchrun("train", str(path), "--stage", "codec", "--quiet", nproc=1, module=True)
        done = torchrun("train", str(path), "--stage", "prior", "--quiet", nproc=nproc, module=True)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[nproc] = [value for _, value in scalars(run, "train/loss")]
    assert runs[2] == pytest.approx(runs[1], rel=1e-5)


def scale_task(task: str, tmp_path: Path, nproc: int = 2, **args) -> list[dict]:
    out = tmp_path / task
    out.mkdir()
    path = out / "args.json"
    path.write_text(json.dumps({"out": str(out), **args}))
    done = torchrun(str(SCALE_WORKER), task, str(path), nproc=nproc)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((out / f"{task}-rank{r}.json").read_text()) for r in range(nproc)]


@pytest.mark.parametrize("name", ["dense-transformer", "sparse-transformer"])
def test_zero3_builds_the_prior_sharded_with_the_plain_init_and_consolidates_on_rank_0_alone(manager, tmp_path, name):
    import torch
    from safetensors.torch import load_file

    from dalle_framework.pipeline import Pipeline
    from dalle_framework.recipe import recipe_from_dict
    from test_train import tiny_recipe

    recipe = tiny_recipe(tmp_path / "run")
    # 8 layers (so the depth-scaled init differs from the plain one by 4x), 6.3M parameters (25 MB)
    recipe["prior"] = {"name": name, "params": {"dim": 256, "depth": 8, "heads": 4}, "train": {
        "engine": {"name": "deepspeed", "params": {"zero_stage": 3, "config": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}}}}}
    if name == "sparse-transformer":
        recipe["prior"]["params"].update({"layers": ["row", "column", "row", "row"], "final_layer": "conv"})
    ranks = scale_task("init", tmp_path, recipe=recipe, stage="prior")
    sharded = load_file(tmp_path / "init" / "init.safetensors")

    torch.manual_seed(recipe["seed"] + 1)  # the prior stage's seed offset: the plain build in one process
    plain = Pipeline(recipe_from_dict(recipe)).stage("prior").build().state_dict()
    assert_same_weights({k: v.float() for k, v in plain.items()}, sharded)
    projections = [v for k, v in sharded.items() if k.endswith("attn.out.weight")]
    assert projections and all(abs(float(p.std()) - 0.02 / 4) < 0.001 for p in projections)  # std init_std / sqrt(2 * depth)

    model_bytes = 4 * ranks[0]["params"]
    assert ranks[0]["rss_growth"] > 0.5 * model_bytes, ranks  # rank 0 holds the consolidated copy (the allocator reuses some freed pages)
    assert ranks[1]["rss_growth"] < 0.25 * model_bytes, ranks  # rank 1: one parameter at a time, never the model
    # each rank draws its own dropout and noise; rank 0 draws what one process would
    assert ranks[0]["draws"] != ranks[1]["draws"]
    assert ranks[0]["draws"] == torch.rand(4).tolist()


def test_the_recipes_collective_timeout_reaches_the_process_group(tmp_path):
    rank0, _ = scale_task("timeout", tmp_path, timeout_minutes=0.05, sleep=20)
    assert rank0["outcome"] != "passed" and rank0["waited"] < 15, rank0


def test_two_ranks_fit_the_bpe_tokenizer_once(tmp_path):
    """Rank 0 fits and saves the BPE while the other rank waits, then loads it (before: both wrote one temp directory)."""
    from test_train import tiny_recipe

    run = tmp_path / "run"
    recipe = tiny_recipe(run)
    recipe["tokenizer"] = {"name": "bpe", "params": {"vocab_size": 300, "text_len": 8}}
    recipe["codec"]["train"]["steps"] = 2
    path = write_recipe(tmp_path / "bpe.yaml", recipe)
    done = torchrun("train", str(path), "--stage", "codec", "--quiet", module=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["stages"]["tokenizer"]["captions"] > 0 and (run / "tokenizer" / "tokenizer.json").is_file()
    assert not list(run.glob("tokenizer.tmp*"))
