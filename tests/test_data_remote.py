"""Shards from URLs (webdataset's gopen: http://, pipe:, file:) and network errors under the error policy.

A real HTTP server on 127.0.0.1 (``http.server`` in a thread) serves the shards written to ``tmp_path``; a
variant of its handler announces the whole file but closes the connection after ``cut`` bytes, for the first
``drops`` requests of a file, so ``curl`` (what gopen runs for http) fails mid-shard the way a real network does.
"""

from __future__ import annotations

import functools
import http.server
import logging
import shutil
import socket
import threading

import numpy as np
import pytest

from mmtok.data import DataConfig, DataError, ShardDataset, ShardPatternError, build_loader, write_shards
from mmtok.data.loader import ShardLoader
from mmtok.data.reader import expand_pattern, with_name

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset's gopen reads http:// with curl")

KEYS = [f"s{i:05d}" for i in range(60)]


def _samples(n: int):
    rng = np.random.default_rng(0)
    for i in range(n):
        img = rng.integers(0, 256, (8, 8), dtype=np.uint8)
        yield {"__key__": f"s{i:05d}", "png": img, "cls": i % 10, "json": {"i": i}}


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves ``server.root``; the first ``server.drops[name]`` requests of a file are cut after ``server.cut``."""

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def copyfile(self, source, outputfile) -> None:
        srv = self.server
        name = self.path.rsplit("/", 1)[-1]
        with srv.lock:
            srv.requests.append(name)
            drop = srv.drops.get(name, 0) > 0
            if drop:
                srv.drops[name] -= 1
        if not drop:
            return super().copyfile(source, outputfile)
        outputfile.write(source.read()[: srv.cut])  # Content-Length already promised the whole file
        outputfile.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def shards(tmp_path):
    """6 shards of 10 samples with their index ``train.json``, in ``tmp_path/d``."""
    write_shards(_samples(60), tmp_path / "d", prefix="train", maxcount=10)
    return tmp_path / "d"


@pytest.fixture
def server(shards):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(shards)))
    srv.lock, srv.requests, srv.drops, srv.cut = threading.Lock(), [], {}, 9000
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


def _pattern(kind: str, shards, server) -> str:
    name = "train-{000000..000005}.tar"
    return {
        "local": f"{shards}/{name}",
        "http": f"{server.base}/{name}",
        "pipe": f"pipe:cat {shards}/{name}",
        "file": f"file://{shards}/{name}",
    }[kind]


def _loader(pattern, workers=0, **kw):
    ds = ShardDataset(pattern, shuffle_buffer=16, seed=3, retry_backoff=0.01, **kw)
    return ShardLoader(ds, batch_size=4, num_workers=workers)


def _keys(batches) -> list[str]:
    return [k for b in batches for k in b["__key__"]]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kind", ["http", "pipe", "file"])
def test_urls_give_the_local_stream(shards, server, kind, workers):
    """Same samples, same order, same decoded values as the local files; the index is fetched once."""
    ref = [b for b in _loader(_pattern("local", shards, server), workers)]
    got = [b for b in _loader(_pattern(kind, shards, server), workers)]
    assert _keys(got) == _keys(ref) and sorted(_keys(got)) == KEYS and _keys(got) != KEYS
    assert all((a["image"] == b["image"]).all() for a, b in zip(ref, got))
    if kind == "http":
        assert server.requests.count("train.json") == 1  # counts from the index beside the shards
        assert sorted(r for r in server.requests if r.endswith(".tar")) == [f"train-{i:06d}.tar" for i in range(6)]


def test_pattern_forms_with_urls(shards, server):
    urls = expand_pattern(f"{server.base}/train-{{000000..000002}}.tar")
    assert urls == [f"{server.base}/train-{i:06d}.tar" for i in range(3)]
    assert expand_pattern(f"{server.base}/train.json") == [f"{server.base}/train-{i:06d}.tar" for i in range(6)]
    assert expand_pattern(f"pipe:cat {shards}/train.json") == [f"pipe:cat {shards}/train-{i:06d}.tar" for i in range(6)]
    assert (
        with_name("pipe:aws s3 cp s3://b/x/train-000001.tar -", "train.json") == "pipe:aws s3 cp s3://b/x/train.json -"
    )
    assert with_name("https://h/x/train-000001.tar?sig=1", "train.json") == "https://h/x/train.json?sig=1"
    assert len(expand_pattern(f"file://{shards}/train-*.tar")) == 6
    # A command around the shard name: the name (not the command) identifies the shard, so states carry over.
    piped = ShardDataset(f"pipe:cat {shards}/train-{{000000..000005}}.tar | cat")
    assert piped.fingerprint == ShardDataset(f"{shards}/train-{{000000..000005}}.tar").fingerprint
    assert [s["__key__"] for s in piped] == KEYS
    with pytest.raises(ShardPatternError, match="glob cannot list remote"):
        expand_pattern(f"{server.base}/train-*.tar")
    with pytest.raises(ShardPatternError, match="cannot read the shard index"):
        expand_pattern(f"{server.base}/nothing.json")


def test_counts_from_the_stream_without_an_index(shards, server, caplog):
    (shards / "train.json").unlink()
    with caplog.at_level(logging.WARNING, logger="mmtok.data.reader"):
        ds = ShardDataset(_pattern("http", shards, server))
    assert ds.counts == [10] * 6 and "no shard index" in caplog.text
    assert [s["__key__"] for s in ds] == KEYS


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_on_remote_shards(shards, server, workers):
    """A position saved on http shards (or on the local files) resumes on http shards exactly."""
    url = _pattern("http", shards, server)
    ref = _keys(_loader(url, workers))
    for saved_on in (url, _pattern("local", shards, server)):
        first = _loader(saved_on, workers)
        it = iter(first)
        head = [next(it) for _ in range(5)]
        state = first.state_dict()
        del it
        resumed = _loader(url, workers)
        resumed.load_state_dict(state)
        assert _keys(head) + _keys(resumed) == ref


@pytest.mark.parametrize("workers", [0, 2])
def test_dropped_connection_is_retried_and_resumes_at_the_sample(shards, server, caplog, workers):
    server.drops = {"train-000002.tar": 2, "train-000004.tar": 1}
    ref = _keys(_loader(_pattern("local", shards, server), workers))
    with caplog.at_level(logging.WARNING, logger="mmtok.data.reader"):
        loader = _loader(_pattern("http", shards, server), workers, retries=3)
        got = _keys(loader)
    assert got == ref  # nothing repeated, nothing lost
    assert loader.stats == {"network_retry": 3}
    if workers == 0:  # worker processes log in their own process
        assert "retry 2/3" in caplog.text and f"{server.base}/train-000002.tar" in caplog.text
    assert server.requests.count("train-000002.tar") == 3


def test_after_the_last_attempt_skip_counts_the_rest_and_raise_raises(shards, server):
    url = _pattern("http", shards, server)
    server.drops = {"train-000003.tar": 99}
    ds = ShardDataset(url, retries=1, retry_backoff=0.01)
    keys = [s["__key__"] for s in ds]
    lost = sorted(set(KEYS) - set(keys))
    assert lost and set(lost) <= {f"s{i:05d}" for i in range(30, 40)}  # only the broken shard's tail
    assert keys[:30] == KEYS[:30] and keys[-20:] == KEYS[40:]
    assert ds.stats == {"network_retry": 1, "network_error": 1, "missing_sample": len(lost)}
    assert "train-000003.tar" in ds.skipped[-1][2]
    server.drops = {"train-000003.tar": 99}
    with pytest.raises(DataError, match="network_error.*2 attempts"):
        list(ShardDataset(url, retries=1, retry_backoff=0.01, on_error="raise"))


def test_failing_pipe_command_is_counted(shards):
    """A pipe: command that fails (here: a shard that is gone) is retried, then its samples are counted lost."""
    url = f"pipe:cat {shards}/train-{{000000..000001}}.tar"
    ds = ShardDataset(url, retries=1, retry_backoff=0.01)  # counts from the index, before the shard goes
    (shards / "train-000001.tar").unlink()
    assert [s["__key__"] for s in ds] == KEYS[:10]
    assert ds.stats == {"network_retry": 1, "network_error": 1, "missing_sample": 10}


def test_build_loader_passes_the_retry_settings(shards, server):
    cfg = DataConfig(train=_pattern("http", shards, server), batch_size=4, shuffle_buffer=0, retries=5, retry_backoff=0)
    loader = build_loader(cfg, "train")
    assert loader.dataset.retries == 5 and loader.dataset.retry_backoff == 0
    assert _keys(loader) == KEYS


def test_a_bad_sample_under_raise_is_not_taken_for_a_broken_stream(shards, server):
    """The policy's own DataError (here: a sample past an under-counting index) raises at once, no retry."""
    import json

    index = json.loads((shards / "train.json").read_text())
    index["shards"][0]["count"] = 7
    (shards / "train.json").write_text(json.dumps(index))
    ds = ShardDataset(_pattern("http", shards, server), on_error="raise", retries=2, retry_backoff=0.01)
    with pytest.raises(DataError, match="unindexed_sample.*s00007"):
        list(ds)
    assert "network_retry" not in ds.stats and server.requests.count("train-000000.tar") == 1
