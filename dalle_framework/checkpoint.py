"""Run directories and atomic, unpickle-free checkpoint files.

A trained pipeline is a directory::

    recipe.yaml               the fully resolved recipe it was trained with
    <stage>/model.safetensors one file per component (EMA weights when enabled)
    <stage>/meta.json         step, metrics, component name and plugin
    <stage>/state/            engine state for --resume (optimizer, scheduler, RNG, data position)
    tokens/<split>.safetensors image tokens pre-encoded by the frozen codec
    tb/<stage>/               TensorBoard event files

Every file is written to a temporary name, fsynced and renamed, so a crash
leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from safetensors.torch import load_file, save_file

from .errors import UsageError

RECIPE_FILE = "recipe.yaml"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"{path}: missing; is this a run directory written by `dalle train`?") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: not valid JSON ({exc})") from None


def save_weights(path: str | Path, state: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> None:
    """Save a state dict as safetensors (shared storage is cloned: safetensors refuses aliases)."""
    seen: dict[int, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        value = value.detach().cpu()
        ptr = value.untyped_storage().data_ptr() if value.numel() else -1
        tensors[key] = value.clone().contiguous() if ptr in seen or not value.is_contiguous() else value
        if ptr != -1:
            seen[ptr] = key
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: weights file missing; train this stage first (`dalle train RECIPE --stage ...`)")
    return load_file(str(path), device=str(device))


def load_into(module: torch.nn.Module, path: str | Path) -> None:
    """Load safetensors weights into ``module``, naming any key mismatch."""
    state = load_weights(path)
    result = module.load_state_dict(state, strict=False)
    problems = []
    if result.missing_keys:
        problems.append(f"missing keys {result.missing_keys[:5]}")
    if result.unexpected_keys:
        problems.append(f"unexpected keys {result.unexpected_keys[:5]}")
    if problems:
        raise UsageError(f"{path}: weights do not fit {type(module).__name__}: {'; '.join(problems)}")


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def stage_complete(run_dir: Path, stage: str, block: Optional[dict] = None) -> bool:
    """True when ``stage`` finished training, with the same recipe block if one is given."""
    meta_path = run_dir / stage / META_FILE
    if not (meta_path.is_file() and (run_dir / stage / WEIGHTS_FILE).is_file()):
        return False
    meta = json.loads(meta_path.read_text())
    return bool(meta.get("complete")) and (block is None or meta.get("block") == block)
