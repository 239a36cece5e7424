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

Config switches let the same class hold encoders trained elsewhere (their defaults are MAE's, so mmtok's own
folders are unaffected): VideoMAE (arXiv:2203.12602, reference MCG-NJU/VideoMAE; transformers' ``videomae``)
has no [CLS] token (``cls_token=False``), a 1-D sinusoid table over the flattened (t, h, w) index with
interleaved sin/cos channels (``pos_embed_type="flat"``), no final LayerNorm when its classifier mean-pools
(``final_norm=False``) and LayerNorm epsilon 1e-12 (``norm_eps``). Its attention has query and value biases
but no key bias; a key bias adds ``q . b_k`` to every logit of a query row, which softmax ignores, so a zero
key bias in mmtok's fused ``qkv`` reproduces it exactly and needs no switch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import partial

import torch
from einops import rearrange
from timm.models.vision_transformer import Block
from torch import nn

from mmtok.hub import HubMixin
from mmtok.layers import PatchEmbed, grid_pos_embed
from mmtok.registries import MIM_MODELS

__all__ = [
    "POS_EMBED_TYPES",
    "SIZES",
    "ViTConfig",
    "ViTEncoder",
    "cls_attention",
    "flat_sinusoid_table",
    "position_table",
]

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
    # switches for encoders trained elsewhere (module docstring); the defaults are MAE's
    cls_token: bool = True  # False: no [CLS]; features are the patch tokens alone (VideoMAE)
    pos_embed_type: str = "grid"  # "grid": separable sin-cos over (t, h, w); "flat": VideoMAE's 1-D table
    final_norm: bool = True  # False: no LayerNorm after the last block (VideoMAE with mean pooling)
    norm_eps: float = 1e-5  # LayerNorm epsilon of the blocks and the final norm


# Position tables by name (see ViTConfig.pos_embed_type).
POS_EMBED_TYPES = ("grid", "flat")


def vit_fields() -> list[str]:
    """Names of the :class:`ViTConfig` fields (other configs embed them flat)."""
    return [f.name for f in fields(ViTConfig)]


class ViTEncoder(nn.Module, HubMixin):
    """ViT over images ``[B, C, H, W]`` or videos ``[B, C, T, H, W]`` with values in [0, 1].

    Attributes (the vision-tower contract): ``patch_embed``, ``cls_token`` ``[1, 1, D]`` (None when
    ``config.cls_token`` is False), ``pos_embed`` ``[1, P + N, D]`` (row 0 belongs to [CLS] when there is one),
    ``blocks``, ``norm`` (``nn.Identity`` without ``final_norm``), ``embed_dim``, ``patch_size``, ``img_size``,
    ``num_patches``, ``grid_size`` ``(t, h, w)`` and ``num_prefix_tokens`` ``P`` (1 with [CLS], else 0).
    """

    hub_kind = "mim model"

    def __init__(self, config: ViTConfig):
        super().__init__()
        c = config
        if c.embed_dim % c.num_heads:
            raise ValueError(f"embed_dim {c.embed_dim} is not divisible by num_heads {c.num_heads}")
        if c.pos_embed_type not in POS_EMBED_TYPES:
            raise ValueError(f"pos_embed_type must be one of {POS_EMBED_TYPES}, not {c.pos_embed_type!r}")
        self.config = c
        self.embed_dim = c.embed_dim
        self.patch_size = c.patch_size
        self.img_size = c.img_size
        self.num_frames = c.num_frames
        self.tubelet_size = c.tubelet_size
        self.patch_embed = PatchEmbed(c.img_size, c.patch_size, c.in_chans, c.embed_dim, c.num_frames, c.tubelet_size)
        self.grid_size = self.patch_embed.grid_size
        self.num_patches = self.patch_embed.num_patches
        self.num_prefix_tokens = 1 if c.cls_token else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim)) if c.cls_token else None
        pos = position_table(c.pos_embed_type, c.embed_dim, self.grid_size, c.cls_token)[None]  # [1, P+N, D]
        self.register_buffer("pos_embed", pos, persistent=False)
        dpr = torch.linspace(0, c.drop_path, c.depth).tolist()  # stochastic depth grows with depth
        norm = partial(nn.LayerNorm, eps=c.norm_eps)
        self.blocks = nn.ModuleList(
            Block(c.embed_dim, c.num_heads, c.mlp_ratio, qkv_bias=c.qkv_bias, drop_path=dpr[i], norm_layer=norm)
            for i in range(c.depth)
        )
        self.norm = norm(c.embed_dim) if c.final_norm else nn.Identity()
        init_vit_weights(self)

    # -- embedding ----------------------------------------------------------------------------
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels -> model input scale."""
        return (x - self.config.pixel_mean) / self.config.pixel_std

    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] -> patch tokens with position embeddings, no [CLS]: ``[B, N, D]``."""
        return self.patch_embed(self.normalize(x)) + self.pos_embed[:, self.num_prefix_tokens :]

    def _with_cls(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cls_token is None:
            return tokens
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1)  # [B, 1+N, D]

    # -- forward ------------------------------------------------------------------------------
    def forward_masked(self, x: torch.Tensor, ids_keep: torch.Tensor | None) -> torch.Tensor:
        """Encode only the visible patches (the MAE encoder).

        Args:
            x: Images ``[B, C, H, W]`` or videos ``[B, C, T, H, W]`` in [0, 1].
            ids_keep: ``[B, K]`` indices of visible patches, or None for all.

        Returns:
            ``[B, P + K, D]`` final-norm features ([CLS] first when ``P = num_prefix_tokens`` is 1).
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
            With ``output_hidden_states``: a list of ``depth + 1`` tensors ``[B, P + N, D]`` (index 0 =
            embeddings, i = after block i, no final norm). Otherwise the final-norm features.
        """
        h = self._with_cls(self.embed_patches(images))
        states = [h]
        for blk in self.blocks:
            h = blk(h)
            states.append(h)
        return states if output_hidden_states else self.norm(h)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Final-norm features ``[B, P + N, D]`` (``P = num_prefix_tokens``)."""
        return self.forward_features(images, output_hidden_states=False)

    @torch.no_grad()
    def pooled_features(self, images: torch.Tensor, pool: str = "mean", layers: int = 1) -> torch.Tensor:
        """Features for probing: ``[B, D * layers]``.

        Args:
            pool: ``mean`` (mean of final-norm patch tokens, the MAE linear-probe choice), ``cls`` or
                ``mean+cls`` (both need a [CLS] token).
            layers: Concatenate the pooled features of the last ``layers`` blocks (each through the
                final norm); 1 = final layer only.
        """
        if pool not in ("mean", "cls", "mean+cls"):
            raise ValueError(f"pool must be 'mean', 'cls' or 'mean+cls', not {pool!r}")
        if pool != "mean" and self.cls_token is None:
            raise ValueError(f"pool {pool!r} needs a [CLS] token and this encoder has none; use pool='mean'")
        p = self.num_prefix_tokens
        states = self.forward_features(images, output_hidden_states=True)[-layers:]
        outs = []
        for s in states:
            s = self.norm(s)
            if pool == "mean":
                outs.append(s[:, p:].mean(1))
            elif pool == "cls":
                outs.append(s[:, 0])
            else:
                outs.extend([s[:, p:].mean(1), s[:, 0]])
        return torch.cat(outs, dim=-1)


def flat_sinusoid_table(num_positions: int, dim: int) -> torch.Tensor:
    """VideoMAE's fixed table over a flattened token index: ``[num_positions, dim]`` float32.

    Channel ``j`` of position ``n`` is ``sin(n / 10000**(2 * (j // 2) / dim))`` for even ``j`` and ``cos`` of the
    same angle for odd ``j`` (interleaved, unlike :func:`mmtok.layers.sincos_1d`, which puts all sines first).
    Computed in float64 and rounded once, so it equals the table VideoMAE checkpoints were trained with.
    """
    pos = torch.arange(num_positions, dtype=torch.float64)[:, None]  # [N, 1]
    j = torch.arange(dim)
    angle = pos / torch.pow(torch.tensor(10000.0, dtype=torch.float64), (2 * (j // 2)).double() / dim)  # [N, dim]
    return torch.where(j % 2 == 0, angle.sin(), angle.cos()).float()


def position_table(kind: str, dim: int, grid: tuple[int, int, int], cls_token: bool) -> torch.Tensor:
    """The fixed position table ``[P + N, dim]`` of an encoder or decoder (an all-zero row for [CLS] if any)."""
    if kind == "grid":
        return grid_pos_embed(dim, grid, cls_token=cls_token)
    if kind == "flat":
        table = flat_sinusoid_table(grid[0] * grid[1] * grid[2], dim)  # (t, h, w) raster order, as PatchEmbed
        return torch.cat([torch.zeros(1, dim), table]) if cls_token else table
    raise ValueError(f"pos_embed_type must be one of {POS_EMBED_TYPES}, not {kind!r}")


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

    Raises:
        ValueError: the encoder has no [CLS] token (``cls_token=False``, e.g. a converted VideoMAE).
    """
    if encoder.cls_token is None:
        raise ValueError(
            "cls_attention needs a [CLS] token and this encoder has none (cls_token=False); use a masker or pruner "
            "that does not read [CLS] attention"
        )
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
