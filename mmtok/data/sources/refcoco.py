"""RefCOCO, RefCOCO+ and RefCOCOg as referring-segmentation shards, from files the user downloaded.

Datasets: RefCOCO and RefCOCO+ (Yu et al., "Modeling Context in Referring Expressions", ECCV 2016,
arXiv:1608.00272; expressions from Kazemzadeh et al., "ReferItGame", EMNLP 2014) and RefCOCOg (Mao et al.,
"Generation and Comprehension of Unambiguous Object Descriptions", CVPR 2016, arXiv:1511.02283; the UMD
split from Nagaraja et al., arXiv:1608.00525). Images and masks are MS-COCO's (Lin et al., arXiv:1405.0312).
Reference loader: the refer toolkit, github.com/lichengunc/refer (``refer.py``); masks are decoded with
pycocotools, COCO's own mask library.

Layout read (the refer toolkit's; nothing is downloaded here)::

    <root>/refcoco/instances.json        COCO format: images, annotations (polygons or RLE), categories
    <root>/refcoco/refs(unc).p           pickle (Python 2) of a list of refs; also refs(google).p
    <root>/refcoco+/refs(unc).p          (each dataset folder has its own instances.json)
    <root>/refcocog/refs(umd).p          also refs(google).p
    <root>/images/mscoco/images/train2014/COCO_train2014_000000123456.jpg

A ref is ``{ref_id, ann_id, image_id, category_id, split, sentences: [{sent, raw, tokens, sent_id}],
sent_ids, file_name}``; ``ann_id`` points into ``instances.json``, whose annotation holds the mask and box.
``refs=<file>.json`` reads the same records from JSON instead of a pickle.

Builder ``refcoco`` (``mmtok shards refcoco --out data/refcoco root=DATA dataset=refcoco``) writes one
shard set per split found in the refs file (train, val, test, testA, testB; ``splits=`` picks some).
Sample: ``jpg`` (the COCO image; its original bytes unless ``max_side`` shrinks it), ``mask.png`` (uint8
0/1, the referred object) and ``json`` with ``source``, ``split``, ``expression``, ``class_name``,
``class_id``, ``bbox`` [x0, y0, x1, y1] (pixels of the written image, x1/y1 exclusive), ``ref_id``,
``ann_id``, ``image_id``, ``sent_id`` and ``sentences``.

What mmtok does differently from ``refer.py``:

- The refs pickle is read by :class:`RestrictedUnpickler`, which builds only dicts, lists, tuples,
  strings, bytes, numbers, booleans and None and refuses every class or function a pickle names, so a
  tampered refs file cannot run code (``pickle.load`` would run whatever the file names).
- Python 2 ``str`` values arrive as bytes and are decoded as UTF-8 (Latin-1 where that fails), keys too.
- The mask is the union of the annotation's polygons (``refer.getMask`` sums them, so overlapping parts
  of a multi-part object would read 2); ``bbox`` is the tight box of the written mask, the same convention
  as the fashion-scenes set, and falls back to the annotation's scaled box only when the mask is empty.
- A missing or unreadable image is skipped, counted and logged (``on_error=skip``), never ``sys.exit``.
- Split names are taken literally: ``splits=test`` means refs whose split is ``test``; refer's
  ``getRefIds(split="test")`` also returns ``testA``/``testB``.
"""

from __future__ import annotations

import io
import json
import logging
import math
import pickle
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmtok.registries import SHARD_BUILDERS

logger = logging.getLogger(__name__)

# Default refs file per dataset (the refer README recommends UMD's split for RefCOCOg: it has a test set
# and no image overlap between splits).
DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
# Where the refer toolkit and its users (LISA, Text4Seg) keep COCO train2014, relative to the data root.
IMAGE_DIR_CANDIDATES = (
    "images/mscoco/images/train2014",
    "images/mscoco/train2014",
    "images/train2014",
    "train2014",
    "coco/train2014",
)
REQUIRED_REF_FIELDS = ("ref_id", "ann_id", "image_id", "split", "sentences")
REQUIRED_ANN_FIELDS = ("id", "image_id", "segmentation", "bbox")
_SAFE_TYPES = (dict, list, tuple, str, bytes, int, float, bool, type(None))


class RefsFormatError(ValueError):
    """A refs or instances file that is readable but lacks what the builder needs; the message names it."""


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A pickle that names a class or function (or a persistent id): refused before anything is built.

    Also a ``ValueError``, so callers that report bad inputs (``mmtok shards``) print it as one.
    """


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds plain data only: dicts, lists, tuples, str, bytes, numbers, bools, None.

    Every opcode that could reach code goes through :meth:`find_class` (GLOBAL, STACK_GLOBAL, INST, OBJ
    and the extension-registry opcodes) or :meth:`persistent_load`; both refuse, so REDUCE, NEWOBJ and
    BUILD never get a callable. Sets and bytearrays, which protocol 4-5 build without naming a class, are
    refused afterwards by :func:`load_refs_pickle`.
    """

    def find_class(self, module: str, name: str) -> Any:
        raise UnsafePickleError(
            f"the pickle names {module}.{name}; refs files may hold only dicts, lists, tuples, strings, bytes, "
            "numbers, booleans and None, so it was refused and nothing in it was run. If you trust this file, "
            "convert it to JSON yourself and pass refs=<file>.json"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(
            f"the pickle holds a persistent id ({type(pid).__name__}); refs files may hold only plain data, so it "
            "was refused"
        )


def _to_text(value: Any, where: str = "refs") -> Any:
    """Bytes -> str (UTF-8, else Latin-1) throughout, keys included; any non-plain type raises."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.decode("latin-1")
    if isinstance(value, dict):
        return {_to_text(k, where): _to_text(v, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_to_text(v, where) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if not isinstance(value, _SAFE_TYPES):  # set, frozenset, bytearray, PickleBuffer
        raise UnsafePickleError(f"{where} holds a {type(value).__name__}; only plain data is admitted")
    return value


def load_refs_pickle(source: str | Path | bytes) -> Any:
    """Read a refs pickle (any protocol, Python 2 or 3) through :class:`RestrictedUnpickler`.

    Args:
        source: A path or the pickle's bytes.

    Returns:
        The unpickled plain data with every bytes value and key decoded to str.

    Raises:
        UnsafePickleError: The pickle names a class or function, or holds a set or persistent id.
    """
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    # encoding="bytes": Python 2 str arrives as bytes (not guessed as ASCII), and _to_text decodes it.
    obj = RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    try:
        return _to_text(obj)
    except RecursionError as e:
        raise UnsafePickleError("the refs pickle is nested too deeply to be a refs list") from e


def load_refs(path: str | Path) -> list[dict[str, Any]]:
    """The ref records of a refs file: a ``.json`` list (or ``{"refs": [...]}``) or a restricted pickle.

    Raises:
        RefsFormatError: Not a list of records, or a record without a required field (the message names
            the field and the record).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"refs file {path} does not exist")
    if path.suffix.lower() == ".json":
        try:
            refs = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise RefsFormatError(f"refs file {path} is not valid JSON: {e}") from e
        if isinstance(refs, dict) and "refs" in refs:
            refs = refs["refs"]
    else:
        refs = load_refs_pickle(path)
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise RefsFormatError(f"refs file {path} must hold a list of ref records (dicts), got {type(refs).__name__}")
    for i, ref in enumerate(refs):
        for field in REQUIRED_REF_FIELDS:
            if field not in ref:
                raise RefsFormatError(
                    f"refs file {path}: record {i} (ref_id {ref.get('ref_id', '?')}) lacks the field {field!r}; "
                    f"every record needs {', '.join(REQUIRED_REF_FIELDS)}"
                )
        sents = ref["sentences"]
        if not isinstance(sents, list) or not sents:
            raise RefsFormatError(f"refs file {path}: ref_id {ref['ref_id']} has no sentences (need a non-empty list)")
        for s in sents:
            if not isinstance(s, dict) or not isinstance(s.get("sent", s.get("raw")), str):
                raise RefsFormatError(
                    f"refs file {path}: ref_id {ref['ref_id']} has a sentence without the field 'sent' (or 'raw'): "
                    f"{s!r}"
                )
    return refs


def load_instances(path: str | Path) -> tuple[dict, dict, dict]:
    """``instances.json`` -> (annotations by id, images by id, category names by id).

    Raises:
        RefsFormatError: A missing top-level key or an annotation without a required field.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"instances file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise RefsFormatError(f"instances file {path} is not valid JSON: {e}") from e
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise RefsFormatError(
                f"instances file {path} lacks the COCO key {key!r} (need images, annotations, categories)"
            )
    anns = {}
    for a in data["annotations"]:
        for field in REQUIRED_ANN_FIELDS:
            if field not in a:
                raise RefsFormatError(f"instances file {path}: annotation {a.get('id', '?')} lacks the field {field!r}")
        anns[a["id"]] = a
    images = {im["id"]: im for im in data["images"]}
    cats = {c["id"]: c.get("name", str(c["id"])) for c in data["categories"]}
    return anns, images, cats


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) -> uint8 ``[height, width]`` 0/1 mask.

    Several polygons (a multi-part object) are merged by union.
    """
    try:
        from pycocotools import mask as coco_mask
    except ImportError as e:  # a core dependency; only a broken install gets here
        raise ImportError("the refcoco builder decodes masks with pycocotools: pip install pycocotools") from e

    if isinstance(segmentation, list):  # polygons [[x0, y0, x1, y1, ...], ...]
        polys = [p for p in segmentation if len(p) >= 6]  # fewer than 3 points covers no pixel
        if not polys:
            return np.zeros((height, width), np.uint8)
        rle = coco_mask.frPyObjects(polys, height, width)
    elif isinstance(segmentation, dict) and "counts" in segmentation:
        if isinstance(segmentation["counts"], list):  # uncompressed RLE: run lengths, column-major
            rle = coco_mask.frPyObjects(segmentation, height, width)
        else:
            counts = segmentation["counts"]
            rle = {"size": list(segmentation["size"]), "counts": counts.encode() if isinstance(counts, str) else counts}
    else:
        raise RefsFormatError(f"unknown segmentation {str(segmentation)[:80]!r}: expected polygons or RLE")
    m = coco_mask.decode(rle)  # [H, W] or [H, W, n]
    if m.ndim == 3:
        m = m.max(axis=2)
    if m.shape != (height, width):
        raise RefsFormatError(f"segmentation of size {m.shape} does not match its image ({height}, {width})")
    return (m > 0).astype(np.uint8)


def mask_bbox(mask: np.ndarray) -> list[int] | None:
    """Tight box ``[x0, y0, x1, y1]`` of a 0/1 mask ``[H, W]`` (x1, y1 exclusive); None when empty."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if ys.size == 0:
        return None
    return [int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1]


@dataclass
class RefCOCOConfig:
    """Options of ``mmtok shards refcoco``."""

    out: str = "data/refcoco"
    root: str = ""  # the refer data folder (holds refcoco/, refcoco+/, refcocog/), or one dataset folder
    dataset: str = "refcoco"  # refcoco | refcoco+ | refcocog: the subfolder, and the samples' "source"
    split_by: str = ""  # refs(<split_by>).p; "" = unc for refcoco and refcoco+, umd for refcocog
    refs: str = ""  # refs file (.p pickle or .json), overriding dataset/split_by ("" = found under root)
    instances: str = ""  # instances.json ("" = next to the refs file)
    images: str = ""  # the COCO train2014 image folder ("" = looked up under root)
    splits: str = ""  # comma-separated splits to write, e.g. "train,val" ("" = every split of the refs file)
    per_sentence: bool = True  # one sample per (ref, sentence); false = one per ref, first sentence
    max_side: int = 0  # shrink images (and masks, nearest) so the longer side is at most this (0 = keep)
    limit: int = 0  # refs per split, for a quick look (0 = all)
    on_error: str = "skip"  # missing or unreadable image: skip (counted, logged) | raise
    maxcount: int = 1000
    maxsize: int = 256 << 20


def _resolve_inputs(cfg: RefCOCOConfig) -> tuple[Path, Path, str]:
    """(refs file, instances file, split_by) from the config, with errors that say what to pass."""
    split_by = cfg.split_by or DEFAULT_SPLIT_BY.get(cfg.dataset, "unc")
    root = Path(cfg.root) if cfg.root else None
    if root is not None and not root.is_dir():
        raise FileNotFoundError(
            f"root={cfg.root!r} is not a folder; pass the refer data folder (holding {cfg.dataset}/)"
        )
    if cfg.refs:
        refs = Path(cfg.refs)
        if not refs.is_file():
            raise FileNotFoundError(f"refs={cfg.refs!r} does not exist")
        data_dir = refs.parent
    else:
        if root is None:
            raise FileNotFoundError("pass root=<refer data folder> (holding refcoco/instances.json) or refs=<file>")
        data_dir = root / cfg.dataset if (root / cfg.dataset).is_dir() else root
        if data_dir == root and not (root / "instances.json").is_file():
            present = sorted(p.parent.name for p in root.glob("*/instances.json"))
            raise FileNotFoundError(
                f"no folder {root / cfg.dataset} (nor instances.json in {root})"
                + (f"; found {', '.join(present)}: set dataset=" if present else "; check root=")
            )
        names = (f"refs({split_by}).p", f"refs({split_by}).json")
        found = [data_dir / n for n in names if (data_dir / n).is_file()]
        if not found:
            present = sorted(p.name for p in data_dir.glob("refs*"))
            raise FileNotFoundError(
                f"no {' or '.join(names)} in {data_dir}"
                + (f" (found {', '.join(present)}: set split_by=)" if present else "; check root= and dataset=")
            )
        refs = found[0]
    instances = Path(cfg.instances) if cfg.instances else data_dir / "instances.json"
    if not instances.is_file():
        raise FileNotFoundError(f"no instances file {instances}; pass instances=<path to instances.json>")
    return refs, instances, split_by


def _resolve_images(cfg: RefCOCOConfig, refs_path: Path) -> Path:
    if cfg.images:
        path = Path(cfg.images)
        if not path.is_dir():
            raise FileNotFoundError(f"images={cfg.images!r} is not a folder; pass the COCO train2014 image folder")
        return path
    bases = [Path(cfg.root)] if cfg.root else []
    bases += [refs_path.parent.parent, refs_path.parent]  # <root>/<dataset>/refs(unc).p -> <root>
    tried = [b / c for b in bases for c in IMAGE_DIR_CANDIDATES]
    for cand in tried:
        if cand.is_dir():
            return cand
    raise FileNotFoundError(
        "no COCO train2014 image folder found (looked in " + ", ".join(str(t) for t in tried[:5]) + ", ...); pass "
        "images=<folder of COCO_train2014_*.jpg>"
    )


def _image_file(images: Path, image_id: int, entry: dict) -> Path | None:
    """The image of ``image_id``: instances' file_name, COCO 2014's name, or COCO 2017's bare id name."""
    names = [entry["file_name"]] if entry.get("file_name") else []
    names += [f"COCO_train2014_{int(image_id):012d}.jpg", f"{int(image_id):012d}.jpg"]
    for name in names:
        if (images / name).is_file():
            return images / name
    return None


def _load_image(path: Path, max_side: int) -> tuple[str, bytes, tuple[int, int], tuple[int, int]]:
    """(extension, bytes to write, written (w, h), original (w, h)); original bytes unless resized."""
    from PIL import Image

    from mmtok.data.writer import encode_image

    raw = path.read_bytes()
    with Image.open(io.BytesIO(raw)) as im:
        im.load()  # a truncated file fails here, not later in training
        size = im.size
        ext = {"JPEG": "jpg", "PNG": "png"}.get(im.format or "", "")
        if max_side > 0 and max(size) > max_side:
            scale = max_side / max(size)
            new = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
            img = im.convert("RGB") if im.mode not in ("RGB", "L") else im
            return "jpg", encode_image(img.resize(new, Image.BICUBIC), "jpg"), new, size
        if not ext:  # not JPEG/PNG: a lossless PNG of the pixels
            img = im.convert("RGB") if im.mode not in ("RGB", "L") else im
            ext, raw = "png", encode_image(img, "png")
    return ext, raw, size, size


def _parse_splits(splits: Any) -> list[str]:
    if isinstance(splits, str):
        return [s.strip() for s in splits.split(",") if s.strip()]
    return [str(s) for s in (splits or ())]


@SHARD_BUILDERS.register("refcoco", config=RefCOCOConfig)
def build_refcoco(cfg: RefCOCOConfig) -> dict:
    """RefCOCO / RefCOCO+ / RefCOCOg (refer toolkit layout) as referring-segmentation shards, one set per split."""
    from PIL import Image

    from mmtok.data.writer import brace_pattern, encode_image, write_shards

    if cfg.on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', not {cfg.on_error!r}")
    if cfg.max_side < 0 or cfg.limit < 0:
        raise ValueError(f"max_side and limit must be >= 0, got {cfg.max_side}, {cfg.limit}")
    t0 = time.perf_counter()
    refs_path, instances_path, split_by = _resolve_inputs(cfg)
    refs = load_refs(refs_path)
    anns, images_by_id, cats = load_instances(instances_path)
    image_dir = _resolve_images(cfg, refs_path)
    by_split: dict[str, list[dict]] = {}
    for ref in refs:
        by_split.setdefault(str(ref["split"]), []).append(ref)
    wanted = _parse_splits(cfg.splits) or sorted(by_split)
    unknown = [s for s in wanted if s not in by_split]
    if unknown:
        raise ValueError(f"split(s) {unknown} not in {refs_path.name}; it has {', '.join(sorted(by_split))}")
    logger.info("refcoco: %d refs from %s, %d annotations, images in %s", len(refs), refs_path, len(anns), image_dir)
    source = cfg.dataset
    problems: dict[str, list[str]] = {"missing_image": [], "unreadable_image": [], "size_mismatch": []}
    skipped = {"samples": 0}
    bad_images: set[Any] = set()  # images already counted as a problem (each is logged once)

    def problem(kind: str, image_id: Any, message: str, n_samples: int) -> None:
        skipped["samples"] += n_samples
        if cfg.on_error == "raise":
            raise FileNotFoundError(message) if kind == "missing_image" else ValueError(message)
        if image_id not in bad_images:
            bad_images.add(image_id)
            problems[kind].append(str(image_id))
            logger.warning("refcoco: skipping image %s: %s", image_id, message)

    def samples(split: str) -> Iterator[dict[str, Any]]:
        # Sorted by image so each image is read once; the reader's shuffle buffer mixes them again.
        chosen = sorted(by_split[split], key=lambda r: (r["image_id"], r["ref_id"]))
        if cfg.limit:
            chosen = chosen[: cfg.limit]
        cached: tuple[Any, Any] = (None, None)  # (image_id, what _load_image returned for it)
        for n_ref, ref in enumerate(chosen):
            if n_ref and n_ref % 5000 == 0:  # a full RefCOCO split takes minutes: say where it is
                logger.info("refcoco %s: %d of %d refs", split, n_ref, len(chosen))
            image_id, ann_id = ref["image_id"], ref["ann_id"]
            sentences = ref["sentences"]
            n_out = len(sentences) if cfg.per_sentence else 1
            if image_id in bad_images:  # another ref of an image already skipped
                skipped["samples"] += n_out
                continue
            ann = anns.get(ann_id)
            if ann is None:
                raise RefsFormatError(
                    f"ref_id {ref['ref_id']} names ann_id {ann_id}, which {instances_path} lacks: the refs file and "
                    "instances.json come from different datasets (pass the instances.json of the same folder)"
                )
            entry = images_by_id.get(image_id, {})
            if cached[0] != image_id:
                path = _image_file(image_dir, image_id, entry)
                if path is None:
                    problem("missing_image", image_id, f"no image file for image_id {image_id} in {image_dir}", n_out)
                    continue
                try:
                    cached = (image_id, _load_image(path, cfg.max_side))
                except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
                    problem("unreadable_image", image_id, f"unreadable image {path}: {e}", n_out)
                    continue
            ext, data, (w, h), (w0, h0) = cached[1]
            if (entry.get("width", w0), entry.get("height", h0)) != (w0, h0):
                problem(
                    "size_mismatch",
                    image_id,
                    f"image {image_id} is {w0}x{h0} but instances.json says {entry['width']}x{entry['height']}",
                    n_out,
                )
                continue
            try:
                mask = decode_segmentation(ann["segmentation"], h0, w0)  # [h0, w0] 0/1
            except RefsFormatError as e:
                raise RefsFormatError(f"{instances_path}: annotation {ann_id} (ref_id {ref['ref_id']}): {e}") from e
            if (w, h) != (w0, h0):  # nearest keeps the mask binary
                mask = np.asarray(Image.fromarray(mask).resize((w, h), Image.NEAREST))
            box = mask_bbox(mask)
            if box is None:  # an empty mask (degenerate polygon): the annotation's box, scaled
                x, y, bw, bh = (float(v) for v in ann["bbox"])
                sx, sy = w / w0, h / h0
                # floor/ceil: the pixels the float box touches, clipped to the image
                box = [
                    max(0, math.floor(x * sx)),
                    max(0, math.floor(y * sy)),
                    min(w, math.ceil((x + bw) * sx)),
                    min(h, math.ceil((y + bh) * sy)),
                ]
            class_id = ref.get("category_id", ann.get("category_id"))
            mask_png = encode_image(mask, "png")  # once per ref, shared by its sentences
            texts = [s.get("sent", s.get("raw")) for s in sentences]
            info = {
                "source": source,
                "split_by": split_by,
                "split": split,
                "class_name": cats.get(class_id, str(class_id)),
                "class_id": class_id,
                "bbox": box,
                "ref_id": ref["ref_id"],
                "ann_id": ann_id,
                "image_id": image_id,
                "file_name": entry.get("file_name", f"COCO_train2014_{int(image_id):012d}.jpg"),
                "image_size": [w, h],
                "orig_size": [w0, h0],
                "sentences": texts,
                "sent_ids": [s.get("sent_id") for s in sentences],
            }
            key = re.sub(r"[^A-Za-z0-9_\-]", "_", f"ref{ref['ref_id']}")
            for j in range(n_out):
                yield {
                    "__key__": f"{key}_{j}" if cfg.per_sentence else key,
                    ext: data,
                    "mask.png": mask_png,
                    "json": {**info, "expression": texts[j], "sent_id": sentences[j].get("sent_id")},
                }

    summary: dict[str, Any] = {
        "builder": "refcoco",
        "out": str(cfg.out),
        "dataset": source,
        "refs": str(refs_path),
        "images": str(image_dir),
        "splits": {},
    }
    for split in wanted:
        paths = write_shards(samples(split), cfg.out, prefix=split, maxcount=cfg.maxcount, maxsize=cfg.maxsize)
        index = json.loads((Path(cfg.out) / f"{split}.json").read_text())
        summary["splits"][split] = {
            "refs": min(len(by_split[split]), cfg.limit) if cfg.limit else len(by_split[split]),
            "samples": index["total"],
            "shards": len(paths),
            "pattern": brace_pattern(paths) if paths else "",
        }
    summary["skipped_images"] = {k: len(v) for k, v in problems.items() if v}
    summary["skipped_samples"] = skipped["samples"]
    summary["skipped_image_ids"] = {k: v[:20] for k, v in problems.items() if v}
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    if skipped["samples"]:
        logger.warning(
            "refcoco: skipped %d samples of %d images (%s); see skipped_image_ids in the summary",
            skipped["samples"],
            len(bad_images),
            ", ".join(f"{k}: {len(v)}" for k, v in problems.items() if v),
        )
    logger.info("refcoco shards: %s", summary)
    return summary
