"""Worker for the multi-process engine tests: ``torchrun --nproc_per_node 2 tests/engine_worker.py OUT STAGE...``.

For each ZeRO stage (or ``torch``: the torch engine under DDP), every rank:
trains a tiny model on its own data, saves a checkpoint, takes a few more steps, then builds
a fresh engine, loads the checkpoint and takes the same steps again. It writes
``OUT/stage{S}_rank{R}.json`` (losses before/after resume, outputs of the
engine's module on a probe batch) and ``OUT/stage{S}_rank{R}.safetensors``
(the consolidated ``full_state_dict``), which tests/test_engines.py checks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

VOCAB, LENGTH, DIM = 16, 6, 32
TRAIN_STEPS, MORE_STEPS = 12, 3


class TinyModel(nn.Module):
    """Token embedding -> MLP -> scalar regression; forward takes a non-tensor ``step``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, 1)

    def predict(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens[B, L] long -> [B] float"""
        h = self.embed(tokens)
        h = h + self.mlp(h)
        return self.head(self.norm(h).mean(dim=1)).squeeze(-1)

    def forward(self, tokens: torch.Tensor, target: torch.Tensor, step: int = 0) -> dict:
        pred = self.predict(tokens)
        loss = torch.mean((pred.float() - target.float()) ** 2)
        return {"loss": loss, "step": step}


def batch(step: int, rank: int, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch per (step, rank): targets are a learnable function of the tokens."""
    gen = torch.Generator().manual_seed(1000 * rank + step % 4)
    tokens = torch.randint(0, VOCAB, (size, LENGTH), generator=gen)
    target = tokens.float().mean(dim=1) / VOCAB * 2 - 1
    return tokens, target


def probe() -> torch.Tensor:
    return torch.arange(4 * LENGTH).reshape(4, LENGTH) % VOCAB


def train_config(stage: str):
    """``stage`` is a ZeRO stage ("0".."3", deepspeed engine) or "torch" (DDP, 2 micro-batches per step)."""
    from dalle_framework.recipe import TrainConfig

    if stage == "torch":
        engine, accum = {"name": "torch"}, 2
    else:
        # Persistence threshold 0: even this tiny model's weights really get partitioned at stage 3.
        config = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
        engine, accum = {"name": "deepspeed", "params": {"zero_stage": int(stage), "config": config}}, 1
    return TrainConfig(
        steps=TRAIN_STEPS + MORE_STEPS, batch_size=8, lr=3e-3, warmup_steps=2, weight_decay=0.1,
        grad_accum=accum, engine=engine,
    )


def fresh_run(stage: str):
    from dalle_framework.plugins import registry

    torch.manual_seed(0)  # identical initial weights on every rank
    train = train_config(stage)
    return registry("engine").build(train.engine).prepare(TinyModel(), train)


def run_stage(stage: str, out: Path) -> None:
    run = fresh_run(stage)
    rank = run.rank
    losses = [run.step(*batch(s, rank), s)["loss"] for s in range(TRAIN_STEPS)]
    ckpt = out / f"ckpt_stage{stage}"
    run.save(str(ckpt), {"step": TRAIN_STEPS, "note": "resume here"})
    more = [run.step(*batch(s, rank), s)["loss"] for s in range(TRAIN_STEPS, TRAIN_STEPS + MORE_STEPS)]
    full = run.full_state_dict()  # collective: every rank calls it
    with torch.no_grad():
        run.module.eval()
        outputs = run.module.predict(probe()).float().tolist()  # ZeRO-3 gathers weights in its hooks

    resumed = fresh_run(stage)
    client = resumed.load(str(ckpt))
    again = [resumed.step(*batch(s, rank), s)["loss"] for s in range(TRAIN_STEPS, TRAIN_STEPS + MORE_STEPS)]

    save_file(full, str(out / f"stage{stage}_rank{rank}.safetensors"))
    record = {
        "rank": rank, "world_size": run.world_size, "zero_stage": getattr(run, "stage", None), "losses": losses,
        "local_numel": sum(p.numel() for p in run.module.parameters()),
        "more": more, "again": again, "client": client, "outputs": outputs,
    }
    (out / f"stage{stage}_rank{rank}.json").write_text(json.dumps(record))


def main() -> None:
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    for stage in sys.argv[2:]:
        run_stage(stage, out)


if __name__ == "__main__":
    main()
