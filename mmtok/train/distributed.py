"""Process-group setup and DeepSpeed config resolution.

One ``mmtok train`` command runs as a single process, under ``torchrun`` (plain DDP, or DeepSpeed if
``deepspeed.enabled``) or under the ``deepspeed`` launcher (always DeepSpeed). The launcher is
recognised from its environment: both set ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; the ``deepspeed``
launcher also sets ``CROSS_RANK``/``LOCAL_SIZE``, torchrun ``TORCHELASTIC_RUN_ID``.

DeepSpeed JSON files may hold ``"auto"`` values, as in the Hugging Face integration. mmtok fills them
from the run config (micro-batch, accumulation, world size, clipping, optimizer hyper-parameters,
bf16 only on CUDA, bucket sizes from the model width) and writes the result to the run folder, so
the file in ``configs/ds`` serves every model and the run folder says exactly what ran.
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


class DistributedSetupError(RuntimeError):
    """A launch environment or DeepSpeed config that cannot work."""


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    deepspeed: bool = False  # DeepSpeed engine (any world size)
    ddp: bool = False  # plain torch DistributedDataParallel

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_ranks() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the launcher's environment (0, 1, 0 when absent)."""
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def under_deepspeed_launcher() -> bool:
    """True when started by ``deepspeed`` (its launch.py sets CROSS_RANK and LOCAL_SIZE, torchrun does not)."""
    return "CROSS_RANK" in os.environ and "LOCAL_SIZE" in os.environ


def check_device(spec: str, local_rank: int = 0) -> None:
    """Raise :class:`DistributedSetupError` if ``spec`` cannot be used on this machine; changes nothing.

    Run before anything is written or initialised, so ``train.device=cuda`` on a machine without a GPU
    is a one-line error rather than a half-made run folder.
    """
    if spec in ("auto", "cpu"):
        return
    if not spec.startswith("cuda"):
        raise DistributedSetupError(f"train.device must be auto, cpu, cuda or cuda:N, not {spec!r}")
    if not torch.cuda.is_available():
        raise DistributedSetupError(f"train.device={spec} but CUDA is not available; use train.device=cpu or auto")
    index = int(spec.split(":", 1)[1]) if ":" in spec else local_rank
    if index >= torch.cuda.device_count():
        raise DistributedSetupError(
            f"train.device={spec} (local rank {local_rank}) but this machine has {torch.cuda.device_count()} "
            "CUDA device(s)"
        )


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """``auto`` = this rank's CUDA device if CUDA is available, else CPU."""
    check_device(spec, local_rank)
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if spec == "cuda":
            spec = f"cuda:{local_rank}"
        device = torch.device(spec)
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def setup(device_spec: str, want_deepspeed: bool) -> DistInfo:
    """Initialise the process group (if launched with several processes) and pick the backend."""
    rank, world, local_rank = env_ranks()
    use_ds = want_deepspeed or under_deepspeed_launcher()
    device = resolve_device(device_spec, local_rank)
    if use_ds:
        if device.type == "cpu":
            # must be set before deepspeed is imported anywhere, or it probes for accelerators
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        if device.type == "cpu":
            # The shared-memory allreduce extension is compiled on first use (~90 s); gloo does the job.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        if not dist.is_initialized():
            if "WORLD_SIZE" not in os.environ:
                _single_process_env()
            deepspeed.init_distributed(
                dist_backend="gloo" if device.type == "cpu" else "nccl",
                auto_mpi_discovery=False,
                timeout=datetime.timedelta(minutes=30),
            )
    elif world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="gloo" if device.type == "cpu" else "nccl", timeout=datetime.timedelta(minutes=30)
        )
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world, local_rank, device, deepspeed=use_ds, ddp=world > 1 and not use_ds)


def _single_process_env() -> None:
    """DeepSpeed in one process without a launcher: a world of one on a free local port."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(port))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (small, JSON-like) on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(values: dict[str, float], weight: float = 1.0) -> dict[str, float]:
    """Weighted mean of scalar dicts over ranks (keys must match on every rank)."""
    if not dist.is_initialized() or dist.get_world_size() == 1 or not values:
        return dict(values)
    keys = sorted(values)
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    t = torch.tensor([values[k] * weight for k in keys] + [weight], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    total = float(t[-1]) or 1.0
    return {k: float(t[i]) / total for i, k in enumerate(keys)}


def all_reduce_max(value: float) -> float:
    """The largest of every rank's ``value``, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return float(value)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is True on any rank.

    Decisions that end a loop (a wall-clock budget read from each rank's own clock) must be taken by
    all ranks together, or the ranks that go on wait forever in their next collective. For the same reason a
    rate read from the clock (``train.schedule_by_time``) comes from :func:`all_reduce_max` of it.
    """
    return all_reduce_max(1.0 if flag else 0.0) > 0


def broadcast_object(obj: Any) -> Any:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# -- DeepSpeed config -----------------------------------------------------------------------------
def load_ds_json(path: str) -> dict[str, Any]:
    if not path:
        raise DistributedSetupError(
            "DeepSpeed is on but deepspeed.config is empty; pass e.g. deepspeed.config=configs/ds/zero2.json"
        )
    p = Path(path)
    if not p.is_file():
        raise DistributedSetupError(f"DeepSpeed config {p} does not exist (see configs/ds/zero1.json, zero2, zero3)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise DistributedSetupError(f"DeepSpeed config {p} is not valid JSON: {e}") from e


def model_width(model: torch.nn.Module) -> int:
    """A model's hidden size for ZeRO bucket sizes: the largest trailing dim of its 2-D weights."""
    dims = [p.shape[-1] for p in model.parameters() if p.ndim >= 2]
    return int(max(dims)) if dims else 1024


def resolve_ds_config(
    raw: dict[str, Any],
    *,
    micro_batch: int,
    grad_accum: int,
    world_size: int,
    grad_clip: float,
    optim: Any,
    total_steps: int,
    bf16: bool,
    hidden_size: int,
    stage: int = -1,
) -> dict[str, Any]:
    """Replace every ``"auto"`` in a DeepSpeed config with mmtok's value; reject contradictions.

    Args:
        raw: The parsed JSON.
        micro_batch: ``data.batch_size`` (per process, per micro-step).
        grad_accum: ``train.grad_accum``.
        world_size: Number of data-parallel processes.
        grad_clip: ``train.grad_clip`` (0 = off).
        optim: The ``OptimConfig``.
        total_steps: ``train.steps`` (for a DeepSpeed scheduler, if the file names one).
        bf16: Whether bf16 is used (only ever on CUDA).
        hidden_size: Model width for ZeRO-3 bucket and persistence sizes.
        stage: ``deepspeed.stage`` override (-1 = keep the file's).
    """
    cfg = copy.deepcopy(raw)
    fixed = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
    }
    for key, value in fixed.items():
        if cfg.get(key, "auto") == "auto":
            cfg[key] = value
        elif int(cfg[key]) != value:
            raise DistributedSetupError(
                f"DeepSpeed config sets {key}={cfg[key]} but the run config implies {value} "
                f"(data.batch_size={micro_batch}, train.grad_accum={grad_accum}, world size {world_size}); "
                'set it to "auto" in the JSON'
            )
    if cfg.get("gradient_clipping", "auto") == "auto":
        cfg["gradient_clipping"] = float(grad_clip)
    # Precision. mmtok trains fp32 weights under bf16 autocast on every back-end (the quantizers keep fp32 inside).
    # DeepSpeed's "bf16" mode instead casts the module to bf16 and switches an outer autocast off inside the
    # engine, so "auto" (or no section) resolves to DeepSpeed's "torch_autocast" mode, the same numerics as the
    # torch back-ends. A JSON that enables "bf16" itself gets DeepSpeed's bf16 weights (the back-end then casts
    # floating inputs to bf16, as that mode expects).
    if cfg.get("fp16", {}).get("enabled") == "auto":
        cfg["fp16"]["enabled"] = False
    own_bf16 = cfg.get("bf16", {}).get("enabled")  # what the JSON asks of DeepSpeed's bf16 mode
    if own_bf16 == "auto":
        cfg["bf16"]["enabled"] = False
    if bf16 and own_bf16 in (None, "auto"):
        cfg.setdefault("torch_autocast", {"enabled": True, "dtype": "bfloat16"})
    if cfg.get("torch_autocast", {}).get("enabled") == "auto":
        cfg["torch_autocast"]["enabled"] = bf16
    if cfg.get("torch_autocast", {}).get("enabled"):
        cfg["torch_autocast"].setdefault("dtype", "bfloat16")
    if cfg.get("fp16", {}).get("enabled") and cfg.get("bf16", {}).get("enabled"):
        raise DistributedSetupError("DeepSpeed config enables both fp16 and bf16; enable at most one")
    if cfg.get("bf16", {}).get("enabled") and not bf16:
        raise DistributedSetupError(
            'DeepSpeed config enables "bf16" but the run is fp32 (train.precision, or no CUDA device); set '
            '"enabled": "auto" in the JSON or train.precision=bf16'
        )
    zero = cfg.setdefault("zero_optimization", {})
    if stage >= 0:
        zero["stage"] = stage
    if zero.get("stage", 0) not in (0, 1, 2, 3):
        raise DistributedSetupError(f"zero_optimization.stage must be 0-3, not {zero.get('stage')}")
    h = hidden_size
    bucket_defaults = {
        "reduce_bucket_size": h * h,
        "allgather_bucket_size": h * h,
        "stage3_prefetch_bucket_size": int(0.9 * h * h),
        "stage3_param_persistence_threshold": 10 * h,
    }
    for key, value in bucket_defaults.items():
        if zero.get(key) == "auto":
            zero[key] = value
    if "optimizer" in cfg:
        _resolve_optimizer(cfg["optimizer"], optim)
    if "scheduler" in cfg:
        _resolve_scheduler(cfg["scheduler"], optim, total_steps)
    left = _find_auto(cfg)
    if left:
        raise DistributedSetupError(f'DeepSpeed config still has "auto" at {left[0]}; mmtok cannot resolve that key')
    return cfg


def _resolve_optimizer(section: dict[str, Any], optim: Any) -> None:
    names = {"adamw": "AdamW", "sgd": "SGD"}
    if section.get("type", "auto") == "auto":
        section["type"] = names.get(optim.name, optim.name)
    elif section["type"].lower() != optim.name:
        raise DistributedSetupError(
            f"DeepSpeed config optimizer.type={section['type']} contradicts optim.name={optim.name}; "
            'set "type": "auto" in the JSON'
        )
    params = section.setdefault("params", {})
    if "adam" not in section["type"].lower():
        for key in ("torch_adam", "adam_w_mode"):  # Adam-only switches would reach SGD's constructor
            params.pop(key, None)
    values: dict[str, Any] = {"lr": optim.lr, "weight_decay": optim.weight_decay}
    if optim.name == "adamw":
        values |= {"betas": list(optim.betas), "eps": optim.eps}
    else:
        values |= {"momentum": optim.betas[0]}
    for key, value in values.items():
        if params.get(key, "auto") == "auto":
            params[key] = value
    for key in [k for k, v in params.items() if v == "auto"]:
        raise DistributedSetupError(f"DeepSpeed optimizer param {key}='auto' is not known for {section['type']}")


def _resolve_scheduler(section: dict[str, Any], optim: Any, total_steps: int) -> None:
    params = section.setdefault("params", {})
    values = {
        "total_num_steps": total_steps,
        "warmup_num_steps": optim.warmup_steps,
        "warmup_max_lr": optim.lr,
        "warmup_min_lr": 0.0,
        "cos_min_ratio": optim.min_lr_ratio,
        "warmup_min_ratio": 0.0,
    }
    for key, value in values.items():
        if params.get(key) == "auto":
            params[key] = value


def _find_auto(node: Any, path: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _find_auto(v, f"{path}.{k}" if path else k)]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _find_auto(v, f"{path}[{i}]")]
    return [path] if node == "auto" else []
