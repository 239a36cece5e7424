"""Plain DistributedDataParallel under torchrun (2 CPU processes, gloo): train, checkpoint, resume
from the mid-way checkpoint in a fresh run folder, and end bitwise equal to the uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmtok.train import checkpoint as ckpt

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "configs" / "toy" / "fmnist_classifier.yaml"


def _run(shards: Path, out: Path, *extra: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        str(Path(sys.executable).parent / "torchrun"),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        "-m",
        "mmtok.train",
        "--config",
        str(TOY),
        f"data.train={shards}/train-*.tar",
        f"data.val={shards}/test-*.tar",
        f"output_dir={out}",
        "data.batch_size=16",
        "data.num_workers=1",
        "data.shuffle_buffer=64",
        "task.width=16",
        "train.steps=40",
        "train.ckpt_every=20",
        "train.keep_last=0",
        "train.eval_every=0",
        "train.eval_batches=4",
        "train.progress=false",
        "train.device=cpu",
        "train.deterministic=true",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("DS_ACCELERATOR", None)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=400)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]


def test_ddp_two_processes_resume_bitwise(fmnist_shards, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _run(fmnist_shards, full)
    assert json.loads((full / "env.json").read_text())["backend"] == "ddp"
    mid = ckpt.read_state(full / "checkpoints" / "step-00000020")
    assert mid["backend"] == "torch" and mid["world_size"] == 2
    assert [r["data"]["rank"] for r in mid["ranks"]] == [0, 1]
    shutil.copytree(full / "checkpoints" / "step-00000020", resumed / "checkpoints" / "step-00000020")
    _run(fmnist_shards, resumed)
    a = load_file(str(full / "export" / "model.safetensors"))
    b = load_file(str(resumed / "export" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ddp_budget_with_a_floor_ends_every_rank_at_the_floor(fmnist_shards, tmp_path):
    # The budget (1 ms) is spent during the first step; the ranks read the clock for the rate every step and
    # must agree on it and on where to stop: no hang, both at step 6, and the rate annealed to the floor.
    out = tmp_path / "floor"
    budget = ["train.max_seconds=0.001", "train.schedule_by_time=true", "train.min_steps=6", "train.log_every=1"]
    _run(fmnist_shards, out, *budget, "train.ckpt_every=0", "optim.warmup_steps=0", "optim.min_lr_ratio=0")
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["steps"] == 6 and summary["stopped_by"] == "max_seconds" and summary["budget_spent_at_step"] == 1
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"lr"' in line]
    assert len(lrs) == 6 and lrs[-1] == pytest.approx(0.0) and all(a > b for a, b in zip(lrs, lrs[1:]))
