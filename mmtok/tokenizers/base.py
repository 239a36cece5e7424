"""What every visual tokenizer of mmtok shares: output dataclasses, range helpers, the base class.

A tokenizer maps images ``[B, C, H, W]`` in [-1, 1] to discrete ids and back:

* ``encode(x) -> TokenizerEncoding`` (quantized latents + ids + quantizer loss),
* ``decode(latents) -> images``, ``decode_indices(ids) -> images``,
* ``forward(x) -> TokenizerOutput(recon, indices, losses)``.

``decode_indices(encode(x).indices)`` equals ``decode(encode(x).latents)`` in eval mode (tested for
every registered tokenizer). The data layer gives images in [0, 1] and metrics take [0, 1]; the
conversions are the explicit helpers :func:`to_model_range` and :func:`to_unit_range`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mmtok.hub import HubMixin
from mmtok.tokenizers.quantizers import Quantizer, QuantizerConfig


def to_model_range(x: Tensor) -> Tensor:
    """[0, 1] images -> [-1, 1] (the model boundary)."""
    return x * 2.0 - 1.0


def to_unit_range(x: Tensor) -> Tensor:
    """[-1, 1] model outputs -> [0, 1], clamped (for metrics and saving)."""
    return ((x + 1.0) * 0.5).clamp(0.0, 1.0)


@dataclass
class TokenizerEncoding:
    """Result of ``encode``.

    Attributes:
        latents: Quantized latents the decoder consumes (``[B, D, h, w]`` for grid tokenizers,
            ``[B, K, D]`` for 1D tokenizers).
        indices: Code ids (``[B, h, w]`` grid / ``[B, K]`` 1D; residual VQ adds a last ``Q`` axis).
        quant_loss: Scalar quantizer loss (commitment), zero outside training.
    """

    latents: Tensor
    indices: Tensor
    quant_loss: Tensor


@dataclass
class TokenizerOutput:
    """Result of ``forward``: reconstruction in [-1, 1], ids, and named scalar losses (unweighted
    reconstruction terms plus the already-weighted quantizer loss)."""

    recon: Tensor
    indices: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)


def quantizer_config(cfg, dim: int) -> QuantizerConfig:
    """The quantizer fields of a tokenizer config (the same names) for vectors of width ``dim``."""
    return QuantizerConfig(
        dim=dim,
        codebook_size=cfg.codebook_size,
        codebook_dim=cfg.codebook_dim,
        use_cosine_sim=cfg.use_cosine_sim,
        decay=cfg.decay,
        kmeans_init=cfg.kmeans_init,
        threshold_ema_dead_code=cfg.threshold_ema_dead_code,
        commitment_weight=cfg.commitment_weight,
        rotation_trick=cfg.rotation_trick,
        num_quantizers=cfg.num_quantizers,
        levels=list(cfg.levels),
    )


class BaseTokenizer(nn.Module, HubMixin):
    """Common plumbing; subclasses implement ``encode``, ``decode`` and ``decode_indices``."""

    hub_kind = "tokenizer"
    quantizer: Quantizer
    config: object

    def check_input(self, x: Tensor) -> None:
        c, s = self.config.in_channels, self.config.image_size
        if x.ndim != 4 or x.shape[1] != c or x.shape[-2:] != (s, s):
            raise ValueError(
                f"{type(self).__name__} expects images [B, {c}, {s}, {s}] in [-1, 1], got {tuple(x.shape)}; "
                "resize / convert channels first (the tokenizer task's sample_transform does this)"
            )

    def encode(self, x: Tensor) -> TokenizerEncoding:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, latents: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode_indices(self, indices: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> TokenizerOutput:
        enc = self.encode(x)
        recon = self.decode(enc.latents)
        return TokenizerOutput(recon, enc.indices, {"quant": enc.quant_loss})

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    @property
    def tokens_shape(self) -> tuple[int, ...]:
        """Shape of one image's id array (``(h, w)`` or ``(K,)``), without a residual axis."""
        raise NotImplementedError

    def codebook_stats(self) -> dict[str, float]:
        """Usage / perplexity over recent training assignments."""
        return self.quantizer.stats()

    @torch.no_grad()
    def tokenize(self, x: Tensor) -> Tensor:
        """Eval-mode ids of ``x`` ([-1, 1] images); convenience for shard writers and BPE."""
        was = self.training
        self.eval()
        try:
            return self.encode(x).indices
        finally:
            self.train(was)
