"""Masked image / video modeling benchmarks.

Sections (all on by default; ``--only`` picks some):
  throughput  pretraining images/s (clips/s) and activation memory vs mask ratio (0.5, 0.75, 0.9, 0.95)
              for MAE (Fashion-MNIST recipe) and VideoMAE (moving-fashion recipe). Memory: bytes of the
              tensors autograd saves for backward (what the mask ratio changes); on CUDA also peak allocated.
  maskers     masker overhead per batch for every registered strategy (the masker call alone; teacher
              forwards for attention / hard_patch are timed separately as "teacher").
  quality     MAE on Fashion-MNIST under a wall-clock pretraining budget (in-memory loop, same model and
              task code), then a linear probe on mean-pooled final-norm features (standardised logistic
              regression, C tuned on 10% of train held out) and a fine-tune under its own budget (MAE's recipe
              cut down; layer-wise lr decay, drop path and small shifts are flags, off by default: at a 600 s
              budget they cost accuracy; see mmtok.mim.probe.finetune; --finetune-budget 0 skips it);
              baselines: raw pixels and a random-init encoder with the same probe, and (--finetune-encoders
              random) the random-init encoder fine-tuned with the same recipe and budget.
  video       random vs tube vs adaptive masking on moving-fashion clips at the same budget, probed on
              clip labels (4,000 probe clips, 1,000 test clips by default), each masker over ``--seeds``
              (mean, std, min, max), with the accuracy on one-item and two-item clips; baselines:
              time-averaged pooled pixels and the random-init encoder with the same probe, and a ceiling:
              the labelled item cut out at its known position. ``--video-probe linear attentive`` adds the
              attentive probe (a learned query over one block's tokens); ``--video-load DIR`` probes saved models.

  python tools/bench/mim.py --quick --json runs/bench/mim_quick.json
  python tools/bench/mim.py --only quality --budget 1800 --finetune-budget 600 --json runs/bench/mim_quality.json
  python tools/bench/mim.py --only quality --load runs/bench/mae_p7 --probes --finetune-encoders mae random
  python tools/bench/mim.py --only video --video-budget 120 --seeds 0 1 2 --json runs/bench/mim_video.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mmtok import registries
from mmtok.mim.masking import MaskContext
from mmtok.mim.probe import (
    add_finetune_args,
    attentive_probe,
    extract_features,
    extract_tokens,
    finetune,
    finetune_kwargs,
    linear_probe,
)

RATIOS = (0.5, 0.75, 0.9, 0.95)
FMNIST_MODEL = {"model": "mae_tiny_p4", "model_args": {}}
VIDEO_MODEL = {
    "model": "videomae_tiny",
    "model_args": {
        "img_size": 64,
        "patch_size": 8,
        "in_chans": 3,
        "num_frames": 8,
        "tubelet_size": 2,
        "depth": 4,
        "norm_pix_eps": 0.05,  # configs/mim/videomae_moving_fashion.yaml says why
    },
}


def saved_bytes(fn) -> int:
    """Bytes of distinct tensors autograd saves during ``fn()`` (activation memory of the step)."""
    seen: dict[int, int] = {}

    def pack(t):
        try:
            ptr = t.untyped_storage().data_ptr()
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def bench_throughput(quick: bool, device: torch.device) -> list[dict]:
    rows = []
    for kind, spec, batch in (("mae", FMNIST_MODEL, 256), ("videomae", VIDEO_MODEL, 16)):
        for ratio in RATIOS:
            task = registries.get("task").create("mae", masker="random", mask_ratio=ratio, **spec).to(device)
            opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-4)
            b = {k: v.to(device) for k, v in task.synthetic_batch(batch).items()}

            def step(task=task, opt=opt, b=b):
                out = task(b)
                opt.zero_grad(set_to_none=True)
                out["loss"].backward()
                opt.step()

            step()  # warm-up
            act = saved_bytes(lambda task=task, b=b: task(b)["loss"])
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            n = 2 if quick else 6
            t0 = time.perf_counter()
            for _ in range(n):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) / n
            row = {
                "model": kind,
                "mask_ratio": ratio,
                "batch": batch,
                "tokens": task.model.num_patches,
                "visible": task.masker.visible_count(task.model.grid_size),  # the masker's own count
                "per_s": batch / dt,
                "step_ms": dt * 1000,
                "activation_MiB": act / 2**20,
            }
            if device.type == "cuda":
                row["peak_MiB"] = torch.cuda.max_memory_allocated() / 2**20
            rows.append(row)
            print(
                f"  {kind:9s} r={ratio:<5} {row['visible']:4d}/{row['tokens']:<4d} visible  "
                f"{row['per_s']:8.1f} {'img' if kind == 'mae' else 'clip'}/s  act {row['activation_MiB']:7.1f} MiB",
                flush=True,
            )
    return rows


def bench_maskers(quick: bool, device: torch.device) -> list[dict]:
    rows = []
    cases = (("image 7x7", (1, 7, 7), 256, 0.75), ("video 4x8x8", (4, 8, 8), 16, 0.875))
    for label, grid, batch, ratio in cases:
        n = grid[0] * grid[1] * grid[2]
        tokens = torch.randn(batch, n, 192, device=device)
        scores = torch.rand(batch, n, device=device)
        for name in registries.get("masker").list():
            extra = {"embed_dim": 192, "num_heads": 3} if name == "adaptive" else {}
            masker = registries.get("masker").create(name, mask_ratio=ratio, **extra).to(device)
            ctx = MaskContext(grid=grid, tokens=tokens, scores=scores, progress=1.0, device=device)
            masker(batch, ctx)
            reps = 3 if quick else 20
            t0 = time.perf_counter()
            for _ in range(reps):
                masker(batch, ctx)
            ms = (time.perf_counter() - t0) / reps * 1000
            rows.append({"grid": label, "masker": name, "batch": batch, "ms_per_batch": ms})
            print(f"  {label:12s} {name:11s} {ms:8.2f} ms/batch of {batch}", flush=True)
        # what the teacher-guided maskers additionally cost: one teacher forward over all tokens
        spec = FMNIST_MODEL if grid[0] == 1 else VIDEO_MODEL
        for name in ("attention", "hard_patch"):
            task = registries.get("task").create("mae", masker=name, mask_ratio=ratio, **spec).to(device)
            x = task.synthetic_batch(batch)["x"].to(device)
            task.step.fill_(task.config.total_steps)  # hard share at its maximum
            with torch.no_grad():
                task.make_masks(x)
                t0 = time.perf_counter()
                for _ in range(2 if quick else 5):
                    task.make_masks(x)
            ms = (time.perf_counter() - t0) / (2 if quick else 5) * 1000
            rows.append({"grid": label, "masker": f"{name}+teacher", "batch": batch, "ms_per_batch": ms})
            print(f"  {label:12s} {name + '+teacher':20s} {ms:8.2f} ms/batch of {batch}", flush=True)
    return rows


def _probe_row(r) -> dict:
    """The JSON row of a :class:`ProbeResult` (every C tried, with its held-out accuracy and convergence)."""
    return {
        "accuracy": r.accuracy,
        "C": r.C,
        "val_accuracy": r.val_accuracy,
        "converged": r.converged,
        "all_converged": r.all_converged,
        "C_at_edge": r.C_at_edge,
        "iterations": r.iterations,
        "grid": [{"C": c, "val_accuracy": a, "val_logloss": loss, "converged": ok} for c, a, loss, ok in r.grid],
    }


def _probe(features_fn, xtr, ytr, xte, yte, tune_subset: int = 0) -> dict:
    t0 = time.perf_counter()
    ftr, fte = features_fn(xtr), features_fn(xte)
    r = linear_probe(ftr, ytr, fte, yte, tune_subset=tune_subset)
    return {**_probe_row(r), "dim": int(ftr.shape[1]), "seconds": time.perf_counter() - t0}


def bench_quality(args, device: torch.device) -> dict:
    from mmtok.data.sources.fashion_mnist import load_fashion_mnist
    from mmtok.mim.pretrain_fast import FastPretrainConfig, pretrain_in_memory

    xtr, ytr = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    if args.quick:
        xtr, ytr, xte, yte = xtr[:6000], ytr[:6000], xte[:2000], yte[:2000]
    spec = json.loads(args.recipe)
    cfg = FastPretrainConfig(task=spec["task"], time_budget_s=args.budget, **spec.get("train", {}))
    out: dict = {"recipe": spec, "budget_s": args.budget, "train_images": len(xtr), "test_images": len(xte)}
    out["probe_tune_subset"] = args.probe_tune
    probes = set(args.probes)
    if args.no_baselines:
        probes -= {"random", "pixels"}

    def keep_partial() -> None:
        if args.json:  # a long section keeps what it has measured if it is stopped
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).with_suffix(".partial.json").write_text(json.dumps(out, indent=2, default=float))

    def probe(key: str, label: str, features_fn) -> None:
        out[key] = _probe(features_fn, xtr, ytr, xte, yte, tune_subset=args.probe_tune)
        out[key]["load_avg_end"] = os.getloadavg()
        r = out[key]
        print(
            f"  {label}: {r['accuracy']:.4f} (C={r['C']:.3g}, converged {r['all_converged']}, "
            f"C at grid edge {r['C_at_edge']}, {r['seconds']:.0f} s)",
            flush=True,
        )
        keep_partial()

    def random_init():
        torch.manual_seed(0)
        return registries.get("task").create("mae", **spec["task"]).model.encoder

    if args.load:
        from mmtok import hub

        mae = hub.from_pretrained(Path(args.load) / "mae", kind="mim model").eval()
        out["loaded"] = args.load
        print(f"  loaded {args.load} (no pretraining)", flush=True)
    else:
        task, log = pretrain_in_memory(xtr, cfg)
        mae = task.model
        out["pretrain"] = log
        print(
            f"  pretrained {log['steps']} steps, {log['epochs']:.2f} epochs in {log['seconds']:.0f} s "
            f"({log['images_per_s']:.0f} img/s), loss {log['loss_first']:.3f} -> {log['loss_last']:.3f}, "
            f"load {log['load_avg_min']:.1f}-{log['load_avg_max']:.1f}",
            flush=True,
        )
        if args.save:  # saved first: a probe or fine-tune that fails later can be re-run with --load
            mae.save_pretrained(Path(args.save) / "mae")
            mae.export_encoder(Path(args.save) / "encoder")
            Path(args.save, "pretrain.json").write_text(json.dumps({"recipe": spec, **log}, indent=2, default=float))
        keep_partial()
    enc = mae.encoder
    # the figures that matter first (a busy machine may stop the run), baselines after them
    if "mean" in probes:
        probe("probe", "MAE probe (mean-pooled final-norm)", lambda x: extract_features(enc, x))
    if "random" in probes:
        init = random_init()
        probe("random_init", "random-init encoder probe (mean-pooled)", lambda x: extract_features(init, x))
    if "cls" in probes and enc.cls_token is not None:
        probe("probe_cls", "MAE probe ([CLS])", lambda x: extract_features(enc, x, pool="cls"))
    layers = min(4, len(enc.blocks))
    if "last4" in probes:
        probe(
            "probe_concat_last4",
            f"MAE probe (last {layers} blocks, mean-pooled, concatenated)",
            lambda x: extract_features(enc, x, layers=layers),
        )
    if "pixels" in probes:
        probe("raw_pixels", "raw pixels probe", lambda x: x.reshape(len(x), -1).astype(np.float32) / 255.0)
    if args.finetune_budget > 0:
        recipe = finetune_kwargs(args)
        for which in args.finetune_encoders:
            start = copy.deepcopy(enc) if which == "mae" else random_init()
            key = "finetune" if which == "mae" else "finetune_random_init"
            load_start = os.getloadavg()
            ft = finetune(start, xtr, ytr, xte, yte, **recipe)
            out[key] = {**ft, "load_avg_start": load_start, "load_avg_end": os.getloadavg()}
            ema = (
                f", EMA {ft['accuracy_ema']:.4f} / flip TTA {ft['accuracy_ema_flip_tta']:.4f}"
                if "accuracy_ema" in ft
                else ""
            )
            print(
                f"  fine-tune ({'MAE' if which == 'mae' else 'random-init'} encoder): {ft['accuracy']:.4f} "
                f"(flip TTA {ft['accuracy_flip_tta']:.4f}{ema}, late train {ft['train_accuracy']:.4f}) after "
                f"{ft['epochs_done']:.2f} epochs ({ft['steps']} steps) in {ft['seconds']:.0f} s",
                flush=True,
            )
            keep_partial()
    return out


def make_clips(
    n: int, split: str, frames: int, seed: int, meta: bool = False
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, dict]:
    """Moving-fashion clips in memory (the shard builder's generator, without the mp4 round trip).

    Returns uint8 clips ``[n, 3, frames, 64, 64]`` and labels ``[n]`` (class of the first, largest item); with
    ``meta`` also ``{"items": [n] item count, "classes": [n] list of every item's class, "crop": [n, 28, 28]
    float}``, where ``crop`` is the labelled item cut out of the first frame at its known position (channel
    max, resized to 28 px): what a classifier would see if it knew where the item is.
    """
    from PIL import Image

    from mmtok.data.sources.moving import make_clip
    from mmtok.data.sources.scenes import split_source

    images, labels, fidx = split_source(split)
    xs, ys, counts, classes, crops = [], [], [], [], []
    for i in range(n):
        rng = np.random.default_rng([seed, 10 if split == "train" else 12, i])
        video, items = make_clip(rng, images, labels, 16, 64, 1, 2, indices=fidx)
        keep = np.linspace(0, 15, frames).round().astype(int)
        xs.append(np.transpose(video[keep], (3, 0, 1, 2)))  # [C, T, H, W]
        ys.append(items[0]["class_id"])
        if meta:
            counts.append(len(items))
            classes.append([it["class_id"] for it in items])
            (x0, y0), side = (int(round(v)) for v in items[0]["trajectory"][0]), items[0]["side"]
            crop = Image.fromarray(video[0, y0 : y0 + side, x0 : x0 + side].max(-1)).resize((28, 28), Image.BILINEAR)
            crops.append(np.asarray(crop, np.float32) / 255.0)
    if not meta:
        return np.stack(xs), np.asarray(ys)
    return np.stack(xs), np.asarray(ys), {"items": np.asarray(counts), "classes": classes, "crop": np.stack(crops)}


def _item_split(row: dict, predictions: np.ndarray, yte: np.ndarray, meta: dict) -> dict:
    """``row`` plus the accuracy on one-item and two-item test clips and how often the answer is the class of
    *some* item in the clip (on two-item clips a pooled feature holds both items; the label is the larger one's)."""
    ok = predictions == yte
    names_item = np.array([p in c for p, c in zip(predictions.tolist(), meta["classes"])])
    for k in (1, 2):
        sel = meta["items"] == k
        row[f"accuracy_{k}_item"] = float(ok[sel].mean()) if sel.any() else float("nan")
    row["names_an_item"] = float(names_item.mean())
    return row


def _video_probe(ftr: np.ndarray, ytr: np.ndarray, fte: np.ndarray, yte: np.ndarray, meta: dict) -> dict:
    """The linear probe's JSON row, split by items per clip (:func:`_item_split`)."""
    r = linear_probe(ftr, ytr, fte, yte)
    return _item_split(_probe_row(r), r.predictions, yte, meta)


def _video_probes(enc, ptr: np.ndarray, pte: np.ndarray, xte: np.ndarray, yte: np.ndarray, meta: dict, args) -> dict:
    """Every probe of ``--video-probe`` on one encoder: ``{"linear": row, "attentive": row}`` (those asked for).

    Linear: mean-pooled final-norm tokens. Attentive: one learned query over the tokens of
    ``--video-probe-layer`` (:func:`mmtok.mim.probe.attentive_probe`, ``--video-probe-epochs``)."""
    rows = {}
    if "linear" in args.video_probe:
        rows["linear"] = _video_probe(extract_features(enc, ptr, 32), pte, extract_features(enc, xte, 32), yte, meta)
    if "attentive" in args.video_probe:
        layer = args.video_probe_layer
        r = attentive_probe(
            extract_tokens(enc, ptr, 32, layer=layer),
            pte,
            extract_tokens(enc, xte, 32, layer=layer),
            yte,
            epochs=args.video_probe_epochs,
        )
        row = {
            "accuracy": r.accuracy,
            "val_accuracy": r.val_accuracy,
            "train_accuracy": r.train_accuracy,
            "epochs": r.epochs,
            "layer": layer,
            "seconds": r.fit_seconds,
        }
        rows["attentive"] = _item_split(row, r.predictions, yte, meta)
    return rows


def _spread(values: list[float]) -> dict:
    v = np.asarray(values, dtype=float)
    return {
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
        "min": float(v.min()),
        "max": float(v.max()),
        "n": len(v),
    }


_SUFFIX = {"linear": "", "attentive": "_attentive"}  # JSON keys: the linear rows keep their earlier names


def bench_video(args, device: torch.device) -> dict:
    """Maskers x seeds on in-memory moving-fashion clips; every run probed with the same probe; baselines.

    Pretraining uses ``--video-clips`` training clips; the probe fits on the first ``--video-probe-clips`` of the
    training split and scores ``--video-test-clips`` test clips (the clips are synthetic, so the probe is not
    starved: with 1,000 probe clips even the known-position crop of the labelled item probes at 0.70, 0.76
    with 4,000).
    """
    from mmtok.mim.pretrain_fast import FastPretrainConfig, pretrain_in_memory

    if args.quick:
        n_train, n_probe, n_test = 256, 256, 128
    else:
        n_train, n_probe, n_test = args.video_clips, args.video_probe_clips, args.video_test_clips
    spec = json.loads(args.video_recipe)
    task_spec = {**VIDEO_MODEL, **spec.get("task", {})}
    task_spec["model_args"] = {**VIDEO_MODEL["model_args"], **spec.get("task", {}).get("model_args", {})}
    frames = task_spec["model_args"]["num_frames"]
    xtr, ytr = make_clips(max(n_train, n_probe), "train", frames, 0)
    xte, yte, meta = make_clips(n_test, "test", frames, 0, meta=True)
    ptr, pte = xtr[:n_probe], ytr[:n_probe]
    out: dict = {
        "recipe": task_spec,
        "train": spec.get("train", {}),
        "clips": {"pretrain": n_train, "probe": n_probe, "test": n_test},
        "test_two_item_share": float((meta["items"] == 2).mean()),
        "runs": [],
    }

    def report(key: str, label: str, row: dict) -> None:
        out[key] = row
        print(
            f"  {label}: {row['accuracy']:.4f} (one item {row['accuracy_1_item']:.4f}, two items "
            f"{row['accuracy_2_item']:.4f}, names an item in the clip {row['names_an_item']:.4f})",
            flush=True,
        )

    if not args.no_baselines:
        # references with the same probe: pixels (time-averaged, 8x8 average-pooled), the recipe's encoder with
        # random weights, and a ceiling: the labelled item's known-position crop (no translation, no clutter)
        def pooled(x: np.ndarray) -> np.ndarray:
            return torch.nn.functional.avg_pool2d(torch.from_numpy(x).float().mean(2), 8).flatten(1).numpy()

        report("raw_pixels", "pooled pixels", _video_probe(pooled(ptr), pte, pooled(xte), yte, meta))
        torch.manual_seed(0)
        enc = registries.get("task").create("mae", **task_spec).model.encoder
        for kind, row in _video_probes(enc, ptr, pte, xte, yte, meta, args).items():
            report("random_init" + _SUFFIX[kind], f"random-init encoder, {kind} probe", row)
        _, _, tr_meta = make_clips(n_probe, "train", 1, 0, meta=True)
        crops = tr_meta["crop"].reshape(n_probe, -1), meta["crop"].reshape(n_test, -1)
        report(
            "item_crop",
            "labelled item's known-position crop (ceiling)",
            _video_probe(crops[0], pte, crops[1], yte, meta),
        )
        print("  (chance 0.10)", flush=True)
    for folder in args.video_load:  # saved models (--save of an earlier run): probed, not pretrained again
        from mmtok.mim.evaluate import load_model

        rows = _video_probes(load_model(folder).encoder, ptr, pte, xte, yte, meta, args)
        out.setdefault("loaded", []).append({"model": folder, **{"probe" + _SUFFIX[k]: r for k, r in rows.items()}})
        for kind, r in rows.items():
            print(
                f"  {folder}: {kind} probe {r['accuracy']:.4f} (one item {r['accuracy_1_item']:.4f}, two "
                f"{r['accuracy_2_item']:.4f})",
                flush=True,
            )
    ratios = {"random": 0.875, "tube": 0.875, "adaptive": 0.95}
    for masker in args.maskers:
        accs = []
        for seed in args.seeds:
            cfg = FastPretrainConfig(
                task={**task_spec, "masker": masker, "mask_ratio": ratios[masker]},
                **{"batch_size": 16, "lr": 1e-3, "log_every": 0, **spec.get("train", {})},
                time_budget_s=args.video_budget,
                seed=seed,
            )
            task, log = pretrain_in_memory(xtr[:n_train], cfg)
            rows = _video_probes(task.model.encoder, ptr, pte, xte, yte, meta, args)
            row = rows[args.video_probe[0]]  # the first probe named is the one summarised over seeds
            accs.append(row["accuracy"])
            run = {"masker": masker, "mask_ratio": ratios[masker], "seed": seed, **log, "load_avg": os.getloadavg()}
            out["runs"].append(run | {"probe" + _SUFFIX[kind]: r for kind, r in rows.items()})
            probed = ", ".join(
                f"{kind} probe {r['accuracy']:.4f} (one item {r['accuracy_1_item']:.4f}, two "
                f"{r['accuracy_2_item']:.4f})"
                for kind, r in rows.items()
            )
            print(
                f"  {masker:9s} seed {seed} {log['steps']:5d} steps {log['images_per_s']:6.1f} clips/s "
                f"loss {log['loss_first']:.3f} -> {log['loss_last']:.3f} {probed}",
                flush=True,
            )
            if args.save:
                task.model.save_pretrained(Path(args.save) / f"videomae_{masker}_seed{seed}")
        s = out.setdefault("summary", {})[masker] = _spread(accs)
        print(
            f"  {masker:9s} probe {s['mean']:.4f} +- {s['std']:.4f} (min {s['min']:.4f}, max {s['max']:.4f}, "
            f"{s['n']} seeds)",
            flush=True,
        )
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny settings (a smoke run of every section)")
    p.add_argument("--json", help="write results here")
    p.add_argument("--only", nargs="+", choices=["throughput", "maskers", "quality", "video"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--budget", type=float, default=1800.0, help="quality: pretraining seconds")
    add_finetune_args(p, help_prefix="quality: ")
    p.add_argument(
        "--finetune-encoders",
        nargs="+",
        default=["mae"],
        choices=["mae", "random"],
        help="quality: fine-tune the pretrained (or loaded) encoder and/or the random-init encoder, same recipe",
    )
    p.add_argument(
        "--probes",
        nargs="*",
        default=["mean", "random", "cls", "last4", "pixels"],
        choices=["mean", "random", "cls", "last4", "pixels"],
        help="quality: which probes to run (MAE mean-pooled, random-init mean-pooled, MAE [CLS], MAE last 4 blocks "
        "concatenated, raw pixels); none = fine-tune only",
    )
    p.add_argument("--no-baselines", action="store_true", help="quality: skip raw-pixel and random-init probes")
    p.add_argument(
        "--probe-tune",
        type=int,
        default=10000,
        help="quality: fit the probe's C-tuning models on this many training images (0 = the 54k not held out); "
        "the chosen C is refit on all 60k",
    )
    p.add_argument("--save", help="quality: save the pretrained MAE and encoder here; video: every pretrained model")
    p.add_argument("--load", help="quality: probe (and fine-tune) the MAE saved with --save in this folder instead")
    p.add_argument(
        "--recipe",
        default=json.dumps(
            {
                "task": {
                    "model": "mae_tiny_p4",
                    "model_args": {"patch_size": 7, "decoder_depth": 4},
                    "mask_ratio": 0.75,
                },
                "train": {"batch_size": 128, "lr": 1.5e-3, "warmup_frac": 0.05, "log_every": 200},
            }
        ),
        help="quality: JSON {task: MAETaskConfig fields, train: FastPretrainConfig fields}",
    )
    p.add_argument("--video-budget", type=float, default=300.0, help="video: seconds per masker")
    p.add_argument("--video-clips", type=int, default=4000, help="video: pretraining clips (in memory)")
    p.add_argument("--video-probe-clips", type=int, default=4000, help="video: probe training clips")
    p.add_argument("--video-test-clips", type=int, default=1000, help="video: probe test clips")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="video: training seeds per masker")
    p.add_argument(
        "--video-probe",
        nargs="+",
        choices=["linear", "attentive"],
        default=["linear"],
        help="video: probes of every encoder (the first is summarised over seeds); attentive = one learned query "
        "over the tokens of --video-probe-layer",
    )
    p.add_argument(
        "--video-load", nargs="+", default=[], help="video: also probe these saved models (folders --save wrote)"
    )
    p.add_argument("--video-probe-layer", type=int, default=-1, help="video: the attentive probe's block (-1 = last)")
    p.add_argument("--video-probe-epochs", type=int, default=30, help="video: the attentive probe's epochs")
    p.add_argument(
        "--maskers", nargs="*", default=["random", "tube", "adaptive"], choices=["random", "tube", "adaptive"]
    )
    p.add_argument(
        "--video-recipe",
        default="{}",
        help='video: JSON {"task": MAETaskConfig fields over the default model, "train": FastPretrainConfig fields}',
    )
    args = p.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("mmtok.mim.pretrain_fast").setLevel(logging.INFO)  # progress of long pretraining runs
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        args.budget, args.finetune_budget, args.video_budget = 20.0, 10.0, 8.0
    sections = args.only or ["throughput", "maskers", "quality", "video"]
    results: dict = {
        "machine": {
            "device": str(device),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "load_avg_start": os.getloadavg(),
        },
        "quick": args.quick,
    }
    t0 = time.perf_counter()
    for name in sections:
        print(f"[{name}]", flush=True)
        fn = {"throughput": bench_throughput, "maskers": bench_maskers}.get(name)
        if fn is not None:
            results[name] = fn(args.quick, device)
        elif name == "quality":
            results[name] = bench_quality(args, device)
        else:
            results[name] = bench_video(args, device)
    results["machine"]["load_avg_end"] = os.getloadavg()
    results["seconds"] = time.perf_counter() - t0
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2, default=float))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
