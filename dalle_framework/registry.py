"""Typed registries: one per component kind, filled by plugins."""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import types
import typing
from typing import Any, Generic, Iterable, Iterator, Optional, TypeVar

from pydantic import BaseModel, ValidationError

from .errors import RegistryError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named classes of one kind (``codec``, ``prior``...), all subclasses of ``base``.

    ``register`` checks the base class and that ``cls.Params`` is a pydantic model
    that forbids unknown keys, and records which plugin registered the class.

    A plugin manager closes its registries once plugins have loaded (:meth:`close`):
    after that only :meth:`admitting` opens one, for one plugin at a time, and a plugin
    can unregister only what it registered itself, so no code holding a registry can
    swap a component in later.
    """

    def __init__(self, kind: str, base: type[T]) -> None:
        self.kind = kind
        self.base = base
        self._classes: dict[str, type[T]] = {}
        self._aliases: dict[str, str] = {}
        self.current_plugin: str = "<inline>"  # set by the plugin manager while a plugin registers
        self._closed = False

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

    def register(self, cls: type[T], name: Optional[str] = None, aliases: Iterable[str] = ()) -> type[T]:
        name = name or getattr(cls, "name", "") or cls.__name__
        self._check_open("register", name)
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise RegistryError(f"{self.kind} {name!r}: {cls!r} is not a subclass of {self.base.__name__}")
        params = getattr(cls, "Params", None)
        if not (isinstance(params, type) and issubclass(params, BaseModel)):
            raise RegistryError(f"{self.kind} {name!r}: {cls.__name__}.Params must be a pydantic BaseModel")
        if params.model_config.get("extra") != "forbid":
            raise RegistryError(
                f"{self.kind} {name!r}: {cls.__name__}.Params must set extra='forbid' "
                "(subclass dalle_framework.Params) so typos in recipes are caught"
            )
        for key in (name, *aliases):
            if key in self._classes or key in self._aliases:
                owner = self._classes.get(key) or self._classes[self._aliases[key]]
                raise RegistryError(
                    f"{self.kind} {key!r} is already registered by plugin {owner.plugin!r}; "
                    f"plugin {self.current_plugin!r} cannot register it again"
                )
        # Each registration gets its own subclass-free record of name and owner.
        cls.name = name  # type: ignore[attr-defined]
        cls.plugin = self.current_plugin  # type: ignore[attr-defined]
        self._classes[name] = cls
        for alias in aliases:
            self._aliases[alias] = name
        return cls

    def unregister(self, name: str) -> None:
        """Remove a component; a plugin may remove only its own (built-ins keep their names)."""
        self._check_open("unregister", name)
        owner = getattr(self._classes.get(name), "plugin", self.current_plugin)
        if owner != self.current_plugin and self.current_plugin != "<inline>":
            raise RegistryError(f"plugin {self.current_plugin!r} cannot unregister {self.kind} {name!r}: it belongs to plugin {owner!r}")
        self._classes.pop(name, None)
        for alias in [a for a, target in self._aliases.items() if target == name]:
            del self._aliases[alias]

    def __contains__(self, name: str) -> bool:
        return name in self._classes or name in self._aliases

    def get(self, name: str) -> type[T]:
        name = self._aliases.get(name, name)
        if name not in self._classes:
            raise RegistryError(self.unknown_message(name))
        return self._classes[name]

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
        return sorted(self._classes.items())

    def in_order(self) -> list[tuple[str, type[T]]]:
        """Registered classes in registration order (built-in plugins load first)."""
        return list(self._classes.items())

    def validate_params(self, name: str, params: dict[str, Any]) -> BaseModel:
        """Validate ``params`` against the named class's ``Params`` (raises ValidationError)."""
        return self.get(name).Params.model_validate(params or {})

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


__all__ = ["Registry", "ValidationError", "params_table"]
