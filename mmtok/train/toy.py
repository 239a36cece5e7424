"""A toy task that proves the engine: a small CNN (or MLP) classifying Fashion-MNIST shard samples.

Fashion-MNIST: Xiao, Rasul and Vollgraf, "Fashion-MNIST: a Novel Image Dataset for Benchmarking
Machine Learning Algorithms", arXiv:1708.07747 (reference: github.com/zalandoresearch/fashion-mnist).
The CNN is the classic two conv + pool layers and a linear head (LeNet-like); a few hundred steps on
CPU reach ~85% test accuracy. Dropout is on by default so that resume tests exercise the RNG state.

It is registered as task ``toy_classifier``; ``mmtok train --config configs/toy/fmnist_classifier.yaml``
trains it on shards from ``mmtok shards fashion-mnist``. ``export`` writes the whole task in hub format
(``config.json`` + ``model.safetensors``), so ``hub.from_pretrained(run/"export")`` rebuilds it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from mmtok.hub import HubMixin
from mmtok.registries import TASKS
from mmtok.train.task import Task


@dataclass
class ToyClassifierConfig:
    arch: str = "cnn"  # cnn | mlp
    width: int = 32  # channels of the first conv (cnn) or hidden size / 4 (mlp)
    num_classes: int = 10
    in_channels: int = 1  # images with another channel count are converted (RGB -> gray or gray -> RGB)
    image_size: int = 28  # images are resized to this square size
    dropout: float = 0.1
    label_smoothing: float = 0.0


class ToyImageTransform:
    """Per-sample map: ``image`` [C, H, W] in [0, 1] -> [in_channels, S, S] in [-1, 1], plus the int label.

    A class rather than a closure so that DataLoader workers can pickle it under any start method.
    """

    def __init__(self, in_channels: int, image_size: int):
        self.in_channels = in_channels
        self.image_size = image_size

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        if "image" not in sample or "label" not in sample:
            raise KeyError(
                f"toy_classifier needs samples with an image and a label; sample {sample.get('__key__')!r} "
                f"has {sorted(sample)}. Build shards with `mmtok shards fashion-mnist`."
            )
        img = torch.as_tensor(sample["image"], dtype=torch.float32)
        if img.ndim == 2:
            img = rearrange(img, "h w -> 1 h w")
        if img.shape[0] != self.in_channels:
            img = img.mean(0, keepdim=True) if self.in_channels == 1 else repeat(img[:1], "1 h w -> c h w", c=3)
        if img.shape[-2:] != (self.image_size, self.image_size):
            img = F.interpolate(img[None], size=(self.image_size,) * 2, mode="bilinear", antialias=True)[0]
        return {"image": img * 2.0 - 1.0, "label": int(sample["label"])}


@TASKS.register("toy_classifier", config=ToyClassifierConfig, help="small CNN/MLP classifier (Fashion-MNIST)")
class ToyClassifier(Task, HubMixin):
    """Image classifier task: ``{"image": [B, C, S, S], "label": [B]} -> {"loss", "accuracy"}``."""

    hub_kind = "task"

    def __init__(self, config: ToyClassifierConfig):
        super().__init__()
        if config.arch not in ("cnn", "mlp"):
            raise ValueError(f"toy_classifier arch must be 'cnn' or 'mlp', not {config.arch!r}")
        if config.arch == "cnn" and config.image_size % 4:
            raise ValueError(f"toy_classifier cnn needs image_size divisible by 4, got {config.image_size}")
        self.config = config
        c, w, s = config.in_channels, config.width, config.image_size
        if config.arch == "cnn":
            self.net = nn.Sequential(
                nn.Conv2d(c, w, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),  # [B, w, S/2, S/2]
                nn.Conv2d(w, 2 * w, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),  # [B, 2w, S/4, S/4]
                nn.Flatten(),
                nn.Dropout(config.dropout),
                nn.Linear(2 * w * (s // 4) ** 2, config.num_classes),
            )
        else:
            self.net = nn.Sequential(
                nn.Flatten(),
                nn.Linear(c * s * s, 4 * w),
                nn.ReLU(),
                nn.Dropout(config.dropout),
                nn.Linear(4 * w, config.num_classes),
            )

    def sample_transform(self, split: str) -> ToyImageTransform:
        return ToyImageTransform(self.config.in_channels, self.config.image_size)

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {
            "image": torch.stack([s["image"] for s in samples]),
            "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        }

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self.net(batch["image"]).float()  # [B, K]; fp32 for the loss under bf16 autocast
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=self.config.label_smoothing)
        accuracy = (logits.argmax(-1) == batch["label"]).float().mean()
        return {"loss": loss, "accuracy": accuracy}

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Accuracy and mean cross-entropy over every sample (not a mean of batch means)."""
        correct = loss_sum = 0.0
        n = 0
        for batch in batches:
            logits = self.net(batch["image"]).float()
            loss_sum += float(F.cross_entropy(logits, batch["label"], reduction="sum"))
            correct += float((logits.argmax(-1) == batch["label"]).sum())
            n += int(batch["label"].numel())
        if n == 0:
            return {}
        return {"accuracy": correct / n, "loss": loss_sum / n}

    def export(self, out_dir: str | Path) -> None:
        self.save_pretrained(out_dir)

    def synthetic_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        c, s = self.config.in_channels, self.config.image_size
        return {
            "image": torch.rand(batch_size, c, s, s) * 2 - 1,
            "label": torch.randint(0, self.config.num_classes, (batch_size,)),
        }
