"""What the command groups share: argument types, overrides, loading a run, printing JSON."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import UsageError

MAX_SEED = 2**63 - 1
RECIPE_HELP = "a recipe name or file, then key.path=value overrides (values parsed as YAML)"


def output_file(text: str) -> Path:
    """An output file, checked before any work: never a device, FIFO, socket or directory."""
    from ..rundir import check_output

    check_output(Path(text))
    return Path(text)


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def split_overrides(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate ``key.path=value`` overrides from positional words."""
    overrides = [i for i in items if "=" in i and not i.startswith("=")]
    return [i for i in items if i not in overrides], overrides


def count(low: int, high: int = 10**6):
    """An argparse type: an integer in ``[low, high]``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range; give {low} to {high}")
        return value

    return parse


def number(text: str) -> float:
    """An argparse type: a finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def pipeline_for(ref: str, overrides: list[str], device: Optional[str]):
    """A run directory (with recipe.yaml) or a recipe name/file."""
    from ..pipeline import Pipeline

    path = Path(ref)
    if path.is_dir():
        return Pipeline.load(path, device=device, overrides=overrides)
    if not path.exists() and (os.sep in ref or ref.startswith(".")):  # a path, not a recipe name
        raise UsageError(f"{ref}: no such run directory or recipe file; train a run first (dalle train RECIPE), "
                         "or name a recipe (dalle recipes ls)")
    return Pipeline.from_recipe(ref, overrides, device=device)


def one_recipe(args, usage: str) -> tuple[str, list[str]]:
    words, overrides = split_overrides(args.recipe_and_overrides)
    if len(words) != 1:
        raise UsageError(usage)
    return words[0], overrides


def params_from_args(params: list[str]) -> dict:
    """``--param key=value`` items (values parsed as YAML) as a dict."""
    import yaml

    values = {}
    for item in params:
        key, sep, raw = item.partition("=")
        if not sep:
            raise UsageError(f"--param {item!r} must look like key=value")
        try:
            values[key] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise UsageError(f"--param {item!r}: value is not valid YAML: {exc}") from None
    return values


def add_common(parser: argparse.ArgumentParser, device: bool = True) -> None:
    """``--quiet`` (and ``--device``) for commands that run models."""
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    if device:
        parser.add_argument("--device", help="cpu, cuda or cuda:N (default: the recipe's `device`, auto = cuda when available)")
