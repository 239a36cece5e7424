"""``mmtok shards NAME --out DIR [key=value ...]``: build WebDataset shards with a registered builder.

A successful build writes ``DIR/build.json`` (:func:`build_record`): the builder, every option and a fingerprint
of the code that generates the samples, so a folder says how it was made and a pipeline that reuses shards
(``tools/quickstart.py``) can tell shards built by other code or with other options from the ones it wants. The
record is removed when a build starts and written when it ends, so a folder left by an interrupted build has none.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mmtok import __version__, registries
from mmtok.registry import RegistryError

BUILD_RECORD = "build.json"


def builder_config(name: str, out: str, options: list[str]) -> Any:
    """The config of builder ``name`` for ``key=value`` ``options`` (what ``mmtok shards`` builds from)."""
    bad = [o for o in options if "=" not in o]
    if bad:
        raise ValueError(f"options must be key=value, got {bad[0]!r}")
    opts = OmegaConf.to_container(OmegaConf.from_dotlist(options)) if options else {}
    return registries.get("shard builder").build_config(name, out=out, **opts)


def code_fingerprint(name: str) -> str:
    """sha256 (16 hex digits) of the sources that decide what builder ``name`` writes: its own module and every
    module of ``mmtok.data.sources`` (the generators the builders share). An edit of a docstring there changes it
    too: a needless rebuild costs seconds, stale shards cost wrong figures."""
    from mmtok.data import sources

    target = registries.get("shard builder").get(name).target
    files = {Path(inspect.getsourcefile(target))} | set(Path(sources.__file__).parent.glob("*.py"))
    digest = hashlib.sha256()
    for f in sorted(files):
        digest.update(f.name.encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()[:16]


def build_record(name: str, cfg: Any) -> dict[str, Any]:
    """How shards are made: builder, options (all but ``out``, as JSON values) and :func:`code_fingerprint`."""
    options = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "out"}
    return {
        "builder": name,
        "options": json.loads(json.dumps(options, default=str)),
        "code": code_fingerprint(name),
        "mmtok": __version__,
    }


def stale_reason(name: str, out: str, options: list[str]) -> str | None:
    """None when ``out`` holds shards that ``mmtok shards name --out out *options`` would write now; else why not
    (no record, another builder, other options or other code)."""
    path = Path(out) / BUILD_RECORD
    if not path.is_file():
        return f"{path} is missing (not built, interrupted, or built before build records existed)"
    try:
        have = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return f"{path} is unreadable ({e})"
    want = build_record(name, builder_config(name, out, options))
    for key in ("builder", "options", "code"):
        if have.get(key) != want[key]:
            if key == "options" and isinstance(have.get(key), dict):
                diff = sorted(k for k in set(have[key]) | set(want[key]) if have[key].get(k) != want[key].get(k))
                return f"{path}: built with other options ({', '.join(diff)})"
            return f"{path}: built by other {key} ({have.get(key)} vs {want[key]})"
    return None


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
        try:
            cfg = builder_config(entry.name, args.out, args.options)
        except ValueError as e:  # an option without "=": a usage error, like a missing --out
            p.error(str(e))
    except RegistryError as e:
        print(f"mmtok shards: {e}", file=sys.stderr)
        return 2
    record_path = Path(args.out) / BUILD_RECORD
    record_path.unlink(missing_ok=True)  # a build that stops half-way leaves no record of a finished one
    try:
        summary = entry.target(cfg)
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        # builders raise these for bad options or inputs; the message says what to change
        print(f"mmtok shards {args.name}: {e}", file=sys.stderr)
        return 2
    record = {**build_record(entry.name, cfg), "summary": summary}
    record_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = record_path.with_name(f".{BUILD_RECORD}.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    tmp.replace(record_path)
    print(json.dumps(summary, indent=2, default=str))
    return 0
