"""Config schema of the data pipeline (the ``data:`` block of a run config)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    """Where training/validation samples come from and how they are read.

    Shard patterns use brace expansion (``data/fmnist/train-{000000..000009}.tar``) or globs; several
    patterns are joined with ``::``.
    """

    train: str = ""  # shard pattern of the training stream
    val: str = ""  # shard pattern of the evaluation set ("" = no evaluation)
    batch_size: int = 32  # per process, per micro-step
    num_workers: int = 0  # DataLoader workers per process
    shuffle_buffer: int = 1000  # samples held for shuffling (0 = no shuffle)
    resampled: bool = False  # draw shards with replacement forever (set epoch_length)
    # Samples per epoch and process: required when resampled; otherwise the shards repeat until it is
    # reached (equal batch counts on every rank). 0 = one pass over this consumer's shards.
    epoch_length: int = 0
    on_error: str = "skip"  # "skip" (drop, count and log the key) or "raise"
    image_size: int = 0  # resize images to this square size (0 = keep)
    image_mode: str = "keep"  # "keep" (grey stays 1 channel), "RGB" or "L"
    drop_last: bool = False  # drop each worker's last partial batch of a training epoch
    required: str = ""  # members every sample must have, e.g. "png,mask.png" ("" = the index's fields)
