"""What is installed and what recipes say: ``dalle plugins``, ``dalle components``, ``dalle recipes``.

None of these builds a model, so none imports torch (the built-in plugins register their classes by
where they live; ``test_commands_that_build_no_model_load_no_model_code``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import RecipeError, UsageError
from .common import print_json, split_overrides


def add_parsers(sub) -> None:
    p = sub.add_parser("plugins", help="list loaded plugins, their components and load errors; 'plugins new' writes a new one")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_plugins)
    actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    new = actions.add_parser("new", help="write a plugin package to start from (tests, recipe, entry point)")
    new.add_argument("name", nargs="?", help="the plugin's name (lower-case letters, digits, hyphens)")
    new.add_argument("--kind", help="codec, prior, reranker, data, tokenizer or stage")
    new.add_argument("--dir", default=".", help="the folder to write the package in (default: here)")
    new.add_argument("--json", action="store_true", help="print JSON instead of a summary")
    new.set_defaults(func=cmd_plugins_new)

    p = sub.add_parser("components", help="list registered components; with KIND NAME, one component's parameters")
    p.add_argument("kind", nargs="?", help="tokenizer, codec, prior, reranker, data, engine or stage (default: all)")
    p.add_argument("name", nargs="?", help="a component of that kind: show its parameters (type, default, bounds, description)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_components)

    p = sub.add_parser("recipes", help="list, show and validate recipes")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=type(p))
    actions.add_parser("ls", help="list the recipes found (built-in, plugins', DALLE_RECIPE_PATH)").set_defaults(func=cmd_recipes_ls)
    show = actions.add_parser("show", help="print recipes as written, or --resolved")
    show.add_argument("recipes", nargs="+", metavar="RECIPE", help="recipe names or files")
    show.add_argument("--resolved", action="store_true", help="with extends, defaults and params filled in")
    show.set_defaults(func=cmd_recipes_show)
    validate = actions.add_parser("validate", help="check recipes and report every mistake, with its path and the fix")
    validate.add_argument("recipes", nargs="+", metavar="RECIPE [key.path=value ...]",
                          help="recipe names or files, then the overrides `dalle train` would apply")
    validate.set_defaults(func=cmd_recipes_validate)


def cmd_plugins(args) -> int:
    from ..plugins import get_plugin_manager

    manager = get_plugin_manager()
    builtin = args.builtin_commands
    for info in manager.plugins.values():
        taken = [f"command {name!r} is a built-in command, which keeps its name: rename the plugin's" for name in info.commands if name in builtin]
        info.warnings += [warning for warning in taken if warning not in info.warnings]
    infos = [info.as_dict() for info in manager.plugins.values()]
    if args.json:
        print_json({"plugins": infos})
        return 0
    for info in infos:
        state = "disabled" if info["disabled"] else ("ERROR" if info["error"] else "ok")
        print(f"{info['name']:<14} {info['version']:<8} {state:<8} {info['module']}")
        for kind, names in {**info["components"], **({"commands": info["commands"]} if info["commands"] else {})}.items():
            print(f"    {kind:<10} {', '.join(names)}")
        if info["error"]:
            print(f"    error: {info['error']}")
        for warning in info["warnings"]:
            print(f"    warning: {warning}")
    return 0


def cmd_plugins_new(args) -> int:
    from ..scaffold import KINDS, new_plugin

    if not args.name:
        raise UsageError(f"dalle plugins new: give the plugin's name, e.g. dalle plugins new my-codec --kind {'|'.join(KINDS)}")
    if not args.kind:
        raise UsageError(f"dalle plugins new {args.name}: --kind is required; choose one of {', '.join(KINDS)}")
    written = new_plugin(args.name, args.kind, Path(args.dir))
    if args.json:
        print_json(written)
        return 0
    print(f"wrote {written['folder']} ({written['kind']} plugin, {len(written['files'])} files)")
    for relative in written["files"]:
        print(f"    {relative}")
    print(f"next: {written['next']}")
    return 0


def cmd_components(args) -> int:
    from ..plugins import KINDS, get_plugin_manager

    manager = get_plugin_manager()
    kinds = [args.kind] if args.kind else list(KINDS)
    for kind in kinds:
        if kind not in KINDS:
            raise UsageError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    if args.name:
        return _show_component(manager.registry(args.kind), args.name, as_json=args.json)
    registries = {kind: manager.registry(kind) for kind in kinds}
    table = {
        kind: [{"name": name, "plugin": registry.plugin_of(name), "doc": registry.doc(name).partition("\n")[0]} for name in registry.names()]
        for kind, registry in registries.items()
    }
    if args.json:
        print_json(table)
        return 0
    for kind, rows in table.items():
        print(f"{kind}:")
        for row in rows:
            print(f"  {row['name']:<20} [{row['plugin']}] {row['doc']}")
    return 0


def _show_component(registry, name: str, *, as_json: bool) -> int:
    """``dalle components KIND NAME``: the component's parameters, as a recipe's ``params:`` takes them."""
    import yaml

    from ..errors import RegistryError
    from ..registry import params_table

    try:
        rows, doc, plugin = params_table(registry.params(name)), registry.doc(name), registry.plugin_of(name)
    except RegistryError as exc:
        raise UsageError(str(exc)) from None
    if as_json:
        print_json({"kind": registry.kind, "name": registry.canonical(name), "plugin": plugin, "doc": doc, "params": rows})
        return 0
    print(f"{registry.kind} {registry.canonical(name)} [{plugin}]")
    if doc:
        print("  " + "\n  ".join(line.strip() for line in doc.splitlines()))
    print("params:" if rows else "params: none")
    for row in rows:
        default = "required" if row["required"] else "default " + yaml.safe_dump(row["default"], default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
        bounds = f", {', '.join(row['bounds'])}" if row["bounds"] else ""
        print(f"  {row['name']}: {row['type']} ({default}{bounds})")
        if row["description"]:
            print(f"      {row['description']}")
    return 0


def cmd_recipes_ls(args) -> int:
    from ..recipe import list_recipes

    for name, path in list_recipes().items():
        print(f"{name:<24} {path}")
    return 0


def cmd_recipes_show(args) -> int:
    import yaml

    from ..recipe import dump, load_raw, load_recipe

    for ref in args.recipes:
        if args.resolved:
            print(dump(load_recipe(ref)), end="")
        else:
            print(yaml.safe_dump(load_raw(ref), sort_keys=False, allow_unicode=True), end="")
    return 0


def cmd_recipes_validate(args) -> int:
    """Every mistake of each recipe at once, with the overrides `dalle train` would apply."""
    from ..recipe import load_recipe

    refs, overrides = split_overrides(args.recipes)
    if not refs:
        raise UsageError("dalle recipes validate PATH [PATH ...] [key.path=value ...]")
    failures: list[RecipeError | UsageError] = []
    for ref in refs:
        try:
            load_recipe(ref, overrides)
            print(f"ok      {ref}")
        except UsageError as exc:
            failures.append(exc)
            print(f"INVALID {exc}", file=sys.stderr)
    return 2 if failures else 0
