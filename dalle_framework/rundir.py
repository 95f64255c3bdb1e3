"""Run directories: atomic files and directories, weights, resume state, stage records, locks.

A trained pipeline is a directory::

    recipe.yaml                the fully resolved recipe it was trained with
    .lock                      held (flock) by the one process writing the directory
    <stage>/model.safetensors  one file per component (EMA weights when enabled)
    <stage>/meta.json          step, metrics, component, what it was trained on
    <stage>/state/             engine state for --resume (optimizer, scheduler, RNG, data position)
    <stage>/resume.json        which recipe block the state/ checkpoint belongs to
    tokens/<split>.safetensors image tokens pre-encoded by the frozen codec
    tokenizer/                 a fitted tokenizer (BPE), when the recipe's needs one
    judge/                     a data source's learned judge, cached (DataSource.prepare_judge)
    tb/<stage>/                TensorBoard event files
    eval/                      `dalle evaluate`'s report, grids and sweeps; reference/: cached real-image features

Every file is written to a temporary name, fsynced and renamed, so a crash
leaves either the old file or the new one, never half of one; directories
(checkpoints) are published the same way. Files get the permissions the umask
allows (0644 under the usual 022), not the 0600 of a bare temporary file.
Nothing here unpickles: weights are safetensors, JSON is JSON, and torch
files are read with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import stat
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional

from . import distributed
from .errors import DalleError, UsageError, write_failed

if TYPE_CHECKING:  # torch is imported where it is used: commands that build no model never load it
    import torch

RECIPE_FILE = "recipe.yaml"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"
STATE_DIR = "state"
RESUME_FILE = "resume.json"
LOCK_FILE = ".lock"
MAX_JSON_BYTES = 64 * 2**20  # meta and report files are kilobytes; refuse to parse anything absurd


# ----------------------------------------------------------------------------- permissions


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _share(path: Path, *, directory: bool = False) -> None:
    """Give a temporary file or directory the mode a plain ``open``/``mkdir`` would (mkstemp uses 0600)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def make_dirs(path: str | Path) -> Path:
    """``mkdir -p`` with a message that names the path when it cannot be made."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UsageError(f"{path}: exists and is not a directory; choose another output path") from None
    except NotADirectoryError:
        raise UsageError(f"{path}: a parent of this path is a file, not a directory; choose another output path") from None
    except PermissionError:
        raise UsageError(f"{path}: permission denied; choose a directory you can write to") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot create the directory ({exc.strerror})") from None
    return path


# ----------------------------------------------------------------------------- atomic files


def check_output(path: Path) -> None:
    """An output may replace only a regular file: renaming over ``/dev/null``, a FIFO or a socket
    would replace the device or the channel itself (as root, the device node)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return  # nothing there yet (or a dangling link, which the rename replaces)
    except NotADirectoryError:
        raise UsageError(f"{path.parent}: exists and is not a directory; choose another output path") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot be checked as an output ({exc.strerror}); give another file name") from None
    if stat.S_ISDIR(mode):
        raise UsageError(f"{path}: is a directory; give a file name")
    if not stat.S_ISREG(mode):
        raise UsageError(f"{path}: is a {_kind(mode)}, not a regular file; outputs never replace one: give a file name")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


# What a writer inside atomic_path/atomic_directory raises when the disk fails it: the OS's errors,
# torch's stream writer (RuntimeError) and safetensors' own error type.
WRITE_ERRORS: tuple[type[BaseException], ...] = (OSError, RuntimeError)
with contextlib.suppress(ImportError):
    from safetensors import SafetensorError

    WRITE_ERRORS += (SafetensorError,)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    Any failure while writing (a full disk, say) is an exit-1 error naming ``path``, and the
    file that was there stays as it was."""
    path = Path(path)
    make_dirs(path.parent)
    check_output(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise write_failed(path, exc) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
            _share(tmp_path)
            os.replace(tmp_path, path)
        except DalleError:
            raise
        except WRITE_ERRORS as exc:
            raise write_failed(path, exc) from exc
        _fsync_dir(path.parent)
    finally:
        with contextlib.suppress(OSError):
            tmp_path.unlink()


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    """A JSON file of the framework's; a missing, oversized, damaged or non-regular one is a UsageError naming it."""
    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (regular files ignore the flag).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise UsageError(f"{path}: missing; is this a run directory written by `dalle train`?") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise UsageError(f"{path}: is a directory, expected a JSON file")
        if not stat.S_ISREG(info.st_mode):  # a FIFO, socket or device (/dev/zero) would block or never end
            raise UsageError(f"{path}: not a regular file; replace it with the JSON file the framework wrote")
        # Size checked before reading, and the read bounded too: the file may grow after fstat.
        with os.fdopen(fd, "rb", closefd=False) as file:
            too_large = info.st_size > MAX_JSON_BYTES or len(data := file.read(MAX_JSON_BYTES + 1)) > MAX_JSON_BYTES
    finally:
        os.close(fd)
    if too_large:
        raise UsageError(f"{path}: over {MAX_JSON_BYTES} bytes, far too large for this file; it is not one the framework wrote")
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # decoding errors are ValueErrors; RecursionError: absurdly deep nesting
        raise UsageError(f"{path}: damaged, not valid JSON ({exc}); restore it or retrain with --force") from None


def sha256_file(path: str | Path) -> str:
    """The hex SHA-256 of a file's bytes (what a report records about the weights it used)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- weights


def save_weights(path: str | Path, state: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> None:
    """Save a state dict as safetensors (shared storage is cloned: safetensors refuses aliases)."""
    from safetensors.torch import save_file

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
    """A safetensors file as a state dict; a missing or damaged file is a clear error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: weights file missing; train this stage first (`dalle train RECIPE --stage ...`)")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{path}: not readable (permission denied); give yourself read access (chmod u+r) or use another file")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, ValueError, OSError) as exc:
        raise UsageError(f"{path}: damaged weights file ({exc}); restore it or retrain the stage with --force") from None


def weights_metadata(path: str | Path) -> dict[str, str]:
    """A safetensors file's metadata, read without loading its tensors ({} when unreadable: load_weights says why)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return {}


def load_into(module: torch.nn.Module, path: str | Path) -> None:
    """Load safetensors weights into ``module``, naming any key or shape mismatch."""
    state = load_weights(path)
    own = module.state_dict()
    resized = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in own.items() if k in state and state[k].shape != v.shape]
    if resized:
        raise UsageError(f"{path}: weights do not fit {type(module).__name__}: other shapes for {resized[:3]}")
    _check_bound_params(module, path)
    result = module.load_state_dict(state, strict=False)
    problems = []
    if result.missing_keys:
        problems.append(f"missing keys {result.missing_keys[:5]}")
    if result.unexpected_keys:
        problems.append(f"unexpected keys {result.unexpected_keys[:5]}")
    if problems:
        raise UsageError(f"{path}: weights do not fit {type(module).__name__}: {'; '.join(problems)}")


BOUND_PARAMS_KEY = "bound_params"  # safetensors metadata: the params a conversion's weights are bound to


def _check_bound_params(module: torch.nn.Module, path: str | Path) -> None:
    """Refuse weights converted under other values of the module's ``bound_params``."""
    recorded = weights_metadata(path).get(BOUND_PARAMS_KEY)
    params = getattr(module, "params", None)
    if recorded is None or params is None:
        return
    try:
        bound = json.loads(recorded)
    except ValueError:
        bound = None
    if not isinstance(bound, dict):
        raise UsageError(f"{path}: damaged metadata ({BOUND_PARAMS_KEY} is not a JSON object); convert the released file again")
    differ = [f"{key}: {bound[key]!r} (the block says {getattr(params, key)!r})"
              for key in sorted(bound) if hasattr(params, key) and getattr(params, key) != bound[key]]
    if differ:
        raise UsageError(f"{path}: these weights were converted for other params, which no shape shows: {'; '.join(differ)}; "
                         "set them on the block as the conversion's block file has them")


def load_torch(path: str | Path, *, allowed: Iterable[type] = (), map_location: Any = "cpu") -> Any:
    """A ``torch.save`` file read with ``weights_only=True``: tensors and plain data only.

    ``allowed`` lists the few classes a trusted writer (an engine) is known to
    store; anything else, and every code object, is refused with a clear error
    instead of being run.
    """
    import torch

    path = Path(path)
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"{path}: missing") from None
    except Exception as exc:  # the weights-only unpickler refuses what it cannot prove harmless
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"{path}: refused to load: not a plain weights-only torch file ({first[:300]}). "
            "The framework never unpickles code; a checkpoint made elsewhere or tampered with cannot be resumed"
        ) from None


# ----------------------------------------------------------------------------- atomic directories (checkpoints)


def _fsync_tree(path: Path) -> None:
    """Flush every file of a checkpoint, giving each the umask's mode (writers such as DeepSpeed's
    leave some at a temporary file's 0600)."""
    for root, dirs, files in os.walk(path):
        for name in dirs:
            _share(Path(root, name), directory=True)
        for name in files:
            _share(Path(root, name))
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def _old(final: Path) -> Path:
    return final.with_name(final.name + ".old")


def publish(tmp: Path, final: Path) -> None:
    """Move a finished ``tmp`` directory to ``final``, replacing an older ``final``.

    The old directory is renamed aside first and deleted only after the new one
    is in place, so at every moment one complete checkpoint exists (at
    ``final`` or, between the two renames, at ``final.old``).
    """
    _fsync_tree(tmp)
    old = _old(final)
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)


def find_checkpoint(directory: str | Path) -> Optional[Path]:
    """The checkpoint directory to resume from: ``directory``, or ``directory.old`` when a
    crash hit :func:`publish` between its two renames; None when there is neither."""
    final = Path(directory)
    if final.is_dir():
        return final
    old = _old(final)
    return old if old.is_dir() else None


@contextlib.contextmanager
def atomic_directory(directory: str | Path, *, collective: bool) -> Iterator[Path]:
    """Yield a temporary directory beside ``directory``; publish it on success.

    With ``collective`` every rank writes into the same temporary directory (a
    shared file system is assumed, as DeepSpeed does) and rank 0 publishes it;
    otherwise only the caller writes. A crash leaves ``directory`` (or its
    ``.old`` twin) untouched.
    """
    final = Path(directory)
    make_dirs(final.parent)
    tmp = final.with_name(final.name + ".tmp")
    main = distributed.is_main() or not collective
    if main:
        if tmp.exists():
            shutil.rmtree(tmp)  # leftovers of a crashed save; the run lock says no one else writes here
        tmp.mkdir()
        _share(tmp, directory=True)
    if collective:
        distributed.barrier()
    try:
        yield tmp
        if collective:
            distributed.barrier()
        if main:
            publish(tmp, final)
    except DalleError:
        raise
    except WRITE_ERRORS as exc:
        raise write_failed(final, exc) from exc
    if collective:
        distributed.barrier()


# ----------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, torch.Tensor]:
    import torch

    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    import torch

    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


# ----------------------------------------------------------------------------- stage records


def read_record(path: str | Path) -> dict:
    """A JSON file that must hold an object (a record): anything else is a damaged or foreign file."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise UsageError(f"{path}: holds a JSON {type(data).__name__}, not a record; it was not written by dalle: "
                         "restore it, or retrain with --force")
    return data


def read_meta(run_dir: Path, stage: str) -> Optional[dict]:
    """``<stage>/meta.json`` of a finished stage whose weights exist, else None (a stage never
    finished). A meta.json that is not a finished stage's record is refused, naming it."""
    meta_path = Path(run_dir) / stage / META_FILE
    if not (meta_path.is_file() and (Path(run_dir) / stage / WEIGHTS_FILE).is_file()):
        return None
    meta = read_record(meta_path)
    if meta.get("complete") is not True:
        raise UsageError(f"{meta_path}: not the record of a finished stage (no \"complete\": true); "
                         "it was not written by dalle train: retrain the stage with --force")
    return meta


# ----------------------------------------------------------------------------- one directory for all ranks

SHARED_MARKER = ".rank0-marker"


def check_shared(run_dir: str | Path) -> None:
    """Every rank must see rank 0's files in ``run_dir``: checkpoints are written by all ranks into
    one directory and published by rank 0. Collective; exit 2 naming the ranks that do not."""
    if distributed.world_size() < 2:
        return
    marker = Path(run_dir) / SHARED_MARKER
    token = distributed.broadcast_object(os.urandom(8).hex() if distributed.is_main() else None)
    if distributed.is_main():
        write_text(marker, token)
    distributed.barrier()
    try:
        sees = marker.read_text(encoding="utf-8") == token
    except OSError:
        sees = False
    blind = [rank for rank, ok in enumerate(distributed.all_gather_object(sees)) if not ok]
    if distributed.is_main():
        with contextlib.suppress(OSError):
            marker.unlink()
    if blind:
        raise UsageError(
            f"{run_dir}: rank(s) {', '.join(map(str, blind))} of {distributed.world_size()} do not see the files rank 0 writes there; "
            "checkpoints and exports need the run directory on a file system shared by all nodes "
            "(NFS, Lustre, ...): set output_dir to a shared path"
        )


# ----------------------------------------------------------------------------- the run lock

_held: dict[Path, list] = {}  # run dir -> [open lock file, nesting depth] held by this process


@contextlib.contextmanager
def locked(run_dir: str | Path, what: str) -> Iterator[None]:
    """Hold the run directory's lock while writing it: one writer at a time.

    The lock is an ``flock`` on ``<run>/.lock``, released by the kernel when the
    process ends however it ends (no stale locks after kill -9). Re-entrant
    within a process; only rank 0 of a multi-process job takes it. A second
    writer is refused at once with the holder's pid, command and start time.
    """
    run_dir = Path(run_dir).resolve() if Path(run_dir).exists() else Path(run_dir).absolute()
    if not distributed.is_main():
        yield
        return
    if run_dir in _held:
        _held[run_dir][1] += 1
        try:
            yield
        finally:
            _held[run_dir][1] -= 1
        return
    make_dirs(run_dir)
    path = run_dir / LOCK_FILE
    handle = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UsageError(
            f"{run_dir}: in use by {holder}; wait for it to finish, or give this run another output_dir"
        ) from None
    with contextlib.suppress(OSError):
        os.chmod(path, 0o666 & ~_umask())
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} (`{what}`, since {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
    handle.flush()
    _held[run_dir] = [handle, 1]
    try:
        yield
    finally:
        _held.pop(run_dir, None)
        handle.seek(0)
        handle.truncate()
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        handle.close()


def command_line() -> str:
    """This process's command, for lock files and records."""
    return " ".join(["dalle", *sys.argv[1:]])[:200]
