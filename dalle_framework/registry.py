"""Typed registries: one per component kind, filled by plugins."""

from __future__ import annotations

import ast
import contextlib
import difflib
import fnmatch
import functools
import importlib
import importlib.util
import sys
import threading
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Iterable, Iterator, Optional, TypeVar, Union

from pydantic import BaseModel, ValidationError

from .errors import DalleError, RegistryError

T = TypeVar("T")


@dataclass
class Pending:
    """A component registered by where it lives (``"package.module:Class"``): its code is imported on
    first use, while its ``params`` (and a stage's ``declared`` facts) are read without it, so that
    commands that build no model (``dalle recipes``, ``plugins``, ``components``) never import torch."""

    target: str
    params: type[BaseModel]
    declared: Optional[type]
    plugin: str

    def docstring(self) -> Optional[str]:
        """The class's docstring read from its source file, without running the module."""
        module, _, attr = self.target.partition(":")
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            return None
        if not (spec and spec.origin and spec.origin.endswith(".py")):
            return None
        return _class_docstrings(spec.origin).get(attr)


@functools.lru_cache(maxsize=None)
def _class_docstrings(path: str) -> dict[str, str]:
    """Each top-level class's docstring in a source file, parsed once for every component it holds
    ({} when it cannot be read: then a class is imported to ask it)."""
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, SyntaxError):
        return {}
    return {node.name: ast.get_docstring(node) or "" for node in tree.body if isinstance(node, ast.ClassDef)}


def resolve(target: str) -> Any:
    """``"package.module:attribute"`` -> the attribute (the module is imported)."""
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def _check_params(kind: str, name: str, params: Any, owner: str) -> None:
    if not (isinstance(params, type) and issubclass(params, BaseModel)):
        raise RegistryError(f"{kind} {name!r}: {owner}.Params must be a pydantic BaseModel")
    if params.model_config.get("extra") != "forbid":
        raise RegistryError(
            f"{kind} {name!r}: {owner}.Params must set extra='forbid' "
            "(subclass dalle_framework.Params) so typos in recipes are caught"
        )


class Registry(Generic[T]):
    """Named classes of one kind (``codec``, ``prior``...), all subclasses of ``base``.

    ``register`` checks the base class and that ``cls.Params`` is a pydantic model
    that forbids unknown keys, and records which plugin registered the class. A class
    can also be registered by where it lives (``"package.module:Class"``) with its
    ``params`` model: it is then imported on first use (:class:`Pending`), and checked then.

    A plugin manager closes its registries once plugins have loaded (:meth:`close`):
    after that only :meth:`admitting` opens one, for one plugin at a time, and a plugin
    can unregister only what it registered itself, so no code holding a registry can
    swap a component in later.
    """

    def __init__(self, kind: str, base: Union[type[T], str]) -> None:
        self.kind = kind
        self._base = base  # a class, or "module:Class" imported when a class is first checked against it
        self._classes: dict[str, Union[type[T], Pending]] = {}
        self._aliases: dict[str, str] = {}
        self.current_plugin: str = "<inline>"  # set by the plugin manager while a plugin registers
        self._closed = False
        self._loading = threading.RLock()  # a module being imported may ask for another of its kind

    @property
    def base(self) -> type[T]:
        if isinstance(self._base, str):
            self._base = resolve(self._base)
        return self._base

    def close(self) -> None:
        self._closed = True

    @contextlib.contextmanager
    def admitting(self, plugin: str) -> Iterator["Registry[T]"]:
        """Open the registry to one plugin's registrations (the plugin manager's door)."""
        closed, previous = self._closed, self.current_plugin
        self._closed, self.current_plugin = False, plugin
        try:
            yield self
        finally:
            self._closed, self.current_plugin = closed, previous

    def _check_open(self, action: str, name: str) -> None:
        if self._closed:
            raise RegistryError(
                f"cannot {action} {self.kind} {name!r}: the {self.kind} registry is closed once plugins have loaded; "
                f"register components from a plugin's registration hook (or PluginManager.add_plugin)"
            )

    def register(self, cls: Union[type[T], str], name: Optional[str] = None, aliases: Iterable[str] = (), *,
                 params: Optional[type[BaseModel]] = None, declared: Optional[type] = None) -> Union[type[T], str]:
        """Register a class, or ``"package.module:Class"`` with its ``params`` model (or a ``declared``
        torch-free base class holding ``Params`` and the facts read before the class loads, as a stage's
        ``kind`` and ``after``): the module is then imported on first use."""
        if isinstance(cls, str):
            return self._register_pending(cls, name, aliases, params, declared)
        name = name or getattr(cls, "name", "") or cls.__name__
        self._check_open("register", name)
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise RegistryError(f"{self.kind} {name!r}: {cls!r} is not a subclass of {self.base.__name__}")
        _check_params(self.kind, name, getattr(cls, "Params", None), cls.__name__)
        self._check_free(name, aliases)
        # Each registration gets its own subclass-free record of name and owner.
        cls.name = name  # type: ignore[attr-defined]
        cls.plugin = self.current_plugin  # type: ignore[attr-defined]
        self._add(name, cls, aliases)
        return cls

    def _register_pending(self, target: str, name: Optional[str], aliases: Iterable[str],
                          params: Optional[type[BaseModel]], declared: Optional[type]) -> str:
        module, _, attr = target.partition(":")
        if not (name and module and attr.isidentifier()):
            raise RegistryError(f"{self.kind} {name or target!r}: register('package.module:Class', name=..., params=...) "
                                f"needs a name and a target of that form, got {target!r}")
        self._check_open("register", name)
        params = params if params is not None else getattr(declared, "Params", None)
        _check_params(self.kind, name, params, attr)
        self._check_free(name, aliases)
        self._add(name, Pending(target, params, declared, self.current_plugin), aliases)
        return target

    def _check_free(self, name: str, aliases: Iterable[str]) -> None:
        for key in (name, *aliases):
            if key in self._classes or key in self._aliases:
                raise RegistryError(
                    f"{self.kind} {key!r} is already registered by plugin {self.plugin_of(self._aliases.get(key, key))!r}; "
                    f"plugin {self.current_plugin!r} cannot register it again"
                )

    def _add(self, name: str, entry: Union[type[T], Pending], aliases: Iterable[str]) -> None:
        self._classes[name] = entry
        for alias in aliases:
            self._aliases[alias] = name

    def _load(self, name: str) -> type[T]:
        """The class behind ``name``, importing a pending one's module (once) and checking it as
        ``register`` checks a class."""
        with self._loading:
            entry = self._classes[name]
            if not isinstance(entry, Pending):
                return entry
            try:
                with contextlib.redirect_stdout(sys.stderr):  # what a plugin prints on import is not a command's output
                    cls = resolve(entry.target)
            except (Exception, SystemExit) as exc:  # a plugin's module calling sys.exit fails this component, not the command
                raise DalleError(
                    f"{self.kind} {name!r} of plugin {entry.plugin!r} could not be loaded from {entry.target}: "
                    f"{type(exc).__name__}: {exc}; reinstall the plugin or the package it needs"
                ) from exc
            problems = []
            if not (isinstance(cls, type) and issubclass(cls, self.base)):
                problems.append(f"it is not a subclass of {self.base.__name__}")
            elif getattr(cls, "Params", None) is not entry.params:
                problems.append(f"its Params is not the {entry.params.__name__} it was registered with")
            if entry.declared is not None and not (isinstance(cls, type) and issubclass(cls, entry.declared)):
                problems.append(f"it does not subclass {entry.declared.__name__}, which it was declared with")
            if problems:
                raise RegistryError(f"{self.kind} {name!r} of plugin {entry.plugin!r} ({entry.target}): {'; '.join(problems)}")
            cls.name = name  # type: ignore[attr-defined]
            cls.plugin = entry.plugin  # type: ignore[attr-defined]
            self._classes[name] = cls
            return cls

    def unregister(self, name: str) -> None:
        """Remove a component; a plugin may remove only its own (built-ins keep their names)."""
        self._check_open("unregister", name)
        owner = self.plugin_of(name) if name in self._classes else self.current_plugin
        if owner != self.current_plugin and self.current_plugin != "<inline>":
            raise RegistryError(f"plugin {self.current_plugin!r} cannot unregister {self.kind} {name!r}: it belongs to plugin {owner!r}")
        self._classes.pop(name, None)
        for alias in [a for a, target in self._aliases.items() if target == name]:
            del self._aliases[alias]

    def __contains__(self, name: str) -> bool:
        return name in self._classes or name in self._aliases

    def canonical(self, name: str) -> str:
        """The registered name behind ``name`` (an alias or the name itself)."""
        name = self._aliases.get(name, name)
        if name not in self._classes:
            raise RegistryError(self.unknown_message(name))
        return name

    def get(self, name: str) -> type[T]:
        """The class (a pending one's module is imported now)."""
        return self._load(self.canonical(name))

    def params(self, name: str) -> type[BaseModel]:
        """The class's ``Params`` model, without importing a pending class."""
        entry = self._classes[self.canonical(name)]
        return entry.params if isinstance(entry, Pending) else entry.Params

    def declared(self, name: str) -> type:
        """What can be read of the class before its code loads: a pending class's declared base
        (a stage's kind, order and ``Params``), otherwise the class itself (imported if need be)."""
        entry = self._classes[self.canonical(name)]
        if isinstance(entry, Pending) and entry.declared is not None:
            return entry.declared
        return self.get(name)

    def plugin_of(self, name: str) -> str:
        entry = self._classes[self.canonical(name)]
        return entry.plugin if isinstance(entry, Pending) else getattr(entry, "plugin", "<inline>")

    def doc(self, name: str) -> str:
        """The class's docstring; a pending class's is read from its source, not imported."""
        entry = self._classes[self.canonical(name)]
        text = entry.docstring() if isinstance(entry, Pending) else None
        if text is None:
            text = self.get(name).__doc__ or ""
        return text.strip()

    def is_loaded(self, name: str) -> bool:
        return not isinstance(self._classes[self.canonical(name)], Pending)

    def unknown_message(self, name: str) -> str:
        known = sorted(self._classes) + sorted(self._aliases)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        listing = ", ".join(sorted(self._classes)) or "none registered"
        return (f"unknown {self.kind} {name!r}{hint} (known: {listing}); if a plugin provides it, install that plugin "
                "(`dalle plugins` lists what loaded, and why one failed)")

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._classes if fnmatch.fnmatchcase(n, pattern))

    def items(self) -> list[tuple[str, type[T]]]:
        """Every class, sorted by name (pending ones are imported)."""
        return [(name, self._load(name)) for name in sorted(self._classes)]

    def in_registration_order(self) -> list[str]:
        return list(self._classes)

    def in_order(self) -> list[tuple[str, type[T]]]:
        """Registered classes in registration order (built-in plugins load first; pending ones are imported)."""
        return [(name, self._load(name)) for name in list(self._classes)]

    def validate_params(self, name: str, params: dict[str, Any]) -> BaseModel:
        """Validate ``params`` against the named class's ``Params`` (raises ValidationError)."""
        return self.params(name).model_validate(params or {})

    def build(self, spec: Any, **runtime: Any) -> T:
        """Construct from a spec with ``name`` and ``params`` (a recipe block or dict)."""
        name = spec["name"] if isinstance(spec, dict) else spec.name
        raw = spec.get("params", {}) if isinstance(spec, dict) else spec.params
        cls = self.get(name)
        # A validated recipe already holds the Params object: it travels as is to the constructor.
        params = raw if isinstance(raw, cls.Params) else cls.Params.model_validate(raw or {})
        return cls(params, **runtime)


_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<=", "min_length": "min length", "max_length": "max length", "multiple_of": "multiple of"}


def _type_name(annotation: Any) -> str:
    """``int``, ``list[int]``, ``Optional[str]``: the annotation as a recipe writer reads it."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        named = [_type_name(a) for a in args if a is not type(None)]
        joined = " | ".join(named)
        return f"Optional[{joined}]" if type(None) in args else joined
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")


def params_table(model: type[BaseModel]) -> list[dict[str, Any]]:
    """One row per field of a component's ``Params``: name, type, default, bounds, description."""
    rows = []
    for name, field in model.model_fields.items():
        required = field.is_required()
        default = None if required else field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            default = default.model_dump(mode="json")
        bounds = [f"{_BOUNDS[key]} {getattr(m, key)}" for m in field.metadata for key in _BOUNDS if getattr(m, key, None) is not None]
        rows.append({"name": name, "type": _type_name(field.annotation), "required": required,
                     "default": default if isinstance(default, (str, int, float, bool, list, dict, type(None))) else repr(default),
                     "bounds": bounds, "description": field.description or ""})
    return rows


__all__ = ["Pending", "Registry", "ValidationError", "params_table", "resolve"]
