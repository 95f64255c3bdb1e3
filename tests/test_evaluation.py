"""`dalle evaluate` as metrics: a plugin's metric, cached reference features, settings, compare, ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_cli
from test_generate import trained_run  # noqa: F401  (a module-scoped fixture: a tiny trained shapes run)

MORE_DRAWS = ["generate.batch_size=2", "evaluate.rounds=3", "evaluate.candidates=3"]  # 6 units in 6 chunks


def test_a_plugin_adds_a_metric_in_one_class(trained_run, manager):  # noqa: F811
    import dalle_framework
    from dalle_framework import Figure, Measurement, Metric, hookimpl
    from dalle_framework.evaluation import evaluate_run
    from dalle_framework.pipeline import Pipeline
    from dalle_framework.recipe import RecipeError, load_recipe

    class WorstCaption(Metric):
        """The caption whose best-of-N draws the judge accepts least often."""

        generation = True

        class Params(dalle_framework.Params):
            attribute: str = "all"

        def measure(self, evaluation):
            draws = evaluation.draws
            verdicts = draws.best_verdicts[self.params.attribute]
            shares = {c: [bool(v) for c2, v in zip(draws.captions, verdicts) if c2 == c] for c in dict.fromkeys(draws.captions)}
            caption = min(shares, key=lambda c: sum(shares[c]) / len(shares[c]))
            figure: Figure = evaluation.rate(sum(shares[caption]), len(shares[caption]))
            return Measurement({"generation": {"worst_caption": caption}}, {"generation": {"worst_caption_rate": figure}})

    class Plugin:
        @hookimpl
        def dalle_register_metrics(self, registry):
            registry.register(WorstCaption, name="worst-caption")

    manager.add_plugin(Plugin(), name="worst-caption-plugin")
    assert manager.plugins["worst-caption-plugin"].components == {"metric": ["worst-caption"]}
    pipe = Pipeline.load(trained_run, overrides=["evaluate.rounds=2"])
    report = evaluate_run(pipe, metrics=["worst-caption", "faithfulness"], progress=False)
    assert set(report) == {"run", "recipe", "generation"}, "only the metrics asked for"
    generation = report["generation"]
    assert generation["worst_caption"] in pipe.data.captions("heldout")
    rate = generation["figures"]["worst_caption_rate"]
    assert rate["method"] == "wilson" and rate["n"] == 2 and rate["low"] <= rate["value"] <= rate["high"]
    assert "faithfulness_after_rerank" in generation and generation["settings"]["recorded"]["metrics"] == ["worst-caption", "faithfulness"]
    # its params are validated with the recipe, naming the field
    with pytest.raises(RecipeError, match=r"evaluate.metrics.0.params.colour: unknown key"):
        load_recipe(trained_run / "recipe.yaml", ["evaluate.metrics=[{name: worst-caption, params: {colour: red}}]"])
    with pytest.raises(RecipeError, match=r"evaluate.features.x.name: unknown features 'nope'"):
        load_recipe(trained_run / "recipe.yaml", ["evaluate.features.x.name=nope"])


def test_reference_features_are_cached_and_a_cache_that_does_not_match_is_recomputed(trained_run, manager):  # noqa: F811
    from safetensors.torch import save_file

    from dalle_framework.evaluation import Evaluation
    from dalle_framework.pipeline import Pipeline

    evaluation = Evaluation(Pipeline.load(trained_run))
    first = evaluation.reference("judge")
    cached = list((trained_run / "eval" / "reference").glob("heldout-judge-*.safetensors"))
    assert len(cached) == 1 and first.shape == (8, 70)
    stamp = cached[0].stat().st_mtime_ns
    assert torch.equal(Evaluation(Pipeline.load(trained_run)).reference("judge"), first) and cached[0].stat().st_mtime_ns == stamp
    from safetensors import safe_open

    with safe_open(str(cached[0]), framework="pt") as f:
        key = f.metadata()["key"]
    strangers = {
        "another key": ({"features": torch.zeros(8, 70)}, {"key": key.replace('"heldout"', '"train"')}),
        "too few rows": ({"features": torch.zeros(3, 70)}, {"key": key}),
        "not finite": ({"features": torch.full((8, 70), float("nan"))}, {"key": key}),
    }
    for what, (tensors, metadata) in strangers.items():
        save_file(tensors, str(cached[0]), metadata=metadata)
        again = Evaluation(Pipeline.load(trained_run)).reference("judge")
        assert torch.equal(again, first), f"a cache with {what} was trusted"
    cached[0].write_bytes(b"\x80\x04 not safetensors")
    assert torch.equal(Evaluation(Pipeline.load(trained_run)).reference("judge"), first)
    # another reference set is another file
    fewer = Evaluation(Pipeline.load(trained_run, overrides=["evaluate.reference.images=4"])).reference("judge")
    assert torch.equal(fewer, first[:4]) and len(list((trained_run / "eval" / "reference").glob("*.safetensors"))) == 2


def test_evaluate_metrics_option_settings_and_errors(trained_run):  # noqa: F811
    result = run_cli("evaluate", str(trained_run), *MORE_DRAWS, "--metrics", "fd,kid,prdc", "--quiet")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    generation = report["generation"]
    assert set(report) == {"run", "recipe", "generation"}
    for network in ("judge", "reranker"):
        for key in ("fd", "kid", "precision", "recall", "density", "coverage"):
            figure = generation["figures"][f"{key}.{network}"]
            assert figure["low"] <= figure["high"] and figure["network"] == network and figure["method"].startswith("bootstrap")
            if key in ("fd", "kid"):  # recentred: resamples that repeat images run high, the interval stays on the estimate
                assert figure["method"] == "bootstrap, recentred" and figure["low"] <= figure["value"] <= figure["high"]
            assert generation[f"{key}_interval"][network] == [figure["low"], figure["high"]]
        assert generation["kid_std"][network] >= 0
    settings = generation["settings"]
    assert settings["pinned"]["rounds"] == 3 and settings["pinned"]["candidates"] == 3 and settings["pinned"]["generated_images"] == 18
    assert settings["pinned"]["reference"]["split"] == "heldout" and settings["pinned"]["reference"]["images_used"] == 8
    assert len(settings["features"]["reranker"]["sha256"]) == 64 and settings["features"]["judge"]["resize"]["filter"] == "area"
    assert settings["recorded"]["seed"] == 1 and settings["recorded"]["world_size"] == 1
    unknown = run_cli("evaluate", str(trained_run), "--metrics", "fid", "--quiet")
    assert unknown.returncode == 2 and "unknown metric 'fid'" in unknown.stderr and "Traceback" not in unknown.stderr
    missing = run_cli("evaluate", str(trained_run), "--metrics", "fd", "evaluate.features={inception: {name: inception-v3, params: {weights: /nope.pth}}}", "--quiet")
    assert missing.returncode == 2 and "inception" in missing.stderr and "/nope.pth" in missing.stderr


def test_compare_prints_shared_figures_and_refuses_mismatched_settings(trained_run, tmp_path):  # noqa: F811
    reports = {}
    for name, extra in {"a": [], "b": ["evaluate.seed=5"]}.items():
        out = tmp_path / f"{name}.json"
        result = run_cli("evaluate", str(trained_run), *extra, "evaluate.interval.resamples=50", "--metrics", "faithfulness,reranker-score,fd",
                         "--out", str(out), "--quiet")
        assert result.returncode == 0, result.stderr
        reports[name] = out

    def edited(name: str, change) -> Path:
        report = json.loads(reports["b"].read_text())
        change(report["generation"]["settings"])
        reports[name] = tmp_path / f"{name}.json"
        reports[name].write_text(json.dumps(report))
        return reports[name]

    edited("c", lambda settings: settings["pinned"].update(rounds=2))  # as `evaluate.rounds=2` records it
    same = run_cli("compare", str(reports["a"]), str(reports["b"]))
    assert same.returncode == 0, same.stderr
    lines = same.stdout.splitlines()
    assert lines[0].startswith("intervals: 95%") and "generation.fd.judge" in same.stdout and "generation.faithfulness_after_rerank.all" in same.stdout
    row = next(line for line in lines if line.startswith("generation.reranker_score_all"))
    assert row.count("[") == 2, "a value and an interval per run"
    mismatch = run_cli("compare", str(reports["a"]), str(reports["c"]))
    assert mismatch.returncode == 2 and "generation.settings.pinned.rounds: 1 in" in mismatch.stderr and "Traceback" not in mismatch.stderr
    # another run's reranker is another feature network: refused, or left out on request
    edited("d", lambda settings: settings["features"]["reranker"].update(sha256="0" * 64))
    refused = run_cli("compare", str(reports["a"]), str(reports["d"]))
    assert refused.returncode == 2 and "feature network 'reranker'" in refused.stderr
    kept = run_cli("compare", str(reports["a"]), str(reports["d"]), "--only-comparable", "--json")
    assert kept.returncode == 0, kept.stderr
    rows = json.loads(kept.stdout)["rows"]
    assert "generation.fd.judge" in rows and "generation.fd.reranker" not in rows
    assert run_cli("compare", str(reports["a"])).returncode == 2
    assert run_cli("compare", str(reports["a"]), str(tmp_path)).returncode == 2


def test_sweep_marks_settings_within_noise_of_the_best():
    from dalle_framework.sweep import format_table, mark_within_noise

    def row(k, rate, interval):
        return {"sampling": {"top_k": k}, "faithfulness_before_rerank": {"all": rate}, "faithfulness_before_rerank_interval": {"all": interval}}

    rows = [row(1, 0.50, [0.40, 0.60]), row(2, 0.90, [0.82, 0.95]), row(3, 0.80, [0.70, 0.85])]
    mark_within_noise(rows)
    assert [r["within_noise_of_best"]["before_rerank"] for r in rows] == [False, True, True]
    table = format_table({"run": "r", "captions": 2, "rounds": 1, "candidates": 4, "seed": 0, "rows": rows})
    assert "90.0 (82.0-95.0)*" in table and "50.0 (40.0-60.0)" in table and "50.0 (40.0-60.0)*" not in table


@pytest.mark.slow
def test_two_ranks_under_torchrun_draw_what_one_process_draws(trained_run, tmp_path):  # noqa: F811
    """Each rank draws a share of the captions x rounds; gathered on rank 0, every figure equals a 1-rank evaluation's."""
    from dalle_framework.distributed import free_port

    args = ["evaluate", str(trained_run), *MORE_DRAWS, "--metrics", "faithfulness,reranker-score,fd,kid", "--quiet"]
    one = run_cli(*args, "--out", str(tmp_path / "one.json"))
    assert one.returncode == 0, one.stderr
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "dalle_framework", *args, "--out", str(tmp_path / "two.json")]
    two = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"})
    assert two.returncode == 0, two.stderr[-3000:]
    single, double = (json.loads((tmp_path / f"{n}.json").read_text())["generation"] for n in ("one", "two"))
    assert double["settings"]["recorded"]["world_size"] == 2 and single["settings"]["recorded"]["world_size"] == 1
    assert double["figures"] == single["figures"]
    assert double["per_caption"] == single["per_caption"] and double["fd"] == single["fd"]
    assert Path(double["grid"]).is_file()


def test_a_judge_may_leave_out_all_and_a_malformed_one_is_named(manager, trained_run):  # noqa: F811
    """The judge contract: one bool per image per attribute; `all` is their AND when a third-party judge
    leaves it out (the same figure the shapes judge gives itself), and a malformed verdict names its source."""
    from dalle_framework import UsageError
    from dalle_framework.evaluation import evaluate_run
    from dalle_framework.pipeline import Pipeline

    pipe = Pipeline.load(trained_run)
    expected = evaluate_run(pipe, metrics=["faithfulness"], progress=False)["generation"]
    own = pipe.data.judge
    pipe.data.judge = lambda images, captions: {k: v for k, v in own(images, captions).items() if k != "all"}
    without = evaluate_run(pipe, metrics=["faithfulness"], progress=False)["generation"]
    for when in ("faithfulness_before_rerank", "faithfulness_after_rerank"):
        assert without[when] == expected[when] and "all" in without[when]
    pipe.data.judge = lambda images, captions: {"colour": [True]}
    with pytest.raises(UsageError, match=r"data source 'shapes': judge\(\): 'colour' must hold one verdict per image"):
        evaluate_run(pipe, metrics=["faithfulness"], progress=False)
