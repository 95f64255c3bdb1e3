"""Feature networks a run has of its own: its reranker's image tower and its data source's judge."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from dalle_framework import FeatureNetwork, Reranker, rundir

from .params import RerankerFeaturesParams


class RerankerFeatures(FeatureNetwork):
    """The run's trained reranker's image embedding (``Reranker.image_features``), e.g. CLIP's image tower."""

    Params = RerankerFeaturesParams

    def _stage(self) -> Optional[str]:
        return self.params.stage or self.pipe.role(Reranker)

    def _file(self) -> Optional[Path]:
        stage = self._stage()
        if stage is None:
            return None
        trained = self.pipe.run_dir / stage / rundir.WEIGHTS_FILE
        weights = self.pipe.stage(stage).block.weights
        return trained if trained.is_file() else (Path(weights) if weights else None)

    def unavailable(self) -> Optional[str]:
        stage = self._stage()
        if stage is None:
            return "the recipe has no reranker"
        if self._file() is None:
            return f"the {stage} is not trained"
        if type(self.pipe.component(stage)).image_features is Reranker.image_features:
            return f"the {stage}'s component has no image tower (Reranker.image_features)"
        return None

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        reranker = self.pipe.component(self._stage())
        return reranker.image_features(images.to(self.pipe.device)).float().cpu()

    def describe(self) -> dict[str, Any]:
        reranker = self.pipe.component(self._stage())
        size = getattr(reranker, "image_size", None)
        filter_ = getattr(getattr(reranker, "params", None), "interpolation", None)
        return {
            "stage": self._stage(),
            "file": str(self._file()),
            "sha256": rundir.sha256_file(self._file()),
            "resize": {"filter": filter_, "size": list(size) if size else None, "by": "the reranker's own preprocessing"},
        }


class JudgeFeatures(FeatureNetwork):
    """What the data source's judge reads from an image (``DataSource.judge_features``): a learned judge's last hidden layer.

    The evaluation prepares the judge (``DataSource.prepare_judge`` on the run's ``judge/``) before any network runs.
    """

    def unavailable(self) -> Optional[str]:
        size = getattr(self.pipe.data, "image_size", 8)
        if self.pipe.data.judge_features(torch.zeros(1, 3, size, size)) is None:
            return f"the {self.pipe.recipe.data.name} data source has no judge features"
        return None

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.pipe.data.judge_features(images.detach().cpu()).float()

    def describe(self) -> dict[str, Any]:
        return {"source": self.pipe.recipe.data.name, **self.pipe.data.judge_identity()}
