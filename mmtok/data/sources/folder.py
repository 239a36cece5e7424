"""Shards from any folder of images, with optional masks and a JSON or CSV metadata file.

``mmtok shards folder --out data/mine images=photos/ masks=photos_masks/ metadata=labels.csv``

- Images: every ``.jpg/.jpeg/.png/.webp/.bmp/.tif(f)`` under ``images`` (recursively, sorted). JPEG and PNG
  bytes are stored as they are (no re-encoding loss); other formats are re-encoded as PNG.
- Masks (optional): for image ``a/b.jpg`` the first existing of ``masks/a/b.png``, ``masks/a/b_mask.png``,
  ``masks/a/b.jpg``; stored as ``mask.png`` (single channel, values kept). An image without a mask follows
  ``missing_mask``: "skip" (default: leave the sample out, count and log it), "keep" (write it without a
  mask, declared optional in the index so the reader keeps it too) or "raise".
- Metadata (optional): a JSON object ``{"a/b.jpg" or "a/b": {...}}``, a JSON list of objects, or a CSV
  with a header; rows are matched by a ``file``/``image``/``filename``/``path`` column (relative path, with
  or without extension, or the bare file name). Fields go into the sample's ``json``; an integer
  ``label`` (or ``cls``) also becomes ``cls``.
- Keys: the relative path without extension, with ``/`` and ``.`` replaced by ``_`` (dots would split
  keys); collisions get a numeric suffix.
- Unreadable images follow ``on_error`` ("skip": counted and logged in the summary, or "raise").
- ``val_fraction`` > 0 sends a deterministic (seeded, hash-free) share of the files to a ``val`` split.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmtok.registries import SHARD_BUILDERS

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
# Fields some samples lack on purpose: a mask (missing_mask="keep") and a label (metadata for some images only).
# Declared to the writer, or the reader would skip a sample lacking a field most of its shard carries.
OPTIONAL_FIELDS = ("mask.png", "cls")


@dataclass
class FolderConfig:
    """Options of ``mmtok shards folder``."""

    out: str = "data/folder"
    images: str = ""  # folder of images (required)
    masks: str = ""  # folder of masks mirroring the image tree ("" = none)
    metadata: str = ""  # JSON or CSV file ("" = none)
    prefix: str = "train"  # shard name prefix (the split name)
    val_fraction: float = 0.0  # share of files written as prefix "val" instead
    seed: int = 0
    missing_mask: str = "skip"  # skip | keep | raise
    on_error: str = "skip"  # unreadable image: skip | raise
    maxcount: int = 1000
    maxsize: int = 256 << 20


def _load_metadata(path: str) -> dict[str, dict[str, Any]]:
    """Metadata rows keyed by the normalised file reference (relative path without extension)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"metadata file {path} does not exist")
    rows: list[dict[str, Any]]
    if p.suffix.lower() == ".csv":
        with open(p, newline="") as f:
            rows = [dict(r) for r in csv.DictReader(f)]
    else:
        try:
            data = json.loads(p.read_text())
        except ValueError as e:
            raise ValueError(f"metadata file {path} is not valid JSON: {e}") from e
        if isinstance(data, dict):
            rows = [{"file": k, **(v if isinstance(v, dict) else {"value": v})} for k, v in data.items()]
        elif isinstance(data, list) and all(isinstance(r, dict) for r in data):
            rows = data
        else:
            raise ValueError(f"metadata JSON {path} must be an object or a list of objects")
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        ref = next((r[k] for k in ("file", "image", "filename", "path") if k in r), None)
        if ref is None:
            raise ValueError(f"metadata row without a file/image/filename/path column: {r}")
        fields = {k: _convert(v) for k, v in r.items() if k not in ("file", "image", "filename", "path")}
        out[os.path.splitext(str(ref).replace("\\", "/"))[0]] = fields
    return out


def _convert(v: Any) -> Any:
    """CSV cells are strings: turn integers and floats back into numbers."""
    if not isinstance(v, str):
        return v
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def _key(rel: str, used: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_\-]", "_", os.path.splitext(rel)[0]) or "sample"
    key, n = base, 1
    while key in used:
        key, n = f"{base}_{n}", n + 1
    used.add(key)
    return key


def _find_mask(masks: Path, rel: str) -> Path | None:
    stem = os.path.splitext(rel)[0]
    for cand in (f"{stem}.png", f"{stem}_mask.png", f"{stem}.jpg"):
        if (masks / cand).is_file():
            return masks / cand
    return None


def _image_bytes(path: Path) -> tuple[str, bytes, tuple[int, int]]:
    """(extension, bytes, (w, h)), verifying the image decodes."""
    from PIL import Image

    raw = path.read_bytes()
    with Image.open(io.BytesIO(raw)) as im:
        im.load()
        size = im.size
        ext = {"JPEG": "jpg", "PNG": "png"}.get(im.format or "", "")
        if not ext:  # other formats: store a lossless PNG
            buf = io.BytesIO()
            im.convert("RGB" if im.mode not in ("L", "RGB") else im.mode).save(buf, format="PNG")
            ext, raw = "png", buf.getvalue()
    return ext, raw, size


def _mask_png(path: Path) -> tuple[bytes, tuple[int, int]]:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        arr = np.asarray(im)
    if arr.ndim == 3:  # an RGB(A) mask: values are in the first channel
        arr = arr[..., 0]
    if arr.dtype != np.uint8:
        arr = arr.astype(np.uint8) if arr.max() < 256 else arr
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue(), (arr.shape[1], arr.shape[0])


@SHARD_BUILDERS.register("folder", config=FolderConfig)
def build_folder(cfg: FolderConfig) -> dict:
    """Any folder of images (+ optional masks and JSON/CSV metadata) as shards."""
    from mmtok.data.writer import brace_pattern, write_shards

    for name, val, allowed in (
        ("missing_mask", cfg.missing_mask, ("skip", "keep", "raise")),
        ("on_error", cfg.on_error, ("skip", "raise")),
    ):
        if val not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, not {val!r}")
    root = Path(cfg.images)
    if not cfg.images or not root.is_dir():
        raise FileNotFoundError(f"images={cfg.images!r} is not a folder; pass images=<folder of images>")
    masks = Path(cfg.masks) if cfg.masks else None
    if masks is not None and not masks.is_dir():
        raise FileNotFoundError(f"masks={cfg.masks!r} is not a folder")
    meta = _load_metadata(cfg.metadata) if cfg.metadata else {}
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if masks is not None:  # a mask folder inside the image folder must not be read as images
        files = [p for p in files if masks.resolve() not in p.resolve().parents]
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    t0 = time.perf_counter()
    problems: dict[str, list[str]] = {"unreadable": [], "missing_mask": [], "mask_size": []}
    rng = np.random.default_rng(cfg.seed)
    to_val = rng.random(len(files)) < cfg.val_fraction
    used: set[str] = set()

    def samples(want_val: bool):
        for path, is_val in zip(files, to_val):
            if bool(is_val) != want_val:
                continue
            rel = path.relative_to(root).as_posix()
            try:
                ext, data, size = _image_bytes(path)
            except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
                if cfg.on_error == "raise":
                    raise ValueError(f"unreadable image {path}: {e}") from e
                logger.warning("folder: skipping unreadable image %s: %s", path, e)
                problems["unreadable"].append(rel)
                continue
            sample: dict[str, Any] = {"__key__": _key(rel, used), ext: data}
            info: dict[str, Any] = {"source": "folder", "split": "val" if want_val else cfg.prefix, "file": rel}
            if masks is not None:
                mpath = _find_mask(masks, rel)
                if mpath is None:
                    if cfg.missing_mask == "raise":
                        raise FileNotFoundError(f"no mask for {rel} under {masks}")
                    if cfg.missing_mask == "skip":
                        logger.warning("folder: no mask for %s, skipping it", rel)
                        problems["missing_mask"].append(rel)
                        continue
                else:
                    mdata, msize = _mask_png(mpath)
                    if msize != size:
                        logger.warning("folder: mask %s is %s but image is %s, skipping", mpath, msize, size)
                        problems["mask_size"].append(rel)
                        continue
                    sample["mask.png"] = mdata
            stem = os.path.splitext(rel)[0]
            extra = meta.get(stem) or meta.get(os.path.basename(stem)) or {}
            info.update(extra)
            label = extra.get("label", extra.get("cls"))
            if isinstance(label, int):
                sample["cls"] = label
            sample["json"] = info
            yield sample

    summary: dict[str, Any] = {"builder": "folder", "out": str(cfg.out), "files": len(files), "splits": {}}
    for want_val, prefix in ((False, cfg.prefix), (True, "val")):
        if want_val and not to_val.any():
            continue
        paths = write_shards(
            samples(want_val),
            cfg.out,
            prefix=prefix,
            maxcount=cfg.maxcount,
            maxsize=cfg.maxsize,
            optional=OPTIONAL_FIELDS,
        )
        if paths:
            index = json.loads((Path(cfg.out) / f"{prefix}.json").read_text())
            summary["splits"][prefix] = {
                "samples": index["total"],
                "shards": len(paths),
                "pattern": brace_pattern(paths),
            }
    summary["skipped"] = {k: len(v) for k, v in problems.items() if v}
    summary["skipped_files"] = {k: v[:20] for k, v in problems.items() if v}
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    logger.info("folder shards: %s", summary)
    return summary
