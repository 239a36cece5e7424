"""``fashion-vqa``: visual question answering generated from fashion-scenes metadata.

Our own synthetic set (in the spirit of CLEVR's templated questions, arXiv:1612.06890): each scene from
:func:`mmtok.data.sources.scenes.make_scene` (96x96 canvas by default: with patch 4 that is 24 x 24 = 576 image
tokens, LLaVA-1.5's count) gets templated questions whose answers follow from the item list:

* ``count``: "how many items are there ?" -> "one" .. "four"
* ``left``: "which item is furthest to the left ?" -> class name (asked only when the leftmost item's centre
  is at least ``left_margin`` pixels left of the next one, so the answer is unambiguous)
* ``colour``: "what colour is the <class> ?" -> colour name (asked only when that class occurs once)
* ``exists``: "is there a <class> ?" -> "yes" / "no" (present and absent classes drawn half and half)

Training-only dense supervision (``describe_train=true``, off by default; val and test never change): each train
scene also gets one ``describe`` sample, "describe the picture ." -> every item left to right as "<colour> <class>",
joined by " , " (e.g. "red sneaker , blue bag"). One answer then carries what all four question types test: the
class of every item ("exists"), their order ("left"), the colour bound to each class ("colour") and their number
("count"), so each image gives the tower a class and colour target per item instead of one word. A captioning
stage before instruction tuning plays this role in LLaVA (arXiv:2304.08485); here the two are mixed in one stage.

Splits never share Fashion-MNIST source images (train/val/test as in fashion-scenes). One sample per
(scene, question): ``png`` (RGB canvas) + ``json`` {source, split, scene, question, answer, qtype, items}.

Small items (``scene_canvas``, e.g. 48 on the 96 px canvas): the scene is composed on a ``scene_canvas`` canvas
(items 30-50% of that side, so 14-24 px instead of 28-48 px) and placed at a random spot of the full canvas, whose
rest is background of the scene's own border colour. Each item then covers ~3-6 patches across instead of 7-12,
so a pruner that keeps 64 of 576 tokens at random often keeps none or one of an item's patches: the questions
separate pruning methods that the default scenes (where random keeping retains ~95%) do not.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from mmtok.registries import SHARD_BUILDERS

logger = logging.getLogger(__name__)

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six"]
QTYPES = ("count", "left", "colour", "exists")
DESCRIBE_QUESTION = "describe the picture ."


@dataclass
class FashionVQAConfig:
    """Options of ``mmtok shards fashion-vqa``."""

    out: str = "data/fashion-vqa"
    train: int = 8000  # scenes per split (0 skips the split)
    val: int = 200
    test: int = 500
    canvas: int = 96
    min_items: int = 1
    max_items: int = 4
    questions_per_scene: int = 2  # distinct question types per scene
    left_margin: int = 6  # pixels between the leftmost and the next item centre for a "left" question
    scene_canvas: int = 0  # 0: items fill the canvas; 32 <= n < canvas: compose on n px and place it (small items)
    describe_train: bool = False  # one more train sample per scene: "describe the picture ." (val/test unchanged)
    seed: int = 0
    root: str = "/usr/share/datasets/fashion-mnist"
    maxcount: int = 2000


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def questions_for(items: list[dict], rng: np.random.Generator, left_margin: int = 6) -> dict[str, tuple[str, str]]:
    """Every askable question of a scene: ``{qtype: (question, answer)}`` (one draw per type)."""
    from mmtok.data.sources.fashion_mnist import CLASS_NAMES

    out: dict[str, tuple[str, str]] = {}
    out["count"] = ("how many items are there ?", NUMBER_WORDS[len(items)])
    centres = sorted(((it["bbox"][0] + it["bbox"][2]) / 2, it["class_name"]) for it in items)
    if len(centres) == 1 or centres[1][0] - centres[0][0] >= left_margin:
        out["left"] = ("which item is furthest to the left ?", centres[0][1])
    classes = [it["class_name"] for it in items]
    unique = [it for it in items if classes.count(it["class_name"]) == 1]
    if unique:
        it = unique[int(rng.integers(len(unique)))]
        out["colour"] = (f"what colour is the {it['class_name']} ?", it["colour"])
    present = sorted(set(classes))
    absent = [c for c in CLASS_NAMES if c not in present]
    if rng.random() < 0.5 or not absent:
        c, ans = present[int(rng.integers(len(present)))], "yes"
    else:
        c, ans = absent[int(rng.integers(len(absent)))], "no"
    out["exists"] = (f"is there {_article(c)} {c} ?", ans)
    return out


def describe_answer(items: list[dict]) -> str:
    """Every item left to right (by box centre) as "<colour> <class>", joined by " , "."""
    ordered = sorted(items, key=lambda it: (it["bbox"][0] + it["bbox"][2]) / 2)
    return " , ".join(f"{it['colour']} {it['class_name']}" for it in ordered)


_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def place_scene(
    rgb: np.ndarray, items: list[dict], canvas: int, rng: np.random.Generator
) -> tuple[np.ndarray, list[dict]]:
    """Put a small scene at a random spot of a larger canvas (the small-items variant).

    Args:
        rgb: uint8 ``[s, s, 3]`` scene from :func:`mmtok.data.sources.scenes.make_scene`.
        items: Its item dicts (``bbox`` in scene pixels).
        canvas: Side of the output canvas (> s).

    Returns:
        uint8 ``[canvas, canvas, 3]`` and the items with ``bbox`` shifted and ``position`` recomputed on the canvas.
        Outside the scene: the median colour of the scene's border plus the same pixel noise as scene backgrounds,
        so the scene's edge is not a bright frame around the items.
    """
    from mmtok.data.sources.scenes import position_word

    side = rgb.shape[0]
    if not 0 < side < canvas:
        raise ValueError(f"scene_canvas must be below the canvas ({canvas}), got {side}")
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]]).astype(np.float32)  # [4s, 3]
    fill = np.median(border, axis=0)[None, None, :] + rng.normal(0, 3, size=(canvas, canvas, 3))
    out = np.clip(np.round(fill), 0, 255).astype(np.uint8)
    x0, y0 = (int(v) for v in rng.integers(0, canvas - side + 1, size=2))
    out[y0 : y0 + side, x0 : x0 + side] = rgb
    moved = []
    for it in items:
        b = it["bbox"]
        bbox = [b[0] + x0, b[1] + y0, b[2] + x0, b[3] + y0]
        moved.append(
            {**it, "bbox": bbox, "position": position_word((bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2, canvas)}
        )
    return out, moved


def vqa_samples(cfg: FashionVQAConfig, split: str, count: int):
    """Yield the samples of one split (deterministic in ``cfg.seed``)."""
    from mmtok.data.sources.scenes import make_scene, split_source

    small = 0 < cfg.scene_canvas < cfg.canvas
    if cfg.scene_canvas and not small:
        raise ValueError(f"scene_canvas must be 0 (off) or in [32, canvas={cfg.canvas}), got {cfg.scene_canvas}")
    images, labels, fidx = split_source(split, cfg.root)
    for s in range(count):
        rng = np.random.default_rng([cfg.seed, 7, _SPLIT_IDS[split], s])
        side = cfg.scene_canvas if small else cfg.canvas
        rgb, _, items = make_scene(rng, images, labels, side, cfg.min_items, cfg.max_items, indices=fidx)
        if small:  # drawn after the scene, so the default scenes (small off) keep their random stream
            rgb, items = place_scene(rgb, items, cfg.canvas, rng)
        qs = questions_for(items, rng, cfg.left_margin)
        types = [t for t in QTYPES if t in qs]
        chosen = rng.choice(len(types), size=min(cfg.questions_per_scene, len(types)), replace=False)
        picked = [types[int(j)] for j in sorted(chosen)]
        if cfg.describe_train and split == "train":  # no draw from rng: the four types' samples stay the same
            qs["describe"] = (DESCRIBE_QUESTION, describe_answer(items))
            picked.append("describe")
        for qtype in picked:
            question, answer = qs[qtype]
            yield {
                "__key__": f"{split}_{s:06d}_{qtype}",
                "png": rgb,
                "json": {
                    "source": "fashion-vqa",
                    "split": split,
                    "scene": s,
                    "canvas": cfg.canvas,
                    "scene_canvas": side,
                    "qtype": qtype,
                    "question": question,
                    "answer": answer,
                    "items": [{k: it[k] for k in ("class_name", "colour", "bbox", "position")} for it in items],
                },
            }


@SHARD_BUILDERS.register("fashion-vqa", config=FashionVQAConfig)
def build_fashion_vqa(cfg: FashionVQAConfig) -> dict:
    """Templated VQA over fashion scenes (train/val/test shards; test is the held-out split)."""
    from mmtok.data.writer import write_splits

    return write_splits(cfg, "fashion-vqa", vqa_samples, "scenes", canvas=cfg.canvas, scene_canvas=cfg.scene_canvas)


def normalise_answer(text: str) -> str:
    """Lower case, single spaces, "t - shirt" -> "t-shirt", no trailing punctuation."""
    return " ".join(text.lower().replace(" - ", "-").replace(" ?", "").replace(" .", "").split())
