"""VQGAN-style convolutional grid tokenizer (``vq_*``).

Papers: "Taming Transformers for High-Resolution Image Synthesis" (VQGAN, arXiv:2012.09841);
"Autoregressive Model Beats Diffusion: Llama for Scalable Image Generation" (LlamaGen VQ, arXiv:2406.06525).
Reference implementations: CompVis/taming-transformers, FoundationVision/LlamaGen.

A conv encoder (residual blocks, stride-2 downsampling ``log2(f)`` times) maps ``[B, C, H, W]`` images
to a ``[B, D, H/f, W/f]`` latent grid; every latent vector is quantized; a mirrored decoder (nearest
upsampling + conv) reconstructs the image. Perceptual and adversarial losses live in the training task
(:mod:`mmtok.tokenizers.losses`), not in the model, so the model file stays a pure autoencoder.

What mmtok does differently: the quantizer is the pinned vector-quantize-pytorch adapter (EMA, k-means
init, dead-code restart, low-dim l2-normalised codes as in LlamaGen: usage is measured, not assumed);
the commitment weight applies to the encoder term only (taming's ``legacy=True`` applies it to the
wrong term, REFERENCES 1.1); widths are small by default so it trains on a CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from einops import rearrange
from torch import Tensor, nn

from mmtok.registries import QUANTIZERS, TOKENIZERS
from mmtok.tokenizers.base import BaseTokenizer, TokenizerEncoding, quantizer_config


@dataclass
class VQConfig:
    image_size: int = 32  # square input side (multiple of downsample)
    in_channels: int = 1  # 1 grayscale, 3 RGB
    downsample: int = 4  # f: 4, 8 or 16 (any power of two)
    base_channels: int = 32
    channel_mult: list[int] = field(default_factory=list)  # per resolution level; [] = 1, 2, 2, 4, ...
    num_res_blocks: int = 1
    latent_dim: int = 32  # channels of the latent grid
    # quantizer
    quantizer: str = "vq"  # vq | rvq | fsq
    codebook_size: int = 1024
    codebook_dim: int = 8  # low-dim lookup (LlamaGen: 8); 0 = latent_dim
    use_cosine_sim: bool = True  # l2-normalised codes (LlamaGen)
    decay: float = 0.99
    kmeans_init: bool = True
    threshold_ema_dead_code: float = 2.0  # EMA hits per code and step below which a code is restarted
    reset_cluster_size: float = 0.0  # EMA hits per step a restarted code starts from (0 = the threshold)
    commitment_weight: float = 0.25
    rotation_trick: bool = True
    num_quantizers: int = 4
    levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])


def _groups(ch: int) -> int:
    return math.gcd(ch, 32) if ch >= 8 else 1


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a skip (1x1 conv when widths differ)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.GroupNorm(_groups(cin), cin),
            nn.SiLU(),
            nn.Conv2d(cin, cout, 3, padding=1),
            nn.GroupNorm(_groups(cout), cout),
            nn.SiLU(),
            nn.Conv2d(cout, cout, 3, padding=1),
        )
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.block(x)


def _mults(cfg: VQConfig, levels: int) -> list[int]:
    if cfg.channel_mult:
        if len(cfg.channel_mult) != levels:
            raise ValueError(f"channel_mult needs {levels} entries for downsample {cfg.downsample}")
        return list(cfg.channel_mult)
    return [min(2**i, 4) if i else 1 for i in range(levels)]


class ConvEncoder(nn.Module):
    """``[B, C, H, W]`` -> ``[B, latent_dim, H/f, W/f]``."""

    def __init__(self, cfg: VQConfig, n_down: int):
        super().__init__()
        chans = [cfg.base_channels * m for m in _mults(cfg, n_down + 1)]
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)]
        for i in range(n_down + 1):
            cin = chans[max(i - 1, 0)]
            for j in range(cfg.num_res_blocks):
                layers.append(ResBlock(cin if j == 0 else chans[i], chans[i]))
            if i < n_down:
                layers.append(nn.Conv2d(chans[i], chans[i], 4, stride=2, padding=1))  # halves H and W
        layers += [ResBlock(chans[-1], chans[-1]), nn.GroupNorm(_groups(chans[-1]), chans[-1]), nn.SiLU()]
        layers.append(nn.Conv2d(chans[-1], cfg.latent_dim, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ConvDecoder(nn.Module):
    """``[B, latent_dim, h, w]`` -> ``[B, C, h*f, w*f]`` (mirror of the encoder)."""

    def __init__(self, cfg: VQConfig, n_down: int):
        super().__init__()
        chans = [cfg.base_channels * m for m in _mults(cfg, n_down + 1)][::-1]
        layers: list[nn.Module] = [nn.Conv2d(cfg.latent_dim, chans[0], 3, padding=1), ResBlock(chans[0], chans[0])]
        for i in range(n_down + 1):
            cin = chans[max(i - 1, 0)]
            for j in range(cfg.num_res_blocks):
                layers.append(ResBlock(cin if j == 0 else chans[i], chans[i]))
            if i < n_down:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(chans[i], chans[i], 3, padding=1)]
        layers += [nn.GroupNorm(_groups(chans[-1]), chans[-1]), nn.SiLU()]
        self.net = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(chans[-1], cfg.in_channels, 3, padding=1)  # "last layer" of the adaptive GAN weight

    def forward(self, z: Tensor) -> Tensor:
        return self.conv_out(self.net(z))


class VQTokenizer(BaseTokenizer):
    """Conv encoder -> per-position quantizer -> conv decoder; ids form an ``(H/f) x (W/f)`` grid."""

    def __init__(self, config: VQConfig):
        super().__init__()
        f = config.downsample
        if f < 1 or f & (f - 1):
            raise ValueError(f"downsample must be a power of two (4, 8, 16), got {f}")
        if config.image_size % f:
            raise ValueError(f"image_size {config.image_size} is not a multiple of downsample {f}")
        self.config = config
        n_down = int(math.log2(f))
        self.encoder = ConvEncoder(config, n_down)
        self.decoder = ConvDecoder(config, n_down)
        qcfg = quantizer_config(config, config.latent_dim)
        qcfg.reset_cluster_size = config.reset_cluster_size  # not among the fields every tokenizer shares
        self.quantizer = QUANTIZERS.create(config.quantizer, **vars(qcfg))

    @property
    def tokens_shape(self) -> tuple[int, int]:
        s = self.config.image_size // self.config.downsample
        return (s, s)

    @property
    def last_layer(self) -> Tensor:
        return self.decoder.conv_out.weight

    def encode(self, x: Tensor) -> TokenizerEncoding:
        """Images ``[B, C, H, W]`` in [-1, 1] -> latents ``[B, D, h, w]``, ids ``[B, h, w]`` (``[B, h, w, Q]`` rvq)."""
        self.check_input(x)
        z = self.encoder(x)
        h, w = z.shape[-2:]
        q = self.quantizer(rearrange(z, "b d h w -> b (h w) d"))
        latents = rearrange(q.quantized, "b (h w) d -> b d h w", h=h, w=w)
        ids = rearrange(q.indices, "b (h w) ... -> b h w ...", h=h, w=w)
        return TokenizerEncoding(latents, ids, q.loss)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents ``[B, D, h, w]`` -> images ``[B, C, H, W]`` (unbounded; [-1, 1] when trained)."""
        return self.decoder(latents)

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Ids ``[B, h, w]`` (``[B, h, w, Q]``) -> images."""
        h, w = indices.shape[1:3]
        flat = rearrange(indices, "b h w ... -> b (h w) ...")
        lat = self.quantizer.indices_to_latents(flat)
        return self.decode(rearrange(lat, "b (h w) d -> b d h w", h=h, w=w))


def _reg(name: str, help: str, **defaults) -> None:
    TOKENIZERS.add(name, VQTokenizer, config=VQConfig, defaults=defaults, help=help)


_reg(
    "vq_tiny_f4",
    "VQ conv tokenizer, f4, width 16, 256 codes (32-px grayscale, tests)",
    base_channels=16,
    codebook_size=256,
)
_reg("vq_small_f4", "VQ conv tokenizer, f4, width 32, 1024 codes (Fashion-MNIST, 32 px)", base_channels=32)
_reg(
    "vq_small_f8",
    "VQ conv tokenizer, f8, width 32, RGB 128 px (photos)",
    downsample=8,
    base_channels=32,
    in_channels=3,
    image_size=128,
)
_reg(
    "vq_small_f16",
    "VQ conv tokenizer, f16, width 32, RGB 256 px",
    downsample=16,
    base_channels=32,
    in_channels=3,
    image_size=256,
)
_reg(
    "rvq_small_f8",
    "residual-VQ conv tokenizer (4 levels), f8, RGB 128 px",
    quantizer="rvq",
    downsample=8,
    base_channels=32,
    in_channels=3,
    image_size=128,
    codebook_size=256,
)
_reg("fsq_small_f4", "FSQ conv tokenizer (levels 8,5,5,5 = 1000 codes), f4", quantizer="fsq", base_channels=32)
