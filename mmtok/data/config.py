"""Config schema of the data pipeline (the ``data:`` block of a run config).

Values are checked when the dataclass is built (from YAML through :func:`mmtok.config.load_config` or
directly in Python), so a negative worker count or an unknown image mode fails before any run folder,
process group or model exists, with the same one-line :class:`~mmtok.config.ConfigError` either way.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmtok.config import ConfigError

ON_ERROR = ("skip", "raise")
IMAGE_MODES = ("keep", "RGB", "L")


@dataclass
class DataConfig:
    """Where training/validation samples come from and how they are read.

    Shard patterns use brace expansion (``data/fmnist/train-{000000..000009}.tar``) or globs; several
    patterns are joined with ``::``. A pattern may be a URL webdataset's ``gopen`` opens
    (``pipe:aws s3 cp s3://bucket/train-{000000..000011}.tar -``, ``https://host/train-{000000..000011}.tar``,
    ``file:``), or the URL of the shards' index json.
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
    # Remote shards (pipe:, http(s):// URLs): times a broken stream is opened again before the rest of the shard
    # counts as lost (skip) or raises (raise), and the seconds before the first retry (doubled per retry).
    retries: int = 3
    retry_backoff: float = 1.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Reject values no loader can use.

        Raises:
            ConfigError: naming the key, the value and what is accepted.
        """
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {self.batch_size}")
        for key in ("num_workers", "shuffle_buffer", "epoch_length", "image_size", "retries", "retry_backoff"):
            value = getattr(self, key)
            if value < 0:
                raise ConfigError(f"data.{key} must be >= 0, got {value}")
        if self.on_error not in ON_ERROR:
            raise ConfigError(f"data.on_error must be 'skip' or 'raise', not {self.on_error!r}")
        if self.image_mode not in IMAGE_MODES:
            raise ConfigError(f"data.image_mode must be one of {', '.join(IMAGE_MODES)}, not {self.image_mode!r}")
