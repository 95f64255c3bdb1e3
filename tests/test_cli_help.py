"""Every option and positional of every `dalle` subcommand says what it is for."""

from __future__ import annotations

import argparse
import subprocess
import sys

from conftest import ROOT
from dalle_framework.cli import build_parser


def actions(parser: argparse.ArgumentParser, prog: str = "dalle"):
    """(command path, action) for every action of the parser tree, subcommands included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from actions(sub, f"{prog} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield prog, action


def test_every_cli_action_has_help_text():
    found = list(actions(build_parser()))
    missing = [f"{prog} {'/'.join(a.option_strings) or a.dest}" for prog, a in found if not (a.help or "").strip()]
    assert not missing, f"options without help text: {missing}"
    commands = {prog for prog, _ in found}
    assert {"dalle train", "dalle generate", "dalle serve", "dalle evaluate"} <= commands


def test_help_of_every_command_loads_no_model_code():
    """`dalle --help` and each `dalle COMMAND --help` start without torch (tenths of a second, not seconds;
    benchmarks/cli_startup.py measures it)."""
    code = (
        "import contextlib, io, sys\n"
        "from dalle_framework.cli import build_parser, main\n"
        "commands = [[]] + [[name] for name in build_parser()._subparsers._group_actions[0].choices]\n"
        "for command in commands:\n"
        "    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
        "        main([*command, '--help'])\n"
        "    assert 'usage: dalle' in out.getvalue(), command\n"
        "print(len(commands), sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'PIL', 'deepspeed')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    count, loaded = done.stdout.split(" ", 1)
    assert int(count) >= 13 and loaded.strip() == "[]", done.stdout
