"""The ``clip`` training task: open_clip's ``CLIP`` and ``ClipLoss`` on captioned fashion scenes.

CLIP (Radford et al., arXiv:2103.00020; reference implementations openai/CLIP and mlfoundations/open_clip) trains
an image tower and a text tower so that a scene and its caption embed close together and apart from the other
captions of the batch (a symmetric cross-entropy over the ``[B, B]`` similarity matrix). Both the model
(``open_clip.CLIP`` built from ``CLIPVisionCfg`` / ``CLIPTextCfg`` dicts) and the loss (``open_clip.loss.ClipLoss``)
are open_clip's own; this module only feeds them and exports the result.

Batches: ``{"image": [B, 3, S, S] normalised with the task's mean/std, "text": long [B, L], "signature": [str]}``,
training batches also ``"neg_text": long [B, L]`` (captions and their tokenization: :mod:`mmtok.clip.captions`).
What differs from open_clip's training script:

* patch dropout (FLIP, arXiv:2212.00794) is on by default (``vision.patch_dropout=0.5``): on 2 CPU cores it makes
  a step ~3.5x cheaper; evaluation and the exported tower see every patch (the export sets it to 0);
* horizontal flips are allowed because the caption follows them (positions recomputed from mirrored boxes);
* colour is a shortcut (the colour words alone tell most captions of a batch apart), so by default a quarter of
  the training scenes are grey with colour-free captions (``grey_share``) and each image also has to prefer its
  caption over a hard negative with one class or position changed (NegCLIP, arXiv:2210.01936; here a 2-way
  cross-entropy per image added to ClipLoss with ``hard_negative_weight``, not extra columns of ClipLoss);
* the logit scale is capped at 100 in the forward (open_clip clamps the parameter after each optimizer step, which
  the engine does not know about; capping the value used is the same on every ZeRO stage);
* several processes: ``ClipLoss(local_loss=True, gather_with_grad=True)`` over every rank's features, as
  open_clip recommends; evaluation is per process (no collective, ranks may read different batch counts).

Export (``output_dir/export``): an open_clip hub folder written by open_clip's own ``save_for_hf``:
``open_clip_config.json`` (``model_cfg``, ``preprocess_cfg`` with mean/std, plus an ``mmtok`` block with the
caption rule), ``open_clip_model.safetensors`` and the word-level tokenizer (``tokenizer.json``). Both
``open_clip.create_model("local-dir:DIR")`` and the MLLM's ``open_clip`` vision tower load it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mmtok.clip.captions import CaptionTokenizer, caption, flip_items, hard_negative, items_signature, key_seed
from mmtok.registries import TASKS
from mmtok.train.task import Task

logger = logging.getLogger(__name__)

# 64 px scenes, patch 4 -> 16 x 16 = 256 patch tokens (the geometry of the segmentation MLLM's tower)
DEFAULT_VISION: dict[str, Any] = {
    "image_size": 64,
    "patch_size": 4,
    "width": 128,
    "layers": 4,
    "head_width": 32,
    "mlp_ratio": 4.0,
    "patch_dropout": 0.5,
}
DEFAULT_TEXT: dict[str, Any] = {"context_length": 40, "width": 128, "heads": 4, "layers": 2}
# text_cfg fields that the tokenizer decides; a config may repeat them only with the same values
TOKENIZER_FIELDS = ("vocab_size", "pad_id", "eos_id", "pool_type")


class ClipConfigError(ValueError):
    """A ``clip`` task config that open_clip or the MLLM tower cannot use."""


@dataclass
class ClipTaskConfig:
    embed_dim: int = 128  # width of the joint embedding space
    vision: dict[str, Any] = field(default_factory=dict)  # CLIPVisionCfg fields over DEFAULT_VISION
    text: dict[str, Any] = field(default_factory=dict)  # CLIPTextCfg fields over DEFAULT_TEXT
    tokenizer: str = "builtin:fashion"  # word-level tokenizer (mmtok.mllm.text) or a tokenizer folder
    init: str = ""  # start from an exported CLIP folder (its architecture must match this config)
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])  # pixel normalisation, kept in the export
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    hflip: bool = True  # mirror training scenes (the caption's positions follow)
    shuffle_items: bool = True  # training captions list the items in a new order on every read
    grey_share: float = 0.25  # training scenes shown in grey levels with colour-free captions
    hard_negative_weight: float = 1.0  # weight of the caption-vs-its-hard-negative loss (0 = plain CLIP)
    caption_seed: int = 0  # mixed into the key-seeded item order
    init_logit_scale: float = math.log(1 / 0.07)  # CLIP's initial temperature 0.07
    max_logit_scale: float = 100.0  # cap of exp(logit_scale), as CLIP
    local_loss: bool = True  # several processes: each rank scores its own rows against all gathered columns
    gather_with_grad: bool = True


def _check_fields(cfg: dict[str, Any], cls: type, what: str) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg) - names)
    if unknown:
        raise ClipConfigError(f"task.{what} has unknown keys {unknown}; {cls.__name__} fields: {sorted(names)}")


def model_configs(config: ClipTaskConfig, tok: CaptionTokenizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """The open_clip ``vision_cfg`` and ``text_cfg`` dicts of ``config`` (text fields set from the tokenizer).

    Raises:
        ClipConfigError: an unknown field, a vision tower the MLLM cannot use (timm / attentional pooling), a
            non-square image or patch size, or a text field that contradicts the tokenizer.
    """
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    vision = {**DEFAULT_VISION, **config.vision}
    text = {**DEFAULT_TEXT, **config.text}
    _check_fields(vision, CLIPVisionCfg, "vision")
    _check_fields(text, CLIPTextCfg, "text")
    if vision.get("timm_model_name") or vision.get("attentional_pool"):
        raise ClipConfigError(
            "task.vision: use open_clip's own ViT (no timm_model_name, no attentional_pool); the MLLM's open_clip "
            "tower reads its blocks one by one"
        )
    for key in ("image_size", "patch_size"):
        if isinstance(vision[key], (list, tuple)):
            raise ClipConfigError(f"task.vision.{key} must be one integer (square images and patches)")
    if vision["image_size"] % vision["patch_size"]:
        raise ClipConfigError(f"task.vision.image_size {vision['image_size']} is not a multiple of the patch size")
    if text.get("hf_model_name") or text.get("hf_tokenizer_name"):
        raise ClipConfigError("task.text: the text tower is open_clip's TextTransformer (no hf_model_name)")
    wanted = {"vocab_size": tok.vocab_size, "pad_id": tok.pad_id, "eos_id": tok.eos_id, "pool_type": "eos"}
    for key in TOKENIZER_FIELDS:
        if key in config.text and config.text[key] != wanted[key]:
            raise ClipConfigError(
                f"task.text.{key}={config.text[key]!r} contradicts the tokenizer {tok.spec!r} ({wanted[key]!r}); "
                "leave it out, the task sets it"
            )
    text.update(wanted)  # pool the </s> position: captions are causal, so </s> has read the whole caption
    return vision, text


class ClipSampleTransform:
    """Scene sample -> ``{"image", "text", "signature"}`` (a class so DataLoader workers can pickle it)."""

    def __init__(
        self,
        tokenizer: CaptionTokenizer,
        image_size: int,
        mean: list[float],
        std: list[float],
        train: bool,
        hflip: bool,
        shuffle_items: bool,
        caption_seed: int,
        grey_share: float = 0.0,
        hard_negatives: bool = False,
    ):
        self.tokenizer, self.image_size, self.train = tokenizer, image_size, train
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.hflip, self.shuffle_items, self.caption_seed = hflip and train, shuffle_items and train, caption_seed
        self.grey_share = grey_share if train else 0.0
        self.hard_negatives = hard_negatives and train

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        key = str(sample.get("__key__", ""))
        meta = sample.get("json") or {}
        if "image" not in sample or not meta.get("items"):
            raise KeyError(
                f"the clip task needs scene samples (an image and json items); sample {key!r} has {sorted(sample)}. "
                "Build them with `mmtok shards fashion-scenes` or `mmtok shards fashion-vqa`."
            )
        x = torch.as_tensor(sample["image"], dtype=torch.float32)
        if x.ndim == 2:
            x = x[None]
        if x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        items = list(meta["items"])
        if self.hflip and torch.rand(()) < 0.5:
            canvas = int(meta.get("canvas", x.shape[-1]))
            x, items = x.flip(-1), flip_items(items, canvas)
        colour = True
        if self.grey_share and torch.rand(()) < self.grey_share:  # luminance (ITU-R 601) in all three channels
            x = (x * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True).expand(3, -1, -1)
            colour = False
        seeds = [key_seed(key, self.caption_seed)]
        if self.shuffle_items:  # a new order per read, reproducible from the engine's seeds
            seeds.append(int(torch.randint(0, 2**31 - 1, ())))
        seed = seeds if len(seeds) > 1 else seeds[0]
        out = {"text": self.tokenizer.encode(caption(items, seed, colour))}
        if self.hard_negatives:
            wrong = hard_negative(items, np.random.default_rng([*seeds, 1]))
            out["neg_text"] = self.tokenizer.encode(caption(wrong, seed, colour))
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x[None], size=(self.image_size,) * 2, mode="bilinear", antialias=True)[0]
        out["image"] = (x.clamp(0, 1) - self.mean) / self.std
        out["signature"] = items_signature(items, colour)
        return out


@TASKS.register("clip", config=ClipTaskConfig, help="CLIP with open_clip's model and ClipLoss on captioned scenes")
class ClipTask(Task):
    """``{"image", "text"} -> {"loss", "logit_scale", "i2t_acc", "t2i_acc"}`` (accuracies within the batch)."""

    def __init__(self, config: ClipTaskConfig):
        super().__init__()
        import open_clip
        from open_clip.model import CLIPTextCfg, CLIPVisionCfg

        self.config = config
        self.tokenizer = CaptionTokenizer(config.tokenizer, {**DEFAULT_TEXT, **config.text}["context_length"])
        self.vision_cfg, self.text_cfg = model_configs(config, self.tokenizer)
        if len(config.mean) != 3 or len(config.std) != 3 or min(config.std) <= 0:
            raise ClipConfigError("task.mean and task.std need three values each (RGB), std > 0")
        if config.init:
            # open_clip's own loader; the folder's architecture must be this config's (patch dropout may differ)
            self.model = load_clip_folder(config.init, patch_dropout=self.vision_cfg["patch_dropout"])[0]
            saved = json.loads((Path(config.init) / "open_clip_config.json").read_text())["model_cfg"]
            ours = self._model_cfg(export=True)
            if saved != ours:
                raise ClipConfigError(
                    f"task.init {config.init} holds another architecture: {saved} != this config's {ours}"
                )
        else:
            self.model = open_clip.CLIP(
                embed_dim=config.embed_dim,
                vision_cfg=CLIPVisionCfg(**self.vision_cfg),
                text_cfg=CLIPTextCfg(**self.text_cfg),
                init_logit_scale=config.init_logit_scale,
                # a [1]-shaped scale: DeepSpeed's ZeRO flattening cannot take 0-dim parameters
                nonscalar_logit_scale=True,
                output_dict=True,
            )
        self.model.output_dict = True
        # what open_clip's factory sets and save_for_hf reads back into preprocess_cfg
        self.model.visual.image_mean, self.model.visual.image_std = tuple(config.mean), tuple(config.std)
        self._loss = None  # built at the first training forward, when the process group exists
        n = sum(p.numel() for p in self.model.parameters())
        logger.info(
            "CLIP: %.2fM parameters, %d image tokens, context %d",
            n / 1e6,
            (self.vision_cfg["image_size"] // self.vision_cfg["patch_size"]) ** 2,
            self.text_cfg["context_length"],
        )

    def _model_cfg(self, export: bool) -> dict[str, Any]:
        vision = dict(self.vision_cfg)
        if export:
            vision["patch_dropout"] = 0.0  # a tower that sees every patch (the MLLM needs all 256 tokens)
        return {
            "embed_dim": self.config.embed_dim,
            "vision_cfg": vision,
            "text_cfg": dict(self.text_cfg),
            "nonscalar_logit_scale": True,
        }

    # -- data ---------------------------------------------------------------------------------------------
    def sample_transform(self, split: str) -> ClipSampleTransform:
        c = self.config
        return ClipSampleTransform(
            self.tokenizer,
            int(self.vision_cfg["image_size"]),
            c.mean,
            c.std,
            train=split == "train",
            hflip=c.hflip,
            shuffle_items=c.shuffle_items,
            caption_seed=c.caption_seed,
            grey_share=c.grey_share,
            hard_negatives=c.hard_negative_weight > 0,
        )

    def synthetic_batch(self, batch_size: int) -> dict[str, Any]:
        """Random images with captions of the scene form (benchmarks)."""
        s = int(self.vision_cfg["image_size"])
        item = {"class_name": "sneaker", "colour": "red", "position": "left"}
        return {
            "image": torch.randn(batch_size, 3, s, s),
            "text": self.tokenizer([caption([item])] * batch_size),
            "signature": [items_signature([item])] * batch_size,
        }

    # -- training -----------------------------------------------------------------------------------------
    def _clip_loss(self, training: bool):
        from open_clip.loss import ClipLoss

        if not training:
            return ClipLoss()  # per process: evaluation batches are not matched across ranks
        if self._loss is None:
            rank, world = 0, 1
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            self._loss = ClipLoss(
                local_loss=self.config.local_loss,
                gather_with_grad=self.config.gather_with_grad,
                cache_labels=True,
                rank=rank,
                world_size=world,
            )
        return self._loss

    def encode(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unit-norm image and text embeddings ``[B, embed_dim]`` and the capped logit scale (a scalar)."""
        out = self.model(images, texts)
        scale = out["logit_scale"].clamp(max=self.config.max_logit_scale).float().reshape(())  # [1] -> scalar
        return out["image_features"].float(), out["text_features"].float(), scale

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if not isinstance(batch, dict) or "image" not in batch or "text" not in batch:
            raise KeyError(
                "the clip task expects batches {'image', 'text'} made by its sample_transform and collate; got "
                f"{sorted(batch) if isinstance(batch, dict) else type(batch).__name__}"
            )
        img, txt, scale = self.encode(batch["image"], batch["text"])
        clip_loss = self._clip_loss(self.training and torch.is_grad_enabled())(img, txt, scale)
        with torch.no_grad():
            sim = img @ txt.T  # [B, B] local similarities
            target = torch.arange(sim.shape[0], device=sim.device)
            i2t = (sim.argmax(1) == target).float().mean()
            t2i = (sim.argmax(0) == target).float().mean()
        out = {"loss": clip_loss, "clip_loss": clip_loss.detach(), "logit_scale": scale.detach()}
        out.update(i2t_acc=i2t, t2i_acc=t2i)
        if "neg_text" in batch and self.config.hard_negative_weight > 0:
            # each image chooses between its caption and the same caption with one class or position wrong
            neg = self.model.encode_text(batch["neg_text"], normalize=True).float()  # [B, D]
            pair = scale * torch.stack([(img * txt).sum(-1), (img * neg).sum(-1)], dim=1)  # [B, 2]
            hard = F.cross_entropy(pair, torch.zeros_like(target))
            out["loss"] = clip_loss + self.config.hard_negative_weight * hard
            out["hard_neg_loss"] = hard.detach()
            out["hard_neg_acc"] = (pair[:, 0] > pair[:, 1]).float().mean().detach()
        return out

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Any]) -> dict[str, float]:
        """Mean loss over ``batches`` and retrieval recall@1/5 among all their samples (this process's share)."""
        from mmtok.clip.evaluate import retrieval_metrics

        losses, imgs, txts, sigs = [], [], [], []
        loss_fn = self._clip_loss(training=False)
        for batch in batches:
            img, txt, scale = self.encode(batch["image"], batch["text"])
            losses.append(float(loss_fn(img, txt, scale)))
            imgs.append(img.cpu())
            txts.append(txt.cpu())
            sigs += list(batch["signature"])
        if not losses:
            return {}
        out = {"loss": sum(losses) / len(losses)}
        out.update(retrieval_metrics(torch.cat(imgs), torch.cat(txts), sigs, ks=(1, 5)))
        out["samples"] = float(len(sigs))
        return out

    # -- export -------------------------------------------------------------------------------------------
    def export(self, out_dir: str | Path) -> None:
        """Write an open_clip hub folder (see the module docstring) with open_clip's ``save_for_hf``."""
        from open_clip.push_to_hf_hub import save_for_hf

        out_dir = Path(out_dir)
        save_for_hf(self.model, self.tokenizer.tokenizer, self._model_cfg(export=True), out_dir, True)
        path = out_dir / "open_clip_config.json"
        meta = json.loads(path.read_text())
        # open_clip reads model_cfg and preprocess_cfg only; this block documents how captions are made
        meta["mmtok"] = {
            "task": "clip",
            "tokenizer": "tokenizer.json in this folder (word level, from " + self.config.tokenizer + ")",
            "text_encoding": "word ids, then </s> (pooled), right-padded with <pad> = 0 to context_length",
            "caption_rule": "'<a|an> <colour> <class> <position phrase>' per item, joined with ' and ', order shuffled",
            "pixels": "RGB in [0, 1], resized to image_size, then (x - mean) / std",
        }
        path.write_text(json.dumps(meta, indent=2))
        logger.info("exported the CLIP model to %s (open_clip hub layout)", out_dir)


def read_clip_config(folder: str | Path) -> dict[str, Any]:
    """``open_clip_config.json`` of an exported CLIP folder, after checking the folder holds safetensors weights.

    Raises:
        FileNotFoundError: no ``open_clip_config.json`` or no ``open_clip_model.safetensors`` in ``folder`` (pickled
            weights are refused: convert them to safetensors first).
    """
    folder = Path(folder)
    cfg_path, weights = folder / "open_clip_config.json", folder / "open_clip_model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise FileNotFoundError(
            f"{folder} is not an exported CLIP folder (needs open_clip_config.json and open_clip_model.safetensors; "
            "`mmtok train --config configs/clip/fashion_clip.yaml` writes one to runs/.../export)"
        )
    return json.loads(cfg_path.read_text())


def load_clip_folder(folder: str | Path, device: str | torch.device = "cpu", patch_dropout: float = 0.0):
    """An exported CLIP folder -> ``(open_clip.CLIP, CaptionTokenizer, open_clip_config dict)``.

    The model is built by open_clip's factory (``create_model("local-dir:...")``) in eval mode, with output
    dicts; the tokenizer is the folder's own.

    Raises:
        FileNotFoundError: no ``open_clip_config.json`` or no ``open_clip_model.safetensors`` in ``folder`` (pickled
            weights are refused: convert them to safetensors first).
    """
    import open_clip

    folder = Path(folder)
    meta = read_clip_config(folder)
    model = open_clip.create_model(
        f"local-dir:{folder}", device=device, force_patch_dropout=patch_dropout, output_dict=True
    )
    text_cfg = meta["model_cfg"].get("text_cfg", {})
    tok_spec = str(folder) if (folder / "tokenizer.json").is_file() else "builtin:fashion"
    tok = CaptionTokenizer(tok_spec, text_cfg.get("context_length", DEFAULT_TEXT["context_length"]))
    pre = meta.get("preprocess_cfg", {})
    model.visual.image_mean = tuple(pre.get("mean", (0.5, 0.5, 0.5)))
    model.visual.image_std = tuple(pre.get("std", (0.5, 0.5, 0.5)))
    return model.eval(), tok, meta
