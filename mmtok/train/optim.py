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

from mmtok.config import ConfigError
from mmtok.train.config import OPTIMIZERS, SCHEDULES, OptimConfig  # noqa: F401 - names re-exported here


class OptimConfigError(ConfigError):
    """An ``optim:`` block, or a task's parameters, that an optimizer cannot be built from."""


def check_optim_config(cfg: OptimConfig) -> None:
    """Reject unknown optimizer/schedule names and impossible values before any work starts.

    The rules live in :meth:`OptimConfig.validate` (run when the block is built); this re-checks a block
    that may have been edited in place.
    """
    try:
        cfg.validate()
    except OptimConfigError:
        raise
    except ConfigError as e:
        raise OptimConfigError(str(e)) from e


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


def lr_factor(step: int, cfg: OptimConfig, total_steps: int, progress: float | None = None) -> float:
    """Multiplier of ``cfg.lr`` for optimizer step ``step`` (0-based).

    Warm-up is linear from ``1/warmup`` to 1 over ``warmup_steps`` steps (never 0: a step at rate 0
    is wasted work); the cosine then falls from 1 to ``min_lr_ratio`` at the last step.

    Args:
        step: The optimizer step about to be taken (0-based).
        cfg: The ``optim:`` block.
        total_steps: ``train.steps``.
        progress: Optional outside clock in [0, 1] (elapsed / ``train.max_seconds`` under
            ``train.schedule_by_time``). The cosine then follows whichever of it and the step count is
            further along, so it reaches its floor when the budget ends even if the steps do not.
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps - 1)
    done = (step - cfg.warmup_steps) / span
    if progress is not None:
        done = max(done, progress)
    done = min(1.0, done)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * done))


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
