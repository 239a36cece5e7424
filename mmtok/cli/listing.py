"""``mmtok list [KIND]``: what is registered."""

from __future__ import annotations

import argparse

from mmtok import registries


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mmtok list", description="List registered components.")
    p.add_argument("kind", nargs="?", help="one of: " + ", ".join(registries.kinds()))
    args = p.parse_args(argv)
    for kind in [args.kind] if args.kind else registries.kinds():
        reg = registries.get(kind)
        print(f"{kind}:")
        for name in reg.list():
            print(f"  {name:28s} {reg.get(name).help}")
    return 0
