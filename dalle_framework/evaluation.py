"""Evaluation of a trained run: each stage's held-out report, then generated images.

Every number is measured on the data source's held-out split. Each stage says
what it reports (:meth:`Stage.report`); this module adds generation, whose
caption faithfulness needs a source that knows the truth
(``DataSource.judge``): an oracle that reads the image without any model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import torch

from .interfaces import Prior, Sampling
from .pipeline import Pipeline

GENERATION = "generation"  # the report section that is not a stage


def judge_rates(verdicts: dict[str, list[bool]]) -> dict[str, float]:
    return {key: sum(map(bool, values)) / max(len(values), 1) for key, values in verdicts.items()}


def _counts_by(groups: list[str], verdicts: list[bool]) -> dict[str, tuple[int, int]]:
    """``(right, total)`` per group, groups in first-seen order."""
    counts: dict[str, list[int]] = {}
    for group, ok in zip(groups, verdicts):
        count = counts.setdefault(group, [0, 0])
        count[0] += bool(ok)
        count[1] += 1
    return {group: (right, total) for group, (right, total) in counts.items()}


@torch.no_grad()
def generation_metrics(
    pipe: Pipeline,
    captions: list[str],
    *,
    candidates: int,
    seed: int = 0,
    grid_path: Optional[Path] = None,
    keep: int = 4,
    progress: bool = True,
    sampling: Optional[Sampling] = None,
    ceiling: Optional[dict] = None,
) -> dict[str, Any]:
    """Faithfulness before and after reranking, and the reranker's score of samples.

    "before" judges every candidate (the expected share for one unreranked
    sample); "after" judges the single best candidate per caption. ``sampling``
    defaults to the recipe's; ``ceiling`` is what ``DataSource.prepare_judge``
    returned (the judge's accuracy on real images), reported beside the rates.
    """
    result = pipe.generate(
        captions,
        candidates=candidates,
        keep=min(keep, candidates),
        sampling=sampling,
        seed=seed,
        progress=progress,
        keep_candidates=True,
    )
    out: dict[str, Any] = {"captions": len(captions), "candidates": candidates}
    scores = result.candidate_scores
    if not scores.isnan().all():
        out["clip_score_all"] = float(scores.mean())
        out["clip_score_kept"] = float(result.scores[:, 0].mean())
    flat = result.candidates.flatten(0, 1)
    flat_captions = [c for c in captions for _ in range(candidates)]
    before = pipe.data.judge(flat, flat_captions)
    if before is not None:
        after = pipe.data.judge(result.images[:, 0], captions)
        out["faithfulness_before_rerank"] = judge_rates(before)
        out["faithfulness_after_rerank"] = judge_rates(after)
        after_counts = _counts_by(captions, after["all"])
        out["per_caption_after"] = {c: f"{right}/{total}" for c, (right, total) in after_counts.items()}
        judged_real = bool(ceiling and ceiling.get("all"))  # a learned judge's accuracy on real images
        real = ceiling.get("per_caption", {}) if judged_real else {}
        if judged_real:
            out["judge_ceiling"] = {k: v for k, v in ceiling.items() if k != "per_caption"}
            out["relative_to_ceiling"] = {
                "before_rerank": out["faithfulness_before_rerank"]["all"] / ceiling["all"],
                "after_rerank": out["faithfulness_after_rerank"]["all"] / ceiling["all"],
            }
        # per caption: one unreranked sample, the best of N, and the judge on real images of that caption
        before_counts = _counts_by(flat_captions, before["all"])
        out["per_caption"] = {
            c: {"before_rerank": round(right / total, 4), "after_rerank": round(after_counts[c][0] / after_counts[c][1], 4)}
            | ({"judge_on_real": real.get(c)} if judged_real else {})
            for c, (right, total) in before_counts.items()
        }
    if grid_path is not None:
        from .data.images import save_captioned_grid

        save_captioned_grid(result.images, captions, grid_path, scores=result.scores)
        out["grid"] = str(grid_path)
    return out


def sections(pipe: Pipeline) -> list[str]:
    """What ``dalle evaluate`` can report for this recipe: its stages, then generation."""
    return [*pipe.stages, GENERATION]


def evaluate_run(pipe: Pipeline, wanted: Optional[list[str]] = None, *, progress: bool = True) -> dict[str, Any]:
    """The JSON that ``dalle evaluate`` prints; grids are written under ``<run>/eval``."""
    cfg = pipe.recipe.evaluate
    wanted = wanted or sections(pipe)
    report: dict[str, Any] = {"run": str(pipe.run_dir), "recipe": pipe.recipe.name}
    for name, stage in pipe.stages.items():
        if name in wanted and pipe.has_weights(name):
            report[name] = stage.report(pipe.component(name), pipe.device, cfg)
    prior = pipe.role(Prior)
    if GENERATION in wanted and prior is not None and pipe.has_weights(prior):
        captions = pipe.data.captions("heldout")[: cfg.captions]
        report[GENERATION] = generation_metrics(
            pipe,
            captions * cfg.rounds,
            candidates=cfg.candidates,
            seed=pipe.recipe.seed,
            grid_path=pipe.run_dir / "eval" / "generated.png",
            progress=progress,
            ceiling=pipe.data.prepare_judge(pipe.run_dir / "judge"),
        )
    return finite(report)


def finite(value: Any) -> Any:
    """JSON has no NaN: replace non-finite floats by None."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
