"""Masked token modeling on tokenizer codes, with MaskGIT iterative decoding.

BEiT (arXiv:2106.08254) predicts hidden visual-token ids from the visible ones; MaskGIT (Chang et al.,
arXiv:2202.04200; reference google-research/maskgit ``maskgit/libml/parallel_decode.py``) trains the
same bidirectional transformer with a cosine mask schedule and generates by iterative decoding:
start fully masked, predict every hidden token, keep the most confident ones and re-mask the rest,
with the number still masked following ``cos(pi/2 * step/steps)`` and Gumbel noise on the confidences
annealed linearly to zero. SeiT++ (arXiv:2312.10105) trains directly on stored token shards, which is
how mmtok feeds this model (``codes.npy`` samples).

What differs from the references: fixed 2D sine-cosine positions (the grid is known) instead of
learned ones, an untied output head, decoding that also inpaints (given tokens stay fixed), and a
last step that always leaves no token masked. Pixels come from any tokenizer with
``decode_indices(ids [B, h, w]) -> images [B, C, H, W] in [-1, 1]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from mmtok.hub import HubMixin
from mmtok.layers import sincos_2d
from mmtok.mim.vit import init_vit_weights
from mmtok.registries import MIM_MODELS

__all__ = ["MTM", "MTMConfig", "MTMOutput", "cosine_schedule"]


@dataclass
class MTMConfig:
    codebook_size: int = 1024  # ids 0..V-1; id V is [MASK]
    grid_h: int = 16
    grid_w: int = 16
    embed_dim: int = 256
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    label_smoothing: float = 0.1  # MaskGIT uses 0.1


@dataclass
class MTMOutput:
    """``loss`` (CE over hidden tokens), ``logits [B, N, V]``, ``accuracy`` of hidden-token argmax."""

    loss: torch.Tensor
    logits: torch.Tensor
    accuracy: torch.Tensor
    mask: torch.Tensor


def cosine_schedule(r: torch.Tensor | float) -> torch.Tensor | float:
    """MaskGIT's mask schedule: share of tokens hidden at progress ``r`` in [0, 1] (1 -> 0)."""
    if torch.is_tensor(r):
        return torch.cos(r * math.pi / 2)
    return math.cos(r * math.pi / 2)


class MTM(nn.Module, HubMixin):
    """Bidirectional transformer over a ``grid_h x grid_w`` grid of code ids."""

    hub_kind = "mim model"

    def __init__(self, config: MTMConfig):
        super().__init__()
        c = config
        self.config = c
        self.num_tokens = c.grid_h * c.grid_w
        self.mask_id = c.codebook_size
        self.tok_embed = nn.Embedding(c.codebook_size + 1, c.embed_dim)
        self.register_buffer("pos_embed", sincos_2d(c.embed_dim, c.grid_h, c.grid_w)[None], persistent=False)
        self.blocks = nn.ModuleList(
            Block(c.embed_dim, c.num_heads, c.mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm) for _ in range(c.depth)
        )
        self.norm = nn.LayerNorm(c.embed_dim)
        self.head = nn.Linear(c.embed_dim, c.codebook_size)
        init_vit_weights(self)
        nn.init.normal_(self.tok_embed.weight, std=0.02)

    def check_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """``[B, h, w]`` or ``[B, N]`` ids -> ``[B, N]`` long, with a clear error on bad shapes/ids."""
        codes = codes.reshape(codes.shape[0], -1).long()
        if codes.shape[1] != self.num_tokens:
            raise ValueError(
                f"expected {self.num_tokens} codes per sample (grid {self.config.grid_h}x{self.config.grid_w}), "
                f"got {codes.shape[1]}; set grid_h/grid_w to the tokenizer's grid"
            )
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > self.mask_id):
            raise ValueError(
                f"code ids must be in [0, {self.config.codebook_size}) (or the mask id {self.mask_id}); got "
                f"[{int(codes.min())}, {int(codes.max())}]: set codebook_size to the tokenizer's"
            )
        return codes

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` ids (``mask_id`` where hidden) -> ``[B, N, V]`` logits."""
        h = self.tok_embed(ids) + self.pos_embed
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.norm(h))

    def random_mask(self, batch_size: int, device: torch.device, generator: torch.Generator | None = None):
        """Cosine-schedule training mask ``[B, N]`` bool: per sample ``ceil(cos(pi/2 u) N)`` hidden, u ~ U(0, 1)."""
        n = self.num_tokens
        u = torch.rand(batch_size, generator=generator).to(device)
        n_hidden = torch.ceil(cosine_schedule(u) * n).clamp(1, n)  # [B]
        noise = torch.rand(batch_size, n, generator=generator).to(device)
        rank = torch.argsort(torch.argsort(noise, dim=1), dim=1)  # each token's random rank
        return rank < n_hidden[:, None]

    def forward(self, codes: torch.Tensor, mask: torch.Tensor | None = None) -> MTMOutput:
        """Hide ``mask`` (default: cosine schedule), predict the hidden codes.

        Args:
            codes: ``[B, h, w]`` or ``[B, N]`` code ids.
            mask: ``[B, N]`` bool, True = hidden.
        """
        codes = self.check_codes(codes)
        if mask is None:
            mask = self.random_mask(codes.shape[0], codes.device)
        inputs = torch.where(mask, torch.full_like(codes, self.mask_id), codes)
        logits = self.logits(inputs)
        ce = F.cross_entropy(
            logits.float().transpose(1, 2), codes, reduction="none", label_smoothing=self.config.label_smoothing
        )  # [B, N]
        m = mask.float()
        loss = (ce * m).sum() / m.sum().clamp_min(1.0)
        acc = ((logits.argmax(-1) == codes).float() * m).sum() / m.sum().clamp_min(1.0)
        return MTMOutput(loss, logits, acc, mask)

    @torch.no_grad()
    def generate(
        self,
        batch_size: int = 1,
        steps: int = 8,
        codes: torch.Tensor | None = None,
        known: torch.Tensor | None = None,
        sample_temperature: float = 1.0,
        choice_temperature: float = 4.5,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """MaskGIT iterative decoding (generation, or inpainting when ``codes``/``known`` are given).

        Args:
            batch_size: Samples to generate (ignored when ``codes`` is given).
            steps: Decoding steps; after the last one no token is masked.
            codes: ``[B, N]`` or ``[B, h, w]`` ids whose ``known`` positions are kept fixed.
            known: ``[B, N]`` bool, True = given (inpainting); None with ``codes`` = nothing given.
            sample_temperature: Softmax temperature of the token draws.
            choice_temperature: Scale of the Gumbel noise on confidences, annealed by ``1 - step/steps``.

        Returns:
            ``[B, N]`` long ids, all in ``[0, codebook_size)``.
        """
        if steps < 1:
            raise ValueError("steps must be >= 1")
        device = self.pos_embed.device
        n = self.num_tokens
        if codes is not None:
            codes = self.check_codes(codes.to(device))
            batch_size = codes.shape[0]
            known = (
                torch.zeros_like(codes, dtype=torch.bool) if known is None else known.to(device).reshape(codes.shape)
            )
            ids = torch.where(known, codes, torch.full_like(codes, self.mask_id))
        else:
            ids = torch.full((batch_size, n), self.mask_id, dtype=torch.long, device=device)
        unknown = ids == self.mask_id  # [B, N]
        n_unknown = unknown.sum(1, keepdim=True)  # [B, 1] tokens to fill in total

        def rand(shape):
            return torch.rand(shape, generator=generator).to(device)

        for step in range(steps):
            logits = self.logits(ids).float() / max(sample_temperature, 1e-6)
            probs = logits.softmax(-1)  # [B, N, V]
            sampled = torch.multinomial(probs.reshape(-1, probs.shape[-1]).cpu(), 1, generator=generator)
            sampled = sampled.to(device).reshape(batch_size, n)
            conf = torch.gather(probs, -1, sampled[..., None]).squeeze(-1).clamp_min(1e-20).log()
            sampled = torch.where(unknown, sampled, ids)
            ratio = (step + 1) / steps
            # tokens still hidden after this step; exactly 0 after the last, >= 1 fewer each step
            n_mask = torch.floor(n_unknown * cosine_schedule(ratio)).long()
            n_mask = torch.minimum(n_mask, (unknown.sum(1, keepdim=True) - 1).clamp_min(0))
            if step == steps - 1:
                n_mask = torch.zeros_like(n_mask)
            gumbel = -torch.log(-torch.log(rand(conf.shape).clamp(1e-20, 1.0 - 1e-7)))
            conf = conf + choice_temperature * (1.0 - ratio) * gumbel
            conf = torch.where(unknown, conf, torch.full_like(conf, math.inf))  # fixed tokens never re-masked
            rank = torch.argsort(torch.argsort(conf, dim=1), dim=1)  # 0 = least confident
            remask = rank < n_mask
            ids = torch.where(remask, torch.full_like(sampled, self.mask_id), sampled)
            unknown = remask
        return ids

    @staticmethod
    def decode_pixels(tokenizer, ids: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Code ids ``[B, N]`` -> images in [0, 1] with ``tokenizer.decode_indices`` (which returns [-1, 1])."""
        if not hasattr(tokenizer, "decode_indices"):
            raise TypeError(f"{type(tokenizer).__name__} has no decode_indices(ids); pass an mmtok tokenizer")
        imgs = tokenizer.decode_indices(ids.reshape(ids.shape[0], *grid))
        return ((imgs.float() + 1) / 2).clamp(0, 1)


_SIZES = {
    "micro": {"embed_dim": 32, "depth": 2, "num_heads": 2},
    "tiny": {"embed_dim": 192, "depth": 6, "num_heads": 3},
    "small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
}
MIM_MODELS.add("mtm", MTM, config=MTMConfig, help="masked token model with every field from the config")
for _size, _shape in _SIZES.items():
    MIM_MODELS.add(f"mtm_{_size}", MTM, config=MTMConfig, defaults=_shape, help=f"MaskGIT-style MTM, {_size}")
