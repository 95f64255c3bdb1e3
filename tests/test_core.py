"""The core: registries, the plugin manager, recipes."""

from __future__ import annotations

import importlib
import textwrap
import types
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel, Field, ValidationError

from dalle_framework import ImageCodec, Params, RecipeError, RegistryError, Tokenizer, UsageError, hookimpl
from dalle_framework.recipe import apply_overrides, deep_merge, load_raw, load_recipe, validate
from dalle_framework.registry import Registry


class TinyTokenizer(Tokenizer):
    """Characters as ids."""

    class Params(Params):
        text_len: int = Field(8, gt=0)

    def __init__(self, params):
        self.text_len, self.vocab_size = params.text_len, 128

    def encode(self, texts):
        out = torch.zeros(len(texts), self.text_len, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [ord(c) % 127 + 1 for c in t[: self.text_len]]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def decode(self, ids):
        return ["".join(chr(i - 1) for i in row if i) for row in ids.tolist()]


class TinyCodec(ImageCodec):
    """A 1x1-conv codec used only to exercise the registry."""

    class Params(Params):
        vocab_size: int = Field(16, gt=0)
        image_size: int = Field(8, gt=0)

    def __init__(self, params):
        super().__init__()
        self.vocab_size, self.image_size, self.grid = params.vocab_size, params.image_size, (2, 2)
        self.proj = torch.nn.Conv2d(3, params.vocab_size, 1)

    def encode(self, images):
        return self.proj(torch.nn.functional.adaptive_avg_pool2d(images, 2)).flatten(2).argmax(1)

    def decode(self, tokens):
        return torch.zeros(len(tokens), 3, self.image_size, self.image_size)

    def loss(self, images, step=0):
        return {"loss": self.proj(images).pow(2).mean()}


def inline_plugin(**hooks):
    module = types.ModuleType("inline_plugin")
    for name, fn in hooks.items():
        setattr(module, name, hookimpl(fn))
    return module


@pytest.fixture
def tiny(bare_manager):
    plugin = inline_plugin(
        dalle_register_tokenizers=lambda registry: registry.register(TinyTokenizer, name="tiny-text"),
        dalle_register_codecs=lambda registry: registry.register(TinyCodec, name="tiny-codec", aliases=("tc",)),
    )
    bare_manager.add_plugin(plugin, name="tiny")
    import dalle_engines  # the real engines: every trained block has one (torch by default)
    import dalle_stages  # the stages a recipe's blocks configure

    bare_manager.add_plugin(dalle_engines, name="engines")
    bare_manager.add_plugin(dalle_stages, name="stages")
    return bare_manager


# ----------------------------------------------------------------------------- registry


def test_registry_checks_base_class_and_params():
    reg = Registry("codec", ImageCodec)
    with pytest.raises(RegistryError, match="not a subclass of ImageCodec"):
        reg.register(TinyTokenizer, name="x")

    class Loose(TinyCodec):
        class Params(BaseModel):  # extra keys would be silently ignored
            size: int = 1

    with pytest.raises(RegistryError, match="extra='forbid'"):
        reg.register(Loose, name="loose")


def test_registry_refuses_duplicates_naming_both_owners():
    reg = Registry("codec", ImageCodec)
    reg.current_plugin = "first"
    reg.register(TinyCodec, name="tiny")
    reg.current_plugin = "second"

    class Other(TinyCodec):
        pass

    with pytest.raises(RegistryError) as info:
        reg.register(Other, name="tiny")
    assert "'first'" in str(info.value) and "'second'" in str(info.value)


def test_registry_did_you_mean_glob_and_build():
    reg = Registry("codec", ImageCodec)
    reg.register(TinyCodec, name="gumbel-dvae", aliases=("dvae",))
    with pytest.raises(RegistryError, match="did you mean 'gumbel-dvae'"):
        reg.get("gumbel-dave")
    assert reg.get("dvae") is TinyCodec
    assert reg.names("gumbel-*") == ["gumbel-dvae"]
    assert reg.names("vq-*") == []
    codec = reg.build({"name": "gumbel-dvae", "params": {"vocab_size": 32}})
    assert codec.vocab_size == 32 and isinstance(codec, TinyCodec)


# ----------------------------------------------------------------------------- registered by where they live

LAZY_MODULE = '''
from dalle_framework import ImageCodec
from lazy_params_{n} import LazyParams

class LazyCodec(ImageCodec):
    """A codec whose module is imported on first use."""

    Params = LazyParams

    def __init__(self, params):
        super().__init__()
        self.params = params

class Stranger:
    Params = LazyParams

class OwnParams(ImageCodec):
    class Params(LazyParams):
        pass
'''


@pytest.fixture
def lazy_module(tmp_path, monkeypatch):
    """A module on sys.path that no test has imported yet (a fresh name per test), and its params module."""
    import itertools
    import sys

    n = next(_lazy_names)
    (tmp_path / f"lazy_params_{n}.py").write_text(
        "from dalle_framework import Params\n\nclass LazyParams(Params):\n    size: int = 8\n"
    )
    (tmp_path / f"lazy_codec_{n}.py").write_text(LAZY_MODULE.format(n=n))
    monkeypatch.syspath_prepend(str(tmp_path))
    params = importlib.import_module(f"lazy_params_{n}").LazyParams
    return f"lazy_codec_{n}", params


_lazy_names = iter(range(10**6))


def test_a_class_registered_by_where_it_lives_is_imported_on_first_use(lazy_module):
    import sys

    module, params = lazy_module
    reg = Registry("codec", ImageCodec)
    reg.current_plugin = "mine"
    reg.register(f"{module}:LazyCodec", name="lazy", aliases=("lz",), params=params)
    # Params, docstring and owner are known, and params validate, without running the module.
    assert reg.params("lz") is params and reg.plugin_of("lazy") == "mine"
    assert reg.doc("lazy") == "A codec whose module is imported on first use."
    assert reg.validate_params("lazy", {"size": 3}).size == 3
    with pytest.raises(ValidationError):
        reg.validate_params("lazy", {"sise": 3})
    assert module not in sys.modules and not reg.is_loaded("lazy")
    cls = reg.get("lz")
    assert module in sys.modules and cls.__name__ == "LazyCodec" and (cls.name, cls.plugin) == ("lazy", "mine")
    assert reg.get("lazy") is cls and reg.build({"name": "lazy", "params": {"size": 5}}).params.size == 5


def test_a_class_registered_by_where_it_lives_is_checked_when_it_loads(lazy_module, tmp_path, capsys):
    from dalle_framework import DalleError

    module, params = lazy_module
    (tmp_path / f"{module}_exits.py").write_text("print('hello from a plugin')\nraise SystemExit(3)\n")
    reg = Registry("codec", ImageCodec)
    reg.current_plugin = "mine"
    reg.register(f"{module}_exits:Codec", name="exits", params=params)
    with pytest.raises(DalleError, match="'exits' of plugin 'mine' could not be loaded .*SystemExit: 3"):
        reg.get("exits")  # a module that exits fails its component, not the command
    printed = capsys.readouterr()
    assert "hello from a plugin" in printed.err and printed.out == ""
    reg.register(f"{module}:Stranger", name="stranger", params=params)
    reg.register(f"{module}:OwnParams", name="own", params=params)
    reg.register(f"{module}:Missing", name="missing", params=params)
    reg.register("no_such_module_here:Codec", name="gone", params=params)
    with pytest.raises(RegistryError, match="'stranger' of plugin 'mine'.*not a subclass of ImageCodec"):
        reg.get("stranger")
    with pytest.raises(RegistryError, match="its Params is not the LazyParams it was registered with"):
        reg.get("own")
    with pytest.raises(DalleError, match=f"'missing' of plugin 'mine' could not be loaded from {module}:Missing: AttributeError"):
        reg.get("missing")
    with pytest.raises(DalleError, match="could not be loaded from no_such_module_here:Codec: ModuleNotFoundError") as info:
        reg.get("gone")
    assert info.value.exit_code == 1  # the plugin's installation, not the user's input
    for target, kwargs, problem in (("no-colon", {"params": params}, "needs a name and a target"),
                                    (f"{module}:LazyCodec", {}, "must be a pydantic BaseModel")):
        with pytest.raises(RegistryError, match=problem):
            reg.register(target, name="x", **kwargs)


def test_a_stage_registered_by_where_it_lives_declares_what_the_recipe_check_reads(bare_manager, tmp_path, monkeypatch):
    import sys

    from dalle_framework import Stage, StageSpec, TrainConfig

    (tmp_path / "late_stage_specs.py").write_text(textwrap.dedent('''
        from dalle_framework import StageSpec, TrainConfig

        class LateTrain(TrainConfig):
            extra: int = 1

        class LateSpec(StageSpec):
            Params = LateTrain
            kind = "codec"
            after = ("early",)
    '''))
    (tmp_path / "late_stage_code.py").write_text(textwrap.dedent('''
        from dalle_framework import Stage
        from late_stage_specs import LateSpec

        class LateStage(LateSpec, Stage):
            """Comes after early."""

        class Undeclared(Stage):
            pass
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    from late_stage_specs import LateSpec

    class EarlySpec(StageSpec):
        kind = "codec"

    class EarlyStage(EarlySpec, Stage):
        pass

    def stages(registry):
        registry.register("late_stage_code:LateStage", name="late", declared=LateSpec)
        registry.register("late_stage_code:Undeclared", name="undeclared", declared=EarlySpec)
        registry.register(EarlyStage, name="early")

    bare_manager.add_plugin(inline_plugin(dalle_register_stages=stages), name="late-stages")
    specs = bare_manager.stage_specs()
    assert list(specs) == ["early", "late", "undeclared"] and specs["late"] is LateSpec and specs["early"] is EarlyStage
    assert issubclass(specs["late"].Params, TrainConfig) and "late_stage_code" not in sys.modules
    with pytest.raises(RegistryError, match="does not subclass EarlySpec"):
        bare_manager.stages()


def test_every_builtin_component_loads_as_it_was_registered(manager):
    """The built-in plugins register every class by where it lives; each target exists, subclasses its
    contract (and a stage its declared spec) and has the Params it was registered with."""
    from dalle_framework.plugins import KINDS

    count = 0
    for kind in KINDS:
        registry = manager.registry(kind)
        for name in registry.names():
            if registry.plugin_of(name) not in manager.plugins or not manager.plugins[registry.plugin_of(name)].distribution:
                continue
            assert not registry.is_loaded(name), f"{kind} {name} was imported at registration"
            cls = registry.get(name)
            assert cls.Params is registry.params(name) and issubclass(cls, registry.declared(name))
            count += 1
    assert count >= 35


# ----------------------------------------------------------------------------- plugin manager


def test_broken_plugins_are_reported_and_others_keep_working(tiny):
    def explode(registry):
        raise RuntimeError("boom")

    info = tiny.add_plugin(inline_plugin(dalle_register_priors=explode), name="broken")
    assert "RuntimeError: boom" in info.error
    assert tiny.errors == {"broken": info.error}
    assert tiny.registry("codec").names() == ["tiny-codec"]
    assert tiny.registry("tokenizer").get("tiny-text") is TinyTokenizer


def test_plugin_that_half_registers_leaves_nothing_behind(tiny):
    class Half(TinyCodec):
        pass

    def half(registry):
        registry.register(Half, name="half-codec")
        raise ValueError("second registration failed")

    info = tiny.add_plugin(inline_plugin(dalle_register_codecs=half), name="half")
    assert info.error and "half-codec" not in tiny.registry("codec")


def test_components_remember_their_plugin_and_can_be_removed(tiny):
    assert tiny.registry("codec").get("tiny-codec").plugin == "tiny"
    assert tiny.plugins["tiny"].components == {"codec": ["tiny-codec"], "tokenizer": ["tiny-text"]}
    tiny.remove_plugin("tiny")
    assert "tiny-codec" not in tiny.registry("codec")


def test_disabled_plugins_are_not_loaded(monkeypatch):
    from dalle_framework.plugins import PluginManager

    monkeypatch.setenv("DALLE_DISABLE_PLUGINS", "tiny, other")
    manager = PluginManager(load_entry_points=False)
    info = manager.add_plugin(inline_plugin(dalle_register_codecs=lambda registry: registry.register(TinyCodec)), name="tiny")
    assert info.disabled and manager.registry("codec").names() == []


def test_builtin_plugins_come_from_entry_points(manager):
    builtins = {"tokenizers", "data", "dvae", "vqvae", "transformer", "clip", "engines", "stages"}
    assert builtins <= set(manager.plugins)
    for name in builtins:
        assert manager.plugins[name].distribution == "dalle-framework"


# ----------------------------------------------------------------------------- recipes

BASE = {
    "name": "t",
    "data": {"name": "tiny-data", "params": {}},
    "tokenizer": {"name": "tiny-text", "params": {"text_len": 4}},
    "codec": {"name": "tiny-codec", "params": {"vocab_size": 8}, "train": {"steps": 3}},
}


@pytest.fixture
def with_data(tiny):
    from dalle_framework import DataSource, Sample

    class TinyData(DataSource):
        class Params(Params):
            n: int = 4

        def __init__(self, params):
            self.n = params.n

        def samples(self, split):
            for i in range(self.n):
                yield Sample(image=torch.full((8, 8, 3), i * 30, dtype=torch.uint8), caption=f"grey {i}")

    tiny.add_plugin(inline_plugin(dalle_register_datasources=lambda registry: registry.register(TinyData, name="tiny-data")), name="tiny-data")
    return tiny


def test_dalle_convert_finds_a_converter_of_any_kind(with_data, tmp_path, capsys):
    """Any registered component may convert released files: here a data source, not a model."""
    from dalle_framework import DataSource
    from dalle_framework.cli import main

    class ReleasedCaptions(DataSource):
        """Captions released as one text file, converted to the file it reads."""

        def __init__(self, params):
            pass

        def samples(self, split):
            return iter(())

        @classmethod
        def convert_released(cls, files, out_dir, *, trust_pickle, params=None):
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "captions.txt").write_text(files[0].read_text().upper())
            return {"captions": str(out_dir / "captions.txt")}

    register = lambda registry: registry.register(ReleasedCaptions, name="released-captions")  # noqa: E731
    with_data.add_plugin(inline_plugin(dalle_register_datasources=register), name="released")
    released = tmp_path / "captions.txt"
    released.write_text("a cat")
    assert main(["convert", "released-captions", str(released), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "captions.txt").read_text() == "A CAT"
    capsys.readouterr()
    assert main(["convert", "tiny-data", str(released), str(tmp_path / "no")]) == 2
    refused = capsys.readouterr().err
    assert "data 'tiny-data' has no converter" in refused and "components with a converter: released-captions" in refused


def test_recipe_validates_and_fills_defaults(with_data):
    recipe = validate(BASE)
    # the validated Params objects themselves, defaults filled in, reach the constructors
    assert isinstance(recipe.codec.params, TinyCodec.Params)
    assert recipe.codec.params.model_dump() == {"vocab_size": 8, "image_size": 8}
    assert recipe.codec.train.steps == 3 and recipe.codec.train.engine.name == "torch"
    assert recipe.codec.train.engine.params.model_dump() == {"device": "auto", "find_unused_parameters": False}


def test_recipe_reports_all_mistakes_with_paths(with_data):
    bad = deep_merge(BASE, {"codec": {"name": "tiny-codex"}, "tokenizer": {"params": {"text_len": "long"}}, "colour": "red"})
    with pytest.raises(RecipeError) as info:
        validate(bad)
    problems = info.value.problems
    assert len(problems) == 3, problems
    text = "\n".join(problems)
    assert "codec.name: unknown codec 'tiny-codex'; did you mean 'tiny-codec'" in text
    assert "tokenizer.params.text_len: Input should be a valid integer" in text
    assert "colour: unknown key" in text


def test_unknown_param_key_is_an_error(with_data):
    with pytest.raises(RecipeError, match=r"codec.params.vocab: unknown key"):
        validate(deep_merge(BASE, {"codec": {"params": {"vocab": 3}}}))


def test_hflip_is_for_the_codec_stage_only(with_data):
    assert validate(deep_merge(BASE, {"codec": {"train": {"hflip": True}}})).codec.train.hflip
    prior = {"name": "tiny-prior", "train": {"hflip": True}}
    with pytest.raises(RecipeError) as info:
        validate(deep_merge(BASE, {"prior": prior}))
    # each stage has its own train schema: only the codec's knows hflip
    assert "prior.train.hflip: unknown key (not a field of this block)" in info.value.problems, info.value.problems


def test_extends_and_overrides(with_data, tmp_path):
    import yaml

    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    (tmp_path / "child.yaml").write_text(
        textwrap.dedent(
            """
            extends: base.yaml
            name: child
            codec:
              params: {image_size: 16}
            """
        )
    )
    raw = load_raw(tmp_path / "child.yaml")
    assert raw["codec"]["params"] == {"vocab_size": 8, "image_size": 16}
    recipe = load_recipe(tmp_path / "child.yaml", ["codec.train.steps=7", "seed=3"])
    assert (recipe.name, recipe.seed, recipe.codec.train.steps, recipe.codec.params.image_size) == ("child", 3, 7, 16)


def test_changing_a_component_name_drops_inherited_params():
    merged = deep_merge({"codec": {"name": "a", "params": {"x": 1}}}, {"codec": {"name": "b"}})
    assert merged["codec"] == {"name": "b"}
    overridden = apply_overrides({"codec": {"name": "a", "params": {"x": 1}}}, ["codec.name=b"])
    assert overridden["codec"] == {"name": "b"}


def test_extends_cycle_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(UsageError, match="extends itself"):
        load_raw(tmp_path / "a.yaml")


def test_recipes_are_data_not_code(with_data, tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(UsageError, match="not valid YAML"):
        load_raw(path)
    with pytest.raises(RecipeError, match="unknown codec 'os.path'"):
        validate(deep_merge(BASE, {"codec": {"name": "os.path"}}))


def test_bad_override_syntax_is_a_usage_error():
    with pytest.raises(UsageError, match="key.path=value"):
        apply_overrides({}, ["codec.train.steps"])


RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


@pytest.mark.parametrize("path", sorted(RECIPES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_validates(manager, path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    facts = manager.registry("codec").get(recipe.codec.name).describe(recipe.codec.params)  # from params, nothing built
    assert recipe.codec.train.steps > 0 and facts.vocab_size >= 2 and facts.grid[0] >= 1


# ----------------------------------------------------------------------------- the plugin API

REPO = Path(__file__).resolve().parent.parent


def framework_imports(source: str) -> list[str]:
    """Every ``dalle_framework`` name or module a file imports, as dotted paths, and every other ``dalle_*`` module."""
    import ast

    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.startswith("dalle_")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("dalle_"):
            if node.module == "dalle_framework":
                found += [f"dalle_framework.{alias.name}" for alias in node.names]
            else:
                found.append(node.module)
    return found


def plugin_api_violations(source: str, own: str) -> list[str]:
    import dalle_framework

    bad = []
    for name in framework_imports(source):
        root, _, rest = name.partition(".")
        if root == "dalle_framework":
            exported = rest in dalle_framework.__all__ and "." not in rest
            if not (exported or name in dalle_framework.PLUGIN_API or name.rpartition(".")[0] in dalle_framework.PLUGIN_API[1:]):
                bad.append(name)
        elif root != own:
            bad.append(name)
    return bad


def test_the_plugin_api_check_catches_violations():
    assert plugin_api_violations("from dalle_framework import ImageCodec, rundir\nfrom dalle_framework.nn import conv", "dalle_x") == []
    assert plugin_api_violations("from dalle_framework.interfaces import Prior", "dalle_x") == ["dalle_framework.interfaces"]
    assert plugin_api_violations("from dalle_framework import pipeline", "dalle_x") == ["dalle_framework.pipeline"]
    assert plugin_api_violations("import dalle_vqvae.model", "dalle_x") == ["dalle_vqvae.model"]


PLUGIN_FILES = sorted((REPO / "plugins").glob("dalle_*/**/*.py"))


@pytest.mark.parametrize("path", PLUGIN_FILES, ids=lambda p: str(p.relative_to(REPO / "plugins")))
def test_plugins_import_only_the_declared_plugin_api_and_no_other_plugin(path):
    own = path.relative_to(REPO / "plugins").parts[0]
    assert plugin_api_violations(path.read_text(), own) == [], f"{path} imports outside dalle_framework.PLUGIN_API or another plugin"


def test_the_core_imports_no_plugin():
    for path in sorted((REPO / "dalle_framework").rglob("*.py")):
        plugins = [m for m in framework_imports(path.read_text()) if not m.startswith("dalle_framework")]
        assert not plugins, f"{path} imports plugins {plugins}"


def test_no_function_in_the_core_is_over_60_lines():
    """Long functions hide their steps; the core keeps each under 60 lines (docstring included)."""
    import ast

    long = []
    for path in sorted((REPO / "dalle_framework").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long
