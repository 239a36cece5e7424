"""The ``refcoco`` shard builder on a tiny set written here in the refer toolkit's exact layout.

The refs pickle is written opcode by opcode as Python 2's ``cPickle.dump(refs, f, 2)`` writes it (str as
BINSTRING bytes, memo puts), since Python 3 pickles bytes through ``_codecs.encode`` instead.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import pickletools
import shlex
import struct
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from mmtok import registries
from mmtok.cli import shards as shards_cli
from mmtok.data import ShardDataset
from mmtok.data.sources.refcoco import RefsFormatError, UnsafePickleError, load_refs, load_refs_pickle


def py2_pickle(obj) -> bytes:
    """Protocol-2 bytes as Python 2 writes them: bytes -> (SHORT_)BINSTRING, str -> BINUNICODE."""
    out = bytearray(b"\x80\x02")
    memo = [0]

    def put():
        out.extend(b"q" + bytes([memo[0]]) if memo[0] < 256 else b"r" + struct.pack("<I", memo[0]))
        memo[0] += 1

    def enc(o):
        if o is None:
            out.extend(b"N")
        elif o is True or o is False:
            out.extend(b"\x88" if o else b"\x89")
        elif isinstance(o, int):
            if 0 <= o < 256:
                out.extend(b"K" + bytes([o]))
            elif 0 <= o < 65536:
                out.extend(b"M" + struct.pack("<H", o))
            else:
                out.extend(b"J" + struct.pack("<i", o))
        elif isinstance(o, float):
            out.extend(b"G" + struct.pack(">d", o))
        elif isinstance(o, bytes):
            out.extend((b"U" + bytes([len(o)]) if len(o) < 256 else b"T" + struct.pack("<I", len(o))) + o)
            put()
        elif isinstance(o, str):
            raw = o.encode("utf-8")
            out.extend(b"X" + struct.pack("<I", len(raw)) + raw)
            put()
        elif isinstance(o, list):
            out.extend(b"]")
            put()
            if o:
                out.extend(b"(")
                for x in o:
                    enc(x)
                out.extend(b"e")
        elif isinstance(o, tuple):
            out.extend(b"(")
            for x in o:
                enc(x)
            out.extend(b"t")
            put()
        elif isinstance(o, dict):
            out.extend(b"}")
            put()
            if o:
                out.extend(b"(")
                for k, v in o.items():
                    enc(k)
                    enc(v)
                out.extend(b"u")
        else:
            raise TypeError(type(o))

    enc(obj)
    out.extend(b".")
    return bytes(out)


def as_py2(o):
    """Every str (keys too) -> UTF-8 bytes, as Python 2 holds them."""
    if isinstance(o, str):
        return o.encode("utf-8")
    if isinstance(o, dict):
        return {as_py2(k): as_py2(v) for k, v in o.items()}
    if isinstance(o, list):
        return [as_py2(v) for v in o]
    return o


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE, computed by hand: run lengths of the column-major flattening, zeros first."""
    flat = mask.flatten(order="F")
    counts, cur, run = [], 0, 0
    for v in flat:
        if v == cur:
            run += 1
        else:
            counts.append(run)
            cur, run = v, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": [int(c) for c in counts]}


# Expected masks, drawn by hand. Image 1 is 40x30 (w x h), image 2 is 32x48.
L_SHAPE = [2, 2, 10, 2, 10, 5, 5, 5, 5, 12, 2, 12]  # integer vertices: covers exactly the unit cells inside
SQUARE = [20, 20, 25, 20, 25, 24, 20, 24]


def expected_mask_101() -> np.ndarray:
    m = np.zeros((30, 40), np.uint8)
    m[2:5, 2:10] = 1  # the L's top bar
    m[5:12, 2:5] = 1  # its stem
    m[20:24, 20:25] = 1  # the second polygon of the same object
    return m


def expected_mask_102() -> np.ndarray:
    m = np.zeros((48, 32), np.uint8)
    m[10:40, 6:20] = 1
    m[20:25, 10:14] = 0  # a hole, which a polygon could not express
    return m


def expected_mask_103() -> np.ndarray:
    m = np.zeros((30, 40), np.uint8)
    m[15:28, 30:38] = 1
    return m


SENTENCES_0 = ["the L shape on the left", "caf\u00e9 sign"]


def make_refs() -> list[dict]:
    def sents(texts, first_id):
        return [
            {"tokens": t.split(), "raw": t.capitalize(), "sent_id": first_id + i, "sent": t}
            for i, t in enumerate(texts)
        ]

    def ref(ref_id, ann_id, image_id, cat, split, texts, first_sent):
        return {
            "sent_ids": list(range(first_sent, first_sent + len(texts))),
            "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",  # refer's per-ref name (ignored)
            "ann_id": ann_id,
            "ref_id": ref_id,
            "image_id": image_id,
            "split": split,
            "sentences": sents(texts, first_sent),
            "category_id": cat,
        }

    return [
        ref(0, 101, 1, 3, "train", SENTENCES_0, 0),
        ref(1, 102, 2, 1, "testA", ["man in white"], 2),
        ref(2, 103, 1, 1, "train", ["right person"], 3),
        ref(3, 104, 3, 3, "val", ["a", "b", "c"], 4),  # its image file is missing
        ref(4, 102, 2, 1, "val", ["the man"], 7),
        ref(5, 105, 2, 3, "testB", ["tiny car"], 8),  # a degenerate polygon: empty mask
    ]


def make_layout(root, refs_format="py2"):
    """<root>/refcoco/{instances.json, refs(unc).p} and <root>/images/mscoco/images/train2014/*.jpg."""
    from pycocotools import mask as coco_mask

    data = root / "refcoco"
    data.mkdir(parents=True)
    imgs = root / "images" / "mscoco" / "images" / "train2014"
    imgs.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for image_id, (w, h) in ((1, (40, 30)), (2, (32, 48))):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            imgs / f"COCO_train2014_{image_id:012d}.jpg", quality=90
        )
    rle103 = coco_mask.encode(np.asfortranarray(expected_mask_103()))
    instances = {
        "info": {},
        "images": [
            {"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg", "width": w, "height": h}
            for i, (w, h) in ((1, (40, 30)), (2, (32, 48)), (3, (20, 20)))
        ],
        "annotations": [
            {
                "id": 101,
                "image_id": 1,
                "category_id": 3,
                "segmentation": [L_SHAPE, SQUARE],
                "bbox": [2, 2, 23, 22],
                "area": 80.0,
                "iscrowd": 0,
            },
            {
                "id": 102,
                "image_id": 2,
                "category_id": 1,
                "segmentation": uncompressed_rle(expected_mask_102()),
                "bbox": [6, 10, 14, 30],
                "area": 400.0,
                "iscrowd": 1,
            },
            {
                "id": 103,
                "image_id": 1,
                "category_id": 1,
                "segmentation": {"size": rle103["size"], "counts": rle103["counts"].decode("ascii")},
                "bbox": [30, 15, 8, 13],
                "area": 104.0,
                "iscrowd": 0,
            },
            {
                "id": 105,
                "image_id": 2,
                "category_id": 3,
                "segmentation": [[3, 3, 4.5, 4.5]],  # two points cover no pixel
                "bbox": [3, 3, 1.5, 1.5],
                "area": 0.0,
                "iscrowd": 0,
            },
            {
                "id": 104,
                "image_id": 3,
                "category_id": 3,
                "segmentation": [[1, 1, 5, 1, 5, 5]],
                "bbox": [1, 1, 4, 4],
                "area": 8.0,
                "iscrowd": 0,
            },
        ],
        "categories": [
            {"id": 1, "name": "person", "supercategory": "person"},
            {"id": 3, "name": "car", "supercategory": "vehicle"},
        ],
    }
    (data / "instances.json").write_text(json.dumps(instances))
    refs = make_refs()
    if refs_format == "py2":
        (data / "refs(unc).p").write_bytes(py2_pickle(as_py2(refs)))
    else:
        (data / "refs(unc).json").write_text(json.dumps(refs))
    return imgs


def _build(**kw):
    return registries.get("shard builder").create("refcoco", **kw)


def _members(pattern):
    """{member name: bytes} of a one-shard split."""
    with tarfile.open(pattern) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}


def _png(data):
    return np.asarray(Image.open(io.BytesIO(data)))


# ---------------------------------------------------------------- restricted loader


def test_py2_pickle_is_what_python_reads():
    refs = make_refs()
    blob = py2_pickle(as_py2(refs))
    assert pickle.loads(blob, encoding="bytes") == as_py2(refs)  # the hand-written opcodes are valid
    ops = {op.name for op, _, _ in pickletools.genops(blob)}
    assert "SHORT_BINSTRING" in ops and not ops & {"GLOBAL", "STACK_GLOBAL", "REDUCE"}  # Python 2 str, no classes


def test_restricted_loader_reads_python2_and_python3_refs(tmp_path):
    refs = make_refs()
    assert load_refs_pickle(py2_pickle(as_py2(refs))) == refs  # bytes keys and values decoded, é included
    latin = load_refs_pickle(py2_pickle([b"caf\xe9"]))  # not UTF-8: decoded as Latin-1
    assert latin == ["caf\u00e9"]
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):  # re-pickled by Python 3 with str values
        assert load_refs_pickle(pickle.dumps(refs, protocol=protocol)) == refs
    assert load_refs_pickle(pickle.dumps((1, 2.5, None, True, -(2**70)))) == (1, 2.5, None, True, -(2**70))


class _Boom:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def test_restricted_loader_refuses_any_class_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps([{"ref_id": 0, "x": _Boom(f"touch {shlex.quote(str(marker))}")}], protocol=2)
    with pytest.raises(UnsafePickleError, match=r"names (posix|os|nt)\.system.*nothing in it was run"):
        load_refs_pickle(evil)
    assert not marker.exists()
    path = tmp_path / "refs(unc).p"
    path.write_bytes(evil)
    with pytest.raises(UnsafePickleError, match="system"):
        load_refs(path)
    assert not marker.exists()
    for obj, name in (
        (collections.OrderedDict(a=1), "collections.OrderedDict"),
        (np.arange(3), "numpy"),
        (b"bytes from python 3", "_codecs.encode"),  # protocol 2 in Python 3 writes bytes via a function
        (complex(1, 2), "complex"),
    ):
        with pytest.raises(UnsafePickleError, match=name):
            load_refs_pickle(pickle.dumps([obj], protocol=2))
    with pytest.raises(UnsafePickleError, match="set"):  # protocol 4 builds sets without naming a class
        load_refs_pickle(pickle.dumps([{1, 2}], protocol=4))

    class PersistentPickler(pickle.Pickler):
        def persistent_id(self, obj):
            return "ext" if obj == "x" else None

    buf = io.BytesIO()
    PersistentPickler(buf, protocol=2).dump(["x"])
    with pytest.raises(UnsafePickleError, match="persistent id"):
        load_refs_pickle(buf.getvalue())


def test_refs_without_a_required_field_names_it(tmp_path):
    refs = make_refs()
    del refs[2]["ann_id"]
    path = tmp_path / "refs.p"
    path.write_bytes(py2_pickle(as_py2(refs)))
    with pytest.raises(RefsFormatError, match="record 2 \\(ref_id 2\\) lacks the field 'ann_id'"):
        load_refs(path)
    refs = make_refs()
    del refs[1]["sentences"][0]["sent"], refs[1]["sentences"][0]["raw"]
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    with pytest.raises(RefsFormatError, match="ref_id 1 has a sentence without the field 'sent'"):
        load_refs(tmp_path / "refs.json")
    (tmp_path / "bad.json").write_text(json.dumps({"not": "refs"}))
    with pytest.raises(RefsFormatError, match="list of ref records"):
        load_refs(tmp_path / "bad.json")


# ---------------------------------------------------------------- builder


def test_builder_on_the_refer_layout(tmp_path):
    imgs = make_layout(tmp_path / "DATA")
    summary = _build(out=str(tmp_path / "out"), root=str(tmp_path / "DATA"))  # dataset=refcoco, split_by=unc
    assert summary["images"] == str(imgs)
    assert {s: v["samples"] for s, v in summary["splits"].items()} == {"testA": 1, "testB": 1, "train": 3, "val": 1}
    assert summary["splits"]["val"]["refs"] == 2
    assert summary["skipped_images"] == {"missing_image": 1} and summary["skipped_samples"] == 3
    assert summary["skipped_image_ids"] == {"missing_image": ["3"]}

    train = _members(summary["splits"]["train"]["pattern"])
    assert sorted(train) == sorted(
        f"{k}.{e}" for k in ("ref0_0", "ref0_1", "ref2_0") for e in ("jpg", "json", "mask.png")
    )
    original = (imgs / "COCO_train2014_000000000001.jpg").read_bytes()
    assert train["ref0_0.jpg"] == original  # the COCO JPEG stored as it is
    mask = _png(train["ref0_0.mask.png"])
    assert mask.dtype == np.uint8 and np.array_equal(mask, expected_mask_101())  # polygons, union of two
    assert np.array_equal(_png(train["ref2_0.mask.png"]), expected_mask_103())  # compressed RLE
    j0, j1 = json.loads(train["ref0_0.json"]), json.loads(train["ref0_1.json"])
    assert j0["expression"] == "the L shape on the left" and j1["expression"] == "caf\u00e9 sign"
    assert j0["sentences"] == SENTENCES_0 and j0["sent_id"] == 0 and j1["sent_id"] == 1
    assert (j0["source"], j0["split"], j0["split_by"]) == ("refcoco", "train", "unc")
    assert (j0["class_name"], j0["class_id"], j0["ref_id"], j0["ann_id"], j0["image_id"]) == ("car", 3, 0, 101, 1)
    assert j0["bbox"] == [2, 2, 25, 24]  # = the annotation's [x, y, w, h] = [2, 2, 23, 22] as corners
    assert json.loads(train["ref2_0.json"])["bbox"] == [30, 15, 38, 28]
    assert j0["image_size"] == [40, 30] == j0["orig_size"]

    test_a = _members(summary["splits"]["testA"]["pattern"])
    assert np.array_equal(_png(test_a["ref1_0.mask.png"]), expected_mask_102())  # uncompressed RLE with a hole
    assert json.loads(test_a["ref1_0.json"])["bbox"] == [6, 10, 20, 40]
    test_b = _members(summary["splits"]["testB"]["pattern"])
    assert not _png(test_b["ref5_0.mask.png"]).any()
    assert json.loads(test_b["ref5_0.json"])["bbox"] == [
        3,
        3,
        5,
        5,
    ]  # the annotation's box (pixels it touches): no mask
    val = _members(summary["splits"]["val"]["pattern"])
    assert sorted(val) == ["ref4_0.jpg", "ref4_0.json", "ref4_0.mask.png"]

    # the reader takes the shards as they are: image, 0/1 mask of the same size, json
    got = list(ShardDataset(summary["splits"]["train"]["pattern"]))
    assert len(got) == 3 and all(s["image"].shape == (3, 30, 40) and s["mask"].shape == (30, 40) for s in got)


def test_json_refs_give_the_same_samples(tmp_path):
    make_layout(tmp_path / "P")
    make_layout(tmp_path / "J", refs_format="json")
    a = _build(out=str(tmp_path / "oa"), root=str(tmp_path / "P"))
    b = _build(out=str(tmp_path / "ob"), root=str(tmp_path / "J"))
    assert a["splits"].keys() == b["splits"].keys()
    for split in a["splits"]:
        assert _members(a["splits"][split]["pattern"]) == _members(b["splits"][split]["pattern"])
    # refs= points at a file anywhere; instances.json is taken from the same folder
    c = _build(out=str(tmp_path / "oc"), refs=str(tmp_path / "J" / "refcoco" / "refs(unc).json"), splits="train")
    assert list(c["splits"]) == ["train"]
    assert _members(c["splits"]["train"]["pattern"]) == _members(a["splits"]["train"]["pattern"])


def test_per_ref_samples_and_max_side(tmp_path):
    make_layout(tmp_path / "D")
    s = _build(out=str(tmp_path / "o"), root=str(tmp_path / "D"), per_sentence=False, max_side=20, splits="train")
    train = _members(s["splits"]["train"]["pattern"])
    assert sorted(k for k in train if k.endswith(".json")) == ["ref0.json", "ref2.json"]
    j = json.loads(train["ref0.json"])
    assert j["expression"] == SENTENCES_0[0] and j["sentences"] == SENTENCES_0 and j["sent_ids"] == [0, 1]
    assert j["image_size"] == [20, 15] and j["orig_size"] == [40, 30]
    assert Image.open(io.BytesIO(train["ref0.jpg"])).size == (20, 15)
    mask = _png(train["ref0.mask.png"])
    resized = np.asarray(Image.fromarray(expected_mask_101()).resize((20, 15), Image.NEAREST))
    assert set(np.unique(mask)) <= {0, 1} and np.array_equal(mask, resized)
    ys, xs = np.nonzero(mask)
    assert j["bbox"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert s["skipped_samples"] == 0  # the missing image is in val, which was not asked for


def test_builder_errors_say_what_to_pass(tmp_path):
    make_layout(tmp_path / "D")
    root = str(tmp_path / "D")
    with pytest.raises(
        ValueError, match=r"split\(s\) \['test'\] not in refs\(unc\).p; it has testA, testB, train, val"
    ):
        _build(out=str(tmp_path / "o1"), root=root, splits="train,test")
    with pytest.raises(FileNotFoundError, match=r"no image file for image_id 3"):
        _build(out=str(tmp_path / "o2"), root=root, splits="val", on_error="raise")
    with pytest.raises(FileNotFoundError, match=r"refcocog \(nor instances.json in .*found refcoco: set dataset="):
        _build(out=str(tmp_path / "o3"), root=root, dataset="refcocog")
    with pytest.raises(FileNotFoundError, match=r"no refs\(google\).p or .*found refs\(unc\).p: set split_by="):
        _build(out=str(tmp_path / "o3"), root=root, split_by="google")
    with pytest.raises(FileNotFoundError, match="pass root="):
        _build(out=str(tmp_path / "o4"))
    with pytest.raises(FileNotFoundError, match="is not a folder; pass the COCO train2014"):
        _build(out=str(tmp_path / "o5"), root=root, images=str(tmp_path / "nowhere"))
    make_layout(tmp_path / "E")
    (tmp_path / "E" / "images").rename(tmp_path / "E" / "pics")  # not where refer keeps them
    with pytest.raises(FileNotFoundError, match="no COCO train2014 image folder found.*pass images="):
        _build(out=str(tmp_path / "o5"), root=str(tmp_path / "E"))
    pics = tmp_path / "E" / "pics" / "mscoco" / "images" / "train2014"
    assert (
        _build(out=str(tmp_path / "o5"), root=str(tmp_path / "E"), images=str(pics))["splits"]["train"]["samples"] == 3
    )
    refs = make_refs()
    refs[0]["ann_id"] = 999
    (tmp_path / "D" / "refcoco" / "refs(google).json").write_text(json.dumps(refs))
    with pytest.raises(RefsFormatError, match="ann_id 999.*different datasets"):
        _build(out=str(tmp_path / "o6"), root=root, split_by="google")


def test_cli_builds_refcoco(tmp_path, capsys):
    make_layout(tmp_path / "D")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmtok",
            "shards",
            "refcoco",
            "--out",
            str(tmp_path / "o"),
            f"root={tmp_path / 'D'}",
            "splits=train,testA",
            "max_side=32",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert {s: v["samples"] for s, v in summary["splits"].items()} == {"train": 3, "testA": 1}
    bad = tmp_path / "D" / "refcoco" / "refs(unc).p"
    bad.write_bytes(pickle.dumps([collections.OrderedDict()], protocol=2))
    # the same command in this process (one start-up is enough): a refused pickle is a one-line error, code 2
    assert shards_cli.main(["refcoco", "--out", str(tmp_path / "o2"), f"root={tmp_path / 'D'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmtok shards refcoco: ") and "collections.OrderedDict" in err and "Traceback" not in err
