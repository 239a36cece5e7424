"""Kill-and-resume: a `mmtok train` process SIGKILLed after a mid-way checkpoint and started again
ends bitwise equal to an uninterrupted run (CPU, fp32, deterministic), with 0 and 2 data workers.

Also checks the toy config end to end through the CLI (`mmtok train`, `mmtok eval run`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmtok.train import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "configs" / "toy" / "fmnist_classifier.yaml"


@pytest.fixture(scope="module")
def fmnist_shards(tmp_path_factory):
    from mmtok.data.sources.fashion_mnist import FashionMNISTShardsConfig, build_fashion_mnist

    if not os.path.isdir("/usr/share/datasets/fashion-mnist"):
        pytest.fail("Fashion-MNIST is missing: run `make setup` (Debian package dataset-fashion-mnist)")
    out = tmp_path_factory.mktemp("fmnist")
    build_fashion_mnist(FashionMNISTShardsConfig(out=str(out), limit=480, maxcount=120))
    return out


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    return env


def _cmd(shards: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mmtok.cli.main",
        "train",
        "--config",
        str(TOY),
        f"data.train={shards}/train-*.tar",
        f"data.val={shards}/test-*.tar",
        f"output_dir={out}",
        "data.batch_size=16",
        "data.shuffle_buffer=64",
        "task.width=16",
        "train.steps=150",
        "train.ckpt_every=25",
        "train.keep_last=2",
        "train.log_every=25",
        "train.eval_every=0",
        "train.eval_batches=5",
        "train.deterministic=true",
        "train.progress=false",
        "train.device=cpu",
        "optim.warmup_steps=10",
        *extra,
    ]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _kill_after_first_checkpoint(cmd: list[str], out: Path, timeout: float = 120.0) -> int:
    """Start ``cmd``, SIGKILL it as soon as a complete checkpoint exists; returns that checkpoint's step."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            latest = ckpt.find_latest(out / "checkpoints")
            if latest is not None:
                proc.send_signal(signal.SIGKILL)
                break
            if proc.poll() is not None:
                pytest.fail(f"training exited before its first checkpoint:\n{proc.stderr.read().decode()[-3000:]}")
            time.sleep(0.005)
        else:
            pytest.fail("no checkpoint appeared in time")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed: make it longer"
    assert not (out / "export").exists()
    return int(ckpt.read_state(latest)["step"])


def _run(cmd: list[str]) -> dict:
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout[res.stdout.index("{") :])


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_sigkill_and_resume_is_bitwise_equal(fmnist_shards, tmp_path, workers):
    full, killed = tmp_path / "full", tmp_path / "killed"
    extra = [f"data.num_workers={workers}"]
    summary_full = _run(_cmd(fmnist_shards, full, *extra))
    killed_at = _kill_after_first_checkpoint(_cmd(fmnist_shards, killed, *extra), killed)
    assert 0 < killed_at < 150
    summary = _run(_cmd(fmnist_shards, killed, *extra))
    assert summary["resumed_from"] is not None and summary["steps"] == 150
    a, b = _weights(full / "export"), _weights(killed / "export")
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"resumed weights differ from the uninterrupted run in {differing}"
    assert summary["eval"] == summary_full["eval"]
    # the data stream was resumed, not restarted: the final loader positions agree too
    sa = ckpt.read_state(ckpt.find_latest(full / "checkpoints"))
    sb = ckpt.read_state(ckpt.find_latest(killed / "checkpoints"))
    assert sa["ranks"][0]["data"] == sb["ranks"][0]["data"] and sa["epoch"] == sb["epoch"]
    # metrics.jsonl reads like one run: every logged step once
    steps = [json.loads(x)["step"] for x in (killed / "metrics.jsonl").read_text().splitlines() if "split" not in x]
    assert steps == sorted(set(steps)) and steps[-1] == 150


def test_toy_config_cli_train_and_eval_run(fmnist_shards, tmp_path):
    out = tmp_path / "toy"
    summary = _run(_cmd(fmnist_shards, out, "train.steps=60", "train.eval_every=30", "train.deterministic=false"))
    assert summary["eval"]["accuracy"] > 0.5  # 10 classes: chance is 0.1
    res = subprocess.run(
        [sys.executable, "-m", "mmtok.cli.main", "eval", "run", "--run", str(out), "--batches", "5"],
        env=_env(),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout[res.stdout.index("{") :])
    assert result["step"] == 60
    assert result["metrics"]["accuracy"] == pytest.approx(summary["eval"]["accuracy"], abs=1e-6)
    bad = subprocess.run(
        [sys.executable, "-m", "mmtok.cli.main", "eval", "run", "--run", str(tmp_path / "none")],
        env=_env(),
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert bad.returncode == 2 and "not a run folder" in bad.stderr
