"""Decoding raw WebDataset samples into tensors, with errors that name the sample and the shard.

webdataset's ``decode("pil")`` would turn an L-mode mask PNG into RGB and its default handlers swallow
nothing useful for an error policy, so decoding is ours: every field by extension, every failure raised
as :class:`DataError` carrying a ``reason`` (for the skip counters), the sample key and the shard URL.

Decoded fields (only those present):

=================  ==========================================================================
tar member         decoded sample field
=================  ==========================================================================
``jpg/png/...``    ``image``: float ``[C, H, W]`` in [0, 1]; C = 1 for grey images, 3 otherwise
``mask.png``       ``mask``: long ``[H, W]`` (0/1 or class ids; first channel if stored as RGB)
``instances.png``  ``instances``: long ``[H, W]`` (0 = background, i = item i)
``json``           ``json``: dict
``cls``            ``label``: int (else ``json["label"]`` when present)
``mp4/webm/avi``   ``video``: float ``[C, T, H, W]`` in [0, 1] (PyAV)
``codes.npy``      ``codes``: long tensor of ids >= 0 (and below ``json["codebook_size"]`` when given);
                   other ``.npy``: a tensor under the extension name
``txt``            ``text``: str
=================  ==========================================================================
Other members stay raw bytes under their extension.

Codes are checked rather than converted: a float, boolean or 0-d ``codes.npy``, a negative id or one past the
codebook would otherwise be truncated or wrap silently and either train on wrong ids or fail deep inside an
embedding lookup; each is a ``bad_codes`` DataError instead. A codes array whose shape differs from its shard's
usual one (``codes_shape``, recorded by the writer) is ``bad_shape``: it could not be stacked with the others.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "ppm", "bmp", "tif", "tiff")
VIDEO_EXTS = ("mp4", "webm", "avi", "mkv")
MASK_EXTS = {"mask.png": "mask", "mask.jpg": "mask", "instances.png": "instances", "seg.png": "mask"}
# Compound extensions we write ourselves; any other "<x>.<ext>" pattern shared by all members of a
# sample means the key itself contained a dot (see :func:`check_key_dot`).
KNOWN_COMPOUND_PREFIXES = {"mask", "instances", "seg", "codes", "depth"}


class DataError(ValueError):
    """A sample or shard that cannot be used.

    Attributes:
        reason: Short counter name ("decode_image", "bad_json", "missing_field", "truncated_shard", ...).
        key: The sample key (or "" for shard-level problems).
        url: The shard it came from.
    """

    def __init__(self, reason: str, message: str | None = None, key: str = "", url: str = ""):
        if message is None:
            # One string: a DataError re-created from its text, as a DataLoader worker's exception is re-raised
            # in the main process. Keep the type (so ``except DataError`` works with workers) and the reason.
            found = re.search(r"DataError: (\w+): ", reason)
            super().__init__(reason)
            self.reason, self.key, self.url, self._message = (found.group(1) if found else "data_error"), "", "", None
            return
        where = " ".join(x for x in (f"key {key!r}" if key else "", f"in {url}" if url else "") if x)
        super().__init__(f"{reason}: {message}" + (f" ({where})" if where else ""))
        self.reason, self.key, self.url, self._message = reason, key, url, message

    def __reduce__(self) -> tuple:  # pickles with its fields, not just the formatted text
        if self._message is None:
            return type(self), (self.args[0],)
        return type(self), (self.reason, self._message, self.key, self.url)


class ShardPatternError(FileNotFoundError):
    """A shard pattern that names no (or missing) files; the message names the pattern."""


def decode_image(data: bytes, mode: str = "keep") -> torch.Tensor:
    """Image bytes -> float ``[C, H, W]`` in [0, 1].

    Args:
        mode: "keep" (grey stays 1 channel, anything else becomes RGB), "RGB" or "L".
    """
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()  # forces the full decode now, so truncated/corrupt data raises here
        if mode == "keep":
            target = "L" if im.mode in ("L", "I;16", "I", "1") else "RGB"
        else:
            target = mode
        if im.mode in ("I;16", "I") and target == "L":  # 16-bit grey: scale to 8 bits rather than clip
            arr = (np.asarray(im, dtype=np.float32) / 65535.0 * 255.0).astype(np.uint8)
        else:
            arr = np.array(im.convert(target) if im.mode != target else im)  # a writable copy for torch
    t = torch.from_numpy(arr)
    t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)  # [H, W, C] -> [C, H, W]
    return t.float().div_(255.0)


def decode_mask(data: bytes) -> torch.Tensor:
    """Mask PNG bytes -> long ``[H, W]`` with the stored values (never RGB-converted)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        arr = np.asarray(im)  # L / P / I;16 keep their integer values; RGB: first channel
    if arr.ndim == 3:
        arr = arr[..., 0]
    return torch.from_numpy(arr.astype(np.int64))


def encode_video(frames: np.ndarray, fps: int = 8, crf: int = 18, codec: str = "libx264") -> bytes:
    """uint8 frames ``[T, H, W, 3]`` -> mp4 bytes (H.264, yuv420p; H and W must be even)."""
    import av

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"H.264 with yuv420p needs even frame sizes, got {h}x{w}")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        # Small clips: no B-frame lookahead needed; crf 18 is visually lossless for these canvases.
        stream.options = {"crf": str(crf), "preset": "veryfast", "tune": "zerolatency"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush
            container.mux(packet)
    return buf.getvalue()


def decode_video(data: bytes) -> torch.Tensor:
    """Video bytes -> float ``[C, T, H, W]`` in [0, 1] (all frames, RGB)."""
    import av

    with av.open(io.BytesIO(data), mode="r") as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError("the video has no frames")
    arr = np.stack(frames)  # [T, H, W, 3]
    return torch.from_numpy(arr).permute(3, 0, 1, 2).float().div_(255.0)  # [C, T, H, W]


def check_key_dot(exts: Iterable[str]) -> str | None:
    """If every extension of a sample starts with the same unknown ``<x>.``, the key had a dot: return x."""
    exts = list(exts)
    if not exts or not all("." in e for e in exts):
        return None
    heads = {e.split(".", 1)[0] for e in exts}
    if len(heads) == 1:
        head = heads.pop()
        if head not in KNOWN_COMPOUND_PREFIXES:
            return head
    return None


def _codes(arr: np.ndarray) -> torch.Tensor:
    """``codes.npy`` array -> long tensor; anything that is not a non-empty array of ids >= 0 raises ``ValueError``."""
    if arr.dtype.kind not in "iu":
        raise ValueError(
            f"codes must be integer ids, got {arr.dtype} (ids are never rounded); rebuild the token shards"
        )
    if arr.ndim == 0 or arr.size == 0:
        raise ValueError(f"codes must be a non-empty grid or sequence, got shape {arr.shape}")
    if arr.min() < 0 or (arr.dtype.kind == "u" and arr.max() > np.iinfo(np.int64).max):
        raise ValueError(f"codes must be ids in [0, codebook size), got values in [{arr.min()}, {arr.max()}]")
    return torch.from_numpy(arr.astype(np.int64))


def decode_sample(
    raw: dict[str, Any],
    *,
    image_mode: str = "keep",
    required: Iterable[str] = (),
    codes_shape: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """Decode a raw sample (``__key__``, ``__url__`` and ``ext -> bytes``).

    Args:
        raw: One grouped tar sample.
        image_mode: See :func:`decode_image`.
        required: Extensions that must be present (e.g. ``("png", "mask.png")``).
        codes_shape: The shape ``codes.npy`` must have (its shard's usual shape), or None to accept any.

    Raises:
        DataError: With reason ``key_with_dot``, ``missing_field``, ``decode_image``, ``decode_mask``,
            ``decode_video``, ``bad_json``, ``bad_cls``, ``decode_npy``, ``bad_codes``, ``bad_shape`` or
            ``empty_sample``.
    """
    key, url = raw.get("__key__", ""), raw.get("__url__", "")
    exts = [k for k in raw if not k.startswith("__")]
    if not exts:
        raise DataError("empty_sample", "sample has no members", key, url)
    dotted = check_key_dot(exts)
    if dotted is not None:
        raise DataError(
            "key_with_dot", f"the key contains a dot (members {sorted(exts)}); rename it", f"{key}.{dotted}", url
        )
    missing = [r for r in required if r not in raw]
    if missing:
        raise DataError("missing_field", f"missing {missing} (has {sorted(exts)})", key, url)
    out: dict[str, Any] = {"__key__": key}
    for ext in exts:
        data = raw[ext]
        try:
            if ext in MASK_EXTS:
                out[MASK_EXTS[ext]] = decode_mask(data)
            elif ext in IMAGE_EXTS:
                if "image" in out:
                    raise DataError("ambiguous_image", f"two image members ({ext} and another)", key, url)
                out["image"] = decode_image(data, image_mode)
            elif ext in ("json", "jsn"):
                out["json"] = json.loads(data.decode("utf-8"))
                if not isinstance(out["json"], dict):
                    raise ValueError(f"json must be an object, got {type(out['json']).__name__}")
            elif ext in ("cls", "cls2"):
                out["label" if ext == "cls" else ext] = int(data.decode("ascii").strip())
            elif ext in VIDEO_EXTS:
                out["video"] = decode_video(data)
            elif ext.endswith("npy"):
                arr = np.load(io.BytesIO(data), allow_pickle=False)  # never unpickle shard contents
                name = ext[: -len(".npy")] if ext.endswith(".npy") else ext
                if name == "codes":
                    try:
                        out["codes"] = _codes(arr)
                    except ValueError as e:
                        raise DataError("bad_codes", f".{ext}: {e}", key, url) from e
                    if codes_shape is not None and tuple(arr.shape) != tuple(codes_shape):
                        raise DataError(
                            "bad_shape",
                            f".{ext} has shape {arr.shape}, its shard's codes are {tuple(codes_shape)}",
                            key,
                            url,
                        )
                else:
                    out[name] = torch.from_numpy(arr)
            elif ext in ("txt", "text"):
                out["text"] = data.decode("utf-8")
            else:
                out[ext] = data
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - any decoder failure becomes a DataError with context
            reason = (
                "decode_mask"
                if ext in MASK_EXTS
                else "decode_image"
                if ext in IMAGE_EXTS
                else "bad_json"
                if ext in ("json", "jsn")
                else "bad_cls"
                if ext.startswith("cls")
                else "decode_video"
                if ext in VIDEO_EXTS
                else "decode_npy"
                if ext.endswith("npy")
                else "decode"
            )
            raise DataError(reason, f".{ext}: {type(e).__name__}: {e}", key, url) from e
    if "label" not in out and isinstance(out.get("json"), dict) and isinstance(out["json"].get("label"), int):
        out["label"] = out["json"]["label"]
    size = out.get("json", {}).get("codebook_size") if isinstance(out.get("json"), dict) else None
    if "codes" in out and isinstance(size, int) and int(out["codes"].max()) >= size:
        raise DataError("bad_codes", f"codes up to {int(out['codes'].max())} but codebook_size is {size}", key, url)
    if "mask" in out and "image" in out and tuple(out["mask"].shape) != tuple(out["image"].shape[-2:]):
        raise DataError(
            "mask_size", f"mask {tuple(out['mask'].shape)} vs image {tuple(out['image'].shape[-2:])}", key, url
        )
    return out
