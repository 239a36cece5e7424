"""Benchmark: training time of mmtok's incremental 2D BPE vs a full-recount trainer vs HF `tokenizers`.

Same codes and number of merges for every trainer:

* ``mmtok 1d`` / ``mmtok 2d``: :func:`mmtok.tokenizers.bpe.train_bpe` with its compiled (numba) kernel
  (pair counts + occurrence index + lazy max-heap, occurrences applied one at a time). The kernel is
  compiled, or loaded from numba's on-disk cache, by one untimed warm-up call on a tiny corpus; that
  time is printed (``warm-up``) and is not part of any row.
* ``mmtok 1d/2d, numpy reference``: the same function with ``backend="python"`` (each merge one
  vectorised numpy batch), the reference the kernel is tested against; its merges must equal the
  kernel's (checked). ``--no-reference`` skips these rows.
* ``recount 1d``: the straightforward trainer written here as the baseline: every merge recounts all
  pairs of the current corpus (numpy ``bincount`` over pair keys), then applies the best one. It uses
  the same tie-breaking, so its merges must equal mmtok's (checked). It is run for
  ``--recount-merges`` merges and its time is extrapolated linearly to the full count (stated as such).
* ``hf 1d``: HF ``tokenizers`` BpeTrainer, codes mapped to private-use characters (chr(0xF0000 + c)),
  one row of codes per word, the full initial alphabet, the same ``min_frequency``. It is timed two
  ways, each in a fresh process (the Rust thread pool is sized once per process): with its default
  thread pool (``RAYON_NUM_THREADS`` and ``TOKENIZERS_PARALLELISM`` unset: one thread per logical CPU)
  and on one thread (``RAYON_NUM_THREADS=1``). On a 2-core machine its pool is slower than one thread.

How each side runs: mmtok's trainers run in this process on one thread (numba kernel, numpy reference);
the recount baseline likewise. Every trainer is timed ``--repeats`` times (default 3), round robin (one
run of each trainer, then the next round), so a change of machine load touches every trainer alike;
the table shows the median wall time and the median CPU time of the timed process (all its threads;
on a busy shared machine CPU time of a one-thread run moves less than its wall time). Min, max and
every run are in the JSON, and the load average before and after is printed.

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
    """HF tokenizers BPE on rows of codes (1D). Returns (tokenizer, lines, wall s, CPU s of the process)."""
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
    t0, c0 = time.perf_counter(), time.process_time()
    tok.train_from_iterator(lines, trainer=trainer)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return tok, lines, dt, cpu


HF_MODES = {
    # name -> environment changes for the child process (None = remove the variable)
    "default pool": {"RAYON_NUM_THREADS": None, "TOKENIZERS_PARALLELISM": None},
    "1 thread": {"RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": None},
}


def hf_worker(codes_path: str, num_merges: int, num_codes: int) -> None:
    """Child-process entry: train HF BPE once on the saved grids, print JSON (wall, CPU, merges, tokens)."""
    grids = np.load(codes_path)
    tok, lines, dt, cpu = hf_train(grids, num_merges, num_codes)
    tpi = float(np.mean([len(e.ids) for e in tok.encode_batch(lines)]))
    print(json.dumps({"wall": dt, "cpu": cpu, "merges": tok.get_vocab_size() - num_codes, "tokens_per_image": tpi}))


def hf_timed(codes_path: str, num_merges: int, num_codes: int, env_changes: dict) -> dict:
    """Run :func:`hf_worker` in a fresh process with ``env_changes`` applied; returns its JSON."""
    env = dict(os.environ)
    for k, v in env_changes.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    cmd = [sys.executable, __file__, "--hf-worker", codes_path, "--merges", str(num_merges)]
    cmd += ["--num-codes", str(num_codes)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def summary(walls: list[float], cpus: list[float]) -> dict:
    return {
        "median_s": statistics.median(walls),
        "min_s": min(walls),
        "max_s": max(walls),
        "times_s": walls,
        "cpu_median_s": statistics.median(cpus),
        "cpu_s": cpus,
    }


def timed(fn):
    """(result, wall s, CPU s of this process) of ``fn()``."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


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
    ap.add_argument("--no-reference", action="store_true", help="skip the numpy reference trainer's rows")
    ap.add_argument("--hf-worker", default="", help=argparse.SUPPRESS)  # internal: child-process mode
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.hf_worker:
        hf_worker(args.hf_worker, args.merges, args.num_codes)
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
        "mmtok (numba kernel, numpy reference) and recount: this process, one thread; "
        "HF: a fresh process per run, default Rust pool / RAYON_NUM_THREADS=1"
    )
    print("trainers run round robin; medians over the rounds")

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
    n_rc = min(args.recount_merges, args.merges)
    # untimed warm-up: compiles the kernel (first run after an install or edit) or loads it from numba's cache
    _, warm_s, _ = timed(
        lambda: [train_bpe(grids[:2], 8, num_codes=num_codes, mode=m, backend="numba") for m in ("1d", "2d")]
    )
    print(f"warm-up (compile or load the numba kernel, untimed in the table): {warm_s:.2f} s")
    results["warmup_s"] = warm_s
    ref_modes = () if args.no_reference else ("1d", "2d")
    names = ["mmtok 1d", "mmtok 2d", *(f"mmtok {m}, numpy reference" for m in ref_modes), "recount 1d"]
    names += [f"hf 1d, {m}" for m in HF_MODES]
    walls: dict[str, list[float]] = {k: [] for k in names}
    cpus: dict[str, list[float]] = {k: [] for k in names}
    vocabs: dict[str, BPEVocab] = {}
    stats: dict = {}
    hf_out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        codes_path = os.path.join(tmp, "codes.npy")
        np.save(codes_path, grids)
        for _ in range(args.repeats):  # round robin: load drift reaches every trainer alike
            for mode in ("1d", "2d"):
                (vocab, st), dt, cpu = timed(
                    lambda mode=mode: train_bpe(grids, args.merges, num_codes=num_codes, mode=mode, return_stats=True)
                )
                vocabs[mode], stats[mode] = vocab, st
                walls[f"mmtok {mode}"].append(dt)
                cpus[f"mmtok {mode}"].append(cpu)
            for mode in ref_modes:
                name = f"mmtok {mode}, numpy reference"
                (vocab, st), dt, cpu = timed(
                    lambda mode=mode: train_bpe(
                        grids, args.merges, num_codes=num_codes, mode=mode, return_stats=True, backend="python"
                    )
                )
                vocabs[name], stats[name] = vocab, st
                walls[name].append(dt)
                cpus[name].append(cpu)
            (rc_merges, _), dt, cpu = timed(lambda: recount_train(grids, n_rc, num_codes, "1d"))
            walls["recount 1d"].append(dt)
            cpus["recount 1d"].append(cpu)
            for mode, env_changes in HF_MODES.items():
                hf = hf_timed(codes_path, args.merges, num_codes, env_changes)
                hf_out[mode] = hf
                walls[f"hf 1d, {mode}"].append(hf["wall"])
                cpus[f"hf 1d, {mode}"].append(hf["cpu"])
    med = {k: statistics.median(v) for k, v in walls.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpus.items()}
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    results["load_average_after"] = list(load_after)

    for mode in ("1d", "2d"):
        vocab = vocabs[mode]
        enc, enc_s, _ = timed(lambda vocab=vocab: vocab.encode(grids))
        ok, dec_s, _ = timed(
            lambda vocab=vocab, enc=enc: sum(np.array_equal(vocab.decode(e, (h, w)), g) for e, g in zip(enc, grids))
        )
        tpi = float(np.mean([len(e) for e in enc]))
        name = f"mmtok {mode}"
        rows.append((name, med[name], med_cpu[name], vocab.num_merges, tpi, f"{100 * ok / b:.1f}%"))
        results[f"mmtok_{mode}"] = {
            "train_s": med[name],
            **summary(walls[name], cpus[name]),
            "merges": vocab.num_merges,
            "tokens_per_image": tpi,
            "tokens_per_image_before": h * w,
            "roundtrip_ok": ok / b,
            "encode_s": enc_s,
            "decode_s": dec_s,
            "train_tokens_after": stats[mode].tokens_after,
        }

    for mode in ref_modes:
        name = f"mmtok {mode}, numpy reference"
        same_ref = vocabs[name].merges == vocabs[mode].merges and stats[name] == stats[mode]
        rows.append((name, med[name], med_cpu[name], vocabs[name].num_merges, None, "-"))
        results[f"mmtok_{mode}_numpy_reference"] = {
            "train_s": med[name],
            **summary(walls[name], cpus[name]),
            "merges_equal_kernel": same_ref,
        }

    same = rc_merges == vocabs["1d"].merges[:n_rc]
    scale = args.merges / max(len(rc_merges), 1)
    rc_full, rc_full_cpu = med["recount 1d"] * scale, med_cpu["recount 1d"] * scale
    rows.append((f"recount 1d ({len(rc_merges)} merges, extrapolated)", rc_full, rc_full_cpu, args.merges, None, "-"))
    results["recount_1d"] = {
        "measured_merges": len(rc_merges),
        "measured_s": med["recount 1d"],
        "extrapolated_s": rc_full,
        "extrapolated_cpu_s": rc_full_cpu,
        **summary(walls["recount 1d"], cpus["recount 1d"]),
    }
    results["recount_merges_equal_mmtok"] = same

    for mode, env_changes in HF_MODES.items():
        name, hf = f"hf 1d, {mode}", hf_out[mode]
        env_text = ", ".join(f"{k}={v}" for k, v in env_changes.items() if v is not None) or "env unset"
        rows.append(
            (
                f"hf tokenizers 1d, {mode} ({env_text})",
                med[name],
                med_cpu[name],
                hf["merges"],
                hf["tokens_per_image"],
                "-",
            )
        )
        results["hf_1d_" + mode.replace(" ", "_")] = {
            "train_s": med[name],
            "merges": hf["merges"],
            "tokens_per_image": hf["tokens_per_image"],
            "env": dict(env_changes),
            **summary(walls[name], cpus[name]),
        }
    mm = results["mmtok_1d"]
    results["speedup_vs_recount_1d"] = rc_full / mm["train_s"]
    for key in ("hf_1d_default_pool", "hf_1d_1_thread"):
        results[f"ratio_to_{key}"] = mm["train_s"] / results[key]["train_s"]
        results[f"cpu_ratio_to_{key}"] = mm["cpu_median_s"] / results[key]["cpu_median_s"]
    hf1 = results["hf_1d_1_thread"]
    for mode in ("1d", "2d"):  # the targets: 1D <= 1x, 2D <= 1.5x HF on one thread
        results[f"mmtok_{mode}_ratio_to_hf_1_thread"] = {
            "wall": results[f"mmtok_{mode}"]["train_s"] / hf1["train_s"],
            "cpu": results[f"mmtok_{mode}"]["cpu_median_s"] / hf1["cpu_median_s"],
        }

    head = f"trainer (median of {args.repeats})"
    print(f"\n{head:58s} {'wall s':>8s} {'cpu s':>8s} {'merges':>7s} {'tok/img':>8s} {'lossless':>9s}")
    for name, s_wall, s_cpu, m, tpi, ok in rows:
        tpi_text = "-" if tpi is None else f"{tpi:.1f}"
        print(f"{name:58s} {s_wall:8.2f} {s_cpu:8.2f} {m:7d} {tpi_text:>8s} {ok:>9s}")
    print(f"\ntokens per image before BPE: {h * w}; load average after: {load_after[0]:.2f}")
    print(f"mmtok 1d vs recount: {results['speedup_vs_recount_1d']:.1f}x faster")
    print(
        f"mmtok 1d time / HF time: {results['ratio_to_hf_1d_default_pool']:.2f}x its default pool, "
        f"{results['ratio_to_hf_1d_1_thread']:.2f}x its single thread (wall); CPU time: "
        f"{results['cpu_ratio_to_hf_1d_default_pool']:.2f}x, {results['cpu_ratio_to_hf_1d_1_thread']:.2f}x"
    )
    r2 = results["mmtok_2d_ratio_to_hf_1_thread"]
    print(f"mmtok 2d time / HF single-thread 1d time: {r2['wall']:.2f}x wall, {r2['cpu']:.2f}x CPU")
    for mode in ref_modes:
        print(
            f"numpy reference {mode}: merges and stats identical to the kernel: "
            f"{results[f'mmtok_{mode}_numpy_reference']['merges_equal_kernel']}"
        )
    print(f"recount baseline merges identical to mmtok 1d: {same}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
