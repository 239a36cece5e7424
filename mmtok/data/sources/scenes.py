"""Fashion scenes: a referring-segmentation set composed from Fashion-MNIST items.

Each scene is a canvas (64x64 by default, 128x128 also) with 1-4 Fashion-MNIST items, each scaled,
tinted with a colour from a small named palette and placed without heavy overlap on a dark, slightly
noisy background. Masks come from the item pixels (the 28x28 grey value, resized, above a threshold);
later items occlude earlier ones, and the masks are the visible pixels. Each item gets a referring
expression that is unique within its scene: the shortest of "the sneaker", "the red sneaker",
"the sneaker on the left", "the red sneaker on the left" that no other item in the scene also fits
(colours are re-drawn at generation time until such a phrase exists).

This is our own synthetic set (in the spirit of CLEVR-Ref+ / Multi-MNIST compositions), not a published
one. The referring-segmentation samples follow the schema of refCOCO-style data used by Text4Seg
(arXiv:2410.09855) and LISA (arXiv:2308.00692): image + binary mask of the referred object + expression.

Builder ``fashion-scenes`` (``mmtok shards fashion-scenes --out data/scenes``): one sample per scene
with one referred item drawn at random (``per_item=true`` writes one sample per (scene, item) instead).
Sample fields: ``png`` (RGB canvas), ``mask.png`` (uint8 0/1 mask of the referred item),
``instances.png`` (uint8: 0 background, i = item i), ``json`` with ``expression``, ``class_name``,
``class_id``, ``bbox`` [x0, y0, x1, y1] (pixels, x1/y1 exclusive), ``target`` (index into ``items``) and
``items`` (every item's dict, see :func:`make_scene`). Splits never share source images: train draws from
Fashion-MNIST train images 0..49,999, val from train images 50,000..59,999, test from the test set.
Each scene is generated from its own ``numpy`` generator seeded with (seed, split, scene index), so the
output is deterministic and any scene can be regenerated alone.

No-target expressions (``absent_share > 0``): in the spirit of GRES / gRefCOCO (Liu et al., "GRES: Generalized
Referring Expression Segmentation", CVPR 2023, arXiv:2306.00968; reference code henghuiding/ReLA), a share of the
samples names something that is *not* in the scene; their ``mask.png`` is all zeros and their json has
``target = -1``, ``no_target = true``, ``bbox = []``, ``label = -1``, ``class_name`` / ``class_id`` of the class
the expression names and ``absent_kind`` (below). gRefCOCO's no-target expressions were written by annotators to be
deceptive (they name things similar to what is in the image); ours are made as hard as the scene allows, drawn
uniformly among the kinds the scene offers (:func:`absent_expression`): ``colour`` -- a class that is in the scene,
in a colour it does not have there ("the blue sneaker" beside a red one; a colour that another item wears when
there is one); ``class`` -- a class that is not in the scene, in a colour that is ("the red bag" when only the
sneaker is red); ``place`` -- a class that is in the scene, at a place where it is not ("the sneaker at the top"
when it is at the bottom; a place another item occupies when there is one); ``absent`` -- only when the scene
allows none of these, a missing class ("the bag"). They use the templates of present expressions (the minimal
style's colour / position forms, the full style's "the <colour> <class> <position phrase>") and never fit any item
of the scene. gRefCOCO also has multi-target expressions; fashion scenes do not. The choices come from a second
generator seeded with (seed, split, scene index, ``ABSENT_STREAM``), so the scene's own draws (image, items,
target) are untouched: with ``absent_share = 0`` (the default) the shards are byte-identical to a build without
the option, and with it the with-target samples are the same as before.

Harder training scenes (``repeat_class > 0``): each item after the first repeats an earlier item's class with that
probability, so more expressions need a colour or place word (0.25: 27% of the samples name a colour and 5% a
place; 0.5: 39% and 8%; 12% and 2% by default). Meant for training sets (the seg_scenes_cpu recipe trains on 0.25:
on default scenes its tower learns to ignore colour); the choices come from their own generator (seeded with
``REPEAT_STREAM``), and 0 (the default) leaves the shards byte-identical.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from mmtok.data.sources.fashion_mnist import CLASS_NAMES, DEFAULT_ROOT, load_fashion_mnist
from mmtok.registries import SHARD_BUILDERS

logger = logging.getLogger(__name__)

# Named tints (RGB). Saturated and far apart so a colour word is unambiguous to a human and a model.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (225, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 100, 240),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 210),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
    "cyan": (40, 210, 220),
}
MASK_THRESHOLD = 0.25  # alpha above which a resized item pixel counts as the item (FMNIST bg is exactly 0)
MAX_OVERLAP = 0.15  # max share of an item's placement box that may overlap earlier boxes
# Disjoint source ranges per split: (Fashion-MNIST split, first index, end index).
SPLIT_SOURCES: dict[str, tuple[str, int, int]] = {
    "train": ("train", 0, 50_000),
    "val": ("train", 50_000, 60_000),
    "test": ("test", 0, 10_000),
}


def position_word(cx: float, cy: float, canvas: int) -> str:
    """Coarse position of a point on a 3x3 grid: "top left", "top", ..., "center", ..., "bottom right"."""
    col = "left" if cx < canvas / 3 else ("right" if cx >= 2 * canvas / 3 else "")
    row = "top" if cy < canvas / 3 else ("bottom" if cy >= 2 * canvas / 3 else "")
    return f"{row} {col}".strip() or "center"


def position_phrase(pos: str) -> str:
    """``"left"`` -> ``"on the left"``, ``"center"`` -> ``"in the center"``, ``"top left"`` -> ``"at the top left"``."""
    if pos == "center":
        return "in the center"
    return f"on the {pos}" if pos in ("left", "right") else f"at the {pos}"


def _expressions(cls: str, colour: str, pos: str) -> list[str]:
    """Candidate expressions from shortest to most specific."""
    return [
        f"the {cls}",
        f"the {colour} {cls}",
        f"the {cls} {position_phrase(pos)}",
        f"the {colour} {cls} {position_phrase(pos)}",
    ]


EXPRESSION_KINDS = ("class", "colour", "place", "colour+place")  # what each template of _expressions adds


def expression_kind(expression: str, item: dict) -> str | None:
    """Which template names ``item`` in ``expression``: ``"class"`` ("the bag"), ``"colour"``, ``"place"`` or
    ``"colour+place"`` (what the phrase needs beyond the class); None if it is none of the item's templates."""
    forms = _expressions(item["class_name"], item["colour"], item["position"])
    return EXPRESSION_KINDS[forms.index(expression)] if expression in forms else None


def _fits(expr_index: int, a: dict, b: dict) -> bool:
    """Would candidate ``expr_index`` of item ``a`` also describe item ``b``?"""
    if a["class_id"] != b["class_id"]:
        return False
    same_colour, same_pos = a["colour"] == b["colour"], a["position"] == b["position"]
    return [True, same_colour, same_pos, same_colour and same_pos][expr_index]


POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
ABSENT_KINDS = ("colour", "class", "place", "absent")  # no-target expression kinds, hardest first
ABSENT_STREAM = 0xAB5E  # fourth seed word of the no-target generator (a stream apart from the scene's own)
REPEAT_STREAM = 0x2EC1  # fourth seed word of the repeated-class generator (``repeat_class``)


def absent_expression(items: list[dict], rng: np.random.Generator, style: str = "minimal") -> dict:
    """A referring expression that fits no item of a scene, as hard as the scene allows.

    Args:
        items: The scene's items (dicts with ``class_id``, ``colour``, ``position``; see :func:`make_scene`).
        rng: The generator of the choices (the builder passes its no-target stream, not the scene's).
        style: "minimal" (the shortest template that states the false attribute: "the blue sneaker", "the sneaker
            at the top", "the bag") or "full" (always "the <colour> <class> <position phrase>", like present
            expressions of that style).

    Returns:
        ``{"expression", "class_id", "class_name", "colour", "position", "kind"}``: the named attributes and the
        kind (one of :data:`ABSENT_KINDS`, see the module docstring), drawn uniformly among the kinds available.
    """
    if not items:
        raise ValueError("a no-target expression needs the scene's items (got none)")
    names = list(PALETTE)
    present = sorted({it["class_id"] for it in items})
    missing = [c for c in range(len(CLASS_NAMES)) if c not in present]
    scene_colours = sorted({it["colour"] for it in items}, key=names.index)

    def pick(seq):
        return seq[int(rng.integers(len(seq)))]

    def harder(preferred: list, fallback: list) -> list:
        # a false attribute the scene shows elsewhere is harder to reject than one it does not show at all
        return preferred or fallback

    options: dict[str, tuple] = {}  # kind -> a function drawing (class_id, colour, position, template index)
    # colour: a present class, in a colour none of its items has (8 colours > 4 items, so always possible)
    if any(len({o["colour"] for o in items if o["class_id"] == c}) < len(names) for c in present):

        def colour_kind():
            c = pick([c for c in present if len({o["colour"] for o in items if o["class_id"] == c}) < len(names)])
            own = {o["colour"] for o in items if o["class_id"] == c}
            col = pick(harder([n for n in scene_colours if n not in own], [n for n in names if n not in own]))
            pos = pick([o["position"] for o in items if o["class_id"] == c])  # where one of that class is
            return c, col, pos, 1

        options["colour"] = colour_kind
    # class: a class missing from the scene, in a colour the scene shows
    if missing:

        def class_kind():
            col = pick(scene_colours)
            pos = pick([o["position"] for o in items if o["colour"] == col])  # where that colour is
            return pick(missing), col, pos, 1

        options["class"] = class_kind
    # place: a present class at a place none of its items is
    if any(len({o["position"] for o in items if o["class_id"] == c}) < len(POSITIONS) for c in present):

        def place_kind():
            c = pick([c for c in present if len({o["position"] for o in items if o["class_id"] == c}) < len(POSITIONS)])
            own = {o["position"] for o in items if o["class_id"] == c}
            taken = sorted({o["position"] for o in items if o["position"] not in own}, key=POSITIONS.index)
            pos = pick(harder(taken, [p for p in POSITIONS if p not in own]))
            col = pick([o["colour"] for o in items if o["class_id"] == c and o["position"] != pos])
            return c, col, pos, 2

        options["place"] = place_kind
    if not options:  # every class present in every colour and place: cannot happen with <= 4 items, kept total
        if not missing:
            raise ValueError("every class is in the scene in every colour and place: no expression can be absent")
        options["absent"] = lambda: (pick(missing), pick(names), pick(list(POSITIONS)), 0)
    kind = pick(list(options))
    cls, col, pos, k = options[kind]()
    k = 3 if style == "full" else k
    named = {"class_id": cls, "colour": col, "position": pos}
    # the invariant the kinds are built for; checked here so a change to them cannot write a false negative
    assert not any(_fits(k, named, it) for it in items), (named, k, items)
    return {
        "expression": _expressions(CLASS_NAMES[cls], col, pos)[k],
        "class_id": cls,
        "class_name": CLASS_NAMES[cls],
        "colour": col,
        "position": pos,
        "kind": kind,
    }


def assign_expressions(items: list[dict], style: str = "minimal") -> None:
    """Set ``item["expression"]`` for every item, unique within the scene.

    ``style="minimal"`` adds colour and position words only until no other item fits the phrase;
    ``"full"`` always uses "the <colour> <class> <position phrase>".
    """
    for item in items:
        cands = _expressions(item["class_name"], item["colour"], item["position"])
        order = range(4) if style == "minimal" else (3,)
        for k in order:
            if not any(_fits(k, item, other) for other in items if other is not item):
                item["expression"] = cands[k]
                break
        else:  # make_scene re-draws colours so this cannot happen for its scenes
            raise ValueError(f"items are indistinguishable (same class, colour and position): {item['class_name']}")


def _background(rng: np.random.Generator, canvas: int) -> np.ndarray:
    """A dark background with a random base colour, a soft gradient and pixel noise: float [H, W, 3] in 0..255."""
    base = rng.uniform(5, 45, size=3)
    ramp = np.linspace(-1, 1, canvas)
    direction = rng.uniform(-8, 8, size=2)
    grad = direction[0] * ramp[None, :, None] + direction[1] * ramp[:, None, None]  # [H, W, 1]
    noise = rng.normal(0, 3, size=(canvas, canvas, 3))
    return np.clip(base[None, None, :] + grad + noise, 0, 255)


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0


def make_scene(
    rng: np.random.Generator,
    images: np.ndarray,
    labels: np.ndarray,
    canvas: int = 64,
    min_items: int = 1,
    max_items: int = 4,
    *,
    indices: np.ndarray | None = None,
    style: str = "minimal",
    repeat_class: float = 0.0,
    repeat_rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Compose one scene.

    Args:
        rng: The scene's random generator (the scene is a pure function of its state).
        images: uint8 ``[N, 28, 28]`` Fashion-MNIST items (0 = background).
        labels: int ``[N]`` class ids (0..9).
        canvas: Side of the square canvas in pixels (>= 32).
        min_items, max_items: Number of items drawn uniformly in this range (fewer are placed only if
            no free spot is found after 50 tries, which is rare).
        indices: Optional index values recorded as ``source_index`` per item (positions in ``images``
            when omitted); builders pass the Fashion-MNIST indices here.
        style: Expression style, "minimal" or "full" (see :func:`assign_expressions`).
        repeat_class: Probability that an item after the first is drawn from the class of an earlier item (a
            uniformly chosen one), so that only colour or place tells the two apart. The choices come from
            ``repeat_rng``; the scene's own generator makes the same draws as without the option, so a repeated
            item keeps its size and spot and only its source image is replaced (what follows from the image --
            visible mask, place word, a colour re-drawn to keep expressions unique -- may differ).
        repeat_rng: Generator of those choices (required when ``repeat_class > 0``).

    Returns:
        ``(rgb, instance_mask, items)``: uint8 ``[H, W, 3]``; uint8 ``[H, W]`` with 0 = background and
        ``i`` = pixels of ``items[i - 1]`` (visible pixels only); and per item a dict with ``class_id``,
        ``class_name``, ``colour``, ``rgb``, ``bbox`` [x0, y0, x1, y1] (tight box of the visible mask,
        x1/y1 exclusive), ``position``, ``expression``, ``area`` (visible pixels), ``source_index``.
    """
    if canvas < 32:
        raise ValueError(f"canvas must be at least 32 pixels, got {canvas}")
    if not 1 <= min_items <= max_items:
        raise ValueError(f"need 1 <= min_items <= max_items, got {min_items}, {max_items}")
    if len(images) == 0 or len(images) != len(labels):
        raise ValueError(f"images and labels must be non-empty and aligned, got {len(images)} and {len(labels)}")
    if repeat_class and repeat_rng is None:
        raise ValueError("repeat_class > 0 needs repeat_rng (the generator of the repeated-class choices)")
    n_items = int(rng.integers(min_items, max_items + 1))
    lo, hi = max(12, int(canvas * 0.3)), max(14, int(canvas * 0.5))  # item side: 30-50% of the canvas
    canvas_rgb = _background(rng, canvas)
    inst = np.zeros((canvas, canvas), np.uint8)
    boxes: list[tuple[int, int, int, int]] = []
    items: list[dict] = []
    # An item is skipped when no spot overlaps little enough or its source is (almost) empty at this size; it is
    # then drawn again, a bounded number of times, so a scene never ends with fewer items than it drew (small
    # canvases skip often: at 32 px a one-item scene could otherwise end empty).
    attempts = 0
    while len(items) < n_items and attempts < 20 * n_items:
        attempts += 1
        idx = int(rng.integers(len(images)))
        if repeat_class and items and repeat_rng.random() < repeat_class:
            same = np.flatnonzero(labels == items[int(repeat_rng.integers(len(items)))]["class_id"])
            idx = int(same[repeat_rng.integers(len(same))])
        side = int(rng.integers(lo, hi + 1))
        for _try in range(50):  # rejection sampling of a spot that overlaps earlier boxes only a little
            x0, y0 = (int(v) for v in rng.integers(0, canvas - side + 1, size=2))
            box = (x0, y0, x0 + side, y0 + side)
            if all(_overlap(box, b) <= MAX_OVERLAP * side * side for b in boxes):
                break
        else:
            continue
        alpha = _resize(np.asarray(images[idx]), side)  # [s, s] in [0, 1]
        item_mask = alpha > MASK_THRESHOLD
        if item_mask.sum() < 4:  # an (almost) empty source image: nothing to refer to
            continue
        boxes.append(box)
        cls = int(labels[idx])
        items.append(
            {
                "class_id": cls,
                "class_name": CLASS_NAMES[cls],
                "source_index": int(indices[idx]) if indices is not None else idx,
                "_box": box,
                "_alpha": alpha,
                "_mask": item_mask,
            }
        )
    # Paint in order (later items on top) and record visible masks.
    for i, it in enumerate(items, start=1):
        x0, y0, x1, y1 = it["_box"]
        it["_colour_rng"] = rng.permutation(len(PALETTE))
        region = inst[y0:y1, x0:x1]
        region[it["_mask"]] = i
    for i, it in enumerate(items, start=1):
        ys, xs = np.nonzero(inst == i)
        if len(xs) == 0:  # fully occluded (cannot happen with MAX_OVERLAP < 1, kept as a guard)
            it["_hidden"] = True
            continue
        it["bbox"] = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
        it["area"] = len(xs)
        it["position"] = position_word((xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2, canvas)
    if any(it.get("_hidden") for it in items):  # drop hidden items and renumber the instance mask
        keep = [i for i, it in enumerate(items, start=1) if not it.get("_hidden")]
        lut = np.zeros(256, np.uint8)
        lut[keep] = np.arange(1, len(keep) + 1)
        inst = lut[inst]
        items = [it for it in items if not it.get("_hidden")]
    if not items:
        raise ValueError(f"no item could be placed on a {canvas} px canvas after {attempts} draws; use a larger canvas")
    # Colours: each item takes the first colour of its own permutation that keeps (class, colour,
    # position) distinct from earlier items, so a unique expression always exists (8 colours > 4 items).
    names = list(PALETTE)
    for i, it in enumerate(items):
        taken = {o["colour"] for o in items[:i] if o["class_id"] == it["class_id"] and o["position"] == it["position"]}
        it["colour"] = next(names[c] for c in it["_colour_rng"] if names[c] not in taken)
        it["rgb"] = list(PALETTE[it["colour"]])
    for it in items:
        x0, y0, x1, y1 = it["_box"]
        a = it["_alpha"][..., None]  # [s, s, 1]
        shade = 0.55 + 0.45 * a  # keep the garment's texture: brighter where the source is brighter
        tint = np.asarray(it["rgb"], np.float32)[None, None, :] * shade
        patch = canvas_rgb[y0:y1, x0:x1]
        canvas_rgb[y0:y1, x0:x1] = np.where(it["_mask"][..., None], tint * a + patch * (1 - a), patch)
    assign_expressions(items, style=style)
    out_items = [{k: v for k, v in it.items() if not k.startswith("_")} for it in items]
    return np.round(canvas_rgb).astype(np.uint8), inst, out_items


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0) * max(h, 0)


def split_source(split: str, root: str = DEFAULT_ROOT) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The Fashion-MNIST items a scenes split may use: ``(images, labels, fmnist_indices)``.

    Train uses FMNIST train 0..49,999, val FMNIST train 50,000..59,999, test the FMNIST test set; so no
    source image is shared between splits.
    """
    if split not in SPLIT_SOURCES:
        raise ValueError(f"scenes split must be one of {sorted(SPLIT_SOURCES)}, not {split!r}")
    fsplit, lo, hi = SPLIT_SOURCES[split]
    images, labels = load_fashion_mnist(fsplit, root)
    return images[lo:hi], labels[lo:hi], np.arange(lo, hi)


@dataclass
class FashionScenesConfig:
    """Options of ``mmtok shards fashion-scenes``."""

    out: str = "data/scenes"
    train: int = 10_000  # scenes per split (0 skips the split)
    val: int = 1_000
    test: int = 1_000
    canvas: int = 64  # 64 or 128 (any size >= 32 works)
    min_items: int = 1
    max_items: int = 4
    seed: int = 0
    per_item: bool = False  # one sample per (scene, item) instead of one per scene with a random target
    style: str = "minimal"  # expression style: minimal | full
    # probability that a sample's expression names something NOT in the scene (empty mask, target -1, no_target
    # true; GRES-style no-target samples). 0 = every sample has a target (output byte-identical to before)
    absent_share: float = 0.0
    # probability that an item after the first repeats the class of an earlier one (only its colour or place then
    # tells it apart): a training set that asks for colour and place words more often. 0 = byte-identical output
    repeat_class: float = 0.0
    root: str = DEFAULT_ROOT
    maxcount: int = 2000
    maxsize: int = 256 << 20


_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def scene_samples(cfg: FashionScenesConfig, split: str, count: int):
    """Yield the shard samples of one split (deterministic in ``cfg.seed``)."""
    images, labels, fidx = split_source(split, cfg.root)
    fsplit = SPLIT_SOURCES[split][0]
    for s in range(count):
        rng = np.random.default_rng([cfg.seed, _SPLIT_IDS[split], s])
        repeat_rng = (
            np.random.default_rng([cfg.seed, _SPLIT_IDS[split], s, REPEAT_STREAM]) if cfg.repeat_class else None
        )
        rgb, inst, items = make_scene(
            rng,
            images,
            labels,
            cfg.canvas,
            cfg.min_items,
            cfg.max_items,
            indices=fidx,
            style=cfg.style,
            repeat_class=cfg.repeat_class,
            repeat_rng=repeat_rng,
        )
        for it in items:
            it["source_split"] = fsplit
        targets = range(len(items)) if cfg.per_item else [int(rng.integers(len(items)))]
        # no-target choices come from their own stream: the scene's generator is left exactly as it was
        absent_rng = (
            np.random.default_rng([cfg.seed, _SPLIT_IDS[split], s, ABSENT_STREAM]) if cfg.absent_share else None
        )
        for t in targets:
            key = f"{split}_{s:06d}" + (f"_{t}" if cfg.per_item else "")
            if absent_rng is not None and absent_rng.random() < cfg.absent_share:
                yield _absent_sample(cfg, split, s, key, rgb, inst, items, absent_rng)
                continue
            item = items[t]
            yield {
                "__key__": key,
                "png": rgb,
                "mask.png": (inst == t + 1).astype(np.uint8),
                "instances.png": inst,
                "json": {
                    "source": "fashion-scenes",
                    "split": split,
                    "scene": s,
                    "canvas": cfg.canvas,
                    "target": t,
                    "expression": item["expression"],
                    "class_name": item["class_name"],
                    "class_id": item["class_id"],
                    "label": item["class_id"],
                    "bbox": item["bbox"],
                    "items": items,
                },
            }


def _absent_sample(cfg, split, scene, key, rgb, inst, items, rng) -> dict:
    """A no-target sample of a scene: an expression no item fits and an all-zero mask."""
    named = absent_expression(items, rng, cfg.style)
    return {
        "__key__": key,
        "png": rgb,
        "mask.png": np.zeros_like(inst),
        "instances.png": inst,
        "json": {
            "source": "fashion-scenes",
            "split": split,
            "scene": scene,
            "canvas": cfg.canvas,
            "target": -1,
            "expression": named["expression"],
            "class_name": named["class_name"],  # the class the expression names (not in the scene as named)
            "class_id": named["class_id"],
            "label": -1,  # no referred item, so no image label (readers treat < 0 as unlabelled)
            "bbox": [],
            "items": items,
            "no_target": True,
            "absent_kind": named["kind"],
        },
    }


@SHARD_BUILDERS.register("fashion-scenes", config=FashionScenesConfig)
def build_fashion_scenes(cfg: FashionScenesConfig) -> dict:
    """Referring-segmentation scenes of tinted Fashion-MNIST items (train/val/test shards)."""
    from mmtok.data.writer import write_splits

    if cfg.style not in ("minimal", "full"):
        raise ValueError(f"style must be 'minimal' or 'full', not {cfg.style!r}")
    if not 0.0 <= cfg.absent_share <= 1.0:
        raise ValueError(f"absent_share must be a probability in [0, 1], got {cfg.absent_share}")
    if not 0.0 <= cfg.repeat_class <= 1.0:
        raise ValueError(f"repeat_class must be a probability in [0, 1], got {cfg.repeat_class}")
    return write_splits(cfg, "fashion-scenes", scene_samples, "scenes", canvas=cfg.canvas)
