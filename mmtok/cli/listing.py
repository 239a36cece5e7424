"""``mmtok list [KIND]``: what is registered.

A kind is accepted as the README writes it (``tokenizers``, ``seg-formats``, ``vision-towers``), in the
singular, or with underscores; the listing names kinds that way too. Kinds with no entry (a capability
this installation does not include) are left out of the full listing; asking for one by name says it
is empty. Pruners are tagged with their kind: ``[select]`` (keeps a subset of the image tokens) or ``[merge]``
(merges them into groups: ToMe, PiToMe).
"""

from __future__ import annotations

import argparse
import difflib
import sys

from mmtok import registries


def display_name(kind: str) -> str:
    """``"vision tower"`` -> ``"vision-towers"`` (the form the README and ``--help`` use)."""
    return kind.replace(" ", "-") + "s"


def resolve_kind(text: str) -> str | None:
    """The registry kind meant by ``text`` (plural or singular, spaces, hyphens or underscores), or None."""
    key = " ".join(text.strip().lower().replace("-", " ").replace("_", " ").split())
    for kind in registries.kinds():
        if key in (kind, kind + "s"):
            return kind
    return None


def main(argv: list[str]) -> int:
    names = [display_name(k) for k in registries.kinds()]
    p = argparse.ArgumentParser(prog="mmtok list", description="List registered components.")
    p.add_argument("kind", nargs="?", help="one of: " + ", ".join(names))
    args = p.parse_args(argv)
    if args.kind:
        kind = resolve_kind(args.kind)
        if kind is None:
            close = difflib.get_close_matches(args.kind.lower(), names, n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            print(f"mmtok list: unknown kind {args.kind!r}.{hint} Kinds: {', '.join(names)}.", file=sys.stderr)
            return 2
        kinds = [kind]
    else:
        kinds = registries.kinds()
    for kind in kinds:
        reg = registries.get(kind)
        entries = reg.list()
        if not entries:
            if args.kind:
                print(f"{display_name(kind)}: none registered in this installation")
            continue
        print(f"{display_name(kind)}:")
        for name in entries:
            entry = reg.get(name)
            # pruners come in two kinds (mmtok.mllm.pruning.base): "select" keeps a subset, "merge" merges groups
            tag = f"[{entry.target.kind}] " if kind == "pruner" and hasattr(entry.target, "kind") else ""
            print(f"  {name:28s} {tag}{entry.help}")
    return 0
