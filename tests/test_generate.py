"""Generation from a trained run: CLI, determinism, reranking order, priming, guidance, evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run_cli
from dalle_framework import UsageError
from test_train import tiny_recipe

CAPTIONS = ["a red circle in the top left", "a blue square in the center"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A tiny run with all three stages trained (codec, prior, CLIP reranker)."""
    from dalle_framework.pipeline import Pipeline
    from dalle_framework.plugins import PluginManager, set_plugin_manager
    from dalle_framework.recipe import recipe_from_dict
    from dalle_framework.train.loop import train_all

    set_plugin_manager(PluginManager())
    root = tmp_path_factory.mktemp("gen")
    recipe = tiny_recipe(root / "run")
    recipe["prior"]["params"]["caption_dropout"] = 0.2
    recipe["reranker"] = {
        "name": "clip",
        "params": {
            "config": {
                "embed_dim": 32,
                "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
                "text_cfg": {"context_length": 16, "width": 32, "heads": 2, "layers": 1},
            }
        },
        "train": {"steps": 5, "batch_size": 16, "lr": 1e-3, "eval_batches": 1},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    train_all(Pipeline(recipe_from_dict(recipe)), progress=False)
    set_plugin_manager(None)
    return root / "run"


def test_generate_cli_is_deterministic_and_reranked(trained_run, tmp_path):
    args = ["generate", str(trained_run), *CAPTIONS, "-n", "4", "--keep", "2", "--seed", "3", "--quiet"]
    first = run_cli(*args, "--out", str(tmp_path / "a.png"))
    second = run_cli(*args, "--out", str(tmp_path / "b.png"))
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    rows = json.loads(first.stdout)["rows"]
    assert [r["caption"] for r in rows] == CAPTIONS
    for row in rows:
        assert len(row["scores"]) == 2 and row["scores"][0] >= row["scores"][1]
    from PIL import Image

    assert Image.open(tmp_path / "a.png").size[0] > 16 * 2  # a grid of 2 columns plus padding


def test_generate_out_dir_writes_each_kept_image_with_a_sidecar(trained_run, tmp_path):
    args = ["generate", str(trained_run), *CAPTIONS[:2], "-n", "4", "--keep", "2", "--seed", "3", "--quiet", "--guidance", "2"]
    done = run_cli(*args, "--out-dir", str(tmp_path / "each"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert "grid" not in printed and not (tmp_path / "grid.png").exists()  # --out-dir alone writes no grid
    assert printed["images"] == [str(tmp_path / "each" / f"{c:03d}-{r:02d}.png") for c in range(2) for r in range(2)]
    from PIL import Image

    grid = run_cli(*args, "--out", str(tmp_path / "grid.png"))
    for c, caption in enumerate(CAPTIONS[:2]):
        for rank in range(2):
            sidecar = json.loads((tmp_path / "each" / f"{c:03d}-{rank:02d}.json").read_text())
            assert sidecar["caption"] == caption and sidecar["rank"] == rank and sidecar["seed"] == 3
            assert sidecar["sampling"]["guidance_scale"] == 2.0 and sidecar["candidates"] == 4 and 0 <= sidecar["candidate"] < 4
            assert sidecar["score"] == printed["rows"][c]["scores"][rank] == json.loads(grid.stdout)["rows"][c]["scores"][rank]
            assert Image.open(tmp_path / "each" / f"{c:03d}-{rank:02d}.png").size == (16, 16)


def test_generate_cli_options_and_errors(trained_run, tmp_path):
    ok = run_cli("generate", str(trained_run), CAPTIONS[0], "-n", "5", "--keep", "2", "--batch-size", "2", "--top-k", "5",
                 "--top-p", "0.9", "--temperature", "0.8", "--guidance", "2.0", "--draws", "device",
                 "--out", str(tmp_path / "g.png"), "--quiet")
    assert ok.returncode == 0, ok.stderr
    assert len(json.loads(ok.stdout)["rows"][0]["scores"]) == 2
    zero = run_cli("generate", str(trained_run), CAPTIONS[0], "--batch-size", "0", "--quiet")
    assert zero.returncode == 2 and "--batch-size" in zero.stderr and "Traceback" not in zero.stderr
    bad = run_cli("generate", str(trained_run), CAPTIONS[0], "--top-p", "1.5", "--quiet")
    assert bad.returncode == 2 and "--top-p" in bad.stderr and "Traceback" not in bad.stderr
    missing = run_cli("generate", str(trained_run), CAPTIONS[0], "--prime", str(tmp_path / "nope.png"), "--prime-rows", "2")
    assert missing.returncode == 2 and "nope.png" in missing.stderr


def test_reranking_keeps_the_best_candidates_in_order(trained_run):
    from dalle_framework.pipeline import Pipeline

    pipe = Pipeline.load(trained_run)
    # batches of 4 straddle the two captions' 6 candidates: the running best must merge across batches
    out = pipe.generate(CAPTIONS, candidates=6, keep=3, seed=0, batch_size=4, keep_candidates=True)
    assert out.candidates.shape[:2] == (2, 6) and out.images.shape[:2] == (2, 3)
    for c in range(2):
        best = out.candidate_scores[c].sort(descending=True).values[:3]
        torch.testing.assert_close(out.scores[c], best)
        # the kept images are the candidates with those scores
        index = out.candidate_scores[c].argsort(descending=True, stable=True)[:3]
        assert torch.equal(out.best[c], index)
        assert torch.equal(out.images[c], out.candidates[c, index])
        assert torch.equal(out.images[c], pipe.codec.decode(out.tokens[c, index]).clamp(0, 1))
    # and the scores are the reranker's scores of those very images
    rescored = pipe.reranker.score(out.images[0], [CAPTIONS[0]] * 3)
    torch.testing.assert_close(rescored, out.scores[0], atol=1e-5, rtol=0)


def test_many_candidates_keep_only_the_best_images_and_report_progress(trained_run):
    from dalle_framework.pipeline import Pipeline

    pipe = Pipeline.load(trained_run)
    seen: list[tuple[int, int]] = []
    out = pipe.generate(CAPTIONS, candidates=9, keep=2, seed=4, batch_size=4, on_progress=lambda d, t: seen.append((d, t)))
    n_tokens = pipe.codec.grid[0] * pipe.codec.grid[1]
    assert out.candidates is None, "all candidates' images are only kept when asked for"
    assert out.images.shape[:2] == (2, 2) and out.candidate_scores.shape == (2, 9) and out.tokens.shape == (2, 9, n_tokens)
    assert not out.candidate_scores.isnan().any()
    for c in range(2):
        assert torch.equal(out.best[c], out.candidate_scores[c].argsort(descending=True, stable=True)[:2])
    total = 2 * 9 * n_tokens
    assert {t for _, t in seen} == {total}
    done = [d for d, _ in seen]
    assert done == sorted(done) and done[-1] == total and len(done) == 5 * n_tokens  # 18 rows in 5 batches, a call per position
    with pytest.raises(UsageError, match="batch size"):
        pipe.generate(CAPTIONS, batch_size=0)


def test_running_best_equals_a_stable_sort_of_all_candidates():
    from dalle_framework.candidates import RunningBest

    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (3, 11), generator=g).float()  # many ties: order must stay stable
    images = torch.arange(3 * 11).float().view(3, 11, 1)
    best = RunningBest(3, keep=4, candidates=11)
    for caption in range(3):
        for part in torch.arange(11).split(3):  # batches in drawing order
            best.add(caption, part, images[caption, part], scores[caption, part])
    expected = scores.argsort(dim=1, descending=True, stable=True)[:, :4]
    assert torch.equal(best.index(), expected) and torch.equal(best.scores, scores)
    assert torch.equal(best.images()[..., 0], images[..., 0].gather(1, expected))
    unscored = RunningBest(1, keep=3, candidates=5)  # no reranker: the first ones drawn
    unscored.add(0, torch.arange(5), images[0, :5], torch.full((5,), float("nan")))
    assert unscored.index().tolist() == [[0, 1, 2]]


def test_priming_keeps_the_top_rows(trained_run):
    from dalle_framework.pipeline import Pipeline

    pipe = Pipeline.load(trained_run)
    image = torch.rand(1, 3, 16, 16)
    out = pipe.generate(CAPTIONS, candidates=2, keep=2, seed=1, prime_images=image, prime_rows=3)
    w = pipe.codec.grid[1]
    expected = pipe.codec.encode(image)[0, : 3 * w]
    assert torch.equal(out.tokens[:, :, : 3 * w], expected.expand(2, 2, -1))
    with pytest.raises(Exception, match="prime rows must be between"):
        pipe.generate(CAPTIONS, prime_images=image, prime_rows=pipe.codec.grid[0])


def test_guidance_changes_samples_and_stays_deterministic(trained_run):
    from dalle_framework.interfaces import Sampling
    from dalle_framework.pipeline import Pipeline

    pipe = Pipeline.load(trained_run)
    plain = pipe.generate(CAPTIONS, candidates=4, seed=5, sampling=Sampling())
    guided = pipe.generate(CAPTIONS, candidates=4, seed=5, sampling=Sampling(guidance_scale=3.0))
    again = pipe.generate(CAPTIONS, candidates=4, seed=5, sampling=Sampling(guidance_scale=3.0))
    uncached = pipe.generate(CAPTIONS, candidates=4, seed=5, sampling=Sampling(guidance_scale=3.0, use_cache=False))
    assert torch.equal(guided.tokens, again.tokens) and torch.equal(guided.tokens, uncached.tokens)
    # a barely trained prior's two branches differ a little: a large scale makes that visible
    strong = pipe.generate(CAPTIONS, candidates=4, seed=5, sampling=Sampling(guidance_scale=200.0))
    assert not torch.equal(plain.tokens, strong.tokens)


def test_evaluate_cli_prints_json_with_every_part(trained_run, tmp_path):
    result = run_cli("evaluate", str(trained_run), "--out", str(tmp_path / "report.json"), "--quiet")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert {"codec", "prior", "reranker", "generation"} <= set(report)
    assert {"mse", "psnr", "codebook_usage", "perplexity"} <= set(report["codec"])
    generation = report["generation"]
    for key in ("faithfulness_before_rerank", "faithfulness_after_rerank"):
        assert set(generation[key]) == {"colour", "shape", "position", "all"}
    assert -1 <= generation["reranker_score_all"] <= 1
    assert Path(report["codec"]["grid"]).is_file()


def test_codec_only_evaluation(trained_run):
    result = run_cli("evaluate", str(trained_run), "--stage", "codec", "--quiet")
    assert result.returncode == 0, result.stderr
    assert set(json.loads(result.stdout)) == {"run", "recipe", "codec"}


def test_data_shards_and_encode_commands(trained_run, tmp_path):
    shards = run_cli("data", "shards", "shapes", str(tmp_path / "shards"), "--param", "image_size=16",
                     "--param", "samples_per_caption=1", "--param", "heldout_samples_per_caption=1", "--quiet")
    assert shards.returncode == 0, shards.stderr
    written = json.loads(shards.stdout)
    assert written["train"]["count"] == 95 and written["heldout"]["count"] == 10
    assert sorted(p.name for p in (tmp_path / "shards").glob("*.tar")) == ["heldout-000000.tar", "train-000000.tar"]
    bad = run_cli("data", "shards", "shapes", str(tmp_path / "x"), "--param", "image_size=big")
    assert bad.returncode == 2 and "image_size" in bad.stderr

    encoded = run_cli("data", "encode", str(trained_run), "--quiet")
    assert encoded.returncode == 0, encoded.stderr
    counts = json.loads(encoded.stdout)["prepared"]["prior"]  # what each stage precomputes: the prior's image tokens
    assert counts["train"] > 0 and counts["heldout"] > 0


def test_inspect_paper_recipe_without_allocating():
    result = run_cli("inspect", "dalle-paper", "--gpus", "8", "--nodes", "64")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    prior = report["prior"]
    assert 12.0e9 < prior["params"]["total"] < 12.8e9
    assert prior["flops_per_token"]["n_layers"] == 64 and prior["flops_per_token"]["seq_len"] == 1280
    assert report["codec"]["grid"] == [32, 32] and report["codec"]["vocab_size"] == 8192


MIN_P = '''
import torch
from pydantic import Field

from dalle_framework import LogitFilter, Params, hookimpl


class MinP(LogitFilter):
    """Keeps tokens at least ``min_p`` times as likely as the most likely one."""

    class Params(Params):
        min_p: float = Field(0.1, ge=0, le=1, description="share of the top probability a token needs")

    def apply(self, logits):
        probs = logits.softmax(dim=-1)
        keep = probs >= self.params.min_p * probs.amax(dim=-1, keepdim=True)
        return logits.masked_fill(~keep, float("-inf"))


class DropAll(LogitFilter):
    """Drops every token (a careless filter)."""

    def apply(self, logits):
        return torch.full_like(logits, float("-inf"))


@hookimpl
def dalle_register_logit_filters(registry):
    registry.register(MinP, name="min-p")
    registry.register(DropAll, name="drop-all")
'''


def test_a_plugin_adds_a_sampling_filter_that_recipes_name(trained_run, manager, tmp_path, monkeypatch):
    """min-p in one class: recipes name it under generate.sampling.filters, validated with the recipe;
    min_p 1 leaves only the top token (= top-k 1, on host and device draws), and a filter that drops
    everything still leaves each row its most likely token."""
    from dalle_framework.interfaces import Sampling
    from dalle_framework.pipeline import Pipeline
    from dalle_framework.recipe import RecipeError, load_recipe
    from dalle_framework.sampling import filter_logits

    (tmp_path / "dalle_min_p.py").write_text(MIN_P)
    monkeypatch.syspath_prepend(str(tmp_path))
    import dalle_min_p

    assert manager.add_plugin(dalle_min_p, name="min-p-plugin").components == {"filter": ["drop-all", "min-p"]}
    logits = torch.tensor([[2.0, 1.0, 0.0, -3.0]]).log_softmax(-1)
    kept = filter_logits(logits, filters=[dalle_min_p.MinP(dalle_min_p.MinP.Params(min_p=0.3))]).isfinite()
    assert kept.tolist() == [[True, True, False, False]]  # p = .71, .26, .10, .004 of which >= .3 * .71
    pipe = Pipeline.load(trained_run)
    for draws in ("host", "device"):
        greedy = pipe.generate(CAPTIONS, candidates=3, seed=2, sampling=Sampling(top_k=1, draws=draws))
        for rule in ({"name": "min-p", "params": {"min_p": 1.0}}, {"name": "drop-all"}):
            filtered = pipe.generate(CAPTIONS, candidates=3, seed=2, sampling=Sampling(filters=[rule], draws=draws))
            assert torch.equal(filtered.tokens, greedy.tokens), (draws, rule)
    recipe = load_recipe(trained_run / "recipe.yaml", ["generate.sampling.filters=[{name: min-p, params: {min_p: 0.05}}]"])
    assert recipe.generate.sampling.filters[0].params.min_p == 0.05
    with pytest.raises(RecipeError, match=r"generate.sampling.filters.0.name: unknown filter 'min_p'; did you mean 'min-p'"):
        load_recipe(trained_run / "recipe.yaml", ["generate.sampling.filters=[{name: min_p}]"])
    with pytest.raises(RecipeError, match=r"generate.sampling.filters.0.params.min_p: Input should be less than or equal to 1"):
        load_recipe(trained_run / "recipe.yaml", ["generate.sampling.filters=[{name: min-p, params: {min_p: 2}}]"])
    with pytest.raises(UsageError, match=r"sampling.filters.0.params.min_p"):
        pipe.generate(CAPTIONS, candidates=1, seed=0, sampling=Sampling(filters=[{"name": "min-p", "params": {"min_p": -1}}]))
