"""Benchmark: tokenizer speed, nearest-code search memory, and quality after a fixed CPU budget.

1. Encode / decode images/s per tokenizer at batch 1 and 32 (CPU; also CUDA when available).
2. Peak memory of the nearest-code search at codebook 16,384 (16,384 vectors of dim 8): mmtok's
   chunked search vs the library's full distance matrix, each in a fresh process (peak RSS delta).
3. Quality after a fixed wall-clock CPU budget (``--budget-s`` per model): VQ f4 on Fashion-MNIST
   (28 px, 512 codes; evaluated on 1,000 test images) and VQ f8 on 128x128 photo crops (1024 codes;
   trained on crops of the non-held-out photos, evaluated on crops of the held-out astronaut and
   chelsea). Each model takes its overrides (codebook size, EMA decay, dead-code threshold, ...) from its
   recipe's ``task.model`` (``configs/tokenizer/vq_fmnist.yaml``, ``vq_photos_f8.yaml``), so the bench
   measures the recipe; ``--f8-over '{"decay": 0.99}'`` changes fields on top of it (an earlier recipe).
   Reports PSNR, SSIM, codebook health and the steps the budget allowed. Codebook health has
   one definition (``mmtok.tokenizers.quantizers.codebook_stats``): over the last 65,536 assignments,
   usage = distinct codes / codebook size, usage >= 4 = share of codes hit at least 4 times, and
   perplexity; the evaluation figures count the evaluation's assignments (how many is printed), the
   ``train_window_*`` ones the last training assignments.

    python tools/bench/tokenizer.py [--quick] [--json out.json] [--budget-s 300] [--threads 1]
        [--skip-speed] [--models f4,f8] [--f4-over JSON] [--f8-over JSON] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mmtok import registries
from mmtok.tokenizers.evaluate import evaluate_tokenizer, load_eval_images
from mmtok.tokenizers.tasks import prepare_images

SPEED_MODELS = [
    ("vq_small_f4", {"image_size": 28, "codebook_size": 512}),
    ("vq_small_f8", {}),
    ("titok_tiny_k32", {}),
    ("pca1d_tiny_k16", {}),
]

REPO = Path(__file__).resolve().parents[2]
RECIPES = {"f4": REPO / "configs/tokenizer/vq_fmnist.yaml", "f8": REPO / "configs/tokenizer/vq_photos_f8.yaml"}


def recipe_model(which: str, extra: dict | None = None) -> dict:
    """``task.model`` overrides of a quality model's recipe YAML, with ``extra`` on top."""
    from omegaconf import OmegaConf

    over = OmegaConf.to_container(OmegaConf.load(RECIPES[which]).task.model)
    return {**over, **(extra or {})}


_MEM_SNIPPET = """
import sys, torch
from mmtok.tokenizers.quantizers import nearest_code
from vector_quantize_pytorch import VectorQuantize
torch.manual_seed(0)
mode = sys.argv[1]
x = torch.randn(16384, 8); cb = torch.randn(16384, 8)
vq = VectorQuantize(dim=8, codebook_size=16384, kmeans_init=False, rotation_trick=False).eval()
vq.codebook = cb

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024  # MB
open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS mark (VmHWM) after imports and setup
base = status("VmRSS")
with torch.no_grad():
    ids = nearest_code(x, cb, chunk_bytes=64 << 20) if mode == "chunked" else vq(x[None])[1]
print(status("VmHWM") - base)
"""


def speed(device: torch.device, reps: int) -> list[dict]:
    rows = []
    for name, over in SPEED_MODELS:
        model = registries.get("tokenizer").create(name, **over).to(device)
        model.train()
        c, s = model.config.in_channels, model.config.image_size
        model(torch.rand(32, c, s, s, device=device) * 2 - 1)  # k-means init
        model.eval()
        for bs in (1, 32):
            x = torch.rand(bs, c, s, s, device=device) * 2 - 1
            with torch.no_grad():
                ids = model.encode(x).indices
                model.decode_indices(ids)
                res = {}
                fns = (("encode", model.encode, x), ("decode", model.decode_indices, ids))
                for what, fn, arg in fns:
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        fn(arg)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    res[what] = bs * reps / (time.perf_counter() - t0)
            rows.append(
                {
                    "model": name,
                    "device": device.type,
                    "batch": bs,
                    "image": f"{c}x{s}x{s}",
                    "encode_img_s": res["encode"],
                    "decode_img_s": res["decode"],
                }
            )
    return rows


def search_memory() -> dict:
    out = {}
    for mode in ("chunked", "library_full"):
        r = subprocess.run([sys.executable, "-c", _MEM_SNIPPET, mode], capture_output=True, text=True, check=True)
        out[mode + "_peak_mb"] = float(r.stdout.strip().splitlines()[-1])
    out["full_matrix_mb"] = 16384 * 16384 * 4 / 2**20
    out["chunk_bound_mb"] = 64.0
    return out


def train_for(
    name: str, over: dict, images: torch.Tensor, budget_s: float, batch: int, lr: float, seed: int = 0
) -> tuple:
    torch.manual_seed(seed)  # init, k-means init, batch draws and restarts
    task = registries.get("task").create("tokenizer", tokenizer=name, model=over)
    opt = torch.optim.AdamW(task.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    c, s = task.tokenizer.config.in_channels, task.tokenizer.config.image_size
    data = prepare_images(images, s, c)
    t0, steps = time.perf_counter(), 0
    while time.perf_counter() - t0 < budget_s:
        out = task({"image": data[torch.randint(0, len(data), (batch,))]})
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        steps += 1
    return task.tokenizer, steps, time.perf_counter() - t0, task.tokenizer.codebook_stats()


def photo_train_crops(n: int, size: int = 128, held_out=("astronaut", "chelsea")) -> torch.Tensor:
    from PIL import Image

    from mmtok.data.sources.photos import load_photo, photo_paths, random_crop_box

    paths = {k: v for k, v in photo_paths().items() if k not in held_out}
    rng = np.random.default_rng(1)
    names = sorted(paths)
    out = []
    for i in range(n):
        img = Image.fromarray(load_photo(paths[names[i % len(names)]]))
        box = random_crop_box(rng, *img.size, (0.02, 0.5))
        out.append(np.asarray(img.resize((size, size), Image.BICUBIC, box=box)))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float().div(255)


def _row(model: str, data: str, steps: int, sec: float, batch: int, over: dict, res: dict, st: dict) -> dict:
    return {
        "model": model,
        "data": data,
        "steps": steps,
        "train_s": sec,
        "s_per_step": sec / max(steps, 1),
        "batch": batch,
        "model_overrides": over,
        "psnr": res["psnr"],
        "ssim": res["ssim"],
        "usage": res["usage"],
        "usage_ge4": res["usage_ge4"],
        "perplexity": res["perplexity"],
        "usage_assignments": res["usage_assignments"],
        "train_window_usage": st["usage"],
        "train_window_usage_ge4": st["usage_ge4"],
        "train_window_perplexity": st["perplexity"],
    }


def quality(budget_s: float, n_eval: int, models=("f4", "f8"), f4_over=None, f8_over=None, seed: int = 0) -> list[dict]:
    rows = []
    if "f4" in models:
        from mmtok.data.sources.fashion_mnist import load_fashion_mnist

        tr, _ = load_fashion_mnist("train")
        fm = torch.from_numpy(tr[:20000].copy()).float().div(255)[:, None]
        over = recipe_model("f4", f4_over)
        model, steps, sec, st = train_for("vq_small_f4", over, fm, budget_s, 64, 2e-3, seed)
        res = evaluate_tokenizer(model, load_eval_images("fmnist", n_eval), fid=False)
        rows.append(
            _row(f"vq_small_f4 ({model.codebook_size} codes)", "Fashion-MNIST test", steps, sec, 64, over, res, st)
        )
    if "f8" in models:
        photos = photo_train_crops(2000)
        over = recipe_model("f8", f8_over)
        model, steps, sec, st = train_for("vq_small_f8", over, photos, budget_s, 16, 1e-3, seed)
        res = evaluate_tokenizer(model, load_eval_images("photos", max(64, n_eval // 4)), fid=False)
        rows.append(
            _row(
                f"vq_small_f8 ({model.codebook_size} codes)",
                "held-out photo crops 128px",
                steps,
                sec,
                16,
                over,
                res,
                st,
            )
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer reps, 30 s training budgets")
    ap.add_argument("--json", default="")
    ap.add_argument("--budget-s", type=float, default=300.0, help="training wall-clock per quality model")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-speed", action="store_true", help="skip the speed and search-memory sections")
    ap.add_argument("--models", default="f4,f8", help="quality models to train: f4, f8 or both")
    ap.add_argument("--f4-over", default="{}", help="JSON tokenizer-config fields on top of the f4 recipe's task.model")
    ap.add_argument("--f8-over", default="{}", help="JSON tokenizer-config fields on top of the f8 recipe's task.model")
    ap.add_argument("--seed", type=int, default=0, help="torch seed of the quality trainings")
    args = ap.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if set(models) - set(RECIPES):
        ap.error(f"--models takes f4 and/or f8, not {args.models!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = 3 if args.quick else 10
    budget = 30.0 if args.quick else args.budget_s
    results: dict = {"threads": torch.get_num_threads(), "budget_s": budget, "seed": args.seed}
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    results["speed"] = [] if args.skip_speed else [r for d in devices for r in speed(d, reps)]
    if results["speed"]:
        print(f"{'model':18s} {'dev':5s} {'batch':>5s} {'image':>10s} {'enc img/s':>10s} {'dec img/s':>10s}")
    for r in results["speed"]:
        print(
            f"{r['model']:18s} {r['device']:5s} {r['batch']:5d} {r['image']:>10s} "
            f"{r['encode_img_s']:10.1f} {r['decode_img_s']:10.1f}"
        )
    if not args.skip_speed:
        results["search_memory"] = search_memory()
        m = results["search_memory"]
        print(
            f"\nnearest-code search, 16384 vectors x 16384 codes (dim 8): chunked peak {m['chunked_peak_mb']:.0f} MB "
            f"(chunk bound 64 MB) vs library full matrix {m['library_full_peak_mb']:.0f} MB "
            f"(one N x K fp32 matrix = {m['full_matrix_mb']:.0f} MB)"
        )
    if not args.skip_quality:
        results["quality"] = quality(
            budget, 256 if args.quick else 1000, models, json.loads(args.f4_over), json.loads(args.f8_over), args.seed
        )
        print(f"\nquality after a {budget:.0f} s CPU training budget ({results['threads']} threads):")
        print(
            f"{'model':26s} {'data':28s} {'steps':>6s} {'s/step':>6s} {'PSNR':>6s} {'SSIM':>6s} {'usage':>6s} "
            f"{'>=4':>6s} {'ppl':>7s} {'assign':>7s}"
        )
        for r in results["quality"]:
            print(
                f"{r['model']:26s} {r['data']:28s} {r['steps']:6d} {r['s_per_step']:6.2f} {r['psnr']:6.2f} "
                f"{r['ssim']:6.3f} {r['usage']:6.1%} {r['usage_ge4']:6.1%} {r['perplexity']:7.1f} "
                f"{r['usage_assignments']:7d}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
