"""The built-in ``dalle`` commands, one module per group. Each module's ``add_parsers(sub)`` adds its
commands to the ``dalle`` parser, each with its ``run`` function as ``func`` (``cmd_*``); the command
line itself (parsing, exit codes, plugins' commands) is ``dalle_framework.cli``.

Adding a built-in command: a ``cmd_NAME(args) -> int`` and its parser in the group it belongs to (or a
new module listed in ``GROUPS``). A plugin adds one through ``dalle_register_commands`` instead.
Module top levels import no torch: ``dalle --help`` builds every parser.
"""

from . import catalog, evaluation, generation, tools, training

GROUPS = (catalog, training, generation, evaluation, tools)

__all__ = ["GROUPS"]
