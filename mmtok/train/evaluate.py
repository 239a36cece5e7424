"""``mmtok eval run --run DIR``: evaluate a training run's checkpoint with its task's ``evaluate``.

Reads the run's resolved ``config.yaml``, rebuilds the task from the registry, loads the weights of
the newest complete checkpoint (``model.safetensors``, written by single-process, DDP and DeepSpeed
runs alike, so DeepSpeed is not needed here) and runs ``task.evaluate`` on ``data.val`` in eval mode
under ``no_grad``. A run with ``train.ema_decay`` evaluates its weight average (``ema.safetensors``, what the
training's own evaluation and export used) unless ``--weights live``. Prints the metrics as JSON and optionally
writes them to a file.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from mmtok.config import ConfigError
from mmtok.hub import CheckpointError
from mmtok.train import checkpoint as ckpt
from mmtok.train.config import load_run_config

logger = logging.getLogger(__name__)


def evaluate_run(
    run_dir: str | Path,
    *,
    checkpoint: str | Path | None = None,
    val: str | None = None,
    batches: int = 0,
    device: str = "auto",
    overrides: list[str] | None = None,
    weights: str = "auto",
) -> dict[str, Any]:
    """Evaluate ``run_dir``'s checkpoint; returns ``{"checkpoint", "step", "weights", "metrics"}``.

    Args:
        run_dir: A folder written by ``mmtok train`` (has ``config.yaml`` and ``checkpoints/``).
        checkpoint: A specific ``step-XXXXXXXX`` folder (default: the newest complete one).
        val: Shard pattern overriding ``data.val``.
        batches: Cap on evaluated batches (0 = all).
        device: auto | cpu | cuda | cuda:N.
        overrides: Extra ``key=value`` config overrides (e.g. ``data.batch_size=256``).
        weights: "auto" (the weight average when the checkpoint has one, else the live weights), "ema" (the
            average; an error without one) or "live".
    """
    from mmtok.train.distributed import resolve_device
    from mmtok.train.engine import create_task, resolve_precision, to_device

    run_dir = Path(run_dir)
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise CheckpointError(f"{run_dir} is not a run folder (no {cfg_file.name}); pass the output_dir of a run")
    cfg = load_run_config([cfg_file], [*(overrides or []), *([f"data.val={val}"] if val else [])])
    folder = Path(checkpoint) if checkpoint else ckpt.find_latest(run_dir / "checkpoints")
    if folder is None or not (folder / ckpt.MODEL_NAME).is_file():
        raise CheckpointError(f"no checkpoint with {ckpt.MODEL_NAME} under {run_dir / 'checkpoints'}; train first")
    if not cfg.data.val:
        raise ConfigError("the run has no data.val; pass --val PATTERN (e.g. data/fashion-mnist/test-*.tar)")
    if weights not in ("auto", "ema", "live"):
        raise ConfigError(f"weights must be auto, ema or live, not {weights!r}")
    state = ckpt.read_state(folder)
    use_ema = weights == "ema" or (weights == "auto" and "ema_updates" in state)
    if use_ema and "ema_updates" not in state:
        raise CheckpointError(f"{folder} holds no weight average (the run had train.ema_decay=0): use --weights live")
    dev = resolve_device(device)
    task = create_task(cfg)
    ckpt.load_model_state(task, folder)
    if use_ema:
        from mmtok.train.ema import load_average_into

        load_average_into(task, folder)
    task.to(dev).eval()
    from mmtok.data import build_loader

    loader = build_loader(
        cfg.data,
        "val",
        transform=task.sample_transform("val"),
        collate=task.collate,
        rank=0,
        world_size=1,
        seed=cfg.train.seed,
    )

    def gen():
        for i, batch in enumerate(loader):
            if batches and i >= batches:
                break
            yield to_device(batch, dev)

    bf16 = resolve_precision(cfg.train.precision, dev)
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
        metrics = {k: float(v) for k, v in task.evaluate(gen()).items()}
    return {
        "checkpoint": str(folder),
        "step": state.get("step"),
        "weights": "ema" if use_ema else "live",
        "metrics": metrics,
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mmtok eval run", description="Evaluate a training run's checkpoint.")
    p.add_argument("--run", required=True, help="run folder (the output_dir of `mmtok train`)")
    p.add_argument("--checkpoint", default=None, help="a step-XXXXXXXX folder (default: newest)")
    p.add_argument("--val", default=None, help="shard pattern overriding data.val")
    p.add_argument("--batches", type=int, default=0, help="evaluate at most this many batches (0 = all)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="also write the result to this file")
    p.add_argument(
        "--weights",
        choices=["auto", "ema", "live"],
        default="auto",
        help="auto: the weight average of a train.ema_decay run (what its evaluation and export used), else live",
    )
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. data.batch_size=256")
    args = p.parse_args(argv)
    try:
        result = evaluate_run(
            args.run,
            checkpoint=args.checkpoint,
            val=args.val,
            batches=args.batches,
            device=args.device,
            overrides=args.overrides,
            weights=args.weights,
        )
    except (CheckpointError, ConfigError) as e:
        print(f"mmtok eval run: {e}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0
