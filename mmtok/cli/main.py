"""The ``mmtok`` command.

Each subcommand lives in its own module exposing ``main(argv: list[str]) -> int``; modules are imported
only when their subcommand runs, so ``mmtok --help`` answers instantly. A subcommand whose capability
is not built yet says so and exits with status 2 instead of pretending.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# name -> (module providing main(argv), one-line help, capability it belongs to)
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "shards": ("mmtok.cli.shards", "build WebDataset tar shards from built-in sources or folders", "data layer"),
    "train": (
        "mmtok.cli.train",
        "train any registered task from YAML configs (single process or DeepSpeed)",
        "training engine",
    ),
    "eval": ("mmtok.cli.eval", "evaluate a tokenizer, a masked-modeling encoder or an MLLM", "evaluation"),
    "prune": (
        "mmtok.mllm.pruning.cli",
        "answer a prompt about an image with visual-token pruning, timed",
        "MLLM token pruning",
    ),
    "segment": (
        "mmtok.mllm.seg.cli",
        "segment what an expression refers to with an MLLM (text-as-mask, all-mask or [SEG] head)",
        "MLLM segmentation",
    ),
    "convert": (
        "mmtok.cli.convert",
        "convert an official MAE .pth or a transformers ViTMAE / VideoMAE folder into an mmtok folder (safetensors), "
        "or the clip task's open_clip export into a transformers CLIPModel folder",
        "checkpoint conversion",
    ),
    "bench": ("mmtok.cli.bench", "run a benchmark script from tools/bench", "benchmarks"),
    "demo": ("mmtok.cli.demo", "launch the Gradio demo on 127.0.0.1", "Gradio demo"),
    "list": ("mmtok.cli.listing", "list registered components (tokenizers, maskers, pruners, tasks, ...)", "registry"),
}


def _parser() -> argparse.ArgumentParser:
    from mmtok import __version__

    p = argparse.ArgumentParser(
        prog="mmtok",
        description="mmtok: multimodal masked-token vision-language toolkit.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `mmtok <command> --help` for a command's options.",
    )
    p.add_argument("--version", action="version", version=f"mmtok {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="<command>")
    for name, (_, help_, _) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    # Split at the subcommand: everything after it belongs to the subcommand's own parser.
    idx = next((i for i, a in enumerate(argv) if a in SUBCOMMANDS), None)
    if idx is None:
        args = parser.parse_args(argv)
        parser.print_help()
        return 0 if not argv or args.command is None and "--help" in argv else 1
    top = parser.parse_args(argv[:idx])
    name, rest = argv[idx], argv[idx + 1 :]
    level = logging.DEBUG if top.verbose else logging.INFO
    # only rank 0 logs at INFO under a distributed launcher
    if os.environ.get("RANK", "0") != "0":
        level = logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    module_name, _, capability = SUBCOMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            print(
                f"mmtok {name}: not built yet. It belongs to the {capability} capability, which this "
                "version of mmtok does not include.",
                file=sys.stderr,
            )
            return 2
        raise
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
