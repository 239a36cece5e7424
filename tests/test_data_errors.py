"""Error policy: every kind of bad data is skipped (counted, key logged) or raised, never silent."""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from mmtok.data import DataConfig, DataError, ShardDataset, ShardPatternError, build_loader, write_shards
from mmtok.data.loader import ShardLoader


def _png(seed: int, size: int = 8) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _jpg(seed: int, size: int = 32) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def _good(i: int) -> dict:
    return {"__key__": f"k{i:03d}", "png": _png(i), "mask.png": np.ones((8, 8), np.uint8), "json": {"i": i}}


def _write(tmp_path, samples, name="s"):
    paths = write_shards(samples, tmp_path, prefix=name, maxcount=1000)
    return paths[0]


def _run(path, on_error, **kw):
    ds = ShardDataset(path, on_error=on_error, **kw)
    return ds, [s["__key__"] for s in ds]


BAD_CASES = {
    "decode_image": lambda s: s.update(png=b"\x89PNG\r\n\x1a\n" + b"garbage" * 10),
    "bad_json": lambda s: s.update(json=b'{"i": 3, oops'),
    "decode_mask": lambda s: s.update({"mask.png": b"not a png"}),
}


@pytest.mark.parametrize("reason", sorted(BAD_CASES))
def test_bad_member_skip_and_raise(tmp_path, caplog, reason):
    samples = [_good(i) for i in range(5)]
    BAD_CASES[reason](samples[2])
    path = _write(tmp_path, samples)
    with caplog.at_level(logging.WARNING, logger="mmtok.data.reader"):
        ds, keys = _run(path, "skip")
    assert keys == ["k000", "k001", "k003", "k004"]
    assert ds.stats == {reason: 1} and ds.skipped[-1][1] == "k002"
    assert "k002" in caplog.text and "s-000000.tar" in caplog.text
    with pytest.raises(DataError, match=f"{reason}.*k002"):
        _run(path, "raise")


def test_corrupt_jpeg(tmp_path):
    good = _jpg(0)
    samples = [
        {"__key__": "a", "jpg": good, "json": {}},
        {"__key__": "b", "jpg": good[: len(good) // 2], "json": {}},  # truncated JPEG data
        {"__key__": "c", "jpg": b"\xff\xd8\xff\xe0 not a jpeg", "json": {}},
    ]
    path = _write(tmp_path, samples)
    ds, keys = _run(path, "skip")
    assert keys == ["a"] and ds.stats == {"decode_image": 2}
    with pytest.raises(DataError, match="decode_image.*'b'"):
        _run(path, "raise")


def test_missing_mask_from_index_and_from_required(tmp_path):
    # Index says every sample has mask.png, but one tar member was lost afterwards.
    path = _write(tmp_path, [_good(i) for i in range(4)])
    with tarfile.open(path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(path, "w") as tf:
        for m, data in members:
            if m.name != "k001.mask.png":
                tf.addfile(m, io.BytesIO(data))
    ds, keys = _run(path, "skip")
    assert keys == ["k000", "k002", "k003"] and ds.stats == {"missing_field": 1}
    with pytest.raises(DataError, match="missing_field.*mask.png.*k001"):
        _run(path, "raise")
    # Written without a mask: the index's field list (an intersection) cannot know, its siblings can; and the
    # consumer can say what it needs.
    samples = [_good(i) for i in range(3)]
    del samples[1]["mask.png"]
    path2 = _write(tmp_path / "b", samples)
    assert [s["__key__"] for s in ShardDataset(path2)] == ["k000", "k002"]
    ds, keys = _run(path2, "skip", required=("png", "mask.png"))
    assert keys == ["k000", "k002"] and ds.stats == {"missing_field": 1}
    loader = build_loader(DataConfig(train=path2, required="png,mask.png", batch_size=2, shuffle_buffer=0), "train")
    assert [k for b in loader for k in b["__key__"]] == ["k000", "k002"] and loader.stats == {"missing_field": 1}


def test_truncated_tar_member(tmp_path, caplog):
    path = _write(tmp_path, [_good(i) for i in range(6)])
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size * 3 // 5)  # cuts inside a member of a later sample
    with caplog.at_level(logging.WARNING):
        ds, keys = _run(path, "skip")
    assert 1 <= len(keys) < 6 and keys == [f"k{i:03d}" for i in range(len(keys))]
    assert ds.stats["truncated_shard"] == 1 and ds.stats["missing_sample"] == 6 - len(keys)
    assert "s-000000.tar" in caplog.text
    with pytest.raises(DataError, match="truncated_shard"):
        _run(path, "raise")


def test_key_with_dot(tmp_path):
    with pytest.raises(ValueError, match="contains a dot"):
        write_shards([{"__key__": "img.1", "png": _png(0)}], tmp_path / "w")
    # A shard from another tool with dotted keys: detected, not silently merged into one sample.
    path = str(tmp_path / "foreign.tar")
    with wds.TarWriter(path, encoder=False) as w:
        w.write({"__key__": "ok", "png": _png(0), "json": b"{}"})
        w.write({"__key__": "img.1", "png": _png(1), "json": b"{}"})
        w.write({"__key__": "img.2", "png": _png(2), "json": b"{}"})
    ds, keys = _run(path, "skip")
    assert keys == ["ok"] and ds.stats == {"key_with_dot": 2}
    assert {k for _, k, _ in ds.skipped} == {"img.1", "img.2"}
    with pytest.raises(DataError, match="key_with_dot.*img.1"):
        _run(path, "raise")


def test_empty_shard(tmp_path):
    write_shards([_good(i) for i in range(3)], tmp_path, prefix="a")
    with tarfile.open(tmp_path / "b-000000.tar", "w"):
        pass  # an empty tar, no index entry: counted by scanning
    pattern = f"{tmp_path}/a-000000.tar::{tmp_path}/b-000000.tar"
    ds, keys = _run(pattern, "skip")
    assert keys == ["k000", "k001", "k002"] and ds.stats == {"empty_shard": 1}
    with pytest.raises(DataError, match="empty_shard.*b-000000.tar"):
        _run(pattern, "raise")
    with pytest.raises(DataError, match="no samples"):
        ShardDataset(str(tmp_path / "b-000000.tar"))


def test_pattern_that_matches_nothing(tmp_path):
    for pattern in (f"{tmp_path}/nope-{{000000..000003}}.tar", f"{tmp_path}/*.tar", ""):
        with pytest.raises(ShardPatternError, match="matches no files|empty shard pattern") as e:
            ShardDataset(pattern, on_error="skip")
        assert pattern in str(e.value)
    write_shards([_good(0)], tmp_path, prefix="x")
    with pytest.raises(ShardPatternError, match="1 of 2 files do not exist"):
        ShardDataset(f"{tmp_path}/x-{{000000..000001}}.tar")


def test_training_stream_survives_all_errors_with_workers(tmp_path):
    """Every kind of bad data at once under skip, with 2 workers: the run completes and counts them."""
    samples = [_good(i) for i in range(12)]
    samples[1]["png"] = b"junk"
    samples[4]["json"] = b"{bad"
    del samples[7]["mask.png"]
    write_shards(samples[:6], tmp_path, prefix="p")
    write_shards(samples[6:], tmp_path, prefix="q")
    with tarfile.open(tmp_path / "r-000000.tar", "w"):
        pass
    pattern = f"{tmp_path}/p-000000.tar::{tmp_path}/q-000000.tar::{tmp_path}/r-000000.tar"
    loader = ShardLoader(ShardDataset(pattern, required=("png", "mask.png")), batch_size=2, num_workers=2)
    keys = [k for b in loader for k in b["__key__"]]
    assert sorted(keys) == [f"k{i:03d}" for i in range(12) if i not in (1, 4, 7)]
    assert loader.stats == {"decode_image": 1, "bad_json": 1, "missing_field": 1, "empty_shard": 1}
    state = json.loads(json.dumps(loader.state_dict()))  # serialisable, with the counts
    assert state["stats"]["bad_json"] == 1


# -- shards without a usable index, indexes that under-count, and samples that do not fit their shard ---------


def _unindexed_copy(path, folder, name=None):
    """Copy a shard into ``folder`` without its index json (so the reader has to scan it)."""
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / (name or os.path.basename(path))
    dst.write_bytes(open(path, "rb").read())
    return dst


def test_unscannable_shards_without_index_are_counted_not_fatal(tmp_path):
    """0 bytes, not a tar, truncated: construction survives; the readable samples are read, the rest counted."""
    good = _write(tmp_path / "a", [_good(i) for i in range(3)], name="good")
    full = _write(tmp_path / "b", [_good(i) for i in range(10, 16)], name="cut")
    with tarfile.open(full) as tf:
        cut_at = next(m for m in tf.getmembers() if m.name == "k013.mask.png").offset_data + 10
    loose = tmp_path / "loose"
    cut = _unindexed_copy(full, loose)
    with open(cut, "r+b") as f:
        f.truncate(cut_at)  # inside k013's mask data: k010..k012 are whole, k013 is not
    (loose / "empty-000000.tar").write_bytes(b"")
    (loose / "junk-000000.tar").write_bytes(b"this is not a tar archive at all\n" * 40)
    pattern = "::".join(str(p) for p in (good, cut, loose / "empty-000000.tar", loose / "junk-000000.tar"))
    ds, keys = _run(pattern, "skip")
    assert keys == ["k000", "k001", "k002", "k010", "k011", "k012"]
    assert ds.stats == {"unreadable_shard": 2, "truncated_shard": 1, "missing_sample": 1}
    assert {u for r, _, u in ds.skipped if r == "unreadable_shard"} == {
        str(loose / "empty-000000.tar"),
        str(loose / "junk-000000.tar"),
    }
    # The same through a loader with two workers: nothing crashes, the counts reach the loader.
    loader = ShardLoader(ShardDataset(pattern), batch_size=2, num_workers=2)
    assert sorted(k for b in loader for k in b["__key__"]) == keys
    assert loader.stats == ds.stats
    for bad in ("empty-000000.tar", "junk-000000.tar", cut.name):
        with pytest.raises(DataError, match=f"(unreadable|truncated)_shard.*{bad}"):
            ShardDataset(f"{good}::{loose / bad}", on_error="raise")


def test_index_that_undercounts_a_shard(tmp_path, caplog):
    path = _write(tmp_path, [_good(i) for i in range(5)])
    index_path = tmp_path / "s.json"
    index = json.loads(index_path.read_text())
    index["shards"][0]["count"] = 3  # e.g. the shard was rebuilt larger and the index left behind
    index_path.write_text(json.dumps(index))
    with caplog.at_level(logging.WARNING, logger="mmtok.data.reader"):
        ds, keys = _run(path, "skip")
    assert keys == ["k000", "k001", "k002"]
    assert ds.stats == {"unindexed_sample": 2} and [k for _, k, _ in ds.skipped] == ["k003", "k004"]
    assert "rebuild the index" in caplog.text
    with pytest.raises(DataError, match="unindexed_sample.*k003"):
        _run(path, "raise")
    # Split over two consumers (sample-level split of one shard): each extra sample is counted once.
    loader = ShardLoader(ShardDataset(path), batch_size=2, num_workers=2)
    assert sorted(k for b in loader for k in b["__key__"]) == keys and loader.stats == {"unindexed_sample": 2}
    # An index that lists no samples at all for a shard that has some: counted too, not called empty.
    paths = write_shards([_good(i) for i in range(5)], tmp_path / "two", prefix="t", maxcount=3)
    index = json.loads((tmp_path / "two" / "t.json").read_text())
    index["shards"][1]["count"] = 0
    (tmp_path / "two" / "t.json").write_text(json.dumps(index))
    ds, keys = _run("::".join(paths), "skip")
    assert keys == ["k000", "k001", "k002"] and ds.stats == {"unindexed_sample": 2}


def _loader_keys(pattern, on_error="skip", **kw):
    loader = ShardLoader(ShardDataset(pattern, on_error=on_error, **kw), batch_size=2)
    return loader, [k for b in loader for k in b["__key__"]]


def test_sample_missing_a_field_the_others_have(tmp_path):
    """The index's fields are an intersection, so the shard's own samples say what a sample should have."""
    samples = [_good(i) for i in range(5)]
    del samples[0]["mask.png"]  # first in its batch: collation used to drop every mask of the batch
    del samples[3]["mask.png"]  # second in its batch: collation used to fail with KeyError
    path = _write(tmp_path / "idx", samples)
    loose = _unindexed_copy(path, tmp_path / "loose")
    for pattern in (path, loose):  # from the writer's per-shard field counts, and from a header scan
        loader, keys = _loader_keys(pattern)
        assert keys == ["k001", "k002", "k004"] and loader.stats == {"missing_field": 2}
        with pytest.raises(DataError, match="missing_field.*mask.png.*k000"):
            _loader_keys(pattern, "raise")
    # A field that is optional on purpose: say so when writing, or name what the consumer needs.
    kept = [_good(i) for i in range(5)]
    del kept[0]["mask.png"]
    optional = write_shards(kept, tmp_path / "opt", prefix="o", optional=("mask.png",))[0]
    assert [s["__key__"] for s in ShardDataset(optional)] == [f"k{i:03d}" for i in range(5)]
    assert [s["__key__"] for s in ShardDataset(path, required=("png",))] == [f"k{i:03d}" for i in range(5)]


def _coded(i: int, shape=(4, 4), dtype=np.int16, **meta) -> dict:
    codes = (np.arange(int(np.prod(shape))).reshape(shape) % 7).astype(dtype)
    return {"__key__": f"c{i:03d}", "codes.npy": codes, "json": {"i": i, **meta}}


def test_codes_of_the_wrong_shape_are_skipped(tmp_path):
    samples = [_coded(i) for i in range(6)]
    samples[3] = _coded(3, shape=(2, 2))
    path = _write(tmp_path / "idx", samples)
    loader, keys = _loader_keys(path)  # the writer recorded the shard's codes shape: caught while decoding
    assert keys == ["c000", "c001", "c002", "c004", "c005"] and loader.stats == {"bad_shape": 1}
    with pytest.raises(DataError, match="bad_shape.*c003"):
        _loader_keys(path, "raise")
    # No index: the batch it lands in cannot be stacked; the odd sample is dropped and counted, not the epoch.
    loose = _unindexed_copy(path, tmp_path / "loose")
    loader, keys = _loader_keys(loose)
    assert keys == ["c000", "c001", "c002", "c004", "c005"] and loader.stats == {"collate_mismatch": 1}
    assert [b["codes"].shape for b in ShardLoader(ShardDataset(loose), batch_size=2)][-1] == (1, 4, 4)
    with pytest.raises(DataError, match="collate_mismatch.*c003"):
        _loader_keys(loose, "raise")


@pytest.mark.parametrize(
    "bad",
    [
        _coded(2, dtype=np.float32),  # used to be truncated to integers silently
        _coded(2, dtype=np.int32) | {"codes.npy": -np.ones((4, 4), np.int32)},
        _coded(2, codebook_size=5),  # codes up to 6 with a codebook of 5
        _coded(2, shape=()),
    ],
    ids=["float", "negative", "beyond_codebook", "scalar"],
)
def test_bad_codes_are_rejected(tmp_path, bad):
    samples = [_coded(i) for i in range(4)]
    samples[2] = bad
    path = _write(tmp_path, samples)
    ds, keys = _run(path, "skip")
    assert keys == ["c000", "c001", "c003"] and ds.stats == {"bad_codes": 1}
    with pytest.raises(DataError, match="bad_codes.*c002"):
        _run(path, "raise")


def test_raise_from_a_worker_is_still_a_data_error(tmp_path):
    """DataLoader re-creates a worker's exception from its text: it must stay a DataError with its reason."""
    samples = [_good(i) for i in range(6)]
    BAD_CASES["bad_json"](samples[4])
    path = _write(tmp_path, samples)
    loader = ShardLoader(ShardDataset(path, on_error="raise"), batch_size=2, num_workers=2)
    with pytest.raises(DataError, match="bad_json.*k004") as e:
        list(loader)
    assert e.value.reason == "bad_json"
    import pickle

    err = pickle.loads(pickle.dumps(DataError("bad_cls", "not a number", "k1", "a.tar")))
    assert (err.reason, err.key, err.url, str(err)) == (
        "bad_cls",
        "k1",
        "a.tar",
        "bad_cls: not a number (key 'k1' in a.tar)",
    )
