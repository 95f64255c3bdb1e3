"""The plugin manager: entry points, registries, and isolation of broken plugins.

Built-in plugins and third-party ones take the same path: each is a module named
by an entry point in the ``dalle_framework`` group, and its hooks are called
through pluggy. Built-in plugins load first, so their components keep their
names: a plugin that registers a taken name, or whose entry-point name is taken,
is the one reported. A plugin that fails to import or to register (whatever it
raises, ``SystemExit`` included) is recorded in ``errors`` and left out; what it
registered is rolled back and the others keep working.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import os
import signal
import sys
import threading
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from types import MappingProxyType
from typing import Any, Callable, Iterator, Optional

import pluggy

from . import hookspecs
from .registry import Registry
from .schema import StageSpec, stage_order

# kind -> (hook name, base class). Adding a kind is one line here and one hookspec. The bases (the
# contracts, which import torch) are imported when a class is first checked against them.
KINDS: dict[str, tuple[str, str]] = {
    "tokenizer": ("dalle_register_tokenizers", "dalle_framework.interfaces:Tokenizer"),
    "codec": ("dalle_register_codecs", "dalle_framework.interfaces:ImageCodec"),
    "prior": ("dalle_register_priors", "dalle_framework.interfaces:Prior"),
    "reranker": ("dalle_register_rerankers", "dalle_framework.interfaces:Reranker"),
    "data": ("dalle_register_datasources", "dalle_framework.interfaces:DataSource"),
    "engine": ("dalle_register_engines", "dalle_framework.interfaces:Engine"),
    "stage": ("dalle_register_stages", "dalle_framework.stage:Stage"),
    "metric": ("dalle_register_metrics", "dalle_framework.interfaces:Metric"),
    "features": ("dalle_register_feature_networks", "dalle_framework.interfaces:FeatureNetwork"),
    "filter": ("dalle_register_logit_filters", "dalle_framework.interfaces:LogitFilter"),
}
RECIPE_DIRS_HOOK = "dalle_register_recipe_dirs"
COMMANDS_HOOK = "dalle_register_commands"
DISABLE_ENV = "DALLE_DISABLE_PLUGINS"
BUILTIN_DISTRIBUTION = "dalle-framework"


@dataclass(frozen=True)
class Command:
    """A ``dalle`` subcommand a plugin adds (see ``hookspecs.dalle_register_commands``)."""

    name: str
    run: Callable[[Any], Optional[int]]
    help: str = ""
    add_arguments: Optional[Callable[[Any], None]] = None
    plugin: str = ""


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
    warnings: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _distribution(ep: md.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    return (dist.metadata["Name"], dist.version) if dist else ("", "")


class PluginManager:
    """Loads plugins and fills one :class:`Registry` per kind."""

    def __init__(self, *, load_entry_points: bool = True, disabled: Optional[set[str]] = None) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.registries: MappingProxyType[str, Registry] = MappingProxyType({kind: Registry(kind, base) for kind, (_, base) in KINDS.items()})
        self.recipe_dirs: list[Path] = []
        self.commands: dict[str, Command] = {}
        self.plugins: dict[str, PluginInfo] = {}
        if disabled is None:
            disabled = {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}
        self.disabled = disabled
        if load_entry_points:
            self.load_entry_points()
        for registry in self.registries.values():
            registry.close()

    # ------------------------------------------------------------------ loading

    def load_entry_points(self) -> None:
        points = md.entry_points(group=hookspecs.PROJECT)
        # Built-ins first: their names win; a newcomer that collides is the one reported.
        ordered = sorted(points, key=lambda ep: _distribution(ep)[0] != BUILTIN_DISTRIBUTION)
        for ep in ordered:
            dist, version = _distribution(ep)
            info = PluginInfo(name=ep.name, module=ep.value, version=version, distribution=dist)
            taken = self.plugins.get(ep.name)
            if taken is not None:
                if taken.distribution == dist and taken.module == ep.value:
                    continue  # the same distribution seen twice on sys.path
                info.name = f"{ep.name} ({dist or ep.value})"
                info.error = (
                    f"entry-point name {ep.name!r} is already used by {taken.distribution or taken.module}; "
                    "give this plugin another name in its [project.entry-points.dalle_framework] table"
                )
                self.plugins[info.name] = info
                continue
            self.plugins[ep.name] = info
            if ep.name in self.disabled:
                info.disabled = True
                continue
            try:
                with _plugin_code():
                    module = ep.load()
            except _Interrupted:
                raise KeyboardInterrupt from None
            except BaseException as exc:  # a broken plugin (even one calling sys.exit) must not take the CLI down
                info.error = _describe(exc)
                continue
            self._add(info, module)

    def add_plugin(self, module: ModuleType | object, name: Optional[str] = None) -> PluginInfo:
        """Register an in-process plugin (a module, or a hashable object with hookimpls)."""
        name = name or getattr(module, "__name__", type(module).__name__)
        info = PluginInfo(name=name, module=getattr(module, "__name__", repr(module)))
        self.plugins[name] = info
        if name in self.disabled:
            info.disabled = True
            return info
        try:
            hash(module)
        except TypeError:
            info.error = f"a plugin must be a module or a hashable object (pluggy keeps plugins in sets), got {type(module).__name__}"
            return info
        self._add(info, module)
        return info

    def remove_plugin(self, name: str) -> None:
        info = self.plugins.pop(name, None)
        if info is None:
            return
        self._unregister_components(info)
        for command in info.commands:
            self.commands.pop(command, None)
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin)

    def _unregister_components(self, info: PluginInfo) -> None:
        for kind, names in info.components.items():
            with self.registries[kind].admitting(info.name) as registry:
                for component in names:
                    registry.unregister(component)
        info.components = {}

    def _call(self, module: Any, hook_name: str, **kwargs: Any) -> None:
        """Call one plugin's implementation of a hook through pluggy (honours ``specname=``)."""
        others = [p for p in self.pm.get_plugins() if p is not module]
        self.pm.subset_hook_caller(hook_name, remove_plugins=others)(**kwargs)

    def _add(self, info: PluginInfo, module: Any) -> None:
        try:
            self.pm.register(module, name=info.name)
        except Exception as exc:
            info.error = _describe(exc)
            return
        info.hooks = sorted(h.name for h in self.pm.get_hookcallers(module) or [])
        info.warnings = _misspelled_hooks(module)
        for kind, (hook_name, _) in KINDS.items():
            if hook_name not in info.hooks:
                continue
            registry = self.registries[kind]
            before = set(registry.names())
            try:
                with registry.admitting(info.name), _plugin_code():
                    self._call(module, hook_name, registry=registry)
            except _Interrupted:
                raise KeyboardInterrupt from None
            except BaseException as exc:
                info.error = _describe(exc)
                # Undo what this plugin registered so no half-registered plugin stays.
                with registry.admitting(info.name):
                    for added in set(registry.names()) - before:
                        registry.unregister(added)
                self._unregister_components(info)
                self.pm.unregister(module)
                return
            added = sorted(set(registry.names()) - before)
            if added:
                info.components[kind] = added
        if RECIPE_DIRS_HOOK in info.hooks:
            dirs: list[Path] = []
            if not self._collect(info, module, RECIPE_DIRS_HOOK, lambda path: dirs.append(Path(path))):
                return
            self.recipe_dirs.extend(dirs)
        if COMMANDS_HOOK in info.hooks:
            commands: list[Command] = []

            def register(name: str, run: Callable[[Any], Optional[int]], help: str = "", add_arguments=None) -> None:
                if not (isinstance(name, str) and name.replace("-", "").isalnum() and callable(run)):
                    raise TypeError(f"register(name, run): a command name of letters, digits and '-', and a callable run; got {name!r}")
                commands.append(Command(name, run, help, add_arguments, info.name))

            if not self._collect(info, module, COMMANDS_HOOK, register):
                return
            for command in commands:
                if command.name in self.commands:
                    info.error = f"command {command.name!r} is already added by plugin {self.commands[command.name].plugin!r}"
                    continue
                self.commands[command.name] = command
                info.commands.append(command.name)

    def _collect(self, info: PluginInfo, module: Any, hook_name: str, register: Callable[..., None]) -> bool:
        """Call a hook that hands the plugin a ``register`` function; False (and the error recorded) if it failed."""
        try:
            with _plugin_code():
                self._call(module, hook_name, register=register)
        except _Interrupted:
            raise KeyboardInterrupt from None
        except BaseException as exc:
            info.error = _describe(exc)
            return False
        return True

    # ------------------------------------------------------------------ access

    def registry(self, kind: str) -> Registry:
        return self.registries[kind]

    def stages(self) -> dict[str, Any]:
        """Registered stage classes in training order (every stage after those it depends on)."""
        registry = self.registries["stage"]
        return {name: registry.get(name) for name in self.stage_specs()}

    def stage_specs(self) -> dict[str, type[StageSpec]]:
        """What each registered stage declares of itself, in training order, without importing a
        stage registered by where it lives (the recipe check needs no more)."""
        registry = self.registries["stage"]
        declared = {name: registry.declared(name) for name in registry.in_registration_order()}
        return {name: declared[name] for name in stage_order(declared)}

    @property
    def errors(self) -> dict[str, str]:
        return {n: i.error for n, i in self.plugins.items() if i.error}


def _misspelled_hooks(module: Any) -> list[str]:
    """Functions of a plugin meant as hooks that match none (pluggy would never call them): a ``dalle_*``
    function or a ``@hookimpl`` one, each with the hook it was probably meant to be."""
    import difflib
    import inspect

    known = sorted(name for name in dir(hookspecs) if name.startswith("dalle_"))
    warnings = []
    for name in sorted(dir(module)):
        value = getattr(module, name, None)
        if not (inspect.isfunction(value) or inspect.ismethod(value)):
            continue
        marked = getattr(value, f"{hookspecs.PROJECT}_impl", None)
        target = (marked or {}).get("specname") or name
        if (marked is None and not name.startswith("dalle_")) or target in known:
            continue
        close = difflib.get_close_matches(target, known, n=1, cutoff=0.6)
        hint = f"did you mean `{close[0]}`?" if close else f"the hooks are {', '.join(known)}"
        warnings.append(f"`{target}` matches no hook and is never called; {hint}")
    return warnings


class _Interrupted(BaseException):
    """A real Ctrl-C while plugin code ran: it stops the command, unlike a KeyboardInterrupt the plugin raised."""


@contextlib.contextmanager
def _plugin_code() -> Iterator[None]:
    """Around plugin code: its output goes to stderr (Python's and its subprocesses'), and SIGINT is
    told apart from a KeyboardInterrupt the plugin raises itself (that one is the plugin's failure)."""
    sys.stdout.flush()
    saved = None
    try:
        saved = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no fd 1 / 2 (a closed stdout): nothing to keep apart
        saved = None
    def interrupted(signum: int, frame: Any) -> None:
        raise _Interrupted()

    main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = signal.signal(signal.SIGINT, interrupted) if main_thread else None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
        sys.stderr.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


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

