"""``mmtok shards NAME --out DIR [key=value ...]``: build WebDataset shards with a registered builder."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from omegaconf import OmegaConf

from mmtok import registries
from mmtok.registry import RegistryError


def main(argv: list[str]) -> int:
    reg = registries.get("shard builder")
    p = argparse.ArgumentParser(
        prog="mmtok shards",
        description="Build WebDataset tar shards. Builders: " + ", ".join(reg.list()),
        epilog="Builder options are key=value pairs; `mmtok shards NAME --help-options` lists them.",
    )
    p.add_argument("name", help="builder: " + ", ".join(reg.list()))
    p.add_argument("--out", required=False, help="output folder for the shards")
    p.add_argument("--help-options", action="store_true", help="list this builder's options with defaults")
    p.add_argument("options", nargs="*", help="builder options as key=value")
    args = p.parse_intermixed_args(argv)  # options may follow --out DIR
    try:
        entry = reg.get(args.name)
        if args.help_options:
            for f in dataclasses.fields(reg.build_config(args.name)):
                default = getattr(reg.build_config(args.name), f.name)
                print(f"{f.name} = {default!r}")
            return 0
        if not args.out:
            p.error("--out is required")
        bad = [o for o in args.options if "=" not in o]
        if bad:
            p.error(f"options must be key=value, got {bad[0]!r}")
        opts = OmegaConf.to_container(OmegaConf.from_dotlist(args.options)) if args.options else {}
        cfg = reg.build_config(entry.name, out=args.out, **opts)
    except RegistryError as e:
        print(f"mmtok shards: {e}", file=sys.stderr)
        return 2
    try:
        summary = entry.target(cfg)
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        # builders raise these for bad options or inputs; the message says what to change
        print(f"mmtok shards {args.name}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, default=str))
    return 0
