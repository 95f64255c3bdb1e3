"""``dalle compare RUN_A RUN_B ...``: one table of the figures evaluation reports share, with intervals.

Two figures are compared only when they were measured the same way. The generation
section's pinned settings (captions, rounds, candidates, reference set, interval method)
must agree between reports; a stage figure must rest on as many held-out images; a
distribution figure must use the same feature network (its description, weights digest
included). Anything else is refused with exit 2 naming each difference;
``--only-comparable`` instead leaves out the figures on differing networks and says which.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import rundir
from .errors import UsageError

GENERATION = "generation"


def load_report(ref: str) -> tuple[str, dict[str, Any]]:
    """A report from a JSON file, or ``<run>/eval/report.json`` of a run directory; returns ``(label, report)``."""
    path = Path(ref)
    if path.is_dir():
        path = path / "eval" / "report.json"
        if not path.is_file():
            raise UsageError(f"{ref}: no eval/report.json yet; run `dalle evaluate {ref}` first")
    report = rundir.read_json(path)
    if not isinstance(report, dict) or not any(isinstance(v, dict) and "figures" in v for v in report.values()):
        raise UsageError(f"{path}: not a report with figures (written by `dalle evaluate` of this version); evaluate the run again")
    return ref, report


def figures(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every figure of a report as ``{"section.name": figure}``."""
    return {f"{section}.{name}": figure for section, value in report.items() if isinstance(value, dict)
            for name, figure in value.get("figures", {}).items()}


def _pinned(report: dict[str, Any]) -> dict[str, Any]:
    return report.get(GENERATION, {}).get("settings", {}).get("pinned", {})


def _network(report: dict[str, Any], name: str) -> dict[str, Any]:
    described = report.get(GENERATION, {}).get("settings", {}).get("features", {}).get(name, {})
    return {k: v for k, v in described.items() if k not in ("file", "stage")}  # where it lives may differ; what it is may not


def _differences(path: str, values: list[Any], labels: list[str]) -> list[str]:
    if all(v == values[0] for v in values):
        return []
    if all(isinstance(v, dict) for v in values):
        keys = sorted({k for v in values for k in v})
        return [line for k in keys for line in _differences(f"{path}.{k}", [v.get(k) for v in values], labels)]
    return [f"{path}: " + ", ".join(f"{json.dumps(v)} in {label}" for v, label in zip(values, labels))]


def compare_reports(reports: list[tuple[str, dict[str, Any]]], *, only_comparable: bool = False) -> dict[str, Any]:
    """The figures every report has, side by side; raises :class:`UsageError` on mismatched settings."""
    if len(reports) < 2:
        raise UsageError("dalle compare needs at least two runs or reports")
    labels = [label for label, _ in reports]
    tables = [figures(report) for _, report in reports]
    shared = [name for name in tables[0] if all(name in table for table in tables[1:])]
    problems = []
    if any(name.startswith(f"{GENERATION}.") for name in shared):
        problems += _differences(f"{GENERATION}.settings.pinned", [_pinned(r) for _, r in reports], labels)
    dropped: dict[str, list[str]] = {}
    for name in shared:
        counts = [table[name].get("n") for table in tables]
        problems += _differences(f"{name} (images or draws behind it)", counts, labels)
        network = tables[0][name].get("network")
        if network:
            found = _differences(f"feature network {network!r}", [_network(r, network) for _, r in reports], labels)
            if found and only_comparable:
                dropped.setdefault(network, found)
            else:
                problems += found
    if problems:
        raise UsageError(
            "these reports were measured differently, so their figures are not compared:\n  "
            + "\n  ".join(dict.fromkeys(problems))
            + "\nevaluate them with the same evaluate settings (and, for figures on a run's own reranker, "
            "pass --only-comparable to leave those out)"
        )
    rows = [name for name in shared if tables[0][name].get("network") not in dropped]
    return {
        "runs": labels,
        "rows": {name: [table[name] for table in tables] for name in rows},
        "dropped_networks": {network: lines for network, lines in dropped.items()},
        "recorded": [r.get(GENERATION, {}).get("settings", {}).get("recorded") for _, r in reports],
    }


def _cell(figure: dict[str, Any]) -> str:
    value, low, high = figure.get("value"), figure.get("low"), figure.get("high")
    if value is None:
        return "-"
    interval = "" if low is None or high is None else f" [{low:.4g}, {high:.4g}]"
    return f"{value:.4g}{interval}"


def format_comparison(result: dict[str, Any]) -> str:
    """A plain text table: one row per figure, one column per run, each ``value [low, high]``."""
    header = ["figure", *result["runs"]]
    lines = [[name, *map(_cell, cells)] for name, cells in result["rows"].items()]
    if not lines:
        return "(no figure is shared by all reports)"
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]

    def render(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    levels = {figure.get("level") for cells in result["rows"].values() for figure in cells}
    methods = sorted({figure.get("method") for cells in result["rows"].values() for figure in cells if figure.get("method")})
    title = f"intervals: {', '.join(f'{100 * level:g}%' for level in levels if level)} ({', '.join(methods)})"
    out = [title, render(header), render(["-" * w for w in widths]), *map(render, lines)]
    for network, found in result["dropped_networks"].items():
        out.append(f"left out: figures on {network!r}, which differs: {'; '.join(found)}")
    return "\n".join(out)
