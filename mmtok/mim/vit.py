"""The ViT encoder of mmtok's masked-modeling family (also the MLLM's ``mmtok_vit`` vision tower).

ViT (arXiv:2010.11929) with the MAE encoder conventions (arXiv:2111.06377, facebookresearch/mae
``models_mae.py``): a strided-conv patch (or VideoMAE tubelet) embed, fixed sine-cosine position
embeddings, a [CLS] token, pre-norm transformer blocks and a final LayerNorm. The blocks are
``timm.models.vision_transformer.Block`` so attention runs through ``F.scaled_dot_product_attention``
(``block.attn.fused_attn``) and ``block.attn.qkv`` / ``num_heads`` are there for pruning code that
needs [CLS] attention rows.

What differs from the reference: the pixel normalisation travels with the model (inputs are in [0, 1]
as the data layer yields them; ``pixel_mean``/``pixel_std`` are config), position embeddings are a
non-persistent buffer (recomputed, never stored), and the same class encodes videos.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from einops import rearrange
from timm.models.vision_transformer import Block
from torch import nn

from mmtok.hub import HubMixin
from mmtok.layers import PatchEmbed, grid_pos_embed
from mmtok.registries import MIM_MODELS

__all__ = ["SIZES", "ViTConfig", "ViTEncoder", "cls_attention"]

# Width, depth, heads of the standard sizes (DeiT/ViT naming). "micro" is for tests and toy runs.
SIZES: dict[str, dict[str, int]] = {
    "micro": {"embed_dim": 32, "depth": 2, "num_heads": 2},
    "tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
}


@dataclass
class ViTConfig:
    """Encoder shape. ``num_frames > 1`` (or ``tubelet_size > 1``) makes it a video encoder."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_frames: int = 1
    tubelet_size: int = 1
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path: float = 0.0
    pixel_mean: float = 0.5  # inputs in [0, 1] are mapped to (x - mean) / std inside the model
    pixel_std: float = 0.5


def vit_fields() -> list[str]:
    """Names of the :class:`ViTConfig` fields (other configs embed them flat)."""
    return [f.name for f in fields(ViTConfig)]


class ViTEncoder(nn.Module, HubMixin):
    """ViT over images ``[B, C, H, W]`` or videos ``[B, C, T, H, W]`` with values in [0, 1].

    Attributes (the vision-tower contract): ``patch_embed``, ``cls_token`` ``[1, 1, D]``,
    ``pos_embed`` ``[1, 1 + N, D]`` (row 0 belongs to [CLS]), ``blocks``, ``norm``, ``embed_dim``,
    ``patch_size``, ``img_size``, ``num_patches``, ``grid_size`` ``(t, h, w)``.
    """

    hub_kind = "mim model"

    def __init__(self, config: ViTConfig):
        super().__init__()
        c = config
        if c.embed_dim % c.num_heads:
            raise ValueError(f"embed_dim {c.embed_dim} is not divisible by num_heads {c.num_heads}")
        self.config = c
        self.embed_dim = c.embed_dim
        self.patch_size = c.patch_size
        self.img_size = c.img_size
        self.num_frames = c.num_frames
        self.tubelet_size = c.tubelet_size
        self.patch_embed = PatchEmbed(c.img_size, c.patch_size, c.in_chans, c.embed_dim, c.num_frames, c.tubelet_size)
        self.grid_size = self.patch_embed.grid_size
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        pos = grid_pos_embed(c.embed_dim, self.grid_size, cls_token=True)[None]  # [1, 1+N, D]
        self.register_buffer("pos_embed", pos, persistent=False)
        dpr = torch.linspace(0, c.drop_path, c.depth).tolist()  # stochastic depth grows with depth
        self.blocks = nn.ModuleList(
            Block(c.embed_dim, c.num_heads, c.mlp_ratio, qkv_bias=c.qkv_bias, drop_path=dpr[i], norm_layer=nn.LayerNorm)
            for i in range(c.depth)
        )
        self.norm = nn.LayerNorm(c.embed_dim)
        init_vit_weights(self)

    # -- embedding ----------------------------------------------------------------------------
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels -> model input scale."""
        return (x - self.config.pixel_mean) / self.config.pixel_std

    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] -> patch tokens with position embeddings, no [CLS]: ``[B, N, D]``."""
        return self.patch_embed(self.normalize(x)) + self.pos_embed[:, 1:]

    def _with_cls(self, tokens: torch.Tensor) -> torch.Tensor:
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1)  # [B, 1+N, D]

    # -- forward ------------------------------------------------------------------------------
    def forward_masked(self, x: torch.Tensor, ids_keep: torch.Tensor | None) -> torch.Tensor:
        """Encode only the visible patches (the MAE encoder).

        Args:
            x: Images ``[B, C, H, W]`` or videos ``[B, C, T, H, W]`` in [0, 1].
            ids_keep: ``[B, K]`` indices of visible patches, or None for all.

        Returns:
            ``[B, 1 + K, D]`` final-norm features ([CLS] first).
        """
        tokens = self.embed_patches(x)
        if ids_keep is not None:
            tokens = gather_tokens(tokens, ids_keep)  # [B, K, D]
        h = self._with_cls(tokens)
        for blk in self.blocks:
            h = blk(h)
        return self.norm(h)

    def forward_features(
        self, images: torch.Tensor, output_hidden_states: bool = True
    ) -> list[torch.Tensor] | torch.Tensor:
        """All tokens through the encoder.

        Returns:
            With ``output_hidden_states``: a list of ``depth + 1`` tensors ``[B, 1 + N, D]`` (index 0 =
            embeddings, i = after block i, no final norm). Otherwise the final-norm features.
        """
        h = self._with_cls(self.embed_patches(images))
        states = [h]
        for blk in self.blocks:
            h = blk(h)
            states.append(h)
        return states if output_hidden_states else self.norm(h)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Final-norm features ``[B, 1 + N, D]``."""
        return self.forward_features(images, output_hidden_states=False)

    @torch.no_grad()
    def pooled_features(self, images: torch.Tensor, pool: str = "mean", layers: int = 1) -> torch.Tensor:
        """Features for probing: ``[B, D * layers]``.

        Args:
            pool: ``mean`` (mean of final-norm patch tokens, the MAE linear-probe choice), ``cls`` or
                ``mean+cls``.
            layers: Concatenate the pooled features of the last ``layers`` blocks (each through the
                final norm); 1 = final layer only.
        """
        states = self.forward_features(images, output_hidden_states=True)[-layers:]
        outs = []
        for s in states:
            s = self.norm(s)
            if pool == "mean":
                outs.append(s[:, 1:].mean(1))
            elif pool == "cls":
                outs.append(s[:, 0])
            elif pool == "mean+cls":
                outs.extend([s[:, 1:].mean(1), s[:, 0]])
            else:
                raise ValueError(f"pool must be 'mean', 'cls' or 'mean+cls', not {pool!r}")
        return torch.cat(outs, dim=-1)


def gather_tokens(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``tokens [B, N, D]``, ``ids [B, K]`` -> ``[B, K, D]``."""
    return torch.gather(tokens, 1, ids[..., None].expand(-1, -1, tokens.shape[-1]))


def init_vit_weights(module: nn.Module) -> None:
    """MAE initialisation: xavier-uniform linears (patch conv as a linear), LayerNorm 1/0, cls N(0, .02)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.Conv2d, nn.Conv3d)):
            w = m.weight.data
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    for name, p in module.named_parameters():
        if name.endswith("cls_token") or name.endswith("mask_token"):
            nn.init.normal_(p, std=0.02)


@torch.no_grad()
def cls_attention(encoder: ViTEncoder, images: torch.Tensor) -> torch.Tensor:
    """Head-averaged [CLS] -> patch attention of the last block: ``[B, N]`` (rows sum to <= 1).

    SDPA never materialises attention weights, so the one row needed is recomputed from the last
    block's ``qkv`` projection: ``softmax(q_cls k^T / sqrt(d))`` costs O(N d), not O(N^2).
    """
    states = encoder.forward_features(images, output_hidden_states=True)
    blk = encoder.blocks[-1]
    x = blk.norm1(states[-2])  # input of the last block
    heads = blk.attn.num_heads
    qkv = rearrange(blk.attn.qkv(x), "b n (k h d) -> k b h n d", k=3, h=heads)
    q, k = blk.attn.q_norm(qkv[0]), blk.attn.k_norm(qkv[1])
    logits = torch.einsum("bhd,bhnd->bhn", q[:, :, 0], k) / math.sqrt(q.shape[-1])
    return logits.softmax(-1).mean(1)[:, 1:]  # drop the [CLS] -> [CLS] column


def _register() -> None:
    for size, shape in SIZES.items():
        MIM_MODELS.add(f"vit_{size}", ViTEncoder, config=ViTConfig, defaults=shape, help=f"ViT-{size} encoder")


_register()
