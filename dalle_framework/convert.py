"""Reading files released elsewhere, for ``dalle convert COMPONENT FILE... OUT``.

Any component class (a codec, a prior, a tokenizer) converts its authors' files in
``convert_released`` with these helpers; the command then only ever loads what they
write:

    OUT/model.safetensors   the component's state dict (components with weights)
    OUT/<kind>.yaml         a recipe block: {name, params, weights, frozen: true}
    OUT/conversion.json     the source files with their sha256, the component, the date

A tokenizer writes the files it reads (a vocabulary) instead of weights, and its
block names them in its params.

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
import json
import pickle
import re
import sys
import types
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional

import torch
import yaml

from .rundir import BOUND_PARAMS_KEY, WEIGHTS_FILE, save_weights, write_bytes, write_json, write_text
from .errors import UsageError, validation_problems

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


def block_file(kind: str) -> str:
    """The recipe block a conversion writes: ``codec.yaml``, ``prior.yaml``, ``tokenizer.yaml``."""
    return f"{kind}.yaml"


def write_converted(
    cls: type,
    out_dir: Path,
    *,
    kind: str,
    params: Mapping[str, Any],
    sources: list[Path],
    state: Optional[Mapping[str, torch.Tensor]] = None,
    runtime: Optional[Mapping[str, Any]] = None,
    overrides: Optional[Mapping[str, Any]] = None,
    notes: Optional[Mapping[str, Any]] = None,
) -> dict:
    """Check the conversion and write its outputs; returns the summary also written to ``conversion.json``.

    With ``state`` (a component with weights): ``state`` must load into
    ``cls(params, **runtime)`` exactly (checked on the meta device, so nothing the size
    of the model is allocated); it is saved as ``model.safetensors`` in the module's
    dtypes and the block names it. Without (a tokenizer): ``cls(params)`` is built once
    to check that it builds. ``overrides`` (the command line's ``--param``) replace params.
    """
    name = cls.name or cls.__name__
    validated = _validated_params(cls, {**params, **dict(overrides or {})})
    out_dir = Path(out_dir)
    block: dict[str, Any] = {"name": name, "params": validated.model_dump(mode="json")}
    counts: dict[str, Any] = {}
    if state is not None:
        with torch.device("meta"):
            expected = cls(validated, **dict(runtime or {})).state_dict()
        _check_fits(f"{name}: the released weights do not fit the {kind}", expected, state)
        weights = (out_dir / WEIGHTS_FILE).resolve()
        tensors = {key: state[key].detach().to(expected[key].dtype).contiguous() for key in expected}
        bound = {key: getattr(validated, key) for key in getattr(cls, "bound_params", ())}
        save_weights(weights, tensors, metadata={"component": name, **({BOUND_PARAMS_KEY: json.dumps(bound)} if bound else {})})
        block.update(weights=str(weights), frozen=True)
        counts = {"weights": str(weights), "parameters": int(sum(t.numel() for t in tensors.values()))}
    else:
        cls(validated, **dict(runtime or {}))
    block_path = out_dir / block_file(kind)
    write_text(block_path, yaml.safe_dump(block, sort_keys=False, allow_unicode=True))
    summary = {
        "component": name,
        "kind": kind,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "sources": [{"path": str(Path(p).resolve()), "sha256": sha256(Path(p))} for p in sources],
        **counts,
        "block": str(block_path.resolve()),
        **({"runtime": dict(runtime)} if runtime else {}),
        **dict(notes or {}),
    }
    write_json(out_dir / CONVERSION_FILE, summary)
    return summary


def _validated_params(cls: type, params: Mapping[str, Any]) -> Any:
    from pydantic import ValidationError

    try:
        return cls.Params.model_validate(dict(params))
    except ValidationError as exc:
        raise UsageError(f"{cls.name or cls.__name__}: the released files describe params it does not accept: {validation_problems(exc)}") from None


def _check_fits(what: str, expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    problems = [
        f"{label} {keys[:5]}{' ...' if len(keys) > 5 else ''}"
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong))
        if keys
    ]
    if problems:
        raise UsageError(f"{what}: {'; '.join(problems)}")


def copy_released(source: Path, out_dir: Path, name: Optional[str] = None) -> Path:
    """Copy a released file (a vocabulary, say) into ``out_dir`` atomically; returns the copy's absolute path."""
    source = Path(source)
    if not source.is_file():
        raise UsageError(f"{source}: no such file")
    target = (Path(out_dir) / (name or source.name)).resolve()
    write_bytes(target, source.read_bytes())
    return target


__all__ = [
    "CONVERSION_FILE",
    "TRUST_FLAG",
    "StandIn",
    "block_file",
    "copy_released",
    "module_state",
    "read_config",
    "read_released",
    "sha256",
    "stand_in",
    "write_converted",
]
