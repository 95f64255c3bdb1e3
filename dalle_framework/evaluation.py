"""Evaluation of a trained run: codec, prior, reranker and generated images.

Every number is measured on the data source's held-out split. Caption
faithfulness needs a source whose truth is known (``DataSource.judge``): the
oracle judges colour, shape and position from pixels, without any model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import torch

from .interfaces import Sampling
from .metrics import codebook_usage
from .pipeline import Pipeline, _fit


@torch.no_grad()
def codec_metrics(codec, images: torch.Tensor, *, batch_size: int = 64, device: torch.device | str = "cpu") -> dict[str, float]:
    """Hard-token reconstruction of uint8 ``images[N,3,H,W]``.

    ``mse`` and ``psnr`` (mean of per-image PSNR in dB, pixels in [0,1]) come from
    argmax codes decoded; ``psnr_of_mean_mse`` is the stricter split-level figure
    ``10 log10(1 / mse)``. ``codebook_usage`` is the share of codes used at least
    once and ``perplexity`` the exponentiated entropy of the code histogram.
    """
    mse_sum, psnr_sum, n = 0.0, 0.0, 0
    codes: list[torch.Tensor] = []
    for start in range(0, len(images), batch_size):
        batch = _fit(images[start : start + batch_size].to(device).float() / 255.0, codec.image_size)
        tokens = codec.encode(batch)
        recon = codec.decode(tokens).clamp(0, 1)
        per_image = (recon - batch).pow(2).flatten(1).mean(1)
        mse_sum += float(per_image.sum())
        psnr_sum += float((10 * torch.log10(1.0 / per_image.clamp_min(1e-10))).sum())
        n += len(batch)
        codes.append(tokens.cpu())
    usage = codebook_usage(torch.cat(codes), codec.vocab_size)
    return {
        "mse": mse_sum / max(n, 1),
        "psnr": psnr_sum / max(n, 1),
        "psnr_of_mean_mse": 10 * math.log10(1.0 / max(mse_sum / max(n, 1), 1e-10)),
        "images": n,
        "codebook_usage": usage["usage"],
        "perplexity": usage["perplexity"],
    }


def judge_rates(verdicts: dict[str, list[bool]]) -> dict[str, float]:
    return {key: sum(map(bool, values)) / max(len(values), 1) for key, values in verdicts.items()}


def _rates_by(groups: list[str], verdicts: list[bool]) -> dict[str, float]:
    """Share of True per group, groups in first-seen order."""
    counts: dict[str, list[int]] = {}
    for group, ok in zip(groups, verdicts):
        count = counts.setdefault(group, [0, 0])
        count[0] += bool(ok)
        count[1] += 1
    return {group: right / total for group, (right, total) in counts.items()}


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
        captions, candidates=candidates, keep=min(keep, candidates), sampling=sampling, seed=seed, progress=progress
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
        per_caption: dict[str, list[bool]] = {}
        for caption, ok in zip(captions, after["all"]):
            per_caption.setdefault(caption, []).append(bool(ok))
        out["per_caption_after"] = {c: f"{sum(v)}/{len(v)}" for c, v in per_caption.items()}
        if ceiling:
            real = ceiling.get("per_caption", {})
            out["judge_ceiling"] = {k: v for k, v in ceiling.items() if k != "per_caption"}
            out["relative_to_ceiling"] = {
                "before_rerank": out["faithfulness_before_rerank"]["all"] / ceiling["all"],
                "after_rerank": out["faithfulness_after_rerank"]["all"] / ceiling["all"],
            }
        # per caption: one unreranked sample, the best of N, and the judge on real images of that caption
        before_by_caption = _rates_by(flat_captions, before["all"])
        after_by_caption = _rates_by(captions, after["all"])
        out["per_caption"] = {
            c: {"before_rerank": round(before_by_caption[c], 4), "after_rerank": round(after_by_caption[c], 4)}
            | ({"judge_on_real": real.get(c)} if ceiling else {})
            for c in before_by_caption
        }
    if grid_path is not None:
        from .data.images import save_grid

        save_grid(result.images.flatten(0, 1), grid_path, nrow=result.images.shape[1])
        out["grid"] = str(grid_path)
    return out


def evaluate_run(pipe: Pipeline, stages: Optional[list[str]] = None, *, progress: bool = True) -> dict[str, Any]:
    """The JSON that ``dalle evaluate`` prints; grids are written under ``<run>/eval``."""
    from .data.images import save_grid
    from .train.stages import load_images, make_stage

    cfg = pipe.recipe.evaluate
    eval_dir = pipe.run_dir / "eval"
    report: dict[str, Any] = {"run": str(pipe.run_dir), "recipe": pipe.recipe.name}
    wanted = stages or ["codec", "prior", "reranker", "generation"]
    limit = cfg.batches * cfg.batch_size
    device = pipe.device

    if "codec" in wanted and pipe.has_weights("codec"):
        images, _ = load_images(pipe, "heldout")
        report["codec"] = codec_metrics(pipe.codec, images[:limit], batch_size=cfg.batch_size, device=device)
        sample = _fit(images[:8].to(device).float() / 255.0, pipe.codec.image_size)
        recon = pipe.codec.decode(pipe.codec.encode(sample)).clamp(0, 1)
        report["codec"]["grid"] = str(save_grid(torch.cat([sample, recon]).cpu(), eval_dir / "codec.png", nrow=len(sample)))
    if "prior" in wanted and pipe.recipe.prior is not None and pipe.has_weights("prior"):
        metrics = make_stage(pipe, "prior").evaluate(pipe.prior, device, limit=limit)
        report["prior"] = {k: metrics[k] for k in ("bits_per_image_token", "image_loss", "text_loss", "loss") if k in metrics}
    if "reranker" in wanted and pipe.reranker is not None:
        metrics = make_stage(pipe, "reranker").extra_metrics(pipe.reranker, device, limit)
        report["reranker"] = metrics
    if "generation" in wanted and pipe.recipe.prior is not None and pipe.has_weights("prior"):
        captions = pipe.data.captions("heldout")[: cfg.captions]
        report["generation"] = generation_metrics(
            pipe,
            captions * cfg.rounds,
            candidates=cfg.candidates,
            seed=pipe.recipe.seed,
            grid_path=eval_dir / "generated.png",
            progress=progress,
            ceiling=pipe.data.prepare_judge(pipe.run_dir / "judge"),
        )
    return _finite(report)


def _finite(value: Any) -> Any:
    """JSON has no NaN: replace non-finite floats by None."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
