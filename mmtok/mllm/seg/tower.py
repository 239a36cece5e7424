"""``seg_tower``: dense pretraining of a vision tower on labelled scenes, before the MLLM learns to segment.

Why: an MLLM can only ground "the sneaker" if its tower's patch features say which patches show a sneaker.
LISA and Text4Seg start from towers pretrained on hundreds of millions of images (CLIP, SAM); a small tower trained
from scratch through the LLM's losses does not learn the item classes in a CPU budget (measured on fashion-scenes,
see the README). This task gives the tower that knowledge directly, as supervised dense pretraining does for
segmentation backbones: every patch predicts the share of its pixels that belongs to each item class (soft
targets: the class histogram of the patch, background included), with a linear head on the patch tokens of the
tower's feature layer, trained with cross-entropy. (A class-aware tower alone did not make the from-scratch
MLLM ground its expressions; the README has the measurements.)

Targets come from the shards the segmentation task reads: ``instances.png`` (0 background, i = item i) and the
json's ``items`` (``class_id`` per item), as fashion-scenes writes them. The horizontal flip (optional; half of
the scenes, chosen by key) flips pixels and targets together. Evaluation reports the patch accuracy and the
foreground patch accuracy (patches whose majority is an item: chance is 1 / num_classes). A second head predicts
each patch's colour shares the same way (``colour_weight``, on by default): class targets alone teach the tower to
discard colour, which referring expressions ("the red bag") and colour questions need.

``export`` writes the tower in timm's hub layout (``config.json`` with ``architecture``, ``model_args``,
``pretrained_cfg`` mean/std, and ``mmtok.stem``; ``model.safetensors``), which the ``timm_vit`` tower loads with
``checkpoint: <folder>``; the linear heads are not exported.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import reduce
from torch import nn

from mmtok.data.sources.scenes import PALETTE
from mmtok.data.transforms import key_seed
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
    feature_layer: int = -1  # hidden state the heads read (the MLLM's feature layer)
    hflip: bool = True  # flip half of the training scenes (pixels and targets)
    # a second head for each patch's colour shares (json items' ``colour``, one of ``colours``), weighted into the
    # loss: class targets alone teach the tower to discard colour (a linear colour probe on its patches falls from
    # 0.77 at random init to 0.26), which the referring expressions and colour questions need. 0 = off.
    colour_weight: float = 1.0
    colours: list[str] = field(default_factory=lambda: list(PALETTE))


def patch_class_targets(
    instances: np.ndarray,
    items: list[dict[str, Any]],
    patch: int,
    num_classes: int,
    key: str = "class_id",
    names: list[str] | None = None,
) -> np.ndarray:
    """Per-patch histogram of an item label (the class by default).

    Args:
        instances: ``[H, W]`` ints, 0 background, i = ``items[i-1]``; H and W divisible by ``patch``.
        items: dicts with ``key``: an int in ``[0, num_classes)``, or one of ``names`` when given (e.g. colours).

    Returns:
        ``[(H/patch) * (W/patch), num_classes + 1]`` float32 rows summing to 1; column 0 is background,
        column ``c + 1`` is label ``c``.
    """
    h, w = instances.shape
    if h % patch or w % patch:
        raise ValueError(f"instances {h}x{w} are not divisible by the tower's patch {patch}; resize the shards")
    lut = np.zeros(max(len(items), int(instances.max(initial=0))) + 1, np.int64)
    for i, it in enumerate(items, start=1):
        if names is not None:
            if it.get(key) not in names:
                raise ValueError(f"item {i} has {key} {it.get(key)!r}, not one of {names}: set task.colour_weight=0")
            cid = names.index(it[key])
        else:
            cid = int(it.get(key, -1))
        if not 0 <= cid < num_classes:
            raise ValueError(f"item {i} has {key} {cid}, outside [0, {num_classes}): set task.num_classes")
        lut[i] = cid + 1
    onehot = np.eye(num_classes + 1, dtype=np.float32)[lut[instances.astype(np.int64)]]  # [H, W, C+1]
    return reduce(onehot, "(gh ph) (gw pw) c -> (gh gw) c", "mean", ph=patch, pw=patch)


class DenseTowerTransform:
    """Decoded scene sample -> ``image [3, S, S]`` in [0, 1] and ``target [N, C+1]`` (picklable for workers)."""

    def __init__(self, image_size: int, patch: int, num_classes: int, hflip: bool, colours: list[str] | None = None):
        self.image_size, self.patch, self.num_classes, self.hflip = image_size, patch, num_classes, hflip
        self.colours = colours

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
        if self.hflip and key_seed(str(key)) % 2:
            image, inst = image.flip(-1), inst[:, ::-1]
        items = sample["json"]["items"]
        out = {
            "image": image.contiguous(),
            "target": torch.from_numpy(patch_class_targets(inst, items, self.patch, self.num_classes)),
        }
        if self.colours:
            colour = patch_class_targets(inst, items, self.patch, len(self.colours), "colour", self.colours)
            out["colour_target"] = torch.from_numpy(colour)
        return out


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
        if config.colour_weight < 0:
            raise ValueError(f"colour_weight must be >= 0, got {config.colour_weight}")
        self.colour_head = nn.Linear(self.tower.hidden_size, len(config.colours) + 1) if config.colour_weight else None

    def sample_transform(self, split: str) -> DenseTowerTransform:
        t = self.tower
        colours = list(self.config.colours) if self.colour_head is not None else None
        return DenseTowerTransform(
            t.image_size, t.patch_size, self.config.num_classes, self.config.hflip and split == "train", colours
        )

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        keys = ["image", "target"] + (["colour_target"] if "colour_target" in samples[0] else [])
        return {k: torch.stack([s[k] for s in samples]) for k in keys}

    def logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``images [B, 3, S, S]`` in [0, 1] -> per-patch logits (fp32): ``target`` ``[B, N, C+1]`` (class) and,
        with the colour head, ``colour_target`` ``[B, N, len(colours)+1]``."""
        hidden = self.tower.hidden_states(self.tower.preprocess(images))[self.config.feature_layer]
        patches = hidden[:, self.tower.num_prefix_tokens :]
        out = {"target": self.head(patches).float()}
        if self.colour_head is not None:
            out["colour_target"] = self.colour_head(patches).float()
        return out

    @staticmethod
    def _ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Soft cross-entropy per patch ``[B, N]``."""
        return -(target * F.log_softmax(logits, -1)).sum(-1)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self.logits(batch["image"])
        out: dict[str, torch.Tensor] = {}
        loss = 0.0
        for key, weight, name in (("target", 1.0, "class"), ("colour_target", self.config.colour_weight, "colour")):
            if key not in logits:
                continue
            target = batch[key].float()
            term = self._ce(logits[key], target).mean()
            loss = loss + weight * term
            stats = self._counts(logits[key].detach(), target)
            out[f"{name}_loss"] = term.detach()
            out[f"{name}_fg_accuracy"] = torch.tensor(stats[2] / max(stats[3], 1))
        return {"loss": loss, **out}

    @staticmethod
    def _counts(logits: torch.Tensor, target: torch.Tensor) -> tuple[int, int, int, int]:
        pred, truth = logits.argmax(-1), target.argmax(-1)
        fg = truth > 0
        return int((pred == truth).sum()), truth.numel(), int((pred[fg] == truth[fg]).sum()), int(fg.sum())

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Over every patch of ``batches``: the class head's loss, patch accuracy and foreground-patch accuracy
        (``loss``, ``patch_accuracy``, ``fg_accuracy``) and, with the colour head, ``colour_fg_accuracy``."""
        tot = {"target": np.zeros(4), "colour_target": np.zeros(4)}
        loss_sum, n_patch = 0.0, 0
        for batch in batches:
            logits = self.logits(batch["image"])
            target = batch["target"].float()
            loss_sum += float(self._ce(logits["target"], target).sum())
            n_patch += target.shape[0] * target.shape[1]
            for key in logits:
                tot[key] += np.array(self._counts(logits[key], batch[key].float()))
        if n_patch == 0:
            return {}
        c = tot["target"]
        out = {"loss": loss_sum / n_patch, "patch_accuracy": c[0] / c[1], "fg_accuracy": c[2] / max(c[3], 1)}
        if self.colour_head is not None:
            out["colour_fg_accuracy"] = tot["colour_target"][2] / max(tot["colour_target"][3], 1)
        return out

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
            "mmtok": {
                "stem": cfg.stem,
                "stem_groups": cfg.stem_groups,
                "task": "seg_tower",
                "config": asdict(self.config),
            },
        }
        (out / "config.json").write_text(json.dumps(meta, indent=2))
        logger.info("exported the dense-pretrained tower to %s (timm hub layout)", out)


TASKS.add(
    "seg_tower",
    DenseTowerTask,
    config=DenseTowerConfig,
    help="dense tower pretraining: per-patch class shares from instances.png (before mllm_seg)",
)
