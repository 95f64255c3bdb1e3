"""Measuring runs: ``dalle evaluate`` (held-out metrics, sampling sweeps) and ``dalle compare``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from ..errors import UsageError
from .common import add_common, one_recipe, output_file, pipeline_for, print_json


def add_parsers(sub) -> None:
    p = sub.add_parser("evaluate", help="print held-out metrics of a trained run as JSON, each with its interval")
    p.add_argument("recipe_and_overrides", nargs="+", metavar="RUN [key.path=value ...]",
                   help="run directory (or a recipe whose run directory is trained), then overrides of its recipe "
                   "(e.g. evaluate.rounds=8 evaluate.features.inception.name=inception-v3)")
    p.add_argument("--stage", default="all", help="one stage of the run, generation, or all (default)")
    p.add_argument("--metrics", help="comma-separated metrics to measure (default: the recipe's evaluate.metrics, "
                   "else every default one); `dalle components metric` lists them")
    p.add_argument("--out", type=output_file, help="also write the JSON here")
    p.add_argument(
        "--sweep",
        action="append",
        metavar="KEY=V1,V2",
        help="judge generation under each sampling setting (repeatable: all combinations); prints a table, "
        "writes the JSON to --out or <run>/eval/sweep.json. E.g. --sweep guidance_scale=1,2,3 --sweep top_k=null,32",
    )
    add_common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("compare", help="one table of the figures several runs' reports share, with intervals")
    p.add_argument("runs", nargs="+", metavar="RUN_OR_REPORT", help="run directories (their eval/report.json) or report JSON files")
    p.add_argument("--only-comparable", action="store_true",
                   help="leave out figures on feature networks that differ between the runs (each run's own reranker) instead of refusing")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_compare)


def _metric_names(text: Optional[str]) -> Optional[list[str]]:
    if text is None:
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise UsageError("--metrics: give metric names separated by commas, e.g. --metrics faithfulness,fd,kid (`dalle components metric`)")
    return names


def cmd_evaluate(args) -> int:
    from .. import distributed
    from ..evaluation import evaluate_run, sections
    from ..rundir import command_line, locked, write_text

    ref, overrides = one_recipe(args, "dalle evaluate RUN [key.path=value ...] [--metrics a,b] [--stage S] [--out FILE]")
    device = args.device
    if distributed.world_size() > 1:  # under torchrun: every rank draws a share of the candidates
        if args.sweep:
            raise UsageError("--sweep runs in one process; start it without torchrun")
        distributed.init_distributed()
        device = device or str(distributed.default_device())
    pipe = pipeline_for(ref, overrides, device)
    wanted = None
    if args.sweep and args.stage not in (None, "all", "generation"):
        raise UsageError(f"--sweep judges generation only; drop --stage {args.stage}")
    if args.stage not in (None, "all"):
        if args.stage not in sections(pipe):
            raise UsageError(f"--stage {args.stage!r}: choose one of {', '.join(sections(pipe))} or all")
        wanted = [args.stage]
    with locked(pipe.run_dir, command_line()):
        if args.sweep:
            from ..sweep import format_table, sweep_sampling

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
    from ..compare import compare_reports, format_comparison, load_report

    result = compare_reports([load_report(ref) for ref in args.runs], only_comparable=args.only_comparable)
    if args.json:
        print_json(result)
    else:
        print(format_comparison(result))
    return 0
