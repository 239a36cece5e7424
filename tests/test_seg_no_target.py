"""No-target referring expressions (GRES-style): the fashion-scenes builder's ``absent_share``, N-acc / T-acc in
``SegMeter`` and ``mmtok eval seg``, and the ``mllm_seg`` task on samples whose mask is empty; and the builder's
other opt-in training-set option, ``repeat_class``, held to the same byte-identity at 0."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch

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


@pytest.mark.parametrize("option", ["absent_share", "repeat_class"])
def test_option_at_zero_leaves_every_split_as_it_was(option, fmnist_dir):
    for i, kw in enumerate(CASES):
        cfg = FashionScenesConfig(**{option: 0.0}, root=fmnist_dir, **kw)
        for split in ("train", "val", "test"):
            assert _digest(scene_samples(cfg, split, 12)) == BEFORE[f"{i}/{split}"], (option, kw, split)


def test_absent_share_zero_shards_are_byte_identical(tmp_path, fmnist_dir):
    from mmtok.data.sources.scenes import build_fashion_scenes

    kw = dict(train=6, val=3, test=3, canvas=32, maxcount=4, root=fmnist_dir)
    build_fashion_scenes(FashionScenesConfig(out=str(tmp_path / "default"), **kw))
    build_fashion_scenes(FashionScenesConfig(out=str(tmp_path / "zero"), absent_share=0.0, **kw))
    tars = sorted(p.name for p in (tmp_path / "default").glob("*.tar"))
    assert len(tars) >= 4 and tars == sorted(p.name for p in (tmp_path / "zero").glob("*.tar"))
    for name in tars:
        assert (tmp_path / "default" / name).read_bytes() == (tmp_path / "zero" / name).read_bytes(), name


def test_repeat_class_one_gives_one_class_per_scene_told_apart_by_colour_or_place(fmnist_dir):
    cfg = FashionScenesConfig(repeat_class=1.0, min_items=2, max_items=4, root=fmnist_dir)
    base = FashionScenesConfig(min_items=2, max_items=4, root=fmnist_dir)
    n = 0
    for s, b in zip(scene_samples(cfg, "train", 20), scene_samples(base, "train", 20)):
        items = s["json"]["items"]
        assert len({it["class_id"] for it in items}) == 1  # every later item took an earlier item's class
        # the referred item's expression is true of it alone, and names more than the class
        expr = s["json"]["expression"]
        fits = [expr in _expressions(it["class_name"], it["colour"], it["position"]) for it in items]
        assert fits.count(True) == 1 and fits[s["json"]["target"]]
        assert expr != f"the {items[0]['class_name']}"
        # the scene's own generator drew the same: the first item (never repeated) is the same source image
        assert items[0]["source_index"] == b["json"]["items"][0]["source_index"]
        n += 1
    assert n == 20
    with pytest.raises(ValueError, match="repeat_class"):
        from mmtok.data.sources.scenes import build_fashion_scenes

        build_fashion_scenes(FashionScenesConfig(repeat_class=1.5, root=fmnist_dir))


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


# ---------------------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------------------
def _box(y0, y1, x0, x1, size=4):
    m = np.zeros((size, size), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_meter_n_acc_t_acc_on_hand_made_masks():
    from mmtok.mllm.seg.metrics import SegMeter

    empty = np.zeros((4, 4), bool)
    m = SegMeter()
    # three no-target samples: two answered empty (right), one with a 2-pixel mask (wrong)
    assert m.update(empty, empty) == 1.0
    assert m.update(empty, empty, no_target=True) == 1.0
    assert m.update(_box(0, 1, 0, 2), empty) == 0.0
    # four with-target samples: three masks (one of them entirely off the object), one empty answer
    assert m.update(_box(0, 2, 0, 2), _box(0, 2, 0, 2)) == 1.0
    assert m.update(_box(2, 4, 2, 4), _box(0, 2, 0, 2)) == 0.0
    assert m.update(_box(0, 2, 0, 1), _box(0, 2, 0, 2), no_target=False) == 0.5
    assert m.update(empty, _box(0, 1, 0, 1)) == 0.0
    s = m.summary()
    assert s["n"] == 7 and s["n_no_target"] == 3
    assert s["n_acc"] == 2 / 3  # no-target samples predicted empty / no-target samples
    assert s["t_acc"] == 3 / 4  # with-target samples predicted non-empty (right or wrong place) / with-target
    assert s["giou"] == (1 + 1 + 0 + 1 + 0 + 0.5 + 0) / 7
    # cIoU: inter 4 + 0 + 2 + 0 = 6; union 2 (false mask) + 4 + 8 + 4 + 1 = 19
    assert s["ciou"] == 6 / 19
    # merging meters adds the counts
    other = SegMeter()
    other.update(empty, empty)
    other.update(_box(0, 1, 0, 1), _box(0, 1, 0, 1))
    s2 = m.merge(other).summary()
    assert (s2["n_no_target"], s2["n_acc"], s2["t_acc"]) == (4, 3 / 4, 4 / 5)


def test_meter_no_target_values_are_none_without_that_kind():
    from mmtok.mllm.seg.metrics import SegMeter

    only_targets = SegMeter()
    only_targets.update(_box(0, 2, 0, 2), _box(0, 2, 0, 2))
    s = only_targets.summary()
    assert s["n_acc"] is None and s["t_acc"] == 1.0 and s["n_no_target"] == 0
    only_absent = SegMeter()
    only_absent.update(np.zeros((4, 4), bool), np.zeros((4, 4), bool))
    s = only_absent.summary()
    assert s["n_acc"] == 1.0 and s["t_acc"] is None
    s = SegMeter().summary()
    assert s["n_acc"] is None and s["t_acc"] is None
    with pytest.raises(ValueError, match="no-target sample has a non-empty ground truth"):
        SegMeter().update(np.zeros((4, 4), bool), _box(0, 1, 0, 1), no_target=True)


def test_eval_rows_and_table_show_no_target_columns_only_when_present():
    from mmtok.mllm.seg.evaluate import table_markdown

    row = dict(head="allmask", refine="none", threshold=0.5, method="none", keep=16, giou=0.5, ciou=0.4)
    row |= dict(grounding=None, repair_rate=0.0, tokens=None, ms_per_mask_median=1.0, ms_per_mask_p90=2.0)
    today = table_markdown([{**row, "n_acc": None, "t_acc": 1.0}])
    assert "N-acc" not in today and today.splitlines()[0].count("|") == today.splitlines()[1].count("|")
    both = table_markdown([{**row, "n_acc": 0.25, "t_acc": 0.75}])
    head, rule, line = both.splitlines()
    assert "| N-acc | T-acc |" in head and head.count("|") == rule.count("|") == line.count("|")
    assert "| 25.0% | 75.0% |" in line


# ---------------------------------------------------------------------------------------------------------------
# the mllm_seg task
# ---------------------------------------------------------------------------------------------------------------
def _task(**kw):
    from tiny_models import tiny_seg_heads, tiny_seg_mllm

    from mmtok import registries

    torch.manual_seed(0)
    return registries.get("task").create(
        "mllm_seg", model="llava_fashion_seg", model_overrides=tiny_seg_mllm(), heads=tiny_seg_heads(), **kw
    )


def _no_target_samples(task, n: int = 6):
    tr = task.sample_transform("train")
    out = []
    for i in range(n):
        meta = {"expression": "the red bag", "class_name": "bag", "no_target": True, "target": -1}
        sample = {"__key__": f"nt{i}", "image": torch.rand(3, 32, 32), "mask": torch.zeros(32, 32), "json": meta}
        out.append(tr(sample))
    return out


def test_task_trains_every_head_on_empty_masks_with_finite_losses():
    task = _task(head_mix={"allmask": 1, "segtoken": 1, "text": 1})
    batch = task.collate(_no_target_samples(task))
    assert set(batch["groups"]) == {"allmask", "segtoken", "text"}
    assert all(not g["masks"].any() and all(g["no_target"]) for g in batch["groups"].values())
    text = task.model.tokenizer.decode(batch["groups"]["text"]["input_ids"][0])
    assert "here is the mask of the red bag" in text and "<seg>" in text  # the head's sentence: inference feeds it
    out = task(batch)
    for k in ("loss", "allmask/dice", "allmask/bce", "segtoken/dice", "segtoken/bce", "text/lm_loss"):
        assert math.isfinite(float(out[k].detach())), (k, out[k])
    # Dice on an empty target is sum(p) / (sum(p) + 1): positive while any score is, finite, below 1
    assert 0.0 < float(out["allmask/dice"]) < 1.0 and 0.0 < float(out["segtoken/dice"]) < 1.0
    out["loss"].backward()
    grads = [p.grad for p in task.model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_task_no_target_answer_replaces_the_sentence_in_known_words():
    task = _task(head_mix={"allmask": 1, "segtoken": 1, "text": 1}, no_target_answer="there is no {} in this image .")
    tok = task.model.tokenizer
    batch = task.collate(_no_target_samples(task, 3))
    for name, g in batch["groups"].items():
        ids = g["input_ids"][0].tolist()
        assert tok.unk_token_id not in ids, name
        text = tok.decode(ids)
        if name == "segtoken":  # its template names no phrase: kept
            assert "there is no" not in text and "[SEG]" in text
        else:
            assert "there is no red bag in this image" in text and "here is the mask" not in text, text
    assert "<seg>" in tok.decode(batch["groups"]["text"]["input_ids"][0])
    with pytest.raises(ValueError, match="no_target but its mask.png is not empty"):
        meta = {"expression": "the red bag", "no_target": True}
        task.sample_transform("train")(
            {"__key__": "k", "image": torch.rand(3, 32, 32), "mask": torch.ones(32, 32), "json": meta}
        )


@pytest.fixture(scope="module")
def absent_scenes(tmp_path_factory):
    """fashion-scenes at 32 px where every sample has no target (8 train / 4 val / 4 test, 4 per shard)."""
    from mmtok.data.sources.scenes import build_fashion_scenes

    out = tmp_path_factory.mktemp("absent32")
    build_fashion_scenes(
        FashionScenesConfig(out=str(out), train=8, val=4, test=4, canvas=32, maxcount=4, absent_share=1.0)
    )
    return out


def test_tiny_seg_run_on_no_target_samples_is_finite(absent_scenes, tmp_path):
    from launching import short_run_args
    from tiny_models import tiny_seg_heads, tiny_seg_mllm

    from mmtok.train.config import load_run_config
    from mmtok.train.engine import train

    model = json.dumps(tiny_seg_mllm()).replace(" ", "")
    heads = json.dumps(tiny_seg_heads()).replace(" ", "")
    overrides = short_run_args(absent_scenes, tmp_path / "run", 2, batch_size=4) + [
        f"task.model_overrides={model}",
        f"task.heads={heads}",
        'task.head_mix={"allmask":0.4,"segtoken":0.3,"text":0.3}',
        "task.eval_heads=[allmask]",
    ]
    summary = train(load_run_config(["configs/mllm/seg_scenes_cpu.yaml"], overrides))
    assert summary["steps"] == 2
    for k, v in {**summary["train"], **summary["eval"]}.items():
        if isinstance(v, float):
            assert math.isfinite(v), (k, v)
    assert "allmask/dice" in summary["eval"] and 0.0 <= summary["eval"]["allmask/n_acc"] <= 1.0
    assert "allmask/t_acc" not in summary["eval"]  # every sample lacks a target: T-acc is undefined, not logged


def test_eval_seg_prints_n_acc_on_a_no_target_shard(absent_scenes, tmp_path, capsys):
    from mmtok.cli.main import main
    from mmtok.data.sources.scenes import build_fashion_scenes

    # a shard with both kinds: 10 test scenes, about half without a target
    mixed = tmp_path / "mixed"
    build_fashion_scenes(FashionScenesConfig(out=str(mixed), train=0, val=0, test=10, canvas=32, absent_share=0.5))
    task = _task()
    folder = tmp_path / "model"
    task.model.save_pretrained(folder)
    js, md = tmp_path / "seg.json", tmp_path / "seg.md"
    common = ["eval", "seg", "--model", str(folder), "--heads", "allmask", "segtoken", "--refine", "none"]
    assert main([*common, "--data", f"{mixed}/test-*.tar", "--json", str(js), "--md", str(md)]) == 0
    printed = capsys.readouterr().out
    assert "without a target" in printed and "n_acc=" in printed and "t_acc=" in printed
    out = json.loads(js.read_text())
    n_nt = sum(
        1
        for s in scene_samples(FashionScenesConfig(canvas=32, absent_share=0.5), "test", 10)
        if s["json"].get("no_target")
    )
    assert 0 < n_nt < 10
    for r in out["rows"]:
        assert r["n_no_target"] == n_nt and r["n"] == 10
        assert 0.0 <= r["n_acc"] <= 1.0 and 0.0 <= r["t_acc"] <= 1.0
        assert r["grounding_n"] <= 10 - n_nt  # grounding only over samples with a target
    assert "| N-acc | T-acc |" in md.read_text()
    assert out["baselines_giou"]["empty"] == n_nt / 10  # the empty answer is right exactly on the no-target samples
    # only no-target samples: N-acc, T-acc undefined (–), no grounding
    assert main([*common, "--data", f"{absent_scenes}/test-*.tar", "--json", str(js)]) == 0
    printed = capsys.readouterr().out
    assert "n_acc=" in printed and "t_acc=–" in printed
    rows = json.loads(js.read_text())["rows"]
    assert all(r["t_acc"] is None and r["grounding"] is None and r["n_no_target"] == 4 for r in rows)


def test_expression_kind_names_what_each_template_adds():
    from mmtok.data.sources.scenes import expression_kind

    item = {"class_name": "bag", "colour": "red", "position": "left"}
    kinds = [expression_kind(e, item) for e in _expressions("bag", "red", "left")]
    assert kinds == ["class", "colour", "place", "colour+place"]
    assert expression_kind("the blue bag", item) is None and expression_kind("the bag on the right", item) is None
