"""``mmtok train --config a.yaml [--config b.yaml] key=value ...``"""

from __future__ import annotations

import argparse
import json
import sys

from mmtok.config import ConfigError, load_run_config


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mmtok train", description="Train a registered task from YAML configs.")
    p.add_argument("--config", "-c", action="append", default=[], help="YAML config (repeatable; later wins)")
    p.add_argument(
        "--resume", default="auto", help="auto (latest checkpoint in output_dir), never, or a checkpoint path"
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100 data.batch_size=16")
    args = p.parse_args(argv)
    try:
        cfg = load_run_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"mmtok train: {e}", file=sys.stderr)
        return 2
    from mmtok.train.engine import train

    summary = train(cfg, resume=args.resume)
    if summary is not None:
        print(json.dumps(summary, indent=2, default=str))
    return 0
