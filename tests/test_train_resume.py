"""Kill-and-resume: a `mmtok train` process SIGKILLed after a mid-way checkpoint and started again
ends bitwise equal to an uninterrupted run (CPU, fp32, deterministic), with 0 and 2 data workers.

Also checks the toy config end to end through the CLI (`mmtok train`, `mmtok eval run`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmtok.hub import CheckpointError
from mmtok.train import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "configs" / "toy" / "fmnist_classifier.yaml"


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


# -- resume past a damaged checkpoint -----------------------------------------------------------------------


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


DAMAGE = {
    "optimizer_truncated": lambda d: _truncate(d / ckpt.OPTIM_NAME),
    "optimizer_deleted": lambda d: (d / ckpt.OPTIM_NAME).unlink(),
    "optimizer_empty": lambda d: (d / ckpt.OPTIM_NAME).write_bytes(b""),
    "weights_truncated": lambda d: _truncate(d / ckpt.MODEL_NAME),
    "weights_cut_in_header": lambda d: (d / ckpt.MODEL_NAME).write_bytes((d / ckpt.MODEL_NAME).read_bytes()[:20]),
    "weights_deleted": lambda d: (d / ckpt.MODEL_NAME).unlink(),
    "state_garbled": lambda d: (d / ckpt.STATE_NAME).write_text('{"step": 5'),
}


@pytest.fixture(scope="module")
def short_run(fmnist_shards, tmp_path_factory):
    """A finished 50-step toy run with checkpoints at steps 25 and 50, and its summary."""
    out = tmp_path_factory.mktemp("short") / "run"
    summary = _run(_cmd(fmnist_shards, out, "train.steps=50", "train.keep_last=3"))
    names = [p.name for p in ckpt.list_checkpoints(out / "checkpoints")]
    assert names == ["step-00000025", "step-00000050"]
    return out, summary


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_auto_resume_skips_a_damaged_newest_checkpoint(short_run, tmp_path, caplog, damage):
    run = _copy_run(short_run[0], tmp_path / "run")
    root = run / "checkpoints"
    newest = root / "step-00000050"
    assert ckpt.checkpoint_problem(newest) is None
    DAMAGE[damage](newest)
    assert ckpt.checkpoint_problem(newest) is not None
    with caplog.at_level("WARNING", logger="mmtok.train.checkpoint"):
        assert ckpt.resolve_resume("auto", root).name == "step-00000025"
    assert "step-00000050" in caplog.text  # the warning names what was skipped, and why
    assert ckpt.find_latest(root).name == "step-00000025"
    assert ckpt.resolve_resume(str(run), root).name == "step-00000025"  # a run folder: the same fallback
    with pytest.raises(CheckpointError, match="damaged"):  # named explicitly: refused with the reason
        ckpt.resolve_resume(str(newest), root)
    # Nothing complete left: refuse (naming each) rather than silently start from step 0.
    DAMAGE[damage](root / "step-00000025")
    with pytest.raises(CheckpointError, match="no complete checkpoint.*step-00000050.*step-00000025.*--resume never"):
        ckpt.resolve_resume("auto", root)


def test_cli_resume_auto_falls_back_past_damage(short_run, fmnist_shards, tmp_path):
    """`mmtok train --resume auto` on a run whose newest checkpoint lost its optimizer state: it resumes from
    the older one, says so, and (deterministic CPU) ends bitwise equal to the undamaged run."""
    done, summary_done = short_run
    run = _copy_run(done, tmp_path / "run")
    _truncate(run / "checkpoints" / "step-00000050" / ckpt.OPTIM_NAME)
    shutil.rmtree(run / "export")
    cmd = _cmd(fmnist_shards, run, "train.steps=50", "train.keep_last=3")
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "step-00000050" in res.stderr and "optimizer.pt" in res.stderr and "Traceback" not in res.stderr
    summary = json.loads(res.stdout[res.stdout.index("{") :])
    assert summary["resumed_from"].endswith("step-00000025") and summary["steps"] == 50
    a, b = _weights(done / "export"), _weights(run / "export")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ckpt.checkpoint_problem(run / "checkpoints" / "step-00000050") is None  # rewritten whole
    # Every checkpoint damaged: one line, exit status 2, nothing started.
    for step in ("step-00000025", "step-00000050"):
        (run / "checkpoints" / step / ckpt.MODEL_NAME).unlink()
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 2 and "no complete checkpoint" in res.stderr and "Traceback" not in res.stderr


def test_weight_average_resumes_exactly_and_is_what_eval_and_export_see(fmnist_shards, tmp_path):
    """``train.ema_decay``: a SIGKILLed run resumes its weight average bit for bit (ema.safetensors in each
    checkpoint); the export and the run's evaluation use the average, `mmtok eval run` too unless --weights live."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    extra = ["train.ema_decay=0.95", "train.steps=90"]
    summary_full = _run(_cmd(fmnist_shards, full, *extra))
    assert 0 < _kill_after_first_checkpoint(_cmd(fmnist_shards, killed, *extra), killed) < 90
    summary = _run(_cmd(fmnist_shards, killed, *extra))
    assert summary["resumed_from"] is not None and summary["eval"] == summary_full["eval"]
    a, b = _weights(full / "export"), _weights(killed / "export")
    assert all(torch.equal(a[k], b[k]) for k in a)
    last = ckpt.find_latest(full / "checkpoints")
    assert ckpt.read_state(last)["ema_updates"] == 90
    average, live = load_file(str(last / "ema.safetensors")), _weights(last)
    assert all(torch.equal(a[k], average[k]) for k in average)  # the export is the average...
    assert any(not torch.equal(live[k], average[k]) for k in average)  # ...which is not the live weights

    def eval_run(*flags: str) -> dict:
        cmd = [sys.executable, "-m", "mmtok.cli.main", "eval", "run", "--run", str(full), "--batches", "5", *flags]
        return _run(cmd)

    auto, live_eval = eval_run(), eval_run("--weights", "live")
    assert auto["weights"] == "ema" and live_eval["weights"] == "live"
    assert auto["metrics"]["accuracy"] == pytest.approx(summary_full["eval"]["accuracy"], abs=1e-6)
    assert live_eval["metrics"] != auto["metrics"]
    # a damaged average makes the checkpoint unusable for a resume, like damaged weights
    (last / "ema.safetensors").write_bytes((last / "ema.safetensors").read_bytes()[:-10])
    assert "ema.safetensors" in ckpt.checkpoint_problem(last)
