"""Trust: what the framework reads from others never runs code; what it trains is never lost or faked.

Each class of the README's guarantees has tests here: files planted with a
pickle payload in every file of a run directory, recipes that try to run
commands, diverging runs, interrupted checkpoints, stale stages, two writers,
file permissions, plugins that hijack names or exit, and bad input of every
kind (exit code 2, a message, no traceback).
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import shutil
import signal
import stat
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import Field

from conftest import ROOT, returns_within, run_cli
from dalle_framework import DalleError, ImageCodec, Params, UsageError, hookimpl, rundir
from dalle_framework.cli import main
from dalle_framework.pipeline import Pipeline
from dalle_framework.recipe import recipe_from_dict
from dalle_framework.train.loop import train_all, train_stage
from test_train import tiny_recipe


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path) -> None:
    """Replace ``path`` by a payload: a real torch file for ``.pt``, raw pickle bytes for anything else."""
    if path.suffix == ".pt":
        torch.save({"state": Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"state": Payload(marker)}))


def cli(*args: str, capsys) -> tuple[int, str]:
    """``dalle ARGS`` in this process: (exit code, stderr)."""
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A tiny run (codec + prior, torch engine) trained through the CLI, with checkpoints and token shards."""
    from dalle_framework.plugins import set_plugin_manager

    set_plugin_manager(None)
    root = tmp_path_factory.mktemp("trained")
    recipe = tiny_recipe(root / "run", **{"codec.train.steps": 4, "codec.train.ckpt_every": 2, "prior.train.steps": 2})
    assert main(["train", str(write_recipe(root / "tiny.yaml", recipe)), "--quiet"]) == 0
    return root / "run"


# ----------------------------------------------------------------------------- code execution


def test_payload_in_any_file_of_a_torch_run_never_runs(trained_run, tmp_path, capsys):
    files = sorted(p.relative_to(trained_run) for p in trained_run.rglob("*") if p.is_file() and "tb" not in p.parts and p.name != ".lock")
    assert {Path("recipe.yaml"), Path("codec/state/state.pt"), Path("codec/resume.json"), Path("tokens/train/000000.safetensors"), Path("tokens/train.json")} <= set(files)
    marker = tmp_path / "pwned"
    for relative in files:
        copy = tmp_path / f"run-{'-'.join(relative.parts)}"
        shutil.copytree(trained_run, copy)
        plant(copy / relative, marker)
        codes = []
        for args in (  # between them these read every file of the run
            ["generate", copy, "a red circle in the top left", "-n", "1", "--quiet", "--out", tmp_path / "grid.png"],
            ["train", copy, "--stage", "prior", "--resume", "--quiet", "prior.train.steps=3"],
            ["train", copy, "--stage", "codec", "--resume", "--quiet", "codec.train.steps=6"],
        ):
            code, err = cli(*args, capsys=capsys)
            assert code in (0, 2), (relative, args[0], err)
            assert "Traceback" not in err
            codes.append((code, err))
        refused = [err for code, err in codes if code == 2]
        assert refused, f"{relative}: a planted file was accepted by every command"
        assert any(relative.name in err or "refused" in err for err in refused), (relative, refused)
        assert not marker.exists(), f"the payload in {relative} ran"


@pytest.mark.slow
def test_payload_in_any_file_of_a_deepspeed_run_never_runs(tmp_path):
    recipe = tiny_recipe(tmp_path / "run", **{"codec.train.steps": 2, "codec.train.engine": {"name": "deepspeed", "params": {"zero_stage": 2}}})
    recipe.pop("prior")
    path = write_recipe(tmp_path / "ds.yaml", recipe)
    done = run_cli("train", str(path), "--quiet")
    assert done.returncode == 0, done.stderr
    state = tmp_path / "run" / "codec" / "state"
    planted = sorted(p.relative_to(state) for p in state.rglob("*.pt"))
    assert any("optim_states" in p.name for p in planted) and any("model_states" in p.name for p in planted), planted
    marker = tmp_path / "pwned"
    for relative in planted:
        copy = tmp_path / f"copy-{relative.name}"
        shutil.copytree(tmp_path / "run", copy)
        plant(copy / "codec" / "state" / relative, marker)
        result = run_cli("train", str(copy), "--resume", "--quiet", "codec.train.steps=4")
        assert result.returncode == 2, (relative, result.stderr[-2000:])
        assert "refused to load" in result.stderr and relative.name in result.stderr and "Traceback" not in result.stderr
        assert not marker.exists(), f"the payload in {relative} ran"
    # the untouched run resumes: DeepSpeed's own files load weights-only
    resumed = run_cli("train", str(tmp_path / "run"), "--resume", "--quiet", "codec.train.steps=4")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "codec" / "meta.json").read_text())["step"] == 4


def test_recipe_cannot_run_commands(tmp_path, capsys):
    marker = tmp_path / "pwned"
    recipe = tiny_recipe(tmp_path / "run")
    recipe["data"] = {"name": "webdataset", "params": {"train_urls": f"pipe:touch {marker}; cat /dev/null"}}
    path = write_recipe(tmp_path / "evil.yaml", recipe)
    for args in (["recipes", "validate", path], ["train", path, "--quiet"]):
        code, err = cli(*args, capsys=capsys)
        assert code == 2 and "run a command or reach the network" in err, err
    assert not marker.exists()


def test_deepspeed_config_cannot_write_files_elsewhere(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path / "run")
    recipe["codec"]["train"]["engine"] = {
        "name": "deepspeed",
        "params": {"config": {"tensorboard": {"enabled": True, "output_path": str(tmp_path / "elsewhere")}}},
    }
    code, err = cli("recipes", "validate", write_recipe(tmp_path / "r.yaml", recipe), capsys=capsys)
    assert code == 2 and "codec.train.engine.params.config" in err and "tensorboard" in err


# ----------------------------------------------------------------------------- never save garbage


class NanCodec(ImageCodec):
    """A real, trainable 1x1-conv codec whose training loss turns NaN from its ``nan_from``-th
    training batch on (or only on the batches in ``nan_batches``): a bad batch, as in real data."""

    class Params(Params):
        image_size: int = 16
        nan_from: int = Field(10**9, description="first training batch (1-based) with a NaN loss")
        nan_batches: list[int] = Field(default_factory=list, description="only these training batches are NaN")

    def __init__(self, params):
        super().__init__()
        self.params, self.vocab_size, self.image_size, self.grid = params, 8, params.image_size, (2, 2)
        self.batches = 0
        self.proj = torch.nn.Conv2d(3, 8, 1)
        self.embed = torch.nn.Conv2d(8, 3, 1)

    def encode(self, images):
        return self.proj(torch.nn.functional.adaptive_avg_pool2d(images, 2)).flatten(2).argmax(1)

    def decode(self, tokens):
        onehot = torch.nn.functional.one_hot(tokens, 8).float().transpose(1, 2).reshape(len(tokens), 8, 2, 2)
        return torch.nn.functional.interpolate(self.embed(onehot), size=self.image_size).sigmoid()

    def loss(self, images, step=0):
        soft = self.proj(torch.nn.functional.adaptive_avg_pool2d(images, 2)).softmax(1)
        recon = torch.nn.functional.interpolate(self.embed(soft), size=self.image_size).sigmoid()
        loss = (recon - images).pow(2).mean()
        if self.training:
            self.batches += 1
            p = self.params
            if (self.batches >= p.nan_from and not p.nan_batches) or self.batches in p.nan_batches:
                loss = loss * float("nan")
        return {"loss": loss}


@pytest.fixture
def nan_codec(manager):
    plugin = types.ModuleType("nan_plugin")
    plugin.dalle_register_codecs = hookimpl(lambda registry: registry.register(NanCodec, name="nan-codec"))
    manager.add_plugin(plugin, name="nan-plugin")
    yield manager
    manager.remove_plugin("nan-plugin")


def nan_recipe(run: Path, **params) -> dict:
    recipe = tiny_recipe(run, **{"codec.train.steps": 8, "codec.train.ckpt_every": 2})
    recipe["codec"]["name"] = "nan-codec"
    recipe["codec"]["params"] = {"image_size": 16, **params}
    recipe.pop("prior")
    return recipe


def test_diverged_run_stops_keeps_last_finite_checkpoint_and_is_not_complete(nan_codec, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(DalleError) as info:
        train_stage(Pipeline(recipe_from_dict(nan_recipe(run, nan_from=5))), "codec", progress=False)
    message = str(info.value)
    assert "codec: the loss is nan at step 5" in message and "last finite checkpoint (step 4)" in message
    assert "codec.train.nonfinite: skip" in message
    assert not (run / "codec" / "meta.json").exists() and not (run / "codec" / "model.safetensors").exists()
    assert json.loads((run / "codec" / "resume.json").read_text())["step"] == 4
    state = rundir.load_weights(rundir.find_checkpoint(run / "codec" / "state") / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in state.values())
    # a rerun does not mistake the run for a finished one: it resumes from the last finite checkpoint
    # (this test codec's bad batches are counted per process, so the rerun gets past them)
    results = train_all(Pipeline(recipe_from_dict(nan_recipe(run, nan_from=5))), resume=True, progress=False)
    assert "loss" in results["codec"] and json.loads((run / "codec" / "meta.json").read_text())["step"] == 8


def test_nonfinite_skip_goes_on_and_gives_up_after_max_skipped(nan_codec, tmp_path):
    recipe = nan_recipe(tmp_path / "skip", nan_batches=[3, 6, 7])
    recipe["codec"]["train"].update(nonfinite="skip", grad_accum=2)
    metrics = train_stage(Pipeline(recipe_from_dict(recipe)), "codec", progress=False)
    meta = json.loads((tmp_path / "skip" / "codec" / "meta.json").read_text())
    assert meta["complete"] and meta["step"] == 8 and meta["skipped"] == 3 and metrics["loss"] == metrics["loss"]

    always = nan_recipe(tmp_path / "always", nan_from=3)
    always["codec"]["train"].update(nonfinite="skip", max_skipped=3)
    with pytest.raises(DalleError, match="at step 3"):
        train_stage(Pipeline(recipe_from_dict(always)), "codec", progress=False)


def test_real_divergence_through_the_cli_exits_nonzero_without_saving(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path / "run", **{"codec.train.lr": 1e6, "codec.train.grad_clip": None, "codec.train.steps": 30})
    recipe.pop("prior")
    code, err = cli("train", write_recipe(tmp_path / "r.yaml", recipe), "--quiet", capsys=capsys)
    assert code == 1 and "training stopped and nothing of this run was saved" in err and "Traceback" not in err, err
    assert not (tmp_path / "run" / "codec" / "meta.json").exists()


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1e999"])
def test_non_finite_numbers_do_not_validate(tmp_path, capsys, value):
    recipe = tiny_recipe(tmp_path / "run")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe).replace("lr: 0.001", f"lr: {value}", 1))
    code, err = cli("recipes", "validate", path, capsys=capsys)
    assert code == 2 and "codec.train.lr" in err, err


def test_resume_finds_a_checkpoint_left_between_the_two_renames(manager, tmp_path):
    recipe = tiny_recipe(tmp_path / "run", **{"codec.train.steps": 4, "codec.train.ckpt_every": 2, "codec.train.log_every": 1})
    train_stage(Pipeline(recipe_from_dict(recipe)), "codec", progress=False)
    codec = tmp_path / "run" / "codec"
    # a crash after `state` was renamed aside and before the new one took its place
    os.replace(codec / "state", codec / "state.old")
    for name in ("meta.json", "model.safetensors"):
        (codec / name).unlink()
    recipe["codec"]["train"]["steps"] = 6
    train_stage(Pipeline(recipe_from_dict(recipe)), "codec", resume=True, progress=False)
    assert json.loads((codec / "meta.json").read_text())["step"] == 6
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    newest = max((tmp_path / "run" / "tb" / "codec").glob("events.*"), key=lambda p: p.stat().st_mtime_ns)
    events = EventAccumulator(str(newest))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [5, 6]  # resumed at step 4, not restarted
    assert not (codec / "state.old").exists() and (codec / "state").is_dir()


def test_an_unfinished_run_is_not_silently_restarted(manager, tmp_path):
    recipe = tiny_recipe(tmp_path / "run", **{"codec.train.steps": 2, "codec.train.ckpt_every": 2})
    train_stage(Pipeline(recipe_from_dict(recipe)), "codec", progress=False)
    codec = tmp_path / "run" / "codec"
    for name in ("meta.json", "model.safetensors"):  # as if killed after the last checkpoint
        (codec / name).unlink()
    recipe["codec"]["train"]["steps"] = 4
    with pytest.raises(UsageError, match=r"stopped at step 2 .*--resume.*--force"):
        train_all(Pipeline(recipe_from_dict(recipe)), ["codec"], progress=False)
    train_all(Pipeline(recipe_from_dict(recipe)), ["codec"], force=True, progress=False)
    assert json.loads((codec / "meta.json").read_text())["step"] == 4


def test_a_finished_stage_with_a_changed_train_block_is_retrained_not_called_unfinished(manager, tmp_path):
    recipe = tiny_recipe(tmp_path / "run", **{"codec.train.steps": 4, "codec.train.ckpt_every": 2})
    recipe.pop("prior")
    train_all(Pipeline(recipe_from_dict(recipe)), progress=False)
    codec = tmp_path / "run" / "codec"
    first = json.loads((codec / "meta.json").read_text())
    for resume, lr in ((False, 2e-3), (True, 3e-3)):  # `dalle train`, and `dalle run` (which resumes)
        recipe["codec"]["train"]["lr"] = lr
        results = train_all(Pipeline(recipe_from_dict(recipe)), resume=resume, progress=False)
        meta = json.loads((codec / "meta.json").read_text())
        assert "loss" in results["codec"] and meta["run_id"] != first["run_id"] and meta["step"] == 4
        assert meta["identity"]["block"]["train"]["lr"] == lr
    # a finished run's checkpoint resumed with fewer steps would publish the old weights as the new stage
    recipe["codec"]["train"]["steps"] = 2
    train_all(Pipeline(recipe_from_dict(recipe)), resume=True, progress=False)
    tb = sorted((tmp_path / "run" / "tb" / "codec").glob("events.*"), key=lambda p: p.stat().st_mtime_ns)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb[-1]))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")][0] == 1  # trained from step 0, not exported from step 4


def test_an_unfinished_checkpoint_past_the_schedule_is_refused(manager, tmp_path):
    recipe = tiny_recipe(tmp_path / "run", **{"codec.train.steps": 4, "codec.train.ckpt_every": 2})
    recipe.pop("prior")
    train_stage(Pipeline(recipe_from_dict(recipe)), "codec", progress=False)
    _unfinish(tmp_path / "run")
    recipe["codec"]["train"]["steps"] = 3
    with pytest.raises(UsageError, match=r"at step 4, past codec.train.steps = 3"):
        train_all(Pipeline(recipe_from_dict(recipe)), resume=True, progress=False)
    assert not (tmp_path / "run" / "codec" / "meta.json").exists()


def test_zero_steps_does_not_validate(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path / "run", **{"codec.train.steps": 0})
    code, err = cli("recipes", "validate", write_recipe(tmp_path / "r.yaml", recipe), capsys=capsys)
    assert code == 2 and "codec.train.steps" in err, err


def test_retraining_the_codec_makes_the_prior_stale(manager, tmp_path):
    recipe = tiny_recipe(tmp_path / "run")
    first = train_all(Pipeline(recipe_from_dict(recipe)), progress=False)
    assert {"codec", "prior"} <= set(first) and "bits_per_image_token" in first["prior"]
    train_all(Pipeline(recipe_from_dict(recipe)), ["codec"], force=True, progress=False)
    # the prior was trained on the old codec's tokens: generation refuses it ...
    with pytest.raises(UsageError, match=r"prior: trained on another codec .* stale"):
        Pipeline.load(tmp_path / "run").generate(["a red circle in the top left"], candidates=1)
    # ... and training everything retrains it instead of reusing it
    again = train_all(Pipeline(recipe_from_dict(recipe)), progress=False)
    assert again["codec"] == {"reused": True} and "bits_per_image_token" in again["prior"]
    Pipeline.load(tmp_path / "run").generate(["a red circle in the top left"], candidates=1)


def test_a_run_directory_has_one_writer_and_one_recipe(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    with rundir.locked(run, "dalle train (a test holding the lock)"):
        result = run_cli("train", str(run), "--quiet")
        assert result.returncode == 2, result.stderr
        assert "in use by pid" in result.stderr and "a test holding the lock" in result.stderr
    # another codec in the same output_dir: refused, naming the difference; --force accepts it
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["codec"]["params"]["vocab_size"] = 24
    other = write_recipe(tmp_path / "other.yaml", recipe)
    code, err = cli("train", other, "--stage", "codec", "--quiet", capsys=capsys)
    assert code == 2 and "codec.params.vocab_size: 32 in the run, 24 now" in err and "--force" in err, err
    assert yaml.safe_load((run / "recipe.yaml").read_text())["codec"]["params"]["vocab_size"] == 32


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_files_get_the_permissions_the_umask_allows(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        rundir.write_json(tmp_path / "meta.json", {"a": 1})
        rundir.save_weights(tmp_path / "model.safetensors", {"w": torch.ones(2)})
        with rundir.atomic_directory(tmp_path / "state", collective=False) as tmp:
            (tmp / "x").write_text("x")
    finally:
        os.umask(old)
    for name in ("meta.json", "model.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == mode | 0o111 & ~umask


# ----------------------------------------------------------------------------- plugins


def fake_distribution(site: Path, dist: str, entry_name: str, module: str, code: str) -> None:
    (site / module).mkdir(parents=True)
    (site / module / "__init__.py").write_text(code)
    info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[dalle_framework]\n{entry_name} = {module}\n")


HIJACK = """
from dalle_framework import hookimpl
from dalle_vqvae import VQVAE

class Impostor(VQVAE):
    '''Pretends to be the built-in VQ-VAE.'''

@hookimpl
def dalle_register_codecs(registry):
    registry.register(Impostor, name="vq-vae")
"""


def test_builtins_keep_their_names_and_the_newcomer_is_reported(tmp_path):
    site = tmp_path / "site"
    fake_distribution(site, "evil-codecs", "evil", "dalle_evil", HIJACK)
    fake_distribution(site, "evil-names", "vqvae", "dalle_evil_names", "raise SystemExit('should never load')\n")
    result = run_cli("plugins", "--json", env={"PYTHONPATH": str(site)})
    assert result.returncode == 0, result.stderr
    plugins = {p["name"]: p for p in json.loads(result.stdout)["plugins"]}
    assert plugins["vqvae"]["distribution"] == "dalle-framework" and plugins["vqvae"]["error"] is None
    assert plugins["vqvae"]["components"] == {"codec": ["vq-vae"]}
    assert "already registered by plugin 'vqvae'" in plugins["evil"]["error"] and plugins["evil"]["components"] == {}
    assert "already used by dalle-framework" in plugins["vqvae (evil-names)"]["error"]
    shown = run_cli("components", "codec", "--json", env={"PYTHONPATH": str(site)})
    assert [c["plugin"] for c in json.loads(shown.stdout)["codec"] if c["name"] == "vq-vae"] == ["vqvae"]


RAISES_IN_HOOK = """
from dalle_framework import hookimpl

@hookimpl
def dalle_register_codecs(registry):
    raise KeyboardInterrupt
"""


@pytest.mark.parametrize(
    "code", ["import sys\nsys.exit(3)\n", "raise BaseException('boom')\n", "raise SystemExit\n", "raise KeyboardInterrupt\n", RAISES_IN_HOOK]
)
def test_a_plugin_that_exits_on_import_is_isolated(tmp_path, code):
    site = tmp_path / "site"
    fake_distribution(site, "exiting", "exiting", "dalle_exiting", code)
    result = run_cli("plugins", "--json", env={"PYTHONPATH": str(site)})
    assert result.returncode == 0, result.stderr
    plugins = {p["name"]: p for p in json.loads(result.stdout)["plugins"]}
    assert plugins["exiting"]["error"] and plugins["dvae"]["components"] == {"codec": ["gumbel-dvae"]}
    validated = run_cli("recipes", "validate", "shapes-demo", env={"PYTHONPATH": str(site)})
    assert validated.returncode == 0, validated.stderr


NOISY = """
import os, subprocess, sys
from dalle_framework import hookimpl
print("noisy: imported")
sys.stdout.write("noisy: written\\n")
subprocess.run([sys.executable, "-c", "print('noisy: from a subprocess')"])
os.write(1, b"noisy: straight to fd 1\\n")

@hookimpl
def dalle_register_recipe_dirs(register):
    print("noisy: in a hook")
"""


def test_what_a_plugin_prints_while_loading_goes_to_stderr_and_json_stays_parseable(tmp_path):
    site = tmp_path / "site"
    fake_distribution(site, "noisy", "noisy", "dalle_noisy", NOISY)
    result = run_cli("plugins", "--json", env={"PYTHONPATH": str(site)})
    assert result.returncode == 0, result.stderr
    plugins = {p["name"]: p for p in json.loads(result.stdout)["plugins"]}
    assert plugins["noisy"]["error"] is None and "dalle_register_recipe_dirs" in plugins["noisy"]["hooks"]
    for said in ("imported", "written", "from a subprocess", "straight to fd 1", "in a hook"):
        assert f"noisy: {said}" in result.stderr and f"noisy: {said}" not in result.stdout


def test_a_real_ctrl_c_while_a_plugin_loads_still_stops_the_command(tmp_path):
    site = tmp_path / "site"
    code = "import sys, time\nprint('slow: loading', file=sys.stderr, flush=True)\ntime.sleep(60)\n"
    fake_distribution(site, "slow", "slow", "dalle_slow", code)
    started = subprocess.Popen([sys.executable, "-m", "dalle_framework", "plugins", "--json"], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(site)})
    assert "slow: loading" in started.stderr.readline()
    started.send_signal(signal.SIGINT)
    out, err = started.communicate(timeout=60)
    assert started.returncode == 130 and out == "", err


STASHES_REGISTRY = '''
from dalle_framework import hookimpl
from dalle_vqvae import VQVAE

class Impostor(VQVAE):
    """Pretends to be the built-in VQ-VAE."""

kept = []

@hookimpl
def dalle_register_codecs(registry):
    kept.append(registry)
    registry.unregister("vq-vae")
    registry.register(Impostor, name="vq-vae")
'''


def test_registries_close_once_plugins_have_loaded(tmp_path, monkeypatch):
    """Neither a plugin's hook nor code that kept a registry can remove or replace a component
    another plugin registered, and the registries themselves cannot be swapped."""
    from dalle_framework.errors import RegistryError
    from dalle_framework.plugins import PluginManager

    (tmp_path / "dalle_stash.py").write_text(STASHES_REGISTRY)
    monkeypatch.syspath_prepend(str(tmp_path))
    import dalle_stash

    manager = PluginManager()
    info = manager.add_plugin(dalle_stash, name="stash")
    assert "cannot unregister codec 'vq-vae': it belongs to plugin 'vqvae'" in info.error
    codecs = manager.registry("codec")
    assert codecs.get("vq-vae").plugin == "vqvae" and codecs.get("vq-vae") is not dalle_stash.Impostor
    for attempt in (lambda: dalle_stash.kept[0].unregister("vq-vae"), lambda: codecs.register(dalle_stash.Impostor, name="vq-vae-2")):
        with pytest.raises(RegistryError, match="the codec registry is closed once plugins have loaded"):
            attempt()
    with pytest.raises(TypeError):
        manager.registries["codec"] = codecs  # type: ignore[index]
    assert "vq-vae-2" not in codecs and codecs.get("vq-vae").plugin == "vqvae"


def test_hooks_are_called_through_pluggy_so_specname_works(bare_manager):
    from dalle_framework import Tokenizer

    class Chars(Tokenizer):
        vocab_size, text_len = 10, 4

        def __init__(self, params):
            pass

        def encode(self, texts):
            return torch.zeros(len(texts), 4, dtype=torch.long)

        def decode(self, ids):
            return ["" for _ in ids]

    plugin = types.ModuleType("renamed_hooks")
    plugin.register_my_tokenizers = hookimpl(specname="dalle_register_tokenizers")(lambda registry: registry.register(Chars, name="chars"))
    info = bare_manager.add_plugin(plugin, name="renamed")
    assert info.error is None and info.components == {"tokenizer": ["chars"]}


# ----------------------------------------------------------------------------- bad input: exit 2, a message, no traceback


def recipe_text_cases(tmp_path: Path) -> dict[str, bytes]:
    recipe = tiny_recipe(tmp_path / "run")
    base = yaml.safe_dump(recipe)
    # nine levels of nine aliases: 9**9 values once expanded, from a few hundred bytes
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    recipe["codec"]["train"]["engine"] = {"name": "deepspeed", "params": {"config": "BOMB"}}
    bombed = yaml.safe_dump(recipe)
    indent = next(line for line in bombed.splitlines() if "config: BOMB" in line).index("config")
    bombed = bombed.replace("config: BOMB", "config:\n" + "".join(" " * (indent + 2) + line + "\n" for line in bomb.splitlines()))
    clip = (
        "\nreranker:\n  name: clip\n  params:\n    config: {embed_dim: 8, vision_cfg: {image_size: 16, patch_size: 32, width: 8, "
        "layers: 1}, text_cfg: {context_length: 8, width: 8, heads: 1, layers: 1}}\n"
    )
    return {
        "not utf-8": base.encode() + b"\ndescription: \xff\xfe\n",
        "extends: 5": b"extends: 5\n" + base.encode(),
        "extends holding null": b"extends: [null, shapes-demo]\n" + base.encode(),
        "unknown placeholder": base.replace(f"output_dir: {tmp_path / 'run'}", "output_dir: runs/{nme}").encode(),
        "20-digit seed": base.replace("seed: 1", "seed: 12345678901234567890").encode(),
        "alias bomb in the deepspeed config": bombed.encode(),
        "50 MB": base.encode() + b"\ndescription: '" + b"x" * (50 * 2**20) + b"'\n",
        "a list": b"- 1\n- 2\n",
        "clip patch larger than the image": base.encode() + clip.encode(),
        "prior width not divisible by heads": base.replace("heads: 2", "heads: 3").encode(),
    }


def test_bad_recipes_are_clear_errors(tmp_path, capsys):
    for name, text in recipe_text_cases(tmp_path).items():
        path = tmp_path / f"{name.replace(' ', '_')}.yaml"
        path.write_bytes(text)
        code, err = cli("recipes", "validate", path, capsys=capsys)
        assert code == 2, (name, err[-500:])
        assert "Traceback" not in err and len(err) < 5000, name


def test_heldout_percent_zero_and_empty_folders_are_clear_errors(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path / "run")
    (tmp_path / "images").mkdir()
    recipe["data"] = {"name": "folder", "params": {"root": str(tmp_path / "images"), "image_size": 16, "heldout_percent": 0}}
    code, err = cli("recipes", "validate", write_recipe(tmp_path / "r.yaml", recipe), capsys=capsys)
    assert code == 2 and "data.params.heldout_percent" in err
    recipe["data"]["params"]["heldout_percent"] = 10
    code, err = cli("train", write_recipe(tmp_path / "r.yaml", recipe), "--quiet", capsys=capsys)
    assert code == 2 and "no images" in err and "images" in err, err


def test_damaged_run_files_are_clear_errors(trained_run, tmp_path, capsys):
    for relative, damage in (
        ("codec/model.safetensors", lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])),
        ("codec/meta.json", lambda p: p.write_text(p.read_text()[:40])),
        ("recipe.yaml", lambda p: p.write_text("codec: [")),
        ("prior/model.safetensors", lambda p: p.write_bytes(b"")),
    ):
        run = tmp_path / relative.replace("/", "-")
        shutil.copytree(trained_run, run)
        damage(run / relative)
        code, err = cli("generate", run, "a red circle in the top left", "-n", "1", "--quiet", "--out", tmp_path / "g.png", capsys=capsys)
        assert code == 2 and Path(relative).name in err and "Traceback" not in err, (relative, err)


def test_json_files_that_block_never_end_or_overflow_the_parser_are_clear_errors(tmp_path):
    """A FIFO blocks a plain open, /dev/zero never ends: read_json refuses both without reading a byte."""
    os.mkfifo(tmp_path / "fifo.json")
    (tmp_path / "zero.json").symlink_to("/dev/zero")
    (tmp_path / "deep.json").write_text("[" * 100_000)
    with open(tmp_path / "big.json", "wb") as big:
        big.truncate(rundir.MAX_JSON_BYTES + 1)  # sparse: nothing is written
    (tmp_path / "dir.json").mkdir()
    expected = {
        "fifo.json": "not a regular file", "zero.json": "not a regular file", "deep.json": "damaged, not valid JSON",
        "big.json": "far too large", "dir.json": "is a directory",
    }
    for name, message in expected.items():
        with pytest.raises(UsageError) as refusal:
            returns_within(10, functools.partial(rundir.read_json, tmp_path / name))
        assert message in str(refusal.value) and name in str(refusal.value), refusal.value


@pytest.mark.parametrize(
    "args,expected",
    [
        (["-n", "-1"], "-n: -1 is out of range"),
        (["-n", "0"], "-n: 0 is out of range"),
        (["--keep", "-3"], "--keep: -3 is out of range"),
        (["-n", "2", "--keep", "3"], "--keep 3 is more than -n 2"),
        (["--guidance", "inf"], "--guidance-scale/--guidance: 'inf' is not a finite number"),
        (["--guidance-scale", "-1"], "--guidance-scale: Input should be greater than or equal to 0"),
        (["--temperature", "0"], "--temperature: Input should be greater than or equal to 0.0001"),
        (["--temperature", "1e-300"], "--temperature: Input should be greater than or equal to 0.0001"),
        (["--temperature", "1e300"], "--temperature: Input should be less than or equal to 10000"),
        (["--guidance", "1e300"], "--guidance-scale: Input should be less than or equal to 1000"),
        (["--top-p", "1e300"], "--top-p: Input should be less than or equal to 1"),
        (["--keep", "50"], "keep (50) is more than the 2 candidates"),
        (["--seed", "12345678901234567890"], "--seed: 12345678901234567890 is out of range"),
        (["--device", "bogus"], "device 'bogus'"),
        (["--device", "cuda"], "no CUDA GPU"),
        (["--device", "mps"], "no Apple GPU"),
        (["--prime", "/nonexistent.png", "--prime-rows", "1"], "--prime /nonexistent.png: cannot read"),
    ],
)
def test_bad_generate_arguments_are_clear_errors(trained_run, tmp_path, capsys, args, expected):
    if (expected == "no CUDA GPU" and torch.cuda.is_available()) or (expected == "no Apple GPU" and torch.backends.mps.is_available()):
        pytest.skip("this machine has that GPU")
    code, err = cli("generate", trained_run, "a red circle in the top left", "--quiet", "--out", tmp_path / "g.png", *args, capsys=capsys)
    assert code == 2 and expected in err and "Traceback" not in err, err


@pytest.mark.parametrize("args", [["--top-p", "1e-300"], ["--temperature", "1e-4", "--guidance", "1000"],
                                  ["--temperature", "1e4", "--top-k", "2147483648"], ["--guidance", "1e-300"]])
def test_extreme_sampling_values_that_validate_also_generate(trained_run, tmp_path, capsys, args):
    code, err = cli("generate", trained_run, "a red circle in the top left", "-n", "2", "--quiet", "--out", tmp_path / "g.png", *args, capsys=capsys)
    assert code == 0 and (tmp_path / "g.png").is_file(), err


def test_sweeps_and_extends_lists_are_bounded(trained_run, tmp_path, capsys):
    axes = ["--sweep", "top_k=" + ",".join(map(str, range(1, 101))), "--sweep", "guidance_scale=" + ",".join(map(str, range(1, 101)))]
    code, err = cli("evaluate", trained_run, *axes, "--quiet", capsys=capsys)
    assert code == 2 and "10000 settings, more than 1000" in err, err
    base = write_recipe(tmp_path / "base.yaml", tiny_recipe(tmp_path / "run"))
    (tmp_path / "wide.yaml").write_text(yaml.safe_dump({"extends": [str(base)] * 1000}))
    code, err = cli("recipes", "validate", tmp_path / "wide.yaml", capsys=capsys)
    assert code == 2 and "lists 1000 recipes" in err, err
    # a diamond: 16 parents, each listing the next level 16 times, read 16**k files without a total bound
    for level in range(3):
        parent = base if level == 0 else tmp_path / f"level{level - 1}.yaml"
        (tmp_path / f"level{level}.yaml").write_text(yaml.safe_dump({"extends": [str(parent)] * 16}))
    code, err = cli("recipes", "validate", tmp_path / "level2.yaml", capsys=capsys)
    assert code == 2 and "more than 256 recipe files" in err, err


def test_zero_infinity_swap_files_stay_in_a_directory_of_their_own(tmp_path, capsys):
    from dalle_engines.deepspeed_engine import NVME_SUBDIR, DeepSpeedEngine, build_config
    from dalle_framework import TrainConfig

    engine = {"name": "deepspeed", "params": {"zero_stage": 3, "config": {"zero_optimization": {"offload_param": {"device": "nvme", "nvme_path": "/etc"}}}}}
    recipe = tiny_recipe(tmp_path / "run", **{"codec.train.engine": engine})
    code, err = cli("recipes", "validate", write_recipe(tmp_path / "r.yaml", recipe), capsys=capsys)
    assert code == 2 and "nvme_path is the engine's own param" in err, err
    params = DeepSpeedEngine.Params(zero_stage=3, offload_param="nvme", nvme_path=str(tmp_path))
    assert build_config(TrainConfig(), params)["zero_optimization"]["offload_param"]["nvme_path"] == str(tmp_path / NVME_SUBDIR)
    with pytest.raises(UsageError, match="not an existing directory"):
        build_config(TrainConfig(), DeepSpeedEngine.Params(zero_stage=3, offload_param="nvme", nvme_path="relative/dir"))


def test_output_paths_that_cannot_be_written_are_clear_errors(trained_run, tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    cases = {tmp_path: "is a directory", tmp_path / "a-file" / "grid.png": "exists and is not a directory"}
    if os.geteuid() != 0:  # root writes anywhere
        cases[readonly / "grid.png"] = "ermission denied"
    for out, expected in cases.items():
        code, err = cli("generate", trained_run, "a red circle in the top left", "-n", "1", "--quiet", "--out", out, capsys=capsys)
        assert code == 2 and expected in err and str(out.parent) in err and "Traceback" not in err, (out, err)


def _file_size_limit(limit: int):
    """Make the child's writes past ``limit`` bytes fail (EFBIG), as a full disk fails them (Python ignores SIGXFSZ)."""
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def _contents(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize("limit", [2_000, 40_000])
def test_a_failed_write_is_exit_1_naming_the_file_and_damages_nothing(trained_run, tmp_path, limit):
    """Real failing writes (a file-size limit: EFBIG, as ENOSPC on a full disk) during training: every
    writer (weights, JSON, checkpoints, tokens, TensorBoard) ends in one message naming its file."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = _contents(run)
    done = subprocess.run([sys.executable, "-m", "dalle_framework", "train", str(run), "--force", "--quiet"], cwd=ROOT,
                          capture_output=True, text=True, preexec_fn=_file_size_limit(limit), timeout=600)
    assert done.returncode == 1, done.stderr[-2000:]
    named = str(run) in done.stderr and ("intact" in done.stderr or "untouched" in done.stderr)
    assert named and "Traceback" not in done.stderr, done.stderr[-2000:]
    after = _contents(run)
    for name, data in after.items():  # every file is whole: an old one or a new complete one, never half of one
        if name.endswith(".json"):
            json.loads(data)
        elif name.endswith(".safetensors"):
            rundir.load_weights(run / name)
    assert set(before) <= set(after), f"lost: {sorted(set(before) - set(after))}"


def test_a_tensorboard_write_that_fails_in_its_thread_is_exit_1_naming_the_directory(tmp_path):
    """SummaryWriter writes from a thread and re-raises a full disk later as a bare OSError; the loop's
    writer names its directory (a real EFBIG from a file-size limit, in a child process)."""
    code = (
        "import sys\nfrom pathlib import Path\nfrom dalle_framework.errors import DalleError\n"
        "from dalle_framework.train.loop import _writer\n"
        "w = _writer(Path(sys.argv[1]))\n"
        "try:\n"
        "    for step in range(50):\n"
        "        w.add_text('big', 'x' * 5000, step)\n"
        "        w.flush()\n"
        "except DalleError as exc:\n"
        "    print(exc)\n"
        "    sys.exit(7)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "tb")], cwd=ROOT, capture_output=True, text=True,
                          preexec_fn=_file_size_limit(2_000), timeout=120)
    assert done.returncode == 7, done.stderr[-2000:]
    assert f"{tmp_path / 'tb'} (TensorBoard events)" in done.stdout and "intact" in done.stdout, done.stdout
    assert "Traceback" not in done.stderr, done.stderr[-3000:]


def test_a_shard_write_that_fails_is_exit_1_naming_the_shard(tmp_path):
    out = tmp_path / "shards"
    done = subprocess.run([sys.executable, "-m", "dalle_framework", "data", "shards", "shapes", str(out), "-q",
                           "--param", "image_size=32"], cwd=ROOT, capture_output=True, text=True,
                          preexec_fn=_file_size_limit(20_000), timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert str(out / "train-000000.tar") in done.stderr and "intact" in done.stderr, done.stderr[-2000:]


def _without_root_file_access() -> None:
    """Drop the capabilities that let root read any file (from the bounding set, so the command this
    child execs has them in no set): mode-000 files are then unreadable, as for any other user."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_an_unreadable_weights_file_is_named_as_unreadable_not_missing(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    weights = run / "prior" / rundir.WEIGHTS_FILE
    weights.chmod(0)
    done = subprocess.run([sys.executable, "-m", "dalle_framework", "generate", str(run), "a red circle", "-n", "1", "-q",
                           "--out", str(tmp_path / "g.png")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          preexec_fn=_without_root_file_access if os.geteuid() == 0 else None)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"{weights}: not readable (permission denied)" in done.stderr and "chmod u+r" in done.stderr, done.stderr[-2000:]


def test_running_out_of_memory_is_exit_1_with_what_to_lower(trained_run, tmp_path):
    """A real allocation failure (an address-space limit), not a simulated one: torch's CPU allocator
    raises a bare RuntimeError, which the CLI reports like MemoryError."""
    import resource

    limit = 4 * 2**30
    done = subprocess.run(
        [sys.executable, "-m", "dalle_framework", "generate", str(trained_run), "a red circle", "-n", "100000", "--batch-size", "100000",
         "--keep", "1", "-q", "--out", str(tmp_path / "g.png")], cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"},
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    assert done.returncode == 1 and "out of memory" in done.stderr and "--batch-size" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def _special_outputs(tmp_path: Path) -> dict[str, Path]:
    import socket

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    outputs = {"FIFO": fifo, "directory": tmp_path, "link to a FIFO": tmp_path / "link"}
    (tmp_path / "link").symlink_to(fifo)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock"))
    outputs["socket"] = tmp_path / "sock"
    if os.geteuid() == 0:  # a device node of our own, never the machine's /dev/null
        os.mknod(tmp_path / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        outputs["character device"] = tmp_path / "null"
    return outputs


def test_outputs_never_replace_a_device_fifo_socket_or_directory(trained_run, tmp_path, capsys):
    for kind, out in _special_outputs(tmp_path).items():
        mode = out.stat().st_mode
        for args in (["generate", trained_run, "a red circle", "-n", "1", "--quiet", "--out", out],
                     ["evaluate", trained_run, "--stage", "codec", "--quiet", "--out", out]):
            code, err = cli(*args, capsys=capsys)
            assert code == 2 and str(out) in err and ("not a regular file" in err or "is a directory" in err), (kind, err)
            assert out.stat().st_mode == mode, f"{kind} was replaced"
        with pytest.raises(UsageError, match="not a regular file|is a directory"):
            rundir.write_json(out, {"a": 1})


def _unfinish(run: Path, stage: str = "codec") -> Path:
    """As if killed after the last checkpoint: the stage is not published."""
    for name in ("meta.json", "model.safetensors"):
        (run / stage / name).unlink()
    return run / stage / "state" / "state.pt"


def _edit_client_state(path: Path, edit) -> None:
    state = torch.load(path, weights_only=True)
    state["client_state"] = edit(state["client_state"])
    torch.save(state, path)


HOSTILE_STATES = {
    "a string step": lambda c: {**c, "step": "2"},
    "a step past the schedule": lambda c: {**c, "step": 10**6},
    "no data position": lambda c: {k: v for k, v in c.items() if k != "data"},
    "garbage RNG state": lambda c: {**c, "rng": [{"torch": torch.zeros(3, dtype=torch.uint8)}]},
    "a list, not a record": lambda c: [1, 2, 3],
}


@pytest.mark.parametrize("damage", list(HOSTILE_STATES))
def test_well_formed_but_hostile_checkpoint_state_is_refused(trained_run, tmp_path, capsys, damage):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    _edit_client_state(_unfinish(run), HOSTILE_STATES[damage])
    code, err = cli("train", run, "--stage", "codec", "--resume", "--quiet", capsys=capsys)
    assert code == 2 and "state" in err and "--force" in err and "Traceback" not in err, (damage, err)
    assert not (run / "codec" / "meta.json").exists()


HOSTILE_RECORDS = {
    "codec/resume.json": ("[1, 2]", ["train", "{run}", "--stage", "codec", "--resume", "--quiet"], "not a record"),
    "codec/meta.json": ("[]", ["generate", "{run}", "a red circle", "-n", "1", "--quiet", "--out", "{run}/g.png"], "not a record"),
    "prior/meta.json": ('{"step": 2}', ["generate", "{run}", "a red circle", "-n", "1", "--quiet", "--out", "{run}/g.png"],
                        "not the record of a finished stage"),
    "eval/report.json": ("[" * 100_000 + "]" * 100_000, ["compare", "{run}", "{run}"], "report.json"),
}


@pytest.mark.parametrize("relative", list(HOSTILE_RECORDS))
def test_records_of_the_wrong_type_or_depth_are_refused_naming_them(trained_run, tmp_path, capsys, relative):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    text, args, expected = HOSTILE_RECORDS[relative]
    if relative == "codec/resume.json":
        _unfinish(run)
    (run / relative).parent.mkdir(exist_ok=True)
    (run / relative).write_text(text)
    code, err = cli(*[a.format(run=run) for a in args], capsys=capsys)
    assert code == 2 and relative.split("/")[-1] in err and expected in err and "Traceback" not in err, (relative, err[-1000:])
    # --force is the way out the message names, and it works over the damaged record
    if relative.endswith("meta.json") or relative.endswith("resume.json"):
        assert cli("train", run, "--stage", relative.split("/")[0], "--force", "--quiet", capsys=capsys)[0] == 0


@pytest.mark.parametrize("world_size", [None, "2", 1.0, 0, [2]])
def test_a_tampered_process_count_in_the_resume_record_is_refused(trained_run, tmp_path, capsys, world_size):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    _unfinish(run)
    record = run / "codec" / "resume.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "world_size": world_size}))
    code, err = cli("train", run, "--stage", "codec", "--resume", "--quiet", capsys=capsys)
    assert code == 2 and "resume.json: world_size" in err and "--force" in err and "Traceback" not in err, err


def test_weights_without_their_record_are_refused(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "prior" / "meta.json").unlink()
    code, err = cli("generate", run, "a red circle", "-n", "1", "--quiet", "--out", tmp_path / "g.png", capsys=capsys)
    assert code == 2 and "no meta.json record" in err and "dalle train" in err, err


def test_skipped_samples_are_counted_at_the_end_of_a_split(tmp_path, caplog):
    from PIL import Image

    from dalle_framework.data import load_split
    from dalle_framework.plugins import registry

    root = tmp_path / "images"
    root.mkdir()
    for i in range(12):
        Image.new("RGB", (16, 16), (i * 20, 0, 0)).save(root / f"ok{i}.png")
        (root / f"ok{i}.txt").write_text(f"red {i}")
    (root / "broken.png").write_bytes(b"not an image")
    (root / "broken.txt").write_text("broken")
    (root / "nocaption.png").write_bytes((root / "ok0.png").read_bytes())
    source = registry("data").build({"name": "folder", "params": {"root": str(root), "image_size": 16, "heldout_percent": 50}})
    with caplog.at_level("WARNING"):
        load_split(source, "train", progress=False)
        load_split(source, "heldout", progress=False)
    summaries = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage() and "kept" in r.getMessage()]
    assert summaries and sum(int(m.split("skipped ")[1].split()[0]) for m in summaries) == 2, summaries
