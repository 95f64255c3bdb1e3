"""Training: ``dalle train``, ``dalle run`` (train, generate, evaluate) and ``dalle tokenizer train``."""

from __future__ import annotations

import json
import sys
from typing import Optional

from ..errors import UsageError
from .common import RECIPE_HELP, add_common, count, one_recipe, pipeline_for, print_json


def add_parsers(sub) -> None:
    p = sub.add_parser("train", help="train stages of a recipe into its run directory")
    p.add_argument("recipe_and_overrides", nargs="+", metavar="RECIPE [key.path=value ...]", help=RECIPE_HELP)
    p.add_argument("--stage", default="all", help="one stage of the recipe (codec, prior, reranker, ...) or all (default)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted stage from its last checkpoint")
    p.add_argument("--force", action="store_true", help="retrain even what is trained, start over an interrupted stage, "
                   "and accept a recipe whose components differ from the run directory's")
    add_common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("run", help="the main job: train (reusing what is trained, resuming what was interrupted), generate a grid, evaluate")
    p.add_argument("recipe_and_overrides", nargs="+", metavar="RECIPE [key.path=value ...]", help=RECIPE_HELP)
    p.add_argument("--force", action="store_true", help="retrain every stage and accept a recipe whose components differ from the run's")
    add_common(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("tokenizer", help="fit a tokenizer that learns from captions (bpe) into the run directory")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=type(p))
    train = actions.add_parser("train", help="fit on the training captions of the recipe's data")
    train.add_argument("recipe_and_overrides", nargs="+", metavar="RECIPE [key.path=value ...]", help=RECIPE_HELP)
    train.add_argument("--vocab-size", type=count(2, 2**20), help="vocabulary size (sets tokenizer.params.vocab_size)")
    train.add_argument("--force", action="store_true", help="accept a recipe whose components differ from the run directory's")
    train.set_defaults(func=cmd_tokenizer_train)


def _stages(pipe, wanted: Optional[str]) -> Optional[list[str]]:
    if wanted in (None, "all"):
        return None
    pipe.stage(wanted)  # an unknown stage is a clear error naming the recipe's stages
    return [wanted]


def cmd_train(args) -> int:
    from .. import distributed
    from ..train.loop import train_all

    ref, overrides = one_recipe(args, "dalle train RECIPE [key.path=value ...] [--stage STAGE] [--resume] [--force]")
    pipe = pipeline_for(ref, overrides, args.device)
    results = train_all(pipe, _stages(pipe, args.stage), resume=args.resume, force=args.force, progress=not args.quiet)  # holds the run's lock
    if distributed.is_main():
        print_json({"run": str(pipe.run_dir), "stages": results})
    return 0


def cmd_run(args) -> int:
    """The main job: train every stage (reusing what is trained), generate, evaluate."""
    from .. import distributed
    from ..data.images import save_captioned_grid
    from ..evaluation import evaluate_run
    from ..rundir import command_line, locked, write_text
    from ..train.loop import train_all

    ref, overrides = one_recipe(args, "dalle run RECIPE [key.path=value ...]")
    pipe = pipeline_for(ref, overrides, args.device)
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


def cmd_tokenizer_train(args) -> int:
    from ..rundir import command_line, locked
    from ..train.loop import claim_run_dir

    ref, overrides = one_recipe(args, "dalle tokenizer train RECIPE [--vocab-size N] [key.path=value ...]")
    if args.vocab_size is not None:
        overrides.append(f"tokenizer.params.vocab_size={args.vocab_size}")
    pipe = pipeline_for(ref, overrides, None)
    with locked(pipe.run_dir, command_line()):
        claim_run_dir(pipe, force=args.force)
        fitted = pipe.fit_tokenizer(force=True)
    if fitted is None:
        raise UsageError(f"the {pipe.recipe.tokenizer.name!r} tokenizer learns nothing from data; nothing to train (a `bpe` tokenizer does)")
    from ..captions import SAMPLE, caption_report, format_report

    fitted["text"] = caption_report(pipe.tokenizer, {s: pipe.caption_sample(s, SAMPLE) for s in ("train", "heldout")})
    print(format_report(fitted["text"]), file=sys.stderr)
    print_json(fitted)
    return 0
