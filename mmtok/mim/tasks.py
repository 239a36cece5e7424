"""Training tasks of the masked-modeling area (registered in ``registries.TASKS``).

- ``mae``: MAE / VideoMAE pretraining with any masker (``random``, ``block``, ``tube``, ``attention``,
  ``adaptive``, ``hard_patch``). Maskers that need a teacher (AttMask's [CLS] attention, HPM's loss
  predictor) get an EMA copy of the model kept inside the task; AdaMAE's sampling network is trained
  by the sampling loss (weight 1e-4), HPM's loss head by the pairwise ranking loss.
- ``mtm``: masked token modeling on tokenizer codes (``codes.npy`` samples), MaskGIT cosine schedule.

Batches are dicts: ``{"x": [B, C, H, W] | [B, C, T, H, W] in [0, 1], "label": [B]}`` for ``mae`` and
``{"codes": [B, h, w]}`` for ``mtm``. The EMA teacher differs from AttMask (an iBOT teacher) and HPM
(an EMA of the whole MAE, which we follow); under ZeRO-3 its update would need gathered parameters,
so use ZeRO 1/2 with teacher-guided maskers.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from mmtok import registries
from mmtok.hub import from_pretrained
from mmtok.mim.mae import MAE
from mmtok.mim.masking import MaskContext, MaskOutput, adaptive_sampling_loss, ranking_loss
from mmtok.mim.mtm import MTM
from mmtok.mim.vit import cls_attention
from mmtok.registries import TASKS
from mmtok.train.task import Task

logger = logging.getLogger(__name__)

TEACHER_MASKERS = ("attention", "hard_patch")


@dataclass
class MAETaskConfig:
    model: str = "mae_tiny_p4"  # a MIM_MODELS entry (mae_*, videomae_*)
    model_args: dict[str, Any] = field(default_factory=dict)  # overrides of the model config
    init: str = ""  # start from a saved MAE folder instead of random weights
    masker: str = "random"  # a MASKERS entry
    mask_ratio: float = 0.75
    masker_args: dict[str, Any] = field(default_factory=dict)  # other masker config fields
    hflip: bool = True  # random horizontal flips of training samples
    teacher_momentum: float = 0.996  # EMA of the teacher (attention / hard_patch maskers)
    sampling_loss_weight: float = 1e-4  # AdaMAE
    ranking_loss_weight: float = 1.0  # HPM loss predictor
    total_steps: int = 1000  # training micro-steps over which HPM's hard share ramps (train.steps * grad_accum)


class MIMSampleTransform:
    """Sample -> ``{"x", "label"}``: channel count and size made to fit the model; flips on train.

    A class (not a closure) so DataLoader workers can pickle it.
    """

    def __init__(self, video: bool, in_chans: int, img_size: int, num_frames: int, hflip: bool):
        self.video, self.in_chans, self.img_size, self.num_frames, self.hflip = (
            video,
            in_chans,
            img_size,
            num_frames,
            hflip,
        )

    def _channels(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == self.in_chans:
            return x
        if self.in_chans == 1:
            return x.mean(0, keepdim=True)
        if x.shape[0] == 1:
            return repeat(x, "1 ... -> c ...", c=self.in_chans)
        raise ValueError(f"cannot map {x.shape[0]} channels to {self.in_chans}")

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        key = "video" if self.video else "image"
        if key not in sample:
            raise KeyError(
                f"the mae task with this model needs samples with {key!r}; sample {sample.get('__key__')!r} has "
                f"{sorted(sample)}. Use image shards for MAE models and video shards for VideoMAE models."
            )
        x = torch.as_tensor(sample[key], dtype=torch.float32)
        if not self.video and x.ndim == 2:
            x = x[None]
        x = self._channels(x)
        if self.video:
            if x.shape[1] < self.num_frames:
                raise ValueError(
                    f"clip {sample.get('__key__')!r} has {x.shape[1]} frames; the model needs {self.num_frames}"
                )
            # num_frames evenly spaced frames over the clip (VideoMAE samples with a fixed stride)
            x = x[:, torch.linspace(0, x.shape[1] - 1, self.num_frames).round().long()]
            if x.shape[-2:] != (self.img_size, self.img_size):
                x = rearrange(x, "c t h w -> t c h w")
                x = F.interpolate(x, size=(self.img_size,) * 2, mode="bilinear", antialias=True)
                x = rearrange(x, "t c h w -> c t h w")
        elif x.shape[-2:] != (self.img_size, self.img_size):
            x = F.interpolate(x[None], size=(self.img_size,) * 2, mode="bilinear", antialias=True)[0]
        if self.hflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return {"x": x.clamp(0, 1), "label": int(sample.get("label", -1))}


@TASKS.register("mae", config=MAETaskConfig, help="MAE / VideoMAE pretraining with any masker")
class MAETask(Task):
    """Masked autoencoding: ``{"x": pixels} -> {"loss", "recon_loss", ...}``."""

    def __init__(self, config: MAETaskConfig):
        super().__init__()
        self.config = config
        models = registries.get("mim model")
        args = dict(config.model_args)
        if config.masker == "hard_patch":
            args["predict_loss"] = True
        if config.init:
            self.model = from_pretrained(config.init, kind="mim model", **args)
        else:
            self.model = models.create(config.model, **args)
        if not isinstance(self.model, MAE):
            raise ValueError(
                f"task mae needs an MAE model (mae_*, videomae_*), {config.model!r} is a {type(self.model).__name__}"
            )
        margs = {"mask_ratio": config.mask_ratio, **config.masker_args}
        if config.masker == "adaptive":
            margs.setdefault("embed_dim", self.model.config.embed_dim)
            margs.setdefault("num_heads", self.model.config.num_heads)
        self.masker = registries.get("masker").create(config.masker, **margs)
        self.teacher: MAE | None = None
        if config.masker in TEACHER_MASKERS:
            self.teacher = copy.deepcopy(self.model).requires_grad_(False)
        # optimizer steps taken (a buffer so checkpoints restore the HPM ramp position)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.progress_value: float | None = None  # a loop that knows its progress (time budget) sets it

    # -- data ---------------------------------------------------------------------------------
    def sample_transform(self, split: str) -> MIMSampleTransform:
        c = self.model.config
        return MIMSampleTransform(
            self.model.is_video, c.in_chans, c.img_size, c.num_frames, self.config.hflip and split == "train"
        )

    def synthetic_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        c = self.model.config
        shape = (
            (c.in_chans, c.num_frames, c.img_size, c.img_size)
            if self.model.is_video
            else (c.in_chans, c.img_size, c.img_size)
        )
        return {"x": torch.rand(batch_size, *shape), "label": torch.zeros(batch_size, dtype=torch.long)}

    # -- training -----------------------------------------------------------------------------
    @property
    def progress(self) -> float:
        """Fraction of training done: set from outside (``progress_value``) or ``step / total_steps``."""
        if self.progress_value is not None:
            return self.progress_value
        return min(float(self.step) / max(self.config.total_steps, 1), 1.0)

    @torch.no_grad()
    def _update_teacher(self) -> None:
        m = self.config.teacher_momentum
        for pt, ps in zip(self.teacher.parameters(), self.model.parameters()):
            pt.lerp_(ps.detach(), 1.0 - m)

    def make_masks(self, x: torch.Tensor) -> MaskOutput:
        """Ask the masker for a batch of masks, giving it what its strategy reads."""
        ctx = MaskContext(grid=self.model.grid_size, progress=self.progress, device=x.device)
        name = self.config.masker
        if name == "adaptive":
            ctx.tokens = self.model.encoder.embed_patches(x)
        elif name == "attention":
            ctx.scores = cls_attention(self.teacher.encoder, x)
        elif name == "hard_patch" and self.masker.hard_share(ctx.progress) > 0:
            ctx.scores = self.teacher.predict_token_loss(x)
        return self.masker(x.shape[0], ctx)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if isinstance(batch, dict):
            if "x" not in batch:
                raise KeyError(
                    f"the mae task expects batches with 'x' (made by its sample_transform/collate); got "
                    f"{sorted(batch)}. Pass task.collate([task.sample_transform(split)(s) for s in samples])."
                )
            x = batch["x"]
        else:
            x = batch
        training = self.training and torch.is_grad_enabled()
        if training and self.teacher is not None and int(self.step) > 0:
            self._update_teacher()  # the previous optimizer step has updated the student
        masks = self.make_masks(x)
        out = self.model(x, masks)
        loss = out.loss
        logs: dict[str, torch.Tensor] = {"recon_loss": out.loss.detach()}
        if masks.log_probs is not None:
            s_loss = adaptive_sampling_loss(masks.log_probs, masks.mask, out.token_loss)
            loss = loss + self.config.sampling_loss_weight * s_loss
            logs["sampling_loss"] = s_loss.detach()
        if out.pred_loss is not None:
            r_loss = ranking_loss(out.pred_loss, out.token_loss, masks.mask)
            loss = loss + self.config.ranking_loss_weight * r_loss
            logs["ranking_loss"] = r_loss.detach()
            logs["hard_share"] = torch.tensor(self.masker.hard_share(self.progress))
        if training:
            self.step += 1
        return {"loss": loss, **logs}

    def export(self, out_dir: str | Path) -> None:
        out_dir = Path(out_dir)
        self.model.save_pretrained(out_dir / "mae")
        self.model.export_encoder(out_dir / "encoder")
        logger.info("exported MAE to %s and its encoder to %s", out_dir / "mae", out_dir / "encoder")


# -- masked token modeling -------------------------------------------------------------------------
@dataclass
class MTMTaskConfig:
    model: str = "mtm_tiny"
    model_args: dict[str, Any] = field(default_factory=dict)  # e.g. codebook_size, grid_h, grid_w
    init: str = ""


class CodesTransform:
    """Sample -> ``{"codes": long [h, w]}``."""

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        if "codes" not in sample:
            raise KeyError(
                f"the mtm task needs token shards with codes.npy; sample {sample.get('__key__')!r} has "
                f"{sorted(sample)}. Build them with `mmtok shards tokens`."
            )
        return {"codes": torch.as_tensor(sample["codes"]).long()}


@TASKS.register("mtm", config=MTMTaskConfig, help="masked token modeling on tokenizer codes (MaskGIT)")
class MTMTask(Task):
    """``{"codes": [B, h, w]} -> {"loss", "accuracy"}`` (accuracy of hidden codes)."""

    def __init__(self, config: MTMTaskConfig):
        super().__init__()
        self.config = config
        if config.init:
            self.model = from_pretrained(config.init, kind="mim model", **config.model_args)
        else:
            self.model = registries.get("mim model").create(config.model, **config.model_args)
        if not isinstance(self.model, MTM):
            raise ValueError(f"task mtm needs an MTM model (mtm_*), {config.model!r} is a {type(self.model).__name__}")

    def sample_transform(self, split: str) -> CodesTransform:
        return CodesTransform()

    def synthetic_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        c = self.model.config
        return {"codes": torch.randint(0, c.codebook_size, (batch_size, c.grid_h, c.grid_w))}

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = self.model(batch["codes"])
        return {"loss": out.loss, "accuracy": out.accuracy.detach()}

    def export(self, out_dir: str | Path) -> None:
        self.model.save_pretrained(Path(out_dir) / "mtm")
