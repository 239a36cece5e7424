"""Writing WebDataset tar shards (webdataset's ``TarWriter``) plus a JSON index of sample counts.

WebDataset (Aizman et al., "High Performance I/O For Large Scale Deep Learning", arXiv:2001.01858;
reference implementation github.com/webdataset/webdataset) stores each sample as consecutive tar members
``<key>.<ext>``. Differences from ``wds.ShardWriter``:

- every shard's sample count and size go to an index file ``<prefix>.json`` next to the shards; the
  reader uses it to split work and to skip whole shards when it resumes a stream without decoding them;
- keys are checked (no dots: a dot would split the key from the extension at read time; no duplicates);
- images are encoded here (PNG for masks and lossless data, JPEG at quality 95 rather than wds's 100);
- tar members get a fixed mtime, so a builder run with the same seed gives byte-identical shards;
- the index also describes each shard's samples (how many carry each field, the usual shape of
  ``codes.npy``), so the reader can tell a sample that lacks a field or holds an odd-shaped array from
  its siblings (a field list alone is an intersection: it cannot say that one sample lost its mask).
  Fields that are optional on purpose are declared with ``optional=``;
- writing a shard set removes the shards of an earlier, larger set of the same prefix in the same folder
  (``<prefix>-NNNNNN.tar`` past the new last one), so a glob such as ``train-*.tar`` never mixes a rebuild with
  leftovers of the build before it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

INDEX_VERSION = 1
_IMAGE_EXTS = {"png", "jpg", "jpeg", "webp", "ppm", "bmp"}


def encode_image(image: Any, ext: str, quality: int = 95) -> bytes:
    """Encode a PIL image, a uint8/bool ndarray ``[H, W]`` / ``[H, W, 3]`` or a torch tensor to bytes.

    Float arrays must be in [0, 1]. ``ext`` picks the format ("png", "jpg", ...).
    """
    from PIL import Image

    if hasattr(image, "detach"):  # torch tensor: [C, H, W] or [H, W]
        image = image.detach().cpu().numpy()
        if image.ndim == 3 and image.shape[0] in (1, 3):
            image = np.moveaxis(image, 0, -1)
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype == bool:
            arr = arr.astype(np.uint8)
        elif arr.dtype.kind == "f":
            if arr.min() < -1e-3 or arr.max() > 1 + 1e-3:
                raise ValueError(f"float image values must be in [0, 1], got [{arr.min()}, {arr.max()}]")
            arr = np.round(np.clip(arr, 0, 1) * 255).astype(np.uint8)
        elif arr.dtype != np.uint8:
            if arr.min() < 0 or arr.max() > 255:
                raise ValueError(f"integer image values must fit uint8 (0..255), got [{arr.min()}, {arr.max()}]")
            arr = arr.astype(np.uint8)
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[..., 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
            raise ValueError(f"image array must be [H, W], [H, W, 3] or [H, W, 4], got shape {arr.shape}")
        image = Image.fromarray(arr)
    if not isinstance(image, Image.Image):
        raise TypeError(f"cannot encode {type(image).__name__} as .{ext}; pass bytes, a PIL image or an ndarray")
    fmt = {"jpg": "JPEG", "jpeg": "JPEG"}.get(ext, ext.upper())
    if fmt == "JPEG" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    buf = io.BytesIO()
    opts = {"quality": quality} if fmt == "JPEG" else ({"compress_level": 1} if fmt == "PNG" else {})
    image.save(buf, format=fmt, **opts)
    return buf.getvalue()


def encode_value(ext: str, value: Any) -> bytes:
    """Encode one field of a sample to bytes according to its extension (the last dot-part of ``ext``)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    last = ext.rsplit(".", 1)[-1].lower()
    if last in ("json", "jsn"):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    if last in ("cls", "cls2", "index", "id"):
        return str(int(value)).encode("ascii")
    if last in ("txt", "text"):
        return str(value).encode("utf-8")
    if last == "npy":
        arr = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        return buf.getvalue()
    if last in _IMAGE_EXTS:
        return encode_image(value, last)
    if isinstance(value, str):
        return value.encode("utf-8")
    raise TypeError(f"field {ext!r}: don't know how to encode {type(value).__name__}; pass bytes")


def check_key(key: Any) -> str:
    """Validate a sample key: a non-empty string without dots (a dot would split it at read time)."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"sample __key__ must be a non-empty string, got {key!r}")
    if "." in key:
        raise ValueError(f"sample key {key!r} contains a dot; WebDataset splits keys at the first dot, use '_' instead")
    if key.startswith("/") or ".." in key.split("/"):
        raise ValueError(f"sample key {key!r} must be a relative name")
    return key


def brace_pattern(paths: list[str]) -> str:
    """``[a/p-000000.tar, a/p-000001.tar]`` -> ``a/p-{000000..000001}.tar`` (one path stays as is)."""
    if len(paths) == 1:
        return paths[0]
    m0, m1 = re.search(r"(\d+)\.tar$", paths[0]), re.search(r"(\d+)\.tar$", paths[-1])
    if not (m0 and m1):
        return "::".join(paths)
    return f"{paths[0][: m0.start(1)]}{{{m0.group(1)}..{m1.group(1)}}}.tar"


def write_shards(
    samples: Iterable[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    prefix: str = "shard",
    maxcount: int = 1000,
    maxsize: int = 256 << 20,
    optional: Iterable[str] = (),
) -> list[str]:
    """Write samples to ``out_dir/{prefix}-000000.tar, ...`` and the index ``out_dir/{prefix}.json``.

    A new shard starts when the current one holds ``maxcount`` samples or ``maxsize`` bytes.

    Args:
        samples: Dicts with ``__key__`` (no dots) and fields by extension: ``json`` (dict), ``png`` /
            ``jpg`` / ``mask.png`` (bytes, PIL image or uint8 ndarray), ``cls`` (int), ``mp4`` (bytes),
            ``codes.npy`` (ndarray), ``txt`` (str), or any extension with bytes.
        out_dir: Output folder (created).
        prefix: Shard name prefix; also names the index file.
        maxcount: Samples per shard (at most).
        maxsize: Bytes of member data per shard (at most, unless a single sample is larger).
        optional: Fields that some samples lack on purpose (e.g. ``("mask.png",)`` for images kept without a
            mask). The reader skips a sample that lacks a field most of its shard's samples carry,
            unless the field is listed here.

    Returns:
        The shard paths in order. No samples gives no shards (and an index with ``total: 0``).
    """
    import webdataset as wds

    if maxcount < 1 or maxsize < 1:
        raise ValueError(f"maxcount and maxsize must be positive, got {maxcount}, {maxsize}")
    if "." in prefix or "/" in prefix:
        raise ValueError(f"shard prefix {prefix!r} must not contain '.' or '/'")
    optional = (optional,) if isinstance(optional, str) else tuple(optional)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Any]] = []
    paths: list[str] = []
    writer = None
    count = size = 0
    seen: set[str] = set()
    fields: set[str] | None = None  # extensions present in every sample (the reader checks them)
    field_counts: Counter = Counter()  # per shard: samples carrying each field
    code_shapes: Counter = Counter()  # per shard: shapes of the codes.npy arrays

    def close() -> None:
        nonlocal writer
        if writer is not None:
            writer.close()
            shards.append(
                {
                    "name": Path(paths[-1]).name,
                    "count": count,
                    "bytes": size,
                    "fields": dict(sorted(field_counts.items())),
                    **_usual_shape(code_shapes),
                }
            )
            field_counts.clear()
            code_shapes.clear()
            writer = None

    try:
        for sample in samples:
            key = check_key(sample.get("__key__"))
            if key in seen:
                raise ValueError(f"duplicate sample key {key!r} in shard set {prefix!r}")
            seen.add(key)
            encoded = {"__key__": key}
            for ext, value in sample.items():
                if ext.startswith("_"):
                    continue
                if not ext or ext.startswith(".") or "/" in ext:
                    raise ValueError(f"sample {key!r}: bad field name {ext!r}")
                encoded[ext] = encode_value(ext, value)
            names = set(encoded) - {"__key__"}
            if not names:
                raise ValueError(f"sample {key!r} has no fields to write")
            fields = names if fields is None else fields & names
            nbytes = sum(len(v) for k, v in encoded.items() if k != "__key__")
            if writer is None or count >= maxcount or (size + nbytes > maxsize and count > 0):
                close()
                path = out / f"{prefix}-{len(paths):06d}.tar"
                paths.append(str(path))
                # encoder=False: we encoded above; mtime fixed so rebuilt shards are byte-identical.
                writer = wds.TarWriter(str(path), encoder=False, mtime=0)  # int: a float adds a PAX header per member
                count = size = 0
            writer.write(encoded)
            count += 1
            size += nbytes
            field_counts.update(names)
            if "codes.npy" in names:
                code_shapes[_npy_shape(sample["codes.npy"], encoded["codes.npy"])] += 1
        close()
    finally:
        if writer is not None:  # an exception mid-write: close the file so it is not left open
            writer.close()
    index = {
        "version": INDEX_VERSION,
        "prefix": prefix,
        "pattern": Path(brace_pattern(paths)).name if paths else "",
        "total": sum(s["count"] for s in shards),
        "fields": sorted(fields or ()),
        "optional": sorted(set(optional)),
        "shards": shards,
    }
    tmp = out / f".{prefix}.json.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    tmp.replace(out / f"{prefix}.json")  # atomic: a reader never sees half an index
    _remove_leftover_shards(out, prefix, len(paths))
    logger.info("wrote %d samples in %d shards to %s/%s-*.tar", index["total"], len(paths), out, prefix)
    return paths


def _remove_leftover_shards(out: Path, prefix: str, count: int) -> None:
    """Delete ``<prefix>-NNNNNN.tar`` with N >= ``count``: shards of an earlier build of this set that the new one
    did not overwrite (a shard pattern would otherwise read them as part of it)."""
    name = re.compile(rf"^{re.escape(prefix)}-(\d{{6}})\.tar$")
    leftovers = sorted(p for p in out.iterdir() if (m := name.match(p.name)) and int(m.group(1)) >= count)
    for p in leftovers:
        p.unlink()
    if leftovers:
        logger.warning(
            "removed %d shard(s) of an earlier, larger %r set in %s (%s ...): they are not part of this build",
            len(leftovers),
            prefix,
            out,
            leftovers[0].name,
        )


def _npy_shape(value: Any, data: bytes) -> tuple[int, ...]:
    """Shape of an ``.npy`` field: from the array when we were given one, else from the encoded header."""
    if hasattr(value, "shape"):
        return tuple(int(d) for d in value.shape)
    try:
        return tuple(np.load(io.BytesIO(data), allow_pickle=False, mmap_mode=None).shape)
    except (ValueError, OSError):
        return ()  # not a readable array: the reader reports it when it decodes the sample


def _usual_shape(code_shapes: Counter) -> dict[str, list[int]]:
    """``{"codes_shape": shape}`` if one shape is shared by at least half of the shard's ``codes.npy`` arrays.

    Only ``codes.npy`` (tokenizer grids and fixed-length sequences, stacked by every consumer) is described:
    other arrays may be variable-length on purpose, and a majority rule would then drop the shorter ones.
    """
    if not code_shapes:
        return {}
    shape, n = code_shapes.most_common(1)[0]
    return {"codes_shape": list(shape)} if 2 * n >= sum(code_shapes.values()) else {}


def write_splits(
    cfg: Any, builder: str, samples: Callable[[Any, str, int], Iterable[dict]], unit: str, **extra: Any
) -> dict:
    """Write the ``train``/``val``/``test`` splits of a builder whose config has per-split counts.

    Args:
        cfg: Builder config with ``out``, ``train``/``val``/``test`` counts, ``maxcount`` and optionally
            ``maxsize``; a split with count <= 0 is skipped.
        builder: Builder name for the summary and the log line.
        samples: ``samples(cfg, split, count)`` yields the samples of one split.
        unit: What a sample is called in the summary ("clips", "scenes").
        extra: More summary fields (e.g. the canvas size).

    Returns:
        ``{"builder", "out", **extra, "splits": {split: {unit, "shards", "pattern"}}, "seconds"}``.
    """
    t0 = time.perf_counter()
    summary: dict = {"builder": builder, "out": str(cfg.out), **extra, "splits": {}}
    maxsize = getattr(cfg, "maxsize", 256 << 20)
    for split in ("train", "val", "test"):
        count = int(getattr(cfg, split))
        if count <= 0:
            continue
        paths = write_shards(samples(cfg, split, count), cfg.out, prefix=split, maxcount=cfg.maxcount, maxsize=maxsize)
        summary["splits"][split] = {unit: count, "shards": len(paths), "pattern": brace_pattern(paths)}
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    logger.info("%s shards: %s", builder, summary)
    return summary
