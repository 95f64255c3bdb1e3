"""Tools around runs: ``dalle inspect`` (sizes and memory, nothing allocated), ``dalle data`` (shards,
pre-encoded tokens) and ``dalle convert`` (released weights and vocabularies)."""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError, validation_problems
from .common import RECIPE_HELP, add_common, count, one_recipe, params_from_args, pipeline_for, print_json


def add_parsers(sub) -> None:
    p = sub.add_parser("inspect", help="parameter count, FLOPs per token, training memory, without allocating")
    p.add_argument("recipe_and_overrides", nargs="+", metavar="RECIPE [key.path=value ...]", help=RECIPE_HELP)
    p.add_argument("--gpus", type=count(1, 1_000_000), default=8, help="GPUs per node (default 8)")
    p.add_argument("--nodes", type=count(1, 1_000_000), default=1, help="nodes (default 1)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("data", help="data tools: shards from a source; precompute what a run's stages need (image tokens)")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=type(p))
    shards = actions.add_parser("shards", help="write a data source as webdataset tar shards")
    shards.add_argument("source", help="a data source name (dalle components data)")
    shards.add_argument("out", help="the output directory")
    shards.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="a data source param (repeatable)")
    shards.add_argument("--max-per-shard", type=count(1, 10**7), default=1000, help="samples per tar file (default 1000)")
    add_common(shards, device=False)
    shards.set_defaults(func=cmd_data_shards)
    encode = actions.add_parser("encode", help="pre-encode a run's image tokens (every rank its share under torchrun)")
    encode.add_argument("run", help="run directory or recipe")
    add_common(encode)
    encode.set_defaults(func=cmd_data_encode)

    p = sub.add_parser("convert", help="convert released weights or vocabularies (OpenAI's dVAE, a VQGAN, ruDALL-E, min-dalle) for recipes")
    p.add_argument("component", help="a registered component of any kind that has a converter (the error lists them)")
    p.add_argument("files_and_out", nargs="+", metavar="FILE... OUT", help="the released files, then the output directory")
    p.add_argument("--trust-pickle", action="store_true", help="allow reading pickles (only for files you trust)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a component param the files do not hold (e.g. heads=16), over what they say (repeatable)")
    p.set_defaults(func=cmd_convert)


def cmd_inspect(args) -> int:
    from ..footprint import inspect_recipe
    from ..recipe import load_recipe

    ref, overrides = one_recipe(args, "dalle inspect RECIPE [key.path=value ...] [--gpus N --nodes M]")
    print_json(inspect_recipe(load_recipe(ref, overrides), gpus_per_node=args.gpus, nodes=args.nodes))
    return 0


def _source_from_args(name: str, params: list[str]):
    from pydantic import ValidationError

    from ..plugins import get_plugin_manager

    values = params_from_args(params)
    registry = get_plugin_manager().registry("data")
    try:
        return registry.build({"name": name, "params": values})
    except ValidationError as exc:
        raise UsageError(f"data source {name!r} params: {validation_problems(exc)}") from None


def cmd_data_shards(args) -> int:
    from ..data.shards import write_shards

    source = _source_from_args(args.source, args.param)
    print_json(write_shards(source, args.out, max_per_shard=args.max_per_shard, progress=not args.quiet))
    return 0


def cmd_data_encode(args) -> int:
    """Whatever each stage precomputes before training (the prior's image tokens); under torchrun every
    rank encodes its share, and shards already encoded are kept."""
    from .. import distributed
    from ..rundir import command_line, locked
    from ..train.loop import join_run

    pipe = pipeline_for(args.run, [], args.device)
    join_run(pipe)
    with locked(pipe.run_dir, command_line()):
        made = {name: stage.prepare() for name, stage in pipe.stages.items()}
    if distributed.is_main():
        print_json({"run": str(pipe.run_dir), "prepared": {k: v for k, v in made.items() if v}})
    return 0


def cmd_convert(args) -> int:
    """Released files -> OUT/model.safetensors (or a vocabulary) + <kind>.yaml + conversion.json, by the component's converter."""
    if len(args.files_and_out) < 2:
        raise UsageError("dalle convert COMPONENT FILE [FILE ...] OUT [--trust-pickle] [--param KEY=VALUE ...]")
    *files, out = map(Path, args.files_and_out)
    cls = _converter(args.component)
    print_json(cls.convert_released(files, out, trust_pickle=args.trust_pickle, params=params_from_args(args.param)))
    return 0


def _converter(name: str) -> type:
    """The registered class called ``name`` that converts released files, whatever kind it is."""
    import difflib

    from ..plugins import KINDS, get_plugin_manager

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
