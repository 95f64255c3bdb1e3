"""Process-group helpers shared by the training engines and the training loop.

A job is described by the environment variables that ``torchrun`` and the
``deepspeed`` launcher both set: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``. Without a launcher the job is one process
(rank 0 of 1). The backend is ``nccl`` when CUDA is available, else ``gloo``.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # imported where used: a single process that builds no model never loads torch
    import torch


# Single-process defaults: DeepSpeed reads these (LOCAL_RANK above all) even for one
# process, and without them it falls back to discovering an MPI launcher.
_SINGLE_PROCESS_ENV = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for ``MASTER_PORT``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip().lstrip("-").isdigit() else default


def _group():
    """torch.distributed when a process group exists, else None. A process that never imported it has
    none, so commands that build no model ask without loading torch."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def is_initialized() -> bool:
    return _group() is not None


def rank() -> int:
    """Global rank: from the process group when there is one, else ``RANK`` (0)."""
    dist = _group()
    return dist.get_rank() if dist is not None else _env_int("RANK", 0)


def world_size() -> int:
    """Number of processes: from the process group when there is one, else ``WORLD_SIZE`` (1)."""
    dist = _group()
    return dist.get_world_size() if dist is not None else _env_int("WORLD_SIZE", 1)


def local_rank() -> int:
    """Rank on this node (``LOCAL_RANK``), which picks the GPU."""
    return _env_int("LOCAL_RANK", 0)


def is_main() -> bool:
    return rank() == 0


def default_backend() -> str:
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


def set_single_process_env() -> None:
    """Fill in ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` of a one-process job where they are unset.

    ``MASTER_ADDR``/``MASTER_PORT`` are deliberately not written: this process
    listens on that port while its group lives, and a child process (a
    ``dalle train`` started by a test, say) inheriting it would collide with it.
    A one-process group is rendezvoused on a fresh port instead.
    """
    for key, value in _SINGLE_PROCESS_ENV.items():
        os.environ.setdefault(key, value)


DEFAULT_TIMEOUT_MINUTES = 30.0
_timeout_minutes = DEFAULT_TIMEOUT_MINUTES


def set_timeout(minutes: float) -> None:
    """How long a collective may wait for the slowest rank before the job fails (the recipe's
    ``distributed.timeout_minutes``); takes effect when the process group is created."""
    global _timeout_minutes
    _timeout_minutes = float(minutes)


def init_distributed(
    *, backend: Optional[str] = None, always: bool = False, timeout_minutes: Optional[float] = None
) -> tuple[int, int, int]:
    """Join the process group described by the environment; returns ``(rank, world_size, local_rank)``.

    With ``WORLD_SIZE`` > 1 (under ``torchrun`` or ``deepspeed``) this initialises
    ``torch.distributed`` from the launcher's variables. A single process gets a
    group only when ``always`` is true (DeepSpeed needs one): rank 0 of 1 on
    ``127.0.0.1`` at a free port (``MASTER_ADDR``/``MASTER_PORT`` when set).
    Calling it again once initialised is a no-op.
    """
    import torch
    import torch.distributed as dist

    if not is_initialized():
        set_single_process_env()
        multi = _env_int("WORLD_SIZE", 1) > 1
        if multi or always:
            backend = backend or default_backend()
            extra: dict = {}
            if not multi:
                addr = os.environ.get("MASTER_ADDR") or "127.0.0.1"
                port = os.environ.get("MASTER_PORT") or free_port()
                extra.update(init_method=f"tcp://{addr}:{port}", rank=0, world_size=1)
            if backend == "nccl":
                # Bind this rank to its GPU up front: NCCL otherwise guesses from the global rank.
                torch.cuda.set_device(default_device())
                extra["device_id"] = default_device()
            minutes = _timeout_minutes if timeout_minutes is None else timeout_minutes
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=minutes), **extra)
    return rank(), world_size(), local_rank()


def _multi_rank_group():
    """torch.distributed when this process is one of several in a group, else None."""
    dist = _group()
    return dist if dist is not None and dist.get_world_size() > 1 else None


def barrier() -> None:
    """Wait for every rank (no-op for a single process)."""
    dist = _multi_rank_group()
    if dist is not None:
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (identity for a single process).

    Ranks must agree before acting on a local fact (out of time, a NaN loss),
    or the ones that act would wait forever in the next collective.
    """
    dist = _multi_rank_group()
    if dist is None:
        return bool(flag)
    import torch

    device = default_device() if dist.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def all_gather_object(obj) -> list:
    """``obj`` of every rank, in rank order (``[obj]`` for a single process)."""
    dist = _multi_rank_group()
    if dist is None:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def sum_over_ranks(values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over ranks (float64; the same list on every rank)."""
    dist = _multi_rank_group()
    if dist is None or not values:
        return [float(v) for v in values]
    import torch

    device = default_device() if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().tolist()


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """The mean over ranks of each value (keys in the same order on every rank)."""
    keys = sorted(values)
    sums = sum_over_ranks([values[k] for k in keys])
    return {k: s / world_size() for k, s in zip(keys, sums)}


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (identity for a single process)."""
    dist = _multi_rank_group()
    if dist is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor[n_rank, ...]`` concatenated in rank order, on every rank (identity for one process).

    Ranks may hold different numbers of rows; the trailing shape and dtype must agree. Tensors
    travel as tensors (padded to the longest), never pickled. Bools travel as uint8.
    """
    dist = _multi_rank_group()
    if dist is None:
        return tensor
    import torch

    device = default_device() if dist.get_backend() == "nccl" else torch.device("cpu")
    local = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor
    local = local.to(device).contiguous()
    count = torch.tensor([len(local)], device=device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    longest = max(int(c) for c in counts)
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: len(local)] = local
    parts = [torch.zeros_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    out = torch.cat([part[: int(c)] for part, c in zip(parts, counts)]).cpu()
    return out.bool() if tensor.dtype == torch.bool else out


__all__ = [
    "all_gather_object",
    "any_rank",
    "barrier",
    "broadcast_object",
    "default_backend",
    "default_device",
    "free_port",
    "gather_rows",
    "init_distributed",
    "is_initialized",
    "is_main",
    "local_rank",
    "mean_over_ranks",
    "rank",
    "set_single_process_env",
    "set_timeout",
    "sum_over_ranks",
    "world_size",
]
