"""TiTok-style 1D tokenizer (``titok_*``): K latent tokens summarise an image.

Paper: "An Image is Worth 32 Tokens for Reconstruction and Generation" (TiTok, arXiv:2406.07550);
TA-TiTok / MaskGen (arXiv:2501.07730) for one-stage training from pixels.
Reference implementation: bytedance/1d-tokenizer.

Encoder: ViT over ``[patch tokens; K learnable latent tokens]``; only the K latents leave the encoder,
are projected to a small width (TiTok: 12) and quantized (l2-normalised codebook). Decoder: ViT over
``[a mask token at every patch position; the K quantized latents]``; the patch positions predict pixels.

What mmtok does differently: one-stage training straight from pixels (TiTok's first stage distils
proxy codes of a pretrained VQGAN, which we do not have offline); the quantizer is the shared adapter
with k-means init and dead-code re-initialisation, the practical recipe against the collapse users
report when training from scratch (REFERENCES 1.2). Blocks are timm's (SDPA attention).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from einops import repeat
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from mmtok.layers.patch_embed import patchify, unpatchify
from mmtok.layers.pos_embed import sincos_2d
from mmtok.registries import QUANTIZERS, TOKENIZERS
from mmtok.tokenizers.base import BaseTokenizer, TokenizerEncoding, quantizer_config


@dataclass
class TiTokConfig:
    image_size: int = 32
    in_channels: int = 1
    patch_size: int = 4
    width: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0
    decoder_width: int = 0  # 0 = width
    decoder_depth: int = 0  # 0 = depth
    num_latent_tokens: int = 32  # K
    latent_dim: int = 12  # width of a latent token at the quantizer (TiTok: 12)
    # quantizer
    quantizer: str = "vq"
    codebook_size: int = 1024
    codebook_dim: int = 0  # 0 = latent_dim
    use_cosine_sim: bool = True
    decay: float = 0.99
    kmeans_init: bool = True
    threshold_ema_dead_code: float = 2.0
    commitment_weight: float = 0.25
    rotation_trick: bool = True
    num_quantizers: int = 4
    levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])


class ViTStack(nn.Module):
    """``depth`` timm blocks + final LayerNorm; ``attn_mask`` (bool, True = may attend) is optional."""

    def __init__(self, width: int, depth: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.to(x.dtype)  # SDPA wants the query's dtype (bf16 under autocast)
        for blk in self.blocks:
            x = blk(x, attn_mask=attn_mask)
        return self.norm(x)


class Latent1DEncoder(nn.Module):
    """Pixels ``[B, C, H, W]`` -> K latent vectors ``[B, K, latent_dim]``."""

    def __init__(self, cfg, attn_mask: Tensor | None = None):
        super().__init__()
        p, g = cfg.patch_size, cfg.image_size // cfg.patch_size
        self.patch_size = p
        self.patch_embed = nn.Linear(p * p * cfg.in_channels, cfg.width)
        self.register_buffer("pos_embed", sincos_2d(cfg.width, g, g)[None], persistent=False)  # [1, N, W]
        scale = cfg.width**-0.5
        self.latent_tokens = nn.Parameter(scale * torch.randn(cfg.num_latent_tokens, cfg.width))
        self.latent_pos = nn.Parameter(scale * torch.randn(cfg.num_latent_tokens, cfg.width))
        self.vit = ViTStack(cfg.width, cfg.depth, cfg.num_heads, cfg.mlp_ratio)
        self.to_latent = nn.Linear(cfg.width, cfg.latent_dim)
        self.register_buffer("attn_mask", attn_mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        patches = self.patch_embed(patchify(x, self.patch_size)) + self.pos_embed  # [B, N, W]
        lat = repeat(self.latent_tokens + self.latent_pos, "k w -> b k w", b=b)
        h = self.vit(torch.cat([patches, lat], dim=1), attn_mask=self.attn_mask)  # [B, N + K, W]
        return self.to_latent(h[:, patches.shape[1] :])  # only the latents leave the encoder


class Latent1DDecoder(nn.Module):
    """K latent vectors ``[B, K, latent_dim]`` -> pixels ``[B, C, H, W]`` via mask tokens at every patch."""

    def __init__(self, cfg):
        super().__init__()
        width = cfg.decoder_width or cfg.width
        depth = cfg.decoder_depth or cfg.depth
        p, g = cfg.patch_size, cfg.image_size // cfg.patch_size
        self.patch_size, self.grid, self.channels = p, g, cfg.in_channels
        self.from_latent = nn.Linear(cfg.latent_dim, width)
        scale = width**-0.5
        self.latent_pos = nn.Parameter(scale * torch.randn(cfg.num_latent_tokens, width))
        self.mask_token = nn.Parameter(scale * torch.randn(width))
        self.register_buffer("pos_embed", sincos_2d(width, g, g)[None], persistent=False)
        self.vit = ViTStack(width, depth, cfg.num_heads, cfg.mlp_ratio)
        self.to_pixels = nn.Linear(width, p * p * cfg.in_channels)

    def forward(self, latents: Tensor) -> Tensor:
        b = latents.shape[0]
        masks = self.mask_token + self.pos_embed.expand(b, -1, -1)  # [B, N, W]
        lat = self.from_latent(latents) + self.latent_pos  # [B, K, W]
        h = self.vit(torch.cat([masks, lat], dim=1))
        patches = self.to_pixels(h[:, : masks.shape[1]])  # [B, N, p*p*C]
        return unpatchify(patches, self.patch_size, (1, self.grid, self.grid), self.channels)


class TiTokTokenizer(BaseTokenizer):
    """1D tokenizer: an image becomes K ids (``[B, K]``)."""

    def __init__(self, config: TiTokConfig):
        super().__init__()
        if config.image_size % config.patch_size:
            raise ValueError(f"image_size {config.image_size} is not a multiple of patch_size {config.patch_size}")
        self.config = config
        self.encoder = Latent1DEncoder(config)
        self.decoder = Latent1DDecoder(config)
        self.quantizer = QUANTIZERS.create(config.quantizer, **vars(quantizer_config(config, config.latent_dim)))

    @property
    def tokens_shape(self) -> tuple[int]:
        return (self.config.num_latent_tokens,)

    @property
    def last_layer(self) -> Tensor:
        return self.decoder.to_pixels.weight

    def encode(self, x: Tensor) -> TokenizerEncoding:
        """Images ``[B, C, H, W]`` in [-1, 1] -> latents ``[B, K, latent_dim]``, ids ``[B, K]``."""
        self.check_input(x)
        q = self.quantizer(self.encoder(x))
        return TokenizerEncoding(q.quantized, q.indices, q.loss)

    def decode(self, latents: Tensor) -> Tensor:
        return self.decoder(latents)

    def decode_indices(self, indices: Tensor) -> Tensor:
        return self.decode(self.quantizer.indices_to_latents(indices))


def _reg(name: str, help: str, **defaults) -> None:
    TOKENIZERS.add(name, TiTokTokenizer, config=TiTokConfig, defaults=defaults, help=help)


_reg("titok_tiny_k32", "TiTok 1D tokenizer, 32 tokens, width 64, depth 2 (32-px grayscale)")
_reg("titok_tiny_k16", "TiTok 1D tokenizer, 16 tokens, width 64, depth 2", num_latent_tokens=16)
_reg(
    "titok_small_k64",
    "TiTok 1D tokenizer, 64 tokens, width 192, depth 6, RGB 64 px",
    num_latent_tokens=64,
    width=192,
    depth=6,
    num_heads=6,
    in_channels=3,
    image_size=64,
    patch_size=8,
)
