"""Fine-tuning converted priors: LoRA adapters (peft) or frozen layers, from `weights:` on the prior block.

Tiny random-weight releases (tests/releases.py) are converted with `dalle convert`,
fine-tuned for a few steps on a folder of captioned images through `dalle train`, and
generated from with `dalle generate`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import run_cli
from dalle_framework import UsageError, finetune
from dalle_framework.pipeline import Pipeline
from dalle_framework.recipe import load_recipe
import releases

LORA = {"targets": ["*.query_key_value", "*.attention.dense"], "rank": 4, "alpha": 8}


@pytest.fixture(scope="module")
def rudalle_setup(tmp_path_factory):
    directory = tmp_path_factory.mktemp("rudalle-finetune")
    release = releases.rudalle_release(directory / "release")
    return directory, release, releases.image_folder(directory / "images")


def test_rudalle_lora_fine_tunes_through_dalle_train_and_generates(rudalle_setup):
    directory, release, images = rudalle_setup
    path = releases.recipe(directory, release, images, name="ru-lora", prior={"lora": LORA})
    trained = run_cli("train", str(path), "--quiet")
    assert trained.returncode == 0, trained.stderr[-3000:]
    run = directory / "runs" / "ru-lora"
    adapter = run / "prior" / "model.safetensors"
    with safe_open(str(adapter), "pt") as f:
        about, keys = f.metadata(), list(f.keys())
    base = Path(release["prior"]["weights"])
    assert about["adapter"] == "lora" and about["base_sha256"] == hashlib.sha256(base.read_bytes()).hexdigest()
    assert len(keys) == 12 and all(k.endswith((".lora_A", ".lora_B")) for k in keys)  # 3 layers x 2 modules x (A, B)
    assert adapter.stat().st_size < base.stat().st_size / 4

    # generation loads base + adapter into a plain prior: base weights moved only where adapted
    pipe = Pipeline.load(run, device="cpu")
    prior, base_weights = pipe.prior.state_dict(), load_file(base)
    changed = {k for k in base_weights if not torch.equal(prior[k], base_weights[k])}
    assert changed == {k.replace(".lora_A", ".weight") for k in keys if k.endswith(".lora_A")}
    generated = run_cli("generate", str(run), "красный квадрат слева", "синий квадрат справа", "-n", "2", "--keep", "1",
                        "--out", str(directory / "grid.png"), "--quiet")
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert (directory / "grid.png").is_file() and len(json.loads(generated.stdout)["rows"]) == 2

    served = serve_one(pipe, "красный квадрат слева")
    assert served["status"] == "done", served.get("error")
    assert served["progress"]["total"] == 2 * 16 and served["image_sizes"] == [(64, 64)]  # the wavelet decoder doubles 32px

    inspected = run_cli("inspect", str(path))
    assert inspected.returncode == 0, inspected.stderr
    stats = json.loads(inspected.stdout)["prior"]
    lora_params = sum(load_file(adapter)[k].numel() for k in keys)
    assert stats["params"]["trainable"] == lora_params < stats["params"]["total"]
    assert {"frozen_weights_gib_per_gpu", "activations_gib_per_gpu", "total_gib_per_gpu"} <= set(stats["memory"])

    # the adapter names the base weights it was trained on: others are refused
    from dalle_framework.rundir import save_weights

    base_weights["to_logits.1.bias"] = base_weights["to_logits.1.bias"] + 1
    save_weights(directory / "other.safetensors", base_weights)
    with pytest.raises(UsageError, match="trained on other base weights"):
        finetune.load_trained(pipe.stage("prior").build(), adapter, base=str(directory / "other.safetensors"))


def test_frozen_layers_stay_and_merged_lora_exports_full_weights(rudalle_setup):
    directory, release, images = rudalle_setup
    from dalle_framework.train.loop import train_all

    frozen = ["text_embeddings.*", "transformer.layers.0.*"]
    path = releases.recipe(directory, release, images, name="ru-freeze", prior={"freeze": frozen})
    pipe = Pipeline(load_recipe(path), device="cpu")
    train_all(pipe, progress=False)
    base, trained = load_file(release["prior"]["weights"]), load_file(directory / "runs" / "ru-freeze" / "prior" / "model.safetensors")
    kept = {k for k in base if torch.equal(base[k], trained[k])}
    assert {k for k in base if k.startswith(("text_embeddings.", "transformer.layers.0."))} <= kept
    assert "transformer.layers.1.mlp.dense_h_to_4h.weight" not in kept

    path = releases.recipe(directory, release, images, name="ru-merged", prior={"lora": {**LORA, "merge": True}})
    pipe = Pipeline(load_recipe(path), device="cpu")
    train_all(pipe, progress=False)
    stage = directory / "runs" / "ru-merged" / "prior"
    merged, adapter = load_file(stage / "model.safetensors"), load_file(stage / finetune.ADAPTER_FILE)
    assert merged.keys() == base.keys()
    layer = "transformer.layers.1.attention.query_key_value"
    delta = adapter[f"{layer}.lora_B"] @ adapter[f"{layer}.lora_A"] * (LORA["alpha"] / LORA["rank"])
    assert delta.abs().sum() > 0 and torch.allclose(merged[f"{layer}.weight"], base[f"{layer}.weight"] + delta, atol=1e-6)
    assert torch.equal(Pipeline.load(directory / "runs" / "ru-merged", device="cpu").prior.state_dict()[f"{layer}.weight"], merged[f"{layer}.weight"])


def test_fine_tuning_blocks_are_checked(rudalle_setup):
    directory, release, images = rudalle_setup
    path = releases.recipe(directory, release, images, name="ru-bad", prior={"lora": {"targets": ["*.nothing_like_this"]}})
    pipe = Pipeline(load_recipe(path), device="cpu")
    with pytest.raises(UsageError, match=r"lora.targets: \['\*.nothing_like_this'\] match nothing"):
        finetune.prepare(pipe.stage("prior").build(), pipe.stage("prior").block)
    body = yaml.safe_load(path.read_text())
    body["prior"].pop("weights")
    path.write_text(yaml.safe_dump(body, allow_unicode=True))
    refused = run_cli("recipes", "validate", str(path))
    assert refused.returncode == 2 and "adapters fine-tune pretrained weights" in refused.stderr


def serve_one(pipe, caption: str) -> dict:
    """One job through `dalle serve`'s app (FastAPI's TestClient): the finished job and its images' sizes."""
    import io
    import time

    from fastapi.testclient import TestClient
    from PIL import Image

    from dalle_framework.serve import Limits, create_app

    with TestClient(create_app(pipe, Limits()), base_url="http://localhost") as client:  # a Host the app answers to
        response = client.post("/generate", json={"caption": caption, "candidates": 2, "keep": 1, "seed": 1})
        assert response.status_code == 202, response.text
        deadline = time.monotonic() + 300
        while (job := client.get(f"/jobs/{response.json()['id']}").json())["status"] not in ("done", "failed"):
            assert time.monotonic() < deadline, job
            time.sleep(0.05)
        sizes = [Image.open(io.BytesIO(client.get(image["url"]).content)).size for image in job.get("images", [])]
    return {**job, "image_sizes": sizes}


MEGA_LORA = {"targets": ["decoder.layers.*.self_attn.*_proj", "decoder.layers.*.encoder_attn.*_proj"], "rank": 4, "alpha": 8}


def test_mega_lora_fine_tunes_through_dalle_train_and_generates(tmp_path):
    release = releases.mega_release(tmp_path / "release")
    images = releases.english_folder(tmp_path / "images")
    path = releases.recipe(tmp_path, release, images, name="mega-lora", prior={"lora": MEGA_LORA})
    trained = run_cli("train", str(path), "--quiet")
    assert trained.returncode == 0, trained.stderr[-3000:]
    stages = json.loads(trained.stdout)["stages"]
    assert stages["prior"]["image_loss"] > 0 and "text_loss" not in stages["prior"]  # the encoder models no text
    run = tmp_path / "runs" / "mega-lora"
    with safe_open(str(run / "prior" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert len(keys) == 2 * 2 * 8 and all(k.startswith("decoder.layers.") for k in keys)  # 2 layers x 2 attentions x 4 projections x (A, B)
    generated = run_cli("generate", str(run), "a red square on the left", "-n", "2", "--keep", "1", "--guidance", "3",
                        "--out", str(tmp_path / "grid.png"), "--quiet")
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert (tmp_path / "grid.png").is_file()
    served = serve_one(Pipeline.load(run, device="cpu"), "a red square on the left")
    assert served["status"] == "done" and served["progress"]["total"] == 2 * 256 and served["image_sizes"] == [(32, 32)]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["lora", "freeze"])
def test_fine_tuning_under_deepspeed_zero2_keeps_what_it_should(rudalle_setup, how):
    """The -zero recipes' mechanism on the CPU: ZeRO-2 (bf16) trains only the adapters, or all but the frozen layers."""
    directory, release, images = rudalle_setup
    from dalle_framework.train.loop import train_all

    tuning = {"lora": {"lora": LORA}, "freeze": {"freeze": ["text_embeddings.*", "transformer.layers.0.*"]}}[how]
    name = f"ru-zero-{how}"
    path = releases.recipe(directory, release, images, name=name, prior=tuning)
    body = yaml.safe_load(path.read_text())
    body["prior"]["train"].update(precision="bf16", engine={"name": "deepspeed", "params": {"zero_stage": 2}})
    path.write_text(yaml.safe_dump(body, allow_unicode=True))
    pipe = Pipeline(load_recipe(path), device="cpu")
    train_all(pipe, progress=False)
    base = load_file(release["prior"]["weights"])
    trained = Pipeline.load(directory / "runs" / name, device="cpu").prior.state_dict()
    moved = {k for k in base if not torch.allclose(base[k], trained[k])}
    if how == "lora":
        assert moved and all(k.endswith(("query_key_value.weight", "attention.dense.weight")) for k in moved)
    else:
        assert moved and not any(k.startswith(("text_embeddings.", "transformer.layers.0.")) for k in moved)


@pytest.mark.slow
def test_the_zero_recipes_fine_tune_on_two_ranks(rudalle_setup):
    """The -zero recipes' settings as two real processes: ZeRO-2 with frozen layers, and LoRA under ZeRO-3
    (each rank holds a shard of the base weights and of the adapters; rank 0 gathers and writes them)."""
    from test_distributed import torchrun

    directory, release, images = rudalle_setup
    base = load_file(release["prior"]["weights"])
    runs = {}
    for name, tuning, stage in (("ru-2r-freeze", {"freeze": ["text_embeddings.*", "transformer.layers.0.*"]}, 2),
                                ("ru-2r-lora", {"lora": LORA}, 3)):
        path = releases.recipe(directory, release, images, name=name, prior=tuning, steps=4)
        body = yaml.safe_load(path.read_text())
        body["prior"]["train"].update(precision="bf16", engine={"name": "deepspeed", "params": {"zero_stage": stage}}, batch_size=2)
        path.write_text(yaml.safe_dump(body, allow_unicode=True))
        trained = torchrun("train", str(path), "--quiet")
        assert trained.returncode == 0, trained.stderr[-3000:]
        runs[name] = directory / "runs" / name
        meta = json.loads((runs[name] / "prior" / "meta.json").read_text())
        assert meta["world_size"] == 2 and meta["step"] == 4, meta
    frozen_run = Pipeline.load(runs["ru-2r-freeze"], device="cpu").prior.state_dict()
    moved = {k for k in base if not torch.equal(base[k], frozen_run[k])}
    assert moved and not any(k.startswith(("text_embeddings.", "transformer.layers.0.")) for k in moved)
    with safe_open(str(runs["ru-2r-lora"] / "prior" / "model.safetensors"), "pt") as f:
        about, keys = f.metadata(), list(f.keys())
    assert about["base_sha256"] == hashlib.sha256(Path(release["prior"]["weights"]).read_bytes()).hexdigest()
    assert keys and all(".lora_" in k for k in keys)  # the adapter alone, gathered from both ranks' shards
    adapted = Pipeline.load(runs["ru-2r-lora"], device="cpu").prior.state_dict()
    moved = {k for k in base if not torch.allclose(base[k], adapted[k])}
    assert moved and all(k.endswith(("query_key_value.weight", "attention.dense.weight")) for k in moved)
    generated = run_cli("generate", str(runs["ru-2r-lora"]), "красный квадрат слева", "-n", "2", "--keep", "1",
                        "--out", str(directory / "two-ranks.png"), "--quiet")
    assert generated.returncode == 0, generated.stderr[-3000:]
