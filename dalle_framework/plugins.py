"""The plugin manager: entry points, registries, and isolation of broken plugins.

Built-in plugins and third-party ones take the same path: each is a module named
by an entry point in the ``dalle_framework`` group. A plugin that fails to import
or to register is recorded in ``errors`` and left out; the others keep working.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

import pluggy

from . import hookspecs
from .interfaces import DataSource, Engine, ImageCodec, Prior, Reranker, Tokenizer
from .registry import Registry

# kind -> (hook name, base class). Adding a kind is one line here and one hookspec.
KINDS: dict[str, tuple[str, type]] = {
    "tokenizer": ("dalle_register_tokenizers", Tokenizer),
    "codec": ("dalle_register_codecs", ImageCodec),
    "prior": ("dalle_register_priors", Prior),
    "reranker": ("dalle_register_rerankers", Reranker),
    "data": ("dalle_register_datasources", DataSource),
    "engine": ("dalle_register_engines", Engine),
}
DISABLE_ENV = "DALLE_DISABLE_PLUGINS"


@dataclass
class PluginInfo:
    name: str
    module: str
    version: str = ""
    distribution: str = ""
    hooks: list[str] = field(default_factory=list)
    components: dict[str, list[str]] = field(default_factory=dict)
    error: Optional[str] = None
    disabled: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "module": self.module,
            "version": self.version,
            "distribution": self.distribution,
            "hooks": self.hooks,
            "components": self.components,
            "error": self.error,
            "disabled": self.disabled,
        }


class PluginManager:
    """Loads plugins and fills one :class:`Registry` per kind."""

    def __init__(self, *, load_entry_points: bool = True, disabled: Optional[set[str]] = None) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.registries: dict[str, Registry] = {kind: Registry(kind, base) for kind, (_, base) in KINDS.items()}
        self.recipe_dirs: list[Path] = []
        self.plugins: dict[str, PluginInfo] = {}
        if disabled is None:
            disabled = {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}
        self.disabled = disabled
        if load_entry_points:
            self.load_entry_points()

    # ------------------------------------------------------------------ loading

    def load_entry_points(self) -> None:
        for ep in md.entry_points(group=hookspecs.PROJECT):
            dist = getattr(ep, "dist", None)
            info = PluginInfo(
                name=ep.name,
                module=ep.value,
                version=dist.version if dist else "",
                distribution=dist.metadata["Name"] if dist else "",
            )
            if ep.name in self.plugins:
                continue  # the same distribution seen twice on sys.path
            self.plugins[ep.name] = info
            if ep.name in self.disabled:
                info.disabled = True
                continue
            try:
                module = ep.load()
            except Exception as exc:  # a broken plugin must not take the CLI down
                info.error = _describe(exc)
                continue
            self._add(info, module)

    def add_plugin(self, module: ModuleType | object, name: Optional[str] = None) -> PluginInfo:
        """Register an in-process plugin (a module or object with hookimpls)."""
        name = name or getattr(module, "__name__", type(module).__name__)
        info = PluginInfo(name=name, module=getattr(module, "__name__", repr(module)))
        self.plugins[name] = info
        if name in self.disabled:
            info.disabled = True
            return info
        self._add(info, module)
        return info

    def remove_plugin(self, name: str) -> None:
        info = self.plugins.pop(name, None)
        if info is None:
            return
        for kind, names in info.components.items():
            for component in names:
                self.registries[kind].unregister(component)
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin)

    def _add(self, info: PluginInfo, module: Any) -> None:
        try:
            self.pm.register(module, name=info.name)
        except Exception as exc:
            info.error = _describe(exc)
            return
        info.hooks = sorted(h.name for h in self.pm.get_hookcallers(module) or [])
        for kind, (hook_name, _) in KINDS.items():
            registry = self.registries[kind]
            impl = getattr(module, hook_name, None)
            if impl is None:
                continue
            before = set(registry.names())
            registry.current_plugin = info.name
            try:
                impl(registry=registry)
            except Exception as exc:
                info.error = _describe(exc)
                # Undo what this plugin registered so no half-registered plugin stays.
                for added in set(registry.names()) - before:
                    registry.unregister(added)
                for k, names in info.components.items():
                    for n in names:
                        self.registries[k].unregister(n)
                info.components = {}
                self.pm.unregister(module)
                return
            finally:
                registry.current_plugin = "<inline>"
            added = sorted(set(registry.names()) - before)
            if added:
                info.components[kind] = added
        impl = getattr(module, "dalle_register_recipe_dirs", None)
        if impl is not None:
            try:
                impl(register=lambda path: self.recipe_dirs.append(Path(path)))
            except Exception as exc:
                info.error = _describe(exc)

    # ------------------------------------------------------------------ access

    def registry(self, kind: str) -> Registry:
        return self.registries[kind]

    @property
    def errors(self) -> dict[str, str]:
        return {n: i.error for n, i in self.plugins.items() if i.error}


def _describe(exc: BaseException) -> str:
    last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" ({Path(last[0].filename).name}:{last[0].lineno})" if last else ""
    return f"{type(exc).__name__}: {exc}{where}"


_default: Optional[PluginManager] = None


def get_plugin_manager(refresh: bool = False) -> PluginManager:
    """The process-wide manager, loaded from entry points on first use."""
    global _default
    if _default is None or refresh:
        _default = PluginManager()
    return _default


def set_plugin_manager(manager: Optional[PluginManager]) -> None:
    """Swap the process-wide manager (tests use a fresh one per test)."""
    global _default
    _default = manager


def registry(kind: str) -> Registry:
    return get_plugin_manager().registry(kind)
