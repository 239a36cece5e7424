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


Q = "runs/quickstart"  # every output of the quickstart lives here (the demo reads its models from it)

# Short budgets so that the whole pipeline runs in minutes on 2 CPU cores; the recipe files in configs/
# hold the full budgets (see README) and the same commands without the overrides run them.
STEPS = [
    Step(
        "Fashion-MNIST shards (70k real images)",
        ["shards", "fashion-mnist", "--out", "data/fashion-mnist"],
        "data/fashion-mnist/train.json",
    ),
    Step(
        "Toy classifier: the training engine end to end (checkpoints, eval, export)",
        [
            "train",
            "--config",
            "configs/toy/fmnist_classifier.yaml",
            f"output_dir={Q}/toy",
            "train.steps=300",
            "train.eval_every=150",
            "train.ckpt_every=150",
        ],
        f"{Q}/toy/export/config.json",
        needs="mmtok.train.toy",
    ),
    Step(
        "VQ tokenizer (f4, 512 codes) on Fashion-MNIST",
        [
            "train",
            "--config",
            "configs/tokenizer/vq_fmnist.yaml",
            f"output_dir={Q}/vq_fmnist",
            "train.steps=400",
            "train.eval_every=200",
            "train.ckpt_every=200",
        ],
        f"{Q}/vq_fmnist/export/config.json",
        needs="mmtok.tokenizers",
    ),
    Step(
        "Evaluate the tokenizer (PSNR, SSIM, usage, tokens/image before and after 2D BPE, recon grid)",
        [
            "eval",
            "tokenizer",
            "--tokenizer",
            f"{Q}/vq_fmnist/export",
            "--data",
            "fmnist",
            "--n",
            "500",
            "--out",
            f"{Q}/vq_fmnist/eval",
        ],
        f"{Q}/vq_fmnist/eval/metrics.json",
        needs="mmtok.tokenizers",
    ),
    Step(
        "MAE pretraining (ViT, patch 4, 75% random masking) on Fashion-MNIST",
        [
            "train",
            "--config",
            "configs/mim/mae_fmnist.yaml",
            f"output_dir={Q}/mae_fmnist",
            "train.steps=300",
            "task.total_steps=300",
            "data.batch_size=128",
            "optim.warmup_steps=30",
            "train.eval_every=150",
            "train.ckpt_every=150",
        ],
        f"{Q}/mae_fmnist/export",
        needs="mmtok.mim",
    ),
    Step(
        "Evaluate the MAE encoder (linear probe on Fashion-MNIST test, reconstruction figure)",
        [
            "eval",
            "mim",
            "--model",
            f"{Q}/mae_fmnist",
            "--limit-train",
            "10000",
            "--limit-test",
            "2000",
            "--figure",
            f"{Q}/mae_fmnist/recon.png",
            "--out",
            f"{Q}/mae_fmnist/eval.json",
        ],
        f"{Q}/mae_fmnist/eval.json",
        needs="mmtok.mim",
    ),
    Step(
        "fashion-vqa shards (96x96 scenes -> 576 image tokens, templated questions)",
        ["shards", "fashion-vqa", "--out", "data/fashion-vqa"],
        "data/fashion-vqa/test.json",
        needs="mmtok.mllm",
    ),
    Step(
        "Tiny MLLM (ViT tower + MLP projector + Llama) on fashion-vqa",
        [
            "train",
            "--config",
            "configs/mllm/fashion_vqa_cpu.yaml",
            f"output_dir={Q}/mllm_fashion_vqa",
            "train.steps=300",
            "train.eval_every=150",
            "train.ckpt_every=150",
            "optim.warmup_steps=30",
            "train.progress=true",
        ],
        f"{Q}/mllm_fashion_vqa/export/config.json",
        needs="mmtok.mllm",
    ),
    Step(
        "Answer accuracy under every pruner at 64 of 576 image tokens",
        [
            "eval",
            "mllm",
            "--model",
            f"{Q}/mllm_fashion_vqa/export",
            "--data",
            "data/fashion-vqa/test-*.tar",
            "--keeps",
            "64",
            "--limit",
            "100",
            "--json",
            f"{Q}/mllm_fashion_vqa/pruning.json",
        ],
        f"{Q}/mllm_fashion_vqa/pruning.json",
        needs="mmtok.mllm",
    ),
    Step(
        "mmtok prune: one question about one scene, DART at 64 tokens, timed against no pruning",
        [
            "prune",
            "--model",
            f"{Q}/mllm_fashion_vqa/export",
            "--method",
            "dart",
            "--keep",
            "64",
            "--image",
            f"{Q}/scene.png",
            "--prompt",
            "how many items are there ?",
        ],
        "",
        needs="mmtok.mllm",
    ),
]


def _write_scene(path: Path) -> None:
    """A 96x96 fashion scene for the `mmtok prune` step (test split items, fixed seed)."""
    import numpy as np
    from PIL import Image

    from mmtok.data.sources.fashion_mnist import load_fashion_mnist
    from mmtok.data.sources.scenes import make_scene

    images, labels = load_fashion_mnist("test")
    rgb, _, items = make_scene(np.random.default_rng(7), images, labels, canvas=96, min_items=2, max_items=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    print(f"wrote {path}: " + ", ".join(it["expression"] for it in items), flush=True)


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
        if step.done and (ROOT / step.done).exists() and not args.force:
            print(f"{head}: already done ({step.done})", flush=True)
            continue
        if "--image" in step.argv:
            _write_scene(ROOT / step.argv[step.argv.index("--image") + 1])
        print(f"\n{head}\n$ mmtok {shlex.join(step.argv)}", flush=True)
        t = time.time()
        rc = subprocess.call([*MMTOK, *step.argv], env=env)
        if rc != 0:
            print(f"{head}: failed with exit status {rc}", file=sys.stderr)
            return rc
        print(f"{head}: done in {time.time() - t:.0f} s", flush=True)
    print(f"\nQuickstart finished in {time.time() - t0:.0f} s. Outputs are under data/ and {Q}/.")
    shots = ROOT / Q / "demo_screenshots"
    if (ROOT / "tools" / "demo_screenshot.py").is_file() and (not shots.exists() or args.force):
        # The demo itself: render each tab once in headless Chromium (skipped without a browser).
        rc = subprocess.call([sys.executable, "tools/demo_screenshot.py", "--models", Q, "--out", str(shots)], env=env)
        print("demo screenshots: " + (str(shots) if rc == 0 else "skipped (no headless Chromium)"), flush=True)
    print(f"Browse everything with:  .venv/bin/mmtok demo --models {Q}   (http://127.0.0.1:7860)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
