"""Refinement of a coarse segmentation grid to full resolution: nearest, bilinear, guided filter.

Text-as-mask decoders and the all-mask head give one score per patch (``[gh, gw]``, e.g. 16 x 16); the
image is ``[H, W]``. Text4Seg (arXiv:2410.09855) refines with SAM or a CRF, and users report that SAM
sometimes lowers the score; mmtok keeps refinement optional and pluggable, with three methods that need no
extra model (pure numpy):

* ``none``: nearest upsampling (cell-centre rule, as :func:`mmtok.mllm.seg.formats.resize_nearest`).
* ``bilinear``: bilinear upsampling of the soft scores, with torch's ``F.interpolate(mode="bilinear",
  align_corners=False)`` convention (pixel centres: source ``(i + 0.5) * in / out - 0.5``, clamped at 0 and
  at the last cell), so a model's logits upsample the same here and in torch.
* ``guided``: the guided filter of He, Sun and Tang ("Guided Image Filtering", ECCV 2010 / TPAMI 2013; the
  authors' reference code is the MATLAB ``guidedfilter.m`` and ``guidedfilter_color.m``) applied to the
  bilinear scores with the image as guide. Inside each ``(2r + 1)^2`` window the output is a linear function of
  the guide: grey, ``q = a * I + b`` with ``a = cov(I, p) / (var(I) + eps)``; colour (the paper's colour
  version, the default for RGB images), ``q = a . I + b`` with ``a = (Sigma + eps U)^-1 cov(I, p)``, ``Sigma``
  the window's 3 x 3 colour covariance; ``b = mean(p) - a . mean(I)``; ``a`` and ``b`` averaged over the windows
  covering each pixel. So the blurred step of an upsampled mask moves onto the image edge nearby, and with the
  colour guide also onto edges between equally bright colours. Box means use cumulative sums (O(1) per pixel
  whatever ``r``), windows clipped at the border as in the reference. Defaults: colour guide, ``eps`` = 1e-4
  with the guide in [0, 1], ``radius`` = half a grid cell but at least 8 pixels. Where that comes from: the
  30-minute ``seg_scenes_cpu`` model on the fashion-scenes *validation* split (64 px, 4-px cells) scored best at
  8 px (4 / 6 / 8 / 12 px: val cIoU 0.680 / 0.699 / 0.710 / 0.690 at threshold 0.3; the earlier default, grey,
  one cell, eps 1e-3: 0.645 at 0.5, 0.668 at its best threshold), while the R-RLE oracle of the ``folder`` masks
  (191-512 px images) scored best near half a cell at grid 16 (a quarter / half / one cell: 0.762 / 0.811 /
  0.792; 8 px: 0.778) and near one cell at grid 32 (0.859 / 0.897 / 0.914; 8 px: 0.906, 16 px: 0.912).
  That default suits decoded text masks; for the per-patch heads' scores ``segment()`` passes one tower patch in
  the image's pixels (:func:`mmtok.mllm.seg.heads.guided_radius`: 8 px for 64 px scenes, 16 px for 128 px ones),
  because a fixed pixel radius shrinks relative to the objects as the image grows (on 128 px scenes 8 px scored
  0.681 cIoU at > 0.3 against 0.742 with 16 px, the same model).

Every method returns soft scores ``[H, W]`` in [0, 1]; :func:`refine_mask` thresholds them (``> threshold``,
0.5 by default, as LISA's sigmoid > 0.5; ``mmtok eval seg --thresholds``). The best cIoU threshold of calibrated
scores is below 0.5 (for F1 it is half the best F1, Lipton et al., arXiv:1402.1892; IoU is monotone in F1), so
the README also reports a threshold chosen on the validation split.

A new method is one function registered with :func:`register_refiner`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from mmtok.mllm.seg.formats import SegDecoded, resize_nearest

Refiner = Callable[..., np.ndarray]
REFINERS: dict[str, Refiner] = {}


def register_refiner(name: str) -> Callable[[Refiner], Refiner]:
    """Decorator adding ``fn(scores_grid [gh, gw], image [H, W, 3], **kw) -> [H, W]`` under ``name``."""

    def deco(fn: Refiner) -> Refiner:
        if name in REFINERS:
            raise ValueError(f"refiner {name!r} is already registered; pick another name")
        REFINERS[name] = fn
        return fn

    return deco


# ------------------------------------------------------------------------------------------------ helpers
def _bilinear_weights(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices ``i0``, ``i1`` and weight of ``i1`` for each of ``dst`` outputs (torch, align_corners=False)."""
    pos = (np.arange(dst, dtype=np.float64) + 0.5) * (src / dst) - 0.5
    pos = np.maximum(pos, 0.0)  # torch clamps negative source positions to the first cell
    i0 = np.minimum(np.floor(pos).astype(np.int64), src - 1)
    i1 = np.minimum(i0 + 1, src - 1)
    return i0, i1, (pos - i0).astype(np.float64)


def upsample_bilinear(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of ``grid [gh, gw]`` to ``[height, width]`` (torch's align_corners=False), float32."""
    g = np.asarray(grid, dtype=np.float64)
    r0, r1, wr = _bilinear_weights(g.shape[0], height)
    c0, c1, wc = _bilinear_weights(g.shape[1], width)
    rows = g[r0] * (1 - wr)[:, None] + g[r1] * wr[:, None]  # [height, gw]
    out = rows[:, c0] * (1 - wc)[None, :] + rows[:, c1] * wc[None, :]  # [height, width]
    return out.astype(np.float32)


def box_mean(x: np.ndarray, radius: int) -> np.ndarray:
    """Mean of ``x [H, W]`` over ``(2r + 1)^2`` windows clipped at the border, via cumulative sums."""
    x = np.asarray(x, dtype=np.float64)
    h, w = x.shape
    r = int(radius)
    c = np.zeros((h + 1, w + 1))
    c[1:, 1:] = x.cumsum(0).cumsum(1)  # c[i, j] = sum of x[:i, :j]
    y0 = np.clip(np.arange(h) - r, 0, h)
    y1 = np.clip(np.arange(h) + r + 1, 0, h)
    x0 = np.clip(np.arange(w) - r, 0, w)
    x1 = np.clip(np.arange(w) + r + 1, 0, w)
    s = c[y1][:, x1] - c[y0][:, x1] - c[y1][:, x0] + c[y0][:, x0]
    n = (y1 - y0)[:, None] * (x1 - x0)[None, :]
    return s / n


def _unit_float(image: np.ndarray) -> np.ndarray:
    """An image as float64 in [0, 1] (uint8 is scaled by 1/255; floats are taken as already in [0, 1])."""
    img = np.asarray(image)
    return img.astype(np.float64) / 255.0 if img.dtype == np.uint8 else img.astype(np.float64)


def grey_guide(image: np.ndarray) -> np.ndarray:
    """``[H, W]`` float64 guide in [0, 1] from an ``[H, W, 3|4]`` or ``[H, W]`` image (uint8, or float in [0, 1]).

    Grey = 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601 luma); alpha is ignored.
    """
    img = _unit_float(image)
    if img.ndim == 3:
        img = img[..., :3] @ np.array([0.299, 0.587, 0.114]) if img.shape[-1] >= 3 else img[..., 0]
    if img.ndim != 2:
        raise ValueError(f"image must be [H, W, 3] or [H, W], got shape {np.asarray(image).shape}")
    return img


def guided_filter(guide: np.ndarray, src: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """He et al.'s guided filter (grey guide): ``src [H, W]`` filtered under ``guide [H, W]``, float64.

    A constant ``src`` comes out unchanged; where ``var(guide) >> eps`` the output follows the guide's edges.
    """
    mean_i = box_mean(guide, radius)
    mean_p = box_mean(src, radius)
    cov_ip = box_mean(guide * src, radius) - mean_i * mean_p
    var_i = box_mean(guide * guide, radius) - mean_i * mean_i
    a = cov_ip / (var_i + eps)
    b = mean_p - a * mean_i
    return box_mean(a, radius) * guide + box_mean(b, radius)


def colour_guided_filter(guide: np.ndarray, src: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """He et al.'s guided filter with a colour guide: ``src [H, W]`` filtered under ``guide [H, W, 3]``, float64.

    Per window a 3 x 3 colour covariance ``Sigma`` and ``a = (Sigma + eps I)^-1 cov(I, p)`` (a closed-form 3 x 3
    inverse per pixel). With three equal channels it equals :func:`guided_filter` with ``eps / 3``.
    """
    g = np.asarray(guide, dtype=np.float64)
    p = np.asarray(src, dtype=np.float64)
    if g.ndim != 3 or g.shape[-1] != 3 or g.shape[:2] != p.shape:
        raise ValueError(f"colour guide must be [H, W, 3] with src [H, W]; got {g.shape} and {p.shape}")
    mean_i = np.stack([box_mean(g[..., c], radius) for c in range(3)], -1)  # [H, W, 3]
    mean_p = box_mean(p, radius)
    cov_ip = np.stack([box_mean(g[..., c] * p, radius) for c in range(3)], -1) - mean_i * mean_p[..., None]

    def var(a: int, b: int) -> np.ndarray:  # one entry of Sigma + eps I
        v = box_mean(g[..., a] * g[..., b], radius) - mean_i[..., a] * mean_i[..., b]
        return v + eps if a == b else v

    # (Sigma + eps I)^-1 by cofactors, vectorised over pixels (a batched np.linalg.solve is ~10x slower)
    rr, rg, rb, gg, gb, bb = var(0, 0), var(0, 1), var(0, 2), var(1, 1), var(1, 2), var(2, 2)
    i_rr, i_rg, i_rb = gg * bb - gb * gb, gb * rb - rg * bb, rg * gb - gg * rb
    i_gg, i_gb, i_bb = rr * bb - rb * rb, rb * rg - rr * gb, rr * gg - rg * rg
    det = rr * i_rr + rg * i_rg + rb * i_rb
    c0, c1, c2 = cov_ip[..., 0], cov_ip[..., 1], cov_ip[..., 2]
    coef = (
        np.stack(
            [i_rr * c0 + i_rg * c1 + i_rb * c2, i_rg * c0 + i_gg * c1 + i_gb * c2, i_rb * c0 + i_gb * c1 + i_bb * c2],
            -1,
        )
        / det[..., None]
    )  # [H, W, 3]
    b = mean_p - (coef * mean_i).sum(-1)
    mean_a = np.stack([box_mean(coef[..., c], radius) for c in range(3)], -1)
    return (mean_a * g).sum(-1) + box_mean(b, radius)


def colour_guide(image: np.ndarray) -> np.ndarray | None:
    """``[H, W, 3]`` float64 guide in [0, 1] from an RGB(A) image, or None for a grey (2-D or 1-channel) one."""
    img = np.asarray(image)
    return _unit_float(img[..., :3]) if img.ndim == 3 and img.shape[-1] >= 3 else None


def _image_hw(image: np.ndarray) -> tuple[int, int]:
    shape = np.shape(image)
    if len(shape) not in (2, 3) or shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"image must be [H, W, 3] or [H, W], got shape {shape}")
    return int(shape[0]), int(shape[1])


# ------------------------------------------------------------------------------------------------ methods
@register_refiner("none")
def refine_nearest(scores_grid: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Nearest upsampling (cell-centre rule): the coarse mask as is."""
    h, w = _image_hw(image)
    return resize_nearest(np.asarray(scores_grid, dtype=np.float32), h, w)


@register_refiner("bilinear")
def refine_bilinear(scores_grid: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Bilinear upsampling of the soft scores (torch's ``align_corners=False``)."""
    h, w = _image_hw(image)
    return upsample_bilinear(scores_grid, h, w)


@register_refiner("guided")
def refine_guided(
    scores_grid: np.ndarray, image: np.ndarray, radius: int | None = None, eps: float = 1e-4, guide: str = "colour"
) -> np.ndarray:
    """Guided filter of the bilinear scores with the image as guide.

    Args:
        radius: window radius in pixels (at least 1); default half a grid cell, at least 8 pixels.
        eps: regularisation (guide in [0, 1]); smaller follows image edges more closely.
        guide: ``colour`` (the RGB image; a grey image falls back to ``grey``) or ``grey`` (BT.601 luma).
    """
    if guide not in ("colour", "grey"):
        raise ValueError(f"guide must be 'colour' or 'grey', not {guide!r}")
    h, w = _image_hw(image)
    g = np.asarray(scores_grid)
    if radius is None:
        radius = max(8, round(0.5 * max(h / g.shape[0], w / g.shape[1])))
    if int(radius) < 1:
        raise ValueError(f"radius must be at least 1 pixel, got {radius}")
    p = upsample_bilinear(g, h, w).astype(np.float64)
    rgb = colour_guide(image) if guide == "colour" else None
    if rgb is not None:
        return colour_guided_filter(rgb, p, int(radius), float(eps)).astype(np.float32)
    return guided_filter(grey_guide(image), p, int(radius), float(eps)).astype(np.float32)


# ------------------------------------------------------------------------------------------------ entry points
def refine(scores_grid: np.ndarray, image: np.ndarray, method: str = "bilinear", **kw) -> np.ndarray:
    """Refine coarse scores to the image's resolution.

    Args:
        scores_grid: ``[gh, gw]`` float scores in [0, 1] (probabilities, or a {0, 1} decoded mask).
        image: ``[H, W, 3]`` uint8 or float in [0, 1] (``[H, W]`` grey also accepted); only its size is used
            by ``none`` and ``bilinear``.
        method: a name in :data:`REFINERS` (``none``, ``bilinear``, ``guided``).
        **kw: the method's options (``guided``: ``radius``, ``eps``, ``guide``).

    Returns:
        ``[H, W]`` float32 scores in [0, 1].
    """
    if method not in REFINERS:
        raise ValueError(f"unknown refinement {method!r}; choose one of {', '.join(sorted(REFINERS))}")
    grid = np.asarray(scores_grid, dtype=np.float32)
    if grid.ndim != 2 or grid.size == 0:
        raise ValueError(f"scores_grid must be a non-empty [gh, gw] array, got shape {grid.shape}")
    return np.clip(REFINERS[method](grid, image, **kw), 0.0, 1.0).astype(np.float32)


def refine_mask(
    scores_grid: np.ndarray, image: np.ndarray, method: str = "bilinear", threshold: float = 0.5, **kw
) -> np.ndarray:
    """:func:`refine` then ``> threshold``: a ``[H, W]`` bool mask."""
    return refine(scores_grid, image, method, **kw) > threshold


def refine_decoded(
    decoded: SegDecoded, image: np.ndarray, method: str = "bilinear", label: int = 1, **kw
) -> np.ndarray:
    """Refine one label of a decoded text mask; bricks are refined inside their box (zero outside).

    Returns:
        ``[H, W]`` float32 scores in [0, 1] for ``label``.
    """
    h, w = _image_hw(image)
    grid = (decoded.labels == label).astype(np.float32)
    if decoded.box is None:
        return refine(grid, image, method, **kw)
    out = np.zeros((h, w), dtype=np.float32)
    pb = decoded.pixel_box(h, w)
    if pb is not None:
        x0, y0, x1, y1 = pb
        out[y0:y1, x0:x1] = refine(grid, np.asarray(image)[y0:y1, x0:x1], method, **kw)
    return out
