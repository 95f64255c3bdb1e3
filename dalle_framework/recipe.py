"""Recipes: one YAML file describes a whole experiment.

Validation is two-phase. Phase 1 checks the structure (this module's pydantic
models); phase 2 checks each component's ``params`` against the ``Params`` of
the class the recipe names, and each stage's ``train`` against that stage's
own schema. Every mistake is collected with its dotted path and reported at
once. A validated recipe holds the ``Params`` objects themselves, which reach
the constructors unchanged.

Top-level keys are the fields below plus one block per registered stage
(``codec:``, ``prior:``, ``reranker:`` and any a plugin adds).

Recipes are data: ``yaml.safe_load`` only, a bounded size and expansion (an
alias bomb is refused, not expanded), and a recipe can name registered
components but never import anything or run a command.
"""

from __future__ import annotations

import copy
import difflib
import os
import string
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml
from pydantic import Field, ValidationError, field_validator

from .config import ComponentBlock, DistributedConfig, EvaluateConfig, GenerateConfig, StageBlock, TokenizerBlock
from .errors import RecipeError, UsageError, problem_lines
from .schema import EngineSpec, Strict, TrainConfig

RECIPE_PATH_ENV = "DALLE_RECIPE_PATH"
MAX_RECIPE_BYTES = 1 * 2**20  # the largest shipped recipe is 3 KB
MAX_RECIPE_NODES = 100_000  # values after YAML aliases are expanded (a 533-byte alias bomb makes billions)
MAX_DEPTH = 64
MAX_EXTENDS = 16  # parents one recipe lists
MAX_RECIPE_FILES = 256  # recipe files one chain reads in all (a diamond of parents repeats them)


class Recipe(Strict):
    name: str = Field("", max_length=200)
    description: str = Field("", max_length=10_000)
    seed: int = Field(0, ge=0, lt=2**63, description="seeds initialisation, data order and sampling")
    output_dir: str = Field("runs/{name}", max_length=4096, description="run directory; {name} is replaced")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d{1,3})?|mps)$", description="auto | cpu | cuda | cuda:N")
    data: ComponentBlock
    tokenizer: TokenizerBlock
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    # One block per stage present, in training order; filled by `validate` (the top-level
    # stage keys of the YAML), written back flat by `dump`.
    stages: dict[str, StageBlock] = Field(default_factory=dict, exclude=True)

    @field_validator("output_dir")
    @classmethod
    def _only_name_placeholder(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("is empty, which would write the run into the current directory; give one, e.g. runs/{name}")
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(value) if f is not None]
        except ValueError as exc:
            raise ValueError(f"{exc}; write literal braces as {{{{ and }}}}") from None
        unknown = [f for f in fields if f != "name"]
        if unknown:
            raise ValueError(f"unknown placeholder {{{unknown[0]}}}; only {{name}} is replaced")
        return value

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir.format(name=self.name or "run"))

    def __getattr__(self, item: str) -> Any:
        # `recipe.codec` for a stage block the recipe has (`recipe.stages.get(name)` when it may not).
        stages = self.__dict__.get("stages")
        if stages is not None and not item.startswith("_") and item in stages:
            return stages[item]
        return super().__getattr__(item)

    def block_dump(self, name: str) -> Any:
        """A top-level block (``data``, ``tokenizer``, or a stage) as plain JSON data."""
        if name in self.stages:
            return self.stages[name].model_dump(mode="json")
        block = getattr(self, name, None)
        return block.model_dump(mode="json") if hasattr(block, "model_dump") else block


# ----------------------------------------------------------------------------- finding and reading


def recipe_dirs() -> list[Path]:
    """Where recipe names are looked up, first match wins."""
    from .plugins import get_plugin_manager

    dirs = [Path(p) for p in os.environ.get(RECIPE_PATH_ENV, "").split(os.pathsep) if p]
    dirs.append(Path.cwd() / "recipes")
    source_tree = Path(__file__).resolve().parent.parent / "recipes"  # editable installs
    dirs.append(source_tree)
    dirs.extend(get_plugin_manager().recipe_dirs)
    unique: list[Path] = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [u.resolve() for u in unique]:
            unique.append(d)
    return unique


def list_recipes() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in recipe_dirs():
        for path in sorted(d.glob("*.yaml")):
            found.setdefault(path.stem, path)
    return found


def find_recipe(ref: str | Path, relative_to: Optional[Path] = None) -> Path:
    """A path to a recipe file, or a recipe name looked up in :func:`recipe_dirs`."""
    candidates = [Path(ref)]
    if relative_to is not None:
        candidates.insert(0, relative_to / ref)
    for c in candidates:
        if c.is_file():
            return c
    name = Path(str(ref)).stem if str(ref).endswith((".yaml", ".yml")) else str(ref)
    known = list_recipes()
    if name in known:
        return known[name]
    close = difflib.get_close_matches(name, list(known), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f" (known: {', '.join(known) or 'none'})"
    raise UsageError(f"recipe {str(ref)!r} not found as a file or a recipe name{hint}")


def _check_expansion(data: Any, path: Path) -> None:
    """Refuse a document whose values, with aliases expanded, exceed the node or depth bound.

    Shared references are counted once per use, which is what validation would
    build; a cyclic alias never ends, so it trips the bound too.
    """
    count = 0
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_RECIPE_NODES or depth > MAX_DEPTH:
            raise UsageError(
                f"{path}: too large once YAML aliases are expanded (over {MAX_RECIPE_NODES} values or {MAX_DEPTH} levels); "
                "a recipe is a few dozen settings: remove the repeated aliases"
            )
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
            stack.extend((k, depth + 1) for k in node.keys())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


def read_yaml(path: Path) -> dict:
    """A YAML mapping from ``path``: bounded in size and expansion, UTF-8, ``safe_load`` only."""
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise UsageError(f"{path}: {size} bytes; a recipe may be at most {MAX_RECIPE_BYTES} bytes")
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text (byte {exc.start}); save the recipe as UTF-8") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory, not a recipe file") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: not valid YAML: {exc}") from None
    except RecursionError:
        raise UsageError(f"{path}: nested too deeply") from None
    _check_expansion(data, path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a recipe must be a mapping, got {type(data).__name__}")
    return data


def deep_merge(base: dict, child: dict) -> dict:
    """Child wins; a component block whose ``name`` changes drops the base's params."""
    out = copy.deepcopy(base)
    for key, value in child.items():
        old = out.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            if "name" in value and "name" in old and value["name"] != old["name"]:
                old = {k: v for k, v in old.items() if k != "params"}
            out[key] = deep_merge(old, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_raw(ref: str | Path, _seen: Optional[list[Path]] = None, _read: Optional[list[Path]] = None) -> dict:
    """Read a recipe and resolve its ``extends:`` chain (no validation yet)."""
    path = find_recipe(ref, relative_to=_seen[-1].parent if _seen else None).resolve()
    seen = list(_seen or [])
    read = [] if _read is None else _read
    read.append(path)
    if len(read) > MAX_RECIPE_FILES:
        raise UsageError(f"{read[0]}: its `extends` reads more than {MAX_RECIPE_FILES} recipe files; flatten the chain")
    if path in seen:
        chain = " -> ".join(str(p.name) for p in [*seen, path])
        raise UsageError(f"recipe extends itself: {chain}")
    if len(seen) >= 16:
        raise UsageError(f"{path}: `extends` chains more than 16 recipes deep")
    data = read_yaml(path)
    parents = data.pop("extends", None)
    if parents is None:
        return data
    if isinstance(parents, str):
        parents = [parents]
    if not (isinstance(parents, list) and parents and all(isinstance(p, str) and p.strip() for p in parents)):
        raise UsageError(f"{path}: extends: must be a recipe name or a list of recipe names, got {str(parents)[:200]}")
    if len(parents) > MAX_EXTENDS:
        raise UsageError(f"{path}: extends: lists {len(parents)} recipes, more than {MAX_EXTENDS}; merge some of them")
    merged: dict = {}
    for parent in parents:
        merged = deep_merge(merged, load_raw(parent, [*seen, path], read))
    if "description" not in data and merged.get("description"):
        # A parent's description would describe another experiment (on the page, in `dalle recipes`).
        data["description"] = f"Derived from {', '.join(parents)}; it has no description of its own (set `description:`)."
    return deep_merge(merged, data)


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """Apply ``key.path=value`` overrides; values are parsed as YAML."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise UsageError(f"override {item!r} must look like key.path=value (e.g. prior.train.steps=100)")
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        if not all(parts):
            raise UsageError(f"override {item!r}: empty key in {key!r}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise UsageError(f"override {item!r}: value is not valid YAML: {exc}") from None
        _check_expansion(value, Path(f"override {key}"))
        node = data
        for part in parts[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise UsageError(f"override {item!r}: {part!r} is not a mapping")
            node = nxt
        last = parts[-1]
        if last == "name" and isinstance(node.get("name"), str) and node["name"] != value:
            node.pop("params", None)  # a different component does not inherit params
        node[last] = value
    return data


# ----------------------------------------------------------------------------- validation


def validate(data: dict, source: str = "<recipe>") -> Recipe:
    """Two-phase validation; raises :class:`RecipeError` listing every problem."""
    from .plugins import get_plugin_manager

    if not isinstance(data, dict):
        raise RecipeError(source, [f"a recipe must be a mapping, got {type(data).__name__}"])
    manager = get_plugin_manager()
    stage_classes = manager.stage_specs()
    problems: list[str] = []
    core = {k: v for k, v in data.items() if k in Recipe.model_fields and k != "stages"}
    for key in data:
        if key not in core and key not in stage_classes:
            close = difflib.get_close_matches(str(key), [*Recipe.model_fields, *stage_classes], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(f"{key}: unknown key (not a recipe field or a registered stage{hint}; stages: {', '.join(stage_classes)})")
    recipe: Optional[Recipe] = None
    try:
        recipe = Recipe.model_validate(core)
    except ValidationError as exc:
        problems += problem_lines(exc, "", model=Recipe)

    for block, kind in (("data", "data"), ("tokenizer", "tokenizer")):
        raw = data.get(block)
        if isinstance(raw, dict) and isinstance(raw.get("name"), str):
            problems += _check_params(manager.registry(kind), raw, block, recipe)

    if recipe is not None:
        problems += _check_listed(manager, recipe)

    stages: dict[str, StageBlock] = {}
    for name, cls in stage_classes.items():
        raw = data.get(name)
        if raw is None:
            if cls.required:
                problems.append(f"{name}: required (every recipe trains or loads a {name}); add a `{name}:` block")
            continue
        block, found = _check_stage(manager, cls, raw, name)
        problems += found
        if block is not None:
            stages[name] = block
    for name, block in stages.items():
        missing = [d for d in stage_classes[name].after if d not in stages]
        if missing:
            problems.append(f"{name}: needs the {', '.join(missing)} stage(s) before it; add their block(s)")
    if problems:
        raise RecipeError(source, problems)
    assert recipe is not None
    recipe.stages = stages
    return recipe


def _named_params(registry, name: str, params: Any, path: str) -> tuple[Any, list[str]]:
    """A block's ``params`` checked against the class its ``name`` picks: (the Params object, []) or (None, problems)."""
    if name not in registry:
        return None, [f"{path}.name: {registry.unknown_message(name)}"]
    if not isinstance(params, dict):
        return None, [f"{path}.params: must be a mapping, got {type(params).__name__}"]
    try:
        return registry.validate_params(name, params), []
    except ValidationError as exc:
        return None, problem_lines(exc, f"{path}.params", model=registry.params(name))
    except (ValueError, TypeError) as exc:  # a Params validator that raised outside pydantic
        return None, [f"{path}.params: {exc}"]


def _check_params(registry, raw: dict, path: str, recipe: Optional[Any]) -> list[str]:
    """Validate ``raw['params']`` against the named class; store the Params object in ``recipe``."""
    model, problems = _named_params(registry, raw["name"], raw.get("params") or {}, path)
    if recipe is not None and model is not None:
        getattr(recipe, path).params = model
    return problems


def _check_listed(manager, recipe: "Recipe") -> list[str]:
    """Each metric's, feature network's and logit filter's params against the class it names (stored as
    its Params object)."""
    evaluate = recipe.evaluate
    blocks = [(f"evaluate.metrics.{i}", "metric", block) for i, block in enumerate(evaluate.metrics or [])]
    blocks += [(f"evaluate.features.{key}", "features", block) for key, block in evaluate.features.items()]
    blocks += [(f"generate.sampling.filters.{i}", "filter", block) for i, block in enumerate(recipe.generate.sampling.filters)]
    problems: list[str] = []
    for path, kind, block in blocks:
        model, found = _named_params(manager.registry(kind), block.name, block.params, path)
        if model is not None:
            block.params = model
        problems += found
    return problems


def _check_stage(manager, cls, raw: Any, name: str) -> tuple[Optional[StageBlock], list[str]]:
    if not isinstance(raw, dict):
        return None, [f"{name}: must be a mapping with `name`, `params` and `train`, got {type(raw).__name__}"]
    try:
        block = StageBlock.model_validate(raw)
    except ValidationError as exc:
        return None, problem_lines(exc, name, model=StageBlock)
    params, problems = _named_params(manager.registry(cls.kind), block.name, block.params, name)
    if params is not None:
        block.params = params
    train_raw = block.train if isinstance(block.train, dict) else None
    if train_raw is None:
        problems.append(f"{name}.train: must be a mapping, got {type(block.train).__name__}")
        return None, problems
    try:
        train: TrainConfig = cls.Params.model_validate(train_raw)
    except ValidationError as exc:
        return None, problems + problem_lines(exc, f"{name}.train", model=cls.Params)
    engine_params, found = _named_params(manager.registry("engine"), train.engine.name, train.engine.params, f"{name}.train.engine")
    if engine_params is not None:
        train.engine.params = engine_params
    problems += found
    block.train = train
    return (None if problems else block), problems


def load_recipe(ref: str | Path, overrides: Iterable[str] = ()) -> Recipe:
    """Find, compose, override and validate a recipe."""
    data = apply_overrides(load_raw(ref), overrides)
    recipe = validate(data, source=str(ref))
    if not recipe.name:
        recipe.name = Path(str(ref)).stem
    return recipe


def recipe_from_dict(data: dict, source: str = "<recipe>") -> Recipe:
    return validate(copy.deepcopy(data), source)


def as_data(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe as plain data, stage blocks back at the top level."""
    out = recipe.model_dump(mode="json")
    for name, block in recipe.stages.items():
        out[name] = block.model_dump(mode="json")
    return out


def dump(recipe: Recipe) -> str:
    return yaml.safe_dump(as_data(recipe), sort_keys=False, allow_unicode=True)


def component_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Where two resolved recipes build different components: ``path: old -> new`` lines.

    Compares each block's ``name`` and ``params`` (training settings may change:
    they retrain a stage; components may not: the run's weights would not fit).
    """
    out: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if not (isinstance(a, dict) or isinstance(b, dict)) or key in ("generate", "evaluate"):
            continue
        a, b = a or {}, b or {}
        for field_name in ("name", "params"):
            if field_name in a or field_name in b:
                out += _diff(f"{key}.{field_name}", a.get(field_name), b.get(field_name))
    return out


def _diff(path: str, a: Any, b: Any) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [line for k in sorted(set(a) | set(b)) for line in _diff(f"{path}.{k}", a.get(k), b.get(k))]
    return [] if a == b else [f"{path}: {a!r} in the run, {b!r} now"]


__all__ = [
    "ComponentBlock",
    "EngineSpec",
    "EvaluateConfig",
    "GenerateConfig",
    "Recipe",
    "StageBlock",
    "TrainConfig",
    "apply_overrides",
    "as_data",
    "component_differences",
    "deep_merge",
    "dump",
    "load_raw",
    "load_recipe",
    "read_yaml",
    "recipe_from_dict",
    "validate",
]
