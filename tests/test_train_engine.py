"""Training engine: schedule, accumulation, clipping, checkpoints, RNG, logs, DeepSpeed config resolution.

These tests drive ``train()`` with a small in-memory loader (exact ``state_dict``), so they run in
seconds; the shard-based kill-and-resume and DeepSpeed runs live in test_train_resume.py and
test_train_deepspeed.py. Every run writes under ``tmp_path``; tests that expect a run to be refused
work from an empty ``tmp_path`` and check that nothing appeared in it.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mmtok import hub
from mmtok.config import ConfigError
from mmtok.data.config import DataConfig
from mmtok.hub import CheckpointError
from mmtok.train import checkpoint as ckpt
from mmtok.train.config import OptimConfig, TrainConfig, load_run_config
from mmtok.train.distributed import DistributedSetupError, resolve_ds_config
from mmtok.train.engine import create_task, seed_everything, train
from mmtok.train.metrics import read_metrics
from mmtok.train.optim import build_optimizer, build_scheduler, lr_factor

REPO = Path(__file__).resolve().parents[1]


class ListLoader:
    """Batches of a fixed tensor dataset; reshuffled per epoch; exact position in ``state_dict``."""

    def __init__(self, n: int = 48, batch_size: int = 8, seed: int = 0, shuffle: bool = True):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 1, 28, 28, generator=g) * 2 - 1
        self.labels = torch.randint(0, 10, (n,), generator=g)
        self.batch_size, self.shuffle = batch_size, shuffle
        self.epoch = self.pos = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        n = len(self.labels)
        order = (
            torch.randperm(n, generator=torch.Generator().manual_seed(self.epoch)) if self.shuffle else torch.arange(n)
        )
        while self.pos + self.batch_size <= n:
            idx = order[self.pos : self.pos + self.batch_size]
            self.pos += self.batch_size
            yield {"image": self.images[idx], "label": self.labels[idx]}
        self.pos = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]


def _cfg(out: Path, *overrides: str):
    base = [
        "task.name=toy_classifier",
        "task.width=8",
        f"output_dir={out}",
        "train.steps=8",
        "train.log_every=2",
        "train.progress=false",
        "train.deterministic=true",
        "optim.warmup_steps=2",
        "data.batch_size=8",
    ]
    return load_run_config([], [*base, *overrides])


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


# -- schedule and optimizer -------------------------------------------------------------------------
def test_warmup_cosine_schedule_values():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    factors = [lr_factor(s, cfg, 14) for s in range(14)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]  # linear warm-up, never 0
    assert factors[4] == pytest.approx(1.0)  # cosine starts at the peak
    assert factors[-1] == pytest.approx(0.1)  # and ends at min_lr_ratio on the last step
    mid = 4 + (14 - 4 - 1) / 2  # half-way through the cosine: (1 + 0.1) / 2
    assert lr_factor(mid, cfg, 14) == pytest.approx(0.55)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))
    assert [lr_factor(s, OptimConfig(schedule="constant", warmup_steps=2), 10) for s in (0, 1, 5, 9)] == [0.5, 1, 1, 1]


def test_scheduler_drives_optimizer_lr():
    p = torch.nn.Parameter(torch.zeros(2, 2))
    cfg = OptimConfig(lr=0.1, warmup_steps=2)
    opt = build_optimizer([{"params": [p], "weight_decay": 0.0}], cfg)
    sched = build_scheduler(opt, cfg, 5)
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.1 * lr_factor(s, cfg, 5) for s in range(5)])


# -- the loop ----------------------------------------------------------------------------------------
def test_train_writes_run_folder(tmp_path):
    out = tmp_path / "run"
    summary = train(
        _cfg(out, "train.ckpt_every=4", "train.eval_every=4"),
        train_data=ListLoader(),
        val_data=ListLoader(16, 8, seed=1),
    )
    assert summary["steps"] == 8 and summary["resumed_from"] is None
    for name in ("config.yaml", "env.json", "metrics.jsonl", "export/model.safetensors", "export/config.json"):
        assert (out / name).is_file(), name
    assert list((out / "tb").glob("events.out.tfevents.*"))
    env = json.loads((out / "env.json").read_text())
    assert env["packages"]["torch"] and env["packages"]["deepspeed"]
    assert "sha" in env["git"] and env["backend"] == "single" and env["precision"] == "fp32"
    assert load_run_config([out / "config.yaml"]).train.steps == 8  # the resolved config reloads
    rows = read_metrics(out)
    train_rows = [r for r in rows if "split" not in r]
    eval_rows = [r for r in rows if r.get("split") == "eval"]
    assert [r["step"] for r in train_rows] == [1, 2, 4, 6, 8]
    assert {"loss", "accuracy", "lr", "grad_norm", "samples_per_s", "epoch"} <= set(train_rows[0])
    assert [r["step"] for r in eval_rows] == [4, 8] and 0.0 <= eval_rows[-1]["accuracy"] <= 1.0
    assert train_rows[0]["lr"] == pytest.approx(1e-3 * 0.5)  # first warm-up step
    # checkpoints: steps 4 and 8 kept (keep_last=2), latest points to 8
    names = [p.name for p in ckpt.list_checkpoints(out / "checkpoints")]
    assert names == ["step-00000004", "step-00000008"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000008"
    # the export rebuilds the task from its own folder and holds the final weights
    task = hub.from_pretrained(out / "export", kind="task")
    final = _weights(out / "checkpoints" / "step-00000008")
    assert all(torch.equal(task.state_dict()[k], v) for k, v in final.items())


def test_resume_from_checkpoint_is_bitwise_exact(tmp_path):
    full = tmp_path / "full"
    cfg = ["train.ckpt_every=3", "train.keep_last=0", "task.dropout=0.3"]
    train(_cfg(full, *cfg), train_data=ListLoader())  # 48 samples / 8 = 6 batches: crosses an epoch at step 6
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-00000003", resumed / "checkpoints" / "step-00000003")
    summary = train(_cfg(resumed, *cfg), train_data=ListLoader())
    assert summary["resumed_from"].endswith("step-00000003")
    a, b = _weights(full / "export"), _weights(resumed / "export")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # metrics.jsonl of the resumed run starts after the checkpoint
    assert [r["step"] for r in read_metrics(resumed)] == [4, 6, 8]


def test_resume_auto_never_and_explicit(tmp_path):
    out = tmp_path / "run"
    train(_cfg(out, "train.ckpt_every=4"), train_data=ListLoader())
    again = train(_cfg(out, "train.ckpt_every=4"), train_data=ListLoader())  # finished run: nothing to do
    assert again["steps"] == 8 and again["resumed_from"].endswith("step-00000008")
    fresh = train(_cfg(out, "train.ckpt_every=4"), resume="never", train_data=ListLoader())
    assert fresh["resumed_from"] is None
    explicit = train(_cfg(out, "train.steps=8"), resume=str(out), train_data=ListLoader())
    assert explicit["resumed_from"].endswith("step-00000008")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        train(_cfg(out), resume=str(tmp_path / "nothing"), train_data=ListLoader())


def test_grad_accumulation_matches_big_batch(tmp_path):
    common = ["task.dropout=0.0", "train.steps=3", "optim.warmup_steps=0", "train.grad_clip=0"]
    train(
        _cfg(tmp_path / "accum", *common, "train.grad_accum=2", "data.batch_size=4"),
        train_data=ListLoader(batch_size=4, shuffle=False),
    )
    train(_cfg(tmp_path / "big", *common, "data.batch_size=8"), train_data=ListLoader(batch_size=8, shuffle=False))
    a, b = _weights(tmp_path / "accum" / "export"), _weights(tmp_path / "big" / "export")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_grad_clipping_bounds_the_update(tmp_path):
    # Plain SGD (no momentum, no decay, lr 1): the update of one step is exactly the clipped gradient.
    clip = 1e-3
    opts = ["optim.name=sgd", "optim.betas=[0.0,0.0]", "optim.weight_decay=0", "optim.lr=1.0", "optim.warmup_steps=0"]
    out = tmp_path / "clip"
    cfg = _cfg(out, *opts, "train.steps=1", f"train.grad_clip={clip}", "optim.schedule=constant")
    train(cfg, train_data=ListLoader())
    seed_everything(cfg.train.seed)  # the engine seeds, then builds the task: the same initial weights
    b = create_task(cfg).state_dict()
    a = _weights(out / "export")
    delta = math.sqrt(sum(float(((a[k] - b[k]).double() ** 2).sum()) for k in a))
    assert delta == pytest.approx(clip, rel=1e-3)
    logged = read_metrics(out)[0]["grad_norm"]
    assert logged > 100 * clip  # the pre-clip norm is what is logged


# -- checkpoint mechanics ----------------------------------------------------------------------------
def test_rng_state_roundtrip():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(1), np.random.randn()  # leave a cached gaussian
    state = json.loads(json.dumps(ckpt.capture_rng_state()))  # must survive JSON
    expected = (random.random(), np.random.randn(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.restore_rng_state(state)
    got = (random.random(), np.random.randn(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_checkpoint_folder_atomic_latest_and_pruning(tmp_path):
    root = tmp_path / "checkpoints"
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in (1, 2, 3):
        tmp = ckpt.prepare_tmp(root, step)
        ckpt.save_model_state(model, tmp)  # whole folders, as the engine writes them
        ckpt.save_optimizer_state(opt, tmp)
        ckpt.write_state(tmp, {"step": step})
        ckpt.finalize(root, step, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-00000002", "step-00000003"]
    # a process killed mid-write leaves only a .tmp folder, which is never taken for a checkpoint
    half = ckpt.prepare_tmp(root, 4)
    (half / "model.safetensors").write_bytes(b"partial")
    assert ckpt.find_latest(root).name == "step-00000003"
    ckpt.clean_stale(root)
    assert not half.exists()
    # a dangling latest pointer falls back to the newest complete folder
    (root / "latest").write_text("step-00000099\n")
    assert ckpt.find_latest(root).name == "step-00000003"
    assert ckpt.resolve_resume("never", root) is None
    assert ckpt.resolve_resume(str(tmp_path), root).name == "step-00000003"  # a run folder works too


def test_metrics_jsonl_is_truncated_on_resume(tmp_path):
    from mmtok.train.metrics import MetricsWriter

    w = MetricsWriter(tmp_path, tensorboard=False)
    for s in (1, 2, 3, 4):
        w.log(s, {"loss": float(s)})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # torn line of a killed process
    MetricsWriter(tmp_path, tensorboard=False, resume_step=2).close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


# -- config errors -----------------------------------------------------------------------------------
def test_clear_errors_for_bad_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a refused run must leave nothing behind, wherever it would have written
    with pytest.raises(ConfigError, match="task.name"):
        train(load_run_config([], ["output_dir=run0"], validate_task=False), train_data=ListLoader())
    with pytest.raises(ConfigError, match="data.train is empty"):
        train(_cfg(tmp_path / "a"))
    with pytest.raises(ConfigError, match="optim.name"):
        train(_cfg(tmp_path / "b", "optim.name=lamb"), train_data=ListLoader())
    with pytest.raises(ConfigError, match="precision"):
        train(_cfg(tmp_path / "c", "train.precision=fp8"), train_data=ListLoader())
    with pytest.raises(ConfigError, match="unknown key 'widht'"):
        cfg = load_run_config([], ["task.name=toy_classifier", "task.widht=3", "output_dir=run1"], validate_task=False)
        train(cfg, train_data=ListLoader())
    # the task's keys are checked before the run folder is made
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_python_api_needs_an_output_dir(tmp_path, monkeypatch):
    # train() used to fall back to runs/default under the current directory (the repository, in tests).
    monkeypatch.chdir(tmp_path)
    cfg = load_run_config([], ["task.name=toy_classifier", "task.width=8", "train.steps=1", "train.progress=false"])
    with pytest.raises(ConfigError, match="output_dir is not set"):
        train(cfg, train_data=ListLoader())
    assert list(tmp_path.iterdir()) == []


def test_blocks_validate_in_python_as_in_yaml():
    with pytest.raises(ConfigError, match="train.steps must be >= 1"):
        TrainConfig(steps=0)
    with pytest.raises(ConfigError, match="data.num_workers must be >= 0"):
        DataConfig(num_workers=-1)
    with pytest.raises(ConfigError, match="optim.lr must be"):
        OptimConfig(lr=-1.0)
    with pytest.raises(ConfigError, match="schedule_by_time needs a budget"):
        TrainConfig(schedule_by_time=True)
    with pytest.raises(ConfigError, match="max_seconds must be >= 0"):
        TrainConfig(max_seconds=-1)
    with pytest.raises(ConfigError, match="min_steps is a floor under a wall-clock budget"):
        TrainConfig(min_steps=10)
    with pytest.raises(ConfigError, match="min_steps must be >= 0"):
        TrainConfig(min_steps=-1, max_seconds=5)


def test_blocks_edited_in_place_are_checked_again(tmp_path):
    cfg = _cfg(tmp_path / "run")
    cfg.data.shuffle_buffer = -5
    with pytest.raises(ConfigError, match="data.shuffle_buffer"):
        train(cfg, train_data=ListLoader())
    assert not (tmp_path / "run").exists()


# -- wall-clock budget -------------------------------------------------------------------------------
def test_max_seconds_stops_evaluates_checkpoints_and_exports(tmp_path):
    out = tmp_path / "run"
    # 1 microsecond: spent during the first step, which a fresh run always takes.
    budget = ["train.steps=1000", "train.max_seconds=1e-6", "train.ckpt_every=500"]
    summary = train(_cfg(out, *budget), train_data=ListLoader(), val_data=ListLoader(16, 8, seed=1))
    assert summary["steps"] == 1 and summary["planned_steps"] == 1000 and summary["stopped_by"] == "max_seconds"
    assert summary["eval"] and (out / "export" / "model.safetensors").is_file()
    recorded = json.loads((out / "run_summary.json").read_text())
    assert recorded["stopped_by"] == "max_seconds" and recorded["steps"] == 1 and recorded["planned_steps"] == 1000
    rows = read_metrics(out)
    assert [r["step"] for r in rows if "split" not in r] == [1]  # the cut step is logged like a last step
    assert [r["step"] for r in rows if r.get("split") == "eval"] == [1]
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step-00000001"]
    state = ckpt.read_state(out / "checkpoints" / "step-00000001")
    assert state["elapsed_s"] > 0  # the budget is the run's: a resume counts the time already spent

    # resumed with the budget already spent: no step, but still an evaluation and an export
    again = train(_cfg(out, *budget), train_data=ListLoader(), val_data=ListLoader(16, 8, seed=1))
    assert again["steps"] == 1 and again["stopped_by"] == "max_seconds" and again["resumed_from"]
    assert again["eval"] and again["export"]
    # without a budget it goes on to the planned steps
    done = train(_cfg(out, "train.steps=3"), train_data=ListLoader())
    assert done["steps"] == 3 and done["stopped_by"] == "steps"
    assert json.loads((out / "run_summary.json").read_text())["stopped_by"] == "steps"


def test_schedule_by_time_follows_the_clock(tmp_path):
    cfg = OptimConfig(lr=1.0, warmup_steps=2, min_lr_ratio=0.1)
    assert lr_factor(0, cfg, 100, progress=0.9) == 0.5  # warm-up stays in steps
    assert lr_factor(10, cfg, 100, progress=1.0) == pytest.approx(0.1)  # budget spent: the floor
    assert lr_factor(10, cfg, 100, progress=0.0) == lr_factor(10, cfg, 100)  # steps ahead of the clock
    assert lr_factor(10, cfg, 100, progress=0.5) == pytest.approx(0.55)
    # End to end: SGD, lr 1, one clipped step. The budget (1 us) is spent before the step is taken, so
    # the time schedule is at its floor and the update is min_lr_ratio x the clipped gradient.
    clip = 1e-3
    opts = ["optim.name=sgd", "optim.betas=[0.0,0.0]", "optim.weight_decay=0", "optim.lr=1.0", "optim.warmup_steps=0"]
    timed = ["train.steps=50", "train.max_seconds=1e-6", "train.schedule_by_time=true", "optim.min_lr_ratio=0.25"]
    out = tmp_path / "timed"
    run_cfg = _cfg(out, *opts, *timed, f"train.grad_clip={clip}")
    summary = train(run_cfg, train_data=ListLoader())
    assert summary["steps"] == 1 and summary["stopped_by"] == "max_seconds"
    seed_everything(run_cfg.train.seed)
    before = create_task(run_cfg).state_dict()
    after = _weights(out / "export")
    delta = math.sqrt(sum(float(((after[k] - before[k]).double() ** 2).sum()) for k in after))
    assert delta == pytest.approx(0.25 * clip, rel=1e-3)
    assert read_metrics(out)[0]["lr"] == pytest.approx(0.25)


def test_min_steps_is_a_floor_under_the_budget_and_the_schedule_anneals_by_it(tmp_path):
    # The budget (1 us) runs out during the first step; the floor carries the run on to step 4, and the time
    # schedule follows the floor's steps instead of sitting at its minimum from the second step on.
    opts = ["optim.name=sgd", "optim.betas=[0.0,0.0]", "optim.lr=1.0", "optim.warmup_steps=0", "optim.min_lr_ratio=0"]
    timed = ["train.steps=50", "train.max_seconds=1e-6", "train.schedule_by_time=true", "train.log_every=1"]
    out = tmp_path / "floor"
    summary = train(_cfg(out, *opts, *timed, "train.min_steps=4"), train_data=ListLoader())
    assert summary["steps"] == 4 and summary["stopped_by"] == "max_seconds" and summary["planned_steps"] == 50
    assert summary["min_steps"] == 4 and summary["budget_spent_at_step"] == 1
    lrs = [r["lr"] for r in read_metrics(out) if "split" not in r]
    assert lrs == pytest.approx([1.0, 0.75, 0.25, 0.0])  # cosine over steps 0..3 of the floor: 0, 1/3, 2/3, 1
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step-00000004"]
    # a floor above train.steps stops at train.steps
    capped = train(_cfg(tmp_path / "capped", *timed, "train.steps=3", "train.min_steps=10"), train_data=ListLoader())
    assert capped["steps"] == 3 and capped["stopped_by"] == "steps" and capped["min_steps"] == 3
    # a generous budget: the floor changes nothing (the clock, not the floor, drives the rate)
    free = train(
        _cfg(tmp_path / "free", "train.steps=5", "train.max_seconds=3600", "train.min_steps=2"), train_data=ListLoader()
    )
    assert free["steps"] == 5 and free["stopped_by"] == "steps" and free["budget_spent_at_step"] is None


# -- DeepSpeed config resolution ---------------------------------------------------------------------
def _resolve(raw, **kw):
    args = dict(
        micro_batch=8,
        grad_accum=2,
        world_size=4,
        grad_clip=0.5,
        optim=OptimConfig(lr=3e-4, betas=[0.9, 0.95], weight_decay=0.1, warmup_steps=10),
        total_steps=100,
        bf16=False,
        hidden_size=64,
    )
    return resolve_ds_config(raw, **{**args, **kw})


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_shipped_ds_configs_resolve_every_auto(stage):
    raw = json.loads((REPO / "configs" / "ds" / f"zero{stage}.json").read_text())
    cfg = _resolve(raw, bf16=True)
    text = json.dumps(cfg)
    assert '"auto"' not in text
    assert cfg["train_batch_size"] == 8 * 2 * 4 and cfg["train_micro_batch_size_per_gpu"] == 8
    assert cfg["gradient_accumulation_steps"] == 2 and cfg["gradient_clipping"] == 0.5
    assert cfg["zero_optimization"]["stage"] == stage
    # bf16 = fp32 weights under bf16 autocast, as on the torch back-ends: DeepSpeed's torch_autocast mode
    assert cfg["bf16"]["enabled"] is False and cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    params = cfg["optimizer"]["params"]
    assert cfg["optimizer"]["type"] == "AdamW" and params["lr"] == 3e-4 and params["betas"] == [0.9, 0.95]
    assert params["weight_decay"] == 0.1 and params["torch_adam"] is True
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    assert raw["train_batch_size"] == "auto"  # the input is not modified
    assert _resolve(raw, bf16=False)["bf16"]["enabled"] is False  # CPU: fp32
    assert "torch_autocast" not in _resolve(raw, bf16=False)
    assert _resolve(raw, stage=3)["zero_optimization"]["stage"] == 3  # deepspeed.stage override


def test_ds_config_precision_modes():
    assert _resolve({}, bf16=True)["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert "torch_autocast" not in _resolve({}, bf16=False) and "bf16" not in _resolve({}, bf16=False)
    own = _resolve({"bf16": {"enabled": True}}, bf16=True)  # DeepSpeed's bf16 weights, asked for by the JSON
    assert own["bf16"]["enabled"] is True and "torch_autocast" not in own
    assert _resolve({"torch_autocast": {"enabled": "auto"}}, bf16=False)["torch_autocast"]["enabled"] is False
    with pytest.raises(DistributedSetupError, match="the run is fp32"):
        _resolve({"bf16": {"enabled": True}}, bf16=False)


def test_to_dtype_casts_floating_tensors_only():
    from mmtok.train.engine import to_dtype

    batch = {"image": torch.rand(2, 3), "label": torch.tensor([1, 2]), "meta": ["a"], "pair": (torch.ones(1),)}
    out = to_dtype(batch, torch.bfloat16)
    assert out["image"].dtype == torch.bfloat16 and out["label"].dtype == torch.long
    assert out["meta"] == ["a"] and out["pair"][0].dtype == torch.bfloat16


def test_ds_config_contradictions_are_rejected():
    with pytest.raises(DistributedSetupError, match="train_micro_batch_size_per_gpu=16"):
        _resolve({"train_micro_batch_size_per_gpu": 16})
    with pytest.raises(DistributedSetupError, match='"auto" at zero_optimization.foo'):
        _resolve({"zero_optimization": {"stage": 2, "foo": "auto"}})
    with pytest.raises(DistributedSetupError, match="contradicts optim.name"):
        _resolve({"optimizer": {"type": "SGD", "params": {}}})
    sgd = _resolve(
        {"optimizer": {"type": "auto", "params": {"lr": "auto", "torch_adam": True}}},
        optim=OptimConfig(name="sgd", betas=[0.8, 0.0]),
    )
    assert sgd["optimizer"] == {"type": "SGD", "params": {"lr": 1e-3, "weight_decay": 0.05, "momentum": 0.8}}
    sched = _resolve(
        {"scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": "auto", "warmup_num_steps": "auto"}}}
    )
    assert sched["scheduler"]["params"] == {"total_num_steps": 100, "warmup_num_steps": 10}


def test_rank_metrics_merge_by_batches_over_the_ranks_that_report_each_key():
    from mmtok.train.engine import merge_rank_metrics

    gathered = [({"loss": 1.0, "n_acc": 0.5}, 3), ({"loss": 2.0}, 1), ({}, 0)]
    got = merge_rank_metrics(gathered)
    assert got == {"loss": pytest.approx((3 * 1.0 + 2.0) / 4), "n_acc": pytest.approx(0.5)}  # not 0.5 * 3 / 4
    assert merge_rank_metrics([({"loss": 4.0}, 2)]) == {"loss": 4.0}
    assert merge_rank_metrics([({}, 0), ({}, 0)]) == {}
