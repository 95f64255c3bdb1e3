"""The job queue: generation jobs run one at a time by a single worker thread, their progress, their
cancellation and the PNG bytes of the finished ones, held in memory under random ids."""

from __future__ import annotations

import io
import math
import queue
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from ..schema import Sampling

if TYPE_CHECKING:  # the model side is imported where it is used: `dalle serve --help` loads no torch
    import torch

    from ..pipeline import Pipeline

from .api import ImageOut, JobOut, Limits, Progress


# ----------------------------------------------------------------------------- jobs


class _Stop(Exception):
    """Raised from the progress callback to end a job that ran past ``max_seconds`` or was cancelled."""


class QueueFull(Exception):
    """``max_queue`` jobs are already waiting or running."""


class NotCancellable(Exception):
    """The job has already ended (done, failed or cancelled)."""


ACTIVE = ("queued", "running")
FINISHED = ("done", "failed", "cancelled")


@dataclass
class _Job:
    id: str
    caption: str
    seen_as: str
    candidates: int
    keep: int
    sampling: Sampling
    seed: int
    status: str = "queued"
    done: int = 0
    total: int = 0
    started: Optional[float] = None
    finished: Optional[float] = None
    error: Optional[str] = None
    cancel_requested: bool = False  # read by the worker's progress callback, set under the queue's lock
    images: list[tuple[str, Optional[float]]] = field(default_factory=list)  # (image id, score), best first
    grid: Optional[str] = None


def png_bytes(image: torch.Tensor) -> bytes:
    """Float ``[3, H, W]`` in [0, 1] -> PNG bytes (no metadata, so the bytes depend on the pixels only)."""
    from ..data.images import to_pil

    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="PNG")
    return buffer.getvalue()


class JobQueue:
    """Generation jobs run one at a time, in order, by a single worker thread.

    Holds every job's state and the PNG bytes of finished ones; all access goes
    through one lock. The worker starts with the first job and stops on :meth:`close`.
    """

    def __init__(self, pipeline: Pipeline, limits: Limits) -> None:
        self.pipeline = pipeline
        self.limits = limits
        self._lock = threading.Lock()
        self._jobs: "OrderedDict[str, _Job]" = OrderedDict()
        self._images: dict[str, bytes] = {}
        self._pending: "queue.Queue[Optional[_Job]]" = queue.Queue()
        self._worker: Optional[threading.Thread] = None

    def submit(self, job: _Job) -> None:
        with self._lock:
            waiting = sum(j.status in ACTIVE for j in self._jobs.values())
            if waiting >= self.limits.max_queue:
                raise QueueFull(
                    f"queue: {waiting} jobs are waiting or running, this server's bound (max_queue={self.limits.max_queue}); "
                    "try again when one finishes"
                )
            self._jobs[job.id] = job
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="dalle-generate", daemon=True)
                self._worker.start()
        self._pending.put(job)

    def close(self, timeout: float = 10.0) -> None:
        self._pending.put(None)
        if self._worker is not None:
            self._worker.join(timeout)

    def image(self, image_id: str) -> Optional[bytes]:
        with self._lock:
            return self._images.get(image_id)

    def describe(self, job_id: str) -> Optional[JobOut]:
        """A consistent snapshot of a job for the API, or None for an unknown (or evicted) id."""
        per_image = self._tokens_per_image()
        with self._lock:
            job = self._jobs.get(job_id)
            return None if job is None else self._out(job, per_image)

    def history(self) -> list[JobOut]:
        """Every job held (waiting, running, and the last ``max_results`` finished), newest first, in one snapshot."""
        per_image = self._tokens_per_image()
        with self._lock:
            return [self._out(job, per_image) for job in reversed(self._jobs.values())]

    def cancel(self, job_id: str) -> Optional[JobOut]:
        """Drop a queued job, or ask a running one to stop at its next progress callback; None for an unknown id.
        Raises NotCancellable for a job that has already ended."""
        per_image = self._tokens_per_image()
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            if job.status in FINISHED:
                raise NotCancellable(f"job {job_id!r} is already {job.status}; only a queued or running job can be cancelled")
            job.cancel_requested = True
            if job.status == "queued":  # the worker skips it when it comes up
                job.status, job.finished = "cancelled", time.time()
                self._evict()
            return self._out(job, per_image)

    def _tokens_per_image(self) -> int:
        from ..interfaces import ImageCodec

        # Outside the lock: the first call may load the codec.
        return int(self.pipeline.part(ImageCodec).tokens_per_image)

    def _out(self, job: _Job, per_image: int) -> JobOut:
        """``job`` for the API; the caller holds the lock."""
        queued = [j.id for j in self._jobs.values() if j.status == "queued"]
        return JobOut(
            id=job.id,
            status=job.status,  # type: ignore[arg-type]
            caption=job.caption,
            seen_as=job.seen_as,
            candidates=job.candidates,
            keep=job.keep,
            sampling=job.sampling.model_dump(),
            seed=job.seed,
            queue_position=queued.index(job.id) + 1 if job.id in queued else None,
            progress=Progress(done=job.done, total=job.total or job.candidates * per_image),
            elapsed=None if job.started is None else round((job.finished or time.time()) - job.started, 3),
            error=job.error,
            cancel_requested=job.cancel_requested,
            images=[ImageOut(rank=i + 1, url=f"/images/{image_id}.png", score=score) for i, (image_id, score) in enumerate(job.images)],
            grid_url=None if job.grid is None else f"/images/{job.grid}.png",
        )

    def _work(self) -> None:
        while (job := self._pending.get()) is not None:
            with self._lock:
                if job.status != "queued":  # cancelled while it waited
                    continue
                job.status, job.started = "running", time.time()
            try:
                pngs, scores, grid = self._generate(job)
            except _Stop as exc:
                self._finish(job, error=str(exc))
            except Exception as exc:  # a failed job must not take the worker down
                self._finish(job, error=f"{type(exc).__name__}: {exc}")
            else:
                self._finish(job, pngs=pngs, scores=scores, grid=grid)

    def _generate(self, job: _Job) -> tuple[list[bytes], list[Optional[float]], bytes]:
        from ..data.images import captioned_grid

        deadline = time.monotonic() + self.limits.max_seconds

        def on_progress(done: int, total: int) -> None:
            job.done, job.total = done, total
            if job.cancel_requested:
                raise _Stop("cancelled")
            if time.monotonic() > deadline:
                raise _Stop(
                    f"stopped after {self.limits.max_seconds:g} s, this server's bound on run time (max_seconds); "
                    "ask for fewer candidates"
                )

        result = self.pipeline.generate(
            [job.caption], candidates=job.candidates, keep=job.keep, sampling=job.sampling, seed=job.seed, on_progress=on_progress
        )
        scores = [None if math.isnan(float(s)) else float(s) for s in result.scores[0]]
        pngs = [png_bytes(image) for image in result.images[0]]
        grid = captioned_grid(result.images, [job.caption], result.scores)
        buffer = io.BytesIO()
        grid.save(buffer, format="PNG")
        return pngs, scores, buffer.getvalue()

    def _finish(self, job: _Job, *, pngs=(), scores=(), grid: Optional[bytes] = None, error: Optional[str] = None) -> None:
        with self._lock:
            if job.cancel_requested:  # also when the cancel came after the last token: its images are not wanted
                job.status, job.finished = "cancelled", time.time()
                self._evict()
                return
            for png, score in zip(pngs, scores):
                image_id = secrets.token_urlsafe(16)
                self._images[image_id] = png
                job.images.append((image_id, score))
            if grid is not None:
                job.grid = secrets.token_urlsafe(16)
                self._images[job.grid] = grid
            job.status, job.error, job.finished = ("failed" if error else "done"), error, time.time()
            if not error:
                job.done = job.total
            self._evict()

    def _evict(self) -> None:
        """Drop the oldest finished jobs, with their PNGs, past ``max_results``; the caller holds the lock."""
        finished = [j for j in self._jobs.values() if j.status in FINISHED]
        for old in finished[: max(0, len(finished) - self.limits.max_results)]:
            for image_id, _ in old.images:
                self._images.pop(image_id, None)
            self._images.pop(old.grid or "", None)
            del self._jobs[old.id]


