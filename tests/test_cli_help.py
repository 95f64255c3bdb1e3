"""Every option and positional of every `dalle` subcommand says what it is for."""

from __future__ import annotations

import argparse

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
