"""Reading weights released elsewhere, for ``dalle convert COMPONENT FILE... OUT``.

A codec class converts its authors' files in ``ImageCodec.convert_released``
with these helpers; the command then only ever loads what they write:

    OUT/model.safetensors   the codec's state dict
    OUT/codec.yaml          a recipe codec block: {name, params, weights, frozen: true}
    OUT/conversion.json     the source files with their sha256, the component, the date

Released weights are usually pickles, and unpickling can run arbitrary code.
:func:`read_released` therefore reads a file in the most restricted way that
works: safetensors as they are; a torch file whose content needs nothing but
tensors and containers with ``torch.load(weights_only=True)``; anything else
only with ``trust_pickle`` (the ``--trust-pickle`` flag), and even then through
an unpickler that never imports the classes a pickle names: each becomes an
inert :class:`StandIn` that records its constructor arguments and state, so the
original package (``dall_e``, ``pytorch_lightning``, ...) is not needed and none
of its code runs.
"""

from __future__ import annotations

import _compat_pickle
import datetime
import hashlib
import pickle
import re
import sys
import types
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional

import torch
import yaml

from .rundir import WEIGHTS_FILE, save_weights, write_json, write_text
from .errors import UsageError

CODEC_BLOCK_FILE = "codec.yaml"
CONVERSION_FILE = "conversion.json"
TRUST_FLAG = "--trust-pickle"


# ----------------------------------------------------------------------------- reading


class StandIn:
    """An inert record of an object found in a trusted pickle.

    ``source`` is the ``module.qualname`` of the class the pickle named; ``args`` /
    ``kwargs`` what it was constructed with and ``state`` what ``__setstate__`` would
    have received (for an ``nn.Module``: its ``__dict__`` with ``_parameters``,
    ``_buffers`` and ``_modules``).
    """

    source: ClassVar[str] = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> "StandIn":
        obj = super().__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<stand-in for {self.source}>"


_STAND_INS: dict[str, type[StandIn]] = {}


def stand_in(source: str) -> type[StandIn]:
    """The (cached) :class:`StandIn` subclass for the class named ``source``."""
    if source not in _STAND_INS:
        _STAND_INS[source] = type(source.rpartition(".")[2] or "StandIn", (StandIn,), {"source": source})
    return _STAND_INS[source]


def _tensor_globals() -> Mapping[str, Any]:
    # The globals torch's own weights-only reader accepts: tensor rebuild functions,
    # storages, dtypes, OrderedDict. Nothing outside that list is ever imported.
    from torch._weights_only_unpickler import _get_allowed_globals

    return _get_allowed_globals()


class _InertUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names (protocol 2, torch.save's default), as pickle's own find_class maps them.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        allowed = _tensor_globals().get(f"{module}.{name}")
        return allowed if allowed is not None else stand_in(f"{module}.{name}")


def _inert_load(file: Any, **kwargs: Any) -> Any:
    return _InertUnpickler(file, **kwargs).load()


# torch.load accepts any object with pickle's Unpickler / load as its pickle module.
_INERT_PICKLE = types.SimpleNamespace(Unpickler=_InertUnpickler, load=_inert_load, __name__="dalle_inert_pickle")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_released(path: Path, *, trust_pickle: bool) -> Any:
    """The content of a released weights file, read as restrictively as it allows.

    - ``.safetensors``: a dict of tensors.
    - a torch file holding only tensors and containers: read with ``weights_only=True``.
    - any other pickle: refused (``UsageError``, exit 2, naming ``--trust-pickle``)
      unless ``trust_pickle``; then a warning is printed and the file is read with
      every class it names replaced by a :class:`StandIn`.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        named = re.search(r"GLOBAL (\S+)", str(exc))
        refused = f"it names {named.group(1)}" if named else "the tensors-only reader refused it"
    except Exception as exc:  # not a torch file at all: say so instead of a traceback
        raise UsageError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from None
    if not trust_pickle:
        raise UsageError(
            f"{path}: holds more than tensors ({refused}), and reading such a pickle could run code. "
            f"If you trust where the file came from, pass {TRUST_FLAG}: its classes are then read as inert "
            "stand-ins, never imported"
        )
    print(f"warning: reading the pickle {path} because {TRUST_FLAG} was given; only do this for files you trust", file=sys.stderr)
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_INERT_PICKLE)
    except Exception as exc:
        raise UsageError(f"{path}: cannot read it as a torch pickle ({type(exc).__name__}: {exc})") from None


def module_state(obj: Any, what: str = "module") -> dict[str, torch.Tensor]:
    """The state dict of a pickled ``nn.Module`` read as a :class:`StandIn` (parameters and persistent buffers)."""
    state = obj.state if isinstance(obj, StandIn) else None
    if not isinstance(state, dict) or not isinstance(state.get("_modules"), dict):
        raise UsageError(f"{what}: not a pickled torch module (found {obj!r})")
    out: dict[str, torch.Tensor] = {}
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if isinstance(value, torch.Tensor) and name not in skip:
                out[name] = value.detach()
    for name, child in state["_modules"].items():
        if child is not None:
            out.update({f"{name}.{key}": value for key, value in module_state(child, f"{what}.{name}").items()})
    return out


def read_config(path: Path) -> dict:
    """A YAML config file (``yaml.safe_load``: data only) as a mapping."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: not valid YAML: {exc}") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping, got {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------- writing


def write_converted(
    codec_cls: type,
    out_dir: Path,
    *,
    params: Mapping[str, Any],
    state: Mapping[str, torch.Tensor],
    sources: list[Path],
    notes: Optional[Mapping[str, Any]] = None,
) -> dict:
    """Check that ``state`` loads into ``codec_cls(params)`` exactly, then write the three outputs.

    Returns the summary also written to ``conversion.json``.
    """
    from pydantic import ValidationError

    name = codec_cls.name or codec_cls.__name__
    try:
        validated = codec_cls.Params.model_validate(dict(params))
    except ValidationError as exc:
        lines = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise UsageError(f"{name}: the released files describe params this codec does not accept: {lines}") from None
    codec = codec_cls(validated)
    expected = codec.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    problems = [
        f"{label} {keys[:5]}{' ...' if len(keys) > 5 else ''}"
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong))
        if keys
    ]
    if problems:
        raise UsageError(f"{name}: the released weights do not fit the codec: {'; '.join(problems)}")

    out_dir = Path(out_dir)
    weights = (out_dir / WEIGHTS_FILE).resolve()
    tensors = {key: state[key].detach().to(expected[key].dtype).contiguous() for key in expected}
    save_weights(weights, tensors, metadata={"component": name})
    block = {"name": name, "params": validated.model_dump(mode="json"), "weights": str(weights), "frozen": True}
    write_text(out_dir / CODEC_BLOCK_FILE, yaml.safe_dump(block, sort_keys=False))
    summary = {
        "component": name,
        "kind": "codec",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "sources": [{"path": str(Path(p).resolve()), "sha256": sha256(Path(p))} for p in sources],
        "weights": str(weights),
        "codec_block": str((out_dir / CODEC_BLOCK_FILE).resolve()),
        "parameters": int(sum(t.numel() for t in tensors.values())),
        **dict(notes or {}),
    }
    write_json(out_dir / CONVERSION_FILE, summary)
    return summary


__all__ = [
    "CODEC_BLOCK_FILE",
    "CONVERSION_FILE",
    "TRUST_FLAG",
    "StandIn",
    "module_state",
    "read_config",
    "read_released",
    "sha256",
    "stand_in",
    "write_converted",
]
