"""Every option and positional of every `dalle` subcommand says what it is for."""

from __future__ import annotations

import argparse
import json
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


HEAVY = ("torch", "numpy", "deepspeed", "open_clip", "torchvision", "peft")


def test_commands_that_build_no_model_load_no_model_code():
    """Listing recipes, plugins and components, showing one, and checking every shipped recipe import no
    torch: the built-in plugins register their classes by where they live (benchmarks/cli_startup.py
    measures the time and memory). A custom CLIP config is built once on the meta device to check it
    (here, in this process); later checks of the same config remember that it builds."""
    from dalle_framework.recipe import load_recipe

    recipes = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
    for name in recipes:
        load_recipe(name)
    code = (
        "import contextlib, io, json, sys\n"
        "from dalle_framework.cli import main\n"
        f"recipes = {recipes!r}\n"
        "commands = [['recipes', 'ls'], ['recipes', 'validate', *recipes], ['recipes', 'show', '--resolved', 'shapes-demo'],\n"
        "            ['plugins', '--json'], ['components'], ['components', 'codec', 'gumbel-dvae', '--json'],\n"
        "            ['components', 'stage', 'codec'], ['components', 'prior', 'sparse-transformer']]\n"
        "codes = []\n"
        "for command in commands:\n"
        "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "        codes.append(main(command))\n"
        "    if command[:2] == ['plugins', '--json']:\n"
        "        plugins = json.loads(out.getvalue())['plugins']\n"
        f"print(json.dumps({{'codes': codes, 'errors': {{p['name']: p['error'] for p in plugins if p['error']}},\n"
        f"                  'loaded': sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})}}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["codes"] == [0] * 8 and result["errors"] == {}, result
    assert result["loaded"] == [], result["loaded"][:20]


def test_generate_has_an_option_for_every_sampling_setting():
    """`dalle generate`'s sampling options are made from Sampling's fields: each has one, described by its
    field, and a value reaches the settings checked with the field's bounds."""
    import pytest

    from dalle_framework import Sampling, UsageError
    from dalle_framework.commands.generation import NOT_OPTIONS, sampling_flag, sampling_from_args

    generate = build_parser().commands.choices["generate"]
    helps = {flag: action.help for action in generate._actions for flag in action.option_strings}
    for name, field in Sampling.model_fields.items():
        if name not in NOT_OPTIONS:
            assert field.description in helps[sampling_flag(name)], name
    args = ["generate", "runs/x", "--top-k", "7", "--guidance", "2", "--no-cache", "--decode", "eager", "--top-p", "0.5"]
    chosen = sampling_from_args(build_parser().parse_args(args), Sampling(temperature=0.7))
    assert (chosen.top_k, chosen.guidance_scale, chosen.use_cache, chosen.decode, chosen.top_p, chosen.temperature) == (
        7, 2.0, False, "eager", 0.5, 0.7)
    with pytest.raises(UsageError, match="--top-k: Input should be greater than or equal to 1"):
        sampling_from_args(build_parser().parse_args(["generate", "runs/x", "--top-k", "0"]), Sampling())
