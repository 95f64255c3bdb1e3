"""Recipes: one YAML file describes a whole experiment.

Validation is two-phase. Phase 1 checks the structure (this module's pydantic
models); phase 2 checks each component's ``params`` against the ``Params`` of
the class the recipe names. Every mistake is collected with its dotted path and
reported at once. Recipes are data: ``yaml.safe_load`` only, and a recipe can
name registered components but never import anything.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Iterable, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import RecipeError, UsageError
from .interfaces import Sampling

RECIPE_PATH_ENV = "DALLE_RECIPE_PATH"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class EngineSpec(Strict):
    name: str = "torch"
    params: dict[str, Any] = Field(default_factory=dict)


class TrainConfig(Strict):
    """How one stage trains. Engines read the optimisation fields."""

    steps: int = Field(1000, ge=0, description="optimizer steps")
    batch_size: int = Field(32, ge=1, description="samples per step per process")
    lr: float = Field(3e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decays to lr * this")
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: Optional[float] = Field(1.0, gt=0, description="max grad norm; null = off")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    ema: Optional[float] = Field(None, gt=0, lt=1, description="EMA decay of weights used for evaluation")
    engine: EngineSpec = Field(default_factory=EngineSpec)
    max_minutes: Optional[float] = Field(None, gt=0, description="stop early after this wall time")
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(200, ge=1, description="held-out metrics and a preview image grid every N steps")
    ckpt_every: int = Field(500, ge=1)
    eval_batches: int = Field(4, ge=1, description="held-out batches per evaluation")
    hflip: bool = Field(
        False, description="mirror each training image left-right with probability 1/2 (codec stage only: captions name directions)"
    )
    num_workers: int = Field(0, ge=0)


class ComponentBlock(Strict):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class TrainedBlock(ComponentBlock):
    train: TrainConfig = Field(default_factory=TrainConfig)


class GenerateConfig(Strict):
    candidates: int = Field(16, ge=1, description="samples drawn per caption")
    keep: int = Field(4, ge=1, description="best candidates kept after reranking")
    batch_size: int = Field(64, ge=1, description="candidates decoded per forward pass")
    sampling: Sampling = Field(default_factory=Sampling)
    captions: list[str] = Field(default_factory=list, description="default captions for `dalle generate`")


class EvaluateConfig(Strict):
    captions: int = Field(16, ge=1, description="held-out captions generated for")
    candidates: int = Field(16, ge=1, description="samples per caption before reranking")
    rounds: int = Field(1, ge=1, description="independent best-of-N draws per caption (more judgements, tighter numbers)")
    batches: int = Field(8, ge=1, description="held-out batches for losses and PSNR")
    batch_size: int = Field(64, ge=1)


class Recipe(Strict):
    name: str = ""
    description: str = ""
    seed: int = 0
    output_dir: str = Field("runs/{name}", description="run directory; {name} is replaced")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    data: ComponentBlock
    tokenizer: ComponentBlock
    codec: TrainedBlock
    prior: Optional[TrainedBlock] = None
    reranker: Optional[TrainedBlock] = None
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir.format(name=self.name or "run"))

    @model_validator(mode="after")
    def _augment_images_only(self) -> "Recipe":
        for block in ("prior", "reranker"):
            config = getattr(self, block)
            if config is not None and config.train.hflip:
                raise ValueError(
                    f"{block}.train.hflip: only the codec stage mirrors images "
                    "(the prior trains on tokens, and captions such as 'arrow pointing left' name directions); remove it"
                )
        return self


# Recipe block -> registry kind. Only these blocks name components.
COMPONENT_BLOCKS = {"data": "data", "tokenizer": "tokenizer", "codec": "codec", "prior": "prior", "reranker": "reranker"}
TRAINED_KINDS = {"codec", "prior", "reranker"}


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
    import difflib

    close = difflib.get_close_matches(name, list(known), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f" (known: {', '.join(known) or 'none'})"
    raise UsageError(f"recipe {str(ref)!r} not found as a file or a recipe name{hint}")


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: not valid YAML: {exc}") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror}") from None
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


def load_raw(ref: str | Path, _seen: Optional[list[Path]] = None) -> dict:
    """Read a recipe and resolve its ``extends:`` chain (no validation yet)."""
    path = find_recipe(ref, relative_to=_seen[-1].parent if _seen else None).resolve()
    seen = list(_seen or [])
    if path in seen:
        chain = " -> ".join(str(p.name) for p in [*seen, path])
        raise UsageError(f"recipe extends itself: {chain}")
    data = read_yaml(path)
    parents = data.pop("extends", None)
    if parents is None:
        return data
    merged: dict = {}
    for parent in [parents] if isinstance(parents, str) else list(parents):
        merged = deep_merge(merged, load_raw(parent, [*seen, path]))
    return deep_merge(merged, data)


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """Apply ``key.path=value`` overrides; values are parsed as YAML."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise UsageError(f"override {item!r} must look like key.path=value (e.g. prior.train.steps=100)")
        key, _, raw = item.partition("=")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise UsageError(f"override {item!r}: value is not valid YAML: {exc}") from None
        parts = key.strip().split(".")
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


def _format(prefix: str, err: dict) -> str:
    path = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key (not a field of this block)"
    elif err["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")
    return f"{path}: {msg}" if path else msg


def validate(data: dict, source: str = "<recipe>") -> Recipe:
    """Two-phase validation; raises :class:`RecipeError` listing every problem."""
    from .plugins import get_plugin_manager

    problems: list[str] = []
    recipe: Optional[Recipe] = None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        problems += [_format("", e) for e in exc.errors()]

    manager = get_plugin_manager()
    resolved_params: dict[str, dict] = {}
    for block, kind in COMPONENT_BLOCKS.items():
        raw = data.get(block)
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            continue  # phase 1 already reported it (or the block is optional and absent)
        problems += _check_component(manager.registry(kind), raw, block, resolved_params)
        if kind in TRAINED_KINDS:
            train = raw.get("train") if isinstance(raw.get("train"), dict) else {}
            engine = train.get("engine", EngineSpec().model_dump())  # the default engine's params get filled in too
            if isinstance(engine, dict) and isinstance(engine.get("name"), str):
                problems += _check_component(manager.registry("engine"), engine, f"{block}.train.engine", resolved_params)
    if problems:
        raise RecipeError(source, problems)
    assert recipe is not None
    # Store params with every default filled in: the resolved recipe is the record.
    for path, params in resolved_params.items():
        node: Any = recipe
        for part in path.split("."):
            node = getattr(node, part)
        node.params = params
    return recipe


def _check_component(registry, raw: dict, path: str, resolved: dict) -> list[str]:
    name = raw["name"]
    if name not in registry:
        return [f"{path}.name: {registry.unknown_message(name)}"]
    params = raw.get("params") or {}
    if not isinstance(params, dict):
        return [f"{path}.params: must be a mapping, got {type(params).__name__}"]
    try:
        model = registry.validate_params(name, params)
    except ValidationError as exc:
        return [_format(f"{path}.params", e) for e in exc.errors()]
    resolved[path] = model.model_dump(mode="json")
    return []


def load_recipe(ref: str | Path, overrides: Iterable[str] = ()) -> Recipe:
    """Find, compose, override and validate a recipe."""
    data = apply_overrides(load_raw(ref), overrides)
    recipe = validate(data, source=str(ref))
    if not recipe.name:
        recipe.name = Path(str(ref)).stem
    return recipe


def recipe_from_dict(data: dict, source: str = "<recipe>") -> Recipe:
    return validate(data, source)


def dump(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
