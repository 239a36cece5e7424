"""Moving Fashion-MNIST: short mp4 clips of tinted Fashion-MNIST items bouncing on a canvas (for VideoMAE).

In the spirit of Moving MNIST (Srivastava et al., "Unsupervised Learning of Video Representations using
LSTMs", arXiv:1502.04681; reference generator in their project page): each item starts at a random
position with a random velocity and bounces off the canvas walls. Differences: the items are
Fashion-MNIST garments (so a clip has a class label for linear probes), tinted with the scenes palette
on a dark noisy background, and clips are tiny (16 frames of 64x64 by default) H.264 mp4 files encoded
with PyAV, decoded by :func:`mmtok.data.decode.decode_video`.

Builder ``moving-fashion``: samples ``mp4`` + ``cls`` (class of the first, largest item) + ``json``
``{"source", "split", "fps", "frames", "size", "label", "labels", "items": [{class_id, class_name, colour,
source_index, source_split, side, trajectory: [[x, y] per frame]}]}``. Splits draw items from the same
disjoint Fashion-MNIST ranges as fashion-scenes; every clip has its own seeded generator.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from mmtok.data.decode import encode_video
from mmtok.data.sources.fashion_mnist import CLASS_NAMES, DEFAULT_ROOT
from mmtok.data.sources.scenes import PALETTE, SPLIT_SOURCES, _background, _resize, split_source
from mmtok.registries import SHARD_BUILDERS

logger = logging.getLogger(__name__)


def make_clip(
    rng: np.random.Generator,
    images: np.ndarray,
    labels: np.ndarray,
    frames: int = 16,
    size: int = 64,
    min_items: int = 1,
    max_items: int = 2,
    *,
    indices: np.ndarray | None = None,
) -> tuple[np.ndarray, list[dict]]:
    """One clip: uint8 frames ``[T, H, W, 3]`` and the items (with per-frame top-left trajectory).

    Items are drawn largest first, so the first item (the clip's label) is never hidden behind others.
    """
    if size < 32 or size % 2:
        raise ValueError(f"size must be even and >= 32 (H.264 needs even sides), got {size}")
    n = int(rng.integers(min_items, max_items + 1))
    bg = _background(rng, size)  # [H, W, 3] float
    names = list(PALETTE)
    colours = rng.permutation(len(names))[:n]
    items = []
    for k in range(n):
        idx = int(rng.integers(len(images)))
        side = int(rng.integers(max(12, int(size * 0.35)), max(14, int(size * 0.55)) + 1))
        alpha = _resize(np.asarray(images[idx]), side)  # [s, s]
        pos = rng.uniform(0, size - side, size=2)  # (x, y) top-left
        speed = rng.uniform(size / 32, size / 12)  # 2..5 px per frame at 64 px
        angle = rng.uniform(0, 2 * np.pi)
        vel = speed * np.array([np.cos(angle), np.sin(angle)])
        traj = []
        for _ in range(frames):
            traj.append(pos.copy())
            pos = pos + vel
            for d in range(2):  # bounce: reflect the position and the velocity at the walls
                if pos[d] < 0:
                    pos[d], vel[d] = -pos[d], -vel[d]
                elif pos[d] > size - side:
                    pos[d], vel[d] = 2 * (size - side) - pos[d], -vel[d]
        cls = int(labels[idx])
        items.append(
            {
                "class_id": cls,
                "class_name": CLASS_NAMES[cls],
                "colour": names[colours[k]],
                "source_index": int(indices[idx]) if indices is not None else idx,
                "side": side,
                "trajectory": [[round(float(x), 2), round(float(y), 2)] for x, y in traj],
                "_alpha": alpha,
            }
        )
    items.sort(key=lambda it: -it["side"])  # largest first: drawn first, labelled
    video = np.empty((frames, size, size, 3), np.uint8)
    for t in range(frames):
        frame = bg.copy()
        for it in reversed(items):  # smaller items on top, the labelled largest one stays visible at its edges
            x, y = (int(round(v)) for v in it["trajectory"][t])
            a = it["_alpha"][..., None]
            s = it["side"]
            tint = np.asarray(PALETTE[it["colour"]], np.float32) * (0.55 + 0.45 * a)
            frame[y : y + s, x : x + s] = tint * a + frame[y : y + s, x : x + s] * (1 - a)
        video[t] = np.round(frame)
    return video, [{k: v for k, v in it.items() if not k.startswith("_")} for it in items]


@dataclass
class MovingFashionConfig:
    """Options of ``mmtok shards moving-fashion``."""

    out: str = "data/moving"
    train: int = 2000  # clips per split (0 skips it)
    val: int = 200
    test: int = 200
    frames: int = 16
    size: int = 64  # even, >= 32
    fps: int = 8
    min_items: int = 1
    max_items: int = 2
    seed: int = 0
    crf: int = 18  # H.264 quality (lower = better; 18 is visually lossless here)
    root: str = DEFAULT_ROOT
    maxcount: int = 500
    maxsize: int = 256 << 20


_SPLIT_IDS = {"train": 10, "val": 11, "test": 12}  # distinct from the scenes' seeds


def clip_samples(cfg: MovingFashionConfig, split: str, count: int):
    images, labels, fidx = split_source(split, cfg.root)
    for i in range(count):
        rng = np.random.default_rng([cfg.seed, _SPLIT_IDS[split], i])
        video, items = make_clip(rng, images, labels, cfg.frames, cfg.size, cfg.min_items, cfg.max_items, indices=fidx)
        for it in items:
            it["source_split"] = SPLIT_SOURCES[split][0]
        yield {
            "__key__": f"{split}_{i:06d}",
            "mp4": encode_video(video, fps=cfg.fps, crf=cfg.crf),
            "cls": items[0]["class_id"],
            "json": {
                "source": "moving-fashion",
                "split": split,
                "fps": cfg.fps,
                "frames": cfg.frames,
                "size": cfg.size,
                "label": items[0]["class_id"],
                "labels": [it["class_id"] for it in items],
                "items": items,
            },
        }


@SHARD_BUILDERS.register("moving-fashion", config=MovingFashionConfig)
def build_moving_fashion(cfg: MovingFashionConfig) -> dict:
    """Clips of bouncing tinted Fashion-MNIST items as mp4 shards (train/val/test)."""
    from mmtok.data.writer import write_splits

    return write_splits(cfg, "moving-fashion", clip_samples, "clips")
