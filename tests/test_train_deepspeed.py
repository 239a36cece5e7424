"""DeepSpeed on CPU: 2 processes (gloo), ZeRO-2 under the `deepspeed` launcher and ZeRO-3 under
`torchrun`; train, checkpoint, get SIGKILLed mid-way, resume, and match the uninterrupted run within
floating-point tolerance. Also checks the resolved ds_config.json and the per-rank data positions.
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
from launching import free_port
from safetensors.torch import load_file

from mmtok.train import checkpoint as ckpt

pytest.importorskip("deepspeed")
pytestmark = [pytest.mark.deepspeed, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "configs" / "toy" / "fmnist_classifier.yaml"
BIN = Path(sys.executable).parent
STEPS = 80


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONHASHSEED="0", PYTHONPATH=str(REPO))
    return env


def _cmd(launcher: str, stage: int, shards: Path, out: Path, *extra: str) -> list[str]:
    port = str(free_port())
    if launcher == "deepspeed":
        head = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", port, "--module", "mmtok.train"]
    else:
        head = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", port, "-m", "mmtok.train"]
    return [
        *head,
        "--config",
        str(TOY),
        f"deepspeed.config={REPO}/configs/ds/zero{stage}.json",
        "deepspeed.enabled=true",
        f"data.train={shards}/train-*.tar",
        f"data.val={shards}/test-*.tar",
        f"output_dir={out}",
        "data.batch_size=16",
        "data.num_workers=0",
        "data.shuffle_buffer=64",
        "task.width=16",
        f"train.steps={STEPS}",
        "train.ckpt_every=20",
        "train.log_every=20",
        "train.eval_every=0",
        "train.eval_batches=4",
        "train.progress=false",
        "train.device=cpu",
        "optim.warmup_steps=10",
        *extra,
    ]


def _run(cmd: list[str]) -> None:
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, cwd=REPO, timeout=400)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]


def _kill_group_after_first_checkpoint(cmd: list[str], out: Path) -> int:
    proc = subprocess.Popen(
        cmd, env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            latest = ckpt.find_latest(out / "checkpoints")
            if latest is not None:
                os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks at once
                break
            if proc.poll() is not None:
                pytest.fail(f"DeepSpeed run exited with {proc.returncode} before its first checkpoint")
            time.sleep(0.01)
        else:
            pytest.fail("no checkpoint appeared in time")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "export").exists(), "the run finished before it could be killed"
    return int(ckpt.read_state(latest)["step"])


@pytest.mark.parametrize(("launcher", "stage"), [("deepspeed", 2), ("torchrun", 3)])
def test_deepspeed_zero_kill_and_resume(fmnist_shards, tmp_path, launcher, stage):
    """ZeRO-2 runs with a weight average (train.ema_decay), which ZeRO-3 refuses."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    ema = ["train.ema_decay=0.9"] if stage < 3 else []
    _run(_cmd(launcher, stage, fmnist_shards, full, *ema))

    ds = json.loads((full / "ds_config.json").read_text())
    assert '"auto"' not in json.dumps(ds)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["train_batch_size"] == 16 * 2 and ds["bf16"]["enabled"] is False
    assert json.loads((full / "env.json").read_text())["backend"] == "deepspeed"
    state = ckpt.read_state(ckpt.find_latest(full / "checkpoints"))
    assert state["backend"] == "deepspeed" and state["world_size"] == 2 and state["step"] == STEPS
    assert [r["data"]["rank"] for r in state["ranks"]] == [0, 1]  # each rank's own stream position

    killed_at = _kill_group_after_first_checkpoint(_cmd(launcher, stage, fmnist_shards, killed, *ema), killed)
    assert 0 < killed_at < STEPS
    _run(_cmd(launcher, stage, fmnist_shards, killed, *ema))

    a, b = (
        load_file(str(full / "export" / "model.safetensors")),
        load_file(str(killed / "export" / "model.safetensors")),
    )
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    # the resumed run restored both ranks' data positions: its final positions equal the full run's
    resumed = ckpt.read_state(ckpt.find_latest(killed / "checkpoints"))
    assert [r["data"] for r in resumed["ranks"]] == [r["data"] for r in state["ranks"]]
    # the model weights in a DeepSpeed checkpoint are plain safetensors (no DeepSpeed needed to read them); the
    # export holds them, or with train.ema_decay the weight average saved beside them
    folder = ckpt.find_latest(full / "checkpoints")
    last = load_file(str(folder / ("ema.safetensors" if ema else "model.safetensors")))
    assert all(torch.equal(last[k], a[k]) for k in last)
    if ema:
        assert state["ema_updates"] == STEPS
        live = load_file(str(folder / "model.safetensors"))
        assert any(not torch.equal(live[k], a[k]) for k in a)


def test_single_process_deepspeed_zero3_and_eval_run(fmnist_shards, tmp_path):
    """No launcher: `mmtok train deepspeed.enabled=true` makes a world of one; `mmtok eval run` reads the
    ZeRO-3 checkpoint's safetensors weights without DeepSpeed."""
    out = tmp_path / "one"
    cmd = _cmd("torchrun", 3, fmnist_shards, out)
    cmd = [sys.executable, "-m", "mmtok.cli.main", "train", *cmd[cmd.index("--config") :], "train.steps=6"]
    env = {k: v for k, v in _env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=400)
    assert res.returncode == 0, res.stderr[-4000:]
    summary = json.loads(res.stdout[res.stdout.index("{") :])
    assert summary["steps"] == 6 and json.loads((out / "ds_config.json").read_text())["train_batch_size"] == 16
    res = subprocess.run(
        [sys.executable, "-m", "mmtok.cli.main", "eval", "run", "--run", str(out), "--batches", "4"],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    result = json.loads(res.stdout[res.stdout.index("{") :])
    assert result["metrics"]["accuracy"] == pytest.approx(summary["eval"]["accuracy"], abs=1e-6)
