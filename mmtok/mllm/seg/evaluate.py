"""``mmtok eval seg``: referring (and semantic) segmentation quality of an MLLM, per head, refinement and pruner.

    mmtok eval seg --model runs/seg_scenes_cpu/export --data 'data/scenes/test-*.tar' \\
        [--heads allmask text segtoken] [--prune dart fastv --keeps 64] [--refine none bilinear guided] \\
        [--semantic] [--json seg.json] [--md seg.md] [--grid seg.png]

For every (head, refinement, pruner, keep): gIoU (mean per-sample IoU; an empty ground truth with an empty
prediction counts 1.0), cIoU (total intersection / total union), the grounding rate where the shards carry an
instance map (share of scenes with two or more items whose mask covers the referred item more than any other),
the parse-repair rate and mean descriptor tokens (text head), and the time to a mask (median and p90 of per-batch
time / batch size). Where the data has no-target samples (json ``no_target: true``, an empty mask: fashion-scenes
built with ``absent_share``; GRES, arXiv:2306.00968), each row also gives N-acc (no-target samples predicted empty)
and T-acc (with-target samples predicted non-empty), as printed columns and in the JSON (``n_acc``, ``t_acc``,
``n_no_target``; None when the set has none of that kind); grounding is then scored over the with-target samples
only. ``--semantic`` also asks the
text head for every item ("segment every item .") and scores the class masks against ``instances.png`` (mIoU).
Writes a JSON file, a Markdown table and a PNG grid of the worst and best cases of the first configuration.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


def load_seg_set(pattern: str, limit: int = 0) -> list[dict[str, Any]]:
    """Referring samples ``{image [3, H, W], mask [H, W] bool, expression, instances?, items?, target?, no_target}``
    from shards (``no_target``: the json says the expression names nothing in the image; its mask is empty)."""
    from mmtok.data import ShardDataset

    out = []
    for s in ShardDataset(pattern, on_error="raise"):
        meta = s["json"]
        if "expression" not in meta or "mask" not in s:
            raise ValueError(
                f"{pattern}: sample {s.get('__key__')} has no expression/mask.png (not a segmentation set)"
            )
        img = s["image"]
        out.append(
            {
                "key": s.get("__key__", ""),
                "image": img.expand(3, -1, -1) if img.shape[0] == 1 else img,
                "mask": s["mask"].numpy() > 0,
                "expression": meta["expression"],
                "instances": s["instances"].numpy() if "instances" in s else None,
                "items": meta.get("items", []),
                "target": meta.get("target"),  # index of the referred item in ``items`` (instance id target + 1)
                "no_target": bool(meta.get("no_target", False)),
            }
        )
        if limit and len(out) >= limit:
            break
    if not out:
        raise ValueError(f"no samples in {pattern!r}")
    return out


@torch.no_grad()
def evaluate_config(
    model,
    samples: list[dict[str, Any]],
    head: str,
    refine: str = "bilinear",
    pruner=None,
    batch_size: int = 16,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """One row of the table: metrics of ``head`` with ``refine``, ``pruner`` and mask ``threshold``."""
    from mmtok.data.sources.scenes import expression_kind
    from mmtok.mllm.seg.metrics import SegMeter, mask_iou, picks_referred

    meter = SegMeter()
    picks: list[bool] = []
    picks_by_kind: dict[str, list[bool]] = {}  # what the expression needs beyond the class (fashion-scenes items)
    per_mask: list[float] = []
    tokens: list[int] = []
    ious: list[float] = []
    preds: list[np.ndarray] = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        images = torch.stack([s["image"] for s in chunk])
        exprs = [s["expression"] for s in chunk]
        res = model.segment(images, exprs, head=head, refine=refine, pruner=pruner, threshold=threshold)
        per_mask.append(res.seconds / len(chunk))
        tokens += res.tokens
        for s, pred, rep in zip(chunk, res.masks.numpy(), res.repairs):
            # a flagged no-target sample is counted as one; otherwise the meter decides from the ground truth
            meter.update(pred, s["mask"], repairs=rep, no_target=True if s.get("no_target") else None)
            ious.append(mask_iou(pred, s["mask"]))
            preds.append(pred)
            has_target = not s.get("no_target") and s.get("target") is not None and int(s["target"]) >= 0
            if s.get("instances") is not None and has_target:
                pick = picks_referred(pred, s["instances"], int(s["target"]) + 1)
                if pick is not None:
                    picks.append(pick)
                    item = s["items"][int(s["target"])] if int(s["target"]) < len(s["items"]) else None
                    kind = expression_kind(s["expression"], item) if item and "colour" in item else None
                    if kind is not None:
                        picks_by_kind.setdefault(kind, []).append(pick)
    summ = meter.summary()
    per_mask.sort()
    row = {
        "head": head,
        "refine": refine,
        "threshold": threshold,
        "method": getattr(pruner, "name", None) or (type(pruner).__name__ if pruner is not None else "none"),
        "keep": pruner.budget(model.num_image_tokens) if pruner is not None else model.num_image_tokens,
        "giou": summ["giou"],
        "ciou": summ["ciou"],
        "grounding": float(np.mean(picks)) if picks else None,
        "grounding_n": len(picks),
        # grounding split by expression kind: {"class" | "colour" | "place" | "colour+place": [rate, scenes]}
        "grounding_by_kind": {k: [float(np.mean(v)), len(v)] for k, v in sorted(picks_by_kind.items())},
        "n_acc": summ["n_acc"],
        "t_acc": summ["t_acc"],
        "n_no_target": summ["n_no_target"],
        "repair_rate": summ.get("repair_rate", 0.0),
        "tokens": float(np.mean(tokens)) if tokens else None,
        "ms_per_mask_median": statistics.median(per_mask) * 1e3,
        "ms_per_mask_p90": per_mask[min(len(per_mask) - 1, int(0.9 * len(per_mask)))] * 1e3,
        "n": len(ious),
    }
    return {"row": row, "ious": ious, "preds": preds}


@torch.no_grad()
def semantic_miou(model, samples: list[dict[str, Any]], batch_size: int = 16) -> dict[str, Any]:
    """mIoU of the text head's "segment every item" answers against the class masks of ``instances.png``."""
    from mmtok.data.sources.fashion_mnist import CLASS_NAMES
    from mmtok.mllm.seg import heads as H
    from mmtok.mllm.seg.metrics import SegMeter
    from mmtok.mllm.seg.tasks import semantic_target

    head = next((n for n, h in model.seg_heads.items() if h.kind == "text"), None)
    if head is None:
        raise ValueError("--semantic needs a model with a text head")
    fmt = model.seg_heads[head].format
    meter = SegMeter()
    usable = [s for s in samples if s["instances"] is not None]
    for i in range(0, len(usable), batch_size):
        chunk = usable[i : i + batch_size]
        images = torch.stack([s["image"] for s in chunk])
        q = [H.SEMANTIC_QUESTIONS[0]] * len(chunk)
        res = model.segment(images, [H.SEMANTIC_PHRASE] * len(chunk), head=head, refine="none", questions=q)
        h, w = images.shape[-2:]
        for s, text in zip(chunk, res.text or []):
            dec = fmt.decode(text)
            labels = dec.mask(h, w)
            pred = np.zeros((h, w), np.int64)
            for k, name in enumerate(dec.names, start=1):
                cls = _class_id(name, CLASS_NAMES)
                if cls is not None:
                    pred[labels == k] = cls + 1
            gt_lab, gt_names = semantic_target(s["instances"], s["items"])
            gt = np.zeros_like(pred)
            for k, name in enumerate(gt_names, start=1):
                gt[gt_lab == k] = CLASS_NAMES.index(name) + 1
            meter.update(pred, gt, repairs=dec.repairs)
    return meter.summary()


def _class_id(name: str, classes: list[str]) -> int | None:
    norm = " ".join(name.lower().replace(" - ", "-").split())
    return classes.index(norm) if norm in classes else None


def baselines(samples: list[dict[str, Any]], grid: int = 16, metric: str = "ciou") -> dict[str, float]:
    """cIoU (or ``metric="giou"``) of trivial and ideal answers on the same samples: an empty mask, the whole image,
    and the ``grid x grid`` oracle (the ground truth written as R-RLE descriptors and read back, Text4Seg's ceiling).
    gIoU matters where the set has no-target samples: the empty answer scores 1 on each of them."""
    from mmtok import registries
    from mmtok.mllm.seg.metrics import SegMeter

    fmt = registries.get("seg format").create("rrle", grid=grid)
    meters = {"empty": SegMeter(), "whole_image": SegMeter(), f"oracle_{grid}x{grid}": SegMeter()}
    for s in samples:
        gt = s["mask"]
        meters["empty"].update(np.zeros_like(gt), gt)
        meters["whole_image"].update(np.ones_like(gt), gt)
        h, w = gt.shape
        meters[f"oracle_{grid}x{grid}"].update(fmt.oracle(gt.astype(np.int64), ["x"]).mask(h, w) > 0, gt)
    return {k: m.summary()[metric] for k, m in meters.items()}


def _pct(v: float | None) -> str:
    return f"{v:.1%}" if v is not None else "–"


def table_markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table; N-acc / T-acc columns only when some row scored no-target samples."""
    no_target = any(r.get("n_acc") is not None for r in rows)
    nt_head, nt_rule = (" N-acc | T-acc |", "---:|---:|") if no_target else ("", "")
    head = (
        f"| head | refine | thr | pruner | keep | gIoU | cIoU | grounding |{nt_head} repairs | tokens | "
        "ms/mask (median / p90) |"
    )
    lines = [head, f"|---|---|---:|---|---:|---:|---:|---:|{nt_rule}---:|---:|---:|"]
    for r in rows:
        tok = f"{r['tokens']:.0f}" if r.get("tokens") else "–"
        nt = f" {_pct(r.get('n_acc'))} | {_pct(r.get('t_acc'))} |" if no_target else ""
        lines.append(
            f"| {r['head']} | {r['refine']} | {r.get('threshold', 0.5):g} | {r['method']} | {r['keep']} | "
            f"{r['giou']:.3f} | {r['ciou']:.3f} | {_pct(r.get('grounding'))} |{nt} {r['repair_rate']:.1%} | {tok} | "
            f"{r['ms_per_mask_median']:.1f} / {r['ms_per_mask_p90']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def case_grid(samples: list[dict[str, Any]], ious: list[float], preds: list[np.ndarray], path: str, k: int = 4):
    """PNG of the ``k`` worst and ``k`` best samples: image | ground truth | prediction (IoU in the file name order)."""
    from PIL import Image, ImageDraw

    from mmtok.mllm.seg.cli import overlay

    order = np.argsort(ious)
    picks = list(order[:k]) + list(order[::-1][:k])
    tiles = []
    for i in picks:
        s = samples[int(i)]
        rgb = (s["image"].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        row = [Image.fromarray(rgb), overlay(rgb, s["mask"], (40, 200, 60)), overlay(rgb, preds[int(i)])]
        tiles.append(row)
    size = 128
    canvas = Image.new("RGB", (3 * size, len(tiles) * (size + 14)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (row, i) in enumerate(zip(tiles, picks)):
        y = r * (size + 14)
        tag = "worst" if r < k else "best"
        draw.text((2, y), f"{tag} IoU {ious[int(i)]:.2f}: {samples[int(i)]['expression']}"[:60], fill=(0, 0, 0))
        for c, im in enumerate(row):
            canvas.paste(im.resize((size, size), Image.NEAREST), (c * size, y + 14))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="mmtok eval seg", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="an MLLM folder with segmentation heads")
    p.add_argument("--data", required=True, help="shard pattern of a referring-segmentation split")
    p.add_argument("--heads", nargs="+", default=[], help="heads to score (default: all of the model's)")
    p.add_argument("--refine", nargs="+", default=["bilinear"], help="none | bilinear | guided (each is a row)")
    p.add_argument(
        "--thresholds",
        type=float,
        nargs="+",
        default=[0.5],
        help="mask = refined score > threshold, each a row (choose it on the validation split, report on test)",
    )
    p.add_argument("--prune", nargs="+", default=[], help="pruners to score besides no pruning")
    p.add_argument("--keeps", type=int, nargs="+", default=[64], help="image tokens kept per pruner")
    p.add_argument("--semantic", action="store_true", help="also score 'segment every item' (mIoU, text head)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=0, help="the first N samples only")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default="", help="write every row here")
    p.add_argument("--md", default="", help="write the Markdown table here")
    p.add_argument("--grid", default="", help="write a PNG of the worst and best cases here")
    args = p.parse_args(argv)
    from mmtok import registries
    from mmtok.mllm.modeling import MLLM

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    try:
        model = MLLM.from_pretrained(args.model).to(device).eval()
        samples = load_seg_set(args.data, args.limit)
        pruners = [(m, registries.get("pruner").create(m, num_keep=k)) for m in args.prune for k in args.keeps]
    except (OSError, ValueError, KeyError) as e:
        print(f"mmtok eval seg: {e}", file=sys.stderr)
        return 2
    bad = [t for t in args.thresholds if not 0.0 < t < 1.0]
    if bad:
        print(f"mmtok eval seg: thresholds must be in (0, 1), got {bad}", file=sys.stderr)
        return 2
    heads = args.heads or list(model.seg_heads)
    missing = [h for h in heads if h not in model.seg_heads]
    if missing or not heads:
        print(f"mmtok eval seg: the model has heads {list(model.seg_heads)}, not {missing or heads}", file=sys.stderr)
        return 2
    n_nt = sum(bool(s["no_target"]) for s in samples)
    nt_note = f" ({n_nt} without a target)" if n_nt else ""
    print(f"{len(samples)} samples{nt_note}, {model.num_image_tokens} image tokens per image, heads {heads}")
    rows, first = [], None
    for head in heads:
        for refine, thr in itertools.product(args.refine, args.thresholds):
            for name, pruner in [("none", None), *pruners]:
                if pruner is not None and (refine, thr) != (args.refine[0], args.thresholds[0]):
                    continue  # pruning rows with the first refinement and threshold only
                res = evaluate_config(model, samples, head, refine, pruner, args.batch_size, thr)
                res["row"]["method"] = name
                rows.append(res["row"])
                first = first or res
                r = res["row"]
                grd = f" grounding={r['grounding']:.1%}" if r["grounding"] is not None else ""
                if r["grounding_by_kind"]:
                    grd += " (" + ", ".join(f"{k} {v:.0%}" for k, (v, _) in r["grounding_by_kind"].items()) + ")"
                nt = f" n_acc={_pct(r['n_acc'])} t_acc={_pct(r['t_acc'])}" if r["n_acc"] is not None else ""
                print(
                    f"{head:9s} {refine:8s} >{thr:<4g} {name:13s} keep={r['keep']:4d} gIoU={r['giou']:.3f} "
                    f"cIoU={r['ciou']:.3f}{grd}{nt} repairs={r['repair_rate']:.1%} "
                    f"{r['ms_per_mask_median']:.1f} ms/mask",
                    flush=True,
                )
    out: dict[str, Any] = {"model": args.model, "data": args.data, "n": len(samples), "rows": rows}
    out["baselines_ciou"] = baselines(samples)
    print("baselines (cIoU): " + ", ".join(f"{k} {v:.3f}" for k, v in out["baselines_ciou"].items()))
    if n_nt:  # an empty answer scores gIoU 1 on every no-target sample: the floor a model's gIoU must beat
        out["baselines_giou"] = baselines(samples, metric="giou")
        print("baselines (gIoU): " + ", ".join(f"{k} {v:.3f}" for k, v in out["baselines_giou"].items()))
    if args.semantic:
        out["semantic"] = semantic_miou(model, samples, args.batch_size)
        print(f"semantic (segment every item): mIoU={out['semantic'].get('miou', float('nan')):.3f}")
    md = table_markdown(rows)
    print(md)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(md)
    if args.grid and first is not None:
        case_grid(samples, first["ious"], first["preds"], args.grid)
    return 0
