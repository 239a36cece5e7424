"""``python -m mmtok.train --config ... key=value``: ``mmtok train`` for launchers that run a module.

The ``deepspeed`` launcher puts ``--local_rank=N`` right after the module name, before any
subcommand, which ``mmtok``'s top-level parser would reject; this entry point goes straight to the
train subcommand (which accepts and ignores ``--local_rank``; ranks come from the environment)::

    deepspeed --num_gpus 2 --module mmtok.train --config configs/toy/fmnist_classifier.yaml \\
        deepspeed.config=configs/ds/zero2.json
    torchrun --nproc_per_node 2 -m mmtok.train --config configs/toy/fmnist_classifier.yaml
"""

from __future__ import annotations

import sys

from mmtok.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
