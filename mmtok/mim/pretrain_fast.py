"""A fast in-memory MAE pretraining loop for small image sets (Fashion-MNIST) on a CPU budget.

The engine (``mmtok train``) reads WebDataset shards; on 2 CPU cores decoding PNGs costs as much as
the model itself at 28x28. This loop keeps the whole training set in memory as a uint8 tensor and
runs exactly the same model, masker and loss (:class:`~mmtok.mim.tasks.MAETask`), with AdamW
(0.9, 0.95), linear warm-up and cosine decay over a wall-clock budget: the schedule is a function of
elapsed time / budget (or of step / max_steps), so it ends exactly when the budget does, even when
other processes slow the machine down or speed it up mid-run.
It exists for the quality benchmark and quick experiments; real runs use ``mmtok train``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mmtok import registries
from mmtok.mim.tasks import MAETask

logger = logging.getLogger(__name__)


@dataclass
class FastPretrainConfig:
    task: dict[str, Any] = field(default_factory=dict)  # MAETaskConfig fields (model, masker, ...)
    batch_size: int = 256
    lr: float = 1.5e-3
    weight_decay: float = 0.05
    warmup_frac: float = 0.05
    min_lr_ratio: float = 0.0
    time_budget_s: float = 600.0
    max_steps: int = 0  # 0 = as many as the budget allows
    seed: int = 0
    log_every: int = 100


def pretrain_in_memory(images: np.ndarray, cfg: FastPretrainConfig) -> tuple[MAETask, dict[str, Any]]:
    """Pretrain on uint8 images ``[N, H, W]`` / ``[N, C, H, W]`` or clips ``[N, C, T, H, W]``.

    Returns the task (in eval mode) and a log dict (steps, epochs, images/s, first/last loss, and the lowest and
    highest 1-minute load average seen at the log lines, to judge how busy the machine was).
    """
    torch.manual_seed(cfg.seed)
    task: MAETask = registries.get("task").create("mae", **cfg.task)
    task.train()
    data = torch.from_numpy(np.array(images, copy=True))  # own, writable copy
    if data.ndim == 3:
        data = data[:, None]  # [N, 1, H, W]
    c = task.model.config
    video = task.model.is_video
    want = (c.in_chans, c.num_frames, c.img_size, c.img_size) if video else (c.in_chans, c.img_size, c.img_size)
    if tuple(data.shape[1:]) != want:
        raise ValueError(f"data {tuple(data.shape[1:])} does not fit the model {want}")
    groups = [g for g in task.param_groups(cfg.weight_decay) if g["params"]]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    step, seen, losses = 0, 0, []
    loads = [os.getloadavg()[0]]  # 1-minute load average, sampled at every log line: how busy the machine was
    perm, pos = torch.randperm(len(data), generator=g), 0
    while True:
        # progress in [0, 1]: by steps when max_steps is set, else by wall-clock time, so the schedule
        # ends exactly when the budget does even if the machine speeds up or slows down mid-run
        elapsed = time.perf_counter() - t0
        progress = step / cfg.max_steps if cfg.max_steps else elapsed / cfg.time_budget_s
        if progress >= 1.0 or elapsed > cfg.time_budget_s:
            break
        if pos + cfg.batch_size > len(data):
            perm, pos = torch.randperm(len(data), generator=g), 0
        idx = perm[pos : pos + cfg.batch_size]
        pos += cfg.batch_size
        x = data[idx].float().div_(255.0)
        flip = (torch.rand(len(idx), generator=g) < 0.5).view(-1, *([1] * (x.ndim - 1)))
        x = torch.where(flip, x.flip(-1), x)
        # linear warm-up then half-cycle cosine (MAE), as functions of progress
        if progress < cfg.warmup_frac:
            scale = max(progress, 1e-3) / cfg.warmup_frac
        else:
            t = (progress - cfg.warmup_frac) / max(1.0 - cfg.warmup_frac, 1e-9)
            scale = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
        for group in opt.param_groups:
            group["lr"] = cfg.lr * scale
        task.progress_value = progress  # HPM's hard-patch ramp follows the same clock
        out = task({"x": x})
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(task.parameters(), 1.0)
        opt.step()
        step += 1
        seen += len(idx)
        losses.append(float(out["recon_loss"]))
        if cfg.log_every and step % cfg.log_every == 0:
            loads.append(os.getloadavg()[0])
            logger.info(
                "step %d (%.0f%% of budget) loss %.4f (%.0f img/s)",
                step,
                100 * progress,
                np.mean(losses[-cfg.log_every :]),
                seen / (time.perf_counter() - t0),
            )
    secs = time.perf_counter() - t0
    task.eval()
    log = {
        "steps": step,
        "images_seen": seen,
        "epochs": seen / len(data),
        "seconds": secs,
        "images_per_s": seen / secs,
        "loss_first": float(np.mean(losses[:20])) if losses else float("nan"),
        "loss_last": float(np.mean(losses[-50:])) if losses else float("nan"),
        "load_avg_min": min(loads),
        "load_avg_max": max(loads + [os.getloadavg()[0]]),
    }
    return task, log
