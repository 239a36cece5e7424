"""Data-loading throughput: WebDataset shards (mmtok.data) vs a folder of PNG files, same decode + transforms.

The shards are also read as remote shards through webdataset's ``gopen``: over HTTP from a local
``http.server`` on 127.0.0.1 (gopen runs ``curl`` per shard) and through ``pipe:cat``. These rows measure what
streaming adds (a process per shard, reading through a pipe) next to local files; a real object store adds its
network latency and bandwidth on top.

Both readers decode with ``mmtok.data.decode`` (PIL) and apply the same transform (resize + random
horizontal flip), batch with the same collate and shuffle (shards: a 1000-sample buffer; folder: a random
permutation). Each measurement is one full epoch through a fresh ``DataLoader`` (worker start-up
included), repeated ``--repeats`` times; the best run is reported. Files are in the page cache for both
(written just before), so this measures CPU cost (tar parsing vs per-file open/stat), not disk speed.

    python tools/bench/data.py --quick --json bench_results/data.json
    python tools/bench/data.py --json bench_results/data_full.json       # 20k FMNIST, 4k scenes
    python tools/bench/data.py --quick --readers shards,shards-http,shards-pipe   # remote rows only
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mmtok.data import ShardDataset, write_shards
from mmtok.data.decode import decode_sample
from mmtok.data.loader import ShardLoader, default_collate
from mmtok.data.transforms import Compose, RandomHorizontalFlip, Resize


class PngFolder(Dataset):
    """The same samples as loose files: ``<key>.png`` (+ ``<key>.mask.png``, ``<key>.json``)."""

    def __init__(self, root: Path, transform):
        self.root, self.transform = root, transform
        self.keys = sorted(p.name[: -len(".json")] for p in root.glob("*.json"))

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict:
        key = self.keys[i]
        raw = {"__key__": key}
        for ext in ("png", "mask.png", "json"):
            p = self.root / f"{key}.{ext}"
            if p.exists():
                raw[ext] = p.read_bytes()
        sample = decode_sample(raw)
        sample["__seed__"] = i  # the shard reader seeds augmentations per sample too
        sample = self.transform(sample)
        sample.pop("__seed__", None)
        sample.pop("__rng__", None)
        return sample


def prepare(root: Path, name: str, n: int) -> tuple[str, Path]:
    """Write ``n`` samples of dataset ``name`` as shards and as a PNG folder (cached by size)."""
    from mmtok.data.sources.fashion_mnist import load_fashion_mnist
    from mmtok.data.sources.scenes import FashionScenesConfig, scene_samples

    base = root / f"{name}-{n}"
    shard_dir, folder = base / "shards", base / "png"
    pattern = str(shard_dir / "bench.json")  # the index names the shards
    if (base / "done").exists():
        return pattern, folder
    shutil.rmtree(base, ignore_errors=True)
    folder.mkdir(parents=True)
    if name == "fmnist":
        from mmtok.data.sources.fashion_mnist import _png_l

        images, labels = load_fashion_mnist("train")
        samples = [
            {"__key__": f"s{i:06d}", "png": _png_l(images[i]), "json": {"label": int(labels[i])}} for i in range(n)
        ]
    else:
        cfg = FashionScenesConfig(canvas=64)
        samples = []
        for s in scene_samples(cfg, "train", n):
            samples.append(
                {
                    "__key__": s["__key__"],
                    "png": write_png(s["png"]),
                    "mask.png": write_png(s["mask.png"]),
                    "json": {k: v for k, v in s["json"].items() if k != "items"},
                }
            )
    write_shards(samples, shard_dir, prefix="bench", maxcount=500)
    for s in samples:
        for ext in ("png", "mask.png"):
            if ext in s:
                (folder / f"{s['__key__']}.{ext}").write_bytes(s[ext])
        (folder / f"{s['__key__']}.json").write_text(json.dumps(s["json"]))
    (base / "done").write_text("ok")
    return pattern, folder


def write_png(arr: np.ndarray) -> bytes:
    from mmtok.data.writer import encode_image

    return encode_image(arr, "png")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def serve(folder: Path) -> http.server.ThreadingHTTPServer:
    """An HTTP server on 127.0.0.1 (a free port) for ``folder``, in a daemon thread."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def remote_pattern(reader: str, pattern: str, srv: http.server.ThreadingHTTPServer | None) -> str:
    """The index json ``pattern`` as the URL ``reader`` streams it from ("shards" = the local file)."""
    if reader == "shards-http":
        return f"http://127.0.0.1:{srv.server_address[1]}/{os.path.basename(pattern)}"
    if reader == "shards-pipe":
        return f"pipe:cat {pattern}"
    return pattern


def run_epoch(loader) -> tuple[int, float]:
    t0 = time.perf_counter()
    n = 0
    for batch in loader:
        n += len(batch["__key__"])
    return n, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sets (2k FMNIST, 500 scenes), one repeat")
    p.add_argument("--json", type=str, default="", help="write the results here")
    p.add_argument("--workers", type=str, default="0,1,2", help="comma-separated DataLoader worker counts")
    p.add_argument(
        "--readers",
        type=str,
        default="shards,shards-http,shards-pipe,png-folder",
        help="comma-separated: shards (local), shards-http (local HTTP server), shards-pipe (pipe:cat), png-folder",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=0, help="runs per cell (default: 1 quick, 2 full)")
    p.add_argument("--data-dir", type=str, default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "mmtok-bench-data"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # decode is per-sample Python/PIL work; keep intra-op threads from competing
    sizes = {"fmnist": 2000, "scenes": 500} if args.quick else {"fmnist": 20000, "scenes": 4000}
    repeats = args.repeats or (1 if args.quick else 2)
    workers = [int(w) for w in args.workers.split(",")]
    readers = [r.strip() for r in args.readers.split(",") if r.strip()]
    rows = []
    for name, n in sizes.items():
        pattern, folder = prepare(Path(args.data_dir), name, n)
        srv = serve(Path(pattern).parent) if "shards-http" in readers else None
        size = 32 if name == "fmnist" else 64
        transform = Compose([Resize(size), RandomHorizontalFlip()])
        for w in workers:
            results = {}
            for reader in readers:
                best = None
                for _ in range(repeats):
                    if reader.startswith("shards"):
                        src = remote_pattern(reader, pattern, srv)
                        ds = ShardDataset(src, transform=transform, shuffle_buffer=1000, seed=0)
                        loader = ShardLoader(ds, args.batch_size, num_workers=w)
                    else:
                        loader = DataLoader(
                            PngFolder(folder, transform),
                            batch_size=args.batch_size,
                            shuffle=True,
                            num_workers=w,
                            collate_fn=default_collate,
                        )
                    count, secs = run_epoch(loader)
                    assert count == n, f"{reader} read {count} of {n} samples"
                    best = secs if best is None else min(best, secs)
                results[reader] = best
                rows.append(
                    {
                        "dataset": name,
                        "samples": n,
                        "reader": reader,
                        "workers": w,
                        "seconds": round(best, 3),
                        "samples_per_s": round(n / best, 1),
                    }
                )
            for r in rows[-len(readers) :]:
                if r["reader"].startswith("shards") and "png-folder" in results:
                    r["speedup_vs_folder"] = round(results["png-folder"] / results[r["reader"]], 2)
                if r["reader"] != "shards" and r["reader"].startswith("shards") and "shards" in results:
                    r["time_vs_local_shards"] = round(results[r["reader"]] / results["shards"], 2)
        if srv is not None:
            srv.shutdown()
            srv.server_close()
    header = (
        f"{'dataset':8} {'samples':>7} {'reader':11} {'workers':>7} {'seconds':>8} {'samples/s':>10} {'x folder':>8} "
        f"{'time/local':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        sp = f"{r['speedup_vs_folder']:.2f}" if "speedup_vs_folder" in r else ""
        vs = f"{r['time_vs_local_shards']:.2f}" if "time_vs_local_shards" in r else ""
        print(
            f"{r['dataset']:8} {r['samples']:7d} {r['reader']:11} {r['workers']:7d} {r['seconds']:8.2f} "
            f"{r['samples_per_s']:10.0f} {sp:>8} {vs:>10}"
        )
    if args.json:
        out = {
            "bench": "data",
            "quick": args.quick,
            "batch_size": args.batch_size,
            "repeats": repeats,
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": sys.version.split()[0],
                "torch": torch.__version__,
            },
            "rows": rows,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
