"""The command line as a user meets it: exit codes, messages, plugins, recipes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_cli

FIXTURE = ROOT / "tests" / "fixtures" / "dalle-example-plugin"


@pytest.fixture(scope="module")
def example_site(tmp_path_factory) -> Path:
    """The example third-party plugin installed as a real distribution into its own directory."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(target), str(FIXTURE)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return target


def plugins_json(**env) -> dict:
    result = run_cli("plugins", "--json", env=env)
    assert result.returncode == 0, result.stderr
    return {p["name"]: p for p in json.loads(result.stdout)["plugins"]}


def test_plugins_lists_builtins_with_components():
    plugins = plugins_json()
    assert plugins["dvae"]["components"].get("codec") == ["gumbel-dvae"]
    assert plugins["vqvae"]["components"].get("codec") == ["vq-vae"]
    assert set(plugins["transformer"]["components"].get("prior", [])) == {"dense-transformer", "sparse-transformer"}
    assert plugins["clip"]["components"].get("reranker") == ["clip"]
    assert set(plugins["engines"]["components"].get("engine", [])) == {"torch", "deepspeed"}
    assert {"shapes", "emoji", "fashion-mnist", "folder", "webdataset"} <= set(plugins["data"]["components"]["data"])
    assert all(p["error"] is None for p in plugins.values())


def test_example_plugin_is_found_disabled_and_usable_in_recipes(example_site, tmp_path):
    env = {"PYTHONPATH": str(example_site)}
    plugins = plugins_json(**env)
    example = plugins["example"]
    assert example["distribution"] == "dalle-example-plugin" and example["version"] == "0.4.0"
    assert example["components"] == {
        "codec": ["palette-codec"], "prior": ["unigram-prior"], "reranker": ["mean-colour"], "stage": ["colour-scorer"],
        "data": ["colour-squares"], "tokenizer": ["letters"],
    }

    hidden = plugins_json(DALLE_DISABLE_PLUGINS="example", **env)
    assert hidden["example"]["disabled"] and hidden["example"]["components"] == {}

    recipe = tmp_path / "example.yaml"
    recipe.write_text(
        "extends: shapes-demo\nname: example\ncodec: {name: palette-codec, params: {image_size: 32, cells: 4}}\n"
        "prior: {name: unigram-prior}\n"
    )
    ok = run_cli("recipes", "validate", str(recipe), env=env)
    assert ok.returncode == 0, ok.stderr
    refused = run_cli("recipes", "validate", str(recipe), env={**env, "DALLE_DISABLE_PLUGINS": "example"})
    assert refused.returncode == 2 and "unknown codec 'palette-codec'" in refused.stderr


def test_a_plugin_adds_a_stage_that_dalle_run_trains_evaluates_and_keeps_fresh(example_site, tmp_path):
    """The example plugin's `colour-scorer` stage: one class, and every command knows it."""
    env = {"PYTHONPATH": str(example_site)}
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(
        "extends: shapes-demo\n"
        "name: toy\n"
        f"output_dir: {tmp_path / 'runs' / '{name}'}\n"
        "data: {params: {samples_per_caption: 4, heldout_samples_per_caption: 2}}\n"
        "codec: {name: palette-codec, params: {image_size: 32, cells: 4}, train: {steps: 2, batch_size: 8}}\n"
        "prior: {name: unigram-prior, train: {steps: 20, batch_size: 8}}\n"
        "reranker: null\n"
        "colour-scorer: {name: mean-colour, train: {steps: 30, batch_size: 16, lr: 0.05}}\n"
        "evaluate: {captions: 2, candidates: 4, batches: 1, batch_size: 16}\n"
        "generate: {candidates: 4, keep: 2}\n"
    )
    stages = run_cli("components", "stage", "--json", env=env)
    assert [row["name"] for row in json.loads(stages.stdout)["stage"]] == ["codec", "colour-scorer", "prior", "reranker"]
    done = run_cli("run", str(recipe), "--quiet", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["colour-scorer"]["loss"] >= 0 and "bits_per_image_token" in report["prior"]
    assert report["generation"]["reranker_score_all"] is not None  # the plugin's stage ranks the candidates
    assert not any(key.startswith("clip_") for key in report["generation"])  # named by role, whatever the reranker
    run = tmp_path / "runs" / "toy"
    assert json.loads((run / "colour-scorer" / "meta.json").read_text())["plugin"] == "example"
    # retraining the codec makes the stages after it stale; `dalle run` retrains them, reuses nothing else
    assert run_cli("train", str(run), "--stage", "codec", "--force", "--quiet", env=env).returncode == 0
    again = run_cli("train", str(run), "--quiet", env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    results = json.loads(again.stdout)["stages"]
    assert results["codec"] == {"reused": True} and "loss" in results["colour-scorer"] and "loss" in results["prior"]
    evaluated = run_cli("evaluate", str(run), "--stage", "colour-scorer", "--quiet", env=env)
    assert evaluated.returncode == 0 and set(json.loads(evaluated.stdout)) == {"run", "recipe", "colour-scorer"}


def test_a_plugins_data_source_and_tokenizer_train_and_judge(example_site, tmp_path):
    env = {"PYTHONPATH": str(example_site)}
    recipe = tmp_path / "squares.yaml"
    recipe.write_text(
        "extends: shapes-demo\n"
        "name: squares\n"
        f"output_dir: {tmp_path / 'run'}\n"
        "data: {name: colour-squares, params: {image_size: 16, samples: 100}}\n"
        "tokenizer: {name: letters, params: {text_len: 24}}\n"
        "codec: {name: palette-codec, params: {image_size: 16, cells: 4}, train: {steps: 20, batch_size: 8, lr: 0.05}}\n"
        "prior: {name: unigram-prior, train: {steps: 20, batch_size: 8}}\n"
        "reranker: null\n"
        "evaluate: {captions: 4, candidates: 2, batches: 1, batch_size: 16}\n"
    )
    done = run_cli("run", str(recipe), "--quiet", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert set(report["generation"]["faithfulness_before_rerank"]) == {"square", "background", "all"}
    assert json.loads((tmp_path / "run" / "prior" / "meta.json").read_text())["identity"]["uses"]["tokenizer"]["name"] == "letters"


def test_broken_plugin_is_reported_and_cli_still_works(tmp_path):
    pkg = tmp_path / "site"
    (pkg / "dalle_broken").mkdir(parents=True)
    (pkg / "dalle_broken" / "__init__.py").write_text("raise ImportError('missing dependency foo')\n")
    dist = pkg / "dalle_broken-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: dalle-broken\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[dalle_framework]\nbroken = dalle_broken\n")
    plugins = plugins_json(PYTHONPATH=str(pkg))
    assert "ImportError: missing dependency foo" in plugins["broken"]["error"]
    assert plugins["dvae"]["components"]["codec"] == ["gumbel-dvae"]
    text = run_cli("plugins", env={"PYTHONPATH": str(pkg)})
    assert text.returncode == 0 and "error: ImportError" in text.stdout


def test_validate_reports_three_mistakes_and_exits_2(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(
        "extends: shapes-demo\n"
        "codec: {name: gumbel-dvea}\n"  # unknown component
        "prior: {params: {depth: four}}\n"  # wrong type
        "reranker: {params: {batch_sise: 8}}\n"  # unknown key
    )
    result = run_cli("recipes", "validate", str(recipe))
    assert result.returncode == 2
    err = result.stderr
    assert "3 problem(s)" in err
    assert "codec.name: unknown codec 'gumbel-dvea'; did you mean 'gumbel-dvae'" in err
    assert "prior.params.depth: Input should be a valid integer" in err
    assert "reranker.params.batch_sise: unknown key (not a field of this block); did you mean 'batch_size'?" in err
    assert "Traceback" not in err
    # the same overrides as `dalle train`, and an unknown key deep in a block gets its suggestion too
    assert run_cli("recipes", "validate", "shapes-demo", "prior.params.depth=4").returncode == 0
    fixed = run_cli("recipes", "validate", "shapes-demo", "prior.params.depth=four", "generate.sampling.temprature=2")
    assert fixed.returncode == 2 and "2 problem(s)" in fixed.stderr and "prior.params.depth" in fixed.stderr, fixed.stderr
    assert "generate.sampling.temprature: unknown key (not a field of this block); did you mean 'temperature'?" in fixed.stderr


def test_every_recipe_validates():
    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert len(recipes) >= 4
    result = run_cli("recipes", "validate", *map(str, recipes))
    assert result.returncode == 0, result.stderr


def test_recipes_ls_and_show_resolved():
    listing = run_cli("recipes", "ls")
    assert listing.returncode == 0 and "shapes-demo" in listing.stdout
    shown = run_cli("recipes", "show", "shapes-demo", "--resolved")
    assert shown.returncode == 0
    assert run_cli("recipes", "show", "--resolved", "shapes-demo").stdout == shown.stdout  # the flag first works too
    import yaml

    resolved = yaml.safe_load(shown.stdout)
    assert resolved["codec"]["train"]["engine"]["name"] in {"torch", "deepspeed"}
    assert "params" in resolved["prior"] and resolved["prior"]["params"]


def test_usage_errors_exit_2_without_traceback():
    for args in (["recipes", "show", "no-such-recipe"], ["train"], ["generate", "/nonexistent/run", "a cat"], ["frobnicate"]):
        result = run_cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr and result.stderr.startswith("error:"), result.stderr
    missing = run_cli("generate", "/nonexistent/run", "a cat")
    assert "/nonexistent/run: no such run directory or recipe file" in missing.stderr, missing.stderr


def test_components_lists_a_kind():
    result = run_cli("components", "prior", "--json")
    assert result.returncode == 0
    names = [row["name"] for row in json.loads(result.stdout)["prior"]]
    assert names == ["dense-transformer", "min-dalle", "rudalle", "sparse-transformer"]


def test_components_kind_name_shows_the_parameters_a_recipe_takes():
    shown = run_cli("components", "data", "folder", "--json")
    assert shown.returncode == 0, shown.stderr
    about = json.loads(shown.stdout)
    assert about["kind"] == "data" and about["name"] == "folder" and about["plugin"] == "data"
    rows = {row["name"]: row for row in about["params"]}
    assert rows["root"]["required"] and rows["root"]["type"] == "str"
    assert rows["image_size"] == {"name": "image_size", "type": "int", "required": False, "default": 64, "bounds": [">= 8", "<= 1024"],
                                  "description": rows["image_size"]["description"]} and rows["image_size"]["description"]
    text = run_cli("components", "codec", "gumbel-dvae")
    assert text.returncode == 0, text.stderr
    assert "  channel_mults: list[int] (default [1, 2, 4, 8], min length 1, max length 8)" in text.stdout
    assert "  vocab_size: int (default 8192, >= 2, <= 1048576)" in text.stdout
    wrong = run_cli("components", "codec", "gumbel-dvea")
    assert wrong.returncode == 2 and "did you mean 'gumbel-dvae'" in wrong.stderr and "Traceback" not in wrong.stderr


def test_an_unknown_component_says_its_plugin_may_be_missing(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("extends: shapes-demo\ncodec: {name: taming-vqgan-f16}\n")
    done = run_cli("recipes", "validate", str(recipe))
    assert done.returncode == 2 and "unknown codec 'taming-vqgan-f16'" in done.stderr
    assert "install that plugin (`dalle plugins` lists what loaded" in done.stderr, done.stderr


def test_output_into_a_closed_pipe_stops_quietly():
    """`dalle components codec gumbel-dvae | true`: the reader is gone before the first write; no error
    message, no traceback (exit 141, as for SIGPIPE)."""
    done = subprocess.run(f"{sys.executable} -m dalle_framework components codec gumbel-dvae | true; exit ${{PIPESTATUS[0]}}",
                          shell=True, executable="/bin/bash", cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 141 and done.stderr == "", done.stderr


MISSPELLED = """
from dalle_framework import hookimpl

@hookimpl
def dalle_register_codec(registry):
    pass

def dalle_registr_datasources(registry):
    pass

@hookimpl(specname="dalle_register_tokenisers")
def register_text(registry):
    pass

@hookimpl(specname="dalle_register_priors")
def register_priors(registry):
    pass
"""


def test_a_hook_that_matches_none_is_reported_with_the_hook_it_meant(tmp_path):
    pkg = tmp_path / "site"
    (pkg / "dalle_typo").mkdir(parents=True)
    (pkg / "dalle_typo" / "__init__.py").write_text(MISSPELLED)
    dist = pkg / "dalle_typo-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: dalle-typo\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[dalle_framework]\ntypo = dalle_typo\n")
    warnings = plugins_json(PYTHONPATH=str(pkg))["typo"]["warnings"]
    assert warnings == [
        "`dalle_register_codec` matches no hook and is never called; did you mean `dalle_register_codecs`?",
        "`dalle_registr_datasources` matches no hook and is never called; did you mean `dalle_register_datasources`?",
        "`dalle_register_tokenisers` matches no hook and is never called; did you mean `dalle_register_tokenizers`?",
    ]
    text = run_cli("plugins", env={"PYTHONPATH": str(pkg)})
    assert "warning: `dalle_register_codec` matches no hook" in text.stdout
    assert all(not p["warnings"] for name, p in plugins_json().items()), "a built-in plugin has a misspelled hook"


def test_quiet_silences_every_progress_bar(tmp_path):
    """The data sources', token encoding's and training's bars all go with -q; without it they show."""
    import yaml

    from test_train import tiny_recipe

    recipe = tiny_recipe(tmp_path / "run", **{"codec.train.steps": 2, "prior.train.steps": 2})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    loud = run_cli("train", str(path))
    assert loud.returncode == 0, loud.stderr[-2000:]
    assert all(f"{bar}" in loud.stderr for bar in ("shapes/train", "encode train", "train codec")), loud.stderr[-2000:]
    quiet = run_cli("train", str(path), "--force", "-q")
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert "%|" not in quiet.stderr and "it/s" not in quiet.stderr and "img/s" not in quiet.stderr, quiet.stderr[-2000:]


COMMANDS_PLUGIN = """
from dalle_framework import UsageError, hookimpl

def add_arguments(parser):
    parser.add_argument("--name", default="world", help="who to greet")

def hello(args):
    if args.name == "nobody":
        raise UsageError("--name: nobody is not a name")
    print(f"hello, {args.name}")
    return 0

@hookimpl
def dalle_register_commands(register):
    register("hello", hello, help="greet someone", add_arguments=add_arguments)
    register("train", hello, help="tries to take a built-in's name")
"""


def test_a_plugin_adds_a_command_and_built_ins_keep_theirs(tmp_path):
    pkg = tmp_path / "site"
    (pkg / "dalle_hello").mkdir(parents=True)
    (pkg / "dalle_hello" / "__init__.py").write_text(COMMANDS_PLUGIN)
    dist = pkg / "dalle_hello-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: dalle-hello\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[dalle_framework]\nhello = dalle_hello\n")
    env = {"PYTHONPATH": str(pkg)}
    done = run_cli("hello", "--name", "plugins", env=env)
    assert done.returncode == 0 and done.stdout == "hello, plugins\n", done.stderr
    refused = run_cli("hello", "--name", "nobody", env=env)
    assert refused.returncode == 2 and "error: --name: nobody is not a name" in refused.stderr
    helped = run_cli("hello", "--help", env=env)
    assert helped.returncode == 0 and "who to greet" in helped.stdout
    info = plugins_json(**env)["hello"]
    assert info["commands"] == ["hello", "train"] and info["error"] is None
    assert "command 'train' is a built-in command, which keeps its name" in info["warnings"][0]
    train = run_cli("train", "--help", env=env)
    assert "RECIPE" in train.stdout and "built-in" not in train.stdout  # still the built-in
    unknown = run_cli("helo", env=env)
    assert unknown.returncode == 2 and "invalid choice: 'helo'" in unknown.stderr and "'hello'" in unknown.stderr
    assert run_cli("hello").returncode == 2, "without the plugin there is no such command"
