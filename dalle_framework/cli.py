"""The ``dalle`` command line.

Exit codes: 0 success, 2 usage or recipe errors (a clear message, no
traceback), 1 runtime failures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from .errors import DalleError, RecipeError, UsageError

STAGE_CHOICES = ("codec", "prior", "reranker", "all")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 too; keep one format
        raise UsageError(f"{self.prog}: {message}")


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _split_overrides(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate ``key.path=value`` overrides from positional words."""
    overrides = [i for i in items if "=" in i and not i.startswith("=")]
    return [i for i in items if i not in overrides], overrides


# ----------------------------------------------------------------------------- plugins / components


def cmd_plugins(args) -> int:
    from .plugins import get_plugin_manager

    manager = get_plugin_manager()
    infos = [info.as_dict() for info in manager.plugins.values()]
    if args.json:
        _print_json({"plugins": infos})
        return 0
    for info in infos:
        state = "disabled" if info["disabled"] else ("ERROR" if info["error"] else "ok")
        print(f"{info['name']:<14} {info['version']:<8} {state:<8} {info['module']}")
        for kind, names in info["components"].items():
            print(f"    {kind:<10} {', '.join(names)}")
        if info["error"]:
            print(f"    error: {info['error']}")
    return 0


def cmd_components(args) -> int:
    from .plugins import KINDS, get_plugin_manager

    manager = get_plugin_manager()
    kinds = [args.kind] if args.kind else list(KINDS)
    for kind in kinds:
        if kind not in KINDS:
            raise UsageError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
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

                print(yaml.safe_dump(load_raw(ref), sort_keys=False), end="")
        return 0
    # validate
    if not args.recipes:
        raise UsageError("dalle recipes validate PATH [PATH ...]")
    failures: list[RecipeError | UsageError] = []
    for ref in args.recipes:
        try:
            load_recipe(ref)
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
    return Pipeline.from_recipe(ref, overrides, device=device)


def cmd_train(args) -> int:
    from .train.loop import train_all

    words, overrides = _split_overrides(args.recipe_and_overrides)
    if len(words) != 1:
        raise UsageError("dalle train RECIPE [key.path=value ...] [--stage STAGE]")
    pipe = _pipeline_for(words[0], overrides, args.device)
    stages = None if args.stage == "all" else [args.stage]
    results = train_all(pipe, stages, resume=args.resume, force=args.force or args.stage != "all", progress=not args.quiet)
    if _is_main():
        _print_json({"run": str(pipe.run_dir), "stages": results})
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
    from pydantic import ValidationError

    try:
        return type(defaults).model_validate({**defaults.model_dump(), **overrides})
    except ValidationError as exc:
        lines = "; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in exc.errors())
        raise UsageError(f"sampling options: {lines}") from None


def cmd_generate(args) -> int:
    import torch

    from .data.images import save_grid

    pipe = _pipeline_for(args.run, [], args.device)
    captions = args.captions or pipe.recipe.generate.captions
    if not captions:
        raise UsageError("give captions: dalle generate RUN \"a red circle in the top left\" ...")
    prime_images = None
    if args.prime:
        prime_images = _read_image(args.prime).unsqueeze(0)
    result = pipe.generate(
        captions,
        candidates=args.n,
        keep=args.keep,
        sampling=_sampling(args, pipe.recipe.generate.sampling),
        seed=args.seed,
        prime_images=prime_images,
        prime_rows=args.prime_rows,
        progress=not args.quiet,
    )
    out = Path(args.out)
    save_grid(result.images.flatten(0, 1), out, nrow=result.images.shape[1])
    scores = result.scores
    _print_json(
        {
            "grid": str(out),
            "rows": [
                {"caption": c, "scores": [None if torch.isnan(s) else round(float(s), 4) for s in row]}
                for c, row in zip(captions, scores)
            ],
        }
    )
    return 0


def _read_image(path: str):
    """An image file as float ``[3,H,W]`` in [0,1]."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.functional import to_tensor

    try:
        with Image.open(path) as img:
            return to_tensor(img.convert("RGB"))
    except (OSError, UnidentifiedImageError) as exc:
        raise UsageError(f"--prime {path}: cannot read the image ({exc})") from None


def cmd_evaluate(args) -> int:
    from .evaluation import evaluate_run

    pipe = _pipeline_for(args.run, [], args.device)
    if args.sweep:
        from .checkpoint import write_text
        from .sweep import format_table, sweep_sampling

        result = sweep_sampling(pipe, args.sweep, progress=not args.quiet)
        out = Path(args.out) if args.out else pipe.run_dir / "eval" / "sweep.json"
        write_text(out, json.dumps(result, indent=2) + "\n")
        print(format_table(result))
        print(f"sweep JSON: {out}", file=sys.stderr)
        return 0
    stages = None if args.stage == "all" else [args.stage]
    report = evaluate_run(pipe, stages, progress=not args.quiet)
    text = json.dumps(report, indent=2)
    if args.out:
        from .checkpoint import write_text

        write_text(args.out, text + "\n")
    print(text)
    return 0


def cmd_run(args) -> int:
    """The main job: train every stage (reusing what is trained), generate, evaluate."""
    from .data.images import save_grid
    from .evaluation import evaluate_run
    from .train.loop import train_all

    words, overrides = _split_overrides(args.recipe_and_overrides)
    if len(words) != 1:
        raise UsageError("dalle run RECIPE [key.path=value ...]")
    pipe = _pipeline_for(words[0], overrides, args.device)
    train_all(pipe, resume=True, progress=not args.quiet)
    if not _is_main():
        return 0
    captions = pipe.recipe.generate.captions or pipe.data.captions("heldout")[:4]
    result = pipe.generate(captions, progress=not args.quiet)
    grid = save_grid(result.images.flatten(0, 1), pipe.run_dir / "samples.png", nrow=result.images.shape[1])
    print(f"samples for {len(captions)} captions: {grid}", file=sys.stderr)
    report = evaluate_run(pipe, progress=not args.quiet)
    report["samples"] = str(grid)
    from .checkpoint import write_text

    write_text(pipe.run_dir / "eval" / "report.json", json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


def cmd_inspect(args) -> int:
    from .inspect import inspect_recipe
    from .recipe import load_recipe

    words, overrides = _split_overrides(args.recipe_and_overrides)
    if len(words) != 1:
        raise UsageError("dalle inspect RECIPE [key.path=value ...] [--gpus N --nodes M]")
    _print_json(inspect_recipe(load_recipe(words[0], overrides), gpus_per_node=args.gpus, nodes=args.nodes))
    return 0


# ----------------------------------------------------------------------------- data


def _source_from_args(name: str, params: list[str]):
    import yaml

    from .plugins import get_plugin_manager

    values = {}
    for item in params:
        key, sep, raw = item.partition("=")
        if not sep:
            raise UsageError(f"--param {item!r} must look like key=value")
        values[key] = yaml.safe_load(raw)
    registry = get_plugin_manager().registry("data")
    try:
        return registry.build({"name": name, "params": values})
    except Exception as exc:
        if isinstance(exc, UsageError):
            raise
        from pydantic import ValidationError

        if isinstance(exc, ValidationError):
            lines = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise UsageError(f"data source {name!r} params: {lines}") from None
        raise


def cmd_data(args) -> int:
    if args.action == "shards":
        from .data.shards import write_shards

        source = _source_from_args(args.source, args.param)
        _print_json(write_shards(source, args.out, max_per_shard=args.max_per_shard, progress=not args.quiet))
        return 0
    # encode
    from .train.stages import encode_tokens

    pipe = _pipeline_for(args.source, [], args.device)
    counts = {split: int(len(encode_tokens(pipe, split)["image_tokens"])) for split in ("train", "heldout")}
    _print_json({"tokens": str(pipe.run_dir / "tokens"), "counts": counts})
    return 0


# ----------------------------------------------------------------------------- entry point


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dalle", description="DALL-E style text-to-image models from plugins and recipes.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, required=True)

    p = sub.add_parser("plugins", help="list loaded plugins, their components and load errors")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("components", help="list registered components")
    p.add_argument("kind", nargs="?", help="tokenizer, codec, prior, reranker, data, engine")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_components)

    p = sub.add_parser("recipes", help="list, show and validate recipes")
    p.add_argument("action", choices=("ls", "show", "validate"))
    p.add_argument("recipes", nargs="*", help="recipe names or files")
    p.add_argument("--resolved", action="store_true", help="show with extends, defaults and params filled in")
    p.set_defaults(func=cmd_recipes)

    def common(p, device=True):
        p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
        if device:
            p.add_argument("--device", help="cpu, cuda, cuda:N (default: the recipe's)")

    p = sub.add_parser("train", help="train stages of a recipe into its run directory")
    p.add_argument("recipe_and_overrides", nargs="+", metavar="RECIPE [key.path=value ...]")
    p.add_argument("--stage", choices=STAGE_CHOICES, default="all")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--force", action="store_true", help="retrain stages that are already complete")
    common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("run", help="the main job: train (reusing what is trained), generate a grid, evaluate")
    p.add_argument("recipe_and_overrides", nargs="+", metavar="RECIPE [key.path=value ...]")
    common(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("generate", help="generate images for captions from a trained run")
    p.add_argument("run", help="run directory")
    p.add_argument("captions", nargs="*")
    p.add_argument("-n", type=int, default=None, help="candidates per caption")
    p.add_argument("--keep", type=int, default=None, help="best candidates kept per caption")
    p.add_argument("--out", default="grid.png")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole prefix each step")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--prime", help="image whose top token rows are kept")
    p.add_argument("--prime-rows", type=int, default=0)
    common(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("evaluate", help="print held-out metrics of a trained run as JSON")
    p.add_argument("run")
    p.add_argument("--stage", choices=(*STAGE_CHOICES, "generation"), default="all")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument(
        "--sweep",
        action="append",
        metavar="KEY=V1,V2",
        help="judge generation under each sampling setting (repeatable: all combinations); prints a table, "
        "writes the JSON to --out or <run>/eval/sweep.json. E.g. --sweep guidance_scale=1,2,3 --sweep top_k=null,32",
    )
    common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("inspect", help="parameter count, FLOPs per token, ZeRO-3 memory, without allocating")
    p.add_argument("recipe_and_overrides", nargs="+", metavar="RECIPE [key.path=value ...]")
    p.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    p.add_argument("--nodes", type=int, default=1)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("data", help="data tools: shards from a source; pre-encode image tokens of a run")
    p.add_argument("action", choices=("shards", "encode"))
    p.add_argument("source", help="shards: data source name; encode: run directory or recipe")
    p.add_argument("out", nargs="?", help="shards: output directory")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="data source params")
    p.add_argument("--max-per-shard", type=int, default=1000)
    common(p)
    p.set_defaults(func=cmd_data)
    return parser


def _strip_launcher_args(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends ``--local_rank=N``; move it into LOCAL_RANK."""
    out: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg.startswith(("--local_rank", "--local-rank")):
            value = arg.partition("=")[2] or next(it, "0")
            os.environ.setdefault("LOCAL_RANK", value)
            continue
        out.append(arg)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(_strip_launcher_args(list(sys.argv[1:] if argv is None else argv)))
        # Overrides may also follow options: `dalle train R --stage prior prior.train.steps=10`.
        if extra and hasattr(args, "recipe_and_overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.recipe_and_overrides += extra
        elif extra:
            raise UsageError(f"dalle: unrecognized arguments: {' '.join(extra)}")
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        if getattr(args, "action", None) == "shards" and not args.out:
            raise UsageError("dalle data shards SOURCE OUT")
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except DalleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted; resume with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
