"""Benchmark the training engine's overhead on the toy classifier (in-memory batches, no data loading).

Measures samples/s of a bare PyTorch loop (forward, backward, clip, AdamW step) against the same work
through ``mmtok.train.engine.train`` (logging, schedule, accumulation bookkeeping), and the cost of
one checkpoint (atomic folder with safetensors weights, optimizer, RNG and data state) and its size.

    python tools/bench/train_engine.py [--quick] [--json out.json] [--width 32] [--batch 64]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from mmtok.train.config import load_run_config
from mmtok.train.engine import create_task, seed_everything, train


class _Batches:
    """The same synthetic batches every epoch (no data loading in the timing)."""

    def __init__(self, task, batch: int, n: int = 16):
        torch.manual_seed(0)
        self.batches = [task.synthetic_batch(batch) for _ in range(n)]
        self.pos = 0

    def __iter__(self):
        while self.pos < len(self.batches):
            self.pos += 1
            yield self.batches[self.pos - 1]
        self.pos = 0

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, s):
        self.pos = s["pos"]


def _cfg(out: Path, args, steps: int, ckpt_every: int):
    return load_run_config(
        [],
        [
            "task.name=toy_classifier",
            f"task.width={args.width}",
            f"data.batch_size={args.batch}",
            f"train.steps={steps}",
            f"train.ckpt_every={ckpt_every}",
            "train.keep_last=1",
            "train.log_every=1000000",
            "train.progress=false",
            "train.tensorboard=false",
            "train.export=false",
            "train.device=cpu",
            f"output_dir={out}",
        ],
    )


def bare_loop(args, steps: int) -> float:
    """Samples/s of the plain loop the engine wraps."""
    cfg = _cfg(Path("unused"), args, steps, 0)
    seed_everything(0)
    task = create_task(cfg)
    opt = torch.optim.AdamW(task.parameters(), lr=1e-3, foreach=False)
    data = _Batches(task, args.batch)
    batches = data.batches
    for b in batches[:3]:  # warm-up
        task(b)["loss"].backward()
    t0 = time.perf_counter()
    for i in range(steps):
        loss = task(batches[i % len(batches)])["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(task.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * args.batch / (time.perf_counter() - t0)


SAVE_TIMES: list[float] = []


def _timed_save(original):
    def save(self):
        t0 = time.perf_counter()
        original(self)
        SAVE_TIMES.append(time.perf_counter() - t0)

    return save


def engine_run(args, steps: int, ckpt_every: int) -> tuple[float, float, int]:
    """(wall seconds of train(), samples/s as logged by the engine, bytes under checkpoints/)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _cfg(Path(tmp) / "run", args, steps, ckpt_every)
        seed_everything(0)
        data = _Batches(create_task(cfg), args.batch)
        t0 = time.perf_counter()
        summary = train(cfg, resume="never", train_data=data)
        wall = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in (Path(tmp) / "run" / "checkpoints").rglob("*") if f.is_file())
    return wall, summary["train"]["samples_per_s"], size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer steps")
    p.add_argument("--json", default=None, help="write results here")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()
    from mmtok.train import engine

    engine._Run._save = _timed_save(engine._Run._save)  # time each checkpoint where it happens
    torch.set_num_threads(max(1, torch.get_num_threads()))
    steps = 40 if args.quick else 200
    reps = 1 if args.quick else 3
    n_ckpt = 10
    # Best of `reps`, interleaved: on a shared machine the fastest run is the least disturbed one.
    bare, logged, size = 0.0, 0.0, 0
    for _ in range(reps):
        bare = max(bare, bare_loop(args, steps))
        _, s, _ = engine_run(args, steps, 0)
        logged = max(logged, s)
        _, _, size = engine_run(args, steps, steps // n_ckpt)
    per_ckpt = sorted(SAVE_TIMES)[len(SAVE_TIMES) // 2]  # median over every save of every repeat
    params = sum(p.numel() for p in create_task(_cfg(Path("x"), args, 1, 0)).parameters())
    rows = [
        ("bare PyTorch loop", f"{bare:,.0f} samples/s"),
        ("mmtok engine (logged)", f"{logged:,.0f} samples/s"),
        ("engine overhead", f"{100 * (bare / logged - 1):+.1f} %"),
        ("one checkpoint (save)", f"{1000 * per_ckpt:.1f} ms (median of {len(SAVE_TIMES)})"),
        ("checkpoint size", f"{size / 1e6:.2f} MB ({params:,} params)"),
    ]
    print(
        f"toy_classifier width {args.width}, batch {args.batch}, {steps} steps, CPU threads {torch.get_num_threads()}"
    )
    for name, value in rows:
        print(f"  {name:26s} {value}")
    result = {
        "steps": steps,
        "repeats": reps,
        "batch": args.batch,
        "width": args.width,
        "params": params,
        "threads": torch.get_num_threads(),
        "bare_samples_per_s": bare,
        "engine_samples_per_s": logged,
        "checkpoint_ms": 1000 * per_ckpt,
        "checkpoint_bytes": size,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
