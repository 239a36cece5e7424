"""Shard reader: decoding, splitting by node and worker, deterministic shuffling and exact resume."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mmtok.data import DataConfig, ShardDataset, build_loader, write_shards
from mmtok.data.loader import ShardLoader
from mmtok.data.reader import _shuffle, expand_pattern


def _samples(n: int, start: int = 0, size: int = 8):
    rng = np.random.default_rng(start)
    for i in range(start, start + n):
        img = rng.integers(0, 256, (size, size), dtype=np.uint8)
        mask = (img > 127).astype(np.uint8)
        yield {"__key__": f"s{i:05d}", "png": img, "mask.png": mask, "cls": i % 10, "json": {"i": i}}


@pytest.fixture
def shards(tmp_path):
    """6 shards of 10 samples (keys s00000..s00059)."""
    paths = write_shards(_samples(60), tmp_path / "d", prefix="train", maxcount=10)
    assert len(paths) == 6
    return str(tmp_path / "d" / "train-{000000..000005}.tar")


def _keys(batches) -> list[str]:
    return [k for b in batches for k in b["__key__"]]


def test_decoded_fields_and_index(shards):
    ds = ShardDataset(shards)
    assert ds.counts == [10] * 6 and set(ds.required) == {"png", "mask.png", "cls", "json"}
    s = next(iter(ds))
    assert s["__key__"] == "s00000" and s["label"] == 0 and s["json"] == {"i": 0}
    assert s["image"].shape == (1, 8, 8) and s["image"].dtype == torch.float32 and 0 <= s["image"].min()
    assert s["mask"].dtype == torch.long and s["mask"].shape == (8, 8)
    assert torch.equal(s["mask"], (s["image"][0] * 255 > 127.5).long())  # L-mode mask kept, not RGB-ified
    assert [x["__key__"] for x in ds] == [f"s{i:05d}" for i in range(60)]  # no shuffle: stream order


def test_pattern_forms(shards, tmp_path):
    d = tmp_path / "d"
    assert len(expand_pattern(shards)) == 6
    assert expand_pattern(str(d)) == expand_pattern(str(d / "train-*.tar")) == expand_pattern(str(d / "train.json"))
    two = f"{d}/train-000000.tar::{d}/train-000001.tar"
    assert len(ShardDataset(two).shards) == 2


def test_shuffle_is_seeded_and_epoch_dependent(shards):
    def order(seed, epoch):
        ds = ShardDataset(shards, shuffle_buffer=16, seed=seed)
        ds.set_epoch(epoch)
        return [x["__key__"] for x in ds]

    a = order(0, 0)
    assert a == order(0, 0) and sorted(a) == [f"s{i:05d}" for i in range(60)]
    assert a != order(0, 1) and a != order(1, 0) and a != sorted(a)


@pytest.mark.parametrize("world_size,workers", [(2, 1), (2, 2), (3, 2)])
def test_split_by_node_and_worker_covers_everything_once(shards, world_size, workers):
    """Each consumer's stream is disjoint from the others; together they are the whole set.

    (3, 2) has 6 consumers for 6 shards; (2, 2) 4 consumers; with 6+ consumers per shard count the
    sample-level fallback is covered by ``test_sample_level_split_when_few_shards``.
    """
    seen = []
    for rank in range(world_size):
        ds = ShardDataset(shards, rank=rank, world_size=world_size, shuffle_buffer=8)
        loader = ShardLoader(ds, batch_size=3, num_workers=workers)
        keys = _keys(loader)
        assert keys, f"rank {rank} got nothing"
        seen += keys
    assert sorted(seen) == [f"s{i:05d}" for i in range(60)]


def test_sample_level_split_when_few_shards(tmp_path):
    write_shards(_samples(10), tmp_path, prefix="one", maxcount=100)  # 1 shard, 4 consumers
    pat = str(tmp_path / "one-000000.tar")
    per = []
    for rank in range(2):
        loader = ShardLoader(ShardDataset(pat, rank=rank, world_size=2), batch_size=2, num_workers=2)
        per.append(_keys(loader))
    assert sorted(per[0] + per[1]) == [f"s{i:05d}" for i in range(10)]
    assert len(per[0]) == 6 and len(per[1]) == 4  # consumer c = rank * 2 + worker keeps i % 4 == c


def test_shuffle_buffer_replay_continues_the_real_run():
    """Replaying the buffer on integers, then refilling it with real items, continues the real stream."""
    import random

    from mmtok.data.reader import _Counted

    for size, total, skip in [(4, 20, 7), (16, 10, 5), (3, 9, 9), (5, 30, 26)]:
        items = [f"x{i}" for i in range(total)]
        real = list(_shuffle(iter(items), size, random.Random(1), []))
        assert sorted(real) == sorted(items) and real != items
        buf, rng = [], random.Random(1)
        src = _Counted(iter(range(total)))
        head = list(itertools.islice(_shuffle(src, size, rng, buf), skip))
        tail = list(_shuffle(iter(items[src.n :]), size, rng, [items[p] for p in buf]))
        assert [items[p] for p in head] + tail == real


@pytest.mark.parametrize(
    "workers,resampled,epoch_length,k",
    [(0, False, 0, 3), (0, True, 37, 4), (2, False, 0, 5), (2, True, 50, 6), (2, False, 45, 3), (0, False, 0, 0)],
)
def test_exact_resume(shards, workers, resampled, epoch_length, k):
    """Consume k batches, save, rebuild, load: the rest equals an uninterrupted run's rest."""

    def make():
        ds = ShardDataset(shards, shuffle_buffer=16, seed=3, resampled=resampled, epoch_length=epoch_length)
        return ShardLoader(ds, batch_size=4, num_workers=workers)

    full = make()
    full.set_epoch(1)
    ref = _keys(full)
    if not resampled and epoch_length == 0:
        assert sorted(ref) == [f"s{i:05d}" for i in range(60)]
    if epoch_length:
        assert len(ref) == epoch_length
    first = make()
    first.set_epoch(1)
    it = iter(first)
    head = [next(it) for _ in range(k)]
    state = first.state_dict()
    del it, first
    resumed = make()
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # an engine calling set_epoch after load must not lose the position
    tail = list(resumed)
    assert _keys(head) + _keys(tail) == ref
    # and the stream continues into the next epoch identically
    again = make()
    again.set_epoch(2)
    assert _keys(resumed) == _keys(again)


def test_resume_with_many_batches_skips_whole_shards(shards, monkeypatch):
    """Resuming late in the stream must not open the shards that are fully consumed (no shuffle)."""
    from mmtok.data import reader

    ds = ShardDataset(shards)
    loader = ShardLoader(ds, batch_size=5)
    it = iter(loader)
    for _ in range(9):  # 45 samples: shards 0..3 consumed
        next(it)
    state = loader.state_dict()
    opened = []
    real = reader.iter_tar
    monkeypatch.setattr(reader, "iter_tar", lambda p, **kw: (opened.append(p), real(p, **kw))[1])
    loader2 = ShardLoader(ShardDataset(shards), batch_size=5)
    loader2.load_state_dict(state)
    assert _keys(loader2) == [f"s{i:05d}" for i in range(45, 60)]
    assert [p[-10:] for p in opened] == ["000004.tar", "000005.tar"]


def test_resume_rejects_other_settings(shards):
    a = ShardLoader(ShardDataset(shards, shuffle_buffer=4), batch_size=4, num_workers=0)
    state = a.state_dict()
    with pytest.raises(ValueError, match="fingerprint"):
        ShardLoader(ShardDataset(shards, shuffle_buffer=8), batch_size=4).load_state_dict(state)
    two = ShardLoader(ShardDataset(shards, shuffle_buffer=4, rank=1, world_size=2), batch_size=4).state_dict()
    with pytest.raises(ValueError, match="states of every saved rank"):
        ShardLoader(ShardDataset(shards, shuffle_buffer=4), batch_size=4).load_state_dict(two)
    with pytest.raises(ValueError, match="one per rank"):
        ShardLoader(ShardDataset(shards, shuffle_buffer=4), batch_size=4).load_state_dict([two])


def _run_part(shards, world, workers, states, batches, **kw):
    """Every rank of a layout resumes from ``states`` (None: the epoch's start) and hands out ``batches[rank]``
    batches (None: to the epoch's end); returns (keys per rank, states per rank)."""
    keys, saved = [], []
    for rank in range(world):
        ds = ShardDataset(shards, shuffle_buffer=16, seed=3, rank=rank, world_size=world, **kw)
        loader = ShardLoader(ds, batch_size=4, num_workers=workers)
        if states is not None:
            loader.load_state_dict(states)
        loader.set_epoch(loader.epoch)  # as the engine does: a no-op on a restored epoch
        it = iter(loader)
        got = list(it) if batches[rank] is None else list(itertools.islice(it, batches[rank]))
        keys.append(_keys(got))
        saved.append(loader.state_dict())
        del it
    return keys, saved


@pytest.mark.parametrize(
    "old,new,batches",
    [
        ((2, 0), (1, 0), [3, 5]),  # 2 consumers -> 1
        ((1, 0), (2, 0), [6]),  # 1 -> 2
        ((1, 2), (1, 0), [5]),  # num_workers 2 -> 0
        ((2, 2), (1, 2), [2, 4]),
        ((1, 0), (2, 2), [10]),  # 2 shards left for 4 consumers: sample-level re-split
        ((2, 1), (2, 0), [0, 7]),  # 1 and 0 workers are one layout: exact
    ],
)
def test_resume_in_another_layout_delivers_every_sample_once(shards, old, new, batches):
    heads, states = _run_part(shards, old[0], old[1], None, batches)
    tails, _ = _run_part(shards, new[0], new[1], states, [None] * new[0])
    seen = [k for part in heads + tails for k in part]
    assert sorted(seen) == [f"s{i:05d}" for i in range(60)]  # nothing repeated, nothing skipped
    assert all(tails), "every new consumer gets part of the rest"
    # The next epoch is the new layout's own, as in a run started there.
    _, states = _run_part(shards, new[0], new[1], states, [None] * new[0])
    nxt, _ = _run_part(shards, new[0], new[1], states, [None] * new[0])
    fresh = []
    for rank in range(new[0]):
        loader = ShardLoader(
            ShardDataset(shards, shuffle_buffer=16, seed=3, rank=rank, world_size=new[0]), 4, num_workers=new[1]
        )
        loader.set_epoch(1)
        fresh.append(_keys(loader))
    assert nxt == fresh


def test_resume_of_a_resume_in_other_layouts(shards):
    """2 -> 1 -> 2 ranks, saving in the middle of each re-split stream: still every sample once, and saving and
    resuming in the re-split layout itself is exact."""
    a, states = _run_part(shards, 2, 0, None, [2, 3])
    b, states = _run_part(shards, 1, 0, states, [4])
    ref, _ = _run_part(shards, 1, 0, states, [None])  # the 1-rank re-split stream, uninterrupted
    again, _ = _run_part(shards, 1, 0, states, [None])
    assert ref == again and ref[0]
    c, states = _run_part(shards, 2, 2, states, [1, 2])
    d, _ = _run_part(shards, 1, 0, states, [None])
    seen = [k for part in a + b + c + d for k in part]
    assert sorted(seen) == [f"s{i:05d}" for i in range(60)]


def test_layout_free_description(shards):
    from mmtok.data.loader import delivered_state

    heads, states = _run_part(shards, 2, 0, None, [3, 2])
    desc = delivered_state(ShardDataset(shards, shuffle_buffer=16, seed=3), states)
    done = sorted(j + 10 * int(i) for i, runs in desc["delivered"].items() for a, b in runs for j in range(a, b))
    assert [f"s{j:05d}" for j in done] == sorted(heads[0] + heads[1]) and desc["repeat_bound"] == 0
    tails, _ = _run_part(shards, 3, 0, desc, [None] * 3)
    assert sorted(heads[0] + heads[1] + [k for t in tails for k in t]) == [f"s{i:05d}" for i in range(60)]
    # The hook the training engine calls with every saved rank's state when the world size changed.
    one = ShardLoader(ShardDataset(shards, shuffle_buffer=16, seed=3), batch_size=4)
    with pytest.raises(ValueError, match="reads as rank 0 of 1"):
        one.load_state_dict_resplit(states, rank=0, world_size=2)
    one.load_state_dict_resplit(states, rank=0, world_size=1)
    assert sorted(heads[0] + heads[1] + _keys(one)) == [f"s{i:05d}" for i in range(60)]


def test_resampled_resume_in_another_layout_keeps_the_epoch_size(shards, caplog):
    """Resampled streams repeat samples by design: the new layout shares the positions left; the bound is logged."""
    import logging

    kw = {"resampled": True, "epoch_length": 24}
    heads, states = _run_part(shards, 2, 0, None, [2, 1], **kw)
    with caplog.at_level(logging.WARNING, logger="mmtok.data.reader"):
        tails, _ = _run_part(shards, 1, 2, states, [None], **kw)
    assert sum(map(len, heads + tails)) == 2 * 24
    assert "up to 12 samples of epoch 0 may be delivered a second time" in caplog.text


def test_build_loader_from_config(shards):
    cfg = DataConfig(train=shards, val=shards, batch_size=8, shuffle_buffer=10, image_size=16, num_workers=0)
    train = build_loader(cfg, "train", seed=1)
    batch = next(iter(train))
    assert batch["image"].shape == (8, 1, 16, 16) and batch["mask"].shape == (8, 16, 16)
    assert batch["label"].dtype == torch.long and len(batch["__key__"]) == 8
    val = build_loader(cfg, "val")
    assert len(val) == 8 and _keys(val)[:3] == ["s00000", "s00001", "s00002"]  # val: stream order
    with pytest.raises(ValueError, match="data.train is empty"):
        build_loader(DataConfig(), "train")


def test_len_matches_batches(shards):
    for workers, el in [(0, 0), (2, 0), (2, 30)]:
        loader = ShardLoader(ShardDataset(shards, epoch_length=el), batch_size=4, num_workers=workers)
        assert len(loader) == len(list(loader))


def test_fast_ustar_path_and_pax_fallback_agree(shards, tmp_path):
    """Our shards take the fast header parser; PAX/GNU shards from other writers take webdataset's."""
    import tarfile

    import webdataset as wds

    from mmtok.data import reader

    src = expand_pattern(shards)[0]
    with tarfile.open(src) as tf:
        assert all(not m.pax_headers for m in tf.getmembers())
        members = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
    fast = list(reader.iter_tar(src))
    pax = str(tmp_path / "pax.tar")
    with tarfile.open(pax, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1.5  # a float mtime forces a PAX header
            tf.addfile(info, __import__("io").BytesIO(data))
    with tarfile.open(pax) as tf:
        assert all(m.pax_headers for m in tf.getmembers())
    slow = list(reader.iter_tar(pax))
    assert len(fast) == 10 and [{k: v for k, v in s.items() if k != "__url__"} for s in fast] == [
        {k: v for k, v in s.items() if k != "__url__"} for s in slow
    ]
    with wds.TarWriter(str(tmp_path / "w.tar")) as w:  # webdataset's own writer (float mtime: PAX)
        w.write({"__key__": "a", "txt": "hello", "json": {"x": 1}})
    assert ShardDataset(str(tmp_path / "w.tar")).__iter__().__next__()["text"] == "hello"


def test_direct_iteration_state_resumes_in_its_layout_and_in_another(shards):
    ds = ShardDataset(shards, shuffle_buffer=16, seed=3)
    it = iter(ds)
    head = [next(it)["__key__"] for _ in range(25)]
    state = ds.state_dict()
    rest = [s["__key__"] for s in it]
    old = {k: state[k] for k in ("epoch", "position", "fingerprint")}  # as written before layouts could change
    again = ShardDataset(shards, shuffle_buffer=16, seed=3)
    again.load_state_dict(old)
    assert [s["__key__"] for s in again] == rest
    tails = []
    for rank in range(2):
        part = ShardDataset(shards, shuffle_buffer=16, seed=3, rank=rank, world_size=2)
        part.load_state_dict(state)
        tails += [s["__key__"] for s in part]
    assert sorted(head + tails) == [f"s{i:05d}" for i in range(60)]
