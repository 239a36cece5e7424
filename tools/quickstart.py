"""The quickstart pipeline behind `make demo`: every step a user would type, run in order, bounded by time.

Each step is an `mmtok` command line (printed before it runs) and a "done" marker: a step whose output
already exists is skipped, so a second `make demo` takes seconds. `--force` reruns all. Steps whose
capability is not installed are reported and skipped rather than faked.

Every training step runs its recipe from configs/ under a wall-clock budget (`train.max_seconds`, with
`train.schedule_by_time=true` so the learning rate anneals within the budget): the pipeline's length
depends little on how busy the machine is, only its figures do. A step that the budget cut short says
so. Below a floor of steps per training step (MIN_STEPS, `train.min_steps`) a short model is worth nothing
(its figures fall to or below their trivial baselines), so on a slow or busy host a step runs past its budget
to that floor and the pipeline takes longer instead. The budgets live in BUDGETS below (`--scale` multiplies
them); the recipes' full budgets are the same commands without the overrides.

The run ends with `tools/quickstart_report.py`, which measures each figure's trivial baseline and writes
runs/quickstart/REPORT.md (figures, baselines, the recipes' full-budget figures, the commands to go on).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the report module beside this file, however it is run
from quickstart_report import MAE_PROBE_LAYERS, MAE_PROBE_TEST, MAE_PROBE_TRAIN, MLLM_EVAL_N  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MMTOK = [sys.executable, "-m", "mmtok"]
Q = "runs/quickstart"  # every output of the quickstart lives here (the demo reads its models from it)
TIMINGS = f"{Q}/timings.json"

# Training budgets in seconds of wall clock (the engine stops after the step during which the budget ran out,
# then evaluates and exports). Sized so that the budgets plus data building and evaluation stay within about
# 18 minutes on a 2-core machine; data and evaluation steps have no budget of their own and take longer when
# the machine is busy. `--scale 2` doubles every budget.
BUDGETS: dict[str, float] = {
    "toy": 15,
    "vq": 120,
    "mae": 180,
    "mllm": 240,
    "seg": 150,
}

# The fewest optimizer steps each training step makes when its budget runs out first (`train.min_steps`; the
# learning rate then anneals by the floor). Measured on a host half as fast as the one the budgets were sized on
# (one thread's 512 x 512 matmul ~75 GFLOP/s), annealed over exactly these steps: VQ 101 steps PSNR 16.8 dB vs
# the thumbnail's 15.5; MAE 500 steps probe 0.824 (10k test); MLLM 300 steps 0.330 vs blind 0.255, 600 steps 0.355
# vs 0.247 (400 questions); segmentation 580 steps all-mask cIoU 0.338 vs whole image 0.066. Without a floor, that
# host beside a `make test` shrank the budgets to MLLM 39 steps (answers 0.000) and left three figures at or below
# their baselines.
MIN_STEPS: dict[str, int] = {
    "toy": 100,
    "vq": 100,
    "mae": 500,
    "mllm": 450,
    "seg": 300,
}

# Seconds each step without a budget takes on a quiet 2-core machine (rough), and the fixed cost of a training
# step around its budget (start-up, final evaluation, export). With the deadline (`--minutes`), the training
# budgets shrink when the machine is slower than this, so that the whole run still ends on time.
EXPECTED_S: dict[str, float] = {
    "fmnist_shards": 40,
    "vq_eval": 25,
    "mae_eval": 120,  # the 4-block probe (768 features): 192 s at load 3.3, 19 s with the last block alone
    "vqa_shards": 35,
    "mllm_eval": 60,  # 400 questions unpruned, blind and under 8 pruners
    "prune": 8,
    "scenes_shards": 30,
    "seg_eval": 10,
    "segment": 8,
    "screenshots": 25,
    "report": 60,
}
TRAIN_OVERHEAD_S = 15.0
MIN_SHARE = 0.25  # a budget never shrinks below this share of its nominal value (a useless model helps nobody)

# `--tiny`: a smoke run (seconds per step) for tests and for checking an install; its figures mean nothing.
TINY_SHARDS = {
    "fashion-mnist": ["limit=600"],
    "fashion-vqa": ["train=64", "val=16", "test=16"],
    "fashion-scenes": ["train=64", "val=16", "test=16"],
}


@dataclass
class Step:
    """One quickstart step: an `mmtok` command line and the file that exists once it has run."""

    key: str  # short id: timings.json and REPORT.md use it
    title: str
    argv: list[str]
    done: str  # path (relative to the working folder) that exists once the step has run; "" = always run
    needs: str = ""  # importable module the step needs ("" = always available)
    budget: str = ""  # key of BUDGETS for training steps ("" = not a training step)
    tiny: list[str] = field(default_factory=list)  # extra arguments under --tiny
    before: Callable[[Path], list[str]] | None = None  # writes an input file, returns extra argv
    command: list[str] | None = None  # a non-mmtok command (argv[0] is a script path)


def _train(key: str, title: str, config: list[str], out: str, overrides: list[str], needs: str) -> Step:
    cfgs = [a for c in config for a in ("--config", c)]
    return Step(
        key,
        title,
        ["train", *cfgs, f"output_dir={Q}/{out}", *overrides],
        f"{Q}/{out}/export",
        needs=needs,
        budget=key,
        tiny=["train.log_every=1", "data.batch_size=4", "data.num_workers=0"],
    )


def _stale_shards(step: Step, cwd: Path, tiny: bool) -> str | None:
    """For a shard step whose folder exists: why its shards are not what the step would build now (another
    builder version, other options, e.g. a ``--tiny`` build, or no build record), or None. Other steps: None."""
    if step.argv[:1] != ["shards"] or not (cwd / step.done).parent.is_dir():
        return None
    from mmtok.cli.shards import stale_reason

    name, out, options = step.argv[1], str(cwd / step.argv[3]), [*step.argv[4:], *(step.tiny if tiny else [])]
    return stale_reason(name, out, options)


def _set_aside(out: Path, head: str) -> None:
    """``--force`` on a training step: a fresh run, not a resume of the checkpoints already in ``out`` (which may
    come from another version of the recipe). The old folder is kept as ``<out>.previous`` (one generation)."""
    if not out.exists():
        return
    old = out.with_name(out.name + ".previous")
    if old.exists():
        shutil.rmtree(old)
    out.rename(old)
    print(f"{head}: --force: the previous run moved to {old} (a fresh run, not a resume)", flush=True)


def _write_scene(path: Path, canvas: int) -> str:
    """A fashion scene (test-split items, fixed seed) at ``canvas`` px for the single-image steps.

    Writes ``path`` and ``path`` with ``.json`` (its items); returns the first item's referring expression.
    """
    import numpy as np
    from PIL import Image

    from mmtok.data.sources.fashion_mnist import load_fashion_mnist
    from mmtok.data.sources.scenes import make_scene

    images, labels = load_fashion_mnist("test")
    rgb, _, items = make_scene(np.random.default_rng(7), images, labels, canvas=canvas, min_items=3, max_items=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    meta = [{k: it[k] for k in ("class_name", "colour", "position", "expression")} for it in items]
    path.with_suffix(".json").write_text(json.dumps({"canvas": canvas, "items": meta}, indent=2) + "\n")
    print(f"wrote {path.relative_to(Path.cwd())}: " + ", ".join(it["expression"] for it in items), flush=True)
    return items[0]["expression"]


def _scene_for_prune(cwd: Path) -> list[str]:
    _write_scene(cwd / Q / "scene.png", 96)
    return []


def _scene_for_segment(cwd: Path) -> list[str]:
    return ["--expression", _write_scene(cwd / Q / "scene64.png", 64)]


STEPS: list[Step] = [
    Step(
        "fmnist_shards",
        "Fashion-MNIST shards (70k real images)",
        ["shards", "fashion-mnist", "--out", "data/fashion-mnist"],
        "data/fashion-mnist/build.json",
        tiny=TINY_SHARDS["fashion-mnist"],
    ),
    _train(
        "toy",
        "Toy classifier: the training engine end to end (checkpoints, eval, export)",
        ["configs/toy/fmnist_classifier.yaml"],
        "toy",
        ["train.eval_every=0", "train.ckpt_every=0", "train.eval_batches=10"],
        "mmtok.train.toy",
    ),
    _train(
        "vq",
        "VQ tokenizer (f4, 512 codes) on Fashion-MNIST",
        ["configs/tokenizer/vq_fmnist.yaml"],
        "vq_fmnist",
        ["optim.warmup_steps=20", "train.eval_every=0", "train.ckpt_every=0", "train.eval_batches=4"],
        "mmtok.tokenizers",
    ),
    Step(
        "vq_eval",
        "Evaluate the tokenizer (PSNR, SSIM, usage, FID-style score, tokens/image before and after 2D BPE)",
        ["eval", "tokenizer", "--tokenizer", f"{Q}/vq_fmnist/export", "--data", "fmnist", "--n", "500"]
        + ["--out", f"{Q}/vq_fmnist/eval"],
        f"{Q}/vq_fmnist/eval/metrics.json",
        needs="mmtok.tokenizers",
        tiny=["--n", "16", "--bpe-merges", "8", "--bpe-train-n", "32"],
    ),
    _train(
        "mae",
        "MAE pretraining (ViT width 192, patch 7, 50% random masking) on Fashion-MNIST",
        ["configs/mim/mae_fmnist.yaml", "configs/mim/mae_fmnist_p7.yaml"],
        "mae_fmnist",
        # 50% hidden at this short budget: with 75% the probe ties the random-init encoder (in memory, 150 s, probe
        # on 10k/2k: last block 0.8015 vs 0.8035, last 4 blocks 0.8065 vs 0.7995); with 50%, 0.8065 / 0.8175
        ["optim.warmup_steps=40", "train.eval_every=0", "train.ckpt_every=0", "train.eval_batches=4"]
        + ["task.mask_ratio=0.5"],
        "mmtok.mim",
    ),
    Step(
        "mae_eval",
        "Evaluate the MAE encoder (linear probe on Fashion-MNIST test, reconstruction figure)",
        ["eval", "mim", "--model", f"{Q}/mae_fmnist"]
        + ["--limit-train", str(MAE_PROBE_TRAIN), "--limit-test", str(MAE_PROBE_TEST)]
        # mean-pooled features of the last 4 blocks, concatenated (the random-init baseline is probed the same
        # way): a short MAE run changes the last block least usefully
        + ["--probe-layers", str(MAE_PROBE_LAYERS)]
        + ["--figure", f"{Q}/mae_fmnist/recon.png", "--out", f"{Q}/mae_fmnist/eval.json"],
        f"{Q}/mae_fmnist/eval.json",
        needs="mmtok.mim",
        tiny=["--limit-train", "200", "--limit-test", "100"],
    ),
    Step(
        "vqa_shards",
        "fashion-vqa shards (96x96 scenes -> 576 image tokens, templated questions)",
        ["shards", "fashion-vqa", "--out", "data/fashion-vqa"],
        "data/fashion-vqa/build.json",
        needs="mmtok.mllm",
        tiny=TINY_SHARDS["fashion-vqa"],
    ),
    _train(
        "mllm",
        "Tiny MLLM (ViT tower + MLP projector + Llama) on fashion-vqa",
        ["configs/mllm/fashion_vqa_cpu.yaml"],
        "mllm_fashion_vqa",
        ["optim.warmup_steps=30", "train.eval_every=0", "train.ckpt_every=0", "train.eval_batches=2"]
        + ["train.progress=true"],
        "mmtok.mllm",
    ),
    Step(
        "mllm_eval",
        f"Answer accuracy under every pruner at 64 of 576 image tokens, and blind ({MLLM_EVAL_N} test questions)",
        ["eval", "mllm", "--model", f"{Q}/mllm_fashion_vqa/export", "--data", "data/fashion-vqa/test-*.tar"]
        # --blind: the model shown black canvases on the same questions (the report's baseline)
        + ["--keeps", "64", "--limit", str(MLLM_EVAL_N), "--blind", "--json", f"{Q}/mllm_fashion_vqa/pruning.json"],
        f"{Q}/mllm_fashion_vqa/pruning.json",
        needs="mmtok.mllm",
        tiny=["--limit", "8"],
    ),
    Step(
        "prune",
        "mmtok prune: one question about one scene, DART at 64 tokens, timed against no pruning",
        ["prune", "--model", f"{Q}/mllm_fashion_vqa/export", "--method", "dart", "--keep", "64"]
        + ["--image", f"{Q}/scene.png", "--prompt", "how many items are there ?"],
        "",
        needs="mmtok.mllm",
        tiny=["--repeats", "1", "--max-new-tokens", "4"],
        before=_scene_for_prune,
    ),
    Step(
        "scenes_shards",
        "fashion-scenes shards (64x64 scenes, referring expressions and masks; 10k/1k/1k)",
        ["shards", "fashion-scenes", "--out", "data/scenes"],
        "data/scenes/build.json",
        needs="mmtok.mllm.seg",
        tiny=TINY_SHARDS["fashion-scenes"],
    ),
    _train(
        "seg",
        "Segmentation MLLM (all-mask and [SEG] heads) on fashion-scenes",
        ["configs/mllm/seg_scenes_cpu.yaml"],
        "seg",
        # the recipe as it is (all-mask and [SEG] heads) on the quickstart's short budget, on the default 10k
        # scenes (the recipe's 100k only pay off over its full 30 minutes; same val/test scenes)
        ["train.eval_every=0", "train.ckpt_every=0", "data.train=data/scenes/train-*.tar"]
        + ["data.val=data/scenes/val-*.tar"],
        "mmtok.mllm.seg",
    ),
    Step(
        "seg_eval",
        "Segmentation quality of the all-mask and [SEG] heads (gIoU, cIoU, time to a mask) on 100 test scenes",
        ["eval", "seg", "--model", f"{Q}/seg/export", "--data", "data/scenes/test-*.tar", "--limit", "100"]
        + ["--heads", "allmask", "segtoken", "--json", f"{Q}/seg/eval.json", "--md", f"{Q}/seg/eval.md"]
        + ["--grid", f"{Q}/seg/cases.png"],
        f"{Q}/seg/eval.json",
        needs="mmtok.mllm.seg",
        tiny=["--limit", "4"],
    ),
    Step(
        "segment",
        "mmtok segment: one expression on one scene with the all-mask head",
        ["segment", "--model", f"{Q}/seg/export", "--image", f"{Q}/scene64.png", "--head", "allmask"]
        + ["--out", f"{Q}/seg/scene64_mask.png"],
        f"{Q}/seg/scene64_mask.png",
        needs="mmtok.mllm.seg",
        before=_scene_for_segment,
    ),
]


def train_overrides(step: Step, scale: float, tiny: bool, seconds: float | None = None) -> list[str]:
    """The budget overrides of a training step (none for other steps).

    ``train.max_seconds`` bounds the loop; ``train.schedule_by_time`` makes the cosine follow the clock, so
    the learning rate has annealed when the budget ends even if the step count planned by the recipe is far
    from reached. ``seconds`` (from :func:`plan_budget`) replaces the nominal ``BUDGETS[step] * scale``;
    under ``--tiny`` every budget is 2 s and there is no floor. ``train.min_steps`` (MIN_STEPS) keeps a slow
    host from ending a step before its model is worth anything. ``train.reference_steps=0``: a short run is not
    the recipe's full run, so it does not warn that it made fewer steps than the recipe's published figures
    (the report says so).
    """
    if not step.budget:
        return []
    if seconds is None:
        seconds = 2.0 if tiny else BUDGETS[step.budget] * scale
    floor = 0 if tiny else MIN_STEPS[step.budget]
    return [
        f"train.max_seconds={seconds:g}",
        "train.schedule_by_time=true",
        f"train.min_steps={floor}",
        "train.reference_steps=0",
    ]


def plan_budget(step: Step, pending: list[Step], scale: float, time_left: float, slowdown: float) -> float:
    """Budget for ``step`` so that it and every ``pending`` step after it fit in ``time_left`` seconds.

    The steps without a budget are expected to take ``EXPECTED_S`` x ``slowdown`` (how much slower than on a
    quiet machine the steps so far ran); what is left is shared among the remaining training budgets in
    proportion to their nominal values, never more than nominal and never below ``MIN_SHARE`` of it.
    """
    nominal = BUDGETS[step.budget] * scale
    rest = [s for s in pending if s is not step]
    fixed = sum(EXPECTED_S.get(s.key, 0.0) for s in rest if not s.budget)
    fixed += EXPECTED_S["screenshots"] + EXPECTED_S["report"]
    fixed += TRAIN_OVERHEAD_S * (1 + sum(1 for s in rest if s.budget))
    train_nominal = nominal + sum(BUDGETS[s.budget] * scale for s in rest if s.budget)
    share = (time_left - fixed * slowdown) / train_nominal
    return round(nominal * min(1.0, max(MIN_SHARE, share)), 1)


def busy_cpus(seconds: float = 0.5) -> float | None:
    """Cores' worth of CPU time the machine's processes used over the next ``seconds`` (from ``/proc/stat``; None
    where it cannot be read). Read between steps, when the quickstart's own child has ended, it measures the
    others: the load average would still count the step that just finished for a minute."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (os.cpu_count() or 1) * (1.0 - (idle1 - idle0) / (total1 - total0))


def _threads_env(env: dict) -> tuple[dict, str]:
    """One torch thread per process when other processes already keep a core busy (unless the user chose a number).

    Two threads spin-waiting on two cores that other processes already use run several times slower than one;
    on a quiet machine torch's default (all cores) is faster. Busy = at least 3/4 of a core used by others right
    now (:func:`busy_cpus`), or, where that cannot be read, a 1-minute load average of at least the core count.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return env, os.environ["OMP_NUM_THREADS"]
    cpus = os.cpu_count() or 1
    if cpus == 1:
        return env, "default"
    others = busy_cpus()
    busy = others >= 0.75 if others is not None else os.getloadavg()[0] >= cpus
    if busy:
        return {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, "1 (machine busy)"
    return env, "default"


def budget_note(summary: dict) -> str:
    """One line saying whether the budget cut a run short, from its ``run_summary.json``."""
    if summary.get("stopped_by") != "max_seconds":
        return f"finished its {summary.get('steps')} planned steps within the budget"
    planned = max(1, int(summary.get("planned_steps") or 1))
    steps = int(summary.get("steps") or 0)
    spent_at = summary.get("budget_spent_at_step")
    if spent_at is not None and spent_at < steps:
        return (
            f"budget of {summary.get('max_seconds', 0):g} s ran out at step {spent_at}; the floor of "
            f"{summary.get('min_steps')} steps carried it on ({summary.get('elapsed_s', 0):.0f} s, a slow or busy "
            f"host), step {steps} of {planned} planned ({100.0 * steps / planned:.0f}%); the learning rate "
            "annealed by the floor"
        )
    return (
        f"budget of {summary.get('max_seconds', 0):g} s cut this step short: step {steps} of "
        f"{planned} planned ({100.0 * steps / planned:.0f}%); the learning rate annealed within the budget"
    )


def _available(module: str) -> bool:
    if not module:
        return True
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _load_timings(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def core_gflops(seconds: float = 0.5) -> float:
    """One thread's float32 matmul speed (GFLOP/s, 512 x 512 products for about ``seconds``): what a
    time-budgeted recipe gets per thread, so step counts and figures can be compared across machines."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(512, 512), torch.randn(512, 512)
        a @ b
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            n += 1
        return 2 * 512**3 * n / (time.perf_counter() - t0) / 1e9
    finally:
        torch.set_num_threads(threads)


def _machine() -> dict:
    """CPU count, load and one thread's matmul speed when the run started (the figures depend on all three)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "cpus": os.cpu_count(),
        "load_1min": round(load[0], 2),
        "load_5min": round(load[1], 2),
        "gflops_1thread": round(core_gflops(), 1),
    }


def run_steps(args: argparse.Namespace, cwd: Path, env: dict, deadline: float) -> int:
    """Run (or skip) every selected step; record each one's time and budget outcome in timings.json."""
    timings_path = cwd / TIMINGS
    timings = _load_timings(timings_path)
    timings.setdefault("steps", {})
    timings["machine_at_start"] = _machine()
    timings["scale"] = args.scale
    timings["tiny"] = args.tiny
    timings["minutes"] = args.minutes
    spent = expected = 0.0  # steps without a budget so far: seconds taken and seconds expected when quiet
    todo = []
    rebuilt: list[str] = []  # data folders rebuilt because they were stale
    for step in STEPS:
        if args.only and args.only.lower() not in f"{step.key} {step.title}".lower():
            continue
        stale = _stale_shards(step, cwd, args.tiny) if step.done and not args.force else None
        if stale:
            print(f"[{STEPS.index(step) + 1}/{len(STEPS)}] {step.title}: rebuilding, {stale}", flush=True)
            rebuilt.append(step.argv[3])
        elif step.done and (cwd / step.done).exists() and not args.force:
            print(f"[{STEPS.index(step) + 1}/{len(STEPS)}] {step.title}: already done ({step.done})", flush=True)
            continue
        if not _available(step.needs):
            print(
                f"[{STEPS.index(step) + 1}/{len(STEPS)}] {step.title}: skipped, {step.needs} is not part of this "
                "version of mmtok",
                flush=True,
            )
            continue
        todo.append(step)
    if rebuilt:
        print(
            f"note: {', '.join(rebuilt)} held shards from other code or options; models already trained on them are "
            "kept (their steps count as done); `python tools/quickstart.py --force --only KEY` retrains one",
            flush=True,
        )
    for n, step in enumerate(todo):
        head = f"[{STEPS.index(step) + 1}/{len(STEPS)}] {step.title}"
        argv = [*step.argv]
        if step.before is not None:
            argv += step.before(cwd)
        seconds = None
        if step.budget and not args.tiny:
            slowdown = max(1.0, spent / expected) if expected else 1.0
            seconds = plan_budget(step, todo[n:], args.scale, deadline - time.time(), slowdown)
            nominal = BUDGETS[step.budget] * args.scale
            if seconds < nominal:
                print(
                    f"{head}: budget {seconds:g} s instead of {nominal:g} s, to end within {args.minutes:g} min "
                    f"(the steps so far ran {slowdown:.1f}x slower than on a quiet machine); it still makes at least "
                    f"{MIN_STEPS[step.budget]} steps (train.min_steps), so a slow machine may run past the deadline",
                    flush=True,
                )
        argv += train_overrides(step, args.scale, args.tiny, seconds)
        if args.tiny:
            argv += step.tiny
        run_dir = cwd / step.done.rsplit("/export", 1)[0] if step.budget else None  # a training step's output_dir
        if run_dir is not None and args.force:
            _set_aside(run_dir, head)
        step_env, threads = _threads_env(env)
        print(f"\n{head}\n$ mmtok {shlex.join(argv)}", flush=True)
        t = time.time()
        rc = subprocess.call([*MMTOK, *argv], env=step_env, cwd=cwd)
        took = time.time() - t
        rec: dict = {"title": step.title, "seconds": round(took, 1), "rc": rc, "threads": threads}
        rec["command"] = "mmtok " + shlex.join(argv)
        rec["load_1min"] = round(os.getloadavg()[0], 2)
        if run_dir is not None:
            rec["budget_s"] = float(train_overrides(step, args.scale, args.tiny, seconds)[0].split("=")[1])
            rec["nominal_budget_s"] = BUDGETS[step.budget] * args.scale
            summary_file = run_dir / "run_summary.json"
            if summary_file.is_file():
                summary = json.loads(summary_file.read_text())
                keys = ("steps", "planned_steps", "stopped_by", "elapsed_s", "min_steps", "budget_spent_at_step")
                rec.update({k: summary.get(k) for k in keys})
                print(f"{head}: {budget_note(summary)}", flush=True)
        else:
            spent += took
            expected += EXPECTED_S.get(step.key, took)
        timings["steps"][step.key] = rec
        timings_path.parent.mkdir(parents=True, exist_ok=True)
        timings_path.write_text(json.dumps(timings, indent=2) + "\n")
        if rc != 0:
            print(f"{head}: failed with exit status {rc}", file=sys.stderr)
            return rc
        print(f"{head}: done in {took:.0f} s", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--force", action="store_true", help="rerun steps whose outputs exist")
    p.add_argument("--only", default="", help="run only steps whose key or title contains this text")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every training budget (2 = twice as long)")
    p.add_argument("--minutes", type=float, default=18.0, help="end within this many minutes (shrinks budgets)")
    p.add_argument("--tiny", action="store_true", help="smoke run: tiny data, 2-second budgets, no screenshots")
    p.add_argument("--root", default=str(ROOT), help="working folder (it must hold configs/); default: the repo")
    args = p.parse_args(argv)
    if args.scale <= 0:
        p.error("--scale must be > 0")
    cwd = Path(args.root).resolve()
    if not (cwd / "configs").is_dir():
        p.error(f"{args.root} has no configs/ folder: run from a checkout or pass --root to one")
    os.chdir(cwd)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    # `mmtok` from this checkout even when the working folder is elsewhere (tests, --root)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    t0 = time.time()
    rc = run_steps(args, cwd, env, deadline=t0 + 60 * args.minutes)
    if rc != 0:
        return rc
    shots = cwd / Q / "demo_screenshots"
    if not args.tiny and not args.only and (ROOT / "tools" / "demo_screenshot.py").is_file():
        if not shots.exists() or args.force:
            # The demo itself: render each tab once in headless Chromium (skipped without a browser).
            cmd = [
                sys.executable,
                str(ROOT / "tools/demo_screenshot.py"),
                "--models",
                Q,
                "--out",
                f"{Q}/demo_screenshots",
            ]
            print(f"\nDemo screenshots\n$ python tools/demo_screenshot.py --models {Q} --out {Q}/demo_screenshots")
            t = time.time()
            rc = subprocess.call(cmd, env=_threads_env(env)[0], cwd=cwd)
            state = "done" if rc == 0 else "skipped (no headless Chromium)"
            print(f"demo screenshots: {state} in {time.time() - t:.0f} s")
            timings = _load_timings(cwd / TIMINGS)
            if timings:
                rec = {"title": "Demo screenshots (headless Chromium)", "seconds": round(time.time() - t, 1), "rc": rc}
                timings["steps"]["screenshots"] = rec
                (cwd / TIMINGS).write_text(json.dumps(timings, indent=2) + "\n")
    steps_s = time.time() - t0
    timings = _load_timings(cwd / TIMINGS)
    if timings:  # the report states it
        timings["last_run_steps_s"] = round(steps_s, 1)
        (cwd / TIMINGS).write_text(json.dumps(timings, indent=2) + "\n")
    print(f"\nReport\n$ python tools/quickstart_report.py --runs {Q}", flush=True)
    report = [sys.executable, str(ROOT / "tools/quickstart_report.py"), "--runs", Q] + (["--tiny"] if args.tiny else [])
    rc = subprocess.call(report, env=_threads_env(env)[0], cwd=cwd)
    total = time.time() - t0
    timings = _load_timings(cwd / TIMINGS)
    if timings:
        timings["last_run_s"] = round(total, 1)
        (cwd / TIMINGS).write_text(json.dumps(timings, indent=2) + "\n")
    print(f"\nQuickstart finished in {total / 60:.1f} min, report included (steps already done were skipped).")
    print(f"Browse everything with:  .venv/bin/mmtok demo --models {Q}   (http://127.0.0.1:7860)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
