"""Evaluation of a trained run: every figure is a registered :class:`Metric`.

``dalle evaluate`` builds the metrics the recipe's ``evaluate.metrics`` (or ``--metrics``)
names, or every registered default metric that applies to the run. Stage metrics wrap
what each stage reports on the held-out split (:meth:`Stage.report`). Generation metrics
share one set of candidates drawn for held-out captions (:func:`draw`): ``captions x rounds``
units, each ``candidates`` images reranked to its best, drawn in chunks whose seeds depend
on the chunk alone, so that under ``torchrun`` each rank draws a share and the gathered
result equals one process's. While drawing, only the judge's verdicts, the reranker's
scores and the feature vectors the metrics need are kept, with the best candidates of
each unit: memory is bounded by those, not by the images drawn.

Every figure carries a confidence interval (Wilson for rates, a percentile bootstrap over
captions' draws and real images for scores), and the generation section records the
settings a figure depends on (``settings``); ``dalle compare`` refuses to compare
reports whose settings differ.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from . import distributed, rundir
from .config import ComponentBlock
from .errors import UsageError
from .interfaces import FeatureNetwork, Figure, Metric, Prior, Sampling
from .metrics import bootstrap_interval, wilson_interval
from .pipeline import Pipeline

GENERATION = "generation"  # the report section that is not a stage
REFERENCE_DIR = "reference"  # under <run>/eval: cached features of real images
CACHE_VERSION = 1  # bump when what a cached reference holds changes
log = logging.getLogger(__name__)


def judge_rates(verdicts: dict[str, list[bool]]) -> dict[str, float]:
    return {key: sum(map(bool, values)) / max(len(values), 1) for key, values in verdicts.items()}


# ----------------------------------------------------------------------------- drawing


@dataclass
class Draws:
    """Candidates drawn for held-out captions: ``U`` units (one caption's draw in one round), ``N`` candidates each.

    Unit ``u`` is caption ``captions[u]`` (round ``u // distinct captions``). Per candidate:
    ``scores[U, N]`` (NaN without a reranker), ``verdicts[key][U, N]`` (empty without a judge)
    and ``features[network][U, N, D]``; per unit the reranked best: ``best_scores[U]``,
    ``best_verdicts[key][U]``, ``best_features[network][U, D]``. ``grid`` holds the best
    ``keep`` images of the first round's units, ``grid_scores`` their scores.
    """

    captions: list[str]
    scores: torch.Tensor
    best_scores: torch.Tensor
    verdicts: dict[str, torch.Tensor] = field(default_factory=dict)
    best_verdicts: dict[str, torch.Tensor] = field(default_factory=dict)
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    best_features: dict[str, torch.Tensor] = field(default_factory=dict)
    grid: Optional[torch.Tensor] = None
    grid_scores: Optional[torch.Tensor] = None

    @property
    def units(self) -> int:
        return len(self.captions)

    @property
    def candidates(self) -> int:
        return self.scores.shape[1]


def chunk_seed(seed: int, chunk: int) -> int:
    """The seed of one chunk of units: fixed by the evaluation's seed and the chunk alone, whoever draws it."""
    return (seed * 1_000_003 + chunk) % 2**63


def _units_per_chunk(pipe: Pipeline, candidates: int) -> int:
    """Units drawn together: as many as fill one generation batch (at least one)."""
    return max(1, pipe.recipe.generate.batch_size // candidates)


class _Collector:
    """Gathers what each decoded batch of one chunk yields: verdicts, features; rows in (unit, candidate) order."""

    def __init__(self, pipe: Pipeline, captions: list[str], networks: dict[str, FeatureNetwork]) -> None:
        self.pipe, self.captions, self.networks = pipe, captions, networks
        self.rows: list[torch.Tensor] = []  # (unit within the chunk, candidate) of each row, per batch
        self.verdicts: dict[str, list[torch.Tensor]] = {}
        self.features: dict[str, list[torch.Tensor]] = {name: [] for name in networks}

    def __call__(self, caption: torch.Tensor, number: torch.Tensor, images: torch.Tensor, scores: torch.Tensor) -> None:
        self.rows.append(torch.stack([caption.cpu(), number.cpu()], 1))  # (unit within the chunk, candidate)
        verdict = self.pipe.data.judge(images.detach().cpu(), [self.captions[c] for c in caption.tolist()])
        for key, values in _checked_verdict(self.pipe.data, verdict, len(images)).items():
            self.verdicts.setdefault(key, []).append(torch.tensor(values, dtype=torch.bool))
        for name, network in self.networks.items():
            self.features[name].append(network.features(images).float().cpu())

    def grid(self, units: int, candidates: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Verdicts ``[units, N]`` and features ``[units, N, D]`` in candidate order."""
        index = torch.cat(self.rows)
        order = (index[:, 0] * candidates + index[:, 1]).argsort()
        verdicts = {k: torch.cat(v)[order].view(units, candidates) for k, v in self.verdicts.items()}
        features = {k: torch.cat(v)[order].view(units, candidates, -1) for k, v in self.features.items()}
        return verdicts, features


def _checked_verdict(source, verdict: Any, images: int) -> dict[str, list[bool]]:
    """A judge's verdicts as the contract says (one bool per image per attribute), with ``all``, the
    caption met in every attribute, added where the judge leaves it out."""
    if verdict is None:
        return {}
    where = f"data source {getattr(source, 'name', type(source).__name__)!r}: judge()"
    if not isinstance(verdict, dict) or not verdict:
        raise UsageError(f"{where} must return {{attribute: [bool per image]}} or None, got {type(verdict).__name__}")
    for key, values in verdict.items():
        if not isinstance(key, str) or len(values) != images:
            raise UsageError(f"{where}: {key!r} must hold one verdict per image ({images}), got {len(values)}")
    if "all" not in verdict:
        verdict = {**verdict, "all": [all(row) for row in zip(*verdict.values())]}
    return {key: [bool(v) for v in values] for key, values in verdict.items()}


def _draw_chunk(pipe, captions, *, candidates, keep, sampling, seed, networks) -> dict[str, Any]:
    """One chunk of units drawn and measured: a flat dict of tensors with the units as first dimension.

    The best of a unit is judged and measured as the candidate it was (``Generation.best``), not again.
    """
    collect = _Collector(pipe, captions, networks)
    result = pipe.generate(captions, candidates=candidates, keep=keep, sampling=sampling, seed=seed, on_batch=collect)
    verdicts, features = collect.grid(len(captions), candidates)
    units, best = torch.arange(len(captions)), result.best[:, 0]  # which candidate each unit kept first
    part: dict[str, Any] = {
        "scores": result.candidate_scores.float(),
        "best_scores": result.scores[:, 0].float(),
        "kept": result.images.mul(255).round().to(torch.uint8),  # for the grid; a quarter of the floats' memory
        "kept_scores": result.scores.float(),
    }
    for key, values in verdicts.items():
        part[f"verdicts.{key}"], part[f"best_verdicts.{key}"] = values, values[units, best]
    for name, values in features.items():
        part[f"features.{name}"], part[f"best_features.{name}"] = values, values[units, best]
    return part


def draw(
    pipe: Pipeline,
    captions: list[str],
    *,
    rounds: int,
    candidates: int,
    seed: int,
    sampling: Optional[Sampling] = None,
    networks: Optional[dict[str, FeatureNetwork]] = None,
    keep: int = 4,
    progress: bool = True,
) -> Optional[Draws]:
    """Draw ``candidates`` images for each of ``captions x rounds`` units and measure them as they come.

    Under ``torchrun`` each rank draws every ``world_size``-th chunk and the parts are gathered;
    rank 0 returns the whole :class:`Draws` (the same as one process draws), other ranks None.
    """
    from .progress import progress_bar

    networks = networks or {}
    units = [caption for _ in range(rounds) for caption in captions]
    per_chunk = _units_per_chunk(pipe, candidates)
    chunks = [list(range(start, min(start + per_chunk, len(units)))) for start in range(0, len(units), per_chunk)]
    rank, world = distributed.rank(), distributed.world_size()
    mine = list(range(rank, len(chunks), world))
    keep = min(keep, candidates)
    parts: list[dict[str, Any]] = []
    bar = progress_bar(total=sum(len(chunks[c]) for c in mine), desc=f"evaluate (rank {rank} of {world})" if world > 1 else "evaluate",
                       unit="caption", enabled=progress and distributed.is_main(), leave=False)
    for c in mine:
        part = _draw_chunk(pipe, [units[u] for u in chunks[c]], candidates=candidates, keep=keep, sampling=sampling,
                           seed=chunk_seed(seed, c), networks=networks)
        part["unit"] = torch.tensor(chunks[c])
        parts.append(part)
        bar.update(len(chunks[c]))
    bar.close()
    return _gathered(parts, units, len(captions))


def _gathered(parts: list[dict[str, Any]], units: list[str], first_round: int) -> Optional[Draws]:
    """The ranks' parts as one :class:`Draws` in unit order on rank 0 (None elsewhere)."""
    local = {key: torch.cat([part[key] for part in parts]) for key in parts[0]} if parts else {}
    # a rank that drew no chunk (more ranks than chunks) sends empty rows of rank 0's shapes
    shapes = distributed.broadcast_object({key: (tuple(value.shape[1:]), value.dtype) for key, value in local.items()})
    merged = {
        key: distributed.gather_rows(local[key] if key in local else torch.zeros((0, *shape), dtype=dtype))
        for key, (shape, dtype) in shapes.items()
    }
    if not distributed.is_main():
        return None
    order = merged["unit"].argsort()
    merged = {key: value[order] for key, value in merged.items()}

    def by_prefix(prefix: str) -> dict[str, torch.Tensor]:
        return {key[len(prefix) :]: value for key, value in merged.items() if key.startswith(prefix)}

    return Draws(
        captions=units,
        scores=merged["scores"],
        best_scores=merged["best_scores"],
        verdicts=by_prefix("verdicts."),
        best_verdicts=by_prefix("best_verdicts."),
        features=by_prefix("features."),
        best_features=by_prefix("best_features."),
        grid=merged["kept"][:first_round].float() / 255,
        grid_scores=merged["kept_scores"][:first_round],
    )


# ----------------------------------------------------------------------------- the evaluation a metric sees


class Evaluation:
    """What every metric of one ``dalle evaluate`` reads: the run, the draws, features of real images, intervals.

    ``draws`` is None until generation metrics ask for candidates; ``network(name)`` builds
    an ``evaluate.features`` entry once; ``reference(name)`` / ``floor(name, count)`` are
    features of real images, cached under ``<run>/eval/reference`` per split and network.
    """

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe = pipe
        self.cfg = pipe.recipe.evaluate
        self.seed = pipe.recipe.seed if self.cfg.seed is None else self.cfg.seed
        self.sampling: Optional[Sampling] = None  # None: the recipe's generate.sampling
        self.draws: Optional[Draws] = None
        self.networks_used: list[str] = []
        self.ceiling: Optional[dict] = None
        self.skipped: dict[str, str] = {}  # figure -> why it was not measured (a network this run lacks, say)
        self._networks: dict[str, FeatureNetwork] = {}

    # ------------------------------------------------------------------ feature networks

    def network(self, name: str) -> FeatureNetwork:
        if name not in self._networks:
            blocks = self.cfg.features
            if name not in blocks:
                raise UsageError(f"feature network {name!r} is not in evaluate.features (it has {', '.join(blocks) or 'none'}); add it there")
            self._networks[name] = self.pipe.manager.registry("features").build(blocks[name], pipe=self.pipe)
        return self._networks[name]

    def available_networks(self, wanted: Optional[list[str]], figure: str) -> list[str]:
        """``wanted`` (each must be able to run), or every configured network that can; the others are noted as skipped."""
        names = wanted if wanted is not None else list(self.cfg.features)
        usable = []
        for name in names:
            reason = self.network(name).unavailable()
            if reason is None:
                usable.append(name)
            elif wanted is not None:
                raise UsageError(f"{figure}: feature network {name!r} cannot run on {self.pipe.run_dir}: {reason}")
            else:
                self.skipped[f"{figure}.{name}"] = reason
        return usable

    def describe_network(self, name: str) -> dict[str, Any]:
        return {"component": self.cfg.features[name].name, **self.network(name).describe()}

    # ------------------------------------------------------------------ real images

    def reference(self, name: str) -> torch.Tensor:
        """Features ``[R, D]`` of the reference split's real images (``evaluate.reference``)."""
        ref = self.cfg.reference
        return self._real_features(name, ref.split, count=ref.images, shuffle=False)

    def floor(self, name: str, count: int) -> torch.Tensor:
        """Features of ``count`` real images of the floor split (a seeded random subset), as many as were generated."""
        return self._real_features(name, self.cfg.reference.floor, count=count, shuffle=True)

    def _real_features(self, name: str, split: str, *, count: Optional[int], shuffle: bool) -> torch.Tensor:
        images, _ = self.pipe.split(split)
        total = len(images)
        count = total if count is None else min(count, total)
        index = torch.arange(total)
        if shuffle:
            index = torch.randperm(total, generator=torch.Generator().manual_seed(self.cfg.interval.seed))
        index = index[:count]
        key = {
            "version": CACHE_VERSION,
            "split": split,
            "images": count,
            "of": total,
            "selection": f"random, seed {self.cfg.interval.seed}" if shuffle else "first",
            "data": self.pipe.recipe.block_dump("data"),
            "network": self.describe_network(name),
        }
        path = reference_path(self.pipe.run_dir, split, name, key)
        cached = read_reference(path, key, count)
        if cached is not None:
            return cached
        network = self.network(name)
        batch = 256
        features = torch.cat([network.features(images[index[i : i + batch]].float() / 255).float().cpu() for i in range(0, count, batch)])
        rundir.save_weights(path, {"features": features}, metadata={"key": json.dumps(key, sort_keys=True)})
        return features

    # ------------------------------------------------------------------ intervals

    def rate(self, successes: int, trials: int) -> Figure:
        """A share with its Wilson interval."""
        low, high = wilson_interval(successes, trials, self.cfg.interval.level)
        return Figure(successes / trials if trials else None, low, high, "wilson", trials, self.cfg.interval.level)

    def bootstrap(
        self, value: float, statistic: Callable[..., float], *sizes: int, network: Optional[str] = None, recentre: bool = False
    ) -> Figure:
        """``value`` with a percentile bootstrap interval of ``statistic`` over groups of ``sizes`` (see :func:`bootstrap_interval`).

        ``recentre`` moves the interval so that the bootstrap's median sits on ``value``: for
        figures that resampling itself biases (FD and KID grow when a resample repeats images).
        """
        cfg = self.cfg.interval
        low, high = bootstrap_interval(statistic, *sizes, resamples=cfg.resamples, level=cfg.level, seed=cfg.seed,
                                       centre=value if recentre else None)
        method = "bootstrap, recentred" if recentre else "bootstrap"
        return Figure(value, _finite(low), _finite(high), method, sizes[0], cfg.level, network)

    # ------------------------------------------------------------------ settings

    def settings(self, metrics: list[str], networks: list[str]) -> dict[str, Any]:
        """What the generation figures depend on: ``pinned`` ones must match for two reports to be compared."""
        cfg = self.cfg
        data = json.dumps(self.pipe.recipe.block_dump("data"), sort_keys=True)
        total = len(self.pipe.split(cfg.reference.split)[0])
        used = total if cfg.reference.images is None else min(cfg.reference.images, total)
        pinned = {
            "captions": len(self.draws.captions) // cfg.rounds if self.draws else None,
            "rounds": cfg.rounds,
            "candidates": cfg.candidates,
            "generated_images": self.draws.units * self.draws.candidates if self.draws else None,
            "reference": {**cfg.reference.model_dump(), "images_used": used, "data_sha256": hashlib.sha256(data.encode()).hexdigest()},
            "interval": cfg.interval.model_dump(),
        }
        return {
            "pinned": pinned,
            "features": {name: self.describe_network(name) for name in networks},
            "recorded": {
                "seed": self.seed,
                "sampling": (self.sampling or self.pipe.recipe.generate.sampling).model_dump(),
                "world_size": distributed.world_size(),
                "metrics": metrics,
            },
        }


def _finite(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None


def reference_path(run_dir: Path, split: str, network: str, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(run_dir) / "eval" / REFERENCE_DIR / f"{split}-{network}-{digest}.safetensors"


def read_reference(path: Path, key: dict[str, Any], count: int) -> Optional[torch.Tensor]:
    """Cached features when the file's recorded key is ``key`` and its contents look right; else None (recompute)."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            recorded = json.loads((f.metadata() or {}).get("key", "null"))
            features = f.get_tensor("features") if recorded == json.loads(json.dumps(key, sort_keys=True)) else None
    except Exception as exc:  # a damaged or foreign file is recomputed, never trusted
        log.warning("%s cannot be read (%s); computing the reference features again", path, exc)
        return None
    if features is None:
        log.warning("%s was made with other settings; computing the reference features again", path)
        return None
    if features.ndim != 2 or len(features) != count or not features.isfinite().all():
        log.warning("%s does not hold %d finite feature rows; computing them again", path, count)
        return None
    return features.float()


# ----------------------------------------------------------------------------- choosing and running metrics


def metric_blocks(pipe: Pipeline, names: Optional[list[str]] = None) -> list[ComponentBlock]:
    """The metrics to measure: ``names`` (with the recipe's params where it lists them), the recipe's
    ``evaluate.metrics``, or every registered default metric."""
    registry = pipe.manager.registry("metric")
    configured = {block.name: block for block in pipe.recipe.evaluate.metrics or []}
    if names is not None:
        unknown = [name for name in names if name not in registry]
        if unknown:
            raise UsageError(f"--metrics: {registry.unknown_message(unknown[0])}")
        return [configured.get(name) or ComponentBlock(name=name) for name in names]
    if pipe.recipe.evaluate.metrics is not None:
        return list(pipe.recipe.evaluate.metrics)
    return [ComponentBlock(name=name) for name, cls in registry.in_order() if cls.default]


def sections(pipe: Pipeline) -> list[str]:
    """What ``dalle evaluate`` can report for this recipe: its stages, then generation."""
    return [*pipe.stages, GENERATION]


def evaluate_run(
    pipe: Pipeline,
    wanted: Optional[list[str]] = None,
    *,
    metrics: Optional[list[str]] = None,
    sampling: Optional[Sampling] = None,
    progress: bool = True,
) -> Optional[dict[str, Any]]:
    """The JSON that ``dalle evaluate`` prints (None on ranks other than 0); grids go under ``<run>/eval``.

    ``wanted`` keeps only those report sections (stage names, ``generation``); ``metrics``
    names the metrics to measure (default: the recipe's, else every default one);
    ``sampling`` replaces the recipe's for the draws (the sweep).
    """
    wanted = wanted or sections(pipe)
    registry = pipe.manager.registry("metric")
    chosen: list[Metric] = [registry.build(block) for block in metric_blocks(pipe, metrics)]
    chosen = [m for m in chosen if m.applies(pipe) and set(m.sections(pipe)) & set(wanted)]
    prior = pipe.role(Prior)
    if metrics is None and (prior is None or not pipe.has_weights(prior)):  # nothing to draw from yet: stage reports only
        chosen = [m for m in chosen if not m.generation]
    evaluation = Evaluation(pipe)
    evaluation.sampling = sampling
    generative = [m for m in chosen if m.generation]
    if generative:
        prepare_generation(evaluation, generative, progress=progress)
    if not distributed.is_main():
        return None
    report: dict[str, Any] = {"run": str(pipe.run_dir), "recipe": pipe.recipe.name}
    for metric in chosen:
        measured = metric.measure(evaluation)
        for section, values in measured.sections.items():
            report.setdefault(section, {}).update(values)
        for section, figures in measured.figures.items():
            listed = report.setdefault(section, {}).setdefault("figures", {})
            listed.update({name: figure.as_dict() for name, figure in figures.items()})
    if generative:
        report[GENERATION].update(_generation_record(evaluation, [m.name for m in chosen]))
    known = ("run", "recipe", *sections(pipe))  # a plugin's metric may add a section of its own: it comes last
    ordered = {key: report[key] for key in known if key in report} | {k: v for k, v in report.items() if k not in known}
    return finite(ordered)


def prepare_generation(evaluation: Evaluation, metrics: list[Metric], *, progress: bool) -> None:
    """Draw the candidates every generation metric shares (on every rank), with the features they need."""
    pipe, cfg = evaluation.pipe, evaluation.cfg
    prior = pipe.role(Prior)
    if prior is None or not pipe.has_weights(prior):
        raise UsageError(f"{pipe.run_dir}: nothing to sample from yet; run `dalle train {pipe.run_dir}/recipe.yaml` first")
    if distributed.is_main():  # a learned judge is trained (and cached) once, then loaded by the other ranks
        evaluation.ceiling = pipe.data.prepare_judge(pipe.run_dir / "judge")
    distributed.barrier()
    if not distributed.is_main():
        pipe.data.prepare_judge(pipe.run_dir / "judge")
    names = list(dict.fromkeys(name for metric in metrics for name in metric.feature_networks(evaluation)))
    captions = pipe.data.captions("heldout")[: cfg.captions]
    evaluation.draws = draw(
        pipe, captions, rounds=cfg.rounds, candidates=cfg.candidates, seed=evaluation.seed,
        sampling=evaluation.sampling, networks={name: evaluation.network(name) for name in names}, progress=progress,
    )
    evaluation.networks_used = names


def _generation_record(evaluation: Evaluation, metrics: list[str]) -> dict[str, Any]:
    """The generation section's common keys: counts, the grid of the first round, the settings."""
    from .data.images import save_captioned_grid

    draws = evaluation.draws
    out: dict[str, Any] = {"captions": draws.units, "candidates": draws.candidates}
    grid_path = evaluation.pipe.run_dir / "eval" / "generated.png"
    save_captioned_grid(draws.grid, draws.captions[: len(draws.grid)], grid_path, scores=draws.grid_scores)
    out["grid"] = str(grid_path)
    if evaluation.skipped:
        out["skipped"] = dict(evaluation.skipped)
    out["settings"] = evaluation.settings(metrics, evaluation.networks_used)
    return out


def finite(value: Any) -> Any:
    """JSON has no NaN: replace non-finite floats by None."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
