"""The ``dalle`` command line: parsing, plugins' commands, and exit codes. The commands themselves are
in :mod:`dalle_framework.commands`, one module per group.

Exit codes: 0 success, 2 usage or recipe errors (a clear message, no
traceback), 1 runtime failures (a clear message too).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from typing import NoReturn, Optional, Sequence

from . import distributed
from .errors import DalleError, UsageError, os_error

OUT_OF_MEMORY = "out of memory; use smaller batches (train.batch_size, --batch-size) or a smaller model"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 too; keep one format
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    from .commands import GROUPS

    parser = _Parser(prog="dalle", description="DALL-E style text-to-image models from plugins and recipes.",
                     epilog="Plugins may add commands: `dalle plugins` lists them.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more (INFO messages)")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, required=True, metavar="COMMAND")
    parser.commands = sub  # type: ignore[attr-defined]  # where plugins' commands are added (_add_plugin_commands)
    for group in GROUPS:
        group.add_parsers(sub)
    parser.set_defaults(builtin_commands=frozenset(sub.choices))  # the names plugins' commands cannot take
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


def run() -> NoReturn:
    """The ``dalle`` command and ``python -m dalle_framework``: :func:`main`, then exit with its code.

    A process of a multi-rank job ends with ``os._exit`` once its output is flushed. Its work is
    done and written by then (checkpoints atomically, event files closed), and the interpreter's
    teardown of gloo's threads could abort it ("terminate called without an active exception",
    SIGABRT), turning a finished run or a clear usage error into a crash without its exit code."""
    code = main()
    if distributed.is_initialized() and distributed.world_size() > 1:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # a closed pipe has nothing left to flush
                stream.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
