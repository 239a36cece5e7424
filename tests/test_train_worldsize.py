"""Resume at another world size: 2 -> 1 and 1 -> 2 CPU processes, plain torch (DDP) and DeepSpeed ZeRO-2
(and ZeRO-3 2 -> 1).

Every case starts from the step-10 checkpoint of an uninterrupted 20-step run of the toy recipe at the other
world size, with the same global batch (2 processes x 16, or 1 process x 16 x ``train.grad_accum=2``).

* Exact: the resumed run is fed, step by step, the very samples the uninterrupted run trained on (read back
  from its ``train.log_keys`` logs: the two ranks' micro-batches of a step become the two accumulated
  micro-batches of one process, and the other way round). Model, optimizer and schedule states restored at
  the new world size then give the same final weights within floating-point tolerance; dropout is off so that
  both runs draw the same random numbers (it draws per process). With DeepSpeed this goes through the
  universal checkpoint that the resume converts.
* Through ``mmtok train --resume auto`` with the real data loader: the log says the world size changed (and,
  for DeepSpeed, that the checkpoint is converted), the final training loss is within 0.1 of the uninterrupted
  run's (the data order of the last 10 steps differs there), and the keys logged before and after the change
  are every training sample exactly once in epoch 0 (the reader re-splits the rest of the epoch over the new
  consumers). Likewise for another ``data.num_workers`` at the same world size.
"""

from __future__ import annotations

import collections
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from launching import child_env, free_port
from safetensors.torch import load_file

from mmtok.train import checkpoint as ckpt

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "configs" / "toy" / "fmnist_classifier.yaml"
BIN = Path(sys.executable).parent
STEPS, MID = 20, 10

# Feeds train() the batches named in a plan: {rank: [[keys of one micro-batch], ...]}, in training order.
DRIVER = """
import json, logging, os, sys
from mmtok.data.reader import ShardDataset
from mmtok.train.config import load_run_config
from mmtok.train.engine import create_task, train

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
plan_path, config, *overrides = sys.argv[1:]
plan = json.load(open(plan_path))
cfg = load_run_config([config], overrides)
task = create_task(cfg)
transform = task.sample_transform("train")
samples = {s["__key__"]: transform(s) for s in ShardDataset(cfg.data.train)}
rank = os.environ.get("RANK", "0")
batches = [task.collate([samples[k] for k in keys]) for keys in plan[rank]]
train(cfg, resume="auto", train_data=batches)
"""


def _overrides(shards: Path, out: Path, backend: str, world: int) -> list[str]:
    args = [
        f"data.train={shards}/train-*.tar",
        f"data.val={shards}/test-*.tar",
        f"output_dir={out}",
        "data.batch_size=16",
        "data.num_workers=0",
        "data.shuffle_buffer=64",
        "task.width=8",
        "task.dropout=0.0",
        f"train.grad_accum={2 // world}",  # the same global batch of 32 at either world size
        f"train.steps={STEPS}",
        f"train.ckpt_every={MID}",
        "train.keep_last=0",
        "train.eval_every=0",
        "train.eval_batches=2",
        "train.progress=false",
        "train.device=cpu",
        "train.log_every=5",
        "train.log_keys=true",
        "optim.warmup_steps=4",
    ]
    if backend.startswith("zero"):  # zero2 | zero3
        args += [f"deepspeed.config={REPO}/configs/ds/{backend}.json", "deepspeed.enabled=true"]
    return args


def _launch(world: int, entry: list[str], args: list[str]) -> str:
    """Run ``entry`` (``-m mmtok.train`` or a script) on ``world`` processes; returns the combined log."""
    if world == 1:
        cmd = [sys.executable, *entry, *args]
    else:
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", str(world), "--master_port", str(free_port()), *entry]
        cmd += args
    res = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, cwd=REPO, timeout=400)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    return log


def _train(world: int, args: list[str]) -> str:
    return _launch(world, ["-m", "mmtok.train", "--config", str(TOY), "--resume", "auto"], args)


_RUNS: dict[tuple[str, int], Path] = {}


@pytest.fixture(scope="module")
def uninterrupted(fmnist_shards, tmp_path_factory):
    """``(backend, world) -> run folder`` of the uninterrupted run (made once per module)."""

    def get(backend: str, world: int) -> Path:
        if (backend, world) not in _RUNS:
            out = tmp_path_factory.mktemp(f"full_{backend}_{world}") / "run"
            _train(world, _overrides(fmnist_shards, out, backend, world))
            _RUNS[backend, world] = out
        return _RUNS[backend, world]

    yield get
    _RUNS.clear()


def _resumable_copy(full: Path, dest: Path) -> Path:
    """A fresh run folder holding only the mid-way checkpoint of ``full``."""
    shutil.copytree(full / "checkpoints" / f"step-{MID:08d}", dest / "checkpoints" / f"step-{MID:08d}")
    return dest


def _plan(full: Path, world_from: int, world_to: int) -> dict[str, list[list[str]]]:
    """The micro-batches of steps MID+1..STEPS of ``full``, dealt out to ``world_to`` ranks."""
    lines = []
    for f in sorted((full / "keys").glob("rank-*.jsonl")):
        lines += [json.loads(line) for line in f.read_text().splitlines()]
    plan: dict[str, list[list[str]]] = {str(r): [] for r in range(world_to)}
    for step in range(MID + 1, STEPS + 1):
        # in step order, ranks in order, micro-batches in the order each rank drew them
        micro = [d["keys"] for d in sorted((d for d in lines if d["step"] == step), key=lambda d: d["rank"])]
        assert len(micro) == 2, f"step {step}: expected 2 micro-batches in all, got {len(micro)}"
        if world_to == 1:
            plan["0"] += micro
        else:
            for r in range(world_to):
                plan[str(r)].append(micro[r])
    return plan


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "export" / "model.safetensors"))


_DS = pytest.mark.deepspeed
CASES = [
    ("torch", 2, 1),
    ("torch", 1, 2),
    pytest.param("zero2", 2, 1, marks=_DS),
    pytest.param("zero2", 1, 2, marks=_DS),
]


@pytest.mark.parametrize(("backend", "world_from", "world_to"), [*CASES, pytest.param("zero3", 2, 1, marks=_DS)])
def test_resume_other_world_size_same_samples_same_weights(
    backend, world_from, world_to, uninterrupted, fmnist_shards, tmp_path
):
    if backend != "torch":
        pytest.importorskip("deepspeed")
    full = uninterrupted(backend, world_from)
    out = _resumable_copy(full, tmp_path / "resumed")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(_plan(full, world_from, world_to)))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    log = _launch(world_to, [str(driver)], [str(plan), str(TOY), *_overrides(fmnist_shards, out, backend, world_to)])
    assert f"written by {world_from} process(es), this run has {world_to}" in log
    if backend != "torch":
        assert "universal checkpoint" in log
        assert (out / "checkpoints" / f"step-{MID:08d}" / ckpt.UNIVERSAL_NAME / "zero").is_dir()
    state = ckpt.read_state(out / "checkpoints" / f"step-{STEPS:08d}")
    assert state["world_size"] == world_to and state["step"] == STEPS
    a, b = _final_weights(full), _final_weights(out)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    # and the weights did move over the last 10 steps (the comparison is not between two idle models)
    mid = load_file(str(full / "checkpoints" / f"step-{MID:08d}" / "model.safetensors"))
    assert max(float((a[k] - mid[k]).abs().max()) for k in a) > 1e-3


@pytest.mark.parametrize(("backend", "world_from", "world_to"), CASES)
def test_cli_resume_auto_other_world_size(backend, world_from, world_to, uninterrupted, fmnist_shards, tmp_path):
    if backend != "torch":
        pytest.importorskip("deepspeed")
    full = uninterrupted(backend, world_from)
    out = _resumable_copy(full, tmp_path / "resumed")
    log = _train(world_to, _overrides(fmnist_shards, out, backend, world_to))
    assert f"world size changed: {out / 'checkpoints' / f'step-{MID:08d}'} was written by {world_from}" in log
    if backend != "torch":
        assert "converting" in log and "universal checkpoint" in log
    summary = json.loads((out / "run_summary.json").read_text())
    reference = json.loads((full / "run_summary.json").read_text())
    assert summary["steps"] == STEPS and summary["resumed_from"].endswith(f"step-{MID:08d}")
    start = json.loads((full / "metrics.jsonl").read_text().splitlines()[0])["loss"]  # step 1, about ln 10
    assert reference["train"]["loss"] < start - 0.2  # the reference run did learn something
    assert abs(summary["train"]["loss"] - reference["train"]["loss"]) < 0.1
    _assert_epoch0_once(fmnist_shards, full, out)


def _keys_of(run: Path, steps: range, epoch: int) -> collections.Counter:
    seen: collections.Counter = collections.Counter()
    for f in sorted((run / "keys").glob("rank-*.jsonl")):
        for line in f.read_text().splitlines():
            d = json.loads(line)
            if d["step"] in steps and d["epoch"] == epoch:
                seen.update(d["keys"])
    return seen


def _assert_epoch0_once(shards: Path, before: Path, after: Path) -> None:
    """Epoch 0 = the keys logged up to the checkpoint by the first run plus those the resumed run logged: every
    training sample exactly once (an epoch is 15 steps of 32 samples, so both runs end inside epoch 1)."""
    seen = _keys_of(before, range(1, MID + 1), 0) + _keys_of(after, range(MID + 1, STEPS + 1), 0)
    assert _keys_of(after, range(MID + 1, STEPS + 1), 1), "the resumed run never reached epoch 1"
    expected = set()
    for shard in shards.glob("train-*.tar"):
        with tarfile.open(shard) as tf:
            expected |= {m.name.split(".", 1)[0] for m in tf.getmembers() if m.isfile()}
    repeated = sorted(k for k, n in seen.items() if n > 1)
    missing = sorted(expected - set(seen))
    assert not repeated and not missing, f"epoch 0: {len(repeated)} seen twice {repeated[:4]}, {len(missing)} missing"
    assert len(expected) == 480


def test_cli_resume_other_num_workers(uninterrupted, fmnist_shards, tmp_path):
    """The same world size with another data.num_workers (0 -> 2): the rest of the epoch is re-split over the
    new workers, each sample once."""
    full = uninterrupted("torch", 1)
    out = _resumable_copy(full, tmp_path / "resumed")
    log = _train(1, [*_overrides(fmnist_shards, out, "torch", 1), "data.num_workers=2"])
    assert "world size changed" not in log
    assert json.loads((out / "run_summary.json").read_text())["steps"] == STEPS
    _assert_epoch0_once(fmnist_shards, full, out)
