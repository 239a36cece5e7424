"""Training task for every tokenizer: ``task(batch) -> {"loss", rec, quant, perceptual, gan, usage, ...}``.

The loss of a VQGAN-style tokenizer (arXiv:2012.09841): reconstruction (L1 or L2) + quantizer
commitment + optional perceptual distance (MobileNetV2 features, :mod:`mmtok.tokenizers.losses`) +
optional PatchGAN hinge loss that starts after ``disc_start`` steps with VQGAN's adaptive weight.

The engine drives one optimizer over ``task.param_groups``. To train generator and discriminator with
it, the discriminator's own loss sees ``recon.detach()`` (no gradient reaches the generator) and the
generator's adversarial term calls the discriminator with *detached parameters* through
``torch.func.functional_call`` (no gradient reaches the discriminator): one backward pass updates both
players with their own objectives. This needs real parameter tensors, so the GAN term refuses to run
under DeepSpeed ZeRO-3 (partitioned parameters); stages 1 and 2 work.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mmtok import hub
from mmtok.registries import TASKS, TOKENIZERS
from mmtok.tokenizers.base import BaseTokenizer, to_model_range, to_unit_range
from mmtok.tokenizers.quantizers import USAGE_WINDOW, codebook_stats
from mmtok.train.task import Task

logger = logging.getLogger(__name__)


@dataclass
class TokenizerTaskConfig:
    tokenizer: str = "vq_tiny_f4"  # registered tokenizer name
    model: dict[str, Any] = field(default_factory=dict)  # overrides of the tokenizer's config
    init_from: str = ""  # start from a saved tokenizer folder instead
    recon_loss: str = "l1"  # l1 | l2
    perceptual_weight: float = 0.0
    perceptual_path: str = ""  # MobileNetV2 .pth ("" = the offline package's file)
    disc_weight: float = 0.0  # 0 = no GAN
    disc_start: int = 2000  # training forward passes before the discriminator switches on
    disc_width: int = 32
    adaptive_disc_weight: bool = True
    # images smaller than the tokenizer's input side are upsampled: "warn" (once per size, the default),
    # "allow" (a recipe that means it, e.g. 28 px Fashion-MNIST into a 32 px ViT) or "error"
    upsample: str = "warn"


UPSAMPLE_POLICIES = ("warn", "allow", "error")
_warned_sizes: set[tuple[int, int, int]] = set()  # (h, w, size) already warned about in this process


def check_upsampling(h: int, w: int, size: int, policy: str = "warn", where: str = "tokenizer input") -> None:
    """Say when ``h x w`` images will be upsampled to ``size`` (a blurrier input than the recipe assumes).

    Upsampled images are smoother than native ones, so training sees less detail and PSNR reads higher
    than on real ``size``-px data; the usual cause is shards built at another size (``mmtok shards photos``
    writes 64 px crops unless given ``size=128``). ``policy``: "warn" logs once per (h, w, size) and
    process, "allow" says nothing, "error" raises.
    """
    if policy not in UPSAMPLE_POLICIES:
        raise ValueError(f"upsample must be one of {UPSAMPLE_POLICIES}, not {policy!r}")
    if min(h, w) >= size or policy == "allow":
        return
    msg = (
        f"{where}: images are {h}x{w} px but the tokenizer takes {size}x{size}, so they are upsampled; "
        f"build data at {size} px (e.g. `mmtok shards photos --out data/photos{size} size={size}`) or set "
        "task.upsample=allow if this is intended"
    )
    if policy == "error":
        raise ValueError(msg)
    if (h, w, size) not in _warned_sizes:
        _warned_sizes.add((h, w, size))
        logger.warning(msg)


class ToTokenizerInput:
    """Sample transform: ``image`` [C, H, W] in [0, 1] -> resized, channel-converted, still [0, 1]."""

    def __init__(self, size: int, channels: int, upsample: str = "warn"):
        self.size, self.channels, self.upsample = size, channels, upsample

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        if "image" not in sample:
            raise KeyError(f"sample {sample.get('__key__', '?')} has no image; tokenizer shards need jpg/png")
        h, w = sample["image"].shape[-2:]
        check_upsampling(h, w, self.size, self.upsample, where="tokenizer shards")
        return {"image": prepare_images(sample["image"][None], self.size, self.channels)[0]}


def prepare_images(x: Tensor, size: int, channels: int) -> Tensor:
    """``[B, C, H, W]`` in [0, 1] -> ``[B, channels, size, size]`` in [0, 1] (bilinear, antialiased)."""
    x = x.float()
    if x.shape[1] != channels:
        if x.shape[1] == 1:
            x = x.repeat(1, channels, 1, 1)
        elif channels == 1:
            x = x.mean(1, keepdim=True)
        else:
            raise ValueError(f"cannot convert {x.shape[1]} channels to {channels}")
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0, 1)


@TASKS.register("tokenizer", config=TokenizerTaskConfig, help="train a visual tokenizer (recon + VQ + opt. LPIPS/GAN)")
class TokenizerTask(Task):
    def __init__(self, config: TokenizerTaskConfig):
        super().__init__()
        self.config = config
        if config.recon_loss not in ("l1", "l2"):
            raise ValueError(f"recon_loss must be 'l1' or 'l2', not {config.recon_loss!r}")
        if config.upsample not in UPSAMPLE_POLICIES:
            raise ValueError(f"upsample must be one of {UPSAMPLE_POLICIES}, not {config.upsample!r}")
        if config.init_from:
            self.tokenizer: BaseTokenizer = hub.from_pretrained(config.init_from, kind="tokenizer", **config.model)
        else:
            self.tokenizer = TOKENIZERS.create(config.tokenizer, **config.model)
        self.perceptual = None
        if config.perceptual_weight > 0:
            from mmtok.tokenizers.losses import PerceptualLoss

            self.perceptual = PerceptualLoss(config.perceptual_path)
        self.discriminator = None
        if config.disc_weight > 0:
            from mmtok.tokenizers.losses import PatchDiscriminator

            self.discriminator = PatchDiscriminator(self.tokenizer.config.in_channels, config.disc_width)
        # counts training forward passes (persistent: a resumed run keeps the GAN schedule)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    # -- data -----------------------------------------------------------------------------------
    def sample_transform(self, split: str):
        return ToTokenizerInput(
            self.tokenizer.config.image_size, self.tokenizer.config.in_channels, upsample=self.config.upsample
        )

    def synthetic_batch(self, batch_size: int) -> dict[str, Tensor]:
        c, s = self.tokenizer.config.in_channels, self.tokenizer.config.image_size
        return {"image": torch.rand(batch_size, c, s, s)}

    # -- training -------------------------------------------------------------------------------
    def _images(self, batch: Any) -> Tensor:
        x = batch["image"] if isinstance(batch, dict) else batch
        p = next(self.tokenizer.parameters())
        c, s = self.tokenizer.config.in_channels, self.tokenizer.config.image_size
        check_upsampling(*x.shape[-2:], s, self.config.upsample, where="tokenizer batch")
        return to_model_range(prepare_images(x.to(p.device), s, c))

    def forward(self, batch: Any) -> dict[str, Tensor]:
        x = self._images(batch)
        out = self.tokenizer(x)
        recon = out.recon.float()
        rec = (recon - x).abs().mean() if self.config.recon_loss == "l1" else (recon - x).pow(2).mean()
        quant = out.losses["quant"]
        loss = rec + quant
        logs: dict[str, Tensor] = {"rec": rec.detach(), "quant": quant.detach()}
        if self.perceptual is not None:
            perc = self.perceptual(recon, x)
            loss = loss + self.config.perceptual_weight * perc
            logs["perceptual"] = perc.detach()
        if self.discriminator is not None and self.training:
            g_term, d_loss = self._gan_terms(x, recon, rec_total=loss, logs=logs)
            loss = loss + g_term + d_loss
        if self.training:
            self.step += 1
            stats = self.tokenizer.codebook_stats()  # usage, usage_ge4, perplexity over the recent window
            for k in ("usage", "usage_ge4", "perplexity"):
                logs[k] = torch.tensor(stats[k])
        with torch.no_grad():
            mse = F.mse_loss(to_unit_range(recon), to_unit_range(x))
            logs["psnr"] = 10 * torch.log10(1.0 / mse.clamp_min(1e-10))
        return {"loss": loss, **logs}

    def _gan_terms(self, x: Tensor, recon: Tensor, rec_total: Tensor, logs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(weighted generator term: gradient to ``recon`` only, discriminator hinge loss: gradient to D only)."""
        from mmtok.tokenizers.losses import adaptive_gan_weight, hinge_d_loss

        disc = self.discriminator
        if int(self.step) < self.config.disc_start:
            logs["gan_on"] = torch.tensor(0.0)
            return recon.new_zeros(()), recon.new_zeros(())
        if any(hasattr(p, "ds_id") and getattr(p, "ds_status", None) is not None for p in disc.parameters()):
            raise RuntimeError("the GAN loss needs unpartitioned parameters: use DeepSpeed ZeRO stage 1 or 2")
        d_loss = hinge_d_loss(disc(x), disc(recon.detach()))
        frozen = {k: v.detach() for k, v in disc.named_parameters()}
        g_loss = -torch.func.functional_call(disc, frozen, (recon,)).mean()
        weight = torch.tensor(1.0, device=x.device)
        last = getattr(self.tokenizer, "last_layer", None)
        if self.config.adaptive_disc_weight and last is not None and torch.is_grad_enabled():
            weight = adaptive_gan_weight(rec_total, g_loss, last)
        logs.update(gan_on=torch.tensor(1.0), d_loss=d_loss.detach(), g_loss=g_loss.detach(), gan_w=weight)
        return self.config.disc_weight * weight * g_loss, d_loss

    # -- evaluation / export --------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, batches: Iterable[Any]) -> dict[str, float]:
        """PSNR / SSIM ([0, 1] images), recon loss, and :func:`codebook_stats` of the evaluation's codes.

        Codebook statistics use the training logs' definition: the last ``usage_window`` assignments
        (65,536 by default) of this evaluation, every residual level, so they do not grow with the number
        of evaluation batches once the window is full.
        """
        from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

        was = self.training
        self.eval()
        quantizer = self.tokenizer.quantizer
        levels = quantizer.levels_per_token
        window = getattr(quantizer.config, "usage_window", USAGE_WINDOW)
        try:
            n, sums, ids = 0, {"psnr": 0.0, "ssim": 0.0, "rec": 0.0}, []
            for batch in batches:
                x = self._images(batch)
                enc = self.tokenizer.encode(x)
                recon = self.tokenizer.decode(enc.latents).float()
                a, b = to_unit_range(recon), to_unit_range(x)
                bs = x.shape[0]
                sums["psnr"] += float(
                    peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3)).sum()
                )
                sums["ssim"] += float(structural_similarity_index_measure(a, b, data_range=1.0)) * bs
                sums["rec"] += float((recon - x).abs().mean()) * bs
                ids.append(enc.indices.reshape(bs, -1, levels).cpu())  # [B, tokens, Q] in assignment order
                n += bs
            out = {k: v / max(n, 1) for k, v in sums.items()}
            if ids:
                out.update(codebook_stats(torch.cat(ids), self.tokenizer.codebook_size, levels=levels, window=window))
            return out
        finally:
            self.train(was)

    def export(self, out_dir: str | Path) -> None:
        self.tokenizer.save_pretrained(out_dir)
        logger.info("saved tokenizer %s to %s", self.tokenizer.hub_name, out_dir)
