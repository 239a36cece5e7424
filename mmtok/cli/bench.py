"""``mmtok bench NAME [args]``: run ``tools/bench/NAME.py`` of a source checkout."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def _bench_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "tools" / "bench"


def main(argv: list[str]) -> int:
    bench = _bench_dir()
    names = sorted(p.stem for p in bench.glob("*.py") if not p.stem.startswith("_")) if bench.is_dir() else []
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: mmtok bench NAME [--quick] [--json PATH] ...\nbenchmarks: " + (", ".join(names) or "(none found)")
        )
        return 0
    name, rest = argv[0], argv[1:]
    if name not in names:
        print(f"mmtok bench: no benchmark {name!r} in {bench}; available: {', '.join(names)}", file=sys.stderr)
        return 2
    sys.argv = [str(bench / f"{name}.py"), *rest]
    runpy.run_path(str(bench / f"{name}.py"), run_name="__main__")
    return 0
