"""A judge for Fashion-MNIST: a small CNN that names the class of a generated image.

It is the oracle of the ``fashion-mnist`` source, and on purpose it is no part of
the text-to-image model: it is trained only on the real training split, never on
generated images, and its accuracy on the real held-out split is the ceiling any
generator can be measured against. Training is deterministic given the seed (on
the same build and thread count) and takes under two minutes on one CPU thread; the
weights are cached as safetensors with the accuracy in the file's metadata, so
evaluating a run trains it once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalle_framework.rundir import load_weights, save_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JudgeConfig:
    """How the judge is built and trained; every field is part of the cache key."""

    image_size: int = 32  # the side the data source renders at (and the codec decodes to)
    width: int = 16  # channels of the first block, doubled at each of the next two
    hidden: int = 256  # a hidden layer before the classifier: +0.3 points for next to no time
    epochs: int = 2  # passes over the 60k training images; a third gave +0.4 points for 1.5x the time
    batch_size: int = 256  # as accurate as 128 here, and 12% less CPU time
    lr: float = 4e-3  # peak of a one-cycle schedule
    weight_decay: float = 1e-4
    max_shift: int = 0  # random translation in pixels (augmentation); 0 = off
    flip: bool = False  # mirrors (with dropout 0.2) cost 1.3 points: the data's shoes all point one way
    dropout: float = 0.0  # two epochs do not overfit
    label_smoothing: float = 0.0
    seed: int = 0
    version: int = 1  # bump when the architecture or the training recipe changes

    def cache_name(self) -> str:
        """A file name per configuration: judges trained otherwise never overwrite each other."""
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]
        return f"fashion-judge-{self.image_size}px-{digest}.safetensors"


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class JudgeNet(nn.Module):
    """Three conv blocks, each followed by 2x2 max-pooling, then a classifier (with one hidden layer when ``hidden``).

    ``grey[B, 1, S, S]`` in [0, 1] (``S`` divisible by 8) -> logits ``[B, classes]``.
    """

    def __init__(self, *, image_size: int, width: int, classes: int, hidden: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        assert image_size % 8 == 0, f"the judge pools three times: image_size must be divisible by 8, got {image_size}"
        self.features = nn.Sequential(
            _block(1, width), nn.MaxPool2d(2), _block(width, 2 * width), nn.MaxPool2d(2), _block(2 * width, 4 * width), nn.MaxPool2d(2)
        )
        features = 4 * width * (image_size // 8) ** 2
        layers: list[nn.Module] = [nn.Flatten(), nn.Dropout(dropout)]
        if hidden:
            layers += [nn.Linear(features, hidden), nn.ReLU(inplace=True)]
        self.head = nn.Sequential(*layers, nn.Linear(hidden or features, classes))

    def forward(self, grey: Tensor) -> Tensor:
        return self.head(self.features((grey - 0.5) / 0.5))

    def embed(self, grey: Tensor) -> Tensor:
        """The classifier's input ``[B, hidden]`` (the last hidden layer, after its ReLU): what the judge reads."""
        return self.head[:-1](self.features((grey - 0.5) / 0.5))


def _shifted(images: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image ``[B, 1, S, S]`` by up to ``max_shift`` pixels (zero fill: the background is black)."""
    if max_shift == 0:
        return images
    B, _, S, _ = images.shape
    padded = F.pad(images, (max_shift,) * 4)
    dx, dy = (torch.randint(0, 2 * max_shift + 1, (2, B), generator=generator)).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + S, dx[i] : dx[i] + S] for i in range(B)])


def train_judge(images: Tensor, labels: Tensor, config: JudgeConfig, classes: int) -> JudgeNet:
    """Train on uint8 ``images[N, S, S]`` with ``labels[N]``; returns the network in eval mode.

    Augmentation: small translations, and horizontal flips when ``config.flip``.
    The global RNG is left as it was.
    """
    steps = config.epochs * (len(images) // config.batch_size)
    generator = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        net = JudgeNet(image_size=config.image_size, width=config.width, classes=classes, hidden=config.hidden, dropout=config.dropout)
        optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=max(steps, 1), pct_start=0.15)
        net.train()
        order = torch.randperm(len(images), generator=generator)
        position = 0
        for _ in range(steps):
            if position + config.batch_size > len(order):
                order, position = torch.randperm(len(images), generator=generator), 0
            index = order[position : position + config.batch_size]
            position += config.batch_size
            grey = images[index, None].float() / 255.0
            if config.flip:
                mirror = torch.rand(len(grey), generator=generator) < 0.5
                grey = torch.where(mirror[:, None, None, None], grey.flip(-1), grey)
            grey = _shifted(grey, config.max_shift, generator)
            loss = F.cross_entropy(net(grey), labels[index].long(), label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return net.eval()


@torch.no_grad()
def predict(net: JudgeNet, grey: Tensor, batch_size: int = 1000) -> Tensor:
    """Class ids ``[N]`` for grey images ``[N, 1, S, S]`` in [0, 1]."""
    net.eval()
    return torch.cat([net(grey[i : i + batch_size]).argmax(1) for i in range(0, len(grey), batch_size)]) if len(grey) else torch.zeros(0, dtype=torch.long)


def accuracy(net: JudgeNet, images: Tensor, labels: Tensor, names: list[str]) -> dict:
    """On uint8 ``images[N, S, S]``: ``{"all": share correct, "per_class": {name: share}}``."""
    predicted = predict(net, images[:, None].float() / 255.0)
    labels = labels.long()
    per_class = {}
    for c, name in enumerate(names):
        mask = labels == c
        per_class[name] = round(float((predicted[mask] == c).float().mean()), 4) if mask.any() else None
    return {"all": round(float((predicted == labels).float().mean()), 4), "images": len(labels), "per_class": per_class}


def _plausible_ceiling(ceiling: object, names: list[str]) -> bool:
    """What :func:`accuracy` writes: shares in (0, 1], one per class."""
    share = lambda value: isinstance(value, (int, float)) and 0 < value <= 1  # noqa: E731
    return (
        isinstance(ceiling, dict)
        and share(ceiling.get("all"))
        and isinstance(ceiling.get("per_class"), dict)
        and set(ceiling["per_class"]) == set(names)
        and all(value is None or share(value) for value in ceiling["per_class"].values())
    )


class FashionJudge:
    """A trained :class:`JudgeNet` and its accuracy on real held-out images (the ceiling)."""

    def __init__(self, net: JudgeNet, config: JudgeConfig, ceiling: dict, path: Optional[Path] = None) -> None:
        self.net, self.config, self.ceiling, self.path = net, config, ceiling, path

    def _grey(self, images: Tensor) -> Tensor:
        """``images[B, 3, H, W]`` in [0, 1] as the judge sees them: grey (colour averaged), at its size."""
        assert images.ndim == 4 and images.shape[1] == 3, f"expected [B, 3, H, W], got {tuple(images.shape)}"
        grey = images.detach().float().cpu().clamp(0, 1).mean(1, keepdim=True)
        size = self.config.image_size
        if grey.shape[-2:] != (size, size):
            grey = F.interpolate(grey, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return grey

    @torch.no_grad()
    def classify(self, images: Tensor) -> Tensor:
        """Class ids ``[B]`` for ``images[B, 3, H, W]`` in [0, 1] (colour is averaged to grey)."""
        return predict(self.net, self._grey(images))

    @torch.no_grad()
    def features(self, images: Tensor, batch_size: int = 1000) -> Tensor:
        """The judge's last hidden layer ``[B, hidden]`` for ``images[B, 3, H, W]`` in [0, 1]."""
        self.net.eval()
        grey = self._grey(images)
        return torch.cat([self.net.embed(grey[i : i + batch_size]) for i in range(0, len(grey), batch_size)])

    def identity(self) -> dict:
        """Its settings, the cached weights file and that file's SHA-256 (None when it was not cached)."""
        from dalle_framework.rundir import sha256_file

        cached = self.path is not None and self.path.is_file()
        return {
            "config": asdict(self.config),
            "file": str(self.path) if cached else None,
            "sha256": sha256_file(self.path) if cached else None,
            "layer": f"last hidden layer ({self.config.hidden} after ReLU)",
            "resize": {"filter": "bilinear, antialiased (after averaging colour to grey)", "size": self.config.image_size},
        }

    @classmethod
    def load_or_train(
        cls,
        cache_dir: Optional[Path],
        config: JudgeConfig,
        names: list[str],
        train: tuple[Tensor, Tensor],
        heldout: tuple[Tensor, Tensor],
    ) -> "FashionJudge":
        """The cached judge in ``cache_dir`` when its config matches, else train one (and cache it there).

        ``train`` and ``heldout`` are ``(uint8 images[N, S, S], labels[N])``; they are only
        read when training. ``cache_dir=None`` trains without caching.
        """
        path = None if cache_dir is None else Path(cache_dir) / config.cache_name()
        net = JudgeNet(image_size=config.image_size, width=config.width, classes=len(names), hidden=config.hidden)
        if path is not None and path.is_file():
            from safetensors import safe_open

            try:
                with safe_open(str(path), framework="pt") as f:
                    meta = f.metadata() or {}
                if json.loads(meta.get("config", "{}")) == asdict(config):
                    ceiling = json.loads(meta["ceiling"])
                    if not _plausible_ceiling(ceiling, names):
                        raise ValueError("its recorded accuracy is not a judge's")
                    net.load_state_dict(load_weights(path))
                    return cls(net.eval(), config, ceiling, path)
                log.warning("%s was trained with other settings; training the judge again", path)
            except Exception as exc:  # a damaged or foreign cache is rebuilt, never trusted
                log.warning("%s cannot be read (%s); training the judge again", path, exc)
        started, cpu_started = time.monotonic(), time.process_time()
        net = train_judge(*train, config, len(names))
        ceiling = accuracy(net, *heldout, names)
        # wall time depends on what else runs; CPU time (all threads) does not
        ceiling["train_seconds"] = round(time.monotonic() - started, 1)
        ceiling["train_cpu_seconds"] = round(time.process_time() - cpu_started, 1)
        log.info("fashion judge: held-out accuracy %.4f after %.0f s", ceiling["all"], ceiling["train_seconds"])
        if path is not None:
            save_weights(path, net.state_dict(), metadata={"config": json.dumps(asdict(config)), "ceiling": json.dumps(ceiling)})
        return cls(net, config, ceiling, path)
