"""Optimizer and learning-rate schedule built from the ``optim:`` block.

The schedule is linear warm-up followed by a half-cycle cosine (the MAE recipe, He et al. 2021,
arXiv:2111.06377, section A.1) or a constant rate. It is a pure function of the optimizer step, so a
resumed run recomputes exactly the rate an uninterrupted run would use, and the same function drives
single-process training and DeepSpeed (we hand DeepSpeed a ``LambdaLR`` instead of its own
``WarmupCosineLR``, whose first step has rate 0 and whose log warm-up differs from ours).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mmtok.train.config import OptimConfig

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant")


class OptimConfigError(ValueError):
    """An ``optim:`` block that cannot be used."""


def check_optim_config(cfg: OptimConfig) -> None:
    """Reject unknown optimizer/schedule names and impossible values before any work starts."""
    if cfg.name not in OPTIMIZERS:
        raise OptimConfigError(f"optim.name must be one of {OPTIMIZERS}, not {cfg.name!r}")
    if cfg.schedule not in SCHEDULES:
        raise OptimConfigError(f"optim.schedule must be one of {SCHEDULES}, not {cfg.schedule!r}")
    if cfg.lr <= 0:
        raise OptimConfigError(f"optim.lr must be > 0, got {cfg.lr}")
    if cfg.warmup_steps < 0 or not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise OptimConfigError("optim.warmup_steps must be >= 0 and optim.min_lr_ratio in [0, 1]")
    if len(cfg.betas) != 2:
        raise OptimConfigError(f"optim.betas needs two values, got {list(cfg.betas)}")


def build_optimizer(param_groups: list[dict[str, Any]], cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW or SGD (momentum = ``betas[0]``) over ``param_groups`` (each may carry its own weight decay)."""
    check_optim_config(cfg)
    groups = [g for g in param_groups if len(g["params"])]  # empty groups confuse ZeRO's partitioning
    if not groups:
        raise OptimConfigError("the task has no trainable parameters (task.param_groups() returned none)")
    if cfg.name == "adamw":
        # foreach=False keeps the update order identical whatever the tensor count (bitwise resume).
        return torch.optim.AdamW(
            groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay, foreach=False
        )
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.betas[0], weight_decay=cfg.weight_decay, foreach=False)


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of ``cfg.lr`` for optimizer step ``step`` (0-based).

    Warm-up is linear from ``1/warmup`` to 1 over ``warmup_steps`` steps (never 0: a step at rate 0
    is wasted work); the cosine then falls from 1 to ``min_lr_ratio`` at the last step.
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps - 1)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class _Factor:
    """Picklable-free callable for ``LambdaLR`` (its ``__dict__`` is what LambdaLR puts in state_dict)."""

    def __init__(self, cfg: OptimConfig, total_steps: int):
        self._cfg = cfg
        self._total = total_steps

    def __call__(self, step: int) -> float:
        return lr_factor(step, self._cfg, self._total)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` stepping :func:`lr_factor` once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _Factor(cfg, total_steps))


def scheduler_state(scheduler: Any) -> dict[str, Any]:
    """The scheduler's position as plain JSON (the schedule itself always comes from the config)."""
    state = scheduler.state_dict()
    return {k: v for k, v in state.items() if k != "lr_lambdas"}


def load_scheduler_state(scheduler: Any, state: dict[str, Any]) -> None:
    full = scheduler.state_dict()
    full.update({k: v for k, v in state.items() if k in full and k != "lr_lambdas"})
    # LambdaLR.load_state_dict would copy stored lambda attributes over ours; keep the config's schedule.
    full["lr_lambdas"] = [None] * len(full.get("lr_lambdas", []))
    scheduler.load_state_dict(full)
