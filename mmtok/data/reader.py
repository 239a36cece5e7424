"""Reading WebDataset shards: splitting, deterministic shuffling, exact resume and an error policy.

WebDataset (arXiv:2001.01858, github.com/webdataset/webdataset) streams samples from tar shards split
by node and DataLoader worker, shuffled by a buffer. We keep its on-disk format and use its tar member
iterator (``webdataset.tariterators``), but write the pipeline ourselves because a training run here must
resume *exactly*: wds's shuffle uses unseeded state and its position cannot be saved.

The stream of one consumer (``c = rank * num_workers + worker`` of ``C = world_size * num_workers``) is a
pure function of ``(seed, epoch, rank, world_size, num_workers, worker)``:

1. Segments. Not resampled: the shard order is shuffled with ``Random(seed, epoch, pass)`` (if the
   shuffle buffer is on) and consumer ``c`` takes shards ``c, c + C, ...``. With fewer shards than
   consumers, every consumer reads every shard and keeps samples ``i`` with ``i % C == c`` (sample-level
   splitting, so nobody is left idle; each reads all bytes but decodes only its own). Resampled: the
   consumer draws shards with replacement from ``Random(seed, epoch, c, C)`` forever.
2. Positions. Concatenating segments numbers the consumer's samples 0, 1, 2, ... using the counts of
   the index file (``<prefix>.json`` written by :func:`mmtok.data.write_shards`; shards without an index
   are counted once by scanning their tar headers, up to the first damage). A shard that turns out shorter
   than its count (truncated) fills its missing positions with holes, so positions never shift; samples
   past the count of an index that under-counts its shard are read, counted (``unindexed_sample``) and
   dropped, since giving them positions would shift every later one.
3. Shuffle buffer of ``shuffle_buffer`` raw (undecoded) samples driven by ``Random(seed, epoch, c, C)``.
4. Each buffer output increments the consumer's *position*; it is then decoded (errors go to the error
   policy), transformed and yielded.

Resuming at position ``n`` re-runs the buffer on integer positions only (no I/O) to learn which source
positions sit in the buffer and where the source stands, skips whole shards before the earliest needed
position by their counts, reads (without decoding) up to the source position, and continues: the rest of
the stream is identical to an uninterrupted one. :class:`mmtok.data.loader.ShardLoader` records per-worker
positions of the batches it hands out and restores them (see there for the worker interleaving).

Resuming in another consumer layout (a different world size or number of workers): positions mean nothing
outside their layout, so :meth:`ShardDataset.delivered` turns the saved positions of *all* consumers into the
samples of the epoch that were handed out (per shard, the indices emitted by each buffer: the buffer is replayed
on integers as above); :meth:`ShardDataset.resume_plan` then re-splits the rest of the epoch over the new consumers
(whole shards, what is left of them, to the least-loaded consumer; every ``n``-th remaining sample when fewer
shards than consumers are left) with fresh buffers, and that description travels in every later state, so a
resumed run can be resumed again, in its own layout exactly or in yet another. The next epoch is the plain stream
of the new layout. Resampled and ``epoch_length`` streams repeat samples within an epoch by design; for them the
new consumers share the positions left in the epoch and the number of samples that may repeat is logged.

Error policy: ``on_error="skip"`` drops the sample, counts it in ``stats[reason]`` and logs its key and
shard (the first ``log_limit`` per reason, then every 1000th); ``"raise"`` raises :class:`DataError`.
A pattern that matches nothing always raises :class:`ShardPatternError`. Under ``skip`` no single sample or
shard ends an epoch: a shard that cannot be scanned (0 bytes, not a tar) is counted as ``unreadable_shard``
when its turn comes (under ``raise`` the dataset refuses it at construction).

Shards from anywhere: a shard may be a URL that webdataset's ``gopen`` opens (``pipe:COMMAND``, ``http(s)://``
through ``curl``, ...; ``file:`` URLs are read as local paths). Counts come from the index json beside the shards
(``train-000003.tar`` -> ``train.json``, fetched once per folder) or, without one, from reading each shard through
once at construction. A stream that breaks (a dropped connection: ``curl`` exits non-zero, or the stream ends
before the shard's count) is opened again up to ``retries`` times with exponential backoff, each retry counted as
``network_retry`` and logged with the URL, and read on from the sample where it broke (the samples before are
read past, not delivered again), so positions and resume are those of a local shard. After the last attempt the
rest of the shard is lost: counted (``network_error`` once, ``missing_sample`` per position) or raised.

What a sample must carry: the consumer's ``required`` fields when given; otherwise, per shard, every field
that more than half of the shard's samples carry (from the index's per-shard field counts, or from the header
scan of a shard without one), except those the writer was told are ``optional``. The index's own field list
is an intersection and cannot say that one sample lost its mask; a majority of siblings can. A
``codes.npy`` must also have the shard's usual shape when the index records one (see
:func:`mmtok.data.writer.write_shards`).
"""

from __future__ import annotations

import bisect
import collections
import glob
import hashlib
import itertools
import json
import logging
import os
import random
import re
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import braceexpand
from torch.utils.data import IterableDataset, get_worker_info

from mmtok.data.decode import KNOWN_COMPOUND_PREFIXES, DataError, ShardPatternError, decode_sample

logger = logging.getLogger(__name__)


# -- pattern expansion and the index ------------------------------------------------------------------


_URL = re.compile(r"^(pipe:|[A-Za-z][A-Za-z0-9+.-]*://)")


def is_url(path: str) -> bool:
    """True for a shard that webdataset's ``gopen`` streams (``pipe:CMD``, ``http(s)://``, ``gs://``, ...).

    ``file:`` URLs are not: they name local files, which are read (and scanned, globbed, listed) as paths.
    """
    return bool(_URL.match(path)) and not path.startswith("file:")


def _local(part: str) -> str:
    """A ``file:`` URL as the local path gopen would open (``file:///d/x.tar`` and ``file:d/x.tar``)."""
    if part.startswith("file:"):
        from urllib.parse import urlparse
        from urllib.request import url2pathname

        return url2pathname(urlparse(part).path)
    return os.path.expanduser(part)


def _name_span(url: str) -> tuple[int, int]:
    """``(start, end)`` of the file name in a URL: the last path part, or in a ``pipe:`` command the base
    name of its last ``.tar``/``.json`` word (``pipe:aws s3 cp s3://b/train-000001.tar -``)."""
    if url.startswith("pipe:"):
        words = list(re.finditer(r"[^\s'\"]+\.(?:tar|json)(?=[\s'\"]|$)", url))
        if not words:
            return len(url), len(url)
        w = words[-1]
        return w.start() + w.group(0).rfind("/") + 1, w.end()
    end = min([i for i in (url.find("?"), url.find("#")) if i >= 0] or [len(url)])
    return url.rfind("/", 0, end) + 1, end


def with_name(url: str, name: str) -> str:
    """``url`` naming file ``name`` beside the one it names now (same folder, scheme and command)."""
    start, end = _name_span(url)
    return url[:start] + name + url[end:]


def open_shard(path: str, bufsize: int = 1 << 20) -> Any:
    """A binary reader of a local shard or of any URL webdataset's ``gopen`` opens.

    A ``pipe:`` or ``http(s)://`` reader is a process (``curl`` for HTTP); its exit status is checked on reads
    and on ``close()`` (a download cut short raises ``OSError`` there), which is why readers close explicitly.
    """
    if is_url(path):
        from webdataset.gopen import gopen

        return gopen(path, "rb", bufsize=bufsize)
    return open(_local(path), "rb", buffering=bufsize)


def _close_quietly(f: Any) -> None:
    """Close a reader we stopped early: a producer killed by the closed pipe reports an error we caused."""
    try:
        f.close()
    except (OSError, ValueError):
        pass


def _finish(f: Any, url: str) -> None:
    """Read a stream to its end and close it, so a download that failed after the tar's end still says so."""
    if is_url(url):
        while f.read(1 << 16):
            pass
    f.close()


def fetch_text(url: str) -> str | None:
    """Contents of a small remote or local file (an index), or None when it cannot be read."""
    try:
        f = open_shard(url, bufsize=1 << 16)
        try:
            data = f.read()
        except BaseException:
            _close_quietly(f)
            raise
        f.close()
        return data.decode("utf-8")
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def expand_pattern(pattern: str | os.PathLike | list) -> list[str]:
    """Shard paths of a pattern: brace ranges, globs, ``::``-joined patterns, a folder or an index file.

    A folder means every ``*.tar`` in it; an index ``.json`` means the shards it lists. Any part may be a URL
    that webdataset's ``gopen`` opens (``pipe:CMD``, ``http(s)://``, ...): brace ranges expand inside it and an
    index URL is fetched and lists shard URLs beside it; globs and folders need a file system, so they work for
    local paths and ``file:`` URLs only.

    Raises:
        ShardPatternError: a part matches no file, a brace-expanded file does not exist, a remote index cannot
            be read, or a remote part has a glob.
    """
    parts = [str(p) for p in pattern] if isinstance(pattern, (list, tuple)) else str(pattern).split("::")
    if not any(p.strip() for p in parts):
        raise ShardPatternError("empty shard pattern: set it to e.g. data/fmnist/train-{000000..000011}.tar")
    out: list[str] = []
    for part in (p.strip() for p in parts if p.strip()):
        if is_url(part):
            out.extend(_expand_url(part))
            continue
        part = _local(part)
        if os.path.isdir(part):
            found = sorted(glob.glob(os.path.join(part, "*.tar")))
        elif part.endswith(".json") and os.path.isfile(part):
            index = json.loads(Path(part).read_text())
            found = [os.path.join(os.path.dirname(part), s["name"]) for s in index.get("shards", [])]
        else:
            found = []
            for p in braceexpand.braceexpand(part):
                found.extend(sorted(glob.glob(p)) if glob.has_magic(p) else [p])
            missing = [p for p in found if not os.path.isfile(p)]
            if missing and len(missing) == len(found):
                found = []
            elif missing:
                raise ShardPatternError(
                    f"shard pattern {part!r}: {len(missing)} of {len(found)} files do not exist "
                    f"(first: {missing[0]}); fix the range or rebuild the shards"
                )
        if not found:
            raise ShardPatternError(
                f"shard pattern {part!r} matches no files; check the path (brace ranges like "
                "train-{000000..000009}.tar and globs like train-*.tar are supported) or build the shards with "
                "`mmtok shards NAME --out DIR`"
            )
        out.extend(found)
    return out


def _expand_url(part: str) -> list[str]:
    """Shard URLs of one remote pattern part (brace ranges, or an index .json URL listing them)."""
    name = part[slice(*_name_span(part))]
    if name.endswith(".json"):
        text = fetch_text(part)
        index = _loads(text)
        if index is None:
            raise ShardPatternError(
                f"cannot read the shard index {part!r}: check the URL/command (try it with curl or in a shell), "
                "or name the shards with a brace range instead"
            )
        found = [with_name(part, s["name"]) for s in index["shards"] if isinstance(s, dict) and "name" in s]
    else:
        if "*" in part:
            raise ShardPatternError(
                f"shard pattern {part!r}: a glob cannot list remote shards; use a brace range "
                "(train-{000000..000011}.tar) or the URL of the shards' index .json"
            )
        found = list(braceexpand.braceexpand(part))
    if not found:
        raise ShardPatternError(f"shard pattern {part!r} lists no shards")
    return found


def _loads(text: str | None) -> dict | None:
    """A parsed shard index, or None for text that is not one."""
    try:
        index = json.loads(text) if text is not None else None
    except ValueError:
        return None
    return index if isinstance(index, dict) and isinstance(index.get("shards"), list) else None


def read_index(shard_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``{shard file name: entry}`` from every index json in a folder.

    An entry holds ``count``, ``bytes``, ``fields`` (the index's list: fields every sample has),
    ``optional`` (fields the writer was told may be missing), and when the writer recorded them
    ``field_counts`` (samples of this shard carrying each field) and ``codes_shape``.
    """
    entries: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(shard_dir).glob("*.json")):
        try:
            text = path.read_text()
        except OSError:
            continue  # not ours or damaged: the shards are then counted by scanning
        entries.update(index_entries(_loads(text)))
    return entries


def index_entries(index: dict | None) -> dict[str, dict[str, Any]]:
    """``{shard file name: entry}`` of one parsed index (see :func:`read_index`); {} for None."""
    if index is None:
        return {}
    entries: dict[str, dict[str, Any]] = {}
    fields, optional = index.get("fields", []), index.get("optional", [])
    for s in index["shards"]:
        if isinstance(s, dict) and "name" in s and "count" in s:
            per_shard = s.get("fields")  # {field: samples carrying it}; absent in older indexes
            entries[s["name"]] = {
                "count": int(s["count"]),
                "bytes": s.get("bytes"),
                "fields": fields,
                "optional": list(optional) if isinstance(optional, list) else [],
                "field_counts": per_shard if isinstance(per_shard, dict) else None,
                "codes_shape": s.get("codes_shape"),
            }
    return entries


def split_member(fname: str) -> tuple[str, str]:
    """``dir/key.ext.more`` -> (``dir/key``, ``ext.more``): the key ends at the first dot of the basename."""
    head, _, base = fname.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), (ext.lower() if dot else "")


def _dotted_heads(exts: list[str]) -> set[str] | None:
    """Heads ``x`` if every extension looks like ``x.<ext>`` with an unknown ``x`` (a key containing a dot)."""
    if not exts or not all("." in e for e in exts):
        return None
    heads = {e.split(".", 1)[0] for e in exts}
    return None if heads <= KNOWN_COMPOUND_PREFIXES else heads


def group_members(members: Iterator[tuple[str, Any]], url: str) -> Iterator[dict[str, Any]]:
    """Group consecutive tar members ``(fname, data)`` into samples ``{"__key__", "__url__", ext: data}``.

    A group whose every extension carries the same unknown prefix came from keys with dots
    (``img.1.png`` + ``img.1.json``): it is split per prefix into samples marked ``__bad__``.
    """

    def finish(key: str, group: dict[str, Any]) -> Iterator[dict[str, Any]]:
        heads = _dotted_heads(list(group))
        if heads is None:
            yield {"__key__": key, "__url__": url, **group}
            return
        for h in sorted(heads):
            sub = {e.split(".", 1)[1]: v for e, v in group.items() if e.split(".", 1)[0] == h}
            yield {"__key__": f"{key}.{h}", "__url__": url, "__bad__": "key_with_dot", **sub}

    key, group = None, {}
    for fname, data in members:
        k, ext = split_member(fname)
        if not ext or (k.rpartition("/")[2].startswith("__") and k.endswith("__")):
            continue  # metadata members and extension-less files are not sample fields
        if k != key:
            if key is not None:
                yield from finish(key, group)
            key, group = k, {}
        if ext in group:
            group["__bad__"] = "duplicate_member"
        group[ext] = data
    if key is not None:
        yield from finish(key, group)


def scan_shard(path: str) -> tuple[int, collections.Counter, str | None]:
    """``(samples, {field: samples carrying it}, problem)`` of a tar shard from its member headers only.

    Scanning stops at the first damage (a truncated member, a file that is not a tar) and ``problem`` says
    what it was; the samples whose headers were seen up to there are counted, so the readable ones are still
    read and a partly present one becomes a hole the reader reports. A remote shard (a URL) is a stream: its
    bytes are read through to count it (write the index beside remote shards to avoid that).
    """
    names: list[tuple[str, None]] = []
    problem = None
    try:
        if is_url(path):
            f = open_shard(path)
            try:
                with tarfile.open(fileobj=f, mode="r|") as tf:  # stream mode: member data is read past
                    for m in tf:
                        if m.isreg():
                            names.append((m.name, None))
                _finish(f, path)
            except BaseException:
                _close_quietly(f)
                raise
        else:
            with tarfile.open(_local(path), mode="r:") as tf:  # seekable mode: skips over member data
                while (m := tf.next()) is not None:
                    if m.isreg():
                        names.append((m.name, None))
    except (tarfile.TarError, OSError, EOFError) as e:  # tarfile reports a truncated member on the next call
        problem = f"{type(e).__name__}: {e}"
    fields: collections.Counter = collections.Counter()
    count = 0
    for sample in group_members(iter(names), path):
        count += 1
        if "__bad__" not in sample:
            fields.update(k for k in sample if not k.startswith("__"))
    return count, fields, problem


def count_samples(path: str) -> int:
    """Samples in a tar shard, from its member headers only (no data is read; counts up to any damage)."""
    return scan_shard(path)[0]


def expected_fields(field_counts: dict[str, int], count: int, optional: Any = ()) -> tuple[str, ...]:
    """Fields a shard's every sample should carry: those more than half of its ``count`` samples carry.

    A majority, not all: one sample that lost its mask must not make the mask optional for the whole shard
    (which is what an intersection does). A field that half or fewer of the samples carry is taken as optional
    (labels for some images only, say); fields optional on purpose but common should be declared to the
    writer (``write_shards(..., optional=...)``) or the consumer should name its ``required`` fields.
    """
    return tuple(sorted(f for f, n in field_counts.items() if 2 * int(n) > count and f not in set(optional)))


class _NotPlainUstar(Exception):
    """A header our fast parser leaves to tarfile (PAX, GNU long names, base-256 sizes)."""


_ZERO_BLOCK = bytes(512)


def _ustar_members(f: Any) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of the regular files of a plain USTAR stream (what ``write_shards`` writes).

    Python's ``tarfile`` decodes every header field of every member; for the small members of image
    shards that was ~30% of the reader's time. Here only name, size, type and checksum are read.
    """
    while True:
        hdr = f.read(512)
        if not hdr or hdr == _ZERO_BLOCK:
            return  # end of archive (two zero blocks, or a stream that simply ends between members)
        if len(hdr) < 512:
            raise EOFError("unexpected end of data in a tar header")
        kind = hdr[156:157]
        if kind in (b"x", b"g", b"L", b"K") or hdr[124] & 0x80:
            raise _NotPlainUstar
        try:
            size, checksum = int(hdr[124:136].strip(b" \0") or b"0", 8), int(hdr[148:156].strip(b" \0"), 8)
        except ValueError as e:
            raise tarfile.ReadError(f"bad tar header: {e}") from e
        if checksum != sum(hdr[:148]) + 256 + sum(hdr[156:]):  # the checksum field counts as 8 spaces
            raise tarfile.ReadError("bad tar header checksum")
        name = hdr[:100].split(b"\0", 1)[0]
        if hdr[257:262] == b"ustar" and hdr[345] != 0:
            name = hdr[345:500].split(b"\0", 1)[0] + b"/" + name
        data = f.read(size)
        if len(data) < size:
            raise EOFError("unexpected end of data in a tar member")
        f.read(-size % 512)  # padding to the next block
        if kind in (b"0", b"\0", b"7"):
            yield name.decode("utf-8"), data


def iter_tar(path: str, skip: int = 0) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard in order, from sample ``skip`` on (errors propagate).

    ``path`` is a local file or a URL (:func:`open_shard`); a stream is read through its skipped samples.
    Plain USTAR headers are parsed directly; anything else (PAX or GNU headers from other writers) goes
    through webdataset's ``tar_file_iterator``, restarting after the members already delivered.
    """
    from webdataset.tariterators import tar_file_iterator

    delivered = 0

    def members() -> Iterator[tuple[str, bytes]]:
        nonlocal delivered
        f = open_shard(path)
        try:
            for m in _ustar_members(f):
                delivered += 1
                yield m
        except _NotPlainUstar:
            _close_quietly(f)
        except BaseException:  # including GeneratorExit: a consumer that stops early
            _close_quietly(f)
            raise
        else:
            _finish(f, path)
            return
        f = open_shard(path)
        try:
            # skip_meta=None: we filter metadata ourselves; handler re-raises so we see every error.
            for i, m in enumerate(tar_file_iterator(f, skip_meta=None)):
                if i >= delivered:
                    yield m["fname"], m["data"]
        except BaseException:
            _close_quietly(f)
            raise
        _finish(f, path)

    yield from itertools.islice(group_members(members(), path), skip, None)


class _Hole:
    """A position whose sample could not be read (truncated shard); keeps later positions in place."""

    __slots__ = ("key", "url")

    def __init__(self, url: str, key: str):
        self.url, self.key = url, key


def _ranges(indices: Any) -> list[list[int]]:
    """Sorted integers as ``[[start, stop), ...]`` runs (compact for the mostly contiguous delivered sets)."""
    out: list[list[int]] = []
    for j in sorted(indices):
        if out and out[-1][1] == j:
            out[-1][1] = j + 1
        else:
            out.append([j, j + 1])
    return out


def _unranges(runs: list[list[int]]) -> list[int]:
    return [j for a, b in runs for j in range(a, b)]


class _Segment(NamedTuple):
    """Samples one consumer keeps from one shard: ``indices`` (in shard order); samples past the shard's count
    (an under-counting index) with ``(j - extra[0]) % extra[1] == 0`` are this consumer's to count (None: none)."""

    shard: int
    indices: range | tuple[int, ...]
    extra: tuple[int, int] | None


def _shuffle(src: Iterator, size: int, rng: random.Random, buf: list) -> Iterator:
    """Deterministic shuffle buffer; ``buf`` is mutated in place so its state can be inspected.

    Steady state: each incoming item replaces a random slot whose item is emitted. Drain: random slots
    are emitted until empty. The RNG calls depend only on buffer sizes, so running this on integers
    reproduces the exact state of a run on real samples.
    """
    for item in src:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        out, buf[j] = buf[j], item
        yield out
    while buf:
        j = rng.randrange(len(buf))
        buf[j], buf[-1] = buf[-1], buf[j]
        yield buf.pop()


class _Counted:
    def __init__(self, it: Iterator):
        self.it, self.n = it, 0

    def __iter__(self) -> _Counted:
        return self

    def __next__(self) -> Any:
        v = next(self.it)
        self.n += 1
        return v


# -- the dataset ----------------------------------------------------------------------------------------


class ShardDataset(IterableDataset):
    """Decoded samples from WebDataset shards (see the module docstring for the stream definition).

    Args:
        pattern: Shard pattern (brace ranges, globs, ``::``-joined, a folder or an index json).
        transform: ``transform(sample) -> sample`` applied after decoding. It may raise
            :class:`DataError` for bad data (then the policy applies); any other exception propagates.
            Random transforms should draw from ``mmtok.data.transforms.sample_generator(sample)``, seeded
            by the sample's stream position, so a resumed run augments identically.
        shuffle_buffer: Raw samples held for shuffling (0 = stream order, shards in order).
        seed: Seed of every shuffle and draw.
        resampled: Draw shards with replacement forever (then set ``epoch_length``).
        epoch_length: Samples per epoch for this process (all its workers together); in non-resampled mode
            the shards repeat (reshuffled each pass) until reached. 0 = one pass over the consumer's shards.
        on_error: "skip" or "raise".
        rank, world_size: This process among the data-parallel ones.
        image_mode: "keep" (grey stays 1 channel), "RGB" or "L".
        required: Extensions every sample must have (exactly these: other fields may then be missing);
            default: per shard, the fields more than half of its samples carry (see the module docstring), so
            e.g. a sample that lost its ``mask.png`` is caught.
        log_limit: Skipped samples logged per reason before logging only every 1000th.
        retries: Times a remote shard (a URL) whose stream broke is opened again; each retry is counted in
            ``stats["network_retry"]`` and logged with the URL, and reading resumes at the sample where it broke.
            After the last one the rest of the shard is lost (``skip``: counted) or raises (``raise``).
        retry_backoff: Seconds before the first retry, doubled for each further one.

    Attributes:
        stats: ``Counter`` of skipped samples by reason (in this process; see ``ShardLoader.stats`` for the
            totals over workers).
        skipped: The last 100 ``(reason, key, shard)`` skipped.
    """

    def __init__(
        self,
        pattern: str | list,
        *,
        transform: Callable[[dict], dict] | None = None,
        shuffle_buffer: int = 0,
        seed: int = 0,
        resampled: bool = False,
        epoch_length: int = 0,
        on_error: str = "skip",
        rank: int = 0,
        world_size: int = 1,
        image_mode: str = "keep",
        required: tuple[str, ...] | None = None,
        log_limit: int = 20,
        retries: int = 3,
        retry_backoff: float = 1.0,
    ):
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', not {on_error!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if resampled and epoch_length <= 0:
            raise ValueError("resampled=True streams forever: set epoch_length (samples per epoch and process)")
        if shuffle_buffer < 0 or epoch_length < 0 or retries < 0 or retry_backoff < 0:
            raise ValueError("shuffle_buffer, epoch_length, retries and retry_backoff must be >= 0")
        self.pattern = pattern
        self.shards = expand_pattern(pattern)
        self.transform, self.shuffle_buffer, self.seed = transform, int(shuffle_buffer), int(seed)
        self.resampled, self.epoch_length, self.on_error = bool(resampled), int(epoch_length), on_error
        self.rank, self.world_size, self.image_mode, self.log_limit = rank, world_size, image_mode, log_limit
        self.retries, self.retry_backoff = int(retries), float(retry_backoff)
        self.stats: collections.Counter = collections.Counter()
        self.skipped: collections.deque = collections.deque(maxlen=100)
        self._explicit_required = required is not None
        self.counts, fields = self._counts()
        self.required = tuple(fields) if required is None else tuple(required)
        if sum(self.counts) == 0:
            raise DataError("no_samples", f"shard pattern {pattern!r} has {len(self.shards)} shards but no samples")
        self.epoch = 0
        self.current: tuple[str, str] = ("", "")  # (key, shard) of the sample last yielded, for batch-level errors
        self.position = 0  # outputs of the last in-process iteration (num_workers=0)
        # Set by ShardLoader before each pass (copied into workers when they start):
        self._skip: dict[int, int] = {}  # logical worker -> positions already consumed
        self._rotation = 0  # physical worker p plays logical worker (p + rotation) % num_workers
        # After a resume into another consumer layout (see resume_plan), for epoch _base_epoch only: the samples
        # delivered before it ({shard: sorted indices}; the rest is re-split by _resplit), or in resampled /
        # epoch_length mode the positions left for this process (_length). None = the plain stream.
        self._base: dict[int, list[int]] | None = None
        self._length: int | None = None
        self._base_epoch, self._base_id = -1, ""
        self._plans: dict[tuple, list[list[_Segment]]] = {}

    # -- static facts ---------------------------------------------------------------------------
    def _counts(self) -> tuple[list[int], list[str]]:
        """Sample counts per shard and the index fields common to all; fills the per-shard expectations.

        ``_shard_required[url]`` and ``_codes_shape[url]`` say what a sample of that shard must carry;
        ``_unreadable[i]`` holds the error of a shard whose scan found nothing readable, reported when its turn
        comes in a pass (under ``raise`` any damage found by a scan raises here, before training starts).
        """
        counts, fields_sets = [], []
        indices: dict[str, dict] = {}
        self._shard_required: dict[str, tuple[str, ...]] = {}
        self._codes_shape: dict[str, tuple[int, ...]] = {}
        self._unreadable: dict[int, DataError] = {}
        for i, path in enumerate(self.shards):
            entry = self._index_entry(path, indices)
            if entry is None:
                count, field_counts, problem = self._scan(path)
                if problem is not None:
                    truncated = count > 0 and "end of" in problem
                    reason = "truncated_shard" if truncated else "unreadable_shard"
                    err = DataError(reason, f"scanning stopped after {count} samples: {problem}", url=path)
                    if self.on_error == "raise":
                        raise err
                    if count == 0:
                        self._unreadable[i] = err  # a truncated one is reported by the read itself
                counts.append(count)
                fields_sets.append(None)
                optional: list[str] = []
            else:
                counts.append(entry["count"])
                fields_sets.append(set(entry["fields"]))
                field_counts, optional = entry["field_counts"] or {}, entry["optional"]
                if entry.get("codes_shape") is not None:
                    self._codes_shape[path] = tuple(int(d) for d in entry["codes_shape"])
            expected = set(expected_fields(field_counts, counts[-1], optional))
            if entry is not None:
                expected |= set(entry["fields"])  # older indexes: their field list is all we know
            self._shard_required[path] = tuple(sorted(expected))
        known = [f for f in fields_sets if f is not None]
        fields = sorted(set.intersection(*known)) if known and len(known) == len(fields_sets) else []
        return counts, fields

    def _index_entry(self, path: str, indices: dict[str, dict]) -> dict | None:
        """The index entry of a shard: from the index jsons of its folder, or for a URL from ``<prefix>.json``
        beside it (``train-000003.tar`` -> ``train.json``), fetched once per folder and prefix."""
        if not is_url(path):
            d = os.path.dirname(os.path.abspath(_local(path)))
            if d not in indices:
                indices[d] = read_index(d)
            return indices[d].get(os.path.basename(path))
        name = path[slice(*_name_span(path))]
        m = re.match(r"^(.*)-\d+\.tar$", name)
        if m is None:
            return None
        index_url = with_name(path, f"{m.group(1)}.json")
        if index_url not in indices:
            indices[index_url] = index_entries(_loads(fetch_text(index_url)))
            if not indices[index_url]:
                logger.warning(
                    "no shard index at %s: counting its shards' samples by reading them through once "
                    "(put the index json written by write_shards beside remote shards to skip this)",
                    index_url,
                )
        return indices[index_url].get(name)

    def _scan(self, path: str) -> tuple[int, collections.Counter, str | None]:
        """:func:`scan_shard`, retried like a read when a remote stream breaks."""
        for attempt in range(self.retries + 1):
            count, field_counts, problem = scan_shard(path)
            if problem is None or not is_url(path) or attempt == self.retries:
                return count, field_counts, problem
            self._retry(path, attempt + 1, problem, "while counting its samples")
        raise AssertionError("unreachable")

    def _retry(self, url: str, attempt: int, problem: str, where: str) -> None:
        """Count, log and wait before opening ``url`` again (exponential backoff)."""
        self.stats["network_retry"] += 1
        delay = self.retry_backoff * 2 ** (attempt - 1)
        logger.warning("retry %d/%d of %s in %.2f s (%s; %s)", attempt, self.retries, url, delay, problem, where)
        time.sleep(delay)

    @property
    def fingerprint(self) -> str:
        """Hash of everything that defines the stream except the epoch and position."""
        spec = [
            [s[slice(*_name_span(s))] if is_url(s) else os.path.basename(s) for s in self.shards],
            self.counts,
            self.shuffle_buffer,
            self.seed,
            self.resampled,
            self.epoch_length,
        ]
        return hashlib.sha1(json.dumps(spec).encode()).hexdigest()[:16]

    def quota(self, logical: int, num_workers: int) -> int | None:
        """Positions per epoch of a worker in ``epoch_length`` mode (the process's length split evenly)."""
        if self.epoch_length <= 0:
            return None
        length = self._length if self._length is not None and self.epoch == self._base_epoch else self.epoch_length
        return length // num_workers + (1 if logical < length % num_workers else 0)

    def consumer_length(self, epoch: int, c: int, num_consumers: int) -> int:
        """Positions of consumer ``c`` in one non-resampled pass of ``epoch``."""
        return sum(len(seg.indices) for seg in self._segments(epoch, c, num_consumers, passes=1))

    # -- the stream ------------------------------------------------------------------------------
    def _rng(self, *parts: Any) -> random.Random:
        return random.Random("-".join(str(p) for p in ("mmtok", self.seed, *parts)))  # str seeds hash stably

    def _shard_order(self, epoch: int, p: int) -> list[int]:
        order = list(range(len(self.shards)))
        if self.shuffle_buffer > 0:
            self._rng("shards", epoch, p).shuffle(order)
        return order

    def _segments(self, epoch: int, c: int, n: int, passes: int | None = None) -> Iterator[_Segment]:
        """Segments of consumer ``c`` of ``n``: which samples of which shards it keeps, in stream order."""
        if self._base is not None and epoch == self._base_epoch:
            yield from self._resplit(epoch, n)[c]
            return
        s = len(self.shards)
        if self.resampled:
            rng = self._rng("resample", epoch, c, n)
            while True:
                i = rng.randrange(s)
                yield _Segment(i, range(self.counts[i]), (0, 1))
        if passes is None:
            passes = None if self.epoch_length > 0 else 1
        for p in itertools.count() if passes is None else range(passes):
            order = self._shard_order(epoch, p)
            kept_in_pass = 0
            if s >= n:
                for i in order[c::n]:
                    kept_in_pass += self.counts[i]
                    yield _Segment(i, range(self.counts[i]), (0, 1))
            else:  # sample-level split: every consumer walks every shard, keeps global index % n == c
                g = 0
                for i in order:
                    cnt = self.counts[i]
                    first = (c - g) % n
                    seg = _Segment(i, range(first, cnt, n), (first, n))
                    kept_in_pass += len(seg.indices)
                    yield seg
                    g += cnt
            if kept_in_pass == 0 and passes is None:
                raise DataError(
                    "no_samples",
                    f"consumer {c} of {n} gets no samples from {self.pattern!r} (fewer samples than "
                    "ranks x workers); use fewer workers or more data",
                )

    def _resplit(self, epoch: int, n: int) -> list[list[_Segment]]:
        """Segments of ``n`` consumers for the samples of ``epoch`` not in the base (``_base``), once each.

        Shards keep the epoch's order. With at least ``n`` shards left, whole shards (what is left of them) go
        to the consumer with the fewest samples so far (ties: the lowest); with fewer, every consumer walks every
        shard left and keeps every ``n``-th sample left, as the plain stream does with few shards.
        """
        key = (epoch, n, self._base_id)
        if key in self._plans:
            return self._plans[key]
        base = self._base or {}
        left = []
        for i in self._shard_order(epoch, 0):
            done = set(base.get(i, ()))
            rest = [j for j in range(self.counts[i]) if j not in done]
            if rest:
                left.append((i, range(rest[0], rest[-1] + 1) if len(rest) == rest[-1] - rest[0] + 1 else tuple(rest)))
        plans: list[list[_Segment]] = [[] for _ in range(n)]
        if len(left) >= n:
            load = [0] * n
            for i, rest in left:
                c = min(range(n), key=lambda k: (load[k], k))
                plans[c].append(_Segment(i, rest, (0, 1)))
                load[c] += len(rest)
        else:
            g = 0
            for i, rest in left:
                for c in range(n):
                    plans[c].append(_Segment(i, rest[(c - g) % n :: n], (0, 1) if c == 0 else None))
                g += len(rest)
        self._plans = {key: plans}
        return plans

    def _read_segment(self, seg: _Segment, start: int) -> Iterator[Any]:
        """Raw samples (or holes) of kept samples ``start..kept-1`` of one segment; returns the extras counted.

        Extras are samples past the shard's count (an index that under-counts it); a shard counted 0 is still
        read for them. A remote stream that breaks is opened again (``retries`` times, with backoff) and read on
        from the sample where it broke; after the last attempt its undelivered samples become holes.
        """
        i, indices, extra = seg
        url, kept = self.shards[i], len(indices)
        if kept <= start and self.counts[i] > 0:
            return 0
        if isinstance(indices, range):
            rank_of = lambda j: indices.index(j) if j in indices else None  # noqa: E731 - O(1) on a range
        else:
            table = {j: k for k, j in enumerate(indices)}
            rank_of = table.get
        produced, failed, total, extras = 0, False, self.counts[i], 0
        remote, attempt, j_next = is_url(url), 0, 0
        while True:
            try:
                for j, raw in enumerate(iter_tar(url, skip=j_next), start=j_next):
                    j_next = j + 1
                    if j >= total:
                        if extra is None or (j - extra[0]) % extra[1]:
                            continue
                        # Past the index's count: no position to give it without shifting every later one (and
                        # breaking exact resume), so it is counted as lost. Each extra belongs to one consumer.
                        self._error(
                            DataError(
                                "unindexed_sample",
                                f"sample #{j} is past the {total} samples its index lists; rebuild the index (write "
                                "the shards again, or delete the index json so the shards are counted by scanning)",
                                raw.get("__key__", ""),
                                url,
                            )
                        )
                        extras += 1
                        continue
                    k = rank_of(j)
                    if k is None:
                        continue
                    produced = k + 1
                    if k >= start:
                        yield raw
                if remote and produced < kept and attempt < self.retries:
                    # A stream that ends early without an error (a connection closed between members): retry.
                    raise EOFError(f"the stream ended after {j_next} of {total} samples")
                break
            except DataError:
                raise  # the policy's own verdict (under "raise") on a sample, not a broken stream
            except (tarfile.TarError, OSError, EOFError, ValueError) as e:
                if remote and attempt < self.retries:
                    attempt += 1
                    self._retry(url, attempt, f"{type(e).__name__}: {e}", f"resuming at sample #{j_next}")
                    continue
                failed = True
                lost = "unreadable_shard"
                if remote:
                    lost = "network_error"
                elif "end of" in str(e) or isinstance(e, EOFError):
                    lost = "truncated_shard"
                tries = f" after {attempt + 1} attempts" if remote else ""
                self._error(DataError(lost, f"{type(e).__name__}: {e}{tries}; {produced} kept samples read", url=url))
                break
        if not failed and produced < kept:
            # tarfile's stream mode ends quietly when a header is cut off: the index count tells us.
            self._error(DataError("truncated_shard", f"ended after {produced} of {kept} kept samples", url=url))
        for k in range(max(produced, start), kept):  # positions the shard failed to deliver
            yield _Hole(url, f"#{indices[k]}")
        return extras

    def _source(self, epoch: int, c: int, n: int, start: int) -> Iterator[Any]:
        """Raw samples of consumer ``c`` from position ``start`` on (earlier shards skipped by count)."""
        pos = 0
        for seg in self._segments(epoch, c, n):
            kept = len(seg.indices)
            if self.counts[seg.shard] == 0:
                if pos >= start:  # reported once per pass, not again when a resumed stream skips past it
                    err = self._unreadable.get(seg.shard)
                    if err is None:
                        # Read it anyway: an index that lists no samples for a shard that has some is the
                        # extreme under-count, and those samples are counted as unindexed, not as nothing.
                        if (yield from self._read_segment(seg, 0)):
                            continue
                        err = DataError("empty_shard", "the shard has no samples", url=self.shards[seg.shard])
                    self._error(err)
                continue
            if pos + kept <= start:  # whole segment already consumed: skip it without opening the file
                pos += kept
                continue
            yield from self._read_segment(seg, max(0, start - pos))
            pos += kept

    def _buffer_rng(self, epoch: int, c: int, n: int) -> random.Random:
        salt = [self._base_id] if self._base_id and epoch == self._base_epoch else []
        return self._rng("buffer", epoch, c, n, *salt)

    def _replay(self, epoch: int, c: int, n: int, skip: int) -> tuple[list[int], int, list[int], random.Random]:
        """The buffer run on integer positions (no I/O) for ``skip`` outputs of consumer ``c``:
        ``(source positions emitted, next source position, buffer contents, the buffer's RNG after them)``."""
        rng = self._buffer_rng(epoch, c, n)
        if self.shuffle_buffer <= 0:
            return list(range(skip)), skip, [], rng
        infinite = self.resampled or self.epoch_length > 0
        total = None if infinite else self.consumer_length(epoch, c, n)
        sim_src = _Counted(itertools.count() if total is None else iter(range(total)))
        buf: list = []
        emitted = list(itertools.islice(_shuffle(sim_src, self.shuffle_buffer, rng, buf), skip))
        return emitted, sim_src.n, buf, rng

    def _outputs(self, epoch: int, c: int, n: int, skip: int, quota: int | None) -> Iterator[tuple[int, Any]]:
        """``(position after this output, raw)`` from position ``skip`` on, at most ``quota`` positions."""
        size = self.shuffle_buffer
        if size <= 0:
            live: Iterator = self._source(epoch, c, n, skip)
        else:
            buf: list = []
            # Replay the buffer on integer positions (no I/O), then fetch what it holds.
            _, next_pos, slots, rng = self._replay(epoch, c, n, skip)
            if skip > 0:
                lo = min([next_pos, *slots])
                src = self._source(epoch, c, n, lo)
                wanted, got = set(slots), {}
                for p in range(lo, next_pos):
                    raw = next(src)
                    if p in wanted:
                        got[p] = raw
                buf = [got[p] for p in slots]
            else:
                src = self._source(epoch, c, n, 0)
            live = _shuffle(src, size, rng, buf)
        pos = skip
        while quota is None or pos < quota:
            raw = next(live, None)
            if raw is None:
                return
            pos += 1
            yield pos, raw

    # -- errors and decoding ---------------------------------------------------------------------
    def _error(self, err: DataError) -> None:
        if self.on_error == "raise":
            raise err
        self.stats[err.reason] += 1
        self.skipped.append((err.reason, err.key, err.url))
        k = self.stats[err.reason]
        if k <= self.log_limit or k % 1000 == 0:
            more = " (further ones logged every 1000th)" if k == self.log_limit else ""
            logger.warning("skipped [%s #%d]: %s%s", err.reason, k, err, more)

    def _decode(self, raw: Any) -> dict | None:
        if isinstance(raw, _Hole):
            self._error(DataError("missing_sample", "lost with its shard", raw.key, raw.url))
            return None
        try:
            url = raw.get("__url__", "")
            if "__bad__" in raw:
                raise DataError(raw["__bad__"], "malformed tar members", raw.get("__key__", ""), url)
            required = self.required if self._explicit_required else self._shard_required.get(url, self.required)
            return decode_sample(
                raw, image_mode=self.image_mode, required=required, codes_shape=self._codes_shape.get(url)
            )
        except DataError as e:
            self._error(e)
            return None

    # -- iteration -------------------------------------------------------------------------------
    def worker_identity(self) -> tuple[int, int]:
        """``(logical worker, num_workers)`` of the calling process."""
        info = get_worker_info()
        nw, phys = (info.num_workers, info.id) if info is not None else (1, 0)
        return (phys + self._rotation) % nw, nw

    def __iter__(self) -> Iterator[dict[str, Any]]:
        logical, nw = self.worker_identity()
        c, n = self.rank * nw + logical, self.world_size * nw
        skip = self._skip.get(logical, 0)
        epoch = self.epoch
        self.position = skip
        for pos, raw in self._outputs(epoch, c, n, skip, self.quota(logical, nw)):
            self.position = pos
            sample = self._decode(raw)
            if sample is None:
                continue
            if self.transform is not None:
                sample["__seed__"] = int(self._rng("aug", epoch, c, n, pos).getrandbits(63))
                try:
                    sample = self.transform(sample)
                except DataError as e:
                    self._error(e)
                    continue
                sample.pop("__seed__", None)
                sample.pop("__rng__", None)
            self.current = (raw["__key__"], raw["__url__"])
            yield sample

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning (direct iteration; ShardLoader manages its own)."""
        self.epoch, self._skip = int(epoch), {}

    def state_dict(self) -> dict[str, Any]:
        """Position of direct, in-process iteration (for DataLoader workers use ShardLoader); same fields as
        :meth:`ShardLoader.state_dict <mmtok.data.loader.ShardLoader.state_dict>`, so either restores the other."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "positions": {"0": self.position},
            "num_workers": 0,
            "rank": self.rank,
            "world_size": self.world_size,
            "base": self.base_state(self.epoch),
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Continue a saved run here, in its own consumer layout or another (see :meth:`resume_plan`)."""
        plan = self.resume_plan(state, num_workers=0)
        self.epoch, self._skip = plan["epoch"], dict(plan["positions"])
        self.position = self._skip.get(0, 0)
        self.set_base(plan["base"], plan["epoch"])

    # -- resuming in another consumer layout -------------------------------------------------------
    def set_base(self, base: dict[str, Any] | None, epoch: int) -> None:
        """Make ``epoch``'s streams those of a resume into a new layout (``base`` from :meth:`resume_plan`)."""
        self._base = self._length = None
        self._base_epoch, self._base_id, self._plans = -1, "", {}
        if not base:
            return
        if "delivered" in base:
            self._base = {int(i): _unranges(r) for i, r in base["delivered"].items()}
        else:
            self._length = int(base["length"])
        self._base_epoch = int(epoch)
        self._base_id = hashlib.sha1(json.dumps(base, sort_keys=True).encode()).hexdigest()[:12]

    def base_state(self, epoch: int) -> dict[str, Any] | None:
        """The base of ``epoch``'s streams in saved form (None for the plain stream)."""
        if epoch != self._base_epoch:
            return None
        if self._base is not None:
            return {"delivered": {str(i): _ranges(v) for i, v in sorted(self._base.items())}}
        return {"length": self._length} if self._length is not None else None

    def delivered(self, states: list[dict[str, Any]]) -> dict[str, Any]:
        """What every consumer of a saved run delivered in its epoch, with no trace of the consumer layout.

        Args:
            states: Saved states of *all* ranks of one run (``ShardLoader.state_dict()`` or
                :meth:`state_dict` of each; any order).

        Returns:
            ``{"epoch", "fingerprint", "delivered": {shard index: [[start, stop), ...]]}, "repeat_bound"}`` for a
            one-pass epoch: the samples handed out so far (emitted by a shuffle buffer, not just read into it),
            exactly. In ``resampled`` / ``epoch_length`` mode samples repeat within an epoch anyway and which ones
            were drawn is not tracked: ``"remaining"`` positions of the epoch over all ranks replace
            ``"delivered"``, and ``repeat_bound`` (the positions already delivered) bounds how many samples of the
            epoch the continued streams may deliver a second time. A rank that had already moved on to the next
            epoch counts as done with this one; what it delivered of the next adds to ``repeat_bound``.

        Raises:
            ValueError: states of other shards or settings, or not one state per rank.
        """
        if not states:
            raise ValueError("no saved data states given: pass the state of every rank of the saved run")
        world = int(states[0].get("world_size", 1))
        nw = max(1, int(states[0].get("num_workers", 0)))
        ranks = sorted(int(st.get("rank", 0)) for st in states)
        if ranks != list(range(world)) or any(
            int(st.get("world_size", 1)) != world or max(1, int(st.get("num_workers", 0))) != nw for st in states
        ):
            raise ValueError(
                f"the saved data states are not one per rank of one run (ranks {ranks}, world size {world}): pass "
                "the state of every rank, e.g. [r['data'] for r in checkpoint_state['ranks']]"
            )
        for st in states:
            if st.get("fingerprint") != self.fingerprint:
                raise ValueError(
                    "cannot resume the data stream: the shards, sample counts, seed or shuffle settings differ "
                    "from the saved run (fingerprint mismatch)"
                )
        epoch = min(int(st["epoch"]) for st in states)
        n = world * nw
        saved = (self._base, self._length, self._base_epoch, self._base_id, self._plans, self.epoch)
        delivered: dict[int, set[int]] = collections.defaultdict(set)
        done_positions, repeat, remaining = 0, 0, 0
        try:
            bases = {json.dumps(st.get("base"), sort_keys=True) for st in states if int(st["epoch"]) == epoch}
            if len(bases) > 1:
                raise ValueError("the saved ranks resumed from different data states; they cannot be combined")
            self.set_base(json.loads(bases.pop()), epoch)
            self.epoch = epoch
            for i, done in (self._base or {}).items():  # delivered before the saved run's own resume
                delivered[i].update(done)
            for st in states:
                rank = int(st.get("rank", 0))
                positions = {int(k): int(v) for k, v in st.get("positions", {}).items()}
                if not positions and "position" in st:  # ShardDataset.state_dict before positions were shared
                    positions = {0: int(st["position"])}
                behind = int(st["epoch"]) == epoch
                if not behind:
                    repeat += sum(positions.values())  # its progress into a later epoch is not kept
                for w in range(nw):
                    c = rank * nw + w
                    if self.resampled or self.epoch_length > 0:
                        quota = self.quota(w, nw) or 0
                        pos = min(positions.get(w, 0), quota) if behind else quota
                        done_positions += pos
                        remaining += quota - pos
                        continue
                    segs = list(self._segments(epoch, c, n, passes=1))
                    pos = positions.get(w, 0) if behind else sum(len(g.indices) for g in segs)
                    starts = list(itertools.accumulate((len(g.indices) for g in segs), initial=0))
                    for p in self._replay(epoch, c, n, pos)[0]:
                        k = bisect.bisect_right(starts, p) - 1
                        delivered[segs[k].shard].add(segs[k].indices[p - starts[k]])
        finally:
            self._base, self._length, self._base_epoch, self._base_id, self._plans, self.epoch = saved
        out: dict[str, Any] = {"epoch": epoch, "fingerprint": self.fingerprint}
        if self.resampled or self.epoch_length > 0:
            out.update(remaining=remaining, repeat_bound=repeat + done_positions)
        else:
            out.update(delivered={str(i): _ranges(v) for i, v in sorted(delivered.items())}, repeat_bound=repeat)
        return out

    def resume_plan(self, state: dict[str, Any] | list[dict[str, Any]], num_workers: int) -> dict[str, Any]:
        """How this process continues a saved run: ``{"epoch", "positions", "next_worker", "base", "exact", "saved"}``.

        ``state`` is this rank's saved state, the list of every rank's states, or the layout-free description
        from :meth:`delivered`. In the saved layout (same world size and consumers per rank, as 0 and 1 worker
        are) this rank's positions are restored exactly (``exact``; ``saved`` is its state). In another layout the
        rest of the epoch is re-split over the new consumers (:meth:`_resplit`): each sample not yet delivered is
        delivered once, by one consumer. In ``resampled`` / ``epoch_length`` mode the new streams instead share the
        remaining positions; the bound on repeats is logged (see :meth:`delivered`).

        Raises:
            ValueError: another run's state, or one rank's state of a multi-rank run when the layout changed.
        """
        nw = max(1, int(num_workers))
        if isinstance(state, dict) and ("delivered" in state or "remaining" in state):
            total = state
        else:
            states = state if isinstance(state, list) else [state]
            same_layout = all(
                int(st.get("world_size", 1)) == self.world_size and max(1, int(st.get("num_workers", 0))) == nw
                for st in states
            )
            mine = [st for st in states if int(st.get("rank", 0)) == self.rank]
            if same_layout and mine:
                st = mine[0]
                if st.get("fingerprint") != self.fingerprint:
                    raise ValueError(
                        "cannot resume the data stream: the shards, sample counts, seed or shuffle settings differ "
                        "from the saved run (fingerprint mismatch)"
                    )
                positions = {int(k): int(v) for k, v in st.get("positions", {}).items()}
                if not positions and "position" in st:  # a state written before positions were shared
                    positions = {0: int(st["position"])}
                return {
                    "epoch": int(st["epoch"]),
                    "positions": positions,
                    "next_worker": int(st.get("next_worker", 0)),
                    "base": st.get("base"),
                    "exact": True,
                    "saved": st,
                }
            if not isinstance(state, list) and int(state.get("world_size", 1)) > 1:
                raise ValueError(
                    f"cannot resume the data stream of rank {states[0].get('rank')} of "
                    f"{states[0].get('world_size')} processes in a layout of {self.world_size} x {nw} consumers "
                    "from its own state alone: pass the states of every saved rank (a list) to re-split the rest "
                    "of the epoch"
                )
            total = self.delivered(states)
        if total.get("fingerprint", self.fingerprint) != self.fingerprint:
            raise ValueError("the saved data state belongs to other shards or settings (fingerprint differs)")
        epoch = int(total["epoch"])
        if "delivered" in total:
            base = {"delivered": total["delivered"]}
            done = sum(b - a for r in total["delivered"].values() for a, b in r)
            how = f"{done} samples delivered, the rest re-split"
        else:
            share = int(total["remaining"]) // self.world_size
            base = {"length": share + (1 if self.rank < int(total["remaining"]) % self.world_size else 0)}
            how = f"{total['remaining']} positions left, shared"
        if total.get("repeat_bound"):
            logger.warning(
                "data resume in another layout: up to %d samples of epoch %d may be delivered a second time "
                "(resampled/epoch_length streams, or a rank already in the next epoch)",
                total["repeat_bound"],
                epoch,
            )
        if self.rank == 0:
            logger.info(
                "data stream resumed in a new layout (%d process(es) x %d consumer(s) each): epoch %d, %s",
                self.world_size,
                nw,
                epoch,
                how,
            )
        return {"epoch": epoch, "positions": {}, "next_worker": 0, "base": base, "exact": False, "saved": None}

    def __repr__(self) -> str:
        return (
            f"ShardDataset({self.pattern!r}, shards={len(self.shards)}, samples={sum(self.counts)}, "
            f"shuffle_buffer={self.shuffle_buffer}, resampled={self.resampled}, epoch_length={self.epoch_length})"
        )
