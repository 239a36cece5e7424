"""``seg_tower``: dense pretraining of a vision tower on labelled scenes, before the MLLM learns to segment.

Why: an MLLM can only ground "the sneaker" if its tower's patch features say which patches show a sneaker.
LISA and Text4Seg start from towers pretrained on hundreds of millions of images (CLIP, SAM); a tower trained
from scratch through the LLM's mask losses alone never learns the classes in a CPU budget (measured on
fashion-scenes: the all-mask head's grounding stays at chance, see the README). This task gives the tower that
knowledge directly, as supervised dense pretraining does for segmentation backbones: every patch predicts the
share of its pixels that belongs to each item class (soft targets: the class histogram of the patch, background
included), with a linear head on the patch tokens of the tower's feature layer, trained with cross-entropy.

Targets come from the shards the segmentation task reads: ``instances.png`` (0 background, i = item i) and the
json's ``items`` (``class_id`` per item), as fashion-scenes writes them. The horizontal flip (optional; half of
the scenes, chosen by key) flips pixels and targets together. Evaluation reports the patch accuracy and the
foreground patch accuracy (patches whose majority is an item: chance is 1 / num_classes).

``export`` writes the tower in timm's hub layout (``config.json`` with ``architecture``, ``model_args``,
``pretrained_cfg`` mean/std, and ``mmtok.stem``; ``model.safetensors``), which the ``timm_vit`` tower loads with
``checkpoint: <folder>``; the linear head is not exported.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import reduce
from torch import nn

from mmtok.registries import TASKS, VISION_TOWERS
from mmtok.train.task import Task

logger = logging.getLogger(__name__)


def _default_tower() -> dict[str, Any]:
    # the tower of ``llava_fashion_seg`` (64 px, patch 4 -> 16 x 16 tokens, 2 blocks of width 64), conv stem
    return {
        "name": "timm_vit",
        "model_name": "vit_tiny_patch16_224",
        "kwargs": {"img_size": 64, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 2},
        "stem": "conv",
    }


@dataclass
class DenseTowerConfig:
    tower: dict[str, Any] = field(default_factory=_default_tower)  # a VISION_TOWERS entry: name + its config
    num_classes: int = 10  # item classes (json items' class_id in [0, num_classes)); targets add background
    feature_layer: int = -1  # hidden state the head reads (the MLLM's feature layer)
    hflip: bool = True  # flip half of the training scenes (pixels and targets)


def patch_class_targets(instances: np.ndarray, items: list[dict[str, Any]], patch: int, num_classes: int) -> np.ndarray:
    """Per-patch class histogram.

    Args:
        instances: ``[H, W]`` ints, 0 background, i = ``items[i-1]``; H and W divisible by ``patch``.
        items: dicts with ``class_id`` in ``[0, num_classes)``.

    Returns:
        ``[(H/patch) * (W/patch), num_classes + 1]`` float32 rows summing to 1; column 0 is background,
        column ``c + 1`` is class ``c``.
    """
    h, w = instances.shape
    if h % patch or w % patch:
        raise ValueError(f"instances {h}x{w} are not divisible by the tower's patch {patch}; resize the shards")
    lut = np.zeros(max(len(items), int(instances.max(initial=0))) + 1, np.int64)
    for i, it in enumerate(items, start=1):
        cid = int(it.get("class_id", -1))
        if not 0 <= cid < num_classes:
            raise ValueError(f"item {i} has class_id {cid}, outside [0, {num_classes}): set task.num_classes")
        lut[i] = cid + 1
    onehot = np.eye(num_classes + 1, dtype=np.float32)[lut[instances.astype(np.int64)]]  # [H, W, C+1]
    return reduce(onehot, "(gh ph) (gw pw) c -> (gh gw) c", "mean", ph=patch, pw=patch)


class DenseTowerTransform:
    """Decoded scene sample -> ``image [3, S, S]`` in [0, 1] and ``target [N, C+1]`` (picklable for workers)."""

    def __init__(self, image_size: int, patch: int, num_classes: int, hflip: bool):
        self.image_size, self.patch, self.num_classes, self.hflip = image_size, patch, num_classes, hflip

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        key = sample.get("__key__")
        if "instances" not in sample or "json" not in sample or "items" not in sample["json"]:
            raise KeyError(
                f"seg_tower needs scenes with instances.png and a json with items (sample {key!r} has "
                f"{sorted(sample)}); build them with `mmtok shards fashion-scenes`"
            )
        image = torch.as_tensor(sample["image"], dtype=torch.float32)
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        inst = np.asarray(sample["instances"])
        if image.shape[-2:] != inst.shape:
            raise ValueError(f"sample {key!r}: image {tuple(image.shape[-2:])} and instances {inst.shape} differ")
        if inst.shape != (self.image_size, self.image_size):  # same grid at another canvas: nearest resize
            idx = (np.arange(self.image_size) * inst.shape[0] / self.image_size).astype(np.int64)
            inst = inst[idx][:, (np.arange(self.image_size) * inst.shape[1] / self.image_size).astype(np.int64)]
            image = F.interpolate(image[None], size=(self.image_size,) * 2, mode="bilinear", antialias=True)[0]
        # the flip is drawn from the sample's key: the same on every read, so a resumed run sees the same batches
        if self.hflip and zlib.crc32(str(key).encode()) % 2:
            image, inst = image.flip(-1), inst[:, ::-1]
        target = patch_class_targets(inst, sample["json"]["items"], self.patch, self.num_classes)
        return {"image": image.contiguous(), "target": torch.from_numpy(target)}


class DenseTowerTask(Task):
    """Tower + linear per-patch class head: ``{"image", "target"} -> {"loss", "patch_accuracy", ...}``."""

    def __init__(self, config: DenseTowerConfig):
        super().__init__()
        self.config = config
        spec = dict(config.tower)
        name = spec.pop("name", "timm_vit")
        self.tower = VISION_TOWERS.create(name, **spec)
        self.tower_name = name
        self.head = nn.Linear(self.tower.hidden_size, config.num_classes + 1)

    def sample_transform(self, split: str) -> DenseTowerTransform:
        t = self.tower
        return DenseTowerTransform(
            t.image_size, t.patch_size, self.config.num_classes, self.config.hflip and split == "train"
        )

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {
            "image": torch.stack([s["image"] for s in samples]),
            "target": torch.stack([s["target"] for s in samples]),
        }

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """``images [B, 3, S, S]`` in [0, 1] -> per-patch class logits ``[B, N, C+1]`` (fp32)."""
        hidden = self.tower.hidden_states(self.tower.preprocess(images))[self.config.feature_layer]
        return self.head(hidden[:, self.tower.num_prefix_tokens :]).float()

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits, target = self.logits(batch["image"]), batch["target"].float()
        loss = -(target * F.log_softmax(logits, -1)).sum(-1).mean()
        stats = self._counts(logits.detach(), target)
        return {"loss": loss, "patch_accuracy": torch.tensor(stats[0] / max(stats[1], 1))}

    @staticmethod
    def _counts(logits: torch.Tensor, target: torch.Tensor) -> tuple[int, int, int, int]:
        pred, truth = logits.argmax(-1), target.argmax(-1)
        fg = truth > 0
        return int((pred == truth).sum()), truth.numel(), int((pred[fg] == truth[fg]).sum()), int(fg.sum())

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Per-patch loss, patch accuracy and foreground-patch accuracy over every patch of ``batches``."""
        tot = np.zeros(4)
        loss_sum, n_patch = 0.0, 0
        for batch in batches:
            logits, target = self.logits(batch["image"]), batch["target"].float()
            loss_sum += float(-(target * F.log_softmax(logits, -1)).sum(-1).sum())
            n_patch += target.shape[0] * target.shape[1]
            tot += np.array(self._counts(logits, target))
        if n_patch == 0:
            return {}
        return {"loss": loss_sum / n_patch, "patch_accuracy": tot[0] / tot[1], "fg_accuracy": tot[2] / max(tot[3], 1)}

    def export(self, out_dir: str | Path) -> None:
        """The tower in timm's hub layout (see the module docstring); only ``timm_vit`` towers export."""
        from safetensors.torch import save_file

        if self.tower_name != "timm_vit":
            raise ValueError(f"seg_tower exports timm_vit towers only, not {self.tower_name!r}")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        cfg = self.tower.config
        state = {k: v.detach().cpu().contiguous() for k, v in self.tower.model.state_dict().items()}
        save_file(state, str(out / "model.safetensors"))
        meta = {
            "architecture": cfg.model_name,
            "num_classes": 0,
            "model_args": dict(cfg.kwargs),
            "pretrained_cfg": {"mean": list(cfg.mean), "std": list(cfg.std), "num_classes": 0},
            "mmtok": {"stem": cfg.stem, "task": "seg_tower", "config": asdict(self.config)},
        }
        (out / "config.json").write_text(json.dumps(meta, indent=2))
        logger.info("exported the dense-pretrained tower to %s (timm hub layout)", out)


TASKS.add(
    "seg_tower",
    DenseTowerTask,
    config=DenseTowerConfig,
    help="dense tower pretraining: per-patch class shares from instances.png (before mllm_seg)",
)
