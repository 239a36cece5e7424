"""MAE for images and VideoMAE for clips, as one model family.

"Masked Autoencoders Are Scalable Vision Learners" (He et al., arXiv:2111.06377; reference
facebookresearch/mae ``models_mae.py``) and "VideoMAE" (Tong et al., arXiv:2203.12602; reference
MCG-NJU/VideoMAE). The encoder (:class:`~mmtok.mim.vit.ViTEncoder`) sees only the visible tokens plus
[CLS]; a light decoder gets the encoded tokens back in place, learned mask tokens everywhere else,
fixed sine-cosine positions, and predicts the pixels of every patch. The loss is the MSE to
per-patch-normalised targets averaged over hidden tokens only.

Target normalisation follows each reference exactly, because the two differ on flat patches:
- images (MAE): over each whole patch of model-scale pixels, ``(v - mean) / sqrt(var + 1e-6)``;
- videos (VideoMAE): over each tubelet *and channel* of the [0, 1] pixels, ``(v - mean) / (std + 1e-6)``.
  On a low-contrast tubelet (std around 1e-3) the image formula would shrink the target by about 30%.
Both use the unbiased variance, as the references do.

What differs from the references:
- The mask comes from a pluggable masker (:mod:`mmtok.mim.masking`) instead of being drawn inside
  ``forward``, so random / block / tube / attention / adaptive / hard-patch all drive the same model.
- Images and videos share one class: ``num_frames > 1`` switches to 3D tubelets and 3D positions
  (separable sin-cos; VideoMAE's own flattened 1-D table is ``pos_embed_type="flat"``, used by converted
  transformers VideoMAE checkpoints together with ``cls_token=False`` and ``final_norm=False``).
- An optional loss-prediction head (HPM, arXiv:2304.05919) predicts each token's reconstruction loss.
- Inputs are [0, 1] pixels; normalisation is part of the encoder (``pixel_mean``/``pixel_std``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from einops import rearrange
from timm.models.vision_transformer import Block
from torch import nn

from mmtok.hub import HubMixin
from mmtok.layers import patchify, unpatchify
from mmtok.mim.masking import MaskOutput
from mmtok.mim.vit import SIZES, ViTConfig, ViTEncoder, gather_tokens, init_vit_weights, position_table
from mmtok.registries import MIM_MODELS

__all__ = ["MAE", "MAEConfig", "MAEOutput"]


@dataclass
class MAEConfig(ViTConfig):
    """Encoder fields (from :class:`ViTConfig`) plus the decoder and loss."""

    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    norm_pix_loss: bool = True  # normalised targets (per patch for images, per tubelet and channel for videos)
    # epsilon of the target normalisation: 1e-6 in both references. A larger value (e.g. 0.05 on [0, 1] video
    # pixels) keeps near-flat noisy tubelets near zero instead of blowing their noise up to unit variance
    norm_pix_eps: float = 1e-6
    predict_loss: bool = False  # HPM: add a head predicting each token's reconstruction loss
    decoder_norm_eps: float | None = None  # epsilon of the decoder's last LayerNorm (None: norm_eps)

    def encoder_config(self) -> ViTConfig:
        return ViTConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ViTConfig)})


@dataclass
class MAEOutput:
    """Result of :meth:`MAE.forward`.

    Attributes:
        loss: Scalar, mean over hidden tokens of the per-token MSE.
        pred: ``[B, N, P]`` predicted (normalised) patch values for every token.
        target: ``[B, N, P]`` the targets ``pred`` is compared with.
        token_loss: ``[B, N]`` per-token MSE (defined on every token; the loss uses hidden ones).
        mask: ``[B, N]`` bool, True = hidden.
        latent: ``[B, P + K, D]`` encoder output (``P`` = 1 with a [CLS] token, else 0).
        pred_loss: ``[B, N]`` predicted per-token loss (``predict_loss`` models), else None.
    """

    loss: torch.Tensor
    pred: torch.Tensor
    target: torch.Tensor
    token_loss: torch.Tensor
    mask: torch.Tensor
    latent: torch.Tensor
    pred_loss: torch.Tensor | None = None


class MAE(nn.Module, HubMixin):
    """Masked autoencoder over images ``[B, C, H, W]`` or clips ``[B, C, T, H, W]`` in [0, 1]."""

    hub_kind = "mim model"

    def __init__(self, config: MAEConfig):
        super().__init__()
        c = config
        if c.decoder_dim % c.decoder_heads:
            raise ValueError(f"decoder_dim {c.decoder_dim} is not divisible by decoder_heads {c.decoder_heads}")
        self.config = c
        self.encoder = ViTEncoder(c.encoder_config())
        self.grid_size = self.encoder.grid_size
        self.num_patches = self.encoder.num_patches
        self.is_video = self.encoder.patch_embed.is_video
        self.patch_dim = c.tubelet_size * c.patch_size**2 * c.in_chans
        # VideoMAE normalises its targets on [0, 1] pixels (see targets()); MAE on the model's input scale
        self.unit_targets = self.is_video and c.norm_pix_loss
        self.decoder_embed = nn.Linear(c.embed_dim, c.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.decoder_dim))
        pos = position_table(c.pos_embed_type, c.decoder_dim, self.grid_size, c.cls_token)[None]  # [1, P+N, Dd]
        self.register_buffer("decoder_pos_embed", pos, persistent=False)
        norm = partial(nn.LayerNorm, eps=c.norm_eps)
        self.decoder_blocks = nn.ModuleList(
            Block(c.decoder_dim, c.decoder_heads, c.mlp_ratio, qkv_bias=True, norm_layer=norm)
            for _ in range(c.decoder_depth)
        )
        d_eps = c.norm_eps if c.decoder_norm_eps is None else c.decoder_norm_eps
        self.decoder_norm = nn.LayerNorm(c.decoder_dim, eps=d_eps)
        self.decoder_pred = nn.Linear(c.decoder_dim, self.patch_dim)
        self.loss_head = nn.Linear(c.decoder_dim, 1) if c.predict_loss else None
        init_vit_weights(nn.ModuleList([self.decoder_embed, self.decoder_blocks, self.decoder_norm]))
        init_vit_weights(nn.ModuleList([self.decoder_pred] + ([self.loss_head] if self.loss_head else [])))
        nn.init.normal_(self.mask_token, std=0.02)

    # -- pieces -------------------------------------------------------------------------------
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """Model-scale pixels ``[B, N, P]`` of ``x`` (P in (u, p, q, c) order)."""
        return patchify(self.encoder.normalize(x), self.config.patch_size, self.config.tubelet_size)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """``[B, N, P]`` model-scale patches -> [0, 1]-scale images or videos."""
        c = self.config
        x = unpatchify(patches, c.patch_size, self.grid_size, c.in_chans, c.tubelet_size)
        return x * c.pixel_std + c.pixel_mean

    def targets(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Targets ``[B, N, P]`` and the per-token (mean, std) used to normalise them (to undo it).

        Images (MAE): model-scale patches, normalised over each whole patch by ``sqrt(var + eps)``.
        Videos (VideoMAE): [0, 1] pixels, normalised per tubelet and channel by ``std + eps``. Variances are
        unbiased in both; ``eps`` is ``config.norm_pix_eps`` (1e-6 as in both references).
        ``target * std + mean`` gives back the pixels in :meth:`target_pixels`' scale.
        """
        t = self.target_pixels(x)
        if not self.config.norm_pix_loss:
            return t, torch.zeros_like(t), torch.ones_like(t)
        c = self.config.in_chans
        groups = rearrange(t, "b n (k c) -> b n k c", c=c) if self.is_video else t[..., None]
        mean = groups.mean(-2, keepdim=True)
        var = groups.var(-2, keepdim=True, unbiased=True)
        # the two references differ here, and on a flat patch (std ~ 1e-3) so do the targets: see module docstring
        eps = self.config.norm_pix_eps
        std = var.sqrt() + eps if self.is_video else (var + eps).sqrt()

        def flat(v: torch.Tensor) -> torch.Tensor:
            v = v.expand_as(groups)
            return rearrange(v, "b n k c -> b n (k c)") if self.is_video else v[..., 0]

        return flat((groups - mean) / std), flat(mean), flat(std)

    def target_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """The patches ``[B, N, P]`` the targets are made from: [0, 1] pixels for normalised video targets
        (VideoMAE un-normalises its input first), model-scale pixels otherwise (MAE)."""
        c = self.config
        return patchify(x, c.patch_size, c.tubelet_size) if self.unit_targets else self.patchify(x)

    def decode(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Encoder output ``[B, P + K, D]`` -> decoder features ``[B, N, Dd]`` in raster order."""
        p = self.encoder.num_prefix_tokens  # 1 with [CLS], 0 without (VideoMAE)
        x = self.decoder_embed(latent)  # [B, P+K, Dd]
        b, n = ids_restore.shape
        fill = self.mask_token.expand(b, n - (x.shape[1] - p), -1)  # [B, N-K, Dd]
        x_ = torch.cat([x[:, p:], fill], dim=1)  # visible first, then hidden: the masker's order
        x_ = gather_tokens(x_, ids_restore)  # un-shuffle to raster order
        x = torch.cat([x[:, :p], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_norm(x)[:, p:]

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, masks: MaskOutput) -> MAEOutput:
        """Encode the visible tokens, reconstruct all of them, score the hidden ones.

        Args:
            x: Images ``[B, C, H, W]`` or clips ``[B, C, T, H, W]`` in [0, 1].
            masks: From a masker, with ``N = num_patches``.
        """
        if masks.mask.shape != (x.shape[0], self.num_patches):
            raise ValueError(
                f"mask has shape {tuple(masks.mask.shape)} but this model needs [B, {self.num_patches}] "
                f"(grid {self.grid_size}); build the masker context with grid=model.grid_size"
            )
        latent = self.encoder.forward_masked(x, masks.ids_keep)
        feats = self.decode(latent, masks.ids_restore)
        pred = self.decoder_pred(feats)  # [B, N, P]
        target, _, _ = self.targets(x)
        token_loss = (pred.float() - target.float()).pow(2).mean(-1)  # [B, N]
        m = masks.mask.float()
        loss = (token_loss * m).sum() / m.sum().clamp_min(1.0)
        pred_loss = self.loss_head(feats).squeeze(-1).float() if self.loss_head is not None else None
        return MAEOutput(loss, pred, target, token_loss, masks.mask, latent, pred_loss)

    @torch.no_grad()
    def predict_token_loss(self, x: torch.Tensor) -> torch.Tensor:
        """HPM teacher view: every token visible, the loss head's prediction ``[B, N]``."""
        if self.loss_head is None:
            raise ValueError("this MAE has no loss head; build it with predict_loss=True for hard-patch masking")
        latent = self.encoder.forward_masked(x, None)
        ids = torch.arange(self.num_patches, device=x.device)[None].expand(x.shape[0], -1)
        return self.loss_head(self.decode(latent, ids)).squeeze(-1).float()

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, masks: MaskOutput) -> torch.Tensor:
        """Pixels in [0, 1] with hidden patches replaced by the prediction (targets de-normalised)."""
        out = self.forward(x, masks)
        _, mean, std = self.targets(x)
        pred = out.pred.float() * std + mean if self.config.norm_pix_loss else out.pred.float()
        mixed = torch.where(out.mask[..., None], pred, self.target_pixels(x))  # in the targets' pixel scale
        if self.unit_targets:  # already [0, 1]: only the layout is undone
            c = self.config
            return unpatchify(mixed, c.patch_size, self.grid_size, c.in_chans, c.tubelet_size).clamp(0, 1)
        return self.unpatchify(mixed).clamp(0, 1)

    # -- export -------------------------------------------------------------------------------
    def export_encoder(self, path: str | Path) -> Path:
        """Save the encoder alone in the hub format (kind "mim model", entry "vit")."""
        enc = ViTEncoder(self.config.encoder_config())
        enc.load_state_dict(self.encoder.state_dict())
        enc.hub_name = "vit"
        return enc.save_pretrained(path)


# Decoder sizes per encoder size: MAE uses 512 x 8 for ViT-B/L/H; smaller encoders get lighter ones.
_DECODERS = {
    "micro": {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2},
    "tiny": {"decoder_dim": 128, "decoder_depth": 2, "decoder_heads": 4},
    "small": {"decoder_dim": 256, "decoder_depth": 4, "decoder_heads": 8},
    "base": {"decoder_dim": 512, "decoder_depth": 8, "decoder_heads": 16},
}
_VIDEO = {"num_frames": 16, "tubelet_size": 2}


def _register() -> None:
    MIM_MODELS.add("vit", ViTEncoder, config=ViTConfig, help="ViT encoder with every field from the config")
    MIM_MODELS.add("mae", MAE, config=MAEConfig, help="MAE with every field from the config")
    for size, shape in SIZES.items():
        MIM_MODELS.add(f"mae_{size}", MAE, config=MAEConfig, defaults={**shape, **_DECODERS[size]})
        MIM_MODELS.add(
            f"videomae_{size}",
            MAE,
            config=MAEConfig,
            defaults={**shape, **_DECODERS[size], **_VIDEO},
            help=f"VideoMAE-{size}: 2x{16}x{16} tubelets, 16 frames",
        )
    # The Fashion-MNIST recipe's encoder: ViT width 192, depth 6, patch 4 on 28x28 grey images.
    fm = {"img_size": 28, "patch_size": 4, "in_chans": 1, "embed_dim": 192, "depth": 6, "num_heads": 3}
    MIM_MODELS.add("mae_tiny_p4", MAE, config=MAEConfig, defaults={**fm, **_DECODERS["tiny"]})


_register()
