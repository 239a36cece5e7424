"""The quickstart pipeline behind `make demo`: every step a user would type, run in order.

Each step is an `mmtok` command line (printed before it runs) and a "done" marker: a step whose
output already exists is skipped, so a second `make demo` takes seconds. `--force` reruns all.
Steps whose capability is not installed are reported and skipped rather than faked.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MMTOK = [sys.executable, "-m", "mmtok"]


@dataclass
class Step:
    title: str
    argv: list[str]
    done: str  # path (relative to the repo root) that exists once the step has run
    needs: str = ""  # importable module the step needs ("" = always available)


STEPS = [
    Step("Fashion-MNIST shards (70k real images)", ["shards", "fashion-mnist", "--out", "data/fashion-mnist"],
         "data/fashion-mnist/train.json"),
    Step("Train the toy classifier (training engine, checkpoints, eval hook)",
         ["train", "--config", "configs/toy/fmnist_classifier.yaml", "output_dir=runs/toy"],
         "runs/toy/export/config.json", needs="mmtok.train.toy"),
]


def _available(module: str) -> bool:
    if not module:
        return True
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--force", action="store_true", help="rerun steps whose outputs exist")
    p.add_argument("--only", default="", help="run only steps whose title contains this text")
    args = p.parse_args()
    os.chdir(ROOT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.time()
    for i, step in enumerate(STEPS, 1):
        if args.only and args.only.lower() not in step.title.lower():
            continue
        head = f"[{i}/{len(STEPS)}] {step.title}"
        if not _available(step.needs):
            print(f"{head}: skipped, {step.needs} is not part of this version of mmtok", flush=True)
            continue
        if (ROOT / step.done).exists() and not args.force:
            print(f"{head}: already done ({step.done})", flush=True)
            continue
        print(f"\n{head}\n$ mmtok {shlex.join(step.argv)}", flush=True)
        t = time.time()
        rc = subprocess.call([*MMTOK, *step.argv], env=env)
        if rc != 0:
            print(f"{head}: failed with exit status {rc}", file=sys.stderr)
            return rc
        print(f"{head}: done in {time.time() - t:.0f} s", flush=True)
    print(f"\nQuickstart finished in {time.time() - t0:.0f} s. Outputs are under data/ and runs/.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
