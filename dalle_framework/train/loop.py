"""The training loop shared by every stage and every engine.

It owns what is the same everywhere: the run lock, seeding, the data position,
EMA, TensorBoard, the progress bar, a wall-time budget, periodic atomic
checkpoints, exact resume, and refusing to save what diverged. Engines own
forward/backward/optimizer; stages own data and metrics.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from .. import distributed, finetune, rundir
from ..errors import DalleError, NonFiniteError, UsageError, write_failed
from ..pipeline import Pipeline
from ..recipe import as_data, component_differences, dump, read_yaml
from ..stage import Stage
from .ema import EMA

log = logging.getLogger(__name__)
NOT_LOGGED = {"optimizer_step"}  # an engine's bookkeeping: constant 1 without gradient accumulation


# ----------------------------------------------------------------------------- the run directory


def claim_run_dir(pipe: Pipeline, *, force: bool = False) -> None:
    """Write the run's ``recipe.yaml``, refusing a recipe that builds other components than the run's.

    A run directory holds weights made by its recipe; a recipe with another
    codec, say, would silently mix its weights with the old ones (and fail to
    load later). ``force`` accepts the change: stages whose inputs changed are
    then retrained as stale.
    """
    if not distributed.is_main():
        return
    existing = pipe.run_dir / rundir.RECIPE_FILE
    if existing.is_file() and not force:
        changed = component_differences(read_yaml(existing), as_data(pipe.recipe))
        if changed:
            shown = "\n  ".join(changed[:10]) + (f"\n  ... and {len(changed) - 10} more" if len(changed) > 10 else "")
            raise UsageError(
                f"{pipe.run_dir} was trained with other components than this recipe:\n  {shown}\n"
                f"use another output_dir (e.g. output_dir=runs/new-name), or --force to retrain the run with this recipe"
            )
    rundir.write_text(existing, dump(pipe.recipe))


def stage_status(pipe: Pipeline, name: str) -> tuple[str, Optional[dict]]:
    """``("complete", meta)`` when the stage's weights were made with exactly today's inputs,
    ``("stale", meta)`` when they exist but its recipe block, data, tokenizer or an earlier
    stage changed since, ``("missing", None)`` when it never finished."""
    meta = rundir.read_meta(pipe.run_dir, name)
    if meta is None:
        return "missing", None
    return ("complete" if meta.get("identity") == pipe.stage(name).identity() else "stale"), meta


def _resume_record(stage_dir: Path) -> Optional[dict]:
    path = stage_dir / rundir.RESUME_FILE
    return rundir.read_record(path) if path.is_file() else None


def _recorded_count(record: dict, key: str, source: Path, *, least: int = 0, default: Optional[int] = None) -> int:
    """A whole number a checkpoint records (a step, a process count): a string, a float, a bool or null
    is a tampered file."""
    value = record.get(key, default)
    if type(value) is not int or value < least:
        raise UsageError(f"{source}: {key} {value!r} is not a count; the file is damaged: start the stage over with --force")
    return value


# ----------------------------------------------------------------------------- one stage


def train_stage(pipe: Pipeline, stage_name: str, *, resume: bool = False, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train one stage of ``pipe`` and export its weights into the run directory.

    Returns the final held-out metrics. With ``resume`` the last checkpoint in
    ``<run>/<stage>/state`` restores model, optimizer, scheduler, EMA, RNG and
    data position, and training continues where it stopped. Without it, an
    unfinished checkpoint is an error (``force`` starts over). A non-finite loss
    or gradient stops the run without saving (or skips the batch when the
    recipe says ``nonfinite: skip``); the last finite checkpoint stays.
    """
    join_run(pipe)
    with rundir.locked(pipe.run_dir, rundir.command_line()):
        stage = pipe.stage(stage_name)
        claim_run_dir(pipe, force=force)
        if stage.block.frozen:
            return install_frozen(pipe, stage)
        return _Training(pipe, stage, resume=resume, force=force, progress=progress).run()


class _Training:
    def __init__(self, pipe: Pipeline, stage: Stage, *, resume: bool, force: bool, progress: bool) -> None:
        self.pipe, self.stage, self.progress = pipe, stage, progress
        self.train = stage.train
        # unset: ten held-out evaluations over the run, so a short run has a curve too
        self.eval_every = self.train.eval_every or max(1, self.train.steps // 10)
        self.stage_dir = pipe.run_dir / stage.name
        self.state_dir = self.stage_dir / rundir.STATE_DIR
        self.resume = self._check_resume(resume, force)

    def _check_resume(self, resume: bool, force: bool) -> Optional[Path]:
        """The checkpoint to resume from, or None; an unfinished run is never silently restarted,
        and the checkpoint of a finished one is never taken for an unfinished one."""
        checkpoint = rundir.find_checkpoint(self.state_dir)
        if checkpoint is None:
            if resume and distributed.is_main():
                log.info("no checkpoint to resume in %s; starting from scratch", self.state_dir)
            return None
        if force and not resume:
            return None
        record = _resume_record(self.stage_dir)
        fits = record is not None and record.get("identity") == self.stage.identity(with_train=False)
        if not fits:
            if distributed.is_main():
                log.warning("%s: the checkpoint was made with other %s params or inputs; starting from scratch", self.state_dir, self.stage.name)
            return None
        step = _recorded_count(record, "step", self.stage_dir / rundir.RESUME_FILE)
        published = rundir.read_meta(self.pipe.run_dir, self.stage.name)
        finished = published is not None and published.get("step") == step  # the checkpoint is the published run's end
        if finished and not (resume and step < self.train.steps):
            # Retraining a stale stage starts over: resuming at the old run's end would publish the
            # old weights as the new stage. (--resume with more steps continues it.)
            if distributed.is_main():
                log.info("%s: the checkpoint is the end of the finished run; training from step 0 (to build on it, "
                         "fine-tune: %s.weights: %s)", self.stage.name, self.stage.name, self.stage_dir / rundir.WEIGHTS_FILE)
            return None
        if resume:
            if step > self.train.steps:
                raise UsageError(
                    f"{self.stage_dir}: the checkpoint is at step {step}, past {self.stage.name}.train.steps = {self.train.steps}; "
                    f"raise {self.stage.name}.train.steps to at least {step} to continue it, or start over with --force"
                )
            return checkpoint
        raise UsageError(
            f"{self.stage_dir}: an unfinished {self.stage.name} run stopped at step {step} "
            f"(checkpoint in {checkpoint}); continue it with --resume, or start over with --force"
        )

    def run(self) -> dict[str, Any]:
        pipe, stage, train = self.pipe, self.stage, self.train
        _require_data(stage)  # both splits and what they need (the prior's tokens), before seeding: cached or not, the same stream
        run, module = self._prepare_engine()
        self.main = run.is_main
        self.batches = stage.batches(rank=run.rank, world_size=run.world_size)
        self.ema = _ema(run, train.ema) if train.ema else None
        self.step = 0
        if self.resume is not None:
            self._restore(run)
        self.writer = _writer(pipe.run_dir / "tb" / stage.name) if self.main else None
        if self.writer is not None:
            self.writer.add_text("recipe", "```yaml\n" + dump(pipe.recipe) + "```", self.step)  # the resolved recipe trained
        from ..progress import progress_bar

        bar = progress_bar(total=train.steps, initial=self.step, desc=f"train {stage.name}", enabled=self.main and self.progress, dynamic_ncols=True)
        started = time.monotonic()
        self.logged = (self.step, started)  # (step, time) of the last log: the speed since
        self.eval_module: Optional[torch.nn.Module] = None
        stopped_early, skipped = False, 0
        try:
            module.train()
            while self.step < train.steps:
                out, skipped = self._optimizer_step(skipped)
                self.step += 1
                if self.ema is not None:
                    self.ema.update(run.module)
                bar.update(1)
                self._log(out, bar)
                if self.step % self.eval_every == 0 and self.step < train.steps:
                    self._evaluate()
                if self.step % train.ckpt_every == 0 and self.step < train.steps:
                    self._save_state()
                if train.max_minutes and distributed.any_rank(time.monotonic() - started > train.max_minutes * 60):
                    stopped_early = True
                    break
            self._save_state()
            metrics = self._evaluate()
            weights = self._export()
        except NonFiniteError as exc:
            raise self._diverged(exc) from None
        finally:
            bar.close()
            self.batches.close()
            if self.writer is not None:
                self.writer.close()
        if self.main:
            self._publish(weights, metrics, stopped_early=stopped_early, skipped=skipped, seconds=time.monotonic() - started)
        run.barrier()
        return metrics

    def _prepare_engine(self):
        """The engine and the module, initialised identically on every rank; then each rank's own random stream."""
        pipe, stage, train = self.pipe, self.stage, self.train
        seed = pipe.recipe.seed + stage.seed_offset()
        torch.manual_seed(seed)
        engine = pipe.build("engine", train.engine)
        # ZeRO-3 shards a model while it is built only if it initialises through Module.apply (see ModuleComponent)
        sharded_build = getattr(pipe.manager.registry(stage.kind).get(stage.block.name), "partitioned_init", False)
        with engine.model_context(train) if sharded_build else contextlib.nullcontext():
            module = stage.build()
        if stage.block.weights and not self.resume:
            rundir.load_into(module, stage.block.weights)  # fine-tune from pretrained weights
        module = finetune.prepare(module, stage.block)  # LoRA adapters, frozen layers
        run = self.engine_run = engine.prepare(module, train)
        if run.rank > 0:  # dropout, caption dropout and noise differ per rank; rank 0 keeps the one-process stream
            torch.manual_seed(_rank_seed(seed, run.rank, 0))
        return run, module

    def _restore(self, run) -> None:
        """Continue from the checkpoint: engine state, step, EMA, every rank's data position and random state."""
        record = _resume_record(self.stage_dir) or {}
        saved_world = _recorded_count(record, "world_size", self.stage_dir / rundir.RESUME_FILE, least=1, default=run.world_size)
        if saved_world != run.world_size and not run.resumes_on_other_world_sizes:
            raise UsageError(
                f"{self.state_dir}: saved by {saved_world} process(es), resumed by {run.world_size}; the "
                f"{self.train.engine.name} engine's sharded checkpoints load only on as many ranks: resume with {saved_world}, "
                "or start this stage over with --force"
            )
        client = run.load(str(self.resume))
        try:
            self._restore_client(run, client)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as exc:
            raise UsageError(
                f"{self.resume}: not a checkpoint this framework wrote ({type(exc).__name__}: {str(exc)[:200]}); "
                "start the stage over with --force"
            ) from None
        before, now = record.get("global_batch"), self._global_batch()
        if self.main:
            if before is not None and int(before) != now:
                log.warning("%s: the global batch was %s samples per optimizer step and is %d now (%d rank(s) x %d x grad_accum %d); "
                            "the data continues where it stopped", self.stage.name, before, now, run.world_size,
                            self.train.batch_size, self.train.grad_accum)
            log.info("resumed %s at step %d", self.stage.name, self.step)

    def _restore_client(self, run, client: Any) -> None:
        if not isinstance(client, dict):
            raise TypeError(f"the saved state is a {type(client).__name__}, not a record")
        self.step = _recorded_count(client, "step", self.resume)
        if self.step > self.train.steps:
            raise ValueError(f"step {self.step} is past {self.stage.name}.train.steps = {self.train.steps}")
        if not isinstance(client["data"], list):
            raise TypeError("the data position is not a list of per-rank states")
        self.batches.load_state_dict(client["data"])
        if self.ema is not None and "ema" in client:
            self.ema.load_state_dict(client["ema"])
        rng = client.get("rng")
        if isinstance(rng, list):  # one state per rank of the run that saved it
            if run.rank < len(rng):
                rundir.set_rng_state(rng[run.rank])
            else:
                torch.manual_seed(_rank_seed(self.pipe.recipe.seed + self.stage.seed_offset(), run.rank, self.step))
        elif rng is not None:
            rundir.set_rng_state(rng)

    def _global_batch(self) -> int:
        return self.engine_run.world_size * self.train.batch_size * self.train.grad_accum

    def _log(self, out: dict[str, float], bar) -> None:
        """Training scalars averaged over ranks (a collective at the same steps on every rank) and the
        speed since the last log, written by rank 0."""
        if not (self.step % self.train.log_every == 0 or self.step == 1):
            return
        out = distributed.mean_over_ranks({k: v for k, v in out.items() if k not in NOT_LOGGED})
        now = time.monotonic()
        steps, seconds = self.step - self.logged[0], now - self.logged[1]
        self.logged = (self.step, now)
        if not self.main:
            return
        bar.set_postfix(loss=f"{out.get('loss', float('nan')):.4f}")
        for key, value in out.items():
            self.writer.add_scalar(f"train/{key}", value, self.step)
        if steps > 0 and seconds > 0:
            samples = steps * self._global_batch() / seconds
            self.writer.add_scalar("speed/step_seconds", seconds / steps, self.step)
            self.writer.add_scalar("speed/samples_per_s", samples, self.step)
            tokens = self.stage.tokens_per_sample()
            if tokens:
                self.writer.add_scalar("speed/tokens_per_s", samples * tokens, self.step)

    # ------------------------------------------------------------------ steps

    def _optimizer_step(self, skipped: int) -> tuple[dict[str, float], int]:
        """One optimizer step over ``grad_accum`` micro-batches; non-finite ones are skipped when allowed."""
        train, run, stage = self.train, self.engine_run, self.stage
        micro, consecutive, out = 0, 0, {}
        while micro < train.grad_accum:
            key = (self.step * train.grad_accum + micro) * run.world_size + run.rank  # distinct per micro-batch and rank
            batch = stage.augment(next(self.batches), key)
            try:
                out = run.step(*stage.step_args(batch, self.step, run.device))
            except NonFiniteError as exc:
                if train.nonfinite != "skip" or exc.applied or consecutive >= train.max_skipped:
                    raise
                consecutive, skipped = consecutive + 1, skipped + 1
                if self.main:
                    log.warning("%s: %s at step %d; skipped that batch (nonfinite: skip)", stage.name, exc, self.step + 1)
                if exc.step_discarded:
                    micro = 0  # the engine dropped the whole accumulated step
                continue
            micro += 1
        return out, skipped

    def _diverged(self, exc: NonFiniteError) -> DalleError:
        record = _resume_record(self.stage_dir)
        kept = (
            f"the last finite checkpoint (step {record.get('step')}) stays in {self.state_dir}"
            if record is not None and rundir.find_checkpoint(self.state_dir) is not None
            else "there is no earlier checkpoint"
        )
        name = self.stage.name
        return DalleError(
            f"{name}: {exc} at step {self.step + 1}; training stopped and nothing of this run was saved ({kept}). "
            f"Lower {name}.train.lr, set {name}.train.grad_clip, or let it skip such batches with {name}.train.nonfinite: skip"
        )

    def _export(self) -> Optional[dict[str, torch.Tensor]]:
        """Full fp32 weights (EMA when enabled) on rank 0 only, consolidated one parameter at a time so no
        other rank's memory grows with the model; collective, so every rank calls it. Refuses non-finite ones."""
        run = self.engine_run
        if self.ema is not None:
            weights = self.ema.weights(run.module) if self.main else None
        else:
            weights = run.full_state_dict(rank=0) if run.world_size > 1 else run.full_state_dict()
        bad = next((k for k, v in (weights or {}).items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
        if distributed.any_rank(bad is not None):
            raise NonFiniteError(f"weight {bad or '(on rank 0)'}", float("nan"), applied=True)
        return weights

    def _save_state(self) -> None:
        run = self.engine_run
        local_bad = any(not torch.isfinite(p).all() for p in run.module.parameters() if p.numel())
        if distributed.any_rank(local_bad):
            raise NonFiniteError("a weight", float("nan"), applied=True)
        # Every rank's data position and random state: each continues its own on resume.
        data, rng = zip(*distributed.all_gather_object((self.batches.state_dict(), rundir.rng_state())))
        client = {"step": self.step, "data": list(data), "rng": list(rng), "world_size": run.world_size}
        if self.ema is not None:
            client["ema"] = self.ema.state_dict()
        run.save(str(self.state_dir), client)
        if self.main:
            rundir.write_json(self.stage_dir / rundir.RESUME_FILE, {
                "step": self.step, "identity": self.stage.identity(with_train=False),
                "world_size": run.world_size, "global_batch": self._global_batch(),
            })

    def _evaluate(self) -> dict[str, float]:
        """Held-out metrics on every rank's share (summed over ranks) and a preview, written by rank 0.

        The model is evaluated as the engine holds it (sharded by ZeRO-3, bf16 under DeepSpeed's
        bf16), so no rank needs a full copy; with EMA, the averaged weights in a module of their own.
        A fixed seed and a restored random state keep evaluation out of the training stream.
        """
        run, device = self.engine_run, self.engine_run.device
        with _isolated_rng(self.pipe.recipe.seed, device), run.evaluating():
            module = self._eval_module()
            result = self.stage.evaluate(module, device, collective=True)
            if self.main:
                for key, value in result.items():
                    self.writer.add_scalar(f"eval/{key}", value, self.step)
            if self.main or run.sharded_forward:  # under ZeRO-3 every rank runs the preview's forward passes
                _log_preview(self.writer, self.stage, module, device, self.step)
        return result

    def _eval_module(self) -> torch.nn.Module:
        if self.ema is None:
            return self.engine_run.module
        if self.eval_module is None:
            self.eval_module = self.stage.build().to(self.engine_run.device)
        self.eval_module.load_state_dict(finetune.plain_weights(self.ema.weights(self.engine_run.module), self.stage.block))
        return self.eval_module

    def _publish(self, weights: dict[str, torch.Tensor], metrics: dict[str, float], **facts: Any) -> None:
        stage, block = self.stage, self.stage.block
        finetune.save_trained(self.stage_dir / rundir.WEIGHTS_FILE, weights, block, {"component": block.name, "stage": stage.name})
        _write_meta(self.pipe, stage, metrics, step=self.step, world_size=self.engine_run.world_size, **facts)
        self.pipe.forget(stage.name)  # the next access loads the new weights


def _rank_seed(seed: int, rank: int, step: int) -> int:
    """The seed of a rank's own random stream (ranks > 0; rank 0 keeps the one-process stream)."""
    return (seed * 1_000_003 + rank * 7_919 + step) % 2**63


def _write_meta(pipe: Pipeline, stage: Stage, metrics: dict[str, Any], **facts: Any) -> None:
    block = stage.block
    rundir.write_json(
        pipe.run_dir / stage.name / rundir.META_FILE,
        {
            "complete": True,
            "run_id": uuid.uuid4().hex,  # later stages record which run of this one they were trained on
            "stage": stage.name,
            "component": block.name,
            "plugin": pipe.manager.registry(stage.kind).get(block.name).plugin,
            "identity": stage.identity(),
            "metrics": metrics,
            "finished_at": datetime.now(timezone.utc).isoformat(),
            **{k: round(v, 1) if isinstance(v, float) else v for k, v in facts.items()},
        },
    )


def install_frozen(pipe: Pipeline, stage: Stage) -> dict[str, Any]:
    """A frozen stage is not trained: its pretrained ``weights`` are checked, copied into the run and measured (by rank 0)."""
    result = _install_frozen(pipe, stage) if distributed.is_main() else {"frozen": True}
    distributed.barrier()
    return result


def _install_frozen(pipe: Pipeline, stage: Stage) -> dict[str, Any]:
    source = Path(stage.block.weights)
    if not source.is_file():
        raise UsageError(
            f"{stage.name}.weights: {str(source)!r} not found; a frozen {stage.name} loads weights made elsewhere "
            f"(`dalle convert {stage.block.name} FILE... OUT` writes them), nothing here trains it"
        )
    module = stage.build()
    rundir.load_into(module, source)
    device = pipe.device
    module = module.to(device).eval()
    with _isolated_rng(pipe.recipe.seed, device):
        metrics = stage.evaluate(module, device) if _has_heldout(stage) else {}
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    rundir.save_weights(pipe.run_dir / stage.name / rundir.WEIGHTS_FILE, {k: v for k, v in module.state_dict().items()},
                        metadata={"component": stage.block.name, "stage": stage.name})
    _write_meta(pipe, stage, metrics, frozen=True, source=str(source.resolve()), source_sha256=digest, step=0)
    pipe.forget(stage.name)
    return {**metrics, "frozen": True}


def _has_heldout(stage: Stage) -> bool:
    return stage.size("heldout") > 0


def _require_data(stage: Stage) -> None:
    """Both splits exist and what the stage derives from them is made (collective: every rank calls it)."""
    stage.prepare()  # the prior's image tokens: each rank encodes its share
    for split in ("train", "heldout"):
        if stage.stream(split) is not None:
            stage.counts(split, collective=True)  # each rank counts its share of the shards, once
    if stage.size("train") == 0:
        raise UsageError(f"data: the training split is empty; {stage.name} has nothing to learn from (check data.params)")
    if not _has_heldout(stage):
        raise UsageError(
            f"data: the held-out split is empty; every stage is measured on held-out data (check data.params, e.g. heldout_percent)"
        )


def check_captions(pipe: Pipeline) -> dict[str, Any]:
    """How the tokenizer reads the captions (rank 0 reads them; every rank gets the verdict), printed;
    a tokenizer that reads too many words as unknown stops the run (exit 2)."""
    from ..captions import SAMPLE, caption_report, check_coverage, format_report

    report = None
    if distributed.is_main():
        report = caption_report(pipe.tokenizer, {s: pipe.caption_sample(s, SAMPLE) for s in ("train", "heldout")})
        print(format_report(report), file=sys.stderr)
    report = distributed.broadcast_object(report)
    check_coverage(report, pipe.recipe.tokenizer.max_unknown, pipe.recipe.tokenizer.name)
    return report


def join_run(pipe: Pipeline) -> None:
    """Join the job's process group (under torchrun / deepspeed) with the recipe's timeout, and check that
    every rank sees the same run directory, which checkpoints and exports need."""
    distributed.set_timeout(pipe.recipe.distributed.timeout_minutes)
    distributed.init_distributed()
    rundir.check_shared(pipe.run_dir)


@contextlib.contextmanager
def _isolated_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run a block with a fixed seed and restore the RNG state afterwards."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _ema(run, decay: float) -> EMA:
    try:
        return EMA(run.module, decay)
    except ValueError as exc:
        raise UsageError(f"train.ema: {exc}; drop `ema` or use ZeRO stage 0-2") from None


class _TensorBoard:
    """A SummaryWriter whose failures name its directory: it writes from a thread and raises a full
    disk on a later call as a bare OSError (no file name), which here becomes exit 1 naming it."""

    def __init__(self, path: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        if not getattr(threading.excepthook, "quiets_tensorboard", False):
            threading.excepthook = _quiet_writer_threads(threading.excepthook)
        self.path = rundir.make_dirs(path)
        self._writer = self._named(SummaryWriter)(log_dir=str(self.path))

    def _named(self, write):
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return write(*args, **kwargs)
            except rundir.WRITE_ERRORS as exc:
                raise write_failed(f"{self.path} (TensorBoard events)", exc) from None

        return call

    def __getattr__(self, name: str) -> Any:
        return self._named(getattr(self._writer, name))


def _quiet_writer_threads(previous):
    """A failed write in TensorBoard's writer thread is raised again on the next call, named there:
    the thread's own traceback is left out (any other thread's error still prints)."""

    def hook(args: threading.ExceptHookArgs) -> None:
        if type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, rundir.WRITE_ERRORS):
            return
        previous(args)

    hook.quiets_tensorboard = True  # type: ignore[attr-defined]
    return hook


def _writer(path: Path) -> _TensorBoard:
    return _TensorBoard(path)


def _log_preview(writer, stage: Stage, module, device, step: int) -> None:
    """The stage's preview as one captioned grid (a caption beside each row) in TensorBoard."""
    try:
        preview = stage.preview(module, device)
    except UsageError:
        return
    if preview is None or writer is None:
        return
    from ..data.images import captioned_grid, to_tensor

    writer.add_image(f"{stage.name}/preview", to_tensor(captioned_grid(preview.images.float().cpu(), preview.captions)), step)


# ----------------------------------------------------------------------------- all stages


def train_all(
    pipe: Pipeline, stages: Optional[list[str]] = None, *, resume: bool = False, force: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Train the named stages (default: all) in training order.

    A stage whose weights were made from exactly today's inputs is reused; one
    whose block, data, tokenizer or an earlier stage changed since is stale and
    retrained. ``force`` retrains the named stages anyway.
    """
    names = [n for n in pipe.stages if stages is None or n in stages]
    for name in stages or []:
        pipe.stage(name)  # unknown names are a clear error
    results: dict[str, Any] = {}
    join_run(pipe)
    with rundir.locked(pipe.run_dir, rundir.command_line()):
        claim_run_dir(pipe, force=force)
        distributed.barrier()  # the recipe file is in place before any rank reads the run
        fitted = pipe.fit_tokenizer()
        if fitted is not None and not fitted.get("reused"):
            results["tokenizer"] = fitted
        if force or any(stage_status(pipe, name)[0] != "complete" for name in names):
            results["text"] = check_captions(pipe)
        for name in names:
            status = "forced" if force else stage_status(pipe, name)[0]  # --force retrains even over a damaged record
            if status == "complete":
                if distributed.is_main():
                    log.info("%s already trained in %s; reusing it (use --force to retrain)", name, pipe.run_dir)
                results[name] = {"reused": True}
                continue
            if status == "stale" and distributed.is_main():
                log.warning("%s: trained on inputs that changed since; retraining it", name)
            results[name] = train_stage(pipe, name, resume=resume, force=force, progress=progress)
    return results
