"""PCA-like ordered 1D tokenizer (``pca1d_*``): causal slot tokens + nested dropout.

Paper: "Principal Components Enable A New Language of Images" (Semanticist, arXiv:2503.08685).
Reference implementation: visual-gen/semanticist.

Encoder: ViT over ``[patch tokens; K slot tokens]`` with a structured attention mask: patches see only
patches, slot j sees every patch and slots 1..j (causal among slots). Slots are quantized. Nested
dropout in training: per image draw k ~ U{1..K} and replace slots k+1..K by a learned null token
before the decoder. Together they order information like PCA: slot 1 explains the most variance and
each next slot adds less. :func:`explained_variance` measures EV(k) = 1 - E||x - D(z_1..k)||^2 / Var(x)
on held-out images; it must be non-decreasing in k with non-increasing increments
(:func:`pca_property`).

What mmtok does differently: the paper decodes with a diffusion transformer to avoid
"semantic-spectrum coupling"; the decoder here is pluggable (:data:`SLOT_DECODERS`) and the default is
a deterministic ViT decoder (mask tokens at every patch + the slots), which the paper notes makes the
first tokens carry low frequencies rather than semantics. Slots are quantized (FSQ by default, no
codebook to collapse) so the model is a tokenizer with ids, where the paper keeps continuous tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mmtok.registries import QUANTIZERS, TOKENIZERS
from mmtok.tokenizers.base import BaseTokenizer, TokenizerEncoding, TokenizerOutput, quantizer_config
from mmtok.tokenizers.titok import Latent1DDecoder, Latent1DEncoder

# name -> factory(config) -> module mapping [B, K, latent_dim] slots to [B, C, H, W] images
SLOT_DECODERS: dict[str, Callable[..., nn.Module]] = {"vit": Latent1DDecoder}


@dataclass
class PCA1DConfig:
    image_size: int = 32
    in_channels: int = 1
    patch_size: int = 4
    width: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0
    decoder: str = "vit"  # key of SLOT_DECODERS
    decoder_width: int = 0
    decoder_depth: int = 0
    num_latent_tokens: int = 16  # K slots
    latent_dim: int = 16
    nested_dropout: bool = True  # keep the first k ~ U{1..K} slots in training
    # quantizer
    quantizer: str = "fsq"
    codebook_size: int = 1024
    codebook_dim: int = 0
    use_cosine_sim: bool = True
    decay: float = 0.99
    kmeans_init: bool = True
    threshold_ema_dead_code: float = 2.0
    commitment_weight: float = 0.25
    rotation_trick: bool = True
    num_quantizers: int = 4
    levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])


def slot_attention_mask(num_patches: int, num_slots: int) -> Tensor:
    """Additive mask ``[N + K, N + K]`` (0 = may attend, -inf = blocked).

    Patches attend to patches only; slot j attends to all patches and to slots 1..j.
    """
    n, k = num_patches, num_slots
    allowed = torch.zeros(n + k, n + k, dtype=torch.bool)
    allowed[:n, :n] = True
    allowed[n:, :n] = True
    allowed[n:, n:] = torch.tril(torch.ones(k, k, dtype=torch.bool))
    # a float mask works on both timm attention paths (fused SDPA and the explicit softmax)
    return torch.zeros(n + k, n + k).masked_fill(~allowed, float("-inf"))


class PCA1DTokenizer(BaseTokenizer):
    """Ordered 1D tokenizer: ids ``[B, K]``, earlier slots carry more of the image."""

    def __init__(self, config: PCA1DConfig):
        super().__init__()
        if config.image_size % config.patch_size:
            raise ValueError(f"image_size {config.image_size} is not a multiple of patch_size {config.patch_size}")
        if config.decoder not in SLOT_DECODERS:
            raise ValueError(f"unknown slot decoder {config.decoder!r}; available: {', '.join(SLOT_DECODERS)}")
        self.config = config
        n = (config.image_size // config.patch_size) ** 2
        self.encoder = Latent1DEncoder(config, attn_mask=slot_attention_mask(n, config.num_latent_tokens))
        self.decoder = SLOT_DECODERS[config.decoder](config)
        self.quantizer = QUANTIZERS.create(config.quantizer, **vars(quantizer_config(config, config.latent_dim)))
        self.null_token = nn.Parameter(torch.zeros(config.latent_dim))  # stands in for dropped slots

    @property
    def tokens_shape(self) -> tuple[int]:
        return (self.config.num_latent_tokens,)

    @property
    def last_layer(self) -> Tensor:
        return self.decoder.to_pixels.weight

    def encode(self, x: Tensor) -> TokenizerEncoding:
        """Images ``[B, C, H, W]`` in [-1, 1] -> slots ``[B, K, latent_dim]``, ids ``[B, K]``."""
        self.check_input(x)
        q = self.quantizer(self.encoder(x))
        return TokenizerEncoding(q.quantized, q.indices, q.loss)

    def keep_prefix(self, latents: Tensor, keep: Tensor | int) -> Tensor:
        """Replace slots ``keep..K-1`` (0-based) by the null token.

        Args:
            latents: ``[B, K, D]`` slots.
            keep: Number of leading slots kept, an int or ``[B]`` long (1..K).
        """
        b, k, _ = latents.shape
        keep = torch.as_tensor(keep, device=latents.device).expand(b)
        dropped = torch.arange(k, device=latents.device)[None, :] >= keep[:, None]  # [B, K]
        return torch.where(dropped[..., None], self.null_token.to(latents.dtype), latents)

    def decode(self, latents: Tensor) -> Tensor:
        return self.decoder(latents)

    def decode_prefix(self, latents: Tensor, keep: int) -> Tensor:
        """Reconstruct from the first ``keep`` slots only."""
        return self.decode(self.keep_prefix(latents, keep))

    def decode_indices(self, indices: Tensor) -> Tensor:
        return self.decode(self.quantizer.indices_to_latents(indices))

    def forward(self, x: Tensor) -> TokenizerOutput:
        enc = self.encode(x)
        lat = enc.latents
        if self.training and self.config.nested_dropout:
            k = self.config.num_latent_tokens
            keep = torch.randint(1, k + 1, (x.shape[0],), device=x.device)  # k ~ U{1..K}
            lat = self.keep_prefix(lat, keep)
        return TokenizerOutput(self.decode(lat), enc.indices, {"quant": enc.quant_loss})


@torch.no_grad()
def explained_variance(model: PCA1DTokenizer, images: Tensor, batch_size: int = 64) -> list[float]:
    """EV(k) for k = 1..K on ``images`` ``[N, C, H, W]`` in [-1, 1] (held-out data).

    EV(k) = 1 - sum_i ||x_i - D(z_1..k(x_i))||^2 / sum_i ||x_i - mean(x)||^2.
    """
    was = model.training
    model.eval()
    try:
        k = model.config.num_latent_tokens
        mean = images.mean(0, keepdim=True)
        total = float(((images - mean) ** 2).sum())
        err = torch.zeros(k, dtype=torch.float64)
        dev = next(model.parameters()).device
        for i in range(0, images.shape[0], batch_size):
            x = images[i : i + batch_size].to(dev)
            lat = model.encode(x).latents
            for j in range(1, k + 1):
                err[j - 1] += float(((model.decode_prefix(lat, j).float() - x) ** 2).sum())
        return (1.0 - err / max(total, 1e-12)).tolist()
    finally:
        model.train(was)


def pca_property(ev: list[float], tol: float = 0.01) -> dict[str, object]:
    """Check EV(k): non-decreasing (``ev[k+1] >= ev[k] - tol``) with non-increasing increments
    (``inc[k+1] <= inc[k] + tol``). Returns the verdicts and the worst violations."""
    inc = [b - a for a, b in zip(ev, ev[1:])]
    worst_dec = min(inc) if inc else 0.0
    worst_rise = max((b - a for a, b in zip(inc, inc[1:])), default=0.0)
    return {
        "monotone": worst_dec >= -tol,
        "diminishing": worst_rise <= tol,
        "worst_decrease": -min(worst_dec, 0.0),
        "worst_increment_rise": max(worst_rise, 0.0),
        "increments": inc,
    }


def _reg(name: str, help: str, **defaults) -> None:
    TOKENIZERS.add(name, PCA1DTokenizer, config=PCA1DConfig, defaults=defaults, help=help)


_reg("pca1d_tiny_k16", "PCA-ordered 1D tokenizer, 16 causal slots, ViT decoder (32-px grayscale)")
_reg("pca1d_tiny_k8", "PCA-ordered 1D tokenizer, 8 causal slots", num_latent_tokens=8)
_reg(
    "pca1d_small_k32",
    "PCA-ordered 1D tokenizer, 32 slots, width 192, depth 6, RGB 64 px",
    num_latent_tokens=32,
    width=192,
    depth=6,
    num_heads=6,
    in_channels=3,
    image_size=64,
    patch_size=8,
)
