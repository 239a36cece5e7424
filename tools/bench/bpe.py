"""Benchmark: training time of mmtok's incremental 2D BPE vs a full-recount trainer vs HF `tokenizers`.

Same codes and number of merges for every trainer:

* ``mmtok 1d`` / ``mmtok 2d``: :func:`mmtok.tokenizers.bpe.train_bpe` (pair counts + occurrence index +
  lazy max-heap).
* ``recount 1d``: the straightforward trainer written here as the baseline: every merge recounts all
  pairs of the current corpus (numpy ``bincount`` over pair keys), then applies the best one. It uses
  the same tie-breaking, so its merges must equal mmtok's (checked). It is run for
  ``--recount-merges`` merges and its time is extrapolated linearly to the full count (stated as such).
* ``hf 1d``: HF ``tokenizers`` BpeTrainer, codes mapped to private-use characters (chr(0xF0000 + c)),
  one row of codes per word, the full initial alphabet, the same ``min_frequency``. It is timed two
  ways, each in a fresh process (the Rust thread pool is sized once per process): with its default
  thread pool (``RAYON_NUM_THREADS`` and ``TOKENIZERS_PARALLELISM`` unset: one thread per logical CPU)
  and on one thread (``RAYON_NUM_THREADS=1``). On a 2-core machine its pool is slower than one thread.

How each side runs: mmtok's trainer is numpy in one process (its element-wise work is single-threaded);
the recount baseline likewise. Every trainer is timed ``--repeats`` times (default 3) and the table
shows the median (min and max are in the JSON); the load average before the run is printed, because
on a shared machine it moves every figure.

Codes: ``--codes file.npy`` ([B, H, W] ints), or ``--tokenizer DIR`` (an mmtok tokenizer encoding
Fashion-MNIST images), or by default a 1024-code k-means patch tokenizer (4x4 patches of Fashion-MNIST
images upsampled to 64x64 -> 16x16 grids), which gives the heavy-tailed statistics of real VQ codes.

    python tools/bench/bpe.py [--quick] [--grids 5000] [--merges 2048] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from mmtok.tokenizers.bpe import DIRS, BPEVocab, _Grids, train_bpe

FMNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"


def kmeans_codes(n: int, codes: int = 1024, seed: int = 0) -> np.ndarray:
    """[n, 16, 16] codes of a k-means patch tokenizer on upsampled Fashion-MNIST."""
    import torch
    import torch.nn.functional as F
    from sklearn.cluster import MiniBatchKMeans

    with gzip.open(FMNIST) as f:
        imgs = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:n].astype(np.float32) / 255
    x = F.interpolate(torch.from_numpy(imgs)[:, None], size=64, mode="bilinear").numpy()[:, 0]
    patches = x.reshape(n, 16, 4, 16, 4).transpose(0, 1, 3, 2, 4).reshape(-1, 16)
    km = MiniBatchKMeans(codes, batch_size=4096, n_init=1, max_iter=20, random_state=seed)
    km.fit(patches[:: max(1, len(patches) // 300_000)])
    return km.predict(patches).reshape(n, 16, 16).astype(np.int64)


def tokenizer_codes(path: str, n: int) -> np.ndarray:
    import torch

    from mmtok import hub
    from mmtok.data.sources.fashion_mnist import load_fashion_mnist

    model = hub.from_pretrained(path, kind="tokenizer").eval()
    imgs, _ = load_fashion_mnist("train")
    x = torch.from_numpy(imgs[:n]).float().div(255)[:, None]
    size = getattr(model.config, "image_size", 28)
    x = torch.nn.functional.interpolate(x, size=size, mode="bilinear").repeat(1, model.config.in_channels, 1, 1)
    out = []
    with torch.no_grad():
        for i in range(0, n, 256):
            out.append(model.encode(x[i : i + 256] * 2 - 1).indices.numpy())
    return np.concatenate(out)


def recount_train(grids: np.ndarray, num_merges: int, num_codes: int, mode: str, min_frequency: int = 2):
    """Baseline: recount every pair each merge. Returns (merges, seconds)."""
    t0 = time.perf_counter()
    vmax = num_codes + num_merges
    th, tw = np.ones(vmax, np.int64), np.ones(vmax, np.int64)
    state = _Grids(list(grids), th, tw, vmax, two_d=mode == "2d")
    merges = []
    for m in range(num_merges):
        anchors, keys = state.all_pairs()
        uk, inv = np.unique(keys, return_inverse=True)
        counts = np.bincount(inv)
        best = int(np.argmax(counts))  # first max = smallest key among ties, as in mmtok
        if counts[best] < min_frequency:
            break
        k = int(uk[best])
        pair, d = divmod(k, 2)
        a, b = divmod(pair, vmax)
        p, q = state.select(anchors[inv == best], a, b, d)
        t = num_codes + m
        th[t], tw[t] = (th[a], tw[a] + tw[b]) if d == 0 else (th[a] + th[b], tw[a])
        state.apply(p, q, b, t)
        merges.append((a, b, DIRS[d]))
    return merges, time.perf_counter() - t0


def hf_train(grids: np.ndarray, num_merges: int, num_codes: int, min_frequency: int = 2):
    """HF tokenizers BPE on rows of codes (1D). Returns (tokenizer, seconds)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    alphabet = [chr(0xF0000 + c) for c in range(num_codes)]
    lines = [" ".join("".join(alphabet[c] for c in row) for row in g) for g in grids]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(
        vocab_size=num_codes + num_merges,
        min_frequency=min_frequency,
        initial_alphabet=alphabet,
        limit_alphabet=num_codes,
        show_progress=False,
        special_tokens=[],
    )
    t0 = time.perf_counter()
    tok.train_from_iterator(lines, trainer=trainer)
    dt = time.perf_counter() - t0
    return tok, lines, dt


HF_MODES = {
    # name -> environment changes for the child process (None = remove the variable)
    "default pool": {"RAYON_NUM_THREADS": None, "TOKENIZERS_PARALLELISM": None},
    "1 thread": {"RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": None},
}


def hf_worker(codes_path: str, num_merges: int, num_codes: int, repeats: int) -> None:
    """Child-process entry: train HF BPE ``repeats`` times on the saved grids, print JSON timings."""
    grids = np.load(codes_path)
    times, tok, lines = [], None, None
    for _ in range(repeats):
        tok, lines, dt = hf_train(grids, num_merges, num_codes)
        times.append(dt)
    tpi = float(np.mean([len(e.ids) for e in tok.encode_batch(lines)]))
    print(json.dumps({"times": times, "merges": tok.get_vocab_size() - num_codes, "tokens_per_image": tpi}))


def hf_timed(grids: np.ndarray, num_merges: int, num_codes: int, repeats: int, env_changes: dict) -> dict:
    """Run :func:`hf_worker` in a fresh process with ``env_changes`` applied; returns its JSON."""
    env = dict(os.environ)
    for k, v in env_changes.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "codes.npy")
        np.save(path, grids)
        cmd = [sys.executable, __file__, "--hf-worker", path, "--merges", str(num_merges)]
        cmd += ["--num-codes", str(num_codes), "--repeats", str(repeats)]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "times_s": times}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1,000 grids, 256 merges")
    ap.add_argument("--json", default="", help="write results here")
    ap.add_argument("--grids", type=int, default=5000)
    ap.add_argument("--merges", type=int, default=2048)
    ap.add_argument("--recount-merges", type=int, default=256, help="merges run by the recount baseline")
    ap.add_argument("--codes", default="", help="[B, H, W] .npy of codes")
    ap.add_argument("--tokenizer", default="", help="mmtok tokenizer folder to make codes from Fashion-MNIST")
    ap.add_argument("--num-codes", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3, help="timings per trainer (the median is reported)")
    ap.add_argument("--hf-worker", default="", help=argparse.SUPPRESS)  # internal: child-process mode
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.hf_worker:
        hf_worker(args.hf_worker, args.merges, args.num_codes, args.repeats)
        return
    if args.quick:
        args.grids, args.merges, args.recount_merges = 1000, 256, 64

    if args.codes:
        grids, source = np.load(args.codes)[: args.grids].astype(np.int64), f"file {args.codes}"
    elif args.tokenizer:
        grids, source = tokenizer_codes(args.tokenizer, args.grids), f"tokenizer {args.tokenizer}"
    else:
        grids, source = kmeans_codes(args.grids, args.num_codes), f"{args.num_codes}-code k-means patch tokenizer"
    num_codes = max(args.num_codes, int(grids.max()) + 1)
    b, h, w = grids.shape
    cpus = os.cpu_count()
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"codes: {b} grids of {h}x{w} from a {source}; {args.merges} merges; {args.repeats} repeats (median)")
    print(
        f"machine: {platform.processor() or platform.machine()}, {cpus} logical CPUs ({affinity} usable), "
        f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}"
    )
    print(
        "mmtok and recount: numpy, one process; HF: a fresh process per mode, default Rust pool vs RAYON_NUM_THREADS=1"
    )

    rows = []
    results: dict = {
        "grids": b,
        "grid": [h, w],
        "num_codes": num_codes,
        "merges": args.merges,
        "source": source,
        "repeats": args.repeats,
        "cpus": cpus,
        "usable_cpus": affinity,
        "load_average": list(load),
    }
    vocabs: dict[str, BPEVocab] = {}
    for mode in ("1d", "2d"):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            vocab, stats = train_bpe(grids, args.merges, num_codes=num_codes, mode=mode, return_stats=True)
            times.append(time.perf_counter() - t0)
        dt = statistics.median(times)
        vocabs[mode] = vocab
        t0 = time.perf_counter()
        enc = vocab.encode(grids)
        enc_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ok = sum(np.array_equal(vocab.decode(e, (h, w)), g) for e, g in zip(enc, grids))
        dec_s = time.perf_counter() - t0
        tpi = float(np.mean([len(e) for e in enc]))
        rows.append((f"mmtok {mode}", dt, vocab.num_merges, tpi, f"{100 * ok / b:.1f}%"))
        results[f"mmtok_{mode}"] = {
            "train_s": dt,
            **summary(times),
            "merges": vocab.num_merges,
            "tokens_per_image": tpi,
            "tokens_per_image_before": h * w,
            "roundtrip_ok": ok / b,
            "encode_s": enc_s,
            "decode_s": dec_s,
            "train_tokens_after": stats.tokens_after,
        }

    n_rc = min(args.recount_merges, args.merges)
    rc_times = []
    for _ in range(args.repeats):
        rc_merges, rc_s = recount_train(grids, n_rc, num_codes, "1d")
        rc_times.append(rc_s)
    rc_s = statistics.median(rc_times)
    same = rc_merges == vocabs["1d"].merges[:n_rc]
    rc_full = rc_s * args.merges / max(len(rc_merges), 1)
    rows.append((f"recount 1d ({len(rc_merges)} merges, extrapolated)", rc_full, args.merges, float("nan"), "-"))
    results["recount_1d"] = {
        "measured_merges": len(rc_merges),
        "measured_s": rc_s,
        "extrapolated_s": rc_full,
        **summary(rc_times),
    }
    results["recount_merges_equal_mmtok"] = same

    for mode, env_changes in HF_MODES.items():
        hf = hf_timed(grids, args.merges, num_codes, args.repeats, env_changes)
        hf_s = statistics.median(hf["times"])
        rows.append((f"hf tokenizers 1d, {mode}", hf_s, hf["merges"], hf["tokens_per_image"], "-"))
        key = "hf_1d_" + mode.replace(" ", "_")
        results[key] = {
            "train_s": hf_s,
            "merges": hf["merges"],
            "tokens_per_image": hf["tokens_per_image"],
            "env": {k: v for k, v in env_changes.items()},
            **summary(hf["times"]),
        }
    results["speedup_vs_recount_1d"] = rc_full / results["mmtok_1d"]["train_s"]
    results["ratio_to_hf_1d_default_pool"] = results["mmtok_1d"]["train_s"] / results["hf_1d_default_pool"]["train_s"]
    results["ratio_to_hf_1d_1_thread"] = results["mmtok_1d"]["train_s"] / results["hf_1d_1_thread"]["train_s"]

    head = f"trainer (median of {args.repeats})"
    print(f"\n{head:48s} {'train s':>9s} {'merges':>7s} {'tok/img':>8s} {'lossless':>9s}")
    for name, s, m, tpi, ok in rows:
        print(f"{name:48s} {s:9.2f} {m:7d} {tpi:8.1f} {ok:>9s}")
    print(f"\ntokens per image before BPE: {h * w}")
    print(
        f"mmtok 1d vs recount: {results['speedup_vs_recount_1d']:.1f}x faster; time relative to HF: "
        f"{results['ratio_to_hf_1d_default_pool']:.2f}x its default pool, "
        f"{results['ratio_to_hf_1d_1_thread']:.2f}x its single thread"
    )
    print(f"recount baseline merges identical to mmtok 1d: {same}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
