"""Real photographs available offline, as random crops (for tokenizer reconstruction on natural images).

Sources: the images bundled inside scikit-image (``skimage/data``: astronaut, coffee, chelsea, rocket,
camera, ...; read from the package folder with PIL, so scikit-image's downloader is never touched) and
scikit-learn's two sample photos (``sklearn/datasets/images``: china, flower). Only files that exist in the
installed packages are used; the summary lists them.

Crops follow the RandomResizedCrop recipe (Inception-style, as in torchvision): a random area share in
``scale`` and aspect ratio in 3/4..4/3, resized to ``size``. Train and val never share a photo: val
takes the photos named in ``val_photos`` (all their crops). Sample: ``jpg`` (or ``png``) RGB + ``json``
``{"source": "photos", "split", "photo", "origin", "crop": [x0, y0, x1, y1], "photo_size": [w, h]}``.

Order: photos are interleaved (crop 0 of every photo of the split, then crop 1 of every photo, ...), so
any prefix of a split covers all its photos. An evaluation that reads the first N samples in shard order
(the training engine's capped validation, for one) then sees every held-out photo, not 400 crops of the
first one. Each photo's crops are drawn from its own generator, so the set of crops does not depend on
the order.

``size`` defaults to 64 px (what ``configs/mim/mae_photos.yaml`` reads); the f8 tokenizer recipe
``configs/tokenizer/vq_photos_f8.yaml`` takes 128 px and says so in its header (``size=128``); a
tokenizer fed smaller crops upsamples them and logs a warning naming both sizes.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass

import numpy as np

from mmtok.registries import SHARD_BUILDERS

logger = logging.getLogger(__name__)

# Natural photographs (not synthetic test patterns, text or microscopy) bundled with the packages.
SKIMAGE_PHOTOS = (
    "astronaut.png",
    "coffee.png",
    "chelsea.png",
    "rocket.jpg",
    "camera.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "hubble_deep_field.jpg",
    "moon.png",
    "horse.png",
    "coins.png",
    "gravel.png",
    "brick.png",
    "grass.png",
)
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")


def photo_paths() -> dict[str, str]:
    """``{name: path}`` of the bundled photographs present in this installation."""
    found: dict[str, str] = {}
    try:
        import skimage

        d = os.path.join(os.path.dirname(skimage.__file__), "data")
        found.update({os.path.splitext(f)[0]: os.path.join(d, f) for f in SKIMAGE_PHOTOS})
    except ImportError:
        pass
    try:
        import sklearn

        d = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images")
        found.update({os.path.splitext(f)[0]: os.path.join(d, f) for f in SKLEARN_PHOTOS})
    except ImportError:
        pass
    return {k: v for k, v in sorted(found.items()) if os.path.isfile(v)}


def load_photo(path: str) -> np.ndarray:
    """uint8 RGB ``[H, W, 3]`` (grey and binary photos are replicated to 3 channels)."""
    from PIL import Image

    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


def random_crop_box(rng: np.random.Generator, w: int, h: int, scale: tuple[float, float]) -> tuple[int, int, int, int]:
    """A RandomResizedCrop box ``(x0, y0, x1, y1)`` inside a ``w x h`` image."""
    for _ in range(20):
        area = w * h * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return x0, y0, x0 + cw, y0 + ch
    side = min(w, h)  # fall back to the central square
    return (w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side


@dataclass
class PhotosConfig:
    """Options of ``mmtok shards photos``."""

    out: str = "data/photos"
    size: int = 64  # crop side after resizing
    crops: int = 200  # crops per photo
    scale_min: float = 0.02  # smallest crop area share (small crops = detail, large = whole-scene layout)
    scale_max: float = 0.5
    val_photos: str = "astronaut,chelsea"  # comma-separated photo names held out for val ("" = no val)
    image_format: str = "jpg"  # jpg (quality 95) or png
    seed: int = 0
    maxcount: int = 2000
    maxsize: int = 256 << 20


@SHARD_BUILDERS.register("photos", config=PhotosConfig)
def build_photos(cfg: PhotosConfig) -> dict:
    """Random crops of the real photographs bundled with scikit-image and scikit-learn."""
    from PIL import Image

    from mmtok.data.writer import brace_pattern, write_shards

    if cfg.image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', not {cfg.image_format!r}")
    photos = photo_paths()
    if not photos:
        raise FileNotFoundError("no bundled photographs found: install scikit-image (and scikit-learn)")
    val = {p.strip() for p in cfg.val_photos.split(",") if p.strip()}
    unknown = val - set(photos)
    if unknown:
        raise ValueError(f"val_photos {sorted(unknown)} are not available; choose from {sorted(photos)}")
    t0 = time.perf_counter()
    summary: dict = {"builder": "photos", "out": str(cfg.out), "photos": sorted(photos), "splits": {}}

    def samples(split: str):
        # one image and one generator per photo of the split; the generator is seeded by the photo's index
        # among all photos, so a photo's crops are the same whatever the split composition or order
        members = []
        for pi, (name, path) in enumerate(photos.items()):
            if (name in val) == (split == "val"):
                members.append((name, path, Image.fromarray(load_photo(path)), np.random.default_rng([cfg.seed, pi])))
        for k in range(cfg.crops):  # interleaved: crop k of every photo before crop k + 1 of any
            for name, path, img, rng in members:
                w, h = img.size
                box = random_crop_box(rng, w, h, (cfg.scale_min, cfg.scale_max))
                crop = img.resize((cfg.size, cfg.size), Image.BICUBIC, box=box, reducing_gap=2.0)
                yield {
                    "__key__": f"{split}_{name}_{k:05d}",
                    cfg.image_format: crop,
                    "json": {
                        "source": "photos",
                        "split": split,
                        "photo": name,
                        "origin": "scikit-learn" if "sklearn" in path else "scikit-image",
                        "crop": list(box),
                        "photo_size": [w, h],
                    },
                }

    for split in ("train", "val") if val else ("train",):
        paths = write_shards(samples(split), cfg.out, prefix=split, maxcount=cfg.maxcount, maxsize=cfg.maxsize)
        if paths:
            n = sum(1 for name in photos if (name in val) == (split == "val")) * cfg.crops
            summary["splits"][split] = {"samples": n, "shards": len(paths), "pattern": brace_pattern(paths)}
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    logger.info("photos shards: %s", summary)
    return summary
