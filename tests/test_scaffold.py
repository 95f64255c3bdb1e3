"""`dalle plugins new`: a package that installs, whose own test passes, whose recipe validates and trains."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import run_cli
from dalle_framework.scaffold import KINDS


def test_bad_names_kinds_and_taken_folders_are_usage_errors(tmp_path):
    for args, message in (
        (["My_Codec", "--kind", "codec"], "lower-case letters"),
        (["my-codec", "--kind", "vae"], "choose one of"),
    ):
        done = run_cli("plugins", "new", *args, "--dir", str(tmp_path))
        assert done.returncode == 2 and message in done.stderr, done.stderr
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("mine")
    done = run_cli("plugins", "new", "taken", "--kind", "codec", "--dir", str(tmp_path))
    assert done.returncode == 2 and "already exists" in done.stderr and (tmp_path / "taken" / "file").read_text() == "mine"


@pytest.mark.slow  # installs six packages and runs their tests (~2 minutes)
@pytest.mark.parametrize("kind", list(KINDS))
def test_a_new_plugin_installs_passes_its_own_test_and_its_recipe_validates(tmp_path, kind):
    name = f"my-{kind}"
    done = run_cli("plugins", "new", name, "--kind", kind, "--dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(site), str(tmp_path / name)],
                   check=True, capture_output=True, timeout=300)
    env = {"PYTHONPATH": str(site)}
    own = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=tmp_path / name,
                         capture_output=True, text=True, timeout=300, env={**__import__("os").environ, **env})
    assert own.returncode == 0, own.stdout[-2000:]
    listed = run_cli("plugins", "--json", env=env)
    assert name in listed.stdout
    assert run_cli("recipes", "validate", f"{name}-demo", env=env).returncode == 0
    if kind in ("codec", "data"):  # the stage it takes part in trains
        run = tmp_path / "run"
        trained = run_cli("train", f"{name}-demo", "codec.train.steps=3", f"output_dir={run}", "--stage", "codec", "--quiet", env=env)
        assert trained.returncode == 0, trained.stderr[-2000:]
        assert (run / "codec" / "model.safetensors").is_file()
