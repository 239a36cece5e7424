"""Run schema of the training engine: the ``optim:``, ``train:`` and ``deepspeed:`` blocks and the run config.

A run config has six entries::

    task:      {name: <registered task>, ...its config fields}
    data:      DataConfig      (mmtok/data/config.py)
    optim:     OptimConfig
    train:     TrainConfig
    deepspeed: DeepSpeedConfig
    output_dir: runs/<name>    (required: the run folder)

``load_run_config(["a.yaml", "b.yaml"], ["train.steps=10"])`` merges the files in order, then the
overrides (through the core's generic :func:`mmtok.config.load_config`), checks every key, type and
value, checks the task block against the task's own config class, and returns a :class:`RunConfig`.
Each block validates its values when it is built (``__post_init__``), so ``TrainConfig(steps=0)`` in
Python fails exactly as ``train.steps=0`` on the command line does. What depends on the machine rather
than on the config (is there a GPU, is the output path a folder, does the DeepSpeed JSON exist) is
checked by :func:`mmtok.train.engine.preflight` when a run starts, so a config written on one machine
still loads on another (``mmtok eval run``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmtok.config import ConfigError, load_config
from mmtok.data.config import DataConfig
from mmtok.registry import RegistryError

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant")
PRECISIONS = ("auto", "bf16", "fp32")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # sgd uses betas[0] as momentum
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    schedule: str = "cosine"  # cosine | constant (both after the linear warm-up)
    eps: float = 1e-8  # Adam epsilon

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Reject unknown optimizer/schedule names and impossible values (:class:`ConfigError`)."""
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"optim.name must be one of {', '.join(OPTIMIZERS)}, not {self.name!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule must be one of {', '.join(SCHEDULES)}, not {self.schedule!r}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ConfigError(f"optim.lr must be a finite number > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError("optim.warmup_steps must be >= 0 and optim.min_lr_ratio in [0, 1]")
        if len(self.betas) != 2:
            raise ConfigError(f"optim.betas needs two values, got {list(self.betas)}")


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps
    grad_accum: int = 1  # micro-batches per optimizer step
    grad_clip: float = 1.0  # max grad norm (0 = off)
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end (if data.val is set)
    ckpt_every: int = 0  # 0 = only at the end
    keep_last: int = 2  # checkpoints kept
    progress: bool = True  # tqdm on rank 0
    deterministic: bool = False  # torch.use_deterministic_algorithms (bitwise-reproducible on CPU)
    eval_batches: int = 0  # cap on validation batches per evaluation (0 = the whole val set)
    tensorboard: bool = True  # write TensorBoard scalars beside metrics.jsonl
    export: bool = True  # call task.export(output_dir/"export") at the end
    # Wall-clock budget of the run in seconds (0 = none). When the training loop has used it, the run
    # stops after the current step and ends as if it had reached train.steps: evaluation, checkpoint,
    # export, and stopped_by: max_seconds in run_summary.json. Time spent before a resume counts.
    max_seconds: float = 0.0
    # With a budget: the cosine follows max(step / steps, elapsed / max_seconds), so the rate reaches
    # its floor when the budget ends even if train.steps is never reached (warm-up stays in steps).
    # A resumed run then no longer repeats the uninterrupted one bit for bit.
    schedule_by_time: bool = False
    # With a budget: the fewest steps the run makes even when the budget runs out first (0 = none; at most
    # train.steps count). The budget then stops the run at this step, and under schedule_by_time the cosine
    # follows whichever of the clock and the step count towards this floor lags, so it anneals by the floor on
    # a slow host and by the budget on a fast one. For short runs (the quickstart) that must stay useful on a
    # slow or busy host: past a point a model made of too few steps is worth nothing, however little time it took.
    min_steps: int = 0
    # Append the __key__ of every training sample to output_dir/keys/rank-XXXXX.jsonl, one line per micro-batch
    # with its step and epoch: an audit of the data split over nodes, processes and workers, and across resumes
    # (data read from data.train; batches passed to train() from Python carry no keys).
    log_keys: bool = False
    # Exponential moving average of the weights (0 = off; e.g. 0.999 = a horizon of about 1,000 steps, with a
    # warm-up over the first updates): evaluation and the export use the average, checkpoints keep both
    # (mmtok/train/ema.py). Not with ZeRO-3.
    ema_decay: float = 0.0
    # Steps the recipe's published figures were made with (0 = none given). A run that a wall-clock budget ends
    # below 80% of them warns at its end (a slower host makes fewer steps in the same minutes, and some figures
    # fall off a cliff), and run_summary.json records both counts.
    reference_steps: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Reject values the engine cannot run with (:class:`ConfigError`)."""
        for key in ("steps", "grad_accum"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        if self.grad_clip < 0:
            raise ConfigError(f"train.grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        for key in (
            "log_every",
            "eval_every",
            "ckpt_every",
            "keep_last",
            "eval_batches",
            "reference_steps",
            "min_steps",
        ):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0, got {getattr(self, key)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if not _DEVICE.fullmatch(str(self.device)):
            raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N, not {self.device!r}")
        if not self.max_seconds >= 0 or not math.isfinite(self.max_seconds):
            raise ConfigError(f"train.max_seconds must be >= 0 (0 = no budget), got {self.max_seconds}")
        if not (0.0 <= self.ema_decay < 1.0):
            raise ConfigError(f"train.ema_decay must be in [0, 1) (0 = off), got {self.ema_decay}")
        if self.schedule_by_time and not self.max_seconds:
            raise ConfigError("train.schedule_by_time needs a budget: set train.max_seconds > 0")
        if self.min_steps and not self.max_seconds:
            raise ConfigError(
                "train.min_steps is a floor under a wall-clock budget: set train.max_seconds > 0, or train.steps "
                "alone to run a fixed number of steps"
            )


@dataclass
class DeepSpeedConfig:
    enabled: bool = False  # also switched on by launching under `deepspeed`
    config: str = ""  # path to a configs/ds/*.json file ("auto" values are resolved by mmtok)
    stage: int = -1  # override zero_optimization.stage (-1 = keep the file's)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Reject an impossible stage override (the JSON file itself is checked when a run starts)."""
        if self.stage not in (-1, 0, 1, 2, 3):
            raise ConfigError(f"deepspeed.stage must be 0-3 (or -1 = the file's), not {self.stage}")


@dataclass
class RunConfig:
    """Everything one ``mmtok train`` run needs (see the module docstring)."""

    task: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    # The run folder. No default: a run started from Python must say where it writes (``mmtok train``
    # falls back to runs/<task name> and says so).
    output_dir: str = ""

    def validate(self) -> None:
        """Check every block again (they may have been edited in place since they were built)."""
        for block in (self.data, self.optim, self.train, self.deepspeed):
            block.validate()

    def task_config(self) -> Any:
        """The task block validated against the task's registered config class."""
        from mmtok import registries

        spec = dict(self.task)
        name = spec.pop("name", None)
        if not name:
            raise ConfigError("the config has no task.name; set e.g. `task: {name: toy_classifier}`")
        try:
            return registries.get("task").build_config(name, **spec)
        except RegistryError as e:
            raise ConfigError(f"task block: {e}") from e


def load_run_config(
    files: Sequence[str | Path] = (), overrides: Sequence[str] = (), validate_task: bool = True
) -> RunConfig:
    """Merge YAML ``files`` then ``overrides`` (``a.b=value``) onto :class:`RunConfig` and validate.

    Raises:
        ConfigError: unknown key, wrong type or value, missing file, a file whose top level is not a
            mapping, bad override syntax, or (with ``validate_task``) a task block its task rejects.
    """
    cfg = load_config(RunConfig, files, overrides)
    if validate_task:
        cfg.task_config()
    return cfg
