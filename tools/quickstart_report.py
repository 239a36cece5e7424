"""The last step of `make demo`: measure each quickstart figure's trivial baseline and write REPORT.md.

    python tools/quickstart_report.py --runs runs/quickstart

Reads what the quickstart steps wrote under RUNS (run_summary.json, eval JSON files, figures, timings.json),
computes the baselines each figure must beat (cached in RUNS/baselines.json), makes the report's figures
under RUNS/figures/, writes RUNS/REPORT.md and prints a short summary. Baselines:

* toy classifier accuracy: chance (1/10);
* tokenizer PSNR: a 7x7 thumbnail (the size of the code grid) upsampled bilinearly, on the same test images;
* MAE linear probe: the same probe on the same encoder architecture at random initialisation;
* MLLM answer accuracy: the same model shown an all-black canvas instead of the scene ("blind");
* segmentation cIoU: an empty mask (0), the whole image, and the 16x16 oracle (the ground truth through a
  nearest 16x16 grid, the best any 16x16 head can do).

Every path printed or written is relative to the working folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `mmtok` from this checkout even when it is not installed

# The recipes' full-budget figures, as stated in the README (update both together). key -> (value, where).
FULL_BUDGET: dict[str, tuple[float, str]] = {
    "vq_psnr": (22.89, "vq_small_f4, 600 s on 1 CPU thread (README, Tokenizers)"),
    "vq_usage": (1.0, "vq_small_f4, 600 s on 1 CPU thread (README, Tokenizers)"),
    "mae_probe": (
        0.884,
        "MAE patch 7 (tools/bench/mim.py), 90 min on 1 CPU thread, converged probe on the last block's features, "
        "60k train images (README, Masked image modeling; the quickstart probes the last 4 blocks on 10k)",
    ),
    "mllm_acc": (0.486, "fashion_vqa_cpu, 30 min on 1 CPU thread (README, pruning accuracy)"),
    "mllm_dart64": (0.474, "fashion_vqa_cpu, DART at 64 of 576 (README, pruning accuracy)"),
    "seg_allmask": (0.674, "seg_scenes_cpu, 30 min on 1 CPU thread, bilinear (README, Segmentation results)"),
    "seg_segtoken": (0.610, "seg_scenes_cpu, 30 min on 1 CPU thread, bilinear (README, Segmentation results)"),
}

SEG_NOTE = (
    "Segmentation: the recipe `configs/mllm/seg_scenes_cpu.yaml` (and this short run of it) trains the all-mask and "
    "[SEG] heads. The text-as-mask head is left out of the recipe: at CPU budgets it takes samples the other heads "
    "need and stays near the whole-image baseline (README, Segmentation results); add it with `task.heads`."
)

FID_NOTE = (
    "`fid_mobilenetv2` is the Frechet distance between the pooled 1280-d features of the offline ImageNet "
    "MobileNetV2 (images upsampled to 64 px) on the originals and on the reconstructions: FID's formula on another "
    "network, so its values are not comparable with published (Inception) FIDs. It is 0 when the two feature "
    "distributions match and grows without bound; lower is better. Read it against the 7x7-thumbnail row above "
    "(a blurry reconstruction with as many numbers as the code grid) and compare runs only at the same `--n`: "
    "with a few hundred images and 1280 features the estimate is biased upwards."
)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# ----------------------------------------------------------------------------------------------- baselines


def thumbnail_baseline(n: int = 500, grid: int = 7, fid: bool = True) -> dict[str, float]:
    """PSNR (and ``fid_mobilenetv2``) of Fashion-MNIST test images against their ``grid x grid`` thumbnail.

    The thumbnail (average-pooled, upsampled bilinearly) holds as many numbers as the f4 tokenizer's code grid
    holds codes, so a tokenizer that does not beat it has learnt nothing a resize would not give. The images
    are the ones ``mmtok eval tokenizer --data fmnist --n N`` scores (same positions in the test split).
    """
    import torch
    import torch.nn.functional as F

    from mmtok.tokenizers.evaluate import frechet_distance, load_eval_images

    x = load_eval_images("fmnist", n)  # [n, 1, 28, 28] in [0, 1]
    up = F.interpolate(F.adaptive_avg_pool2d(x, grid), size=x.shape[-2:], mode="bilinear", align_corners=False)
    up = up.clamp(0, 1)
    mse = ((up - x) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    out = {"psnr": float((10 * torch.log10(1.0 / mse)).mean())}
    if fid and len(x) >= 2:
        from mmtok.tokenizers.losses import MobileNetFeatures

        net = MobileNetFeatures()
        with torch.no_grad():
            fa = torch.cat([net.pooled(x[i : i + 64] * 2 - 1) for i in range(0, len(x), 64)])
            fb = torch.cat([net.pooled(up[i : i + 64] * 2 - 1) for i in range(0, len(x), 64)])
        out["fid_mobilenetv2"] = float(frechet_distance(fa.double().numpy(), fb.double().numpy()))
    return out


# The quickstart's evaluation sizes; both sides of a figure and its baseline use the same ones. The MAE probe fits
# on 10k training images and scores on the whole 10k test split (on 2k, two standard errors were 0.018: a short
# run's real lead over the random-init encoder was called a tie); the MLLM answers 400 test questions.
MAE_PROBE_LAYERS = 4  # `mmtok eval mim --probe-layers`
MAE_PROBE_TRAIN = 10000
MAE_PROBE_TEST = 10000
MLLM_EVAL_N = 400


def random_init_probe(mae_run: Path, limit_train: int, limit_test: int, layers: int = MAE_PROBE_LAYERS) -> float:
    """Linear-probe accuracy of the MAE's encoder architecture with random weights (same probe, same data)."""
    import torch

    from mmtok import hub, registries
    from mmtok.mim.evaluate import fmnist_probe, load_model
    from mmtok.mim.probe import DEFAULT_CS

    trained = load_model(mae_run)
    folder = next(p for p in (mae_run / "export" / "mae", mae_run / "mae", mae_run) if (p / hub.CONFIG_NAME).is_file())
    meta = hub.read_config(folder)
    torch.manual_seed(0)
    model = registries.get(meta["kind"]).create(meta["name"], **meta["config"]).eval()
    encoder = model.encoder if hasattr(model, "encoder") else model
    del trained
    args = argparse.Namespace(limit_train=limit_train, limit_test=limit_test, pool="mean", probe_layers=layers)
    args.probe_c = list(DEFAULT_CS)  # the grid `mmtok eval mim` starts from: the identical probe on both sides
    return float(fmnist_probe(encoder, args)["probe_accuracy"])


def blind_accuracy(model_dir: Path, pattern: str, limit: int) -> float:
    """Answer accuracy of the MLLM when every image is an all-black canvas: what the text alone gives."""
    import torch

    from mmtok.mllm.evaluate import answer_accuracy, load_eval_set
    from mmtok.mllm.modeling import MLLM

    model = MLLM.from_pretrained(str(model_dir)).eval()
    samples = load_eval_set(pattern, limit)
    blind = [{**s, "image": torch.zeros_like(s["image"])} for s in samples]
    return float(answer_accuracy(model, blind)["acc"])


def seg_baselines(pattern: str, limit: int, grid: int = 16) -> dict[str, float]:
    """cIoU of trivial predictions on the first ``limit`` samples: empty mask, whole image, ``grid`` oracle."""
    import numpy as np

    from mmtok.mllm.seg.evaluate import load_seg_set
    from mmtok.mllm.seg.formats import resize_nearest

    samples = load_seg_set(pattern, limit)
    inter_whole = union_whole = inter_or = union_or = 0
    for s in samples:
        gt = s["mask"].astype(bool)
        h, w = gt.shape
        inter_whole += int(gt.sum())
        union_whole += h * w
        coarse = resize_nearest(gt.astype(np.int64), grid, grid)
        back = resize_nearest(coarse, h, w).astype(bool)
        inter_or += int((back & gt).sum())
        union_or += int((back | gt).sum())
    return {
        "empty": 0.0,
        "whole_image": inter_whole / max(union_whole, 1),
        f"oracle_{grid}": inter_or / max(union_or, 1),
        "n": len(samples),
    }


MAE_BASELINE = f"mae_probe_random_init_l{MAE_PROBE_LAYERS}_n{MAE_PROBE_TRAIN}x{MAE_PROBE_TEST}"


def _blind_of_eval(runs: Path) -> float | None:
    """The blind accuracy that the quickstart's `mmtok eval mllm --blind` measured, if it did."""
    blind = (_read(runs / "mllm_fashion_vqa" / "pruning.json") or {}).get("blind")
    return float(blind["acc"]) if blind and blind.get("acc") is not None else None


def compute_baselines(runs: Path, tiny: bool = False) -> dict[str, Any]:
    """Every baseline whose inputs exist; cached in ``runs/baselines.json`` (delete it to recompute), except the blind
    MLLM's, which depends on the trained model and is read again from its evaluation (or measured) every time."""
    cache = runs / "baselines.json"
    out: dict[str, Any] = _read(cache) or {}
    todo = {
        "vq_thumbnail": lambda: thumbnail_baseline(16 if tiny else 500),
        # the key names the probe's layers and sizes, so a cache from another probe is not compared with this one
        MAE_BASELINE: (
            (
                lambda: random_init_probe(
                    runs / "mae_fmnist", 200 if tiny else MAE_PROBE_TRAIN, 100 if tiny else MAE_PROBE_TEST
                )
            )
            if (runs / "mae_fmnist" / "export").exists()
            else None
        ),
        # from `mmtok eval mllm --blind` (the quickstart's evaluation step) when it is there, on the same questions
        "mllm_blind": (
            (
                lambda: (
                    _blind_of_eval(runs)
                    or blind_accuracy(
                        runs / "mllm_fashion_vqa" / "export", "data/fashion-vqa/test-*.tar", 8 if tiny else MLLM_EVAL_N
                    )
                )
            )
            if (runs / "mllm_fashion_vqa" / "export").exists()
            else None
        ),
        "seg": (
            (lambda: seg_baselines("data/scenes/test-*.tar", 4 if tiny else 100))
            if Path("data/scenes/test.json").exists()
            else None
        ),
    }
    for key, fn in todo.items():
        # the blind baseline belongs to the trained model (a rerun or --force makes a new one): never from the cache
        if fn is None or (key in out and key != "mllm_blind"):
            continue
        print(f"baseline {key} ...", flush=True)
        out[key] = fn()
        cache.write_text(json.dumps(out, indent=2) + "\n")
    return out


# ------------------------------------------------------------------------------------------------- figures


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def label_rows(src: Path, dst: Path, labels: list[str], scale: int = 1, margin: int = 150) -> Path:
    """Copy of an image grid, upscaled ``scale`` times (nearest), with ``labels`` written left of equal row bands."""
    from PIL import Image, ImageDraw

    with Image.open(src) as im:
        img = im.convert("RGB")
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    out = Image.new("RGB", (img.width + margin, img.height), (255, 255, 255))
    out.paste(img, (margin, 0))
    draw = ImageDraw.Draw(out)
    band = img.height / len(labels)
    font = _font(16)
    for i, text in enumerate(labels):
        draw.text((6, int(band * i + band / 2) - 8), text, fill=(0, 0, 0), font=font)
    dst.parent.mkdir(parents=True, exist_ok=True)
    out.save(dst)
    return dst


def pruning_plot(rows: list[dict[str, Any]], dst: Path, blind: float | None = None) -> Path:
    """Accuracy against evaluation time for every pruner (one point each), drawn with PIL (no matplotlib here)."""
    from PIL import Image, ImageDraw

    W, H, L, B = 640, 420, 70, 60  # canvas, left and bottom margins
    img = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(img)
    font = _font(13)
    secs = [float(r["seconds"]) for r in rows]
    accs = [float(r["acc"]) for r in rows] + ([blind] if blind is not None else [])
    x0, x1 = 0.0, max(secs) * 1.6 or 1.0  # room on the right for the labels
    y0, y1 = max(0.0, min(accs) - 0.1), min(1.0, max(accs) + 0.1)

    def xy(s: float, a: float) -> tuple[float, float]:
        return L + (s - x0) / (x1 - x0) * (W - L - 20), H - B - (a - y0) / max(y1 - y0, 1e-9) * (H - B - 30)

    d.line([(L, 30), (L, H - B), (W - 20, H - B)], fill=(0, 0, 0), width=1)
    for k in range(6):
        a = y0 + (y1 - y0) * k / 5
        _, y = xy(0, a)
        d.line([(L - 4, y), (L, y)], fill=(0, 0, 0))
        d.text((8, y - 7), f"{a:.2f}", fill=(0, 0, 0), font=font)
        s = x0 + (x1 - x0) * k / 5
        x, _ = xy(s, y0)
        d.line([(x, H - B), (x, H - B + 4)], fill=(0, 0, 0))
        d.text((x - 10, H - B + 8), f"{s:.0f}", fill=(0, 0, 0), font=font)
    d.text((L + 120, H - 25), "seconds to answer the test questions (lower = faster)", fill=(0, 0, 0), font=font)
    d.text((8, 8), "answer accuracy", fill=(0, 0, 0), font=font)
    if blind is not None:
        _, y = xy(0, blind)
        d.line([(L, y), (W - 20, y)], fill=(200, 60, 60), width=1)
        d.text((L + 6, y - 16), f"blind baseline {blind:.2f}", fill=(200, 60, 60), font=font)
    placed: list[tuple[float, float]] = []  # label anchors so far: points close together get stacked labels
    for r in sorted(rows, key=lambda r: (-float(r["acc"]), float(r["seconds"]))):
        x, y = xy(float(r["seconds"]), float(r["acc"]))
        colour = (40, 90, 200) if r["method"] != "none" else (20, 150, 60)
        d.ellipse([x - 5, y - 5, x + 5, y + 5], fill=colour)
        ly = y - 7
        while any(abs(px - x) < 110 and abs(py - ly) < 14 for px, py in placed):
            ly += 14
        placed.append((x, ly))
        if ly != y - 7:
            d.line([(x + 5, y), (x + 9, ly + 7)], fill=(150, 150, 150))
        d.text((x + 10, ly), f"{r['method']} ({r['keep']}): {float(r['acc']):.2f}", fill=(0, 0, 0), font=font)
    dst.parent.mkdir(parents=True, exist_ok=True)
    img.save(dst)
    return dst


def kept_token_overlays(model_dir: Path, scene: Path, dst: Path, keep: int, question: str) -> Path:
    """The scene with each pruner's kept image tokens at full brightness and the dropped ones darkened."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    from mmtok import registries
    from mmtok.mllm.modeling import MLLM
    from mmtok.mllm.pruning.cli import load_image
    from mmtok.mllm.text import chat_prompt, decode_answers, encode_prompts

    model = MLLM.from_pretrained(str(model_dir)).eval()
    tok = model.tokenizer
    image = load_image(str(scene))
    ids, att = encode_prompts(tok, [chat_prompt(tok, question)])
    rgb = (image[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    side = int(round(model.num_image_tokens**0.5))
    size, tiles = 192, []
    methods = ["none", "random", "pool", "cls_attention", "vtc_cls", "fastv", "dart"]
    for m in methods:
        pruner = None if m == "none" else registries.get("pruner").create(m, num_keep=keep)
        with torch.no_grad():
            gen = model.generate(ids, image, att, pruner=pruner, max_new_tokens=6, eos_token_id=tok.eos_token_id)
        answer = decode_answers(tok, gen.sequences)[0]
        kept = np.zeros(side * side, bool)
        if gen.image_keep is None:
            kept[:] = True
        else:
            kept[gen.image_keep[0].numpy()] = True
        cell = np.kron(kept.reshape(side, side), np.ones((rgb.shape[0] // side, rgb.shape[1] // side), bool))
        shown = np.where(cell[..., None], rgb, (rgb * 0.25).astype(np.uint8))
        tile = Image.new("RGB", (size, size + 34), (255, 255, 255))
        tile.paste(Image.fromarray(shown).resize((size, size), Image.NEAREST), (0, 34))
        draw = ImageDraw.Draw(tile)
        draw.text((2, 2), f"{m}: {int(kept.sum())} kept", fill=(0, 0, 0), font=_font(13))
        draw.text((2, 17), f"-> {answer}"[:30], fill=(0, 0, 0), font=_font(13))
        tiles.append(tile)
    out = Image.new("RGB", (len(tiles) * (size + 6), size + 34), (255, 255, 255))
    for i, t in enumerate(tiles):
        out.paste(t, (i * (size + 6), 0))
    dst.parent.mkdir(parents=True, exist_ok=True)
    out.save(dst)
    return dst


def make_figures(runs: Path) -> dict[str, str]:
    """The report's figures that can be made from what exists (title -> path relative to ``runs``)."""
    figs: dict[str, str] = {}
    fdir = runs / "figures"
    grid = runs / "vq_fmnist" / "eval" / "recon_grid.png"
    if grid.is_file():
        labels = ["original", "reconstruction", "original", "reconstruction"]
        label_rows(grid, fdir / "tokenizer_recon.png", labels, scale=4)
        figs["Tokenizer: test images and their reconstructions (7x7 codes each)"] = "figures/tokenizer_recon.png"
    recon = runs / "mae_fmnist" / "recon.png"
    if recon.is_file():
        label_rows(recon, fdir / "mae_recon.png", ["original", "masked (75%)", "reconstruction"], scale=2)
        figs["MAE: test images, the 75% hidden, and the reconstruction"] = "figures/mae_recon.png"
    pruning = _read(runs / "mllm_fashion_vqa" / "pruning.json")
    base = _read(runs / "baselines.json") or {}
    if pruning and pruning.get("rows"):
        pruning_plot(pruning["rows"], fdir / "pruning.png", base.get("mllm_blind"))
        figs["Pruning: answer accuracy against time, every pruner at 64 of 576 tokens"] = "figures/pruning.png"
    scene, model = runs / "scene.png", runs / "mllm_fashion_vqa" / "export"
    if scene.is_file() and (model / "config.json").is_file() and not (fdir / "kept_tokens.png").is_file():
        kept_token_overlays(model, scene, fdir / "kept_tokens.png", 64, "how many items are there ?")
    if (fdir / "kept_tokens.png").is_file():
        figs["Kept image tokens (64 of 576) per pruner and the answer to 'how many items are there ?'"] = (
            "figures/kept_tokens.png"
        )
    for title, rel in (
        ("Segmentation: worst and best test cases (image / ground truth / all-mask prediction)", "seg/cases.png"),
        ("mmtok segment on one scene (all-mask head)", "seg/scene64_mask.overlay.png"),
    ):
        if (runs / rel).is_file():
            figs[title] = rel
    shots = sorted((runs / "demo_screenshots").glob("*.png"))
    for s in shots:
        figs[f"Demo tab: {s.stem}"] = str(s.relative_to(runs))
    return figs


# -------------------------------------------------------------------------------------------------- report


def _f(x: Any, fmt: str = ".3f") -> str:
    return "–" if x is None else format(float(x), fmt)


def carried_steps(steps: dict[str, Any]) -> list[str]:
    """``key (A -> B steps)`` for each step of timings.json whose budget ran out at step A and whose floor of steps
    (``train.min_steps``) carried it on to step B."""
    out = []
    for key, s in steps.items():
        spent_at, done = s.get("budget_spent_at_step"), s.get("steps")
        if spent_at is not None and done is not None and spent_at < done:
            out.append(f"{key} ({spent_at} -> {done} steps)")
    return out


def figure_rows(runs: Path, base: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per quickstart figure: what, value, baseline, whether it beats it, and the full-budget figure."""
    rows: list[dict[str, Any]] = []

    def add(
        what: str,
        value: Any,
        baseline: Any,
        bname: str,
        full_key: str = "",
        higher: bool = True,
        fmt=".3f",
        n: int = 0,
    ):
        # "beats" = better than the baseline by more than the noise of an accuracy on n samples (two standard
        # errors of the baseline's rate), so a tie on a small test set is called a tie, not a win.
        beats = None
        if value is not None and baseline is not None:
            p = min(max(float(baseline), 0.0), 1.0)
            noise = 2.0 * (p * (1.0 - p) / n) ** 0.5 if n else 0.0
            gain = (value - baseline) if higher else (baseline - value)
            beats = True if gain > noise else False if gain < -noise or not n else "tie"
        full = FULL_BUDGET.get(full_key)
        rows.append(
            {
                "what": what,
                "value": value,
                "baseline": baseline,
                "baseline_name": bname,
                "beats": beats,
                "full": full[0] if full else None,
                "full_where": full[1] if full else "",
                "fmt": fmt,
            }
        )

    toy = _read(runs / "toy" / "run_summary.json")
    if toy and (toy.get("eval") or {}).get("accuracy") is not None:
        add("toy classifier: Fashion-MNIST test accuracy", toy["eval"]["accuracy"], 0.1, "chance (10 classes)")
    vq = _read(runs / "vq_fmnist" / "eval" / "metrics.json")
    if vq:
        thumb = base.get("vq_thumbnail") or {}
        add("VQ tokenizer: PSNR (dB)", vq.get("psnr"), thumb.get("psnr"), "7x7 thumbnail", "vq_psnr", fmt=".2f")
        add("VQ tokenizer: codebook usage", vq.get("usage"), None, "–", "vq_usage")
        if vq.get("fid_mobilenetv2") is not None:
            fid = thumb.get("fid_mobilenetv2")
            add(
                "VQ tokenizer: fid_mobilenetv2 (lower is better)",
                vq["fid_mobilenetv2"],
                fid,
                "7x7 thumbnail",
                higher=False,
                fmt=".1f",
            )
    mae = _read(runs / "mae_fmnist" / "eval.json")
    if mae and mae.get("probe_accuracy") is not None:
        add(
            "MAE: linear probe accuracy",
            mae["probe_accuracy"],
            base.get(MAE_BASELINE),
            "random-init encoder",
            "mae_probe",
            n=int(mae.get("test_n") or MAE_PROBE_TEST),
        )
    pr = _read(runs / "mllm_fashion_vqa" / "pruning.json")
    if pr:
        add(
            "MLLM: answer accuracy, no pruning",
            pr.get("unpruned_acc"),
            base.get("mllm_blind"),
            "blind (black image)",
            "mllm_acc",
            n=int(pr.get("n") or 0),
        )
        for r in pr.get("rows", []):
            if r["method"] != "none":
                full = "mllm_dart64" if r["method"] == "dart" and r["keep"] == 64 else ""
                what = f"MLLM: accuracy, {r['method']} at {r['keep']}"
                add(what, r["acc"], base.get("mllm_blind"), "blind", full, n=int(pr.get("n") or 0))
    sb = base.get("seg") or {}
    seg = _read(runs / "seg" / "eval.json") or {}  # the per-patch heads (the quickstart trains no text head)
    for r in seg.get("rows", []):
        if r.get("method", "none") == "none":
            oracle = _f(sb.get("oracle_16"))
            add(
                f"segmentation: cIoU, {r['head']} head ({seg.get('n')} test scenes; 16x16 oracle {oracle})",
                r["ciou"],
                sb.get("whole_image"),
                "whole image",
                f"seg_{r['head']}" if r.get("refine", "bilinear") == "bilinear" else "",
            )
    return rows


def write_report(runs: Path, base: dict[str, Any], figs: dict[str, str]) -> tuple[Path, list[dict[str, Any]]]:
    """Write ``runs/REPORT.md``; returns its path and the figure rows."""
    rows = figure_rows(runs, base)
    timings = _read(runs / "timings.json") or {}
    steps = timings.get("steps", {})
    lines = ["# What `make demo` made", ""]
    m = timings.get("machine_at_start") or {}
    if m:
        lines += [
            f"Machine at the start of the last run: {m.get('cpus')} CPUs, load average {m.get('load_1min')} "
            f"(1 min), one thread's float32 matmul {m.get('gflops_1thread', '?')} GFLOP/s (time-budgeted steps "
            f"scale with it; README, 'Machines'). Budget scale {timings.get('scale', 1)}"
            + (" (tiny smoke run: figures mean nothing)." if timings.get("tiny") else "."),
            "",
        ]
    lines += [
        "These are short runs (each training step had a few minutes of wall clock): the figures show the pipeline "
        "works and beats its trivial baseline, not what the recipes reach. The last column is the recipe's figure "
        "at its full budget, from the README.",
        "",
        "| figure | quickstart | trivial baseline | beats it | recipe, full budget |",
        "|---|---:|---:|:---:|---:|",
    ]
    for r in rows:
        beats = {True: "yes", False: "**no**", None: "–", "tie": "tie (within noise)"}[r["beats"]]
        base_txt = f"{_f(r['baseline'], r['fmt'])} ({r['baseline_name']})" if r["baseline"] is not None else "–"
        lines.append(f"| {r['what']} | {_f(r['value'], r['fmt'])} | {base_txt} | {beats} | {_f(r['full'], r['fmt'])} |")
    sources = sorted({r["full_where"] for r in rows if r["full_where"]})
    if sources:
        lines += ["", "Full-budget figures: " + "; ".join(sources) + "."]
    lines += ["", "About `fid_mobilenetv2`: " + FID_NOTE, "", SEG_NOTE, ""]
    lines += ["## Steps and their budgets", ""]
    lines += ["| step | seconds | budget s | floor (steps) | budget ran out at step | stopped by | steps / planned |"]
    lines += ["|---|---:|---:|---:|---:|---|---:|"]
    cut, carried = [], carried_steps(steps)
    for key, s in steps.items():
        stopped = s.get("stopped_by") or "–"
        if stopped == "max_seconds":
            cut.append(key)
        spent_at = s.get("budget_spent_at_step")
        done = f"{s['steps']} / {s['planned_steps']}" if s.get("steps") is not None else "–"
        lines.append(
            f"| {key}: {s.get('title', '')} | {s.get('seconds', 0):.0f} | {_f(s.get('budget_s'), 'g')} "
            f"| {s.get('min_steps') or '–'} | {spent_at if spent_at is not None else '–'} | {stopped} | {done} |"
        )
    if timings.get("last_run_steps_s") is not None:
        text = f"The steps of the last `make demo` took {timings['last_run_steps_s'] / 60:.1f} min, this report not "
        text += "included (steps already done were skipped)"
        if timings.get("last_run_s") is not None:
            text += f"; the complete run before it, report included, took {timings['last_run_s'] / 60:.1f} min"
        lines += ["", text + "."]
    lines += [
        "",
        "Steps cut short by their budget: "
        + (", ".join(cut) if cut else "none")
        + ". Their learning rate still annealed (`train.schedule_by_time=true`), within the budget or by the"
        " floor; the commands below train the full recipes.",
        "",
    ]
    if carried:
        lines += [
            "Steps whose budget ran out before their floor of steps (`train.min_steps`, a slow or busy host: the run "
            "took longer than planned rather than leave a model too short to beat its baseline): "
            + ", ".join(carried)
            + ".",
            "",
        ]
    if figs:
        lines += ["## Figures", ""]
        for title, rel in figs.items():
            lines += [f"**{title}** (`{rel}`)", "", f"![{title}]({rel})", ""]
    lines += [
        "## Going further",
        "",
        "```bash",
        "tensorboard --logdir runs/quickstart                       # training curves of every step",
        "mmtok demo --models runs/quickstart                        # the Gradio demo on these models",
        "python tools/quickstart.py --scale 3 --force               # the same pipeline with 3x the budgets",
        "mmtok train --config configs/tokenizer/vq_fmnist.yaml      # full recipes (budgets in the README)",
        "mmtok train --config configs/mim/mae_fmnist.yaml --config configs/mim/mae_fmnist_p7.yaml",
        "mmtok eval mim --model runs/mae_fmnist_p7 --figure runs/mae_fmnist_p7/recon.png --finetune",
        "mmtok train --config configs/mllm/fashion_vqa_cpu.yaml",
        "mmtok eval mllm --model runs/mllm_fashion_vqa_cpu/export --data 'data/fashion-vqa/test-*.tar' \\",
        "    --keeps 192 128 64",
        "mmtok shards fashion-scenes --out data/scenes100k train=0",
        "mmtok shards fashion-scenes --out data/scenes100k_rc25 train=100000 val=0 test=0 repeat_class=0.25",
        "mmtok train --config configs/mllm/seg_scenes_cpu.yaml",
        "mmtok eval seg --model runs/seg_scenes_cpu/export --data 'data/scenes100k/test-*.tar' \\",
        "    --refine bilinear guided --thresholds 0.5 0.3 --prune dart fastv --keeps 16",
        "```",
        "",
    ]
    path = runs / "REPORT.md"
    path.write_text("\n".join(lines))
    return path, rows


def print_summary(path: Path, rows: list[dict[str, Any]], runs: Path) -> None:
    print(f"\nWrote {path} with {len(rows)} figures. Quickstart figures against their trivial baselines:")
    for r in rows:
        if r["baseline"] is None and r["what"].startswith("MLLM: accuracy,"):
            continue
        if r["what"].startswith("MLLM: accuracy,") and "dart" not in r["what"]:
            continue  # the report has every pruner; the summary keeps the unpruned and DART rows
        mark = {True: "beats", False: "DOES NOT beat", None: "", "tie": "ties (within noise) with"}[r["beats"]]
        base = f"  ({mark} {r['baseline_name']} {_f(r['baseline'], r['fmt'])})" if r["baseline"] is not None else ""
        print(f"  {r['what']}: {_f(r['value'], r['fmt'])}{base}")
    timings = _read(runs / "timings.json") or {}
    cut = [k for k, s in timings.get("steps", {}).items() if s.get("stopped_by") == "max_seconds"]
    if cut:
        print(f"  cut short by their time budget: {', '.join(cut)} (see {path} for steps reached)")
    carried = carried_steps(timings.get("steps", {}))
    if carried:
        print(f"  carried past their budget to their floor of steps (a slow or busy host): {', '.join(carried)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default="runs/quickstart", help="the quickstart's output folder (relative)")
    p.add_argument("--tiny", action="store_true", help="baselines on a handful of samples (smoke runs)")
    p.add_argument("--no-baselines", action="store_true", help="only write the report from what exists")
    args = p.parse_args(argv)
    runs = Path(args.runs)
    if not runs.is_dir():
        print(f"quickstart_report: {args.runs} does not exist; run `make demo` first", file=sys.stderr)
        return 2
    base = (_read(runs / "baselines.json") or {}) if args.no_baselines else compute_baselines(runs, tiny=args.tiny)
    figs = make_figures(runs)
    path, rows = write_report(runs, base, figs)
    print_summary(path, rows, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
