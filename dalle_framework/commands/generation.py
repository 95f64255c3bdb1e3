"""Drawing images from a trained run: ``dalle generate`` and ``dalle serve``.

``dalle generate``'s sampling options are made from the fields of :class:`dalle_framework.Sampling`
(its one definition): a setting added there is an option here, with its description, checked with
the same bounds as in a recipe.
"""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path
from typing import Any, Literal, Optional

from ..errors import UsageError, validation_problems
from ..schema import Sampling
from .common import MAX_SEED, add_common, count, number, output_file, pipeline_for, print_json

# The option of a setting is its field name with dashes (a switch that turns a default off: --no-...);
# an older spelling is still accepted beside it.
NEGATED = {"use_cache": "--no-cache"}
OLDER_SPELLINGS = {"guidance_scale": ("--guidance",)}
NOT_OPTIONS = {"filters"}  # a list of blocks with params: the recipe's generate.sampling.filters


def sampling_flag(name: str) -> str:
    return NEGATED.get(name, "--" + name.replace("_", "-"))


def _bare(annotation: Any) -> Any:
    """``Optional[Annotated[int, ...]]`` -> ``int``: the type an option parses."""
    while True:
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if origin is typing.Annotated:
            annotation = args[0]
        elif origin is typing.Union and type(None) in args:
            annotation = next(a for a in args if a is not type(None))
        else:
            return annotation


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    """One option per :class:`Sampling` field; unset options keep the recipe's ``generate.sampling``."""
    for name, field in Sampling.model_fields.items():
        if name in NOT_OPTIONS:
            continue
        kind, flag = _bare(field.annotation), sampling_flag(name)
        flags = (flag, *OLDER_SPELLINGS.get(name, ()))
        metavar = name.upper()
        text = f"{field.description} (default: the recipe's generate.sampling.{name})"
        if kind is bool:  # an option turns the default off (or on)
            switch = "off" if field.default else "on"
            parser.add_argument(*flags, dest=name, action="store_false" if field.default else "store_true", default=None,
                                help=f"turns {switch} {name}: {field.description}")
        elif typing.get_origin(kind) is Literal:
            parser.add_argument(*flags, dest=name, choices=typing.get_args(kind), help=text)
        else:  # numbers: parsed here, bounded by the field (the same message as a recipe's)
            parser.add_argument(*flags, dest=name, type=count(-(2**63), 2**63) if kind is int else number, metavar=metavar, help=text)


def sampling_from_args(args: argparse.Namespace, defaults: Sampling) -> Sampling:
    """The recipe's sampling settings with the options given on the command line."""
    from pydantic import ValidationError

    given = {name: getattr(args, name) for name in Sampling.model_fields if getattr(args, name, None) is not None}
    try:
        return defaults.with_changes(given)
    except ValidationError as exc:
        lines = validation_problems(exc, name=lambda loc: sampling_flag(str(loc[0])) if str(loc[0]) in given else ".".join(map(str, loc)))
        raise UsageError(f"sampling options: {lines}") from None


def add_parsers(sub) -> None:
    p = sub.add_parser("generate", help="generate images for captions from a trained run")
    p.add_argument("run", help="run directory (or a recipe whose run directory is trained)")
    p.add_argument("captions", nargs="*", help="captions to draw (default: the recipe's generate.captions)")
    p.add_argument("-n", type=count(1, 100_000), default=None, help="candidates drawn per caption (default: the recipe's)")
    p.add_argument("--keep", type=count(1, 100_000), default=None, help="best candidates kept per caption after reranking")
    p.add_argument("--batch-size", type=count(1, 100_000), default=None, help="candidates sampled per forward pass (bounds memory)")
    p.add_argument("--out", type=output_file, help="PNG grid: one row per caption with its caption and scores "
                   "(default: grid.png, or none with --out-dir)")
    p.add_argument("--out-dir", type=Path, help="also one PNG per kept image, each with a JSON sidecar (caption, seed, "
                   "settings, score, rank): DIR/CAPTION-RANK.png and .json")
    add_sampling_options(p)
    p.add_argument("--seed", type=count(0, MAX_SEED), default=None, help="the same seed draws the same images (default: the recipe's seed)")
    p.add_argument("--prime", help="an image whose top token rows are kept (image priming)")
    p.add_argument("--prime-rows", type=count(0, 4096), default=0, help="how many token rows of --prime to keep")
    add_common(p)
    p.set_defaults(func=cmd_generate)

    from ..serve import Limits

    p = sub.add_parser("serve", help="a web page and JSON API over a trained run")
    p.add_argument("run", help="run directory (codec and prior trained)")
    p.add_argument("--host", type=_host, default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=count(1, 65535), default=8000, help="port to bind (default: 8000)")
    p.add_argument("--allowed-host", action="append", type=_host, default=[], metavar="NAME",
                   help="another Host name the page answers to, e.g. the name behind a proxy (repeatable); "
                   "by default only the --host address, and localhost's names when that is a loopback address")
    for name, spec in Limits.model_fields.items():
        kind = type(spec.default)
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=spec.default, help=f"{spec.description} (default: {spec.default:g})")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: the recipe's)")
    p.set_defaults(func=cmd_serve)


def cmd_generate(args) -> int:
    import torch

    from ..data.images import save_captioned_grid

    pipe = pipeline_for(args.run, [], args.device)
    captions = args.captions or pipe.recipe.generate.captions
    if not captions:
        raise UsageError("give captions: dalle generate RUN \"a red circle in the top left\" ...")
    if args.keep is not None and args.n is not None and args.keep > args.n:
        raise UsageError(f"--keep {args.keep} is more than -n {args.n} candidates")
    from ..captions import reading_notes

    for note in reading_notes(pipe.tokenizer, captions):
        print(f"note: {note}", file=sys.stderr)
    prime_images = None
    if args.prime:
        prime_images = _read_image(args.prime).unsqueeze(0)
    sampling = sampling_from_args(args, pipe.recipe.generate.sampling)
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
    print_json(printed)
    return 0


def _save_each(result, scores: list[list[Optional[float]]], directory: Path, facts: dict[str, Any]) -> list[str]:
    """One PNG per kept image, best first, each beside a JSON sidecar saying how it was made."""
    from ..data.images import save_image
    from ..rundir import write_json

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


def cmd_serve(args) -> int:
    """A web page and JSON API over a trained run (dalle_framework.serve)."""
    from pydantic import ValidationError

    from ..serve import Limits, create_app, host_name, host_names, is_loopback, listen_socket

    try:
        limits = Limits(**{name: getattr(args, name) for name in Limits.model_fields})
    except ValidationError as exc:
        lines = validation_problems(exc, name=lambda loc: "--" + "-".join(map(str, loc)).replace("_", "-"))
        raise UsageError(f"serve options: {lines}") from None
    names = host_names(args.host, args.allowed_host)
    with listen_socket(args.host, args.port) as sock:  # before the model loads: a busy port or a foreign host fails at once
        pipe = pipeline_for(args.run, [], args.device)
        pipe.check_can_generate(what=f"{args.run}: nothing to serve")
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
    from ..serve import host_name

    try:
        host_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text
