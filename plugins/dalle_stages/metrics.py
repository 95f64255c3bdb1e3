"""The built-in metrics of ``dalle evaluate``: each stage's held-out report, and figures of generated images.

Stage metrics wrap what a stage already reports (:meth:`Stage.report`) and add intervals
where the figure is a mean over held-out images (a bootstrap over groups of them) or a
share (Wilson). Generation metrics read the candidates the evaluation drew once for all
of them (``evaluation.draws``): the judge's verdicts, the reranker's scores, and features
of the networks named in ``evaluate.features``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from dalle_framework import Figure, ImageCodec, Measurement, Metric, Prior, Reranker
from dalle_framework.data import chunks
from dalle_framework.metrics import (
    feature_statistics,
    frechet_distance,
    kernel_inception_distance,
    neighbourhood_scores,
)

from .codec import codec_metrics
from .params import DistributionParams, KidParams, PrdcParams, StageParams

GENERATION = "generation"
LN2 = math.log(2.0)
GROUPS = 64  # held-out images are resampled in this many groups (or one image each, when there are fewer)


# ----------------------------------------------------------------------------- stage reports



class StageMetric(Metric):
    """A stage's held-out report (``Stage.report``), with intervals; one per stage whose component is a ``contract``."""

    Params = StageParams
    contract: ClassVar[type] = object

    def sections(self, pipe) -> list[str]:
        if self.params.stage is not None:
            return [self.params.stage]
        fits = [name for name, spec in pipe.stages.items() if issubclass(pipe.manager.registry(spec.kind).base, self.contract)]
        return [name for name in fits if pipe.has_weights(name)]

    def applies(self, pipe) -> bool:
        if self.params.stage is not None:
            pipe.stage(self.params.stage)  # an unknown stage is an error naming the recipe's stages
        return bool(self.sections(pipe))

    def measure(self, evaluation) -> Measurement:
        pipe, cfg = evaluation.pipe, evaluation.cfg
        out = Measurement()
        for name in self.sections(pipe):
            stage, module = pipe.stage(name), pipe.component(name)
            report = stage.report(module, pipe.device, cfg)
            out.sections[name] = report
            out.figures[name] = self.intervals(evaluation, stage, module, report)
        return out

    def intervals(self, evaluation, stage, module, report: dict[str, Any]) -> dict[str, Figure]:
        return {}


def _group_size(images: int) -> int:
    return max(1, images // GROUPS)


def _group_bootstrap(evaluation, value: float, sums: torch.Tensor, sizes: torch.Tensor) -> Figure:
    """``value`` with a bootstrap interval of a mean over images, resampling groups of them (``sums`` / ``sizes`` per group)."""
    statistic = lambda index: float(sums[index].sum() / sizes[index].sum())  # noqa: E731
    return evaluation.bootstrap(value, statistic, len(sums))


class Reconstruction(StageMetric):
    """The codec's hard-token reconstruction of held-out images: PSNR, MSE, codebook usage and perplexity."""

    contract = ImageCodec

    @torch.no_grad()
    def intervals(self, evaluation, stage, module, report):
        cfg = evaluation.cfg
        images = stage.heldout(cfg.batches * cfg.batch_size)[0]
        size = _group_size(len(images))
        groups = [codec_metrics(module, [(images[i : i + size], 1.0)], device=evaluation.pipe.device) for i in range(0, len(images), size)]
        sizes = torch.tensor([g["images"] for g in groups], dtype=torch.float64)
        figures = {}
        for key in ("psnr", "mse"):
            sums = torch.tensor([g[key] for g in groups], dtype=torch.float64) * sizes
            figures[key] = _group_bootstrap(evaluation, report[key], sums, sizes)
        return figures  # usage and perplexity describe the whole set of codes: no per-group interval


class BitsPerToken(StageMetric):
    """The prior's held-out loss: bits per image token (and the loss terms in nats)."""

    contract = Prior

    @torch.no_grad()
    def intervals(self, evaluation, stage, module, report):
        if "bits_per_image_token" not in report:
            return {}
        cfg, device = evaluation.cfg, evaluation.pipe.device
        sums, sizes = [], []
        columns = stage.heldout(cfg.batches * cfg.batch_size)
        for batch in chunks(columns, _group_size(len(columns[0]))):
            losses = module(*stage.step_args(batch, stage.train.steps, device))
            sums.append(float(losses["image_loss"]) / LN2 * len(batch[0]))
            sizes.append(len(batch[0]))
        sums_t, sizes_t = torch.tensor(sums, dtype=torch.float64), torch.tensor(sizes, dtype=torch.float64)
        return {"bits_per_image_token": _group_bootstrap(evaluation, report["bits_per_image_token"], sums_t, sizes_t)}


class Retrieval(StageMetric):
    """The reranker's held-out retrieval: image->text and text->image top-1 / top-5, with Wilson intervals."""

    contract = Reranker

    def intervals(self, evaluation, stage, module, report):
        figures = {}
        for key, value in report.items():
            direction = key.removeprefix("retrieval_")[:3]
            trials = report.get("retrieval_images" if direction == "i2t" else "retrieval_captions")
            if key.startswith("retrieval_") and direction in ("i2t", "t2i") and trials:
                figures[key] = evaluation.rate(round(value * trials), int(trials))
        return figures


# ----------------------------------------------------------------------------- generation: judge and reranker


def _counts_by(groups: list[str], verdicts: list[bool]) -> dict[str, tuple[int, int]]:
    """``(right, total)`` per group, groups in first-seen order."""
    counts: dict[str, list[int]] = {}
    for group, ok in zip(groups, verdicts):
        count = counts.setdefault(group, [0, 0])
        count[0] += bool(ok)
        count[1] += 1
    return {group: (right, total) for group, (right, total) in counts.items()}


class Faithfulness(Metric):
    """Share of generated images the data source's judge finds true to their caption: one unreranked sample, and the best of N."""

    generation = True

    def measure(self, evaluation) -> Measurement:
        draws = evaluation.draws
        if not draws.verdicts:
            evaluation.skipped["faithfulness"] = "the data source has no judge"
            return Measurement()
        n = draws.candidates
        before = {key: value.flatten().tolist() for key, value in draws.verdicts.items()}
        after = {key: value.tolist() for key, value in draws.best_verdicts.items()}
        out: dict[str, Any] = {}
        figures: dict[str, Figure] = {}
        for when, verdicts in (("before_rerank", before), ("after_rerank", after)):
            rates = {key: evaluation.rate(sum(values), len(values)) for key, values in verdicts.items()}
            out[f"faithfulness_{when}"] = {key: figure.value for key, figure in rates.items()}
            out[f"faithfulness_{when}_interval"] = {key: [figure.low, figure.high] for key, figure in rates.items()}
            figures.update({f"faithfulness_{when}.{key}": figure for key, figure in rates.items()})
        flat_captions = [c for c in draws.captions for _ in range(n)]
        after_counts = _counts_by(draws.captions, after["all"])
        out["per_caption_after"] = {c: f"{right}/{total}" for c, (right, total) in after_counts.items()}
        ceiling = evaluation.ceiling
        judged_real = bool(ceiling and ceiling.get("all"))  # a learned judge's accuracy on real images
        real = ceiling.get("per_caption", {}) if judged_real else {}
        if judged_real:
            out["judge_ceiling"] = {k: v for k, v in ceiling.items() if k != "per_caption"}
            out["relative_to_ceiling"] = {
                when: out[f"faithfulness_{when}"]["all"] / ceiling["all"] for when in ("before_rerank", "after_rerank")
            }
        before_counts = _counts_by(flat_captions, before["all"])
        out["per_caption"] = {
            c: {"before_rerank": round(right / total, 4), "after_rerank": round(after_counts[c][0] / after_counts[c][1], 4)}
            | ({"judge_on_real": real.get(c)} if judged_real else {})
            for c, (right, total) in before_counts.items()
        }
        return Measurement({GENERATION: out}, {GENERATION: figures})


class RerankerScore(Metric):
    """The reranker's mean score of every candidate and of the kept best (a bootstrap over captions' draws)."""

    generation = True

    def measure(self, evaluation) -> Measurement:
        draws = evaluation.draws
        if draws.scores.isnan().all():
            evaluation.skipped["reranker_score"] = "the run has no trained reranker"
            return Measurement()
        scores, best = draws.scores.double(), draws.best_scores.double()
        figures = {
            "reranker_score_all": evaluation.bootstrap(float(scores.mean()), lambda i: float(scores[i].mean()), draws.units),
            "reranker_score_kept": evaluation.bootstrap(float(best.mean()), lambda i: float(best[i].mean()), draws.units),
        }
        out: dict[str, Any] = {}
        for key, figure in figures.items():
            out[key] = figure.value
            out[f"{key}_interval"] = [figure.low, figure.high]
        return Measurement({GENERATION: out}, {GENERATION: figures})


# ----------------------------------------------------------------------------- generation: distribution metrics



class DistributionMetric(Metric):
    """A figure comparing features of generated images with those of real held-out ones, per feature network.

    Subclasses say how (``compare``). With ``evaluate.reference.floor`` the same figure is
    also measured between that real split and the reference, with as many images as were
    generated: the value a perfect model would reach.
    """

    Params = DistributionParams
    generation = True

    def feature_networks(self, evaluation) -> list[str]:
        return evaluation.available_networks(self.params.features, self.name)

    def measure(self, evaluation) -> Measurement:
        draws = evaluation.draws
        out: dict[str, Any] = {}
        figures: dict[str, Figure] = {}
        for network in self.feature_networks(evaluation):
            fake = draws.features[network] if self.params.images == "candidates" else draws.best_features[network][:, None]
            real = evaluation.reference(network)
            least = self.least_samples()
            if min(len(real), fake.shape[0] * fake.shape[1]) < least:
                evaluation.skipped[f"{self.name}.{network}"] = (
                    f"needs at least {least} real and generated images, got {len(real)} and {fake.shape[0] * fake.shape[1]}"
                )
                continue
            sets = {"": fake}
            if evaluation.cfg.reference.floor:
                sets["_floor"] = evaluation.floor(network, fake.shape[0] * fake.shape[1])[:, None]
            for suffix, generated in sets.items():
                for key, value in self.compare(evaluation, real, generated, network).items():
                    if isinstance(value, Figure):
                        figures[f"{key}{suffix}.{network}"] = value
                        out.setdefault(f"{key}{suffix}", {})[network] = value.value
                        out.setdefault(f"{key}{suffix}_interval", {})[network] = [value.low, value.high]
                    else:
                        out.setdefault(f"{key}{suffix}", {})[network] = value
        return Measurement({GENERATION: out}, {GENERATION: figures})

    def least_samples(self) -> int:
        """Fewest real and generated images the figure is defined for."""
        return 2

    def compare(self, evaluation, real: torch.Tensor, fake: torch.Tensor, network: str) -> dict[str, Any]:
        """Figures of ``real[R, D]`` against ``fake[U, n, D]`` (``n`` images per unit, resampled together)."""
        raise NotImplementedError


class FrechetDistance(DistributionMetric):
    """Fréchet distance between Gaussians fitted to real and generated features (FID on Inception-v3)."""

    def compare(self, evaluation, real, fake, network):
        real_stats = feature_statistics(real)  # the reference is pinned, the same for every report compared: held fixed
        value = frechet_distance(*real_stats, *feature_statistics(fake.flatten(0, 1)))

        def resampled(units: torch.Tensor) -> float:
            return frechet_distance(*real_stats, *feature_statistics(fake[units].flatten(0, 1)))

        figure = evaluation.bootstrap(value, resampled, len(fake), network=network, recentre=True)
        figure.low = None if figure.low is None else max(0.0, figure.low)  # a distance is never negative
        return {"fd": figure}



class KernelInceptionDistance(DistributionMetric):
    """KID: unbiased squared MMD with a cubic polynomial kernel, averaged over random subsets; with its std over subsets."""

    Params = KidParams

    def compare(self, evaluation, real, fake, network):
        p, seed = self.params, evaluation.cfg.interval.seed
        flat = fake.flatten(0, 1)
        kid = kernel_inception_distance(real, flat, subsets=p.subsets, subset_size=p.subset_size, seed=seed)

        def resampled(units: torch.Tensor) -> float:
            again = kernel_inception_distance(real, fake[units].flatten(0, 1), subsets=p.bootstrap_subsets, subset_size=p.subset_size, seed=seed)
            return again["kid"]

        figure = evaluation.bootstrap(kid["kid"], resampled, len(fake), network=network, recentre=True)
        return {"kid": figure, "kid_std": kid["std"], "kid_subset_size": kid["subset_size"]}



class PrecisionRecall(DistributionMetric):
    """Precision and recall (k-NN manifolds) and density and coverage of generated features against real ones."""

    Params = PrdcParams

    def least_samples(self) -> int:
        return self.params.k + 1

    def compare(self, evaluation, real, fake, network):
        per_sample = neighbourhood_scores(real, fake.flatten(0, 1), k=self.params.k)
        figures = {}
        for key, values in per_sample.items():
            if key in ("precision", "density"):  # one value per generated image: resample whole draws
                grouped = values.view(len(fake), -1)
                statistic, size = (lambda i, g=grouped: float(g[i].mean())), len(fake)
            else:  # one value per real image (the generated set held fixed)
                statistic, size = (lambda i, v=values: float(v[i].mean())), len(real)
            figures[key] = evaluation.bootstrap(float(values.mean()), statistic, size, network=network)
        return figures
