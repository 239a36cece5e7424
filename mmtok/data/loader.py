"""A batch loader over :class:`ShardDataset` whose position can be saved and restored exactly.

Why per-worker positions are an exact global position: with an ``IterableDataset`` each DataLoader worker
builds whole batches from its own stream, and torch hands batches out round-robin over the workers
(``in_order=True``; a worker that runs dry is dropped from the cycle). So the loader's output is the
round-robin merge of the workers' batch streams, and it is fully described by (a) how many samples each
worker's consumed batches covered and (b) which worker is next in the cycle. Every batch carries its
worker id and position (batches are made in the worker, see ``_Batches``); the loader records them as
batches are *handed out* (batches prefetched but not consumed do not count). Each worker ends with a
batch-less report of its final position and skip counts.
To resume, each worker skips its consumed positions (cheaply, see :mod:`mmtok.data.reader`) and the
worker ids are rotated so that physical worker 0, which torch asks first, plays the worker that was
next. The remaining batches then equal those of an uninterrupted run (tested with 0 and 2 workers,
shuffle on, resampled on and off).

Resuming in another layout (world size x workers): a position only has a meaning in its own layout, so the
states of *all* saved ranks are combined into what was delivered (``ShardDataset.delivered``: per shard, the
sample indices handed out; layout-free, see :func:`delivered_state`), and the rest of the epoch is re-split over
the new consumers: every sample not yet delivered is delivered exactly once (tested 2 -> 1 and 1 -> 2 processes,
2 -> 0 workers). ``load_state_dict`` takes this rank's state, the list of every rank's, or that description;
the saved layout (0 and 1 worker count as the same) resumes exactly as before. Resampled and ``epoch_length``
streams repeat samples within an epoch by design; there the new streams share the epoch's remaining positions and
the number of samples that may repeat is logged. Shards and settings must match (checked); transforms that draw
from the global RNG instead of :func:`mmtok.data.transforms.sample_generator` are not replayed exactly.

A batch that cannot be collated because its samples differ (a tensor of another shape, a field the others
lack) must not end an epoch under ``on_error="skip"``: the samples outside the batch's most common signature
(fields, tensor shapes and dtypes; ties go to the earliest sample) are dropped and counted as
``collate_mismatch`` with their keys, and the batch is refilled from the stream. Under ``"raise"`` the first
odd sample raises :class:`~mmtok.data.decode.DataError`. A collate failure among samples that all look alike
is a bug in the collate function and propagates. The reader catches most such samples earlier (see
:mod:`mmtok.data.reader`); this covers shards without an index and what transforms produce.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.data import default_collate as torch_default_collate

from mmtok.data.config import DataConfig
from mmtok.data.decode import DataError
from mmtok.data.reader import ShardDataset

logger = logging.getLogger(__name__)

STATE_VERSION = 2  # 2: adds the base of a resume in another layout; 1 still loads


def default_collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors and numbers; keep other values (json dicts, keys, text) as lists."""
    out: dict[str, Any] = {}
    for k in samples[0]:
        vals = [s[k] for s in samples]
        if isinstance(vals[0], (torch.Tensor, int, float)) and not isinstance(vals[0], bool):
            out[k] = torch_default_collate(vals)
        else:
            out[k] = vals
    return out


def _passthrough(item: Any) -> Any:
    return item


def _signature(sample: Any) -> tuple:
    """What must agree between samples for them to stack: field names, tensor shapes and dtypes."""
    if not isinstance(sample, dict):
        return (type(sample).__name__,)
    return tuple(sorted((k, tuple(v.shape), str(v.dtype)) if torch.is_tensor(v) else (k,) for k, v in sample.items()))


def _describe(sig: tuple, usual: tuple) -> str:
    mine, theirs = {s[0]: s[1:] for s in sig}, {s[0]: s[1:] for s in usual}
    parts = [f"lacks {k!r}" for k in theirs if k not in mine] + [f"has extra {k!r}" for k in mine if k not in theirs]
    parts += [
        f"{k!r} is {mine[k]} where the batch has {theirs[k]}" for k in mine if k in theirs and mine[k] != theirs[k]
    ]
    return "; ".join(parts) or "differs from the rest of its batch"


class _Batches(IterableDataset):
    """Runs in each worker: batches its samples, tags each batch with ``(worker, position, stats)``.

    After the last batch it sends one ``(None, meta)`` item, so the main process learns the worker's final
    position and skip counts even when the samples after its last batch were all skipped or dropped.
    """

    def __init__(self, dataset: ShardDataset, batch_size: int, collate: Callable[[list], Any], drop_last: bool):
        self.dataset, self.batch_size, self.collate, self.drop_last = dataset, batch_size, collate, drop_last

    def _meta(self) -> dict[str, Any]:
        ds = self.dataset
        return {"worker": ds.worker_identity()[0], "pos": ds.position, "stats": dict(ds.stats)}

    def _collate(self, chunk: list, where: list[tuple[str, str]]) -> Any:
        """Collate ``chunk``; if it fails, drop (in place) and count the odd samples and return None.

        Raises:
            DataError: under ``on_error="raise"``, for the first odd sample.
            Exception: the collate error itself when no sample stands out (then the collate function is at fault).
        """
        try:
            return self.collate(chunk)
        except Exception as e:  # noqa: BLE001 - any collate failure is examined; re-raised if no sample is odd
            sigs = [_signature(s) for s in chunk]
            counts = collections.Counter(sigs)
            usual = max(counts, key=lambda g: (counts[g], -sigs.index(g)))  # most common; ties: the earliest
            odd = [i for i, g in enumerate(sigs) if g != usual]
            if not odd:
                raise
            for i in odd:
                key, url = where[i]
                msg = f"cannot be batched with the others ({_describe(sigs[i], usual)}); {type(e).__name__}: {e}"
                self.dataset._error(DataError("collate_mismatch", msg, key, url))
            for i in reversed(odd):
                del chunk[i], where[i]
            return None

    def __iter__(self) -> Iterator[tuple[Any, dict[str, Any]]]:
        chunk: list = []
        where: list[tuple[str, str]] = []  # (key, shard) of each sample in chunk, for error messages
        for sample in self.dataset:
            chunk.append(sample)
            where.append(self.dataset.current)
            if len(chunk) == self.batch_size:
                batch = self._collate(chunk, where)
                if batch is None:  # odd samples dropped: refill from the stream
                    continue
                yield batch, self._meta()
                chunk, where = [], []
        while chunk and not self.drop_last:
            batch = self._collate(chunk, where)
            if batch is not None:
                yield batch, self._meta()
                break
        yield None, self._meta()


class ShardLoader:
    """Iterable of collated batches with ``state_dict`` / ``load_state_dict`` / ``set_epoch``.

    Each ``iter()`` runs the rest of the current epoch (from the restored position, if any); when it
    finishes, the loader moves to the next epoch by itself, so ``for epoch ...: for batch in loader`` and
    ``loader.set_epoch(e)`` before each pass both work.

    Args:
        dataset: The sample stream.
        batch_size: Samples per batch (per worker: batches never mix workers).
        collate: ``list[sample] -> batch`` (default: stack tensors and numbers, keep the rest as lists).
        num_workers: DataLoader worker processes (0 = in this process).
        drop_last: Drop each worker's last partial batch of an epoch.
        pin_memory, prefetch_factor: As for ``torch.utils.data.DataLoader``.
    """

    def __init__(
        self,
        dataset: ShardDataset,
        batch_size: int,
        *,
        collate: Callable[[list], Any] | None = None,
        num_workers: int = 0,
        drop_last: bool = False,
        pin_memory: bool = False,
        prefetch_factor: int = 2,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset, self.batch_size = dataset, batch_size
        self.collate = collate or default_collate
        self.num_workers, self.drop_last = max(0, int(num_workers)), drop_last
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.epoch = 0
        self.batches = 0  # handed out in this epoch
        self._positions: dict[int, int] = {}
        self._next_worker = 0
        self._worker_stats: dict[int, dict[str, int]] = {}
        self._base_stats: collections.Counter = collections.Counter()
        self._base: dict[str, Any] | None = None  # of self.epoch, after a resume in another layout

    @property
    def _nw(self) -> int:
        return max(1, self.num_workers)

    def set_epoch(self, epoch: int) -> None:
        """Switch to ``epoch`` from its start; a no-op when already in ``epoch`` (so resume is kept)."""
        epoch = int(epoch)
        if epoch != self.epoch:
            self.epoch, self.batches, self._positions, self._next_worker = epoch, 0, {}, 0
            self._base = None

    def __iter__(self) -> Iterator[Any]:
        ds = self.dataset
        ds.epoch, ds._skip, ds._rotation = self.epoch, dict(self._positions), self._next_worker
        ds.set_base(self._base, self.epoch)
        # Fold the last pass's counts into the base; workers start counting from zero again.
        self._base_stats.update(self.stats_since_start())
        self._worker_stats, ds.stats = {}, collections.Counter()
        gen = torch.Generator().manual_seed(hash((ds.seed, self.epoch, self.batches)) & (2**62 - 1))
        loader = DataLoader(
            _Batches(ds, self.batch_size, self.collate, self.drop_last),
            batch_size=None,  # batches are made in the worker by _Batches
            collate_fn=_passthrough,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
            persistent_workers=False,  # each pass must see the positions and rotation set above
            in_order=True,  # the round-robin merge the exact position relies on
            generator=gen,  # fixed worker seeds for code that still uses the global RNG
        )
        for batch, meta in loader:
            w = meta["worker"]
            self._positions[w] = meta["pos"]
            self._worker_stats[w] = meta["stats"]
            if batch is None:  # the worker's end-of-stream report (no batch to hand out)
                continue
            self._next_worker = (w + 1) % self._nw
            self.batches += 1
            yield batch
        self.epoch, self.batches, self._positions, self._next_worker = self.epoch + 1, 0, {}, 0
        self._base = None

    def stats_since_start(self) -> collections.Counter:
        total: collections.Counter = collections.Counter()
        for s in self._worker_stats.values():
            total.update(s)
        return total

    @property
    def stats(self) -> dict[str, int]:
        """Skipped samples by reason over this loader's life (and the run it resumed), summed over workers.

        Worker counts arrive with their batches, so skips after a worker's last handed-out batch show up
        with its next one.
        """
        return dict(self._base_stats + self.stats_since_start())

    def __len__(self) -> int:
        """Batches per epoch of this process (an upper bound when samples are skipped for errors)."""
        ds, nw = self.dataset, self._nw
        ds.epoch = self.epoch
        ds.set_base(self._base, self.epoch)
        total = 0
        for w in range(nw):
            q = ds.quota(w, nw)
            if q is None:
                q = ds.consumer_length(self.epoch, ds.rank * nw + w, ds.world_size * nw)
            total += q // self.batch_size if self.drop_last else -(-q // self.batch_size)
        return total

    def state_dict(self) -> dict[str, Any]:
        """The exact stream position (plain ints and strings; JSON-serialisable)."""
        ds = self.dataset
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "batches": self.batches,
            "positions": {str(k): v for k, v in sorted(self._positions.items())},
            "next_worker": self._next_worker,
            "num_workers": self.num_workers,
            "rank": ds.rank,
            "world_size": ds.world_size,
            "fingerprint": ds.fingerprint,
            "base": self._base,
            "stats": self.stats,
        }

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Continue a saved stream: this rank's state, every rank's (a list), or :func:`delivered_state`'s.

        In the saved layout the position is restored exactly; in another (world size, or workers per process)
        the rest of the epoch is re-split over this layout's consumers (see the module docstring).

        Raises:
            ValueError: other shards or settings (fingerprint), or one rank's state of a multi-rank run when the
                layout changed (pass all of them).
        """
        plan = self.dataset.resume_plan(state, self.num_workers)
        self.epoch, self._base = plan["epoch"], plan["base"]
        self._positions, self._next_worker = dict(plan["positions"]), plan["next_worker"]
        self._worker_stats = {}
        if plan["exact"]:
            self.batches = int(plan["saved"].get("batches", 0))
            self._base_stats = collections.Counter(plan["saved"].get("stats", {}))
        else:
            self.batches = 0
            # The saved run's skip counts travel once (with rank 0), so totals over ranks stay totals.
            saved = state if isinstance(state, list) else [state]
            self._base_stats = collections.Counter()
            if self.dataset.rank == 0:
                for st in saved:
                    self._base_stats.update(st.get("stats", {}))

    def load_state_dict_resplit(self, states: list[dict[str, Any]], *, rank: int, world_size: int) -> None:
        """:meth:`load_state_dict` from every saved rank's state, for this process as ``rank`` of ``world_size``
        (checked against the dataset's own split, so an engine that renumbered ranks finds out here).

        Raises:
            ValueError: ``rank``/``world_size`` differ from the dataset's, or as :meth:`load_state_dict`.
        """
        ds = self.dataset
        if (rank, world_size) != (ds.rank, ds.world_size):
            raise ValueError(
                f"this loader reads as rank {ds.rank} of {ds.world_size}, not {rank} of {world_size}: build it with "
                "the rank and world size of this run"
            )
        self.load_state_dict(list(states))


def delivered_state(dataset: ShardDataset, states: list[dict[str, Any]]) -> dict[str, Any]:
    """The layout-free description of what a saved run delivered in its epoch (``ShardDataset.delivered``).

    Any consumer layout restores from it with ``ShardLoader.load_state_dict``; it is what a checkpoint can store
    instead of per-rank positions when the next run's world size is not known.
    """
    return dataset.delivered(states)


def build_loader(
    data_cfg: DataConfig,
    split: str,
    *,
    transform: Callable[[dict], dict] | None = None,
    collate: Callable[[list], Any] | None = None,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    drop_last: bool | None = None,
) -> ShardLoader:
    """The loader of ``split`` ("train" or "val") described by the ``data:`` block of a run config.

    Train: shuffle buffer, resampling and ``epoch_length`` from the config. Val: stream order, one pass.
    ``data_cfg.image_size`` > 0 resizes images and masks before ``transform``.
    """
    from mmtok.data.transforms import Compose, Resize

    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    pattern = getattr(data_cfg, split)
    if not pattern:
        raise ValueError(
            f"data.{split} is empty: set it to a shard pattern such as data/fmnist/train-{{000000..000011}}.tar"
        )
    train = split == "train"
    tf = transform
    if data_cfg.image_size > 0:
        tf = Compose([Resize(data_cfg.image_size), transform])
    ds = ShardDataset(
        pattern,
        transform=tf,
        shuffle_buffer=data_cfg.shuffle_buffer if train else 0,
        seed=seed,
        resampled=data_cfg.resampled if train else False,
        epoch_length=data_cfg.epoch_length if train else 0,
        on_error=data_cfg.on_error,
        rank=rank,
        world_size=world_size,
        image_mode=getattr(data_cfg, "image_mode", "keep"),
        required=tuple(r.strip() for r in data_cfg.required.split(",") if r.strip()) or None,
        retries=getattr(data_cfg, "retries", 3),
        retry_backoff=getattr(data_cfg, "retry_backoff", 1.0),
    )
    return ShardLoader(
        ds,
        data_cfg.batch_size,
        collate=collate,
        num_workers=data_cfg.num_workers,
        drop_last=bool(getattr(data_cfg, "drop_last", False)) if drop_last is None else drop_last,
    )
