"""Training engines: the torch engine (single process, DDP) and DeepSpeed ZeRO 0-3, on the CPU.

The multi-process tests launch ``torchrun --nproc_per_node 2 tests/engine_worker.py``
for real (gloo) and check what its ranks wrote.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from dalle_framework import UsageError, distributed
from dalle_framework.plugins import registry
from dalle_framework.recipe import TrainConfig

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("engine_worker", HERE / "engine_worker.py")
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)
TinyModel, batch = worker.TinyModel, worker.batch


def prepare(engine: str = "torch", params: dict | None = None, seed: int = 0, **train):
    torch.manual_seed(seed)
    config = TrainConfig(**{"steps": 20, "lr": 3e-3, "batch_size": 8, **train}, engine={"name": engine, "params": params or {}})
    return registry("engine").build(config.engine).prepare(TinyModel(), config)


def train_losses(run, steps: int, start: int = 0) -> list[float]:
    return [run.step(*batch(s, 0), s)["loss"] for s in range(start, start + steps)]


def falls(losses: list[float], ratio: float = 0.5) -> bool:
    """The mean of the last 4 losses is below ``ratio`` times the mean of the first 4."""
    return sum(losses[-4:]) / 4 < ratio * sum(losses[:4]) / 4


# ----------------------------------------------------------------------------- registry and params


def test_engines_are_registered_and_validate_their_params():
    engines = registry("engine")
    assert {"torch", "deepspeed"} <= set(engines.names())
    assert engines.validate_params("deepspeed", {"zero_stage": 3, "offload_param": "cpu"}).offload_param == "cpu"
    with pytest.raises(ValidationError, match="offload_param needs zero_stage: 3"):
        engines.validate_params("deepspeed", {"zero_stage": 2, "offload_param": "cpu"})
    with pytest.raises(ValidationError, match="nvme_path"):
        engines.validate_params("deepspeed", {"zero_stage": 3, "offload_optimizer": "nvme"})
    with pytest.raises(ValidationError):
        engines.validate_params("deepspeed", {"zero_stage": 4})
    with pytest.raises(ValidationError):
        engines.validate_params("torch", {"zero_stage": 2})  # unknown key


def test_deepspeed_config_follows_train_config_and_raw_config_wins():
    from dalle_engines.deepspeed_engine import DeepSpeedEngine, build_config

    train = TrainConfig(batch_size=4, grad_accum=3, grad_clip=0.5, precision="bf16", steps=100, warmup_steps=10)
    params = DeepSpeedEngine.Params(
        zero_stage=3, offload_optimizer="cpu", offload_param="cpu", scheduler="deepspeed",
        config={"zero_optimization": {"overlap_comm": True}, "gradient_clipping": 2.0},
    )
    config = build_config(train, params)
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 3
    assert config["gradient_clipping"] == 2.0  # raw config merged last
    assert config["bf16"] == {"enabled": True} and "fp16" not in config
    zero = config["zero_optimization"]
    assert zero["stage"] == 3 and zero["overlap_comm"] is True
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert config["scheduler"]["type"] == "WarmupCosineLR"
    assert config["scheduler"]["params"]["total_num_steps"] == 100


def test_single_process_env_leaves_the_rendezvous_port_to_children(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    distributed.set_single_process_env()
    assert (distributed.rank(), distributed.world_size(), distributed.local_rank()) == (0, 1, 0)
    assert "MASTER_PORT" not in os.environ  # a child `dalle train` must not inherit a port this process holds
    port = distributed.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # really free


# ----------------------------------------------------------------------------- optimizer and schedule


def test_weight_decay_skips_biases_norms_and_embeddings():
    from dalle_engines.common import param_groups

    model = TinyModel()
    decay, rest = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    assert sorted(names[id(p)] for p in decay["params"]) == ["head.weight", "mlp.0.weight", "mlp.2.weight"]
    assert "embed.weight" in {names[id(p)] for p in rest["params"]}


def test_fused_adamw_is_asked_for_on_cuda_only_and_steps_like_the_default():
    from dalle_engines.common import adamw

    config = TrainConfig(steps=5, lr=1e-2, weight_decay=0.1)
    assert prepare("torch").optimizer.defaults["fused"] is None  # the CPU keeps the foreach update
    models = [TinyModel(), TinyModel()]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [adamw(models[0], config), adamw(models[1], config, fused=True)]
    assert optimizers[1].defaults["fused"] is True
    for _ in range(3):
        for model, optimizer in zip(models, optimizers):
            model(*batch(0, 0))["loss"].backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def test_warmup_cosine_and_constant_schedules():
    from dalle_engines.common import lr_at

    cosine = TrainConfig(lr=1.0, steps=10, warmup_steps=2, min_lr_ratio=0.1)
    values = [lr_at(s, cosine) for s in range(12)]
    assert values[:3] == pytest.approx([0.5, 1.0, 1.0])  # linear warmup, then the peak
    assert values[6] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert values[10] == pytest.approx(0.1) and values[11] == pytest.approx(0.1)  # floor, held
    assert all(a >= b for a, b in zip(values[1:], values[2:]))
    constant = TrainConfig(lr=1.0, steps=10, warmup_steps=4, lr_schedule="constant")
    assert [lr_at(s, constant) for s in (0, 3, 9)] == pytest.approx([0.25, 1.0, 1.0])


@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_engine_reports_the_scheduled_lr_per_optimizer_step(engine):
    from dalle_engines.common import lr_at

    run = prepare(engine, lr=1e-2, steps=6, warmup_steps=2, grad_accum=2)
    outs = [run.step(*batch(s, 0), s) for s in range(12)]
    assert [o["optimizer_step"] for o in outs] == [0.0, 1.0] * 6
    expected = [lr_at(s // 2, run.train) for s in range(12)]  # both micro-batches of a step share its lr
    assert [o["lr"] for o in outs] == pytest.approx(expected)
    assert all(o["grad_norm"] > 0 for o in outs[1:])


# ----------------------------------------------------------------------------- torch engine


def test_torch_engine_loss_falls_and_reports_terms():
    run = prepare("torch", lr=3e-3, warmup_steps=2)
    outs = [run.step(*batch(s, 0), s) for s in range(30)]
    assert falls([o["loss"] for o in outs]), [o["loss"] for o in outs]
    assert outs[5]["step"] == 5.0  # non-tensor forward args pass through; scalar terms become floats
    assert run.module.training and run.rank == 0 and run.world_size == 1 and run.device.type == "cpu"


def test_grad_accumulation_equals_one_big_batch():
    """Two micro-batches of 8 then one step == one batch of 16: same gradients, norm and update."""
    captured = {}

    def grads_of(run, key):
        def hook(optimizer, args, kwargs):
            captured[key] = [p.grad.clone() for p in run.module.parameters()]

        run.optimizer.register_step_pre_hook(hook)

    tokens, target = batch(0, 0, size=16)
    big = prepare("torch", grad_clip=None, grad_accum=1)
    grads_of(big, "big")
    out_big = big.step(tokens, target)
    small = prepare("torch", grad_clip=None, grad_accum=2)
    grads_of(small, "small")
    first = small.step(tokens[:8], target[:8])
    assert first["optimizer_step"] == 0.0 and "small" not in captured
    second = small.step(tokens[8:], target[8:])
    assert second["optimizer_step"] == 1.0 and out_big["optimizer_step"] == 1.0
    for a, b in zip(captured["big"], captured["small"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert second["grad_norm"] == pytest.approx(out_big["grad_norm"], rel=1e-5)
    for a, b in zip(big.module.parameters(), small.module.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gradient_clipping_limits_the_update_norm():
    run = prepare("torch", grad_clip=1e-3)
    seen = {}

    def hook(optimizer, args, kwargs):
        seen["norm"] = torch.nn.utils.get_total_norm([p.grad for p in run.module.parameters()])

    run.optimizer.register_step_pre_hook(hook)
    out = run.step(*batch(0, 0))
    assert out["grad_norm"] > 1e-3  # reported before clipping
    assert float(seen["norm"]) == pytest.approx(1e-3, rel=1e-3)


def test_torch_save_load_round_trips_exactly(tmp_path):
    run = prepare("torch", grad_accum=2, warmup_steps=3)
    train_losses(run, 5)  # stops mid-accumulation: the partial gradient is not saved, the count is
    run.step(*batch(5, 0), 5)
    rng = torch.get_rng_state()
    run.save(str(tmp_path / "ckpt"), {"step": 3, "rng": rng, "tags": ["a", (1, 2.5)]})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["model.safetensors", "state.pt"]
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*.old"))
    expected = train_losses(run, 4, start=6)
    lr_expected = run.lr()

    fresh = prepare("torch", grad_accum=2, warmup_steps=3, seed=1)
    client = fresh.load(str(tmp_path / "ckpt"))
    assert client["step"] == 3 and client["tags"] == ["a", (1, 2.5)]
    assert torch.equal(client["rng"], rng)
    assert train_losses(fresh, 4, start=6) == expected  # bitwise: weights, Adam moments, schedule, count
    assert fresh.lr() == lr_expected
    for a, b in zip(run.module.parameters(), fresh.module.parameters()):
        assert torch.equal(a, b)


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path):
    run = prepare("torch")
    train_losses(run, 2)
    target = tmp_path / "ckpt"
    run.save(str(target), {"step": 2})
    before = load_file(str(target / "model.safetensors"))
    train_losses(run, 2, start=2)
    with pytest.raises(Exception):
        run.save(str(target), {"step": 4, "bad": lambda: None})  # cannot be pickled: the save crashes midway
    after = load_file(str(target / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert prepare("torch").load(str(target)) == {"step": 2}
    # A crash between publish's two renames leaves only ckpt.old: load finds it there.
    target.rename(tmp_path / "ckpt.old")
    assert prepare("torch").load(str(target)) == {"step": 2}


def test_torch_bf16_autocast_trains_on_cpu():
    run = prepare("torch", precision="bf16")
    losses = train_losses(run, 30)
    assert falls(losses)
    assert all(p.dtype == torch.float32 for p in run.module.parameters())  # master weights stay fp32


@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_fp16_on_cpu_is_a_usage_error(engine):
    with pytest.raises(UsageError, match="fp16 needs a CUDA GPU.*bf16"):
        prepare(engine, precision="fp16")


def test_load_of_a_foreign_directory_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="not a torch-engine checkpoint"):
        prepare("torch").load(str(tmp_path))


# ----------------------------------------------------------------------------- deepspeed, one process


@pytest.mark.parametrize("stage", [0, 2])
def test_deepspeed_bf16_trains_on_cpu(stage):
    run = prepare("deepspeed", {"zero_stage": stage}, precision="bf16", lr=3e-3)
    assert run.engine.zero_optimization_stage() == stage and run.engine.bfloat16_enabled()
    losses = train_losses(run, 30)
    assert falls(losses), losses
    full = run.full_state_dict()
    assert set(full) == set(TinyModel().state_dict())
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in full.values())
    # The fp32 master weights, rounded, are what the bf16 module computes with.
    for name, param in run.module.named_parameters():
        torch.testing.assert_close(full[name].to(torch.bfloat16), param.detach().cpu())


def test_deepspeed_single_process_save_load_and_scheduler(tmp_path):
    run = prepare("deepspeed", {"zero_stage": 1}, grad_accum=2, warmup_steps=2)
    train_losses(run, 6)
    run.save(str(tmp_path / "ds"), {"epoch": 7})
    expected = train_losses(run, 4, start=6)
    fresh = prepare("deepspeed", {"zero_stage": 1}, grad_accum=2, warmup_steps=2, seed=3)
    assert fresh.load(str(tmp_path / "ds")) == {"epoch": 7}
    assert train_losses(fresh, 4, start=6) == expected
    with pytest.raises(UsageError, match="not a deepspeed-engine checkpoint"):
        fresh.load(str(tmp_path))


def test_zero3_model_context_shards_the_module_while_it_is_built():
    config = TrainConfig(steps=20, lr=3e-3, engine={"name": "deepspeed", "params": {"zero_stage": 3}})
    engine = registry("engine").build(config.engine)
    torch.manual_seed(0)
    with engine.model_context(config):
        module = TinyModel()
    assert sum(p.numel() for p in module.parameters()) == 0  # only partitions exist
    assert sum(p.ds_numel for p in module.parameters()) == sum(p.numel() for p in TinyModel().parameters())
    run = engine.prepare(module, config)
    torch.manual_seed(0)
    reference = TinyModel().state_dict()
    full = run.full_state_dict()
    assert all(torch.equal(full[k], reference[k]) for k in reference)  # same init as an unsharded build
    assert falls(train_losses(run, 30))
    assert isinstance(prepare("torch").module, TinyModel)
    with registry("engine").build({"name": "torch"}).model_context(config):
        assert sum(p.numel() for p in TinyModel().parameters()) > 0


def test_deepspeed_does_not_compile_the_shm_op():
    """The CPU comm op would be JIT-built with g++ (~55 s); the engine turns it off."""
    prepare("deepspeed", {"zero_stage": 0})
    from deepspeed import comm

    assert comm.comm.cdb.shm_comm_op is None


# ----------------------------------------------------------------------------- two processes (torchrun, gloo)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run the worker once under torchrun for the torch engine (DDP) and ZeRO-2 and ZeRO-3."""
    out = tmp_path_factory.mktemp("two_ranks")
    torchrun = Path(sys.executable).with_name("torchrun")
    port = str(distributed.free_port())
    proc = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "--master_port", port, str(HERE / "engine_worker.py"), str(out), "torch", "2", "3"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def ranks(out: Path, stage: str) -> list[dict]:
    return [json.loads((out / f"stage{stage}_rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["torch", "2", "3"])
def test_two_process_training_resume_and_consolidation(two_ranks, stage):
    records = ranks(two_ranks, stage)
    assert [r["rank"] for r in records] == [0, 1] and all(r["world_size"] == 2 for r in records)
    for r in records:
        assert falls(r["losses"], ratio=0.7), r["losses"]
        assert r["again"] == r["more"]  # resumed from the checkpoint: the same next losses, bitwise
        assert r["client"] == {"step": worker.TRAIN_STEPS, "note": "resume here"}
    assert records[0]["losses"] != records[1]["losses"]  # each rank saw its own data...
    weights = [load_file(str(two_ranks / f"stage{stage}_rank{r}.safetensors")) for r in (0, 1)]
    assert weights[0].keys() == TinyModel().state_dict().keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key  # ...yet the replicas agree
    plain = TinyModel()
    plain.load_state_dict(weights[0])
    with torch.no_grad():
        outputs = plain.predict(worker.probe())
    torch.testing.assert_close(outputs, torch.tensor(records[0]["outputs"]), rtol=1e-5, atol=1e-6)
    if stage == "3":
        assert records[0]["local_numel"] == 0  # the module's weights really were partitioned


@pytest.mark.slow
def test_zero2_and_zero3_train_the_same_model(two_ranks):
    a, b = (load_file(str(two_ranks / f"stage{s}_rank0.safetensors")) for s in ("2", "3"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
