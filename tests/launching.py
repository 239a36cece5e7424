"""Helpers of the tests that start other processes (torchrun, DeepSpeed, the CLI): import as
``from launching import free_port``."""

from __future__ import annotations

import os
import socket
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a rendezvous or a test server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def short_run_args(scenes: object, out: object, steps: int, batch_size: int) -> list[str]:
    """Overrides of a few-step, single-process CPU run on a small shard folder (``train-*`` / ``val-*``): no
    resampling, no evaluation or checkpoints mid-run, no schedule tricks, output in ``out``."""
    return [
        f"data.train={scenes}/train-*.tar",
        f"data.val={scenes}/val-*.tar",
        f"data.batch_size={batch_size}",
        "data.num_workers=0",
        "data.shuffle_buffer=8",
        "data.resampled=false",
        "data.epoch_length=0",
        f"train.steps={steps}",
        "train.eval_every=0",
        "train.eval_batches=1",
        "train.ckpt_every=0",
        "train.max_seconds=0",
        "train.schedule_by_time=false",
        "train.progress=false",
        "train.device=cpu",
        "optim.warmup_steps=0",
        f"output_dir={out}",
    ]


def child_env() -> dict[str, str]:
    """The environment of a launched training: this one without any launcher's rank variables (a test may itself
    run under torchrun or SLURM), one thread per process, DeepSpeed on the CPU, the repository importable."""
    drop = ("SLURM_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env
