"""Patch and tubelet embedding plus the patchify/unpatchify pair used by pixel targets.

ViT ("An Image is Worth 16x16 Words", arXiv:2010.11929) embeds non-overlapping ``p x p`` patches with
a strided convolution; VideoMAE (arXiv:2203.12602, reference MCG-NJU/VideoMAE) uses a 3D convolution
over ``u x p x p`` tubelets. One class covers both: ``tubelet_size == 1`` and ``num_frames == 1``
gives the 2D case and accepts ``[B, C, H, W]``; otherwise the input is ``[B, C, T, H, W]``.

``patchify`` flattens each patch in (u, p, q, c) order, the MAE layout, so ``unpatchify(patchify(x))``
is exact and a per-patch target can be normalised over its last axis.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

__all__ = ["PatchEmbed", "patchify", "unpatchify"]


class PatchEmbed(nn.Module):
    """Image patches or video tubelets to tokens.

    Args:
        img_size: Square input side in pixels.
        patch_size: Square patch side in pixels.
        in_chans: Input channels.
        embed_dim: Token width.
        num_frames: Frames per clip (1 for images).
        tubelet_size: Frames per tubelet (1 for images).

    Attributes:
        grid_size: ``(t, h, w)`` tokens along each axis (``t == 1`` for images).
        num_patches: ``t * h * w``.
    """

    def __init__(
        self,
        img_size: int,
        patch_size: int,
        in_chans: int,
        embed_dim: int,
        num_frames: int = 1,
        tubelet_size: int = 1,
    ):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        if num_frames % tubelet_size:
            raise ValueError(f"num_frames {num_frames} is not divisible by tubelet_size {tubelet_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.num_frames = num_frames
        self.tubelet_size = tubelet_size
        self.is_video = num_frames > 1 or tubelet_size > 1
        g = img_size // patch_size
        self.grid_size = (num_frames // tubelet_size, g, g)
        self.num_patches = self.grid_size[0] * g * g
        if self.is_video:
            k = (tubelet_size, patch_size, patch_size)
            self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=k, stride=k)
        else:
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` with the expected shape if ``x`` does not fit this embed."""
        if self.is_video:
            want = (self.in_chans, self.num_frames, self.img_size, self.img_size)
            if x.ndim != 5 or tuple(x.shape[1:]) != want:
                raise ValueError(f"expected videos [B, C, T, H, W] with (C, T, H, W) = {want}, got {tuple(x.shape)}")
        else:
            want = (self.in_chans, self.img_size, self.img_size)
            if x.ndim != 4 or tuple(x.shape[1:]) != want:
                raise ValueError(
                    f"expected images [B, C, H, W] with (C, H, W) = {want}, got {tuple(x.shape)}; "
                    "resize/convert the input or build the model with matching img_size/in_chans"
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` or ``[B, C, T, H, W]`` -> ``[B, N, D]`` tokens in (t, h, w) raster order."""
        self.check_input(x)
        x = self.proj(x)
        if self.is_video:
            return rearrange(x, "b d t h w -> b (t h w) d")
        return rearrange(x, "b d h w -> b (h w) d")


def patchify(x: torch.Tensor, patch_size: int, tubelet_size: int = 1) -> torch.Tensor:
    """Images ``[B, C, H, W]`` -> ``[B, N, p*p*C]``; videos ``[B, C, T, H, W]`` -> ``[B, N, u*p*p*C]``."""
    p = patch_size
    if x.ndim == 4:
        return rearrange(x, "b c (h p) (w q) -> b (h w) (p q c)", p=p, q=p)
    if x.ndim == 5:
        return rearrange(x, "b c (t u) (h p) (w q) -> b (t h w) (u p q c)", u=tubelet_size, p=p, q=p)
    raise ValueError(f"patchify expects 4D images or 5D videos, got shape {tuple(x.shape)}")


def unpatchify(
    patches: torch.Tensor, patch_size: int, grid: tuple[int, int, int], channels: int, tubelet_size: int = 1
) -> torch.Tensor:
    """Inverse of :func:`patchify`; ``grid`` is ``(t, h, w)``; ``t == 1`` and ``tubelet_size == 1`` gives images."""
    t, h, w = grid
    p = patch_size
    if t == 1 and tubelet_size == 1:
        return rearrange(patches, "b (h w) (p q c) -> b c (h p) (w q)", h=h, w=w, p=p, q=p, c=channels)
    return rearrange(
        patches, "b (t h w) (u p q c) -> b c (t u) (h p) (w q)", t=t, h=h, w=w, u=tubelet_size, p=p, q=p, c=channels
    )
