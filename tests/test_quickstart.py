"""The quickstart's pieces without a full run: budget plumbing, step commands, baselines and the report writer."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import quickstart  # noqa: E402
import quickstart_report as report  # noqa: E402
from test_readme import check_mmtok  # noqa: E402

TRAIN_STEPS = [s for s in quickstart.STEPS if s.budget]


def test_every_training_step_has_a_budget_and_a_time_schedule():
    from mmtok.train.config import load_run_config

    assert {s.key for s in TRAIN_STEPS} == set(quickstart.BUDGETS)
    for step in TRAIN_STEPS:
        extra = quickstart.train_overrides(step, scale=1.5, tiny=False)
        files = [step.argv[k + 1] for k, w in enumerate(step.argv) if w == "--config"]
        overrides = [w for w in step.argv if "=" in w] + extra
        cfg = load_run_config([ROOT / f for f in files], overrides)  # the real config loader: keys must exist
        assert cfg.train.max_seconds == pytest.approx(quickstart.BUDGETS[step.key] * 1.5)
        assert cfg.train.schedule_by_time is True and cfg.train.reference_steps == 0  # short runs do not warn
        assert cfg.train.min_steps == quickstart.MIN_STEPS[step.key] < cfg.train.steps  # a floor, not the plan
        assert cfg.output_dir.startswith(quickstart.Q + "/")
        assert step.done == f"{cfg.output_dir}/export"
        tiny = load_run_config([ROOT / f for f in files], overrides + quickstart.train_overrides(step, 1.0, True))
        assert tiny.train.max_seconds == 2.0 and tiny.train.min_steps == 0  # smoke runs have no floor
    others = [s for s in quickstart.STEPS if not s.budget]
    assert others and all(quickstart.train_overrides(s, 1.0, False) == [] for s in others)


def test_budgets_leave_room_for_data_and_evaluation():
    """The training budgets must leave data building and evaluation room within ~18 of the 20 minutes."""
    assert sum(quickstart.BUDGETS.values()) <= 15 * 60


def test_every_step_is_a_valid_mmtok_command_line():
    for step in quickstart.STEPS:
        argv = [*step.argv, *quickstart.train_overrides(step, 1.0, False), *step.tiny]
        assert check_mmtok(argv) == [], step.key


def test_deadline_shrinks_budgets_when_the_machine_is_slow():
    steps = quickstart.STEPS
    first = next(s for s in steps if s.budget)
    pending = steps[steps.index(first) :]
    nominal = quickstart.BUDGETS[first.budget]
    assert quickstart.plan_budget(first, pending, 1.0, time_left=10_000, slowdown=1.0) == nominal
    roomy = quickstart.plan_budget(first, pending, 1.0, time_left=1000, slowdown=1.0)
    slow = quickstart.plan_budget(first, pending, 1.0, time_left=1000, slowdown=2.0)
    assert quickstart.MIN_SHARE * nominal <= slow < roomy <= nominal
    # no time left at all: the floor, so that the step still trains something
    assert quickstart.plan_budget(first, pending, 1.0, time_left=0, slowdown=3.0) == pytest.approx(
        quickstart.MIN_SHARE * nominal, abs=0.1
    )
    # a simulated run on a quiet machine that needs shrinking: every step as expected, and it ends on time
    left = 900.0
    for i, s in enumerate(pending):
        if s.budget:
            left -= quickstart.plan_budget(s, pending[i:], 1.0, left, 1.0) + quickstart.TRAIN_OVERHEAD_S
        else:
            left -= quickstart.EXPECTED_S.get(s.key, 0.0)
    assert left >= quickstart.EXPECTED_S["screenshots"] + quickstart.EXPECTED_S["report"] - 1


def test_one_thread_only_when_other_processes_keep_a_core_busy(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(quickstart.os, "cpu_count", lambda: 2)
    # the load average still counts the step that just ended; the CPU use sampled now does not
    monkeypatch.setattr(quickstart.os, "getloadavg", lambda: (2.5, 2.0, 1.0))
    monkeypatch.setattr(quickstart, "busy_cpus", lambda seconds=0.5: 0.1)
    assert quickstart._threads_env({}) == ({}, "default")
    monkeypatch.setattr(quickstart, "busy_cpus", lambda seconds=0.5: 1.6)
    env, threads = quickstart._threads_env({})
    assert env["OMP_NUM_THREADS"] == "1" and threads == "1 (machine busy)"
    monkeypatch.setattr(quickstart, "busy_cpus", lambda seconds=0.5: None)  # no /proc/stat: the load average
    assert quickstart._threads_env({})[1] == "1 (machine busy)"
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's choice wins
    assert quickstart._threads_env({}) == ({}, "2")
    monkeypatch.undo()  # the real reader on this machine
    real = quickstart.busy_cpus(0.2)
    assert real is None or 0.0 <= real <= (os.cpu_count() or 1) + 0.05


def test_budget_note_says_when_the_budget_cut_a_run_short():
    cut = quickstart.budget_note({"stopped_by": "max_seconds", "max_seconds": 90, "steps": 150, "planned_steps": 1500})
    assert "cut this step short" in cut and "150 of 1500" in cut and "(10%)" in cut
    assert "cut" not in quickstart.budget_note({"stopped_by": "steps", "steps": 300, "planned_steps": 300})
    floor = {"stopped_by": "max_seconds", "max_seconds": 60, "steps": 400, "planned_steps": 1500, "min_steps": 400}
    carried = quickstart.budget_note({**floor, "budget_spent_at_step": 39, "elapsed_s": 610.2})
    assert "ran out at step 39" in carried and "floor of 400 steps" in carried and "610 s" in carried
    assert "cut this step short" in quickstart.budget_note({**floor, "budget_spent_at_step": 400})


def test_thumbnail_baseline_orders_resolutions():
    full = report.thumbnail_baseline(n=8, grid=28, fid=False)["psnr"]  # 28x28 "thumbnail" = the image itself
    seven = report.thumbnail_baseline(n=8, grid=7, fid=False)["psnr"]
    one = report.thumbnail_baseline(n=8, grid=1, fid=False)["psnr"]
    assert full > 60 and full > seven > one > 0


def _png(path: Path, w: int, h: int, value: int = 128) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)


def _fake_runs(tmp_path: Path) -> Path:
    """A runs/quickstart folder with the files the steps write (values chosen so each comparison is known)."""
    q = tmp_path / "runs" / "quickstart"
    (q / "toy").mkdir(parents=True)
    (q / "toy" / "run_summary.json").write_text(json.dumps({"eval": {"accuracy": 0.8}}))
    (q / "vq_fmnist" / "eval").mkdir(parents=True)
    (q / "vq_fmnist" / "eval" / "metrics.json").write_text(
        json.dumps({"psnr": 20.5, "usage": 0.9, "fid_mobilenetv2": 40.0})
    )
    _png(q / "vq_fmnist" / "eval" / "recon_grid.png", 224, 112)
    (q / "mae_fmnist").mkdir()
    (q / "mae_fmnist" / "eval.json").write_text(json.dumps({"probe_accuracy": 0.75}))
    _png(q / "mae_fmnist" / "recon.png", 300, 270)
    (q / "mllm_fashion_vqa").mkdir()
    rows = [
        {"method": "none", "keep": 576, "acc": 0.5, "seconds": 20.0},
        {"method": "dart", "keep": 64, "acc": 0.45, "seconds": 9.0},
        {"method": "random", "keep": 64, "acc": 0.2, "seconds": 8.0},
    ]
    (q / "mllm_fashion_vqa" / "pruning.json").write_text(json.dumps({"unpruned_acc": 0.5, "n": 100, "rows": rows}))
    (q / "seg").mkdir()
    seg_rows = [{"head": "allmask", "method": "none", "ciou": 0.4}, {"head": "allmask", "method": "dart", "ciou": 0.3}]
    (q / "seg" / "eval.json").write_text(json.dumps({"n": 100, "rows": seg_rows}))
    timings = {
        "machine_at_start": {"cpus": 2, "load_1min": 3.0},
        "scale": 1.0,
        "steps": {
            "vq": {"title": "VQ", "seconds": 100.0, "budget_s": 90.0, "stopped_by": "max_seconds", "steps": 150},
            "mae": {"title": "MAE", "seconds": 60.0, "budget_s": 150.0, "stopped_by": "steps", "steps": 3000},
            "mllm": {"title": "MLLM", "seconds": 300.0, "budget_s": 61.0, "stopped_by": "max_seconds", "steps": 400},
        },
    }
    timings["steps"]["vq"]["planned_steps"] = 1500
    timings["steps"]["mae"]["planned_steps"] = 3000
    timings["steps"]["mllm"] |= {"planned_steps": 3000, "min_steps": 400, "budget_spent_at_step": 39}
    (q / "timings.json").write_text(json.dumps(timings))
    baselines = {
        "vq_thumbnail": {"psnr": 18.0, "fid_mobilenetv2": 80.0},
        report.MAE_BASELINE: 0.79,  # above the fake probe: the report must say "no"
        "mllm_blind": 0.25,
        "seg": {"empty": 0.0, "whole_image": 0.1, "oracle_16": 0.9, "n": 100},
    }
    (q / "baselines.json").write_text(json.dumps(baselines))
    return q


def test_report_writer_on_a_fake_runs_folder(tmp_path, monkeypatch):
    q = _fake_runs(tmp_path)
    monkeypatch.chdir(tmp_path)
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert report.main(["--runs", "runs/quickstart", "--no-baselines"]) == 0
    printed = buf.getvalue()
    text = (q / "REPORT.md").read_text()
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in text.splitlines()
        if line.startswith("| ") and not line.startswith("| figure") and not line.startswith("| step")
    }
    assert rows["VQ tokenizer: PSNR (dB)"] == ["20.50", "18.00 (7x7 thumbnail)", "yes", "22.89"]
    assert rows["VQ tokenizer: fid_mobilenetv2 (lower is better)"][2] == "yes"  # 40 < 80: lower wins
    assert rows["MAE: linear probe accuracy"][2] == "**no**"  # 0.75 < random init 0.79
    assert rows["MLLM: answer accuracy, no pruning"][:3] == ["0.500", "0.250 (blind (black image))", "yes"]
    # 0.2 vs blind 0.25 on 100 questions: within two standard errors (0.087), so neither a win nor a loss
    assert rows["MLLM: accuracy, random at 64"][2] == "tie (within noise)"
    assert rows["MLLM: accuracy, dart at 64"][2] == "yes"
    assert rows["segmentation: cIoU, allmask head (100 test scenes; 16x16 oracle 0.900)"][2] == "yes"
    assert not any("dart" in k and "segmentation" in k for k in rows)  # pruned seg rows stay in eval.json
    assert "Steps cut short by their budget: vq, mllm." in text and "| 150 / 1500 |" in text
    assert "| 61 | 400 | 39 | max_seconds | 400 / 3000 |" in text and "mllm (39 -> 400 steps)" in text
    assert "fid_mobilenetv2" in text and "lower is better" in text
    for fig in ("figures/tokenizer_recon.png", "figures/mae_recon.png", "figures/pruning.png"):
        assert f"]({fig})" in text and (q / fig).is_file()
    # the figures are large enough to see: the tokenizer grid (224 x 112) is scaled up 4x, plus the labels
    from PIL import Image

    with Image.open(q / "figures" / "tokenizer_recon.png") as im:
        assert im.width >= 4 * 224 and im.height == 4 * 112
        margin = np.asarray(im.convert("L"))[:, :100]
    assert (margin < 128).sum() > 50  # row labels were drawn in the left margin
    assert "DOES NOT beat random-init encoder" in printed and "cut short by their time budget: vq" in printed
    assert "carried past their budget to their floor of steps (a slow or busy host): mllm (39 -> 400 steps)" in printed
    assert str(tmp_path) not in printed and str(tmp_path) not in text  # no absolute paths


def test_seg_baselines_match_a_hand_count(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "scenes"
    cmd = [sys.executable, "-m", "mmtok", "shards", "fashion-scenes", "--out", str(out), "train=1", "val=1", "test=5"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    from PIL import Image

    fg = total = 0
    for tar in sorted(out.glob("test-*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".mask.png"):
                    mask = np.asarray(Image.open(io.BytesIO(tf.extractfile(m).read()))) > 0
                    fg, total = fg + int(mask.sum()), total + mask.size
    res = report.seg_baselines(str(out / "test-*.tar"), limit=5, grid=16)
    assert res["n"] == 5 and res["empty"] == 0.0
    assert res["whole_image"] == pytest.approx(fg / total)
    assert 0.0 < res["oracle_16"] <= 1.0
    assert report.seg_baselines(str(out / "test-*.tar"), limit=5, grid=64)["oracle_64"] == 1.0


def test_force_sets_a_training_folder_aside_so_the_rerun_starts_fresh(tmp_path, capsys):
    out = tmp_path / "runs" / "quickstart" / "seg"
    (out / "checkpoints" / "step-00000280").mkdir(parents=True)
    quickstart._set_aside(out, "[12/14] seg")
    assert not out.exists() and (tmp_path / "runs/quickstart/seg.previous/checkpoints/step-00000280").is_dir()
    assert "previous run moved" in capsys.readouterr().out
    (out / "export").mkdir(parents=True)  # a second --force keeps one generation: the newest old run
    quickstart._set_aside(out, "[12/14] seg")
    assert sorted(p.name for p in (tmp_path / "runs/quickstart/seg.previous").iterdir()) == ["export"]
    quickstart._set_aside(out, "[12/14] seg")  # nothing there: nothing to do


def test_shard_steps_rebuild_stale_shards(tmp_path, fmnist_dir, monkeypatch):
    """A shard folder from another build (here a --tiny one, seen from a full run) is rebuilt, not reused."""
    from mmtok.cli import shards as cli

    opts = ["train=4", "val=0", "test=2", f"root={fmnist_dir}"]
    step = next(s for s in quickstart.STEPS if s.argv[:2] == ["shards", "fashion-scenes"])
    monkeypatch.setattr(step, "tiny", opts)
    assert quickstart._stale_shards(step, tmp_path, tiny=False) is None  # not built yet: a first build, not stale
    assert cli.main(["fashion-scenes", "--out", str(tmp_path / step.argv[3]), *opts]) == 0
    assert quickstart._stale_shards(step, tmp_path, tiny=True) is None
    assert "other options" in quickstart._stale_shards(step, tmp_path, tiny=False)
    assert all(quickstart._stale_shards(s, tmp_path, tiny=False) is None for s in quickstart.STEPS if s is not step)


def test_blind_baseline_follows_the_model_not_the_cache(tmp_path, monkeypatch):
    """A rerun (or --force) trains a new MLLM: its blind accuracy comes from its own evaluation, never from the
    baselines cached for the model before it; model-independent baselines stay cached."""
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs" / "quickstart"
    (runs / "mllm_fashion_vqa" / "export").mkdir(parents=True)
    (runs / "baselines.json").write_text(json.dumps({"vq_thumbnail": {"psnr": 15.5}, "mllm_blind": 0.17}))
    (runs / "mllm_fashion_vqa" / "pruning.json").write_text(json.dumps({"n": 400, "blind": {"acc": 0.255}}))
    base = report.compute_baselines(Path("runs/quickstart"))
    assert base["mllm_blind"] == 0.255 and base["vq_thumbnail"] == {"psnr": 15.5}
    assert json.loads((runs / "baselines.json").read_text())["mllm_blind"] == 0.255
