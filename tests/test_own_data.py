"""A research user's own images: a folder of captioned images, its tokenizer, its first run, as the README shows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run_cli

COLOURS = {"lime": (50, 205, 50), "beige": (245, 245, 220), "navy": (0, 0, 128), "coral": (255, 127, 80)}


@pytest.fixture(scope="module")
def own_folder(tmp_path_factory) -> Path:
    """40 images with their captions, as a user's folder: photos/NNN.png + photos/NNN.txt."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("own") / "photos"
    folder.mkdir()
    names = list(COLOURS)
    for i in range(40):
        shape, background = names[i % 4], names[(i // 4) % 4]
        image = np.zeros((24, 24, 3), np.uint8) + np.array(COLOURS[background], np.uint8)
        image[6:18, 6:18] = COLOURS[shape]
        Image.fromarray(image).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"a {shape} square on a {background} background\n")
    return folder


def own_recipe(tmp_path: Path, folder: Path, **tokenizer) -> Path:
    """shapes-demo extended with the user's folder, as a user would first try it."""
    recipe = {
        "extends": "shapes-demo",
        "name": "mine",
        "output_dir": str(tmp_path / "run"),
        "device": "cpu",
        "data": {"name": "folder", "params": {"root": str(folder), "image_size": 32, "heldout_percent": 20}},
        "codec": {"train": {"steps": 2, "batch_size": 8}},
        "prior": {"train": {"steps": 2, "batch_size": 8}},
        "reranker": {"train": {"steps": 2, "batch_size": 8}},
    }
    if tokenizer:
        recipe["tokenizer"] = tokenizer
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_captions_the_tokenizer_cannot_read_stop_the_run_naming_the_words(tmp_path, own_folder):
    done = run_cli("train", str(own_recipe(tmp_path, own_folder)), "--stage", "codec", "--quiet")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "reads" in done.stderr and "of the train caption words as unknown" in done.stderr
    assert "'lime'" in done.stderr and "'background'" in done.stderr and "name: bpe" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "run" / "codec" / "state").exists()


def test_a_recipe_may_accept_unknown_words_and_the_report_says_how_many(tmp_path, own_folder):
    path = own_recipe(tmp_path, own_folder, max_unknown=0.9)
    done = run_cli("train", str(path), "--stage", "codec", "--quiet")
    assert done.returncode == 0, done.stderr[-2000:]
    text = json.loads(done.stdout)["stages"]["text"]
    assert 0.3 < text["splits"]["train"]["unknown_share"] < 0.7  # lime/beige/navy/coral, square, on, background
    assert "of words unknown" in done.stderr
    # and generation says how the model read a caption it cannot read
    done = run_cli("generate", str(tmp_path / "run"), "a lime square on a beige background", "-n", "1", "--out", str(tmp_path / "g.png"), "--quiet")
    assert "as 'a <unk> square <unk> a <unk> <unk>' (unknown: lime, on, beige, background)" in done.stderr


def test_a_fitted_bpe_reports_what_it_learned_and_what_to_set(tmp_path, own_folder):
    path = own_recipe(tmp_path, own_folder, name="bpe", params={"vocab_size": 16384, "text_len": 256})
    done = run_cli("tokenizer", "train", str(path))
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)["text"]
    assert report["vocab"]["asked"] == 16384 and report["vocab"]["learned"] < 1000
    assert report["splits"]["train"]["unknown_share"] == 0 and report["splits"]["train"]["tokens"]["max"] < 16
    assert any("set tokenizer.params.vocab_size to" in line for line in report["advice"])
    assert any("set tokenizer.params.text_len to" in line for line in report["advice"])
    assert "ids learned of 16384 asked for" in done.stderr


def _readme_blocks(section: str, language: str) -> list[str]:
    """The ``language`` code blocks of one README section, in order."""
    import re

    readme = (ROOT / "README.md").read_text()
    start = readme.index(f"## {section}\n")
    body = readme[start : readme.index("\n## ", start + 3)]
    return re.findall(rf"```{language}\n(.*?)```", body, flags=re.S)


@pytest.mark.slow
def test_the_readme_own_images_section_works_as_written(tmp_path, own_folder):
    """The README's own-data recipe and commands, on a folder of 40 captioned images (schedules cut short)."""
    recipe_text, shards_yaml = _readme_blocks("Train on your own images", "yaml")
    recipe = yaml.safe_load(recipe_text)
    assert recipe["data"]["params"]["root"] == "photos" and recipe["tokenizer"]["name"] == "bpe"
    (tmp_path / "photos").symlink_to(own_folder)  # the recipe names `photos`, relative to where dalle runs
    (tmp_path / "mine.yaml").write_text(recipe_text)
    short = ["codec.train.steps=2", "prior.train.steps=2", "reranker.train.steps=2", "evaluate.rounds=1", "evaluate.candidates=2"]
    for command in (["recipes", "validate", "mine.yaml"], ["tokenizer", "train", "mine.yaml"], ["run", "mine.yaml", *short, "-q"]):
        done = run_cli(*command, cwd=tmp_path)
        assert done.returncode == 0 and "Traceback" not in done.stderr, (command, done.stderr[-2000:])
    assert json.loads((tmp_path / "runs" / "mine" / "eval" / "report.json").read_text())["recipe"] == "mine"
    done = run_cli("generate", "runs/mine", "a lime square on a navy background", "-n", "2", "--keep", "1", "--out-dir", "out", "-q", cwd=tmp_path)
    assert done.returncode == 0 and len(list((tmp_path / "out").glob("*.png"))) == 1, done.stderr[-2000:]
    done = run_cli("data", "shards", "folder", "shards", "--param", "root=photos", "--param", "image_size=32", "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    stats = json.loads(done.stdout)
    shards = yaml.safe_load(shards_yaml)
    shards["data"]["params"] = {"train_urls": stats["train"]["pattern"], "heldout_urls": stats["heldout"]["pattern"]}
    (tmp_path / "streamed.yaml").write_text(yaml.safe_dump({**recipe, "name": "streamed", **shards}))
    done = run_cli("recipes", "validate", "streamed.yaml", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
