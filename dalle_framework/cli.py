"""The ``dalle`` command line.

Exit codes: 0 success, 2 usage or recipe errors (a clear message, no
traceback), 1 runtime failures (a clear message too).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from .errors import DalleError, RecipeError, UsageError, os_error, validation_problems

MAX_SEED = 2**63 - 1
OUT_OF_MEMORY = "out of memory; use smaller batches (train.batch_size, --batch-size) or a smaller model"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 too; keep one format
        raise UsageError(f"{self.prog}: {message}")


def _output_file(text: str) -> Path:
    """An output file, checked before any work: never a device, FIFO, socket or directory."""
    from .rundir import check_output

    check_output(Path(text))
    return Path(text)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _split_overrides(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate ``key.path=value`` overrides from positional words."""
    overrides = [i for i in items if "=" in i and not i.startswith("=")]
    return [i for i in items if i not in overrides], overrides


def _count(low: int, high: int = 10**6):
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


def _number(text: str) -> float:
    """An argparse type: a finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


# ----------------------------------------------------------------------------- plugins / components


def cmd_plugins_new(args) -> int:
    from .scaffold import KINDS, new_plugin

    if not args.name:
        raise UsageError(f"dalle plugins new: give the plugin's name, e.g. dalle plugins new my-codec --kind {'|'.join(KINDS)}")
    if not args.kind:
        raise UsageError(f"dalle plugins new {args.name}: --kind is required; choose one of {', '.join(KINDS)}")
    written = new_plugin(args.name, args.kind, Path(args.dir))
    if args.json:
        _print_json(written)
        return 0
    print(f"wrote {written['folder']} ({written['kind']} plugin, {len(written['files'])} files)")
    for relative in written["files"]:
        print(f"    {relative}")
    print(f"next: {written['next']}")
    return 0


def cmd_plugins(args) -> int:
    if args.action == "new":
        return cmd_plugins_new(args)
    if args.action is not None:
        raise UsageError(f"dalle plugins {args.action!r}: the only action is 'new' (dalle plugins new NAME --kind KIND)")
    from .plugins import get_plugin_manager

    manager = get_plugin_manager()
    builtin = set(build_parser().commands.choices)
    for info in manager.plugins.values():
        taken = [f"command {name!r} is a built-in command, which keeps its name: rename the plugin's" for name in info.commands if name in builtin]
        info.warnings += [warning for warning in taken if warning not in info.warnings]
    infos = [info.as_dict() for info in manager.plugins.values()]
    if args.json:
        _print_json({"plugins": infos})
        return 0
    for info in infos:
        state = "disabled" if info["disabled"] else ("ERROR" if info["error"] else "ok")
        print(f"{info['name']:<14} {info['version']:<8} {state:<8} {info['module']}")
        for kind, names in {**info["components"], **({"commands": info["commands"]} if info["commands"] else {})}.items():
            print(f"    {kind:<10} {', '.join(names)}")
        if info["error"]:
            print(f"    error: {info['error']}")
        for warning in info["warnings"]:
            print(f"    warning: {warning}")
    return 0


def cmd_components(args) -> int:
    from .plugins import KINDS, get_plugin_manager

    manager = get_plugin_manager()
    kinds = [args.kind] if args.kind else list(KINDS)
    for kind in kinds:
        if kind not in KINDS:
            raise UsageError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    if args.name:
        return _show_component(manager.registry(args.kind), args.name, as_json=args.json)
    table = {
        kind: [
            {"name": name, "plugin": cls.plugin, "doc": (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""}
            for name, cls in manager.registry(kind).items()
        ]
        for kind in kinds
    }
    if args.json:
        _print_json(table)
        return 0
    for kind, rows in table.items():
        print(f"{kind}:")
        for row in rows:
            print(f"  {row['name']:<20} [{row['plugin']}] {row['doc']}")
    return 0


def _show_component(registry, name: str, *, as_json: bool) -> int:
    """``dalle components KIND NAME``: the component's parameters, as a recipe's ``params:`` takes them."""
    import yaml

    from .errors import RegistryError
    from .registry import params_table

    try:
        cls = registry.get(name)
    except RegistryError as exc:
        raise UsageError(str(exc)) from None
    rows = params_table(cls.Params)
    if as_json:
        _print_json({"kind": registry.kind, "name": cls.name, "plugin": cls.plugin, "doc": (cls.__doc__ or "").strip(), "params": rows})
        return 0
    print(f"{registry.kind} {cls.name} [{cls.plugin}]")
    if cls.__doc__:
        print("  " + "\n  ".join(line.strip() for line in cls.__doc__.strip().splitlines()))
    print("params:" if rows else "params: none")
    for row in rows:
        default = "required" if row["required"] else "default " + yaml.safe_dump(row["default"], default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
        bounds = f", {', '.join(row['bounds'])}" if row["bounds"] else ""
        print(f"  {row['name']}: {row['type']} ({default}{bounds})")
        if row["description"]:
            print(f"      {row['description']}")
    return 0


# ----------------------------------------------------------------------------- recipes


def cmd_recipes(args) -> int:
    from .recipe import dump, list_recipes, load_raw, load_recipe

    if args.action == "ls":
        for name, path in list_recipes().items():
            print(f"{name:<24} {path}")
        return 0
    if args.action == "show":
        if not args.recipes:
            raise UsageError("dalle recipes show NAME [--resolved]")
        for ref in args.recipes:
            if args.resolved:
                print(dump(load_recipe(ref)), end="")
            else:
                import yaml

                print(yaml.safe_dump(load_raw(ref), sort_keys=False, allow_unicode=True), end="")
        return 0
    # validate, with the overrides `dalle train` would apply
    refs, overrides = _split_overrides(args.recipes)
    if not refs:
        raise UsageError("dalle recipes validate PATH [PATH ...] [key.path=value ...]")
    failures: list[RecipeError | UsageError] = []
    for ref in refs:
        try:
            load_recipe(ref, overrides)
            print(f"ok      {ref}")
        except UsageError as exc:
            failures.append(exc)
            print(f"INVALID {exc}", file=sys.stderr)
    return 2 if failures else 0


# ----------------------------------------------------------------------------- train / generate / evaluate


def _pipeline_for(ref: str, overrides: list[str], device: Optional[str]):
    """A run directory (with recipe.yaml) or a recipe name/file."""
    from .pipeline import Pipeline

    path = Path(ref)
    if path.is_dir():
        return Pipeline.load(path, device=device, overrides=overrides)
    if not path.exists() and (os.sep in ref or ref.startswith(".")):  # a path, not a recipe name
        raise UsageError(f"{ref}: no such run directory or recipe file; train a run first (dalle train RECIPE), "
                         "or name a recipe (dalle recipes ls)")
    return Pipeline.from_recipe(ref, overrides, device=device)


def _one_recipe(args, usage: str) -> tuple[str, list[str]]:
    words, overrides = _split_overrides(args.recipe_and_overrides)
    if len(words) != 1:
        raise UsageError(usage)
    return words[0], overrides


def _stages(pipe, wanted: Optional[str]) -> Optional[list[str]]:
    if wanted in (None, "all"):
        return None
    pipe.stage(wanted)  # an unknown stage is a clear error naming the recipe's stages
    return [wanted]


def cmd_train(args) -> int:
    from . import distributed
    from .rundir import command_line, locked
    from .train.loop import train_all

    ref, overrides = _one_recipe(args, "dalle train RECIPE [key.path=value ...] [--stage STAGE] [--resume] [--force]")
    pipe = _pipeline_for(ref, overrides, args.device)
    with locked(pipe.run_dir, command_line()):
        results = train_all(pipe, _stages(pipe, args.stage), resume=args.resume, force=args.force, progress=not args.quiet)
    if distributed.is_main():
        _print_json({"run": str(pipe.run_dir), "stages": results})
    return 0


def cmd_tokenizer(args) -> int:
    from .rundir import command_line, locked
    from .train.loop import claim_run_dir

    ref, overrides = _one_recipe(args, "dalle tokenizer train RECIPE [--vocab-size N] [key.path=value ...]")
    if args.vocab_size is not None:
        overrides.append(f"tokenizer.params.vocab_size={args.vocab_size}")
    pipe = _pipeline_for(ref, overrides, None)
    with locked(pipe.run_dir, command_line()):
        claim_run_dir(pipe, force=args.force)
        fitted = pipe.fit_tokenizer(force=True)
    if fitted is None:
        raise UsageError(f"the {pipe.recipe.tokenizer.name!r} tokenizer learns nothing from data; nothing to train (a `bpe` tokenizer does)")
    from .captions import SAMPLE, caption_report, format_report

    fitted["text"] = caption_report(pipe.tokenizer, {s: pipe.caption_sample(s, SAMPLE) for s in ("train", "heldout")})
    print(format_report(fitted["text"]), file=sys.stderr)
    _print_json(fitted)
    return 0


def _sampling(args, defaults):
    overrides = {
        key: value
        for key, value in {
            "temperature": args.temperature,
            "top_k": args.top_k,
            "top_p": args.top_p,
            "guidance_scale": args.guidance,
        }.items()
        if value is not None
    }
    if args.no_cache:
        overrides["use_cache"] = False
    if args.draws is not None:
        overrides["draws"] = args.draws
    from pydantic import ValidationError

    flags = {"temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p", "guidance_scale": "--guidance",
             "use_cache": "--no-cache", "draws": "--draws"}
    try:
        return type(defaults).model_validate({**defaults.model_dump(), **overrides})
    except ValidationError as exc:
        lines = validation_problems(exc, name=lambda loc: flags.get(str(loc[0]), ".".join(map(str, loc))))
        raise UsageError(f"sampling options: {lines}") from None


def cmd_generate(args) -> int:
    import torch

    from .data.images import save_captioned_grid

    pipe = _pipeline_for(args.run, [], args.device)
    captions = args.captions or pipe.recipe.generate.captions
    if not captions:
        raise UsageError("give captions: dalle generate RUN \"a red circle in the top left\" ...")
    if args.keep is not None and args.n is not None and args.keep > args.n:
        raise UsageError(f"--keep {args.keep} is more than -n {args.n} candidates")
    from .captions import reading_notes

    for note in reading_notes(pipe.tokenizer, captions):
        print(f"note: {note}", file=sys.stderr)
    prime_images = None
    if args.prime:
        prime_images = _read_image(args.prime).unsqueeze(0)
    sampling = _sampling(args, pipe.recipe.generate.sampling)
    seed = pipe.recipe.seed if args.seed is None else args.seed
    result = pipe.generate(
        captions,
        candidates=args.n,
        keep=args.keep,
        sampling=sampling,
        seed=seed,
        prime_images=prime_images,
        prime_rows=args.prime_rows,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    scores = [[None if torch.isnan(s) else round(float(s), 4) for s in row] for row in result.scores]
    printed: dict[str, Any] = {}
    grid = args.out or (None if args.out_dir else Path("grid.png"))
    if grid is not None:
        printed["grid"] = str(save_captioned_grid(result.images, captions, grid, scores=result.scores))
    if args.out_dir:
        printed["images"] = _save_each(result, scores, args.out_dir, {
            "run": str(pipe.run_dir), "seed": seed, "sampling": sampling.model_dump(mode="json"),
            "candidates": int(result.candidate_scores.shape[1]),
        })
    printed["rows"] = [{"caption": c, "scores": row} for c, row in zip(captions, scores)]
    _print_json(printed)
    return 0


def _save_each(result, scores: list[list[Optional[float]]], directory: Path, facts: dict[str, Any]) -> list[str]:
    """One PNG per kept image, best first, each beside a JSON sidecar saying how it was made."""
    from .data.images import save_image
    from .rundir import write_json

    written = []
    for i, (caption, images) in enumerate(zip(result.captions, result.images)):
        for rank, image in enumerate(images):
            stem = directory / f"{i:03d}-{rank:02d}"
            save_image(image, stem.with_suffix(".png"))
            candidate = None if result.best is None else int(result.best[i, rank])
            write_json(stem.with_suffix(".json"), {"caption": caption, "rank": rank, "score": scores[i][rank],
                                                   "candidate": candidate, **facts})
            written.append(str(stem.with_suffix(".png")))
    return written


def _read_image(path: str):
    """An image file as float ``[3,H,W]`` in [0,1]."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.functional import to_tensor

    try:
        with Image.open(path) as img:
            if img.width * img.height > 64 * 2**20:
                raise UsageError(f"--prime {path}: {img.width}x{img.height} pixels is too large")
            return to_tensor(img.convert("RGB"))
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise UsageError(f"--prime {path}: cannot read the image ({exc})") from None


def _metric_names(text: Optional[str]) -> Optional[list[str]]:
    if text is None:
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise UsageError("--metrics: give metric names separated by commas, e.g. --metrics faithfulness,fd,kid (`dalle components metric`)")
    return names


def cmd_evaluate(args) -> int:
    from . import distributed
    from .evaluation import evaluate_run, sections
    from .rundir import command_line, locked, write_text

    ref, overrides = _one_recipe(args, "dalle evaluate RUN [key.path=value ...] [--metrics a,b] [--stage S] [--out FILE]")
    device = args.device
    if distributed.world_size() > 1:  # under torchrun: every rank draws a share of the candidates
        if args.sweep:
            raise UsageError("--sweep runs in one process; start it without torchrun")
        distributed.init_distributed()
        device = device or str(distributed.default_device())
    pipe = _pipeline_for(ref, overrides, device)
    wanted = None
    if args.sweep and args.stage not in (None, "all", "generation"):
        raise UsageError(f"--sweep judges generation only; drop --stage {args.stage}")
    if args.stage not in (None, "all"):
        if args.stage not in sections(pipe):
            raise UsageError(f"--stage {args.stage!r}: choose one of {', '.join(sections(pipe))} or all")
        wanted = [args.stage]
    with locked(pipe.run_dir, command_line()):
        if args.sweep:
            from .sweep import format_table, sweep_sampling

            result = sweep_sampling(pipe, args.sweep, progress=not args.quiet)
            out = Path(args.out) if args.out else pipe.run_dir / "eval" / "sweep.json"
            write_text(out, json.dumps(result, indent=2) + "\n")
            print(format_table(result))
            print(f"sweep JSON: {out}", file=sys.stderr)
            return 0
        report = evaluate_run(pipe, wanted, metrics=_metric_names(args.metrics), progress=not args.quiet)
        if report is None:  # a rank other than 0: its share went to rank 0
            return 0
        text = json.dumps(report, indent=2)
        if wanted is None and args.metrics is None:  # the whole report: what `dalle compare RUN ...` reads
            write_text(pipe.run_dir / "eval" / "report.json", text + "\n")
        if args.out:
            write_text(args.out, text + "\n")
    print(text)
    return 0


def cmd_compare(args) -> int:
    from .compare import compare_reports, format_comparison, load_report

    result = compare_reports([load_report(ref) for ref in args.runs], only_comparable=args.only_comparable)
    if args.json:
        _print_json(result)
    else:
        print(format_comparison(result))
    return 0


def cmd_run(args) -> int:
    """The main job: train every stage (reusing what is trained), generate, evaluate."""
    from . import distributed
    from .data.images import save_captioned_grid
    from .evaluation import evaluate_run
    from .rundir import command_line, locked, write_text
    from .train.loop import train_all

    ref, overrides = _one_recipe(args, "dalle run RECIPE [key.path=value ...]")
    pipe = _pipeline_for(ref, overrides, args.device)
    with locked(pipe.run_dir, command_line()):
        train_all(pipe, resume=True, force=args.force, progress=not args.quiet)
        if not distributed.is_main():
            return 0
        captions = pipe.recipe.generate.captions or pipe.data.captions("heldout")[:4]
        result = pipe.generate(captions, progress=not args.quiet)
        grid = save_captioned_grid(result.images, captions, pipe.run_dir / "samples.png", scores=result.scores)
        print(f"samples for {len(captions)} captions: {grid}", file=sys.stderr)
        report = evaluate_run(pipe, progress=not args.quiet)
        report["samples"] = str(grid)
        write_text(pipe.run_dir / "eval" / "report.json", json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


def cmd_inspect(args) -> int:
    from .inspect import inspect_recipe
    from .recipe import load_recipe

    ref, overrides = _one_recipe(args, "dalle inspect RECIPE [key.path=value ...] [--gpus N --nodes M]")
    _print_json(inspect_recipe(load_recipe(ref, overrides), gpus_per_node=args.gpus, nodes=args.nodes))
    return 0


def cmd_serve(args) -> int:
    """A web page and JSON API over a trained run (dalle_framework.serve)."""
    from pydantic import ValidationError

    from .serve import Limits, create_app, host_name, host_names, is_loopback, listen_socket

    try:
        limits = Limits(**{name: getattr(args, name) for name in Limits.model_fields})
    except ValidationError as exc:
        lines = validation_problems(exc, name=lambda loc: "--" + "-".join(map(str, loc)).replace("_", "-"))
        raise UsageError(f"serve options: {lines}") from None
    from .interfaces import ImageCodec, Prior

    names = host_names(args.host, args.allowed_host)
    with listen_socket(args.host, args.port) as sock:  # before the model loads: a busy port or a foreign host fails at once
        pipe = _pipeline_for(args.run, [], args.device)
        for contract in (ImageCodec, Prior):  # what generation needs: trained, or pretrained weights (`dalle convert`)
            stage = pipe.role(contract)
            if stage is None or not (pipe.has_weights(stage) or pipe.stage(stage).block.weights):
                raise UsageError(f"{args.run}: no trained {contract.__name__} to serve; train the run first (`dalle train {args.run}`)")
        import uvicorn

        app = create_app(pipe, limits, allowed_hosts=names)
        if not is_loopback(args.host):
            print(f"warning: serving on {args.host}: anyone who can reach it can queue jobs (there is no login); the page answers "
                  f"to the Host names {', '.join(sorted(names))} only (add the ones clients use with --allowed-host NAME)", file=sys.stderr)
        print(f"serving {args.run} on http://{host_name(args.host)}:{sock.getsockname()[1]}/ (Ctrl-C stops)", file=sys.stderr)
        uvicorn.Server(uvicorn.Config(app, log_level="info" if args.verbose else "warning")).run(sockets=[sock])
    return 0


def _host(text: str) -> str:
    """An argparse type: a host name or address (as given; ``serve.host_name`` checks it)."""
    from .serve import host_name

    try:
        host_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


# ----------------------------------------------------------------------------- data


def _params_from_args(params: list[str]) -> dict:
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


def _source_from_args(name: str, params: list[str]):
    from pydantic import ValidationError

    from .plugins import get_plugin_manager

    values = _params_from_args(params)
    registry = get_plugin_manager().registry("data")
    try:
        return registry.build({"name": name, "params": values})
    except ValidationError as exc:
        raise UsageError(f"data source {name!r} params: {validation_problems(exc)}") from None


def cmd_data(args) -> int:
    from . import distributed

    if args.action == "shards":
        from .data.shards import write_shards

        if not args.out:
            raise UsageError("dalle data shards SOURCE OUT")
        source = _source_from_args(args.source, args.param)
        _print_json(write_shards(source, args.out, max_per_shard=args.max_per_shard, progress=not args.quiet))
        return 0
    # encode: whatever each stage precomputes before training (the prior's image tokens); under
    # torchrun every rank encodes its share, and shards already encoded are kept
    from .rundir import command_line, locked
    from .train.loop import join_run

    pipe = _pipeline_for(args.source, [], args.device)
    join_run(pipe)
    with locked(pipe.run_dir, command_line()):
        made = {name: stage.prepare() for name, stage in pipe.stages.items()}
    if distributed.is_main():
        _print_json({"run": str(pipe.run_dir), "prepared": {k: v for k, v in made.items() if v}})
    return 0


# ----------------------------------------------------------------------------- convert


def cmd_convert(args) -> int:
    """Released files -> OUT/model.safetensors (or a vocabulary) + <kind>.yaml + conversion.json, by the component's converter."""
    if len(args.files_and_out) < 2:
        raise UsageError("dalle convert COMPONENT FILE [FILE ...] OUT [--trust-pickle] [--param KEY=VALUE ...]")
    *files, out = map(Path, args.files_and_out)
    cls = _converter(args.component)
    _print_json(cls.convert_released(files, out, trust_pickle=args.trust_pickle, params=_params_from_args(args.param)))
    return 0


def _converter(name: str) -> type:
    """The registered class called ``name`` that converts released files, whatever kind it is."""
    import difflib

    from .plugins import KINDS, get_plugin_manager

    manager = get_plugin_manager()
    found = {kind: manager.registry(kind).get(name) for kind in KINDS if name in manager.registry(kind)}
    converters = [cls for cls in found.values() if cls.converts_released()]
    if len(converters) == 1:
        return converters[0]
    if converters:
        raise UsageError(f"{name!r} names converters of several kinds ({', '.join(found)}); plugins must give them distinct names")
    offered = sorted(n for kind in KINDS for n, cls in manager.registry(kind).items() if cls.converts_released())
    if found:
        what = f"{next(iter(found))} {name!r} has no converter for released files"
    else:
        close = difflib.get_close_matches(name, offered, n=3, cutoff=0.5)
        what = f"no component is called {name!r}" + (f"; did you mean {' or '.join(map(repr, close))}?" if close else "")
    raise UsageError(f"dalle convert: {what} (components with a converter: {', '.join(offered) or 'none'})")


# ----------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dalle", description="DALL-E style text-to-image models from plugins and recipes.",
                     epilog="Plugins may add commands: `dalle plugins` lists them.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more (INFO messages)")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, required=True, metavar="COMMAND")
    parser.commands = sub  # type: ignore[attr-defined]  # where plugins' commands are added (_add_plugin_commands)

    p = sub.add_parser("plugins", help="list loaded plugins, their components and load errors; 'plugins new' writes a new one")
    p.add_argument("action", nargs="?", choices=["new"], help="new: write a plugin package to start from (tests, recipe, entry point)")
    p.add_argument("name", nargs="?", help="with new: the plugin's name (lower-case letters, digits, hyphens)")
    p.add_argument("--kind", help="with new: codec, prior, reranker, data, tokenizer or stage")
    p.add_argument("--dir", default=".", help="with new: the folder to write the package in (default: here)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("components", help="list registered components; with KIND NAME, one component's parameters")
    p.add_argument("kind", nargs="?", help="tokenizer, codec, prior, reranker, data, engine or stage (default: all)")
    p.add_argument("name", nargs="?", help="a component of that kind: show its parameters (type, default, bounds, description)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_components)

    p = sub.add_parser("recipes", help="list, show and validate recipes")
    p.add_argument("action", choices=("ls", "show", "validate"), help="ls: list; show: print; validate: check and report every mistake")
    p.add_argument("recipes", nargs="*", help="recipe names or files")
    p.add_argument("--resolved", action="store_true", help="show with extends, defaults and params filled in")
    p.set_defaults(func=cmd_recipes)

    def common(p, device=True):
        p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
        if device:
            p.add_argument("--device", help="cpu, cuda or cuda:N (default: the recipe's `device`, auto = cuda when available)")

    recipe_help = "a recipe name or file, then key.path=value overrides (values parsed as YAML)"
    p = sub.add_parser("train", help="train stages of a recipe into its run directory")
    p.add_argument("recipe_and_overrides", nargs="+", metavar="RECIPE [key.path=value ...]", help=recipe_help)
    p.add_argument("--stage", default="all", help="one stage of the recipe (codec, prior, reranker, ...) or all (default)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted stage from its last checkpoint")
    p.add_argument("--force", action="store_true", help="retrain even what is trained, start over an interrupted stage, "
                   "and accept a recipe whose components differ from the run directory's")
    common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("run", help="the main job: train (reusing what is trained, resuming what was interrupted), generate a grid, evaluate")
    p.add_argument("recipe_and_overrides", nargs="+", metavar="RECIPE [key.path=value ...]", help=recipe_help)
    p.add_argument("--force", action="store_true", help="retrain every stage and accept a recipe whose components differ from the run's")
    common(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("tokenizer", help="fit a tokenizer that learns from captions (bpe) into the run directory")
    p.add_argument("action", choices=("train",), help="train: fit on the training captions of the recipe's data")
    p.add_argument("recipe_and_overrides", nargs="+", metavar="RECIPE [key.path=value ...]", help=recipe_help)
    p.add_argument("--vocab-size", type=_count(2, 2**20), help="vocabulary size (sets tokenizer.params.vocab_size)")
    p.add_argument("--force", action="store_true", help="accept a recipe whose components differ from the run directory's")
    p.set_defaults(func=cmd_tokenizer)

    p = sub.add_parser("generate", help="generate images for captions from a trained run")
    p.add_argument("run", help="run directory (or a recipe whose run directory is trained)")
    p.add_argument("captions", nargs="*", help="captions to draw (default: the recipe's generate.captions)")
    p.add_argument("-n", type=_count(1, 100_000), default=None, help="candidates drawn per caption (default: the recipe's)")
    p.add_argument("--keep", type=_count(1, 100_000), default=None, help="best candidates kept per caption after reranking")
    p.add_argument("--batch-size", type=_count(1, 100_000), default=None, help="candidates sampled per forward pass (bounds memory)")
    p.add_argument("--out", type=_output_file, help="PNG grid: one row per caption with its caption and scores "
                   "(default: grid.png, or none with --out-dir)")
    p.add_argument("--out-dir", type=Path, help="also one PNG per kept image, each with a JSON sidecar (caption, seed, "
                   "settings, score, rank): DIR/CAPTION-RANK.png and .json")
    p.add_argument("--temperature", type=_number, help="softmax temperature (1 = as trained; low: near greedy)")
    p.add_argument("--top-k", type=_count(1, 2**31), help="sample among the k most likely codes")
    p.add_argument("--top-p", type=_number, help="sample within the nucleus of this probability mass (0, 1]")
    p.add_argument("--guidance", type=_number, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole prefix each step (slow; a check of the cache)")
    p.add_argument("--draws", choices=("auto", "device", "host"), help="where tokens are drawn: device (no host sync per token), "
                   "host (the same draws on every device); auto = device on CUDA, host elsewhere")
    p.add_argument("--seed", type=_count(0, MAX_SEED), default=None, help="the same seed draws the same images (default: the recipe's seed)")
    p.add_argument("--prime", help="an image whose top token rows are kept (image priming)")
    p.add_argument("--prime-rows", type=_count(0, 4096), default=0, help="how many token rows of --prime to keep")
    common(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("evaluate", help="print held-out metrics of a trained run as JSON, each with its interval")
    p.add_argument("recipe_and_overrides", nargs="+", metavar="RUN [key.path=value ...]",
                   help="run directory (or a recipe whose run directory is trained), then overrides of its recipe "
                   "(e.g. evaluate.rounds=8 evaluate.features.inception.name=inception-v3)")
    p.add_argument("--stage", default="all", help="one stage of the run, generation, or all (default)")
    p.add_argument("--metrics", help="comma-separated metrics to measure (default: the recipe's evaluate.metrics, "
                   "else every default one); `dalle components metric` lists them")
    p.add_argument("--out", type=_output_file, help="also write the JSON here")
    p.add_argument(
        "--sweep",
        action="append",
        metavar="KEY=V1,V2",
        help="judge generation under each sampling setting (repeatable: all combinations); prints a table, "
        "writes the JSON to --out or <run>/eval/sweep.json. E.g. --sweep guidance_scale=1,2,3 --sweep top_k=null,32",
    )
    common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("compare", help="one table of the figures several runs' reports share, with intervals")
    p.add_argument("runs", nargs="+", metavar="RUN_OR_REPORT", help="run directories (their eval/report.json) or report JSON files")
    p.add_argument("--only-comparable", action="store_true",
                   help="leave out figures on feature networks that differ between the runs (each run's own reranker) instead of refusing")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("inspect", help="parameter count, FLOPs per token, training memory, without allocating")
    p.add_argument("recipe_and_overrides", nargs="+", metavar="RECIPE [key.path=value ...]", help=recipe_help)
    p.add_argument("--gpus", type=_count(1, 1_000_000), default=8, help="GPUs per node (default 8)")
    p.add_argument("--nodes", type=_count(1, 1_000_000), default=1, help="nodes (default 1)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("data", help="data tools: shards from a source; precompute what a run's stages need (image tokens)")
    p.add_argument("action", choices=("shards", "encode"), help="shards: write a source as webdataset tars; encode: pre-encode a run's tokens")
    p.add_argument("source", help="shards: data source name; encode: run directory or recipe")
    p.add_argument("out", nargs="?", help="shards: output directory")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="a data source param (repeatable)")
    p.add_argument("--max-per-shard", type=_count(1, 10**7), default=1000, help="samples per tar file (default 1000)")
    common(p)
    p.set_defaults(func=cmd_data)

    from .serve import Limits

    p = sub.add_parser("serve", help="a web page and JSON API over a trained run")
    p.add_argument("run", help="run directory (codec and prior trained)")
    p.add_argument("--host", type=_host, default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=_count(1, 65535), default=8000, help="port to bind (default: 8000)")
    p.add_argument("--allowed-host", action="append", type=_host, default=[], metavar="NAME",
                   help="another Host name the page answers to, e.g. the name behind a proxy (repeatable); "
                   "by default only the --host address, and localhost's names when that is a loopback address")
    for name, spec in Limits.model_fields.items():
        kind = type(spec.default)
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=spec.default, help=f"{spec.description} (default: {spec.default:g})")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: the recipe's)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("convert", help="convert released weights or vocabularies (OpenAI's dVAE, a VQGAN, ruDALL-E, min-dalle) for recipes")
    p.add_argument("component", help="a registered component with a converter: a codec, prior or tokenizer (dalle components)")
    p.add_argument("files_and_out", nargs="+", metavar="FILE... OUT", help="the released files, then the output directory")
    p.add_argument("--trust-pickle", action="store_true", help="allow reading pickles (only for files you trust)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a component param the files do not hold (e.g. heads=16), over what they say (repeatable)")
    p.set_defaults(func=cmd_convert)
    return parser


def _strip_launcher_args(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends ``--local_rank=N``; move it into LOCAL_RANK."""
    import os

    out: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg.startswith(("--local_rank", "--local-rank")):
            value = arg.partition("=")[2] or next(it, "0")
            os.environ.setdefault("LOCAL_RANK", value)
            continue
        out.append(arg)
    return out


def _add_plugin_commands(sub) -> None:
    """The commands plugins add (``dalle_register_commands``); built-in commands keep their names."""
    from .plugins import get_plugin_manager

    for name, command in get_plugin_manager().commands.items():
        if name in sub.choices:
            continue  # `dalle plugins` reports it
        p = sub.add_parser(name, help=f"{command.help} (plugin {command.plugin})".strip())
        if command.add_arguments is not None:
            command.add_arguments(p)
        p.set_defaults(func=command.run)


def _stdout_closed() -> bool:
    """Whether the reader of our stdout has gone: a pipe's write end polls as an error then."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False


def _out_of_memory(exc: RuntimeError) -> bool:
    """torch's allocators fail with RuntimeErrors: OutOfMemoryError on a GPU, a bare one naming the
    allocator on the CPU (checked by name and text, so that torch is not imported here)."""
    return type(exc).__name__ == "OutOfMemoryError" or "can't allocate memory" in str(exc)


@contextlib.contextmanager
def _bars_off():
    """--quiet: every progress bar off, in this process and the ones it starts (see progress.py)."""
    from .progress import QUIET_ENV

    before = os.environ.get(QUIET_ENV)
    os.environ[QUIET_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(QUIET_ENV, None)
        else:
            os.environ[QUIET_ENV] = before


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        parser = build_parser()
        argv = _strip_launcher_args(list(sys.argv[1:] if argv is None else argv))
        word = next((a for a in argv if not a.startswith("-")), None)  # the command (-v is the only option before it)
        if word is not None and word not in parser.commands.choices:
            _add_plugin_commands(parser.commands)  # plugins load only for a word no built-in command has
        args, extra = parser.parse_known_args(argv)
        # Overrides may also follow options: `dalle train R --stage prior prior.train.steps=10`.
        # Likewise recipe names after a flag: `dalle recipes show --resolved NAME`.
        if extra and hasattr(args, "recipe_and_overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.recipe_and_overrides += extra
        elif extra and hasattr(args, "recipes") and not any(e.startswith("-") for e in extra):
            args.recipes += extra
        elif extra:
            raise UsageError(f"dalle: unrecognized arguments: {' '.join(extra)}")
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        with _bars_off() if getattr(args, "quiet", False) else contextlib.nullcontext():
            return int(args.func(args) or 0)
    except DalleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        if not _stdout_closed():
            raise
        # The reader went away (`dalle ... | head`): stop quietly, as other tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        return 141
    except OSError as exc:
        error = os_error(exc)
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except MemoryError:
        print(f"error: {OUT_OF_MEMORY}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        if not _out_of_memory(exc):
            raise
        print(f"error: {OUT_OF_MEMORY} ({str(exc).splitlines()[0][:200]})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; resume with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
