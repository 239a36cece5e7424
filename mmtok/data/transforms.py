"""Sample transforms: dict in, dict out, acting on ``image``, ``mask``, ``instances`` and ``video`` together.

Geometric transforms move masks with their images (nearest-neighbour for masks, so class ids survive);
a horizontal flip also swaps "left"/"right" in a referring expression, otherwise "the red sneaker on the
left" would point at the wrong item after the flip. torchvision.transforms.v2 does the joint image/mask
part too, but knows nothing of expressions and draws from the global RNG; ours draw from
:func:`sample_generator`, seeded by the sample's stream position, so a resumed run augments exactly like
an uninterrupted one.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

Sample = dict[str, Any]


def key_seed(key: str, salt: str = "") -> int:
    """A stable 32-bit seed from a sample key (CRC-32 of ``salt + key``; ``hash()`` differs between processes).

    For choices that belong to the sample itself, not to its place in the stream (a flip, a caption's order, a
    sampled question): the same on every read and every resume, whatever the shuffle.
    """
    return zlib.crc32(f"{salt}{key}".encode())


def sample_generator(sample: Sample) -> torch.Generator:
    """The sample's own RNG (seeded by the reader from seed, epoch, consumer and position; cached)."""
    g = sample.get("__rng__")
    if g is None:
        g = torch.Generator()
        seed = sample.get("__seed__")
        g.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2**62, (1,))))
        sample["__rng__"] = g
    return g


def _resize_img(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """float ``[..., C, H, W]`` -> ``[..., C, h, w]`` (bilinear, antialiased when shrinking)."""
    if tuple(x.shape[-2:]) == size:
        return x
    lead = x.shape[:-3]
    y = F.interpolate(x.reshape(-1, *x.shape[-3:]), size=size, mode="bilinear", antialias=True, align_corners=False)
    return y.reshape(*lead, *y.shape[-3:]).clamp_(0, 1)


def _resize_mask(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """long ``[H, W]`` -> ``[h, w]`` (nearest)."""
    if tuple(m.shape[-2:]) == size:
        return m
    return F.interpolate(m[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()


def _apply(sample: Sample, img_fn: Callable, mask_fn: Callable) -> Sample:
    if "image" in sample:
        sample["image"] = img_fn(sample["image"])
    if "video" in sample:  # [C, T, H, W]: treat T as a batch of frames
        sample["video"] = img_fn(sample["video"].transpose(0, 1)).transpose(0, 1)
    for k in ("mask", "instances"):
        if k in sample:
            sample[k] = mask_fn(sample[k])
    return sample


class Compose:
    def __init__(self, transforms: Sequence[Callable[[Sample], Sample]]):
        self.transforms = [t for t in transforms if t is not None]

    def __call__(self, sample: Sample) -> Sample:
        for t in self.transforms:
            sample = t(sample)
        return sample

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"


class Resize:
    """Resize to ``size`` (int = square) ignoring aspect ratio; masks nearest."""

    def __init__(self, size: int | tuple[int, int]):
        self.size = (size, size) if isinstance(size, int) else tuple(size)

    def __call__(self, sample: Sample) -> Sample:
        return _apply(sample, lambda x: _resize_img(x, self.size), lambda m: _resize_mask(m, self.size))

    def __repr__(self) -> str:
        return f"Resize({self.size})"


class CenterCrop:
    def __init__(self, size: int):
        self.size = size

    def __call__(self, sample: Sample) -> Sample:
        def crop(x: torch.Tensor) -> torch.Tensor:
            h, w = x.shape[-2:]
            if h < self.size or w < self.size:
                x = _resize_img(x, (max(h, self.size), max(w, self.size))) if x.is_floating_point() else x
                h, w = x.shape[-2:]
            top, left = (h - self.size) // 2, (w - self.size) // 2
            return x[..., top : top + self.size, left : left + self.size]

        return _apply(sample, crop, crop)


class RandomResizedCrop:
    """Crop a random area share ``scale`` and aspect ratio ``ratio``, resize to ``size`` (as in torchvision)."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.5, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = (size, size), scale, ratio

    def _box(self, h: int, w: int, g: torch.Generator) -> tuple[int, int, int, int]:
        area = h * w
        log_r = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            u = torch.rand(3, generator=g).tolist()
            target = area * (self.scale[0] + u[0] * (self.scale[1] - self.scale[0]))
            aspect = math.exp(log_r[0] + u[1] * (log_r[1] - log_r[0]))
            cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                top = int(u[2] * (h - ch + 1))
                left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
                return top, left, ch, cw
        return 0, 0, h, w  # fall back to the whole image

    def __call__(self, sample: Sample) -> Sample:
        ref = sample.get("image", sample.get("video"))
        if ref is None:
            return sample
        top, left, ch, cw = self._box(ref.shape[-2], ref.shape[-1], sample_generator(sample))

        def crop(x: torch.Tensor) -> torch.Tensor:
            return x[..., top : top + ch, left : left + cw]

        return _apply(sample, lambda x: _resize_img(crop(x), self.size), lambda m: _resize_mask(crop(m), self.size))


_LR = re.compile(r"\b(left|right)\b")


def swap_left_right(text: str) -> str:
    """``"the bag on the left"`` -> ``"the bag on the right"`` (whole words only)."""
    return _LR.sub(lambda m: "right" if m.group(1) == "left" else "left", text)


class RandomHorizontalFlip:
    """Flip with probability ``p``; swaps left/right in ``json["expression"]`` and mirrors ``json["bbox"]``."""

    def __init__(self, p: float = 0.5, fix_text: bool = True):
        self.p, self.fix_text = p, fix_text

    def __call__(self, sample: Sample) -> Sample:
        if float(torch.rand(1, generator=sample_generator(sample))) >= self.p:
            return sample
        ref = sample.get("image", sample.get("video"))
        _apply(sample, lambda x: x.flip(-1), lambda m: m.flip(-1))
        meta = sample.get("json")
        if self.fix_text and isinstance(meta, dict):
            meta = dict(meta)
            if isinstance(meta.get("expression"), str):
                meta["expression"] = swap_left_right(meta["expression"])
            if ref is not None and isinstance(meta.get("bbox"), list) and len(meta["bbox"]) == 4:
                w = ref.shape[-1]
                x0, y0, x1, y1 = meta["bbox"]
                meta["bbox"] = [w - x1, y0, w - x0, y1]
            sample["json"] = meta
        return sample


class ToRGB:
    """Grey ``[1, H, W]`` images (and videos) -> 3 channels."""

    def __call__(self, sample: Sample) -> Sample:
        if "image" in sample and sample["image"].shape[0] == 1:
            sample["image"] = sample["image"].expand(3, -1, -1).contiguous()
        if "video" in sample and sample["video"].shape[0] == 1:
            sample["video"] = sample["video"].expand(3, -1, -1, -1).contiguous()
        return sample


class TemporalCrop:
    """Keep ``frames`` consecutive frames of ``video`` ``[C, T, H, W]`` (random start when ``random``)."""

    def __init__(self, frames: int, random: bool = True):
        self.frames, self.random = frames, random

    def __call__(self, sample: Sample) -> Sample:
        v = sample.get("video")
        if v is None:
            return sample
        t = v.shape[1]
        if t < self.frames:  # loop short clips rather than fail: VideoMAE needs a fixed T
            reps = -(-self.frames // t)
            v = v.repeat(1, reps, 1, 1)
            t = v.shape[1]
        start = (
            int(torch.randint(0, t - self.frames + 1, (1,), generator=sample_generator(sample))) if self.random else 0
        )
        sample["video"] = v[:, start : start + self.frames]
        return sample


class Normalize:
    """``(x - mean) / std`` per channel on ``image``/``video`` (after the [0, 1] decode)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean, self.std = torch.tensor(mean), torch.tensor(std)

    def __call__(self, sample: Sample) -> Sample:
        if "image" in sample:
            sample["image"] = (sample["image"] - self.mean[:, None, None]) / self.std[:, None, None]
        if "video" in sample:
            sample["video"] = (sample["video"] - self.mean[:, None, None, None]) / self.std[:, None, None, None]
        return sample
