"""Training speed of the shipped recipes on this machine: samples/s, steps/s and the time to each recipe's steps.

Each recipe in :data:`RECIPES` is trained with its own config through ``mmtok train`` (a subprocess, as a user runs
it) for ``--seconds`` of wall clock on ``--device``, on small shards built here from the packaged Fashion-MNIST
(the recipes' data at reduced counts: the speed of a step does not depend on the split's size). The steady rate is
the median of the engine's logged ``samples_per_s`` after the first log (start-up, CUDA kernels' first launches
and, on CUDA, autotuning land there). ``recipe min`` is the time the recipe's own ``train.steps`` would take at that
rate, or its ``train.max_seconds`` budget where it has one and the rate does not reach ``train.steps`` within it
(``steps run`` is then what the budget allows).

    python tools/bench/recipes.py --device cuda --seconds 30 --json runs/bench/recipes_cuda.json
    OMP_NUM_THREADS=1 python tools/bench/recipes.py --device cpu --seconds 60 --json runs/bench/recipes_cpu.json

VideoMAE is not in the table when PyAV (the ``video`` extra) is missing: its clips are mp4.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# name -> (config, dataset key, extra overrides); datasets are built once into the work folder
RECIPES: dict[str, tuple[str, str, list[str]]] = {
    "mae_fmnist": ("configs/mim/mae_fmnist.yaml", "fmnist", []),
    "vq_fmnist": ("configs/tokenizer/vq_fmnist.yaml", "fmnist", []),
    "fashion_clip": ("configs/clip/fashion_clip.yaml", "scenes", []),
    "fashion_vqa_cpu": ("configs/mllm/fashion_vqa_cpu.yaml", "vqa", []),
    "seg_scenes_cpu": ("configs/mllm/seg_scenes_cpu.yaml", "scenes", []),
    "videomae_moving_fashion": ("configs/mim/videomae_moving_fashion.yaml", "moving", []),
}

# dataset key -> (builder, options, train pattern, val pattern)
DATASETS: dict[str, tuple[str, list[str], str, str]] = {
    "fmnist": ("fashion-mnist", ["limit=20000"], "train-*.tar", "test-*.tar"),
    "scenes": ("fashion-scenes", ["train=5000", "val=200", "test=10"], "train-*.tar", "val-*.tar"),
    "vqa": ("fashion-vqa", ["train=2000", "val=100", "test=10"], "train-*.tar", "val-*.tar"),
    "moving": ("moving-fashion", ["train=256", "val=32", "test=8"], "train-*.tar", "val-*.tar"),
}


def _run(cmd: list[str], log: Path, timeout: float) -> int:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": _pythonpath()}
    with open(log, "w") as f:
        try:
            return subprocess.run(
                cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            return 124


def _pythonpath() -> str:
    parts = [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(parts)


def build(key: str, work: Path) -> Path:
    builder, options, _, _ = DATASETS[key]
    out = work / key
    if not (out / "train.json").exists():
        cmd = [sys.executable, "-m", "mmtok.cli.main", "shards", builder, "--out", str(out), *options]
        if _run(cmd, work / f"build_{key}.log", 900) != 0:
            raise RuntimeError(f"building {key} failed: see {work / f'build_{key}.log'}")
    return out


def train_rate(name: str, work: Path, device: str, seconds: float) -> dict:
    config, key, extra = RECIPES[name]
    data = build(key, work)
    _, _, train_pat, val_pat = DATASETS[key]
    out = work / f"run_{name}"
    shutil.rmtree(out, ignore_errors=True)  # the engine resumes from a run folder's checkpoints: start afresh
    cmd = [
        sys.executable,
        "-m",
        "mmtok.cli.main",
        "train",
        "--config",
        config,
        f"train.device={device}",
        f"train.max_seconds={seconds}",
        "train.eval_every=0",
        "train.eval_batches=1",
        "train.ckpt_every=0",
        "train.progress=false",
        "train.tensorboard=false",
        "train.export=false",
        "train.log_every=10",
        f"data.train={data / train_pat}",
        f"data.val={data / val_pat}",
        f"output_dir={out}",
        *extra,
    ]
    t0 = time.perf_counter()
    rc = _run(cmd, work / f"train_{name}.log", seconds * 4 + 300)
    wall = time.perf_counter() - t0
    rows = []
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("split", "train") == "train" and "samples_per_s" in r]
    if rc != 0 or len(train) < 2:
        tail = (work / f"train_{name}.log").read_text().splitlines()[-5:]
        return {"recipe": name, "ok": False, "rc": rc, "log_tail": tail}
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(REPO / config)
    batch = int(cfg.data.batch_size) * int(cfg.train.get("grad_accum", 1))
    sps = statistics.median(r["samples_per_s"] for r in train[1:])
    steps_per_s = sps / batch
    recipe_steps = int(cfg.train.steps)
    budget = float(cfg.train.get("max_seconds", 0) or 0)  # a time-bounded recipe stops at its budget
    in_budget = min(recipe_steps, int(steps_per_s * budget)) if budget else recipe_steps
    return {
        "recipe": name,
        "ok": True,
        "config": config,
        "batch": batch,
        "samples_per_s": sps,
        "steps_per_s": steps_per_s,
        "steps_done": train[-1]["step"],
        "recipe_steps": recipe_steps,
        "recipe_minutes": in_budget / steps_per_s / 60,
        "budget_minutes": budget / 60,
        "steps_in_budget": in_budget,
        "process_wall_s": wall,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (train.device of every run)")
    p.add_argument("--seconds", type=float, default=30.0, help="training wall clock per recipe")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--work", default="", help="folder for shards and runs (default: a temporary one)")
    p.add_argument("--json", default="", help="write the results here")
    args = p.parse_args(argv)
    recipes = list(args.recipes)
    if "videomae_moving_fashion" in recipes and importlib.util.find_spec("av") is None:
        print("videomae_moving_fashion: skipped (PyAV missing: pip install 'mmtok[video]')")
        recipes.remove("videomae_moving_fashion")
    with tempfile.TemporaryDirectory(prefix="mmtok-recipes-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        import torch

        device = args.device
        name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"
        print(f"device: {name}; {os.cpu_count()} CPU cores; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
        print(
            f"{'recipe':24s} {'batch':>5s} {'samples/s':>10s} {'steps/s':>8s} {'steps':>6s} {'budget min':>10s} "
            f"{'steps run':>9s} {'recipe min':>10s}"
        )
        rows = []
        for r in recipes:
            row = train_rate(r, work, device, args.seconds)
            rows.append(row)
            if row["ok"]:
                print(
                    f"{r:24s} {row['batch']:5d} {row['samples_per_s']:10.1f} {row['steps_per_s']:8.2f} "
                    f"{row['recipe_steps']:6d} {row['budget_minutes'] or float('nan'):10.1f} "
                    f"{row['steps_in_budget']:9d} {row['recipe_minutes']:10.2f}",
                    flush=True,
                )
            else:
                print(f"{r:24s} failed (rc {row['rc']}): {' | '.join(row['log_tail'])}", flush=True)
    report = {"device": name, "seconds": args.seconds, "torch": torch.__version__, "rows": rows}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
