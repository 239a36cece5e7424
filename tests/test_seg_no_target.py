"""No-target referring expressions (GRES-style): the fashion-scenes builder's ``absent_share``, N-acc / T-acc in
``SegMeter`` and ``mmtok eval seg``, and the ``mllm_seg`` task on samples whose mask is empty."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from mmtok.data.sources.fashion_mnist import CLASS_NAMES
from mmtok.data.sources.scenes import (
    ABSENT_KINDS,
    PALETTE,
    POSITIONS,
    FashionScenesConfig,
    _expressions,
    _fits,
    absent_expression,
    scene_samples,
)

# sha256 (first 16 hex digits) of the samples scene_samples yields for 12 scenes per split, made with the code
# BEFORE absent_share existed (commit 680fe65) by hashing, per sample in order: the key, then for png / mask.png /
# instances.png the (dtype, shape) string and the raw array bytes, then json.dumps(json) (key order kept). Hashing
# the arrays, not the tar files, keeps the check independent of PNG-encoder versions; the json order is what the
# writer serialises. Cases: (seed 0, 64 px), (seed 3, 32 px, per_item, full style), (seed 11, 48 px, 2-4 items).
BEFORE = {
    "0/train": "e2f482ed32f13d16",
    "0/val": "9b3e5ca01137d59b",
    "0/test": "d33fb2aff0157cfe",
    "1/train": "b21b5d56f31d827b",
    "1/val": "9be1f8ffc1f044d2",
    "1/test": "6eed96ec08aa05d2",
    "2/train": "9c95093e39d2de47",
    "2/val": "2ecafb20e6fc4d04",
    "2/test": "ebca4117836f47d3",
}
CASES = [
    dict(seed=0, canvas=64),
    dict(seed=3, canvas=32, per_item=True, style="full"),
    dict(seed=11, canvas=48, min_items=2, max_items=4),
]


def _digest(samples) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(s["__key__"].encode())
        for k in ("png", "mask.png", "instances.png"):
            a = np.ascontiguousarray(s[k])
            h.update(str((a.dtype.str, a.shape)).encode())
            h.update(a.tobytes())
        h.update(json.dumps(s["json"]).encode())
    return h.hexdigest()[:16]


def test_absent_share_zero_leaves_every_split_as_it_was(fmnist_dir):
    for i, kw in enumerate(CASES):
        cfg = FashionScenesConfig(absent_share=0.0, root=fmnist_dir, **kw)
        for split in ("train", "val", "test"):
            assert _digest(scene_samples(cfg, split, 12)) == BEFORE[f"{i}/{split}"], (kw, split)


def test_absent_share_zero_shards_are_byte_identical(tmp_path, fmnist_dir):
    from mmtok.data.sources.scenes import build_fashion_scenes

    kw = dict(train=6, val=3, test=3, canvas=32, maxcount=4, root=fmnist_dir)
    build_fashion_scenes(FashionScenesConfig(out=str(tmp_path / "default"), **kw))
    build_fashion_scenes(FashionScenesConfig(out=str(tmp_path / "zero"), absent_share=0.0, **kw))
    tars = sorted(p.name for p in (tmp_path / "default").glob("*.tar"))
    assert len(tars) >= 4 and tars == sorted(p.name for p in (tmp_path / "zero").glob("*.tar"))
    for name in tars:
        assert (tmp_path / "default" / name).read_bytes() == (tmp_path / "zero" / name).read_bytes(), name


def _true_expressions(items: list[dict]) -> set[str]:
    """Every template phrase that is true of some item (all four forms of each item describe it)."""
    return {e for it in items for e in _expressions(it["class_name"], it["colour"], it["position"])}


def _random_items(rng: np.random.Generator) -> list[dict]:
    """1-4 items with distinct (class, colour, position), as make_scene guarantees; classes often repeat."""
    items: list[dict] = []
    n = int(rng.integers(1, 5))
    classes = rng.choice(len(CLASS_NAMES), size=int(rng.integers(1, 3)), replace=False)
    while len(items) < n:
        c = int(rng.choice(classes))
        col = list(PALETTE)[int(rng.integers(len(PALETTE)))]
        pos = POSITIONS[int(rng.integers(len(POSITIONS)))]
        if any((o["class_id"], o["colour"], o["position"]) == (c, col, pos) for o in items):
            continue
        items.append({"class_id": c, "class_name": CLASS_NAMES[c], "colour": col, "position": pos})
    return items


@pytest.mark.parametrize("style", ["minimal", "full"])
def test_absent_expressions_never_fit_an_item(style):
    kinds: dict[str, int] = {}
    for seed in range(3000):
        rng = np.random.default_rng(seed)
        items = _random_items(rng)
        named = absent_expression(items, rng, style)
        expr = named["expression"]
        kinds[named["kind"]] = kinds.get(named["kind"], 0) + 1
        # two independent checks: the phrase is none of the phrases true of an item, and no template form of the
        # named attributes that the phrase uses fits an item (the builder's own _fits rule)
        assert expr not in _true_expressions(items), (expr, items)
        forms = _expressions(named["class_name"], named["colour"], named["position"])
        assert expr in forms
        assert not any(_fits(forms.index(expr), named, it) for it in items), (expr, items)
        if style == "full":
            assert expr == forms[3]  # the same template as present expressions of the full style
        # as hard as the scene allows: colour / place name a class the scene has, class names a colour it has
        present = {it["class_id"] for it in items}
        if named["kind"] in ("colour", "place"):
            assert named["class_id"] in present
        if named["kind"] == "class":
            assert named["class_id"] not in present and named["colour"] in {it["colour"] for it in items}
    # every hard kind is drawn (the fallback "absent" needs a scene with every class in every colour and place)
    assert set(kinds) == set(ABSENT_KINDS) - {"absent"} and min(kinds.values()) > 800, kinds


def test_absent_expression_falls_back_to_a_missing_class():
    # class 0 in all 8 colours and all 9 places: nothing "colour" or "place" can say; "class" still can
    items = [
        {"class_id": 0, "class_name": CLASS_NAMES[0], "colour": col, "position": pos}
        for col in PALETTE
        for pos in POSITIONS
    ]
    named = absent_expression(items, np.random.default_rng(0))
    assert named["kind"] == "class" and named["class_id"] != 0
    with pytest.raises(ValueError, match="needs the scene's items"):
        absent_expression([], np.random.default_rng(0))


def test_builder_writes_no_target_samples(tmp_path, fmnist_dir):
    base = FashionScenesConfig(seed=5, canvas=32, root=fmnist_dir)
    mixed = FashionScenesConfig(seed=5, canvas=32, root=fmnist_dir, absent_share=0.5)
    before, after = list(scene_samples(base, "val", 40)), list(scene_samples(mixed, "val", 40))
    assert [s["__key__"] for s in before] == [s["__key__"] for s in after]
    n_absent = 0
    for b, a in zip(before, after):
        assert np.array_equal(a["png"], b["png"]) and np.array_equal(a["instances.png"], b["instances.png"])
        meta = a["json"]
        if not meta.get("no_target"):  # a with-target sample is the one the plain build writes
            assert _digest([a]) == _digest([b])
            continue
        n_absent += 1
        assert meta["target"] == -1 and meta["bbox"] == [] and meta["label"] == -1
        assert a["mask.png"].dtype == np.uint8 and not a["mask.png"].any()
        assert meta["expression"] not in _true_expressions(meta["items"])
        assert meta["class_name"] == CLASS_NAMES[meta["class_id"]] and meta["class_name"] in meta["expression"]
        assert meta["absent_kind"] in ABSENT_KINDS and meta["items"] == b["json"]["items"]
    assert 10 <= n_absent <= 30  # about half of 40
    everything = FashionScenesConfig(seed=5, canvas=32, root=fmnist_dir, absent_share=1.0, per_item=True)
    assert all(s["json"]["no_target"] for s in scene_samples(everything, "test", 5))
    with pytest.raises(ValueError, match="absent_share"):
        from mmtok.data.sources.scenes import build_fashion_scenes

        build_fashion_scenes(FashionScenesConfig(out=str(tmp_path), absent_share=1.5))
