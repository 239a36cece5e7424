"""Fashion-MNIST: the 70k real 28x28 grey-scale clothing images (Xiao et al., arXiv:1708.07747).

Read from the IDX files of the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``); nothing is
downloaded. The reference loader (zalandoresearch/fashion-mnist ``utils/mnist_reader.py``) reads the
same files with ``np.frombuffer``; we also check the IDX magic numbers and sizes so a damaged file fails
with a clear message instead of a reshape error.

Builder ``fashion-mnist``: ``mmtok shards fashion-mnist --out data/fmnist`` writes
``train-000000.tar ...`` (60k) and ``test-000000.tar ...`` (10k), each sample ``png`` (L mode),
``cls`` and ``json`` ``{"source", "split", "index", "label", "class_name"}``, plus the index files
``train.json`` / ``test.json``.
"""

from __future__ import annotations

import functools
import gzip
import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmtok.registries import SHARD_BUILDERS

logger = logging.getLogger(__name__)

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES: tuple[str, ...] = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _open_idx(root: Path, stem: str) -> bytes:
    for name in (stem + ".gz", stem):  # the Debian package ships .gz; accept unpacked copies too
        path = root / name
        if path.is_file():
            with open(path, "rb") as f:
                raw = f.read()
            return gzip.decompress(raw) if name.endswith(".gz") else raw
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}(.gz) not found under {root}: install the Debian package "
        "dataset-fashion-mnist (`make setup`) or pass root=<folder with the IDX files>"
    )


@functools.lru_cache(maxsize=4)
def _load_cached(split: str, root: str) -> tuple[np.ndarray, np.ndarray]:
    img_stem, lab_stem = _FILES[split]
    img_raw, lab_raw = _open_idx(Path(root), img_stem), _open_idx(Path(root), lab_stem)
    # IDX header: magic (0x00000803 images / 0x00000801 labels), then big-endian int32 sizes.
    magic, n, h, w = np.frombuffer(img_raw[:16], dtype=">i4")
    lmagic, ln = np.frombuffer(lab_raw[:8], dtype=">i4")
    if magic != 2051 or lmagic != 2049 or n != ln or len(img_raw) != 16 + n * h * w or len(lab_raw) != 8 + n:
        raise ValueError(f"Fashion-MNIST {split} files under {root} are damaged (bad IDX header or size)")
    images = np.frombuffer(img_raw, dtype=np.uint8, offset=16).reshape(n, h, w)  # [N, 28, 28]
    labels = np.frombuffer(lab_raw, dtype=np.uint8, offset=8).astype(np.int64)  # [N]
    images.setflags(write=False)  # cached and shared between callers: make accidental edits fail
    labels.setflags(write=False)
    return images, labels


def load_fashion_mnist(split: str = "train", root: str = DEFAULT_ROOT) -> tuple[np.ndarray, np.ndarray]:
    """Load one Fashion-MNIST split.

    Args:
        split: "train" (60,000 images) or "test" (10,000 images).
        root: Folder holding the IDX files (gzipped or not).

    Returns:
        ``(images, labels)``: uint8 ``[N, 28, 28]`` (0 = background) and int64 ``[N]`` in 0..9. The arrays
        are cached and read-only; copy them before editing.
    """
    if split not in _FILES:
        raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', not {split!r}")
    return _load_cached(split, str(root))


@dataclass
class FashionMNISTShardsConfig:
    """Options of ``mmtok shards fashion-mnist``."""

    out: str = "data/fmnist"
    splits: str = "train,test"  # comma-separated subset of train,test
    root: str = DEFAULT_ROOT
    limit: int = 0  # keep only the first N images of each split (0 = all); for tests and smoke runs
    maxcount: int = 5000  # samples per shard
    maxsize: int = 256 << 20  # bytes per shard


def _png_l(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img, mode="L").save(buf, format="PNG", compress_level=1)  # level 1: 3x faster, ~same size
    return buf.getvalue()


@SHARD_BUILDERS.register("fashion-mnist", config=FashionMNISTShardsConfig)
def build_fashion_mnist(cfg: FashionMNISTShardsConfig) -> dict:
    """Fashion-MNIST as WebDataset shards (png + cls + json), one shard set per split."""
    from mmtok.data.writer import write_shards

    t0 = time.perf_counter()
    summary: dict = {"builder": "fashion-mnist", "out": str(cfg.out), "splits": {}}
    for split in [s.strip() for s in cfg.splits.split(",") if s.strip()]:
        images, labels = load_fashion_mnist(split, cfg.root)
        n = len(images) if cfg.limit <= 0 else min(cfg.limit, len(images))

        def samples(split=split, images=images, labels=labels, n=n):
            for i in range(n):
                y = int(labels[i])
                yield {
                    "__key__": f"{split}_{i:06d}",
                    "png": _png_l(images[i]),
                    "cls": y,
                    "json": {
                        "source": "fashion-mnist",
                        "split": split,
                        "index": i,
                        "label": y,
                        "class_name": CLASS_NAMES[y],
                    },
                }

        paths = write_shards(samples(), cfg.out, prefix=split, maxcount=cfg.maxcount, maxsize=cfg.maxsize)
        summary["splits"][split] = {"samples": n, "shards": len(paths), "pattern": _pattern_of(paths)}
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    logger.info("fashion-mnist shards: %s", summary)
    return summary


def _pattern_of(paths: list[str]) -> str:
    """The brace pattern naming ``paths`` (written by :func:`write_shards`, so consecutive numbers)."""
    from mmtok.data.writer import brace_pattern

    return brace_pattern(paths) if paths else ""


__all__ = ["CLASS_NAMES", "DEFAULT_ROOT", "FashionMNISTShardsConfig", "build_fashion_mnist", "load_fashion_mnist"]
