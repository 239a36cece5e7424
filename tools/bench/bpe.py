"""Benchmark: training time of mmtok's incremental 2D BPE vs a full-recount trainer vs HF `tokenizers`.

Same codes and number of merges for every trainer:

* ``mmtok 1d`` / ``mmtok 2d``: :func:`mmtok.tokenizers.bpe.train_bpe` (pair counts + occurrence index +
  lazy max-heap).
* ``recount 1d``: the straightforward trainer written here as the baseline: every merge recounts all
  pairs of the current corpus (numpy ``bincount`` over pair keys), then applies the best one. It uses
  the same tie-breaking, so its merges must equal mmtok's (checked). It is run for
  ``--recount-merges`` merges and its time is extrapolated linearly to the full count (stated as such).
* ``hf 1d``: HF ``tokenizers`` BpeTrainer, codes mapped to private-use characters (chr(0xF0000 + c)),
  one row of codes per word, the full initial alphabet, the same ``min_frequency``.

Codes: ``--codes file.npy`` ([B, H, W] ints), or ``--tokenizer DIR`` (an mmtok tokenizer encoding
Fashion-MNIST images), or by default a 1024-code k-means patch tokenizer (4x4 patches of Fashion-MNIST
images upsampled to 64x64 -> 16x16 grids), which gives the heavy-tailed statistics of real VQ codes.

    python tools/bench/bpe.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
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
    args = ap.parse_args()
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
    print(f"codes: {b} grids of {h}x{w} from a {source}; {args.merges} merges; machine: {platform.processor()}")

    rows = []
    results: dict = {"grids": b, "grid": [h, w], "num_codes": num_codes, "merges": args.merges, "source": source}
    vocabs: dict[str, BPEVocab] = {}
    for mode in ("1d", "2d"):
        t0 = time.perf_counter()
        vocab, stats = train_bpe(grids, args.merges, num_codes=num_codes, mode=mode, return_stats=True)
        dt = time.perf_counter() - t0
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
            "merges": vocab.num_merges,
            "tokens_per_image": tpi,
            "tokens_per_image_before": h * w,
            "roundtrip_ok": ok / b,
            "encode_s": enc_s,
            "decode_s": dec_s,
            "train_tokens_after": stats.tokens_after,
        }

    n_rc = min(args.recount_merges, args.merges)
    rc_merges, rc_s = recount_train(grids, n_rc, num_codes, "1d")
    same = rc_merges == vocabs["1d"].merges[:n_rc]
    rc_full = rc_s * args.merges / max(len(rc_merges), 1)
    rows.append((f"recount 1d ({len(rc_merges)} merges, extrapolated)", rc_full, args.merges, float("nan"), "-"))
    results["recount_1d"] = {"measured_merges": len(rc_merges), "measured_s": rc_s, "extrapolated_s": rc_full}
    results["recount_merges_equal_mmtok"] = same

    tok, lines, hf_s = hf_train(grids, args.merges, num_codes)
    hf_merges = tok.get_vocab_size() - num_codes
    hf_tpi = float(np.mean([len(e.ids) for e in tok.encode_batch(lines)]))
    rows.append(("hf tokenizers 1d", hf_s, hf_merges, hf_tpi, "-"))
    results["hf_1d"] = {"train_s": hf_s, "merges": hf_merges, "tokens_per_image": hf_tpi}
    results["speedup_vs_recount_1d"] = rc_full / results["mmtok_1d"]["train_s"]
    results["ratio_to_hf_1d"] = results["mmtok_1d"]["train_s"] / hf_s

    print(f"\n{'trainer':48s} {'train s':>9s} {'merges':>7s} {'tok/img':>8s} {'lossless':>9s}")
    for name, s, m, tpi, ok in rows:
        print(f"{name:48s} {s:9.2f} {m:7d} {tpi:8.1f} {ok:>9s}")
    print(f"\ntokens per image before BPE: {h * w}")
    print(
        f"mmtok 1d vs recount: {results['speedup_vs_recount_1d']:.1f}x faster; vs HF: {results['ratio_to_hf_1d']:.2f}x"
    )
    print(f"recount baseline merges identical to mmtok 1d: {same}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
