"""Sweeps of sampling settings, judged by the data source's oracle.

Every setting draws for the same held-out captions with the same seed as
``dalle evaluate`` (the recipe's ``evaluate`` block), so the row with the
recipe's own settings repeats the evaluation's generation figures::

    dalle evaluate runs/fashion-demo --sweep guidance_scale=1,2,3,4 --sweep top_k=null,32

prints a table and writes the JSON to ``<run>/eval/sweep.json``.
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Any, Optional

import yaml
from pydantic import ValidationError

from .errors import UsageError, validation_problems
from .evaluation import GENERATION, evaluate_run
from .interfaces import Prior, Sampling
from .pipeline import Pipeline


def parse_axes(items: list[str]) -> dict[str, list[Any]]:
    """``["guidance_scale=1,2", "top_k=null,32"]`` -> ``{"guidance_scale": [1, 2], "top_k": [None, 32]}``.

    Values are read as YAML (``null`` is None). Keys must be fields of :class:`Sampling`.
    """
    fields = [name for name in Sampling.model_fields]
    axes: dict[str, list[Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not raw.strip():
            raise UsageError(f"--sweep {item!r} must look like KEY=V1,V2 (e.g. guidance_scale=1,2,3)")
        if key not in fields:
            raise UsageError(f"--sweep {key}: not a sampling setting; choose from {', '.join(fields)}")
        if key in axes:
            raise UsageError(f"--sweep {key} is given twice; list all its values once: {key}=V1,V2")
        try:
            axes[key] = [yaml.safe_load(value) for value in raw.split(",")]
        except yaml.YAMLError as exc:
            raise UsageError(f"--sweep {item!r}: cannot read the values ({exc})") from None
    return axes


MAX_SETTINGS = 1000  # each setting is a whole generation pass; beyond this a sweep is a typo, not a plan


def settings(axes: dict[str, list[Any]], base: Sampling) -> list[Sampling]:
    """Every combination of the axes' values on top of ``base``, last axis varying fastest."""
    total = math.prod(len(values) for values in axes.values())
    if total > MAX_SETTINGS:
        sizes = " x ".join(f"{len(v)} {k}" for k, v in axes.items())
        raise UsageError(f"--sweep: {sizes} is {total} settings, more than {MAX_SETTINGS}; sweep fewer values (one axis at a time)")
    out = []
    for values in itertools.product(*axes.values()):
        changed = dict(zip(axes, values))
        try:
            out.append(base.with_changes(changed))
        except ValidationError as exc:
            raise UsageError(f"--sweep {changed}: {validation_problems(exc)}") from None
    return out


SWEPT_METRICS = ["faithfulness", "reranker-score"]
ROW_KEYS = ("faithfulness_before_rerank", "faithfulness_after_rerank", "relative_to_ceiling", "reranker_score_all",
            "reranker_score_kept")


def sweep_sampling(pipe: Pipeline, items: list[str], *, progress: bool = False) -> dict[str, Any]:
    """Generate and judge held-out captions under each sampling setting of the ``--sweep`` items.

    Returns ``{"run", "captions", "rounds", "candidates", "seed", "judge_ceiling", "rows"}``;
    each row holds the swept settings (``sampling``), faithfulness before and after
    reranking with their intervals, their share of the judge's ceiling, the reranker's
    score, whether it is within noise of the best row (:func:`mark_within_noise`) and the
    seconds it took.
    """
    axes = parse_axes(items)
    cfg = pipe.recipe.evaluate
    prior = pipe.role(Prior)
    if prior is None or not pipe.has_weights(prior):
        raise UsageError(f"{pipe.run_dir}: nothing to sample from yet; run `dalle train {pipe.run_dir}/recipe.yaml` first")
    captions = pipe.data.captions("heldout")[: cfg.captions]
    rows = []
    ceiling = None
    for sampling in settings(axes, pipe.recipe.generate.sampling):
        started = time.monotonic()
        metrics = evaluate_run(pipe, [GENERATION], metrics=SWEPT_METRICS, sampling=sampling, progress=progress)[GENERATION]
        ceiling = metrics.get("judge_ceiling", ceiling)
        row = {"sampling": {key: getattr(sampling, key) for key in axes}, "seconds": round(time.monotonic() - started, 1)}
        for key in ROW_KEYS:
            for name in (key, f"{key}_interval"):
                if name in metrics:
                    row[name] = metrics[name]
        rows.append(row)
    mark_within_noise(rows)
    return {
        "run": str(pipe.run_dir),
        "captions": len(captions),
        "rounds": cfg.rounds,
        "candidates": cfg.candidates,
        "seed": pipe.recipe.seed if cfg.seed is None else cfg.seed,
        "interval_level": cfg.interval.level,
        "base_sampling": pipe.recipe.generate.sampling.model_dump(),
        "judge_ceiling": None if ceiling is None else ceiling["all"],
        "rows": rows,
    }


def mark_within_noise(rows: list[dict[str, Any]]) -> None:
    """Mark each row whose jointly-correct rate is within noise of the best row's: their intervals overlap.

    Sets ``row["within_noise_of_best"] = {"before_rerank": bool, "after_rerank": bool}`` (rows
    without faithfulness are left alone). Settings so marked are not told apart by this many judgements.
    """
    for when in ("before_rerank", "after_rerank"):
        key = f"faithfulness_{when}"
        judged = [row for row in rows if key in row and f"{key}_interval" in row]
        if not judged:
            continue
        best = max(judged, key=lambda row: row[key]["all"])
        best_low = best[f"{key}_interval"]["all"][0]
        for row in judged:
            row.setdefault("within_noise_of_best", {})[when] = row[f"{key}_interval"]["all"][1] >= best_low


def _percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _with_interval(row: dict[str, Any], when: str) -> str:
    """``"94.1 (92.0-95.8)*"``: the jointly-correct rate, its interval, and a star when within noise of the best."""
    value = row.get(f"faithfulness_{when}", {}).get("all")
    if value is None:
        return "-"
    low, high = row.get(f"faithfulness_{when}_interval", {}).get("all", (None, None))
    star = "*" if row.get("within_noise_of_best", {}).get(when) else ""
    return f"{_percent(value)} ({_percent(low)}-{_percent(high)}){star}"


def _setting(value: Any) -> str:
    """A swept value as it would be typed: ``null``, ``2`` for 2.0, ``0.95``."""
    if value is None:
        return "null"
    return f"{value:g}" if isinstance(value, float) else str(value)


def format_table(result: dict[str, Any]) -> str:
    """The sweep as a plain text table: one row per setting, rates in percent."""
    rows = result["rows"]
    if not rows:
        return "(no settings)"
    axes = list(rows[0]["sampling"])
    attributes = [k for k in rows[0].get("faithfulness_before_rerank", {}) if k != "all"]
    n = result["candidates"]
    header = [*axes, *(f"unreranked {k}" for k in attributes), "unreranked all", f"best of {n} all"]
    if result.get("judge_ceiling"):
        header += ["unreranked / ceiling", f"best of {n} / ceiling"]
    header += ["reranker"]  # seconds stay in the JSON: they depend on the machine's load
    lines = []
    for row in rows:
        before = row.get("faithfulness_before_rerank", {})
        cells = [_setting(row["sampling"][a]) for a in axes]
        cells += [_percent(before.get(k)) for k in attributes]
        cells += [_with_interval(row, "before_rerank"), _with_interval(row, "after_rerank")]
        if result.get("judge_ceiling"):
            relative = row.get("relative_to_ceiling", {})
            cells += [_percent(relative.get("before_rerank")), _percent(relative.get("after_rerank"))]
        score = row.get("reranker_score_all")
        cells += ["-" if score is None else f"{score:.3f}"]
        lines.append(cells)
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]

    def render(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) for c, w in zip(cells, widths)).rstrip()

    level = round(100 * result.get("interval_level", 0.95))
    title = (
        f"{result['run']}: {result['captions']} held-out captions x {result['rounds']} rounds x {n} candidates, "
        f"seed {result['seed']}; rates in %, jointly correct with its {level}% Wilson interval, "
        "* = within noise of the best (intervals overlap)"
    )
    if result.get("judge_ceiling"):
        title += f"; judge ceiling {_percent(result['judge_ceiling'])}% on real held-out images"
    return "\n".join([title, render(header), render(["-" * w for w in widths]), *map(render, lines)])
