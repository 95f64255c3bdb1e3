"""The Fashion-MNIST judge, the judge's ceiling in evaluation, and sweeps of sampling settings."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run_cli
from test_generate import trained_run  # noqa: F401  (a module-scoped fixture: a tiny trained shapes run)

FASHION = "/usr/share/datasets/fashion-mnist"


# --------------------------------------------------------------------------- captions


def test_label_of_reads_the_class_a_caption_names():
    from dalle_data.fashion import LABELS, label_of

    assert label_of("a photo of a sneaker") == LABELS.index("sneaker")
    assert label_of("A Black and white photo of an ankle boot") == LABELS.index("ankle boot")
    assert label_of("a t-shirt") == LABELS.index("t-shirt"), "'shirt' inside 't-shirt' is no match"
    assert label_of("a shirt") == LABELS.index("shirt")
    assert label_of("trousers") == label_of("a pair of trousers") == LABELS.index("pair of trousers")
    assert label_of("a shirt and a dress") is None and label_of("a red circle") is None


@pytest.mark.debian_data("fashion-mnist")
def test_templates_rotate_over_images_and_captions_cover_each_class(data_registry):
    from dalle_framework.errors import UsageError
    from dalle_data.fashion import label_of

    src = data_registry.build(
        {"name": "fashion-mnist", "params": {"limit": 30, "extra_templates": ["{a_label}", "a black and white photo of {a_label}"]}}
    )
    samples = list(src.samples("train"))
    assert samples[0].caption.startswith("a photo of ") and samples[2].caption.startswith("a black and white photo of ")
    assert all(label_of(s.caption) == s.meta["label"] for s in samples)
    captions = src.captions("heldout")
    assert len(captions) == 30 and [label_of(c) for c in captions[:10]] == list(range(10))
    assert all(c.startswith("a photo of") for c in captions[:10])
    with pytest.raises(Exception, match="must name the class"):
        data_registry.build({"name": "fashion-mnist", "params": {"extra_templates": ["a photo"]}})
    with pytest.raises(UsageError, match="multiple of 8"):
        data_registry.build({"name": "fashion-mnist", "params": {"image_size": 28}}).prepare_judge(None)


@pytest.fixture
def data_registry(manager):
    return manager.registry("data")


# --------------------------------------------------------------------------- the judge network


def _subset(prefix: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np
    from dalle_data.fashion import read_fashion_mnist, resized_grey

    images = resized_grey(FASHION, prefix, 32, n)
    labels = read_fashion_mnist(FASHION, prefix)[1][:n]
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


@pytest.mark.debian_data("fashion-mnist")
def test_judge_is_deterministic_cached_and_retrained_when_its_settings_change(tmp_path):
    from dalle_data.fashion import LABELS
    from dalle_data.fashion_judge import FashionJudge, JudgeConfig

    train, heldout = _subset("train", 1536), _subset("t10k", 500)
    config = JudgeConfig(width=8, epochs=1, batch_size=64)
    first = FashionJudge.load_or_train(tmp_path, config, LABELS, train, heldout)
    again = FashionJudge.load_or_train(None, config, LABELS, train, heldout)
    for key, value in first.net.state_dict().items():
        assert torch.equal(value, again.net.state_dict()[key]), f"{key} differs between two trainings with one seed"
    assert first.ceiling["all"] > 0.5, "well above chance (10%) after 24 steps on 1.5k images"
    assert set(first.ceiling["per_class"]) == set(LABELS) and first.ceiling["images"] == 500
    cached = tmp_path / config.cache_name()
    assert cached.is_file() and cached.read_bytes()[:8] != b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46", "safetensors, not a pickle"
    # loading reads weights and ceiling from the file: no training data needed
    empty = (torch.zeros(0, 32, 32, dtype=torch.uint8), torch.zeros(0, dtype=torch.long))
    loaded = FashionJudge.load_or_train(tmp_path, config, LABELS, empty, empty)
    assert loaded.ceiling == first.ceiling
    images = heldout[0][:64, None].float().div(255).expand(-1, 3, -1, -1)
    assert torch.equal(loaded.classify(images), first.classify(images))
    # a cache from a stranger (a bogus accuracy, or bytes that are no safetensors) is trained again, never trusted
    from dataclasses import asdict

    from dalle_framework.rundir import save_weights

    def accuracy(judge):  # the ceiling without its training times
        return {k: v for k, v in judge.ceiling.items() if not k.endswith("seconds")}

    save_weights(cached, first.net.state_dict(), metadata={"config": json.dumps(asdict(config)), "ceiling": json.dumps({"all": 0})})
    assert accuracy(FashionJudge.load_or_train(tmp_path, config, LABELS, train, heldout)) == accuracy(first)
    cached.write_bytes(b"\x80\x04not a safetensors file")
    assert accuracy(FashionJudge.load_or_train(tmp_path, config, LABELS, train, heldout)) == accuracy(first)
    # another seed is another judge: trained again, not the cached one
    reseeded = FashionJudge.load_or_train(tmp_path, JudgeConfig(width=8, epochs=1, batch_size=64, seed=1), LABELS, train, heldout)
    assert not torch.equal(reseeded.net.head[-1].weight, first.net.head[-1].weight)


@pytest.mark.slow
@pytest.mark.debian_data("fashion-mnist")
def test_fashion_judge_reaches_its_target_on_real_heldout_images(data_registry, tmp_path):
    src = data_registry.build({"name": "fashion-mnist", "params": {"extra_templates": ["{a_label}"]}})
    ceiling = src.prepare_judge(tmp_path)
    assert ceiling["all"] >= 0.90 and ceiling["images"] == 10_000
    assert set(ceiling["per_caption"]) == set(src.captions("heldout"))
    # the judge contract on real held-out images and their own captions gives the same share
    images, captions = [], []
    for sample in src.samples("heldout"):
        images.append(torch.from_numpy(sample.image).permute(2, 0, 1))
        captions.append(sample.caption)
    verdict = src.judge(torch.stack(images).float() / 255, captions)
    assert set(verdict) == {"class", "all"} and len(verdict["all"]) == 10_000
    assert sum(verdict["all"]) / 10_000 == pytest.approx(ceiling["all"], abs=1e-9)
    # a wrong caption fails
    assert src.judge(torch.stack(images[:4]).float() / 255, ["a photo of a bag" if "bag" not in c else "a coat" for c in captions[:4]])["all"].count(True) <= 1
    # a second source loads the cached judge instead of training again
    started = time.monotonic()
    fresh = data_registry.build({"name": "fashion-mnist", "params": {"extra_templates": ["{a_label}"]}})
    assert fresh.prepare_judge(tmp_path)["all"] == ceiling["all"] and time.monotonic() - started < 60


# --------------------------------------------------------------------------- the ceiling in evaluation


def test_evaluation_prepares_the_judge_in_the_run_and_reports_its_ceiling(trained_run, bare_manager):  # noqa: F811
    """A source with a learned judge: evaluation calls prepare_judge(<run>/judge) first and reports the ceiling."""
    from dalle_framework import hookimpl
    from dalle_framework.evaluation import evaluate_run
    from dalle_framework.pipeline import Pipeline
    from dalle_data import ShapesSource
    import dalle_clip, dalle_dvae, dalle_engines, dalle_stages, dalle_tokenizers, dalle_transformer  # noqa: E401

    calls = []

    class LearnedJudgeShapes(ShapesSource):
        def prepare_judge(self, cache_dir):
            calls.append(cache_dir)
            return {"all": 0.5, "per_caption": {c: 0.5 for c in self.captions("heldout")}}

    class Plugin:
        @hookimpl
        def dalle_register_datasources(self, registry):
            registry.register(LearnedJudgeShapes, name="shapes")

    bare_manager.add_plugin(Plugin(), name="learned-judge")
    for module in (dalle_clip, dalle_dvae, dalle_engines, dalle_stages, dalle_tokenizers, dalle_transformer):
        bare_manager.add_plugin(module, name=module.__name__)
    pipe = Pipeline.load(trained_run)
    report = evaluate_run(pipe, ["generation"], progress=False)["generation"]
    assert calls == [trained_run / "judge"]
    assert report["judge_ceiling"]["all"] == 0.5
    for when in ("before", "after"):
        assert report["relative_to_ceiling"][f"{when}_rerank"] == pytest.approx(report[f"faithfulness_{when}_rerank"]["all"] / 0.5)
    assert set(report["per_caption"]) == set(report["per_caption_after"])
    assert all(row["judge_on_real"] == 0.5 for row in report["per_caption"].values())


# --------------------------------------------------------------------------- sweeps


def test_sweep_axes_are_parsed_and_checked():
    from dalle_framework.errors import UsageError
    from dalle_framework.interfaces import Sampling
    from dalle_framework.sweep import parse_axes, settings

    axes = parse_axes(["guidance_scale=1,2.5", "top_k=null,32"])
    assert axes == {"guidance_scale": [1, 2.5], "top_k": [None, 32]}
    grid = settings(axes, Sampling(temperature=0.9))
    assert [(s.guidance_scale, s.top_k) for s in grid] == [(1, None), (1, 32), (2.5, None), (2.5, 32)]
    assert all(s.temperature == 0.9 for s in grid), "unswept settings keep the recipe's values"
    for bad, message in [
        (["guidance=2"], "not a sampling setting; choose from"),
        (["top_k"], "must look like KEY=V1,V2"),
        (["top_k=1", "top_k=2"], "given twice"),
    ]:
        with pytest.raises(UsageError, match=message):
            parse_axes(bad)
    with pytest.raises(UsageError, match="top_p"):
        settings(parse_axes(["top_p=0.5,1.5"]), Sampling())


def test_evaluate_sweep_prints_a_table_and_repeats_the_evaluation(trained_run, tmp_path):  # noqa: F811
    out = tmp_path / "sweep.json"
    result = run_cli("evaluate", str(trained_run), "--sweep", "guidance_scale=1,3", "--sweep", "top_k=null,4", "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert [r["sampling"] for r in data["rows"]] == [
        {"guidance_scale": 1, "top_k": None},
        {"guidance_scale": 1, "top_k": 4},
        {"guidance_scale": 3, "top_k": None},
        {"guidance_scale": 3, "top_k": 4},
    ]
    lines = result.stdout.strip().splitlines()
    assert "guidance_scale" in lines[1] and "unreranked all" in lines[1] and len(lines) == 3 + 4
    assert lines[3].split()[:2] == ["1", "null"] and lines[6].split()[:2] == ["3", "4"]
    # the row with the recipe's own settings is what `dalle evaluate` reports
    report = json.loads(run_cli("evaluate", str(trained_run), "--stage", "generation", "--quiet").stdout)["generation"]
    assert data["rows"][0]["faithfulness_before_rerank"] == report["faithfulness_before_rerank"]
    assert data["rows"][0]["faithfulness_after_rerank"] == report["faithfulness_after_rerank"]
    # the same command prints the same table
    again = run_cli("evaluate", str(trained_run), "--sweep", "guidance_scale=1,3", "--sweep", "top_k=null,4", "--out", str(out), "--quiet")
    assert again.stdout == result.stdout


def test_evaluate_sweep_errors_are_usage_errors(trained_run):  # noqa: F811
    bad = run_cli("evaluate", str(trained_run), "--sweep", "guidance=1,2", "--quiet")
    assert bad.returncode == 2 and "--sweep guidance" in bad.stderr and "Traceback" not in bad.stderr
    mixed = run_cli("evaluate", str(trained_run), "--sweep", "top_k=null,4", "--stage", "codec", "--quiet")
    assert mixed.returncode == 2 and "drop --stage codec" in mixed.stderr


@pytest.mark.slow
@pytest.mark.debian_data("fashion-mnist")
def test_dalle_run_fashion_demo_reports_faithfulness_against_the_judges_ceiling(tmp_path):
    """The shipped recipe end to end, shortened: every figure the README's Fashion-MNIST table shows is in the report."""
    run = tmp_path / "fashion"
    result = run_cli(
        "run", "fashion-demo", f"output_dir={run}", "data.params.limit=512", "data.params.judge_epochs=1",
        "codec.train.steps=30", "prior.train.steps=30", "reranker.train.steps=10",
        "evaluate.rounds=1", "evaluate.candidates=4", "generate.candidates=2", "generate.keep=1", "--quiet",
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    generation = report["generation"]
    ceiling = generation["judge_ceiling"]
    assert ceiling["all"] > 0.8 and ceiling["images"] == 10_000, "judged on the whole real held-out split, limit or not"
    assert list(ceiling["per_class"]) == [
        "t-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"
    ]
    before, after = generation["faithfulness_before_rerank"]["all"], generation["faithfulness_after_rerank"]["all"]
    assert generation["relative_to_ceiling"] == {"before_rerank": before / ceiling["all"], "after_rerank": after / ceiling["all"]}
    per_caption = generation["per_caption"]
    assert len(per_caption) == 10 and all(c.startswith("a photo of ") for c in per_caption)
    assert all(row["judge_on_real"] == ceiling["per_class"][c.removeprefix("a photo of ").removeprefix("a ").removeprefix("an ")]
               for c, row in per_caption.items())
    assert sum(row["before_rerank"] for row in per_caption.values()) / 10 == pytest.approx(before, abs=1e-3)
    # the judge is cached in the run: evaluating again loads it
    assert len(list((run / "judge").glob("fashion-judge-32px-*.safetensors"))) == 1
    again = json.loads(run_cli("evaluate", str(run), "--stage", "generation", "--quiet").stdout)["generation"]
    assert again["judge_ceiling"] == ceiling and again["faithfulness_before_rerank"] == generation["faithfulness_before_rerank"]
    # samples for every class, as the recipe lists them
    from PIL import Image

    with Image.open(run / "samples.png") as grid:
        assert grid.height > 10 * 32
