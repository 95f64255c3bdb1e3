"""The training loop end to end on tiny real components: train, resume, export, generate, evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dalle_framework import DalleError, UsageError
from dalle_framework import rundir as ckpt
from dalle_framework.data.batches import ShuffledBatches
from dalle_framework.pipeline import Pipeline
from dalle_framework.recipe import recipe_from_dict
from dalle_framework.train.loop import train_all, train_stage

CAPTION_WORDS = ["a", "in", "the", "red", "green", "blue", "circle", "square", "triangle", "top", "bottom", "left", "right", "center"]


def tiny_recipe(run_dir: Path, **changes) -> dict:
    recipe = {
        "name": "tiny",
        "seed": 1,
        "output_dir": str(run_dir),
        "device": "cpu",
        "data": {
            "name": "shapes",
            "params": {"image_size": 16, "colours": ["red", "green", "blue"], "samples_per_caption": 2, "heldout_samples_per_caption": 2},
        },
        "tokenizer": {"name": "words", "params": {"vocab": CAPTION_WORDS, "text_len": 8}},
        "codec": {
            "name": "gumbel-dvae",
            "params": {"image_size": 16, "vocab_size": 32, "width": 16, "channel_mults": [1, 1], "blocks_per_group": 1, "decoder_stem_width": 16},
            "train": {"steps": 6, "batch_size": 8, "lr": 1e-3, "ckpt_every": 3, "eval_every": 3, "eval_batches": 1},
        },
        "prior": {
            "name": "dense-transformer",
            "params": {"dim": 32, "depth": 1, "heads": 2},
            "train": {"steps": 4, "batch_size": 8, "lr": 1e-3, "eval_batches": 1},
        },
        "generate": {"candidates": 2, "keep": 1, "batch_size": 8},
        "evaluate": {"captions": 2, "candidates": 2, "batches": 1, "batch_size": 8},
    }
    for path, value in changes.items():
        node = recipe
        *parents, last = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return recipe


def weights(path: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_weights(path)


def test_shuffled_batches_resume_exactly_and_split_ranks():
    data = torch.arange(10)
    stream = ShuffledBatches([data], batch_size=4, seed=3)
    first = [next(stream)[0] for _ in range(3)]
    state = stream.state_dict()
    later = [next(stream)[0] for _ in range(4)]
    resumed = ShuffledBatches([data], batch_size=4, seed=3)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, next(resumed)[0]) for a in later)
    # every sample once per epoch (10 samples, batches of 4 straddle the epoch boundary)
    assert sorted(torch.cat(first)[:10].tolist()) == list(range(10))
    ranks = [ShuffledBatches([data], batch_size=5, seed=3, rank=r, world_size=2) for r in range(2)]
    a, b = (next(r)[0] for r in ranks)
    assert set(a.tolist()).isdisjoint(b.tolist()) and len(set(a.tolist()) | set(b.tolist())) == 10


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "model.safetensors"
    ckpt.save_weights(target, {"w": torch.ones(2)})
    with pytest.raises(DalleError, match=r"model.safetensors: could not be written \(crash mid-write\)"):
        with ckpt.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash mid-write")  # what torch's writer raises when the disk fails it
    assert torch.equal(ckpt.load_weights(target)["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_codec_stage_writes_run_dir_and_tensorboard(manager, tmp_path):
    pipe = Pipeline(recipe_from_dict(tiny_recipe(tmp_path / "run")))
    metrics = train_stage(pipe, "codec", progress=False)
    run = tmp_path / "run"
    assert {"psnr", "codebook_usage", "perplexity", "loss"} <= set(metrics)
    meta = json.loads((run / "codec" / "meta.json").read_text())
    assert meta["complete"] and meta["step"] == 6 and meta["component"] == "gumbel-dvae" and meta["plugin"] == "dvae"
    assert (run / "recipe.yaml").is_file() and (run / "codec" / "model.safetensors").is_file()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb" / "codec"))
    events.Reload()
    assert "train/loss" in events.Tags()["scalars"] and "eval/psnr" in events.Tags()["scalars"]
    assert "codec/preview" in events.Tags()["images"]
    assert {"speed/samples_per_s", "speed/step_seconds"} <= set(events.Tags()["scalars"])
    assert "train/optimizer_step" not in events.Tags()["scalars"]  # an engine's constant bookkeeping, not a curve
    assert "recipe/text_summary" in events.Tags()["tensors"]  # the resolved recipe, as text
    # the stored recipe is the resolved one: a pipeline loads from it alone
    loaded = Pipeline.load(run)
    assert loaded.recipe.codec.params.vocab_size == 32
    tokens = loaded.codec.encode(torch.rand(2, 3, 16, 16))
    assert tokens.shape == (2, loaded.codec.tokens_per_image)


def test_hflip_mirrors_about_half_of_a_batch_reproducibly(manager, tmp_path):
    pipe = Pipeline(recipe_from_dict(tiny_recipe(tmp_path / "run", **{"codec.train.hflip": True})))
    stage = pipe.stage("codec")
    images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    out = stage.augment([images], key=5)[0]
    mirrored = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, images)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, images)])
    assert bool((mirrored ^ kept).all()) and 16 < int(mirrored.sum()) < 48
    assert torch.equal(stage.augment([images], key=5)[0], out)  # the key decides, so resume replays it
    assert not torch.equal(stage.augment([images], key=6)[0], out)
    plain = Pipeline(recipe_from_dict(tiny_recipe(tmp_path / "plain"))).stage("codec")
    assert plain.augment([images], key=5)[0] is images


def test_resume_continues_exactly_where_it_stopped(manager, tmp_path):
    settings = {"codec.train.lr_schedule": "constant", "codec.train.hflip": True}
    full = Pipeline(recipe_from_dict(tiny_recipe(tmp_path / "full", **settings)))
    train_stage(full, "codec", progress=False)

    # the same run interrupted after 3 steps, then resumed with the full step count
    cut = tiny_recipe(tmp_path / "cut", **settings, **{"codec.train.steps": 3})
    train_stage(Pipeline(recipe_from_dict(cut)), "codec", progress=False)
    cut["codec"]["train"]["steps"] = 6
    resumed = Pipeline(recipe_from_dict(cut))
    train_stage(resumed, "codec", resume=True, progress=False)

    a, b = weights(tmp_path / "full" / "codec" / "model.safetensors"), weights(tmp_path / "cut" / "codec" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_ema_weights_are_exported(manager, tmp_path):
    pipe = Pipeline(recipe_from_dict(tiny_recipe(tmp_path / "run", **{"codec.train.ema": 0.9})))
    train_stage(pipe, "codec", progress=False)
    exported = weights(tmp_path / "run" / "codec" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in exported.values() if v.is_floating_point())


def test_train_all_then_generate_and_evaluate(manager, tmp_path):
    from dalle_framework.evaluation import evaluate_run

    pipe = Pipeline(recipe_from_dict(tiny_recipe(tmp_path / "run")))
    results = train_all(pipe, progress=False)
    assert set(results) == {"codec", "prior", "text"} and results["text"]["splits"]["train"]["unknown_share"] == 0
    assert "bits_per_image_token" in results["prior"]
    assert (tmp_path / "run" / "tokens" / "train.json").is_file() and (tmp_path / "run" / "tokens" / "train" / "000000.safetensors").is_file()

    again = train_all(Pipeline.load(tmp_path / "run"), progress=False)
    assert again == {"codec": {"reused": True}, "prior": {"reused": True}}

    loaded = Pipeline.load(tmp_path / "run")
    captions = ["a red circle in the top left", "a blue square in the center"]
    first = loaded.generate(captions, candidates=3, keep=2, seed=7)
    second = loaded.generate(captions, candidates=3, keep=2, seed=7)
    assert first.images.shape == (2, 2, 3, 16, 16)
    assert torch.equal(first.tokens, second.tokens)
    other = loaded.generate(captions, candidates=3, keep=2, seed=8)
    assert not torch.equal(first.tokens, other.tokens)

    report = evaluate_run(loaded, progress=False)
    assert report["codec"]["psnr"] > 0 and 0 < report["codec"]["codebook_usage"] <= 1
    assert report["prior"]["bits_per_image_token"] > 0
    generation = report["generation"]
    assert 0 <= generation["faithfulness_before_rerank"]["all"] <= 1
    assert Path(generation["grid"]).is_file()


def test_untrained_stage_is_a_clear_error(manager, tmp_path):
    pipe = Pipeline(recipe_from_dict(tiny_recipe(tmp_path / "run")))
    with pytest.raises(UsageError, match="codec is not trained yet"):
        pipe.generate(["a red circle in the top left"])


def test_changed_recipe_block_retrains_and_stale_checkpoint_is_not_resumed(manager, tmp_path):
    recipe = tiny_recipe(tmp_path / "run", **{"codec.train.log_every": 1})
    train_all(Pipeline(recipe_from_dict(recipe)), ["codec"], progress=False)
    assert train_all(Pipeline(recipe_from_dict(recipe)), ["codec"], progress=False) == {"codec": {"reused": True}}

    # other params: refused in the same run directory unless forced; then the finished stage
    # is not reused and its checkpoint is not resumed into the new shapes
    recipe["codec"]["params"]["vocab_size"] = 48
    with pytest.raises(UsageError, match=r"codec.params.vocab_size: 32 in the run, 48 now"):
        train_all(Pipeline(recipe_from_dict(recipe)), ["codec"], resume=True, progress=False)
    results = train_all(Pipeline(recipe_from_dict(recipe)), ["codec"], resume=True, force=True, progress=False)
    assert "psnr" in results["codec"]
    assert ckpt.load_weights(tmp_path / "run" / "codec" / "model.safetensors")["encoder.blocks.5.bias"].shape == (48,)

    # more steps with the same params: resumed from the last checkpoint, not restarted
    recipe["codec"]["train"]["steps"] = 8
    train_all(Pipeline(recipe_from_dict(recipe)), ["codec"], resume=True, progress=False)
    meta = json.loads((tmp_path / "run" / "codec" / "meta.json").read_text())
    assert meta["step"] == 8

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    newest = max((tmp_path / "run" / "tb" / "codec").glob("events.*"), key=lambda p: p.stat().st_mtime_ns)
    events = EventAccumulator(str(newest))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [7, 8]


def test_a_run_without_eval_every_is_evaluated_ten_times_and_the_prior_logs_tokens_per_second(manager, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = tiny_recipe(tmp_path / "run")
    recipe["codec"]["train"].pop("eval_every")
    recipe["codec"]["train"]["steps"] = 20
    recipe["prior"]["train"].update({"steps": 10, "log_every": 2})
    train_all(Pipeline(recipe_from_dict(recipe)), progress=False)
    codec = EventAccumulator(str(tmp_path / "run" / "tb" / "codec"))
    codec.Reload()
    assert [e.step for e in codec.Scalars("eval/psnr")] == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]  # the last: the final report
    prior = EventAccumulator(str(tmp_path / "run" / "tb" / "prior"))
    prior.Reload()
    assert all(e.value > 0 for e in prior.Scalars("speed/tokens_per_s"))
