"""Fixed sine-cosine position embeddings for 1D, 2D and 3D token grids.

"Attention Is All You Need" (arXiv:1706.03762) gives the 1D form; MAE (arXiv:2111.06377, reference
implementation facebookresearch/mae ``util/pos_embed.py``) builds the 2D form by giving half of the
channels to the row index and half to the column index. For video grids we split the channels three
ways (time, height, width), which VideoMAE approximates with a 1D embedding of the flattened index;
the separable form keeps the spatial part identical across frames, which tube masking relies on.

Differences from the reference: pure torch (no numpy), float32 output, any even width (the 3D split
gives each spatial axis an even share and time the rest instead of requiring ``dim % 6 == 0``).
"""

from __future__ import annotations

import torch

__all__ = ["grid_pos_embed", "sincos_1d", "sincos_2d", "sincos_3d"]


def sincos_1d(dim: int, positions: torch.Tensor, temperature: float = 10000.0) -> torch.Tensor:
    """Sine-cosine embedding of arbitrary (possibly fractional) positions.

    Args:
        dim: Output width; must be even (half sine, half cosine).
        positions: ``[N]`` positions.
        temperature: Longest wavelength scale.

    Returns:
        ``[N, dim]`` float32, first half ``sin``, second half ``cos``.
    """
    if dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / temperature**omega  # [dim/2]
    out = positions.double().reshape(-1)[:, None] * omega[None, :]  # [N, dim/2]
    return torch.cat([out.sin(), out.cos()], dim=1).float()


def sincos_2d(dim: int, grid_h: int, grid_w: int, cls_token: bool = False) -> torch.Tensor:
    """2D embedding of an ``grid_h x grid_w`` grid in raster order (MAE layout).

    Args:
        dim: Width; must be divisible by 4 (each axis gets half, itself half sine half cosine).
        grid_h: Rows.
        grid_w: Columns.
        cls_token: Prepend an all-zero row for a [CLS] token.

    Returns:
        ``[grid_h * grid_w (+1), dim]`` float32.
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos embedding width must be divisible by 4, got {dim}")
    hh, ww = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    # MAE puts the column (w) index in the first half and the row (h) index in the second half
    emb = torch.cat([sincos_1d(dim // 2, ww.reshape(-1)), sincos_1d(dim // 2, hh.reshape(-1))], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim), emb], dim=0)
    return emb


def sincos_3d(dim: int, grid_t: int, grid_h: int, grid_w: int, cls_token: bool = False) -> torch.Tensor:
    """Separable 3D embedding of a ``t x h x w`` grid, flattened in (t, h, w) order.

    Channels: ``ds`` for width, ``ds`` for height (``ds`` = even part of ``dim // 3``), the rest for time.

    Returns:
        ``[grid_t * grid_h * grid_w (+1), dim]`` float32.
    """
    if dim % 2:
        raise ValueError(f"3D sin-cos embedding width must be even, got {dim}")
    ds = (dim // 3) // 2 * 2
    dt = dim - 2 * ds
    if ds == 0:
        raise ValueError(f"3D sin-cos embedding width {dim} is too small; use at least 6")
    tt, hh, ww = torch.meshgrid(torch.arange(grid_t), torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    emb = torch.cat(
        [
            sincos_1d(ds, ww.reshape(-1)),
            sincos_1d(ds, hh.reshape(-1)),
            sincos_1d(dt, tt.reshape(-1)),
        ],
        dim=1,
    )
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim), emb], dim=0)
    return emb


def grid_pos_embed(dim: int, grid: tuple[int, int, int], cls_token: bool = False) -> torch.Tensor:
    """2D embedding when ``grid[0] == 1`` (images), else 3D; ``grid`` is ``(t, h, w)``."""
    t, h, w = grid
    if t == 1:
        return sincos_2d(dim, h, w, cls_token)
    return sincos_3d(dim, t, h, w, cls_token)
