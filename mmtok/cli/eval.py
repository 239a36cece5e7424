"""``mmtok eval TARGET [args]``: evaluation runners, one module per capability.

Each target module exposes ``main(argv) -> int``.
"""

from __future__ import annotations

import importlib
import sys

TARGETS: dict[str, tuple[str, str]] = {
    "tokenizer": ("mmtok.tokenizers.evaluate", "PSNR/SSIM, codebook usage, FID-style score, EV(k), recon grid"),
    "mim": ("mmtok.mim.evaluate", "linear probe / fine-tune of a masked-modeling encoder, recon figure"),
    "mllm": ("mmtok.mllm.evaluate", "answer accuracy of an MLLM on a held-out VQA split, under pruning"),
    "seg": ("mmtok.mllm.seg.evaluate", "segmentation gIoU/cIoU/mIoU of an MLLM per head, refinement and pruner"),
    "clip": ("mmtok.clip.evaluate", "CLIP retrieval recall@1/5 on held-out scenes and zero-shot Fashion-MNIST"),
    "run": ("mmtok.train.evaluate", "evaluate a training run's checkpoint with its task's evaluate()"),
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: mmtok eval TARGET [args]\n\ntargets:")
        for name, (_, help_) in TARGETS.items():
            print(f"  {name:10s} {help_}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in TARGETS:
        print(f"mmtok eval: unknown target {name!r}; targets: {', '.join(TARGETS)}", file=sys.stderr)
        return 2
    module_name = TARGETS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            print(f"mmtok eval {name}: not built yet in this version of mmtok.", file=sys.stderr)
            return 2
        raise
    return int(module.main(rest) or 0)
