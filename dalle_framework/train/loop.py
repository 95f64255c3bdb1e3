"""The training loop shared by every stage and every engine.

It owns what is the same everywhere: seeding, the data position, EMA,
TensorBoard, the progress bar, a wall-time budget, periodic atomic
checkpoints and exact resume. Engines own forward/backward/optimizer;
stages own data and metrics.
"""

from __future__ import annotations

import contextlib
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from .. import checkpoint as ckpt
from ..errors import UsageError
from ..pipeline import Pipeline
from ..recipe import dump
from .ema import EMA
from .stages import make_stage

log = logging.getLogger(__name__)
STATE_DIR = "state"
RESUME_FILE = "resume.json"  # which component and params the state/ checkpoint belongs to


def train_stage(pipe: Pipeline, stage_name: str, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train one stage of ``pipe`` and export its weights into the run directory.

    Returns the final held-out metrics. With ``resume`` the last checkpoint in
    ``<run>/<stage>/state`` restores model, optimizer, scheduler, EMA, RNG and
    data position, and training continues where it stopped.
    """
    stage = make_stage(pipe, stage_name)
    train = stage.train
    run_dir = pipe.run_dir
    stage_dir = run_dir / stage_name
    state_dir = stage_dir / STATE_DIR

    torch.manual_seed(pipe.recipe.seed + list(("codec", "prior", "reranker")).index(stage_name))
    engine = pipe.build("engine", train.engine)
    with engine.model_context(train):
        module = stage.build()
    run = engine.prepare(module, train)
    main = run.is_main
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.write_text(run_dir / ckpt.RECIPE_FILE, dump(pipe.recipe))
    batches = stage.batches(rank=run.rank, world_size=run.world_size)
    ema = _ema(run, train.ema) if train.ema else None

    step = 0
    identity = {"name": pipe.block(stage_name).name, "params": pipe.block(stage_name).params}
    if resume and state_dir.is_dir() and _state_identity(stage_dir) not in (None, identity):
        if main:
            log.warning("%s: the checkpoint was made with other %s params; starting from scratch", state_dir, stage_name)
        resume = False
    if resume and state_dir.is_dir():
        client = run.load(str(state_dir))
        step = int(client["step"])
        batches.load_state_dict(client["data"])
        if ema is not None and "ema" in client:
            ema.load_state_dict(client["ema"])
        if "rng" in client:
            ckpt.set_rng_state(client["rng"])
        if main:
            log.info("resumed %s at step %d", stage_name, step)
    elif resume and main:
        log.warning("--resume: no checkpoint in %s; starting from scratch", state_dir)

    writer = _writer(run_dir / "tb" / stage_name) if main else None
    from tqdm.auto import tqdm

    bar = tqdm(total=train.steps, initial=step, desc=f"train {stage_name}", disable=not (main and progress), dynamic_ncols=True)
    started = time.monotonic()
    eval_module: Optional[torch.nn.Module] = None
    metrics: dict[str, float] = {}
    stopped_early = False

    def save_state() -> None:
        client = {"step": step, "data": batches.state_dict(), "rng": ckpt.rng_state()}
        if ema is not None:
            client["ema"] = ema.state_dict()
        run.save(str(state_dir), client)
        if main:
            ckpt.write_json(stage_dir / RESUME_FILE, {"step": step, **identity})

    def export_weights() -> dict[str, torch.Tensor]:
        """Full fp32 weights (EMA when enabled); collective, so every rank calls it."""
        return ema.weights(run.module) if ema is not None else run.full_state_dict()

    def evaluate(weights: dict[str, torch.Tensor]) -> dict[str, float]:
        """Held-out metrics and a preview, on rank 0, from a plain fp32 copy of the weights.

        A separate module keeps evaluation independent of how the engine holds the
        model (bf16, sharded by ZeRO-3, wrapped by DDP) and of the training RNG.
        """
        nonlocal eval_module
        if not main:
            return {}
        with _isolated_rng(pipe.recipe.seed, run.device):
            if eval_module is None:
                eval_module = stage.build().to(run.device)
            eval_module.load_state_dict(weights)
            result = stage.evaluate(eval_module, run.device)
            for key, value in result.items():
                writer.add_scalar(f"eval/{key}", value, step)
            _log_images(writer, stage, eval_module, run.device, step)
        return result

    module.train()
    while step < train.steps:
        out: dict[str, float] = {}
        for micro in range(train.grad_accum):
            key = (step * train.grad_accum + micro) * run.world_size + run.rank  # distinct per micro-batch and rank
            out = run.step(*stage.step_args(stage.augment(next(batches), key), step, run.device))
        step += 1
        if ema is not None:
            ema.update(run.module)
        bar.update(1)
        if main and (step % train.log_every == 0 or step == 1):
            bar.set_postfix(loss=f"{out.get('loss', float('nan')):.4f}")
            for key, value in out.items():
                writer.add_scalar(f"train/{key}", value, step)
        if step % train.eval_every == 0 and step < train.steps:
            metrics = evaluate(export_weights())
        if step % train.ckpt_every == 0 and step < train.steps:
            save_state()
        if train.max_minutes and _out_of_time(started, train.max_minutes, run):
            stopped_early = True
            break
    bar.close()

    save_state()
    weights = export_weights()
    metrics = evaluate(weights)
    if main:
        writer.close()
        block = pipe.block(stage_name)
        ckpt.save_weights(stage_dir / ckpt.WEIGHTS_FILE, weights, metadata={"component": block.name, "stage": stage_name})
        ckpt.write_json(
            stage_dir / ckpt.META_FILE,
            {
                "complete": True,
                "stage": stage_name,
                "component": block.name,
                "block": block.model_dump(mode="json"),
                "plugin": pipe.manager.registry(stage_name).get(block.name).plugin,
                "step": step,
                "stopped_early": stopped_early,
                "seconds": round(time.monotonic() - started, 1),
                "metrics": metrics,
                "finished_at": datetime.now(timezone.utc).isoformat(),
                "world_size": run.world_size,
            },
        )
        pipe._cache.pop(stage_name, None)  # the next access loads the new weights
    run.barrier()
    return metrics


@contextlib.contextmanager
def _isolated_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run a block with a fixed seed and restore the RNG state afterwards."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _state_identity(stage_dir: Path) -> Optional[dict]:
    path = stage_dir / RESUME_FILE
    if not path.is_file():
        return None
    data = ckpt.read_json(path)
    return {"name": data.get("name"), "params": data.get("params")}


def _ema(run, decay: float) -> EMA:
    try:
        return EMA(run.module, decay)
    except ValueError as exc:
        raise UsageError(f"train.ema: {exc}; drop `ema` or use ZeRO stage 0-2") from None


def _out_of_time(started: float, minutes: float, run) -> bool:
    """True on every rank at once when the wall-time budget is spent."""
    flag = torch.tensor([float(time.monotonic() - started > minutes * 60)])
    if run.world_size > 1 and torch.distributed.is_initialized():
        backend = torch.distributed.get_backend()
        flag = flag.to(run.device if backend == "nccl" else "cpu")
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def _writer(path: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(path))


def _log_images(writer, stage, module, device, step: int) -> None:
    try:
        preview = stage.preview(module, device)
    except UsageError:
        return
    if preview is None:
        return
    images, captions = preview if isinstance(preview, tuple) else (preview, None)
    if captions is not None:  # one row per caption, the caption beside its image
        from ..data.images import captioned_grid, to_tensor

        grid = to_tensor(captioned_grid(images.float().cpu()[:, None], captions))
    else:
        from torchvision.utils import make_grid

        grid = make_grid(images.float().cpu(), nrow=max(1, len(images) // 2))
    writer.add_image(f"{stage.name}/preview", grid, step)


def train_all(pipe: Pipeline, stages: Optional[list[str]] = None, *, resume: bool = False, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train the named stages in order, skipping those already complete unless ``force``."""
    stages = stages or [s for s in ("codec", "prior", "reranker") if getattr(pipe.recipe, s) is not None]
    # A stage is reused only if it finished with the same recipe block; a changed block retrains.
    results: dict[str, Any] = {}
    stale: set[str] = set()
    for name in stages:
        block = pipe.block(name).model_dump(mode="json")
        if not force and name not in stale and ckpt.stage_complete(pipe.run_dir, name, block):
            log.info("%s already trained in %s; reusing it (use --force to retrain)", name, pipe.run_dir)
            results[name] = {"reused": True}
            continue
        results[name] = train_stage(pipe, name, resume=resume, progress=progress)
        if name == "codec":
            stale.add("prior")  # a new codec means new tokens: a prior trained on the old ones is stale
    return results
