"""mmtok's data layer: WebDataset shard writing and reading, decoding with an error policy, transforms,
per-node/per-worker splitting, exactly resumable loaders, and the built-in sources.

Public API (imported lazily, so ``import mmtok.data`` stays cheap)::

    write_shards(samples, out_dir, prefix="shard", maxcount=1000, maxsize=256 << 20) -> list[str]
    ShardDataset(pattern, *, transform=None, shuffle_buffer=0, seed=0, resampled=False, epoch_length=0,
                 on_error="skip", rank=0, world_size=1)          # IterableDataset of decoded samples
    build_loader(data_cfg, split, *, transform, collate, rank, world_size, seed) -> ShardLoader
    DataConfig, DataError, ShardPatternError
"""

from __future__ import annotations

from mmtok.data.config import DataConfig
from mmtok.lazy import lazy_exports

_LAZY = {
    "write_shards": "mmtok.data.writer",
    "encode_image": "mmtok.data.writer",
    "brace_pattern": "mmtok.data.writer",
    "ShardDataset": "mmtok.data.reader",
    "open_shard": "mmtok.data.reader",
    "expand_pattern": "mmtok.data.reader",
    "read_index": "mmtok.data.reader",
    "DataError": "mmtok.data.decode",
    "ShardPatternError": "mmtok.data.decode",
    "decode_sample": "mmtok.data.decode",
    "build_loader": "mmtok.data.loader",
    "ShardLoader": "mmtok.data.loader",
    "delivered_state": "mmtok.data.loader",
    "default_collate": "mmtok.data.loader",
}

__all__ = ["DataConfig", *_LAZY]
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
