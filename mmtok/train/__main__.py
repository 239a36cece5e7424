"""The train command: ``mmtok train`` and ``python -m mmtok.train --config ... key=value``.

The ``deepspeed`` launcher puts ``--local_rank=N`` right after the module name, before any
subcommand, which ``mmtok``'s top-level parser would reject; ``python -m mmtok.train`` goes straight
to this command (which accepts and ignores ``--local_rank``; ranks come from the environment)::

    deepspeed --num_gpus 2 --module mmtok.train --config configs/toy/fmnist_classifier.yaml \\
        deepspeed.config=configs/ds/zero2.json
    torchrun --nproc_per_node 2 -m mmtok.train --config configs/toy/fmnist_classifier.yaml

Several nodes: ``tools/launch.sh`` (``NNODES``/``NODE_RANK``/``MASTER_ADDR`` for torchrun, ``HOSTFILE`` for the
DeepSpeed launcher) and, under SLURM, ``sbatch tools/slurm.sh CONFIG ...`` (one ``python -m mmtok.train.launch
slurm`` per node, which composes that node's torchrun command); see the README's "Scaling out".

The command lives here, in the engine package, and ``mmtok.cli.train`` re-exports it: the engine never
imports the command-line package. A config that cannot run (a bad value, a missing file, a device this
machine lacks, an output path that is a file) ends with one line on stderr and exit status 2, before
the run folder is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

# Raised for input the user can fix: printed as one line, exit status 2, never a traceback.
EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmtok train", description="Train a registered task from YAML configs.")
    p.add_argument("--config", "-c", action="append", default=[], help="YAML config (repeatable; later wins)")
    p.add_argument(
        "--resume", default="auto", help="auto (latest checkpoint in output_dir), never, or a checkpoint path"
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument(
        "overrides",
        nargs="*",
        help="key=value overrides, e.g. train.steps=100 data.batch_size=16 train.max_seconds=600 "
        "output_dir=runs/my_run (default runs/<task name>)",
    )
    return p


def main(argv: list[str]) -> int:
    """Run the train command on ``argv`` (the arguments after ``train``); returns the exit status."""
    args = build_parser().parse_args(argv)
    from mmtok.config import ConfigError
    from mmtok.hub import CheckpointError
    from mmtok.train.config import load_run_config
    from mmtok.train.distributed import DistributedSetupError

    def fail(e: Exception) -> int:
        message = " ".join(str(e).split())  # one line whatever the library put in it
        print(f"mmtok train: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT

    try:
        cfg = load_run_config(args.config, args.overrides)
        if not cfg.output_dir:
            # The Python API requires output_dir; the command picks a per-task folder and says which.
            cfg.output_dir = f"runs/{cfg.task['name']}"
            print(f"mmtok train: output_dir not set; writing to {cfg.output_dir}", file=sys.stderr)
        from mmtok.train.engine import train

        # train() checks the config against this machine (mmtok.train.engine.preflight) before it
        # writes anything; later problems (an unreadable --resume path, data that yields no batch, a
        # DeepSpeed file DeepSpeed rejects) are reported the same way.
        summary = train(cfg, resume=args.resume)
    except (ConfigError, CheckpointError, DistributedSetupError) as e:
        return fail(e)
    if summary is not None:
        print(json.dumps(summary, indent=2, default=str))
    return 0


def _configure_logging() -> None:
    """INFO on rank 0, warnings elsewhere (``mmtok`` itself does this in mmtok.cli.main)."""
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


if __name__ == "__main__":
    _configure_logging()
    sys.exit(main(sys.argv[1:]))
