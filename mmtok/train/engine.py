"""The training engine: one loop around a :class:`~mmtok.train.task.Task`, single process or distributed.

``train(cfg)`` builds the task from its registry entry, reads WebDataset shards through
:func:`mmtok.data.build_loader`, and runs ``train.steps`` optimizer steps of ``train.grad_accum``
micro-batches each. It never looks inside a batch or a model: the task returns ``{"loss": ...}``
and the engine minimises it, clips gradients, steps the warm-up + cosine schedule, logs, evaluates,
checkpoints and finally calls ``task.export``.

Back-ends (chosen from the config and the launcher's environment):

* one process: plain PyTorch (``TorchBackend``);
* ``torchrun`` with several processes: PyTorch DistributedDataParallel, gloo on CPU, NCCL on CUDA;
* ``deepspeed`` launcher, or ``deepspeed.enabled=true``: a DeepSpeed engine with ZeRO stage 1/2/3
  from ``deepspeed.config`` (``"auto"`` values resolved, the result written to ``ds_config.json``).

Wall-clock budget: with ``train.max_seconds``, the run stops after the step during which the budget ran
out and ends as a finished run does (evaluation, checkpoint, export); it logs the step reached against
the planned ``train.steps`` and writes ``run_summary.json`` with ``stopped_by: "max_seconds"`` (or
``"steps"``). The clock covers the training loop with its periodic evaluations and checkpoints, not the
final ones; time spent before a resume counts (it is saved in each checkpoint). A fresh run always takes
at least one step, and with ``train.min_steps`` at least that many (a floor for short runs on slow hosts; the
time schedule then anneals by whichever of the budget and the floor comes last). All ranks stop at the same
step and take the same rate (the clock is reduced over ranks).

Exact resume: a checkpoint holds the model, optimizer and scheduler states, every rank's RNG states
and data-stream position, and the step/epoch counters. On CPU in fp32 with
``train.deterministic=true``, a run killed and resumed ends bitwise equal to an uninterrupted one
(tested); DeepSpeed runs match within floating-point tolerance.

Another world size (``--resume auto`` after a job comes back with more or fewer processes): the engine reads
the saved world size and logs the change. Model, optimizer and schedule states of plain / DDP runs are full
copies and load as they are; ZeRO checkpoints are converted once by DeepSpeed's ``ds_to_universal`` and loaded
with ``checkpoint.load_universal`` (:func:`mmtok.train.checkpoint.ensure_universal`). The reader re-splits the
rest of the epoch over the new consumers (``ShardLoader.load_state_dict_resplit``); each rank takes the RNG
state of saved rank ``rank % saved_world_size``. Given the same samples per step, the resumed run ends within
floating-point tolerance of the uninterrupted one (tested 2 -> 1 and 1 -> 2 with DDP and ZeRO-2, 2 -> 1 with ZeRO-3).
``train.log_keys=true`` writes every rank's sample keys per micro-batch to ``keys/rank-XXXXX.jsonl``, which
is how the tests count that an epoch saw each sample once across nodes, workers and resumes.

Where this differs from the usual trainers (HF Trainer, LLaVA's scripts): the schedule is ours on
every back-end (a pure function of the step), evaluation runs with the RNG forked so that turning it
on or off does not change training, and nothing in a checkpoint is ever unpickled.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from mmtok.config import ConfigError, to_yaml
from mmtok.hub import CheckpointError
from mmtok.registry import RegistryError
from mmtok.train import checkpoint as ckpt
from mmtok.train import distributed as dist_utils
from mmtok.train.config import RunConfig
from mmtok.train.distributed import DistInfo, DistributedSetupError
from mmtok.train.ema import WeightEMA
from mmtok.train.metrics import MetricsWriter
from mmtok.train.optim import (
    build_optimizer,
    build_scheduler,
    load_scheduler_state,
    lr_factor,
    scheduler_state,
)

logger = logging.getLogger(__name__)


# -- helpers ---------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device) with the same value on every rank."""
    import random

    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def map_tensors(obj: Any, fn: Any) -> Any:
    """``fn`` applied to every tensor inside nested dicts/lists/tuples (other values untouched)."""
    if torch.is_tensor(obj):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


def to_device(obj: Any, device: torch.device) -> Any:
    """Move every tensor inside nested dicts/lists/tuples to ``device``."""
    return map_tensors(obj, lambda t: t.to(device, non_blocking=True))


def to_dtype(obj: Any, dtype: torch.dtype) -> Any:
    """Cast every floating-point tensor inside nested dicts/lists/tuples to ``dtype`` (others untouched)."""
    return map_tensors(obj, lambda t: t.to(dtype) if t.is_floating_point() else t)


def batch_size_of(batch: Any, default: int) -> int:
    """Leading dimension of the first tensor found in ``batch`` (for samples/s)."""
    if torch.is_tensor(batch):
        return int(batch.shape[0]) if batch.ndim else default
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for v in values:
        if torch.is_tensor(v) and v.ndim:
            return int(v.shape[0])
    return default


def merge_rank_metrics(gathered: list[tuple[dict[str, float], int]]) -> dict[str, float]:
    """One evaluation from every rank's ``(metrics, batches read)``: each key is the batch-weighted mean over the
    ranks that report it (gathered as objects, so ranks may differ in keys: one that read no batch reports none,
    and a task may leave out a metric its share of the data cannot define, e.g. no-target accuracy on a rank that
    saw no no-target sample; such a rank must not pull the mean towards 0)."""
    keys = sorted({k for m, _ in gathered for k in m})
    out = {}
    for k in keys:
        weight = sum(n for m, n in gathered if k in m)
        if weight:
            out[k] = sum(m[k] * n for m, n in gathered if k in m) / weight
        else:  # reported only by ranks that read no batch
            out[k] = sum(m[k] for m, _ in gathered if k in m) / sum(1 for m, _ in gathered if k in m)
    return out


def create_task(cfg: RunConfig) -> Any:
    """Build the task named in ``cfg.task`` through the task registry (unknown keys rejected)."""
    from mmtok import registries

    spec = dict(cfg.task)
    name = spec.pop("name", None)
    if not name:
        raise ConfigError("the config has no task.name; set e.g. `task: {name: toy_classifier}`")
    try:
        return registries.get("task").create(name, **spec)
    except RegistryError as e:
        raise ConfigError(f"task block: {e}") from e


def resolve_precision(precision: str, device: torch.device) -> bool:
    """True if bf16 autocast is used: ``auto`` means bf16 on CUDA and fp32 elsewhere."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"train.precision must be auto, bf16 or fp32, not {precision!r}")
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def environment_info(info: DistInfo, bf16: bool) -> dict[str, Any]:
    """Versions, git state and hardware, written to ``env.json`` in the run folder."""

    def version(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    src = Path(__file__).resolve().parents[2]
    git: dict[str, Any] = {"sha": None, "dirty": None}
    try:
        sha = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if sha.returncode == 0:
            git["sha"] = sha.stdout.strip()
            status = subprocess.run(
                ["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            git["dirty"] = bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):  # no git binary or not a checkout: record nothing
        pass
    return {
        "mmtok": version("mmtok"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "packages": {p: version(p) for p in ("torch", "deepspeed", "numpy", "webdataset", "timm", "transformers")},
        "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else [],
        "git": git,
        "argv": sys.argv,
        "world_size": info.world_size,
        "backend": "deepspeed" if info.deepspeed else "ddp" if info.ddp else "single",
        "device": str(info.device),
        "precision": "bf16" if bf16 else "fp32",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# -- back-ends -------------------------------------------------------------------------------------
class TorchBackend:
    """Plain PyTorch: one process, or DistributedDataParallel under torchrun."""

    name = "torch"

    def __init__(self, task: torch.nn.Module, cfg: RunConfig, info: DistInfo, bf16: bool):
        self.task = task
        self.info = info
        self.grad_accum = cfg.train.grad_accum
        self.grad_clip = cfg.train.grad_clip
        self.bf16 = bf16
        self.optimizer = build_optimizer(task.param_groups(cfg.optim.weight_decay), cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.steps)
        self.model: torch.nn.Module = task
        if info.ddp:
            from torch.nn.parallel import DistributedDataParallel

            ids = [info.device.index] if info.device.type == "cuda" else None
            self.model = DistributedDataParallel(task, device_ids=ids)

    def micro_step(self, batch: Any, last: bool) -> dict[str, Any]:
        """Forward + backward of one micro-batch; DDP syncs gradients only on the ``last`` one."""
        sync = contextlib.nullcontext() if last or not self.info.ddp else self.model.no_sync()
        with sync:
            with torch.autocast(self.info.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                out = self.model(batch)
            loss = _loss_of(out)
            # mean over the micro-batches of one step, like one big batch
            (loss / self.grad_accum).backward()
        return out

    def optimizer_step(self) -> float:
        """Clip, step, advance the schedule, clear gradients; returns the gradient norm before clipping."""
        grads = [p for p in self.task.parameters() if p.grad is not None]
        if self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(grads, self.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in grads]) if grads else torch.zeros(())
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def set_lr_factor(self, factor: float) -> None:
        """Rate of the next optimizer step = base rate x ``factor`` (``train.schedule_by_time``)."""
        _set_lr(self.optimizer, self.scheduler, factor)

    def save(self, root: Path, tmp: Path) -> dict[str, Any]:
        """Write model + optimizer into ``tmp`` (rank 0; DDP replicas are identical)."""
        if self.info.is_main:
            ckpt.save_model_state(self.task, tmp)
            ckpt.save_optimizer_state(self.optimizer, tmp)
        return {"scheduler": scheduler_state(self.scheduler)}

    def load(self, folder: Path, state: dict[str, Any]) -> None:
        if state.get("backend") == "deepspeed":
            raise CheckpointError(f"{folder} was written by a DeepSpeed run; resume it with DeepSpeed enabled")
        ckpt.load_model_state(self.task, folder)
        ckpt.load_optimizer_state(self.optimizer, folder)
        load_scheduler_state(self.scheduler, state["scheduler"])

    def gathered(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @property
    def zero3(self) -> bool:
        return False


class DeepSpeedBackend:
    """A DeepSpeed engine (ZeRO 0-3) around the task; DeepSpeed owns accumulation, clipping and stepping."""

    name = "deepspeed"

    def __init__(
        self,
        task: torch.nn.Module,
        cfg: RunConfig,
        info: DistInfo,
        bf16: bool,
        out_dir: Path,
        universal: Path | None = None,
    ):
        import warnings

        import deepspeed

        # DeepSpeed calls collectives torch has renamed; one warning per call site and rank is noise.
        warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)
        self.task = task
        self.info = info
        self.bf16 = bf16
        raw = dist_utils.load_ds_json(cfg.deepspeed.config)
        self.ds_config = dist_utils.resolve_ds_config(
            raw,
            micro_batch=cfg.data.batch_size,
            grad_accum=cfg.train.grad_accum,
            world_size=info.world_size,
            grad_clip=cfg.train.grad_clip,
            optim=cfg.optim,
            total_steps=cfg.train.steps,
            bf16=bf16,
            hidden_size=dist_utils.model_width(task),
            stage=cfg.deepspeed.stage,
        )
        # A checkpoint written by another number of processes is read from its universal form (one folder per
        # parameter holding the full fp32 weights and optimizer moments), which DeepSpeed must know at build time.
        self.universal = universal
        if universal is not None:
            self.ds_config.setdefault("checkpoint", {})["load_universal"] = True
        if info.is_main:
            from mmtok.hub import atomic_write_text

            atomic_write_text(out_dir / "ds_config.json", json.dumps(self.ds_config, indent=2) + "\n")
        groups = [g for g in task.param_groups(cfg.optim.weight_decay) if len(g["params"])]
        # Optimizer/scheduler: from the JSON if it names them, else ours (the same as single process).
        optimizer = None if "optimizer" in self.ds_config else build_optimizer(groups, cfg.optim)
        steps, optim_cfg = cfg.train.steps, cfg.optim
        scheduler = None if "scheduler" in self.ds_config else (lambda opt: build_scheduler(opt, optim_cfg, steps))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=task,
            model_parameters=groups if optimizer is None else None,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=self.ds_config,
            dist_init_required=False,
        )
        self.stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
        self.bf16_weights = bool(self.ds_config.get("bf16", {}).get("enabled"))  # the JSON chose DeepSpeed's bf16

    def micro_step(self, batch: Any, last: bool) -> dict[str, Any]:
        if self.bf16_weights:  # DeepSpeed's bf16 weights: inputs must be bf16 too
            batch = to_dtype(batch, torch.bfloat16)
        with torch.autocast(self.info.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.engine(batch)
        self.engine.backward(_loss_of(out))  # DeepSpeed divides by gradient_accumulation_steps itself
        self.engine.step()  # only steps the optimizer on accumulation boundaries
        return out

    def optimizer_step(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def set_lr_factor(self, factor: float) -> None:
        # Only with mmtok's own schedule (preflight refuses schedule_by_time beside a JSON scheduler).
        _set_lr(self.optimizer, self.scheduler, factor)

    def save(self, root: Path, tmp: Path) -> dict[str, Any]:
        # Collective: every rank writes its ZeRO partition into the same temporary tag folder.
        self.engine.save_checkpoint(str(root), tag=tmp.name, save_latest=False)
        # Plus the full weights as safetensors, so `mmtok eval run` and exports never need DeepSpeed's
        # pickled files (ZeRO-3 gathers the partitions for this; every rank takes part).
        with self.gathered():
            if self.info.is_main:
                ckpt.save_model_state(self.task, tmp)
        return {}

    def load(self, folder: Path, state: dict[str, Any]) -> None:
        if state.get("backend") != "deepspeed":
            raise CheckpointError(f"{folder} was written without DeepSpeed; resume it without DeepSpeed")
        # DeepSpeed reads <dir>/<tag>: the step folder itself, or its universal/ sub-folder.
        where = self.universal if self.universal is not None else folder
        groups = getattr(self.optimizer, "optimizer", self.optimizer).param_groups  # the wrapped torch optimizer's
        own = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in groups]
        path, _ = self.engine.load_checkpoint(
            str(where.parent), tag=where.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint in {folder}")
        if self.universal is not None:
            self._repair_universal_load(groups, own)

    def _repair_universal_load(self, groups: list[dict[str, Any]], own: list[dict[str, Any]]) -> None:
        """Undo two slips of DeepSpeed 0.19's ZeRO-3 universal load (both harmless for ZeRO-1/2's loader).

        It copies the first group's hyper-parameters into every group, so the no-decay group (biases, norms)
        would be decayed from then on: each group gets its own back (the rate is the same in every group: the
        schedule sets it from the step). And it gives every flat parameter group the *same* ``step`` tensor,
        which torch's Adam increments in place once per group, so the bias correction would advance twice per
        step: each state gets its own copy.
        """
        for group, values in zip(groups, own):
            group.update(values)
        state = getattr(self.optimizer, "optimizer", self.optimizer).state
        for per_param in state.values():
            if torch.is_tensor(per_param.get("step")):
                per_param["step"] = per_param["step"].clone()

    def gathered(self) -> contextlib.AbstractContextManager:
        """Full parameters on every rank (ZeRO-3 partitions them) for export."""
        if self.stage < 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.task.parameters()), modifier_rank=None)

    @property
    def zero3(self) -> bool:
        return self.stage == 3


def _set_lr(optimizer: Any, scheduler: Any, factor: float) -> None:
    """Override the scheduled rate for the next step; the LambdaLR's own step afterwards is overridden again."""
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * factor


def _loss_of(out: Any) -> torch.Tensor:
    if not isinstance(out, dict) or "loss" not in out:
        raise TypeError(f"a Task must return a dict with a 'loss' tensor, got {type(out).__name__}")
    loss = out["loss"]
    if not torch.is_tensor(loss) or loss.numel() != 1:
        raise TypeError("task output 'loss' must be a scalar tensor")
    return loss


# -- data ------------------------------------------------------------------------------------------
class _Stream:
    """Endless iteration over a re-iterable loader, advancing its epoch at every pass."""

    def __init__(self, loader: Iterable[Any], epoch: int = 0):
        self.loader = loader
        self.epoch = epoch
        self._it: Iterator[Any] | None = None

    def start(self) -> None:
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(self.epoch)
        self._it = iter(self.loader)

    def next(self) -> Any:
        assert self._it is not None, "call start() first"
        for _ in range(2):
            try:
                return next(self._it)
            except StopIteration:
                self.epoch += 1
                if hasattr(self.loader, "set_epoch"):
                    self.loader.set_epoch(self.epoch)
                self._it = iter(self.loader)
        raise ConfigError("the training data yields no batches; check data.train (pattern, batch_size, world size)")

    def state_dict(self) -> Any:
        return self.loader.state_dict() if hasattr(self.loader, "state_dict") else None


class KeyedBatch(NamedTuple):
    """A collated batch with the ``__key__`` of each of its samples (``train.log_keys``)."""

    batch: Any
    keys: list[Any]


class _KeepKey:
    """Wraps a sample transform so that the sample's ``__key__`` survives it (a class: workers pickle it)."""

    def __init__(self, transform: Any):
        self.transform = transform

    def __call__(self, sample: dict[str, Any]) -> Any:
        key = sample.get("__key__")
        out = sample if self.transform is None else self.transform(sample)
        if isinstance(out, dict):
            out["__key__"] = key
        return out


class _CollateWithKeys:
    """Collates samples without their keys (the task never sees them) and returns a :class:`KeyedBatch`."""

    def __init__(self, collate: Any):
        self.collate = collate

    def __call__(self, samples: list[dict[str, Any]]) -> KeyedBatch:
        keys = [s.get("__key__") for s in samples]
        return KeyedBatch(self.collate([{k: v for k, v in s.items() if k != "__key__"} for s in samples]), keys)


def _build_loader(cfg: RunConfig, split: str, task: Any, rank: int, world: int, keys: bool = False) -> Any:
    from mmtok.data import build_loader

    transform, collate = task.sample_transform(split), task.collate
    if keys:
        transform, collate = _KeepKey(transform), _CollateWithKeys(collate)
    return build_loader(
        cfg.data,
        split,
        transform=transform,
        collate=collate,
        rank=rank,
        world_size=world,
        seed=cfg.train.seed,
    )


# -- the loop --------------------------------------------------------------------------------------
def _check_output_dir(out: Path) -> None:
    """The run folder, or its nearest existing ancestor, must be a writable folder."""
    existing = out
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        what = "is a file" if existing == out else f"is below {existing}, which is a file"
        raise ConfigError(f"output_dir {out} {what}, not a folder; choose another output_dir")
    if existing.exists() and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir {out}: {existing} is not writable; choose another output_dir")


def preflight(cfg: RunConfig) -> None:
    """Check everything that can be checked before a run folder, process group or model exists.

    The config blocks validate their values when built; this checks them again (they may have been
    edited in place) and adds what depends on this machine: the output path, the device, and the
    DeepSpeed JSON (whenever ``deepspeed.config`` is set it must exist and parse, even with DeepSpeed
    off, so a typo is not silently ignored until someone turns DeepSpeed on; with DeepSpeed on it must
    also agree with the run config).

    Raises:
        ConfigError: one line naming the key and what to do.
    """
    if not isinstance(cfg, RunConfig):
        raise ConfigError(
            f"train() needs a RunConfig (see mmtok.train.config.load_run_config), not {type(cfg).__name__}"
        )
    cfg.validate()
    if not str(cfg.output_dir).strip():
        raise ConfigError("output_dir is not set: pass the run folder, e.g. output_dir=runs/my_run")
    _check_output_dir(Path(cfg.output_dir))
    cfg.task_config()  # the task's own keys, before anything is written
    _, world, local_rank = dist_utils.env_ranks()
    try:
        dist_utils.check_device(cfg.train.device, local_rank)
    except DistributedSetupError as e:
        raise ConfigError(str(e)) from e
    wants_ds = cfg.deepspeed.enabled or dist_utils.under_deepspeed_launcher()
    if not (wants_ds or cfg.deepspeed.config):
        return
    try:
        raw = dist_utils.load_ds_json(cfg.deepspeed.config)
        if not isinstance(raw, dict):
            raise DistributedSetupError(f"DeepSpeed config {cfg.deepspeed.config} must hold a JSON object")
        if not wants_ds:
            return  # the file is named but unused: that it exists and parses is enough
        # Resolve once now (the model width only sizes buckets) so contradictions surface before launch.
        cuda = cfg.train.device.startswith("cuda") or (cfg.train.device == "auto" and torch.cuda.is_available())
        resolved = dist_utils.resolve_ds_config(
            raw,
            micro_batch=cfg.data.batch_size,
            grad_accum=cfg.train.grad_accum,
            world_size=world,
            grad_clip=cfg.train.grad_clip,
            optim=cfg.optim,
            total_steps=cfg.train.steps,
            bf16=cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and cuda),
            hidden_size=1,
            stage=cfg.deepspeed.stage,
        )
    except DistributedSetupError as e:
        raise ConfigError(str(e)) from e
    if cfg.train.ema_decay and int(resolved.get("zero_optimization", {}).get("stage", 0)) == 3:
        raise ConfigError(
            "train.ema_decay averages whole parameters, which ZeRO-3 partitions across ranks: use ZeRO-1/2 "
            "(deepspeed.stage=2) or set train.ema_decay=0"
        )
    if cfg.train.schedule_by_time and "scheduler" in raw:
        raise ConfigError(
            f"train.schedule_by_time drives mmtok's own schedule, but {cfg.deepspeed.config} names a "
            'DeepSpeed scheduler; remove its "scheduler" block or set train.schedule_by_time=false'
        )


def train(
    cfg: RunConfig,
    resume: str = "auto",
    *,
    train_data: Iterable[Any] | None = None,
    val_data: Iterable[Any] | None = None,
) -> dict[str, Any] | None:
    """Train ``cfg.task`` for ``cfg.train.steps`` optimizer steps.

    Args:
        cfg: The run config (see :mod:`mmtok.train.config`); ``output_dir`` must be set.
        resume: ``"auto"`` (newest checkpoint in ``output_dir/checkpoints`` if any), ``"never"``, or a
            checkpoint/run folder.
        train_data: Programmatic use: any re-iterable of collated batches instead of ``data.train``
            (exact resume needs ``state_dict()``/``load_state_dict()``; ``set_epoch(e)`` is called if present).
        val_data: Likewise for ``data.val``.

    Returns:
        On rank 0: ``{"output_dir", "steps", "planned_steps", "stopped_by": "steps" | "max_seconds",
        "elapsed_s", "resumed_from", "train": last logged metrics, "eval": last evaluation,
        "export": folder or None}`` (also written to ``run_summary.json``); None on other ranks.

    Raises:
        ConfigError: a config that cannot run here, before anything is written (see :func:`preflight`).
    """
    preflight(cfg)
    if cfg.deepspeed.enabled and cfg.train.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    owns_group = not torch.distributed.is_initialized()
    info = dist_utils.setup(cfg.train.device, cfg.deepspeed.enabled)
    prev_det = torch.are_deterministic_algorithms_enabled()
    try:
        if cfg.train.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        return _Run(cfg, info, train_data, val_data, resume).run()
    finally:
        torch.use_deterministic_algorithms(prev_det)
        if owns_group and torch.distributed.is_initialized():
            # Free the finished run first, while the interpreter and the process group are alive: a DeepSpeed engine
            # sits in reference cycles with its hooks and collective work objects, and gloo work freed during
            # interpreter shutdown aborts the process ("terminate called without an active exception").
            gc.collect()
            torch.distributed.destroy_process_group()


class _Run:
    """State of one training run (split from :func:`train` to keep each piece readable)."""

    def __init__(self, cfg: RunConfig, info: DistInfo, train_data: Any, val_data: Any, resume: str = "auto"):
        self.cfg, self.info = cfg, info
        self.out = Path(cfg.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.bf16 = resolve_precision(cfg.train.precision, info.device)
        seed_everything(cfg.train.seed)  # identical initial weights on every rank
        if info.is_main:
            from mmtok.hub import atomic_write_text

            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "config.yaml", to_yaml(cfg))
            atomic_write_text(self.out / "env.json", json.dumps(environment_info(info, self.bf16), indent=2) + "\n")
        self.task = create_task(cfg).to(info.device)
        self.task.train()
        if train_data is None:
            if not cfg.data.train:
                raise ConfigError("data.train is empty: set it to a shard pattern, e.g. data/fashion-mnist/train-*.tar")
            train_data = _build_loader(cfg, "train", self.task, info.rank, info.world_size, keys=cfg.train.log_keys)
        self.stream = _Stream(train_data)
        self._val_data = val_data
        # The checkpoint to resume is found before the back-end exists: a DeepSpeed checkpoint written by
        # another number of processes is loaded through a universal checkpoint, which DeepSpeed must be told
        # about when its engine is built.
        self.resume_folder, self.resume_state = self._find_resume(resume)
        universal = None
        if self.resume_state is not None and self.resume_state["world_size"] != info.world_size:
            universal = self._prepare_world_size_change(self.resume_folder, self.resume_state)
        if info.deepspeed:
            self.backend: TorchBackend | DeepSpeedBackend = DeepSpeedBackend(
                self.task, cfg, info, self.bf16, self.out, universal=universal
            )
        else:
            self.backend = TorchBackend(self.task, cfg, info, self.bf16)
        self.ema = WeightEMA(self.task, cfg.train.ema_decay) if cfg.train.ema_decay else None
        self._keys_file: Any = None
        self.step = 0
        self.last_train: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}
        # Wall clock of the run: seconds spent before this process (from the checkpoint resumed) plus
        # this process's time since run() began. Drives train.max_seconds and schedule_by_time.
        self._elapsed_before = 0.0
        self._clock = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds of training this run has used, across resumes."""
        return self._elapsed_before + time.perf_counter() - self._clock

    def _floor(self) -> int:
        """Steps a budget cannot cut: ``train.min_steps``, at most ``train.steps`` (0 = none)."""
        return min(self.cfg.train.min_steps, self.cfg.train.steps)

    def _over_budget(self) -> bool:
        """True on every rank once any rank's clock has passed ``train.max_seconds`` (0 = never) and the run has
        made its ``train.min_steps``."""
        budget = self.cfg.train.max_seconds
        if not budget or self.step < self._floor():
            return False
        return dist_utils.any_rank(self.elapsed() >= budget)

    def _clock_progress(self) -> float:
        """The schedule's outside clock under ``train.schedule_by_time``: the share of the budget used, or, with
        ``train.min_steps``, the lesser of it and the share of the floor's post-warm-up steps taken (so the cosine
        ends at the floor when the budget ran out first). Every rank computes it from the same reduced clock."""
        progress = dist_utils.all_reduce_max(self.elapsed()) / self.cfg.train.max_seconds
        floor, warmup = self._floor(), self.cfg.optim.warmup_steps
        if floor:
            progress = min(progress, (self.step - warmup) / max(1, floor - warmup - 1))
        return progress

    # -- resume ------------------------------------------------------------------------------
    def _find_resume(self, resume: str) -> tuple[Path | None, dict[str, Any] | None]:
        """The checkpoint folder ``resume`` names and its state (rank 0 decides, every rank gets the answer)."""
        found, error = None, None
        if self.info.is_main:
            ckpt.clean_stale(self.ckpt_root)
            try:
                path = ckpt.resolve_resume(resume, self.ckpt_root)
                found = str(path) if path else None
            except CheckpointError as e:
                error = str(e)  # raised on every rank below, so no rank waits for the others forever
        found, error = dist_utils.broadcast_object((found, error))
        if error is not None:
            raise CheckpointError(error)
        if found is None:
            return None, None
        folder = Path(found)
        return folder, ckpt.read_state(folder)

    def _prepare_world_size_change(self, folder: Path, state: dict[str, Any]) -> Path | None:
        """Log the change of world size; for DeepSpeed return the universal checkpoint (converted on rank 0).

        Model, optimizer and schedule states of the torch back-end are full copies on every rank, so they load
        as they are. ZeRO partitions its optimizer state by rank: DeepSpeed's ``ds_to_universal`` rewrites it per
        parameter, and the engine loads that with ``checkpoint.load_universal``.
        """
        saved, now = int(state["world_size"]), self.info.world_size
        # ZeRO stages 1-3 partition the optimizer by rank (*optim_states.pt); stage 0 keeps it whole.
        convert = state.get("backend") == "deepspeed" and self.info.deepspeed and any(folder.glob("*optim_states.pt"))
        if self.info.is_main:
            cfg = self.cfg
            logger.warning(
                "world size changed: %s was written by %d process(es), this run has %d; model, optimizer and "
                "schedule states are restored%s; the global batch is now %d (data.batch_size %d x "
                "train.grad_accum %d x %d processes)",
                folder,
                saved,
                now,
                " through a DeepSpeed universal checkpoint" if convert else "",
                cfg.data.batch_size * cfg.train.grad_accum * now,
                cfg.data.batch_size,
                cfg.train.grad_accum,
                now,
            )
        if not convert:
            return None  # loads as it is (a back-end mismatch is refused by the back-end's load())
        made, error = None, None
        if self.info.is_main:
            try:
                made = str(ckpt.ensure_universal(folder))
            except CheckpointError as e:
                error = str(e)
        made, error = dist_utils.broadcast_object((made, error))  # the others wait here for the conversion
        if error is not None:
            raise CheckpointError(error)
        return Path(made)

    def _resume(self) -> tuple[Path | None, dict[str, Any] | None]:
        folder, state = self.resume_folder, self.resume_state
        if folder is None or state is None:
            return None, None
        self.backend.load(folder, state)
        if self.ema is not None:
            if "ema_updates" in state:
                self.ema.load(folder, state["ema_updates"])
            elif self.info.is_main:
                logger.warning("%s holds no weight average (train.ema_decay was off): it starts from here", folder)
        self.step = int(state["step"])
        self.stream.epoch = int(state["epoch"])
        self._restore_data_position(state)
        if self.info.is_main:
            logger.info(
                "resumed from %s (step %d, epoch %d, written by %d process(es), now %d)",
                folder,
                self.step,
                self.stream.epoch,
                state["world_size"],
                self.info.world_size,
            )
        return folder, state

    def _restore_data_position(self, state: dict[str, Any]) -> None:
        """Put this rank's data stream where the checkpoint left it (re-split when the world size changed)."""
        loader = self.stream.loader
        saved = [r["data"] for r in state["ranks"]]
        if not hasattr(loader, "load_state_dict") or any(d is None for d in saved):
            if self.step:
                logger.warning("the data loader has no saved position; the resumed run restarts its data stream")
            return
        # mmtok's ShardLoader takes every rank's saved state: the position is exact in the saved layout, and in
        # another one (world size, or workers per process) the rest of the epoch is re-split over the new
        # consumers, each sample once (mmtok/data/reader.py). Other loaders get their own rank's state.
        resplit = getattr(loader, "load_state_dict_resplit", None)
        if resplit is not None:
            resplit(saved, rank=self.info.rank, world_size=self.info.world_size)
        elif int(state["world_size"]) == self.info.world_size:
            loader.load_state_dict(saved[self.info.rank])
        else:
            self._restart_epoch(loader, state, saved)
            return
        # The stream starts the loader's own epoch: a rank can be an epoch ahead of rank 0 (uneven shards, or a
        # re-split that left it nothing of the saved epoch), and set_epoch(rank 0's epoch) would reset its position.
        self.stream.epoch = int(getattr(loader, "epoch", self.stream.epoch))

    def _restart_epoch(self, loader: Any, state: dict[str, Any], saved: list[dict[str, Any]]) -> None:
        # A loader that cannot re-split: the epoch restarts, and the bound on repeated samples is logged.
        epoch = int(state["epoch"])
        seen = sum(sum(int(v) for v in (d.get("positions") or {}).values()) for d in saved if d.get("epoch") == epoch)
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        if self.info.is_main:
            logger.warning(
                "the data position cannot be re-split over %d processes by this reader: epoch %d restarts from "
                "its beginning, so up to %d samples already trained on in it are seen again",
                self.info.world_size,
                epoch,
                seen,
            )

    def _save(self) -> None:
        per_rank = dist_utils.all_gather_objects(
            {"rng": ckpt.capture_rng_state(), "data": self.stream.state_dict(), "rank": self.info.rank}
        )
        tmp = self.ckpt_root / ckpt.tmp_dir_name(self.step)
        if self.info.is_main:
            ckpt.prepare_tmp(self.ckpt_root, self.step)
        dist_utils.barrier()
        extra = self.backend.save(self.ckpt_root, tmp)
        if self.ema is not None:
            extra["ema_updates"] = self.ema.updates
            if self.info.is_main:
                self.ema.save(tmp)
        if self.info.is_main:
            state = {
                "step": self.step,
                "epoch": self.stream.epoch,
                "world_size": self.info.world_size,
                "backend": self.backend.name,
                "ranks": per_rank,
                "metrics": self.last_train,
                "elapsed_s": self.elapsed(),
                **extra,
            }
            ckpt.write_state(tmp, state)
        dist_utils.barrier()
        if self.info.is_main:
            final = ckpt.finalize(self.ckpt_root, self.step, self.cfg.train.keep_last)
            logger.info("checkpoint %s", final)
        dist_utils.barrier()

    # -- evaluation --------------------------------------------------------------------------
    def _val_loader(self) -> Any:
        if self._val_data is not None:
            return self._val_data
        if not self.cfg.data.val:
            return None
        # ZeRO-3 gathers parameters inside every forward, so all ranks must run the same number of
        # forwards: each reads the whole validation set. Otherwise each rank reads its own shard of it.
        # A fresh loader per evaluation: an evaluation capped by train.eval_batches must not leave the
        # next one starting mid-stream.
        rank, world = (0, 1) if self.backend.zero3 else (self.info.rank, self.info.world_size)
        return _build_loader(self.cfg, "val", self.task, rank, world)

    def _evaluate(self, writer: MetricsWriter) -> dict[str, float]:
        loader = self._val_loader()
        if loader is None:
            return {}
        count = [0]
        limit = self.cfg.train.eval_batches

        def batches() -> Iterator[Any]:
            for i, batch in enumerate(loader):
                if limit and i >= limit:
                    break
                count[0] += 1
                yield to_device(batch, self.info.device)

        rng = ckpt.capture_rng_state()  # evaluation must not change the training trajectory
        self.task.eval()
        try:
            with (
                torch.no_grad(),
                torch.autocast(self.info.device.type, dtype=torch.bfloat16, enabled=self.bf16),
                self._weights_shown(),
            ):
                metrics = self.task.evaluate(batches())
        finally:
            self.task.train()
            ckpt.restore_rng_state(rng)
        gathered = dist_utils.all_gather_objects(({k: float(v) for k, v in metrics.items()}, count[0]))
        metrics = merge_rank_metrics(gathered)
        writer.log(self.step, metrics, prefix="eval")
        if self.info.is_main:
            logger.info("step %d eval %s", self.step, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        self.last_eval = metrics
        return metrics

    # -- main loop ---------------------------------------------------------------------------
    def run(self) -> dict[str, Any] | None:
        cfg, info = self.cfg, self.info
        self._clock = time.perf_counter()
        folder, state = self._resume()
        if state is not None:
            self._elapsed_before = float(state.get("elapsed_s", 0.0))
        writer = MetricsWriter(
            self.out, enabled=info.is_main, tensorboard=cfg.train.tensorboard, resume_step=self.step if folder else None
        )
        # The iterator is created before the RNG is restored: creating it may draw from the global RNG
        # (DataLoader base seeds), which the uninterrupted run did long ago.
        self.stream.start()
        if state is not None:
            # Every rank starts from the same seed, so a rank the saved run did not have takes the state of
            # the saved rank it stands in for (rank modulo the saved world size).
            ckpt.restore_rng_state(state["ranks"][info.rank % len(state["ranks"])]["rng"])
        total = cfg.train.steps
        if info.is_main:
            logger.info(
                "training %s for %d steps on %s (%s, world size %d, %s)%s",
                cfg.task.get("name"),
                total,
                info.device,
                self.backend.name,
                info.world_size,
                "bf16" if self.bf16 else "fp32",
                (f", resumed at step {self.step}" if folder else "")
                + (f", budget {cfg.train.max_seconds:g} s" if cfg.train.max_seconds else ""),
            )
        from tqdm.auto import tqdm

        bar = tqdm(
            total=total,
            initial=self.step,
            disable=not (info.is_main and cfg.train.progress),
            desc="train",
            dynamic_ncols=True,
        )
        sums: dict[str, torch.Tensor] = {}
        n_micro = samples = 0
        busy = 0.0  # seconds spent in training steps since the last log line (not eval/checkpoints)
        first_step = self.step
        spent_at: int | None = None  # the step during which the budget ran out (past it only under train.min_steps)
        # A fresh run always takes a step; a resumed one may find its budget already spent.
        out_of_time = state is not None and self._over_budget()
        try:
            while self.step < total and not out_of_time:
                t0 = time.perf_counter()
                if cfg.train.schedule_by_time:
                    factor = lr_factor(self.step, cfg.optim, total, self._clock_progress())
                    self.backend.set_lr_factor(factor)
                for micro in range(cfg.train.grad_accum):
                    batch = self.stream.next()
                    if isinstance(batch, KeyedBatch):
                        self._log_keys(batch.keys)
                        batch = batch.batch
                    batch = to_device(batch, info.device)
                    samples += batch_size_of(batch, cfg.data.batch_size)
                    out = self.backend.micro_step(batch, last=micro == cfg.train.grad_accum - 1)
                    for k, v in out.items():
                        if torch.is_tensor(v) and v.numel() == 1:
                            sums[k] = sums.get(k, 0.0) + v.detach().float()
                    n_micro += 1
                grad_norm = self.backend.optimizer_step()
                if self.ema is not None:
                    self.ema.update(self.task)
                if cfg.train.schedule_by_time:
                    lr_used = cfg.optim.lr * factor
                else:
                    lr_used = _lr_of_step(self.backend, self.step, cfg)
                self.step += 1
                busy += time.perf_counter() - t0
                bar.update(1)
                out_of_time = self._over_budget()
                if spent_at is None and cfg.train.max_seconds and self.elapsed() >= cfg.train.max_seconds:
                    spent_at = self.step  # this rank's clock; for the log and run_summary.json only
                last = self.step == total or out_of_time  # a spent budget ends the run like its last step
                if (cfg.train.log_every and self.step % cfg.train.log_every == 0) or last or self.step == 1:
                    values = {k: float(v) / n_micro for k, v in sums.items()}
                    values = dist_utils.all_reduce_mean(values)
                    values |= {
                        "lr": lr_used,
                        "grad_norm": grad_norm,
                        "samples_per_s": samples * info.world_size / max(busy, 1e-9),
                        "epoch": self.stream.epoch,
                    }
                    writer.log(self.step, values)
                    self.last_train = values
                    bar.set_postfix(loss=f"{values.get('loss', float('nan')):.4g}", lr=f"{lr_used:.2e}")
                    sums, n_micro, samples, busy = {}, 0, 0, 0.0
                if (cfg.train.eval_every and self.step % cfg.train.eval_every == 0) or last:
                    self._evaluate(writer)
                if (cfg.train.ckpt_every and self.step % cfg.train.ckpt_every == 0) or last:
                    self._save()
            if self.step == first_step and not self.last_eval:
                self._evaluate(writer)  # a finished (or out-of-budget) run started again: report its evaluation
        finally:
            bar.close()
            writer.close()
            if self._keys_file is not None:
                self._keys_file.close()
        stopped_by = "steps" if self.step >= total else "max_seconds"
        elapsed = self.elapsed()
        if stopped_by == "max_seconds" and info.is_main:
            logger.info(
                "train.max_seconds=%g reached after %.1f s: stopped at step %d of %d planned (%.0f%%)",
                cfg.train.max_seconds,
                elapsed,
                self.step,
                total,
                100.0 * self.step / total,
            )
            if spent_at is not None and spent_at < self.step:
                logger.info(
                    "the budget ran out at step %d; train.min_steps=%d carried the run on to step %d",
                    spent_at,
                    cfg.train.min_steps,
                    self.step,
                )
        short = stopped_by == "max_seconds" and self.step < 0.8 * cfg.train.reference_steps
        if short and info.is_main:
            logger.warning(
                "this run made %d steps in its %g s, %.0f%% of the %d the recipe's published figures come from (a "
                "slower or busier host): expect lower figures; to reproduce them here, run by steps: "
                "train.max_seconds=0 train.schedule_by_time=false train.steps=%d",
                self.step,
                cfg.train.max_seconds,
                100.0 * self.step / cfg.train.reference_steps,
                cfg.train.reference_steps,
                cfg.train.reference_steps,
            )
        export = self._export()
        if not info.is_main:
            return None
        summary = {
            "output_dir": str(self.out),
            "steps": self.step,
            "planned_steps": total,
            "stopped_by": stopped_by,
            "elapsed_s": round(elapsed, 3),
            "max_seconds": cfg.train.max_seconds,
            "reference_steps": cfg.train.reference_steps or None,
            "min_steps": self._floor() or None,
            "budget_spent_at_step": spent_at,
            "resumed_from": str(folder) if folder else None,
            "train": self.last_train,
            "eval": self.last_eval,
            "export": export,
        }
        from mmtok.hub import atomic_write_text

        atomic_write_text(self.out / "run_summary.json", json.dumps(summary, indent=2, default=str) + "\n")
        return summary

    def _log_keys(self, keys: list[Any]) -> None:
        """Append the sample keys of one micro-batch to ``keys/rank-XXXXX.jsonl`` (``train.log_keys``)."""
        if self._keys_file is None:
            folder = self.out / "keys"
            folder.mkdir(parents=True, exist_ok=True)
            self._keys_file = open(folder / f"rank-{self.info.rank:05d}.jsonl", "a")  # noqa: SIM115 - closed in run()
        line = {"step": self.step + 1, "epoch": self.stream.epoch, "rank": self.info.rank, "keys": list(keys)}
        self._keys_file.write(json.dumps(line) + "\n")
        self._keys_file.flush()  # a killed run still shows what it trained on

    def _weights_shown(self) -> contextlib.AbstractContextManager:
        """The weights evaluation and export see: the average with ``train.ema_decay``, else the live ones."""
        return self.ema.applied(self.task) if self.ema is not None else contextlib.nullcontext()

    def _export(self) -> str | None:
        if not self.cfg.train.export:
            return None
        target = self.out / "export"
        with self.backend.gathered(), self._weights_shown():
            if self.info.is_main:
                self.task.export(target)
        dist_utils.barrier()
        return str(target) if target.exists() else None


def _lr_of_step(backend: Any, step: int, cfg: RunConfig) -> float:
    """The learning rate the step just taken used (the scheduler has already moved to the next one)."""
    if isinstance(backend, TorchBackend) or "scheduler" not in getattr(backend, "ds_config", {}):
        return cfg.optim.lr * lr_factor(step, cfg.optim, cfg.train.steps)
    return backend.lr()
