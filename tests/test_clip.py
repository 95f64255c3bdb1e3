"""The `clip` reranker (plugins/dalle_clip) on real open_clip models and real data.

Tiny configs keep the default run fast; the trained models come from a few
dozen to a few hundred real optimizer steps on the shapes and emoji sources.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from dalle_framework import Reranker, UsageError
from dalle_framework.rundir import save_weights
from dalle_framework.plugins import PluginManager

# 32x32 images in 8x8 patches, 16 text tokens: ~3.4M parameters (3.2M of them the BPE embedding).
TINY = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 16, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def registries():
    manager = PluginManager()
    return manager.registry("reranker"), manager.registry("data")


def build(registry, **params) -> Reranker:
    torch.manual_seed(0)  # the same initial weights in every run
    return registry.build({"name": "clip", "params": {"config": TINY, **params}})


def to_float(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 HWC arrays -> float ``[B,3,H,W]`` in [0,1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


def train(
    model: Reranker, images: torch.Tensor, captions: list[str], *, steps: int, batch_size: int, lr: float = 1e-3, warmup: int = 10, seed: int = 0
) -> list[float]:
    """AdamW, linear warmup then cosine decay to lr/10 (as the training loop), on random batches; returns the losses."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randperm(len(images), generator=generator)[:batch_size]
        out = model(images[idx], [captions[i] for i in idx])  # forward == loss, as engines call it
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        sched.step()
        losses.append(float(out["loss"].detach()))
    model.eval()
    return losses


@pytest.fixture(scope="module")
def shapes(registries):
    """The shapes source at 32x32, with its train split as tensors."""
    src = registries[1].build({"name": "shapes", "params": {"image_size": 32}})
    samples = list(src.samples("train"))
    return src, to_float([s.image for s in samples]), [s.caption for s in samples]


@pytest.fixture(scope="module")
def shapes_clip(registries, shapes):
    """The tiny CLIP after 150 steps (batch 64) on the shapes train split (~10 s)."""
    _, images, captions = shapes
    model = build(registries[0])
    losses = train(model, images, captions, steps=150, batch_size=64)
    return model, losses


# --------------------------------------------------------------------------- registration and params


def test_registered_as_clip(registries):
    cls = registries[0].get("clip")
    assert issubclass(cls, Reranker) and cls.plugin == "clip"
    for name, field in cls.Params.model_fields.items():
        assert field.description, f"param {name} needs a description"


def test_plugin_import_does_not_import_open_clip():
    # open_clip costs seconds to import; the CLI imports every plugin on start.
    code = "import sys, dalle_clip; assert 'open_clip' not in sys.modules, 'open_clip imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize(
    "params, message",
    [
        ({}, "exactly one of `model`"),
        ({"model": "ViT-B-32", "config": TINY}, "not both"),
        ({"model": "ViT-B-23"}, "did you mean 'ViT-B-32'"),
        ({"config": {"embed_dim": 8, "vision_cfg": {}}}, "config needs text_cfg"),
        ({"config": {**TINY, "vision_cfg": {**TINY["vision_cfg"], "patches": 4}}}, "config.vision_cfg has unknown"),
        ({"config": {**TINY, "text_cfg": {**TINY["text_cfg"], "vocab_size": 1000}}}, "vocab_size is 1000"),
        ({"config": {**TINY, "text_cfg": {**TINY["text_cfg"], "hf_model_name": "bert"}}}, "hf_model_name"),
        ({"config": TINY, "batch_size": 0}, "greater than or equal to 1"),
        ({"config": TINY, "weigths": "x.pt"}, "Extra inputs are not permitted"),
    ],
)
def test_params_validation(registries, params, message):
    with pytest.raises(ValidationError, match=re.escape(message)):
        registries[0].validate_params("clip", params)


def test_config_vocab_defaults_to_bpe(registries):
    params = registries[0].validate_params("clip", {"config": TINY})
    assert params.config["text_cfg"]["vocab_size"] == 49408


def test_a_config_that_built_is_remembered_and_a_broken_one_never(registries, tmp_path, monkeypatch):
    """Building a custom config on the meta device needs torch; a config that built (with these open_clip and
    torch versions) is not built again, so checking it later imports neither. One that fails is never kept."""
    import dalle_clip.params as clip_params

    monkeypatch.setenv("DALLE_CACHE_DIR", str(tmp_path / "cache"))
    builds = []
    real = clip_params._check_builds
    monkeypatch.setattr(clip_params, "_check_builds", lambda config: (builds.append(config), real(config)))
    too_big_patch = {**TINY, "vision_cfg": {**TINY["vision_cfg"], "patch_size": 64}}
    for _ in range(2):
        registries[0].validate_params("clip", {"config": TINY})
        with pytest.raises(ValidationError, match="does not build an open_clip CLIP"):
            registries[0].validate_params("clip", {"config": too_big_patch})
    assert len(builds) == 3  # TINY once, the broken one each time
    remembered = json.loads((tmp_path / "cache" / clip_params.BUILT_FILE).read_text())
    assert remembered == [clip_params._build_key(registries[0].validate_params("clip", {"config": TINY}).config)]
    (tmp_path / "cache" / clip_params.BUILT_FILE).write_text("[not json")  # damaged: checked again, then rewritten
    registries[0].validate_params("clip", {"config": TINY})
    assert len(builds) == 4 and len(json.loads((tmp_path / "cache" / clip_params.BUILT_FILE).read_text())) == 1


# --------------------------------------------------------------------------- score / loss contract


def test_score_shape_range_and_device(registries):
    model = build(registries[0]).eval()
    images = torch.rand(5, 3, 48, 40)  # any size: resized to the model's 32x32
    scores = model.score(images, ["a red circle", "a blue square", "x", "", "a very long caption " * 20])
    assert scores.shape == (5,) and scores.dtype == torch.float32 and scores.device == images.device
    assert torch.isfinite(scores).all() and (scores.abs() <= 1 + 1e-5).all()
    assert model.score(torch.rand(0, 3, 32, 32), []).shape == (0,)
    with pytest.raises(AssertionError, match="2 images but 1 captions"):
        model.score(torch.rand(2, 3, 32, 32), ["one"])
    with pytest.raises(AssertionError, match="float"):
        model.score(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), ["x"])


def test_batched_scoring_equals_unbatched(registries):
    torch.manual_seed(0)
    small = build(registries[0], batch_size=3).eval()
    large = build(registries[0], batch_size=64).eval()
    large.load_state_dict(small.state_dict())
    images = torch.rand(7, 3, 32, 32)
    texts = [f"a caption number {i}" for i in range(7)]
    torch.testing.assert_close(small.score(images, texts), large.score(images, texts), atol=1e-5, rtol=0)
    one_by_one = torch.cat([large.score(images[i : i + 1], texts[i : i + 1]) for i in range(7)])
    torch.testing.assert_close(one_by_one, large.score(images, texts), atol=1e-5, rtol=0)


def test_loss_terms_and_gradients(registries):
    model = build(registries[0])
    texts = ["a red circle", "a blue square", "a red circle", "a green triangle"]
    out = model.loss(torch.rand(4, 3, 32, 32), texts)
    assert set(out) == {"loss", "i2t_acc", "t2i_acc", "logit_scale"}
    assert out["loss"].ndim == 0 and out["loss"].requires_grad
    assert 0 <= float(out["i2t_acc"]) <= 1 and 0 <= float(out["t2i_acc"]) <= 1
    assert float(out["logit_scale"]) == pytest.approx(1 / 0.07, rel=1e-4)
    out["loss"].backward()
    for name in ("visual.conv1.weight", "token_embedding.weight", "text_projection", "logit_scale"):
        grad = dict(model.clip.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, f"no gradient reaches {name}"


@pytest.mark.debian_data("emoji")
def test_forty_steps_on_real_emoji_separate_matched_from_mismatched(registries):
    # Eight real Noto emoji (64x64, resized to the model's 32x32) with their CLDR names.
    src = registries[1].build({"name": "emoji", "params": {"image_size": 64}})
    first = {}  # the first emoji of each subgroup: faces, cats, hearts, hands... (skin tones alone are too subtle)
    for sample in itertools.islice(src.samples("train"), 400):
        first.setdefault(sample.meta["subgroup"], sample)
    samples = list(first.values())[::2][:8]
    images, captions = to_float([s.image for s in samples]), [s.caption for s in samples]
    assert len(set(captions)) == 8
    model = build(registries[0])
    before = model.eval().score(images, captions)
    losses = train(model, images, captions, steps=40, batch_size=8)
    assert losses[-1] < 0.5 * losses[0], losses
    assert not torch.allclose(before, model.score(images, captions))
    # every caption prefers its own image over each of the other seven
    for i, caption in enumerate(captions):
        scores = model.score(images, [caption] * len(images))
        assert scores.argmax() == i, (caption, scores)


# --------------------------------------------------------------------------- reranking and retrieval (shapes)


def test_training_on_shapes_lowers_loss(shapes_clip):
    _, losses = shapes_clip
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10]), (losses[:10], losses[-10:])


def rerank_hits(model: Reranker, src, near_misses: tuple[str, ...], *, per_combo: int = 2, seed: int = 0) -> float:
    """Share of held-out (never trained) combinations whose true rendering scores first among 16 candidates.

    Candidates: the truth, near misses that change one attribute in ``near_misses``
    (``colour``, ``shape``, ``position``), and random renderings differing in one of those.
    """
    rng = np.random.default_rng(seed)
    p = src.params
    values = {"colour": p.colours, "shape": p.shapes, "position": p.positions}
    keys = ("colour", "shape", "position")
    picked, trials = 0, 0
    for truth in src.combos["heldout"]:
        for _ in range(per_combo):
            candidates = [truth]
            for attr in near_misses:
                k = keys.index(attr)
                for value in rng.permutation([v for v in values[attr] if v != truth[k]])[:2]:
                    candidates.append(tuple(value if j == k else truth[j] for j in range(3)))
            while len(candidates) < 16:
                other = tuple(rng.choice(values[a]) for a in keys)
                if any(other[keys.index(a)] != truth[keys.index(a)] for a in near_misses):
                    candidates.append(other)
            images = to_float([src.render(*c, size=rng.uniform(0.85, 1.15)) for c in candidates])
            scores = model.score(images, [f"a {truth[0]} {truth[1]} in the {truth[2]}"] * len(images))
            picked += int(scores.argmax() == 0)
            trials += 1
    return picked / trials


def test_reranking_picks_the_right_colour_and_shape_among_distractors(shapes, shapes_clip):
    # Colour and shape are learned within ~100 steps; position takes longer (see the slow test).
    rate = rerank_hits(shapes_clip[0], shapes[0], ("colour", "shape"))
    assert rate >= 0.9, f"right image ranked first in {rate:.0%}"


@pytest.mark.slow
def test_recommended_shapes_recipe_reranks_near_misses_and_retrieves(registries, shapes):
    """The recipe's reranker settings (400 steps, batch 128, lr 1e-3): every attribute, held-out captions (~1 min)."""
    src, images, captions = shapes
    model = build(registries[0])
    train(model, images, captions, steps=400, batch_size=128, warmup=30)
    rate = rerank_hits(model, src, ("colour", "shape", "position"), per_combo=4)
    assert rate >= 0.9, f"right image ranked first in {rate:.0%}"
    held = list(src.samples("heldout"))
    metrics = model.retrieval_metrics(to_float([s.image for s in held]), [s.caption for s in held])
    assert metrics["i2t_top1"] >= 0.95 and metrics["t2i_top1"] >= 0.95, metrics


def test_retrieval_metrics_on_heldout_shapes(shapes, shapes_clip):
    src, _, _ = shapes
    model, _ = shapes_clip
    held = list(src.samples("heldout"))
    metrics = model.retrieval_metrics(to_float([s.image for s in held]), [s.caption for s in held])
    assert metrics["images"] == len(held) and metrics["captions"] == len(src.combos["heldout"])
    assert metrics["i2t_top1"] >= 0.5 and metrics["t2i_top1"] >= 0.5, metrics  # chance: 1 / captions
    assert metrics["i2t_top5"] >= metrics["i2t_top1"] and metrics["t2i_top5"] >= metrics["t2i_top1"]


def test_retrieval_generic_path_matches_similarity(shapes, shapes_clip):
    """The contract's default similarity (score() on every pair) gives CLIP's own retrieval result."""
    from dalle_framework import Reranker

    src, _, _ = shapes
    model, _ = shapes_clip
    held = list(itertools.islice(src.samples("heldout"), 30))
    images, captions = to_float([s.image for s in held]), [s.caption for s in held]
    distinct = list(dict.fromkeys(captions))

    generic = Reranker.similarity(model, images, distinct, batch_size=7)  # the default body, on CLIP's score()
    torch.testing.assert_close(generic, model.similarity(images, distinct), rtol=0, atol=1e-5)
    assert Reranker.retrieval_metrics(model, images, captions) == pytest.approx(model.retrieval_metrics(images, captions))


def test_retrieval_counts_any_image_with_the_caption_as_a_match():
    from dalle_framework.metrics import retrieval_accuracy

    # 4 images, captions a, a, b, c; similarity rows = images, columns = distinct captions (a, b, c)
    sim = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.0], [0.0, 0.2, 0.7], [0.0, 0.1, 0.9]])

    def similarity(images, texts):
        assert texts == ["a", "b", "c"]
        return sim

    m = retrieval_accuracy(similarity, torch.zeros(4, 3, 2, 2), ["a", "a", "b", "c"])
    assert m["i2t_top1"] == pytest.approx(2 / 4)  # image 0 -> b (wrong), 1 -> a, 2 -> c (wrong), 3 -> c
    assert m["t2i_top1"] == pytest.approx(2 / 3)  # a -> image 1 (caption a), b -> image 0 (a: wrong), c -> image 3
    assert m["i2t_top5"] == m["t2i_top5"] == 1.0
    assert (m["images"], m["captions"]) == (4, 3)


# --------------------------------------------------------------------------- weights


def test_safetensors_round_trip_gives_identical_scores(registries, shapes_clip, tmp_path):
    model, _ = shapes_clip
    path = tmp_path / "model.safetensors"
    save_weights(path, model.state_dict())  # what the training loop exports
    loaded = build(registries[0], weights=str(path)).eval()
    images = torch.rand(6, 3, 32, 32)
    texts = ["a red circle in the top left", "a blue square in the center"] * 3
    assert torch.equal(loaded.score(images, texts), model.score(images, texts))


def test_open_clip_checkpoint_with_state_dict_and_module_prefix(registries, shapes_clip, tmp_path):
    model, _ = shapes_clip
    # the layout open_clip's training script writes (DDP-wrapped model)
    state = {f"module.{k}": v for k, v in model.clip.state_dict().items()}
    path = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "name": "tiny", "state_dict": state}, path)
    loaded = build(registries[0], weights=str(path)).eval()
    images = torch.rand(3, 3, 32, 32)
    texts = ["a red circle in the top left"] * 3
    assert torch.equal(loaded.score(images, texts), model.score(images, texts))


def test_missing_weights_file_names_the_path(registries, tmp_path):
    missing = tmp_path / "nope" / "clip.safetensors"
    with pytest.raises(UsageError, match=str(missing)) as info:
        build(registries[0], weights=str(missing))
    assert "train the reranker first" in str(info.value)


def test_mismatched_or_pickled_weights_are_refused(registries, tmp_path):
    other = registries[0].build({"name": "clip", "params": {"config": {**TINY, "embed_dim": 32}}})
    path = tmp_path / "other.safetensors"
    save_weights(path, other.state_dict())
    with pytest.raises(UsageError, match="does not fit"):
        build(registries[0], weights=str(path))
    pickled = tmp_path / "code.pt"
    torch.save({"state_dict": other.clip.state_dict(), "extra": socket.AddressFamily}, pickled)
    with pytest.raises(UsageError, match="not a weights-only"):
        build(registries[0], weights=str(pickled))


# --------------------------------------------------------------------------- real architectures, offline


def test_vit_b_32_builds_offline(registries, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    model = registries[0].build({"name": "clip", "params": {"model": "ViT-B-32", "batch_size": 2}}).eval()
    assert 150e6 < sum(p.numel() for p in model.parameters()) < 152e6
    assert model.image_size == (224, 224) and model.context_length == 77
    scores = model.score(torch.rand(3, 3, 32, 32), ["a photo of a cat", "a dog", "a red circle"])
    assert scores.shape == (3,) and torch.isfinite(scores).all()


# --------------------------------------------------------------------------- distributed


DISTRIBUTED_SCRIPT = r'''
import os, sys, torch, torch.distributed as dist, torch.multiprocessing as mp
from dalle_framework.plugins import PluginManager

CONFIG = {config!r}


def build():
    torch.manual_seed(0)
    return PluginManager().registry("reranker").build({{"name": "clip", "params": {{"config": CONFIG}}}})


def worker(rank, port, images, texts, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model = build().train()
    half = len(texts) // 2
    out = model.loss(images[rank * half:(rank + 1) * half], texts[rank * half:(rank + 1) * half])
    out["loss"].backward()
    loss = out["loss"].detach().clone()
    grad = model.clip.logit_scale.grad.clone()
    dist.all_reduce(loss); dist.all_reduce(grad)
    if rank == 0:
        queue.put((float(loss) / 2, float(grad) / 2))
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.manual_seed(1)
    images, texts = torch.rand(8, 3, 32, 32), [f"caption {{i}}" for i in range(8)]
    model = build().train()
    out = model.loss(images, texts)
    out["loss"].backward()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.spawn(worker, args=(int(sys.argv[1]), images, texts, queue), nprocs=2)
    print(float(out["loss"]), float(model.clip.logit_scale.grad), *queue.get())
'''


@pytest.mark.slow
def test_distributed_loss_contrasts_against_the_global_batch(tmp_path):
    """Two gloo ranks with half a batch each give the one-process loss and gradient (~20 s)."""
    script = tmp_path / "dist_clip.py"
    script.write_text(DISTRIBUTED_SCRIPT.format(config=TINY))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run([sys.executable, str(script), str(port)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    single_loss, single_grad, dist_loss, dist_grad = map(float, done.stdout.split()[-4:])
    assert dist_loss == pytest.approx(single_loss, rel=1e-4)
    assert dist_grad == pytest.approx(single_grad, rel=1e-3, abs=1e-6)


# --------------------------------------------------------------------------- through the training loop


def test_reranker_stage_trains_exports_and_reloads(tmp_path):
    """`dalle train --stage reranker` path: the loop trains it, exports safetensors, the pipeline and `weights` reload it."""
    from dalle_framework.pipeline import Pipeline
    from dalle_framework.recipe import recipe_from_dict
    from dalle_framework.train.loop import train_stage

    recipe = {
        "name": "clip-stage",
        "output_dir": str(tmp_path / "run"),
        "device": "cpu",
        "data": {"name": "shapes", "params": {"image_size": 32, "colours": ["red", "green", "blue"], "samples_per_caption": 4, "heldout_samples_per_caption": 2}},
        "tokenizer": {"name": "words", "params": {"vocab": ["a", "in", "the", "red", "green", "blue", "circle", "square", "triangle", "top", "bottom", "left", "right", "center"], "text_len": 8}},
        "codec": {"name": "gumbel-dvae", "params": {"image_size": 32}},  # required by the schema, not trained here
        "reranker": {
            "name": "clip",
            "params": {"config": TINY},
            "train": {"steps": 30, "batch_size": 32, "lr": 1e-3, "warmup_steps": 3, "eval_every": 15, "eval_batches": 1, "ckpt_every": 15},
        },
    }
    pipe = Pipeline(recipe_from_dict(recipe))
    metrics = train_stage(pipe, "reranker", progress=False)
    assert {"loss", "i2t_acc", "retrieval_i2t_top1", "retrieval_t2i_top5"} <= set(metrics), metrics
    exported = tmp_path / "run" / "reranker" / "model.safetensors"
    assert exported.is_file()
    images = torch.rand(4, 3, 32, 32)
    texts = ["a red circle in the top left", "a blue square in the center"] * 2
    from_pipeline = pipe.reranker.score(images, texts)
    direct = PluginManager().registry("reranker").build({"name": "clip", "params": {"config": TINY, "weights": str(exported)}}).eval()
    assert torch.equal(from_pipeline, direct.score(images, texts))
    assert not torch.equal(from_pipeline, build(PluginManager().registry("reranker")).eval().score(images, texts))
    # TensorBoard shows its top retrievals: four held-out captions, each with the images it scores best
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tb" / "reranker"))
    events.Reload()
    assert "reranker/preview" in events.Tags()["images"]
    preview = pipe.stage("reranker").preview(pipe.reranker, torch.device("cpu"))
    assert preview.images.shape == (4, 4, 3, 32, 32) and len(preview.captions) == 4
