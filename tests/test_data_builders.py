"""Shard writer and the built-in builders (fashion-mnist, fashion-scenes, moving-fashion, photos, folder)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from mmtok import registries
from mmtok.data import ShardDataset, write_shards
from mmtok.data.sources.fashion_mnist import CLASS_NAMES, load_fashion_mnist
from mmtok.data.sources.scenes import PALETTE, make_scene, position_phrase, split_source

BUILDERS = ("fashion-mnist", "fashion-scenes", "moving-fashion", "photos", "folder")


def _build(name, **kw):
    return registries.get("shard builder").create(name, **kw)


def test_registry_has_builders_with_out_field():
    reg = registries.get("shard builder")
    for name in BUILDERS:
        assert name in reg and hasattr(reg.build_config(name), "out")


def test_write_shards_splits_by_count_and_size(tmp_path):
    samples = [{"__key__": f"k{i}", "bin": bytes(1000), "json": {"i": i}} for i in range(10)]
    paths = write_shards(samples, tmp_path / "a", prefix="x", maxcount=4)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["x-000000.tar", "x-000001.tar", "x-000002.tar"]
    index = json.loads((tmp_path / "a" / "x.json").read_text())
    assert [s["count"] for s in index["shards"]] == [4, 4, 2] and index["total"] == 10
    assert index["pattern"] == "x-{000000..000002}.tar" and index["fields"] == ["bin", "json"]
    paths = write_shards(samples, tmp_path / "b", prefix="x", maxcount=100, maxsize=2500)
    assert len(paths) == 5  # two ~1 kB samples per shard
    with pytest.raises(ValueError, match="duplicate sample key"):
        write_shards([samples[0], samples[0]], tmp_path / "c")
    with pytest.raises(TypeError, match="don't know how to encode"):
        write_shards([{"__key__": "a", "weird": object()}], tmp_path / "d")


def test_rewriting_a_shard_set_removes_the_leftovers_of_a_larger_one(tmp_path):
    """A rebuild with fewer shards must not leave the old build's later shards for a `train-*.tar` glob to read."""
    samples = [{"__key__": f"k{i}", "json": {"i": i}} for i in range(10)]
    write_shards(samples, tmp_path, prefix="train", maxcount=2)
    write_shards(samples, tmp_path, prefix="val", maxcount=2)
    (tmp_path / "train-notes.tar").write_bytes(b"")  # not a shard name: kept
    assert len(write_shards(samples[:3], tmp_path, prefix="train", maxcount=2)) == 2
    assert sorted(p.name for p in tmp_path.glob("train-*.tar")) == [
        "train-000000.tar",
        "train-000001.tar",
        "train-notes.tar",
    ]
    assert len(list(tmp_path.glob("val-*.tar"))) == 5  # another prefix in the same folder is untouched
    assert sum(1 for _ in ShardDataset(str(tmp_path / "train-00000{0..1}.tar"))) == 3


def test_fashion_mnist_loader_and_builder(tmp_path, fmnist_dir):
    x, y = load_fashion_mnist("test", fmnist_dir)
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8 and y.shape == (10000,) and set(y) == set(range(10))
    assert len(CLASS_NAMES) == 10 and CLASS_NAMES[7] == "sneaker"
    with pytest.raises(ValueError, match="read-only"):
        x[0, 0, 0] = 1
    summary = _build("fashion-mnist", out=str(tmp_path), limit=300, maxcount=128, root=fmnist_dir)
    assert summary["splits"]["train"] == {
        "samples": 300,
        "shards": 3,
        "pattern": f"{tmp_path}/train-{{000000..000002}}.tar",
    }
    ds = ShardDataset(summary["splits"]["test"]["pattern"])
    got = list(ds)
    assert len(got) == 300 and ds.stats == {}
    for s in got[:20]:
        i = s["json"]["index"]
        assert torch.equal((s["image"][0] * 255).round().to(torch.uint8), torch.from_numpy(x[i].copy()))
        assert s["label"] == y[i] and s["json"]["class_name"] == CLASS_NAMES[y[i]]


@pytest.fixture(scope="module")
def val_source():
    return split_source("val")


def test_make_scene_contract(val_source):
    images, labels, fidx = val_source
    for seed in range(30):
        rgb, inst, items = make_scene(np.random.default_rng(seed), images, labels, canvas=64, indices=fidx)
        assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8 and inst.shape == (64, 64)
        assert 1 <= len(items) <= 4 and set(np.unique(inst)) <= set(range(len(items) + 1))
        exprs = [it["expression"] for it in items]
        assert len(set(exprs)) == len(exprs)  # unique within the scene
        for i, it in enumerate(items, start=1):
            ys, xs = np.nonzero(inst == i)
            assert it["area"] == len(xs) > 0
            assert it["bbox"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert it["colour"] in PALETTE and list(PALETTE[it["colour"]]) == it["rgb"]
            assert it["class_name"] == CLASS_NAMES[it["class_id"]] and it["class_name"] in it["expression"]
            assert 50_000 <= it["source_index"] < 60_000 and labels[it["source_index"] - 50_000] == it["class_id"]
            # the item's pixels carry its tint: the mean colour above the background points the tint's way
            lift = rgb[inst == i].mean(0) - rgb[inst == 0].mean(0)
            cos = {
                n: lift @ np.array(c) / (np.linalg.norm(lift) * np.linalg.norm(c) + 1e-9) for n, c in PALETTE.items()
            }
            assert max(cos, key=cos.get) == it["colour"] or len(xs) < 30
            # the expression tells it apart from every other item of its class
            for j, other in enumerate(items, start=1):
                if j != i and other["class_id"] == it["class_id"]:
                    by_colour = it["colour"] in it["expression"].split() and other["colour"] != it["colour"]
                    by_place = (
                        position_phrase(it["position"]) in it["expression"] and other["position"] != it["position"]
                    )
                    assert by_colour or by_place, (it, other)
    a = make_scene(np.random.default_rng(7), images, labels, canvas=128)
    b = make_scene(np.random.default_rng(7), images, labels, canvas=128)
    assert a[0].shape == (128, 128, 3) and np.array_equal(a[0], b[0]) and a[2] == b[2]


def test_small_canvas_scenes_keep_the_items_they_draw(val_source):
    # at 32 px items are 12-16 px and some sources are almost empty at that size: a skipped item is drawn again
    # (a one-item scene used to end empty and crash the builder)
    images, labels, fidx = val_source
    for seed in range(300):
        _, inst, items = make_scene(np.random.default_rng(seed), images, labels, 32, 1, 1, indices=fidx)
        assert len(items) == 1 and (inst == 1).sum() >= 4


def test_scene_expressions_disambiguate():
    from mmtok.data.sources.scenes import assign_expressions

    items = [
        {"class_id": 7, "class_name": "sneaker", "colour": "red", "position": "left"},
        {"class_id": 7, "class_name": "sneaker", "colour": "blue", "position": "right"},
        {"class_id": 7, "class_name": "sneaker", "colour": "red", "position": "top"},
        {"class_id": 8, "class_name": "bag", "colour": "red", "position": "left"},
    ]
    assign_expressions(items)
    assert [it["expression"] for it in items] == [
        "the sneaker on the left",
        "the blue sneaker",
        "the sneaker at the top",
        "the bag",
    ]
    assign_expressions(items, style="full")
    assert items[3]["expression"] == "the red bag on the left"


def test_fashion_scenes_builder_splits_disjoint_and_deterministic(tmp_path, fmnist_dir):
    kw = dict(train=60, val=20, test=20, maxcount=25, root=fmnist_dir)
    summary = _build("fashion-scenes", out=str(tmp_path / "a"), **kw)
    assert {k: v["scenes"] for k, v in summary["splits"].items()} == {"train": 60, "val": 20, "test": 20}
    ranges = {"train": ("train", 0, 50_000), "val": ("train", 50_000, 60_000), "test": ("test", 0, 10_000)}
    sources = {}
    for split, info in summary["splits"].items():
        ds = ShardDataset(info["pattern"])
        assert set(ds.required) == {"png", "mask.png", "instances.png", "json"}
        for s in ds:
            meta = s["json"]
            assert s["image"].shape == (3, 64, 64) and s["mask"].shape == (64, 64)
            target = meta["items"][meta["target"]]
            assert torch.equal(s["mask"], (s["instances"] == meta["target"] + 1).long())
            assert set(s["mask"].unique().tolist()) <= {0, 1} and s["mask"].sum() == target["area"]
            assert meta["expression"] == target["expression"] and meta["bbox"] == target["bbox"]
            for it in meta["items"]:
                fsplit, lo, hi = ranges[split]
                assert it["source_split"] == fsplit and lo <= it["source_index"] < hi
                sources.setdefault(split, set()).add((fsplit, it["source_index"]))
    assert not sources["train"] & sources["val"] and not sources["train"] & sources["test"]
    summary_b = _build("fashion-scenes", out=str(tmp_path / "b"), **kw)

    def digest(d):
        return hashlib.sha1(b"".join((d / f"train-00000{i}.tar").read_bytes() for i in range(3))).hexdigest()

    assert summary_b["splits"]["train"]["shards"] == 3 and digest(tmp_path / "a") == digest(tmp_path / "b")
    per_item = _build(
        "fashion-scenes", out=str(tmp_path / "c"), train=10, val=0, test=0, per_item=True, root=fmnist_dir
    )
    n = sum(1 for _ in ShardDataset(per_item["splits"]["train"]["pattern"]))
    assert n > 10  # one sample per (scene, item)


def test_moving_fashion_builder(tmp_path, fmnist_dir):
    summary = _build("moving-fashion", out=str(tmp_path), train=3, val=1, test=1, frames=8, size=32, root=fmnist_dir)
    assert summary["splits"]["train"]["clips"] == 3
    s = next(iter(ShardDataset(summary["splits"]["train"]["pattern"])))
    assert s["video"].shape == (3, 8, 32, 32) and s["video"].dtype == torch.float32
    assert s["label"] == s["json"]["items"][0]["class_id"] and s["json"]["frames"] == 8
    traj = np.array(s["json"]["items"][0]["trajectory"])
    assert traj.shape == (8, 2) and (traj >= 0).all() and np.abs(np.diff(traj, axis=0)).sum() > 0  # it moves
    assert s["video"].std(dim=1).mean() > 0.005  # frames differ


def test_photos_builder(tmp_path):
    summary = _build("photos", out=str(tmp_path), crops=3, size=32)
    assert "astronaut" in summary["photos"] and "china" in summary["photos"]
    train = list(ShardDataset(summary["splits"]["train"]["pattern"]))
    val = list(ShardDataset(summary["splits"]["val"]["pattern"]))
    assert {s["json"]["photo"] for s in val} == {"astronaut", "chelsea"}
    assert not {s["json"]["photo"] for s in train} & {"astronaut", "chelsea"}
    assert all(s["image"].shape == (3, 32, 32) for s in train + val)
    assert len(train) == 3 * (len(summary["photos"]) - 2)


def test_folder_builder(tmp_path):
    img_dir, mask_dir = tmp_path / "imgs" / "sub", tmp_path / "masks" / "sub"
    img_dir.mkdir(parents=True)
    mask_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(img_dir / f"im.{i}.jpg")
        if i != 3:
            Image.fromarray((rng.random((12, 16)) > 0.5).astype(np.uint8) * 2).save(mask_dir / f"im.{i}.png")
    (img_dir / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "meta.csv").write_text("file,label,note\nsub/im.0.jpg,3,first\nim.1.jpg,4,second\n")
    summary = _build(
        "folder",
        out=str(tmp_path / "out"),
        images=str(tmp_path / "imgs"),
        masks=str(tmp_path / "masks"),
        metadata=str(tmp_path / "meta.csv"),
    )
    assert summary["skipped"] == {"unreadable": 1, "missing_mask": 1}
    assert summary["skipped_files"]["missing_mask"] == ["sub/im.3.jpg"]
    got = {s["__key__"]: s for s in ShardDataset(summary["splits"]["train"]["pattern"])}
    assert sorted(got) == ["sub_im_0", "sub_im_1", "sub_im_2", "sub_im_4"]
    s0 = got["sub_im_0"]
    assert s0["label"] == 3 and s0["json"]["note"] == "first" and s0["json"]["file"] == "sub/im.0.jpg"
    assert got["sub_im_1"]["label"] == 4 and "label" not in got["sub_im_2"]
    assert s0["image"].shape == (3, 12, 16) and set(s0["mask"].unique().tolist()) <= {0, 2}
    original = (tmp_path / "imgs" / "sub" / "im.0.jpg").read_bytes()
    with tarfile.open(summary["splits"]["train"]["pattern"]) as tf:
        assert tf.extractfile("sub_im_0.jpg").read() == original  # stored as is
    keep = _build(
        "folder",
        out=str(tmp_path / "o2"),
        images=str(tmp_path / "imgs"),
        masks=str(tmp_path / "masks"),
        missing_mask="keep",
        val_fraction=0.5,
    )
    assert sum(v["samples"] for v in keep["splits"].values()) == 5
    with pytest.raises(FileNotFoundError, match="not a folder"):
        _build("folder", out=str(tmp_path / "o3"), images=str(tmp_path / "none"))


def test_cli_shards(tmp_path, fmnist_dir):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmtok",
            "shards",
            "fashion-scenes",
            "--out",
            str(tmp_path),
            "train=4",
            "val=0",
            "test=0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["splits"]["train"]["scenes"] == 4
    assert (tmp_path / "train-000000.tar").is_file()


def test_shards_cli_build_record_tells_stale_shards(tmp_path, fmnist_dir):
    """`mmtok shards` writes build.json (builder, options, code fingerprint); stale_reason says when a folder is not
    what the same command would build now (the quickstart rebuilds such folders instead of reusing them)."""
    from mmtok.cli import shards as cli

    out = tmp_path / "data" / "scenes"
    opts = ["train=4", "val=0", "test=2", f"root={fmnist_dir}"]
    assert "missing" in cli.stale_reason("fashion-scenes", str(out), opts)
    assert cli.main(["fashion-scenes", "--out", str(out), *opts]) == 0
    record = json.loads((out / "build.json").read_text())
    assert record["builder"] == "fashion-scenes" and record["options"]["train"] == 4 and "out" not in record["options"]
    assert record["summary"]["splits"]["test"]["scenes"] == 2 and len(record["code"]) == 16
    assert cli.stale_reason("fashion-scenes", str(out), opts) is None
    assert "other options (repeat_class, train)" in cli.stale_reason(
        "fashion-scenes", str(out), ["train=8", "val=0", "test=2", "repeat_class=0.25", f"root={fmnist_dir}"]
    )
    assert "other builder" in cli.stale_reason("fashion-vqa", str(out), [])
    (out / "build.json").write_text(json.dumps({**record, "code": "0" * 16}))
    assert "other code" in cli.stale_reason("fashion-scenes", str(out), opts)
    # a failed build leaves no record (it is removed before the builder starts)
    assert cli.main(["fashion-scenes", "--out", str(out), "canvas=8"]) == 2 and not (out / "build.json").exists()
