"""Visual-token pruning speed on a LLaVA-1.5-shaped workload (CPU-sized widths).

Workload: 576 image tokens (96 px, patch 4 -> 24 x 24) inside ~60 text tokens, a Llama-shaped LLM whose
per-token FLOPs are >= 20x the vision tower's (as in LLaVA-1.5-7B vs CLIP-L), random weights. For every
method and keep in (576, 192, 128, 64): prefill latency (vision tower + LLM, last-token logits), end-to-end
latency for 32 new tokens (KV cache), measured FLOPs of the prefill (torch.utils.flop_counter; attention added
by formula when the counter does not see the CPU attention kernel), and the pruner's selection time.
Timings are medians of repeated runs, interleaved across methods so outside load hits all of them alike.
Both wall time and process CPU time are reported: on a shared machine the CPU time (work done by this
process) is the load-robust figure, and ``cpu eff`` = CPU-time speed-up / FLOP ratio.

Merging methods (``tome``, ``pitome``: they merge the image tokens into K groups before the LLM) are rows like the
pruners; their "sel ms" is the whole merge (similarities and averaging), the merging overhead. ``--tower-merge``
adds a table of in-tower merging (ToMe / PiToMe, ``r`` tokens merged in every tower block, ``r`` chosen so that the
last block ends with about half of the tower's tokens unless ``--tower-r`` is given): tower latency, speed-up and
FLOP ratio against the plain tower.

    python tools/bench/prune.py --quick --json runs/bench/prune_quick.json
    python tools/bench/prune.py --json runs/bench/prune.json          # the full table (~15 min on 2 cores)
    python tools/bench/prune.py --skip-speed --tower-merge --json runs/bench/tower_merge.json
    python tools/bench/prune.py --device cuda --preset llava7b --json runs/bench/prune_cuda.json   # on a GPU

``--device cuda`` builds the model on the GPU with bf16 weights and runs under bf16 autocast (as a deployed MLLM
would); timings there are wall time with the device synchronised (``generate`` synchronises before it reads the
clock), and the "cpu" columns are the host process's CPU time (launch overhead), not the work. ``--preset llava7b``
is LLaVA-1.5-7B's shape with random weights: a 32-layer, 4,096-wide Llama (11,008 MLP, 32k vocabulary) after a
24-block, 1,024-wide ViT on the same 576 image tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

METHODS = ["none", "random", "pool", "cls_attention", "vtc_cls", "fastv", "dart", "tome", "pitome"]


PRESETS = {  # LLaVA-1.5-7B: Vicuna-7B (Llama-2 shape) after CLIP ViT-L (24 blocks, 1,024 wide), 576 image tokens
    "llava7b": {
        "width": 4096,
        "layers": 32,
        "intermediate": 11008,
        "vocab": 32000,
        "tower_width": 1024,
        "tower_depth": 24,
    },
}


def build_model(
    width: int,
    layers: int,
    tower_width: int,
    tower_depth: int,
    vocab: int,
    intermediate: int = 0,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """A random-init LLaVA-shaped MLLM, created directly on ``device`` (a 7B one initialises in seconds on a GPU)."""
    from mmtok import registries

    heads = max(1, width // 64)
    llm = {
        "model_type": "llama",
        "hidden_size": width,
        "intermediate_size": intermediate or int(width * 2.75) // 32 * 32,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "pad_token_id": 0,
        "eos_token_id": 2,
    }
    tower = {
        "name": "timm_vit",
        "model_name": "vit_tiny_patch16_224",
        "kwargs": {
            "img_size": 96,
            "patch_size": 4,
            "embed_dim": tower_width,
            "depth": tower_depth,
            "num_heads": max(1, tower_width // 64),
        },
    }
    torch.manual_seed(0)
    with torch.device(device):
        model = registries.get("mllm").create("llava", tower=tower, llm=llm, image_token_id=vocab - 1).eval()
    return model.to(dtype=dtype)


def autocast(device: str, dtype: torch.dtype):
    """bf16 autocast on CUDA when the weights are bf16 (norms and softmax stay fp32); nothing on the CPU."""
    if torch.device(device).type == "cuda" and dtype == torch.bfloat16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _wall(device: torch.device) -> float:
    """Wall clock after the device's queued work (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _clock(device: torch.device) -> float:
    """Selection time: synchronised wall clock on CUDA, process CPU time on the CPU."""
    return _wall(device) if device.type == "cuda" else time.process_time()


def make_inputs(model, batch: int, text_before: int = 12, text_after: int = 48):
    g = torch.Generator().manual_seed(0)
    img = model.config.image_token_id
    ids = torch.cat(
        [
            torch.randint(3, img, (batch, text_before), generator=g),
            torch.full((batch, 1), img),
            torch.randint(3, img, (batch, text_after), generator=g),
        ],
        dim=1,
    )
    images = torch.rand(batch, 3, 96, 96, generator=g)
    return ids.to(model.device), images.to(model.device)


def make_pruner(name: str, keep: int):
    from mmtok import registries

    return None if name == "none" and keep >= 576 else registries.get("pruner").create(name, num_keep=keep)


def timed_select(pruner, device: torch.device):
    """Wrap ``pruner.select`` to record its time (the selection overhead): CPU time, synchronised wall time on CUDA."""
    times: list[float] = []
    if pruner is None:
        return times
    orig = pruner.select

    def select(ctx):
        t = _clock(device)
        out = orig(ctx)
        times.append(_clock(device) - t)
        return out

    pruner.select = select
    return times


def attention_counted(device: str = "cpu", dtype: torch.dtype = torch.float32) -> bool:
    """Does FlopCounterMode count SDPA on this device (CPU kernels are often invisible to it)?"""
    from torch.utils.flop_counter import FlopCounterMode

    q = torch.randn(1, 2, 16, 8, device=device, dtype=dtype)
    mask = torch.zeros(1, 1, 16, 16, device=device, dtype=dtype)
    with FlopCounterMode(display=False) as fc:
        torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    return fc.get_total_flops() > 0


def prefill_flops(model, ids, images, pruner, add_attention: bool) -> tuple[float, int]:
    """FLOPs of one prefill (vision tower + LLM, last-token logits) and the LLM sequence length after pruning."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, torch.no_grad():
        out = model.generate(ids, images, pruner=pruner, max_new_tokens=1)
    flops = float(fc.get_total_flops())
    if add_attention:  # QK^T and AV per layer: 2 * 2 * B * H * Lq * Lk * dh (the masked kernel computes all pairs)
        b = ids.shape[0]
        cfg = model.llm.config
        full = ids.shape[1] - 1 + model.num_image_tokens
        k_layer = pruner.layer if pruner is not None and pruner.stage == "in_llm" else 0
        lens = [full if i < k_layer else out.prefill_length for i in range(cfg.num_hidden_layers)]
        flops += sum(4.0 * b * cfg.hidden_size * n * n for n in lens)
        tower = model.tower
        t = tower.num_patches + tower.num_prefix_tokens
        flops += 4.0 * b * tower.hidden_size * t * t * tower.num_layers
    return flops, out.prefill_length


def resolve_model_args(p: argparse.ArgumentParser, args) -> None:
    """Apply ``--preset`` to the shape arguments, check ``--device``, resolve ``--dtype`` to ``args.torch_dtype``."""
    for key, value in PRESETS.get(args.preset or "", {}).items():
        setattr(args, key, value)
    cuda = torch.device(args.device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device here (torch {torch.__version__}); use --device cpu")
    if args.dtype == "auto":
        args.dtype = "bf16" if cuda else "fp32"
    args.torch_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32


def model_from_args(args):
    """The LLaVA-shaped model of ``args`` (width, layers, tower, vocab, intermediate, device, torch_dtype)."""
    return build_model(
        args.width,
        args.layers,
        args.tower_width,
        args.tower_depth,
        args.vocab,
        args.intermediate,
        args.device,
        args.torch_dtype,
    )


def machine(args) -> str:
    host = f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {args.threads} threads"
    if torch.device(args.device).type == "cuda":
        return f"{torch.cuda.get_device_name(torch.device(args.device))} ({args.dtype}), {host}"
    return host


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    model = model_from_args(args)
    dev = model.device
    llm_params = sum(p.numel() for p in model.llm.model.layers.parameters())
    tower_params = sum(p.numel() for p in model.tower.model.blocks.parameters())
    per_token_ratio = llm_params / tower_params
    add_attn = not attention_counted(args.device, args.torch_dtype)
    configs = [("none", 576)] + [(m, k) for k in args.keeps if k < 576 for m in args.methods if m != "none"]
    results = []
    for batch in args.batches:
        ids, images = make_inputs(model, batch)
        stats = {c: {"prefill": [], "prefill_cpu": [], "e2e": [], "e2e_cpu": [], "select": []} for c in configs}
        with torch.no_grad(), autocast(args.device, args.torch_dtype):
            for c in configs:  # warm-up: kernels, allocator and (on CUDA) the autotuned paths of every shape
                model.generate(ids, images, pruner=make_pruner(*c), max_new_tokens=2)
            for _rep in range(args.repeats):
                for c in configs:  # interleaved: every method sees the same outside load
                    pruner = make_pruner(*c)
                    sel = timed_select(pruner, dev)
                    t = time.process_time()
                    out = model.generate(ids, images, pruner=pruner, max_new_tokens=1)
                    stats[c]["prefill_cpu"].append(time.process_time() - t)
                    stats[c]["prefill"].append(out.prefill_seconds)
                    stats[c]["select"] += sel
                    if args.new_tokens:
                        t = time.process_time()
                        out = model.generate(
                            ids,
                            images,
                            pruner=make_pruner(*c),
                            max_new_tokens=args.new_tokens,
                            min_new_tokens=args.new_tokens,
                        )
                        stats[c]["e2e_cpu"].append(time.process_time() - t)
                        stats[c]["e2e"].append(out.total_seconds)
        base = None
        for c in configs:
            with autocast(args.device, args.torch_dtype):
                flops, length = prefill_flops(model, ids, images, make_pruner(*c), add_attn)
            row = {
                "method": c[0],
                "kind": getattr(make_pruner(*c), "kind", "select"),
                "keep": c[1],
                "batch": batch,
                "llm_tokens": length,
                "prefill_ms": 1e3 * statistics.median(stats[c]["prefill"]),
                "prefill_cpu_ms": 1e3 * statistics.median(stats[c]["prefill_cpu"]),
                "e2e_ms": 1e3 * statistics.median(stats[c]["e2e"]) if stats[c]["e2e"] else None,
                "e2e_cpu_ms": 1e3 * statistics.median(stats[c]["e2e_cpu"]) if stats[c]["e2e_cpu"] else None,
                "select_ms": 1e3 * statistics.median(stats[c]["select"]) if stats[c]["select"] else 0.0,
                "gflops": flops / 1e9,
            }
            if base is None:
                base = row
            row["prefill_speedup"] = base["prefill_ms"] / row["prefill_ms"]
            row["prefill_cpu_speedup"] = base["prefill_cpu_ms"] / row["prefill_cpu_ms"]
            row["e2e_speedup"] = base["e2e_ms"] / row["e2e_ms"] if row["e2e_ms"] else None
            row["e2e_cpu_speedup"] = base["e2e_cpu_ms"] / row["e2e_cpu_ms"] if row["e2e_cpu_ms"] else None
            row["flop_ratio"] = base["gflops"] / row["gflops"]
            row["efficiency"] = row["prefill_speedup"] / row["flop_ratio"]
            row["cpu_efficiency"] = row["prefill_cpu_speedup"] / row["flop_ratio"]
            row["select_pct_of_unpruned_prefill"] = 100 * row["select_ms"] / base["prefill_cpu_ms"]
            results.append(row)
            print_row(row)
        if args.json:  # partial results survive an interrupted run
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"partial": True, "results": results}, indent=2))
    return {
        "machine": machine(args),
        "device": str(dev),
        "dtype": args.dtype,
        "model": {
            "llm_width": args.width,
            "llm_layers": args.layers,
            "llm_intermediate": model.llm.config.intermediate_size,
            "llm_block_params": llm_params,
            "tower_width": args.tower_width,
            "tower_depth": args.tower_depth,
            "tower_block_params": tower_params,
            "llm_to_tower_per_token_flops": round(per_token_ratio, 1),
            "image_tokens": model.num_image_tokens,
        },
        "attention_flops": "added by formula (4*B*D*L^2 per layer)" if add_attn else "counted by FlopCounterMode",
        "repeats": args.repeats,
        "new_tokens": args.new_tokens,
        "results": results,
    }


HEADER = (
    f"{'method':14s} {'keep':>4s} {'B':>2s} {'tokens':>6s} {'prefill ms':>10s} {'x':>5s} {'cpu ms':>8s} {'x':>5s} "
    f"{'e2e ms':>8s} {'x':>5s} {'e2e cpu':>8s} {'x':>5s} {'GFLOP':>7s} {'FLOPx':>6s} {'eff':>5s} {'cpu eff':>7s} "
    f"{'sel ms':>7s} {'sel%':>5s}"
)


def print_row(r: dict) -> None:
    e2e = (
        f"{r['e2e_ms']:8.1f} {r['e2e_speedup']:5.2f} {r['e2e_cpu_ms']:8.1f} {r['e2e_cpu_speedup']:5.2f}"
        if r["e2e_ms"]
        else f"{'-':>8s} {'-':>5s} {'-':>8s} {'-':>5s}"
    )
    print(
        f"{r['method']:14s} {r['keep']:4d} {r['batch']:2d} {r['llm_tokens']:6d} {r['prefill_ms']:10.1f} "
        f"{r['prefill_speedup']:5.2f} {r['prefill_cpu_ms']:8.1f} {r['prefill_cpu_speedup']:5.2f} {e2e} "
        f"{r['gflops']:7.2f} {r['flop_ratio']:6.2f} {r['efficiency']:5.2f} {r['cpu_efficiency']:7.2f} "
        f"{r['select_ms']:7.2f} {r['select_pct_of_unpruned_prefill']:5.2f}",
        flush=True,
    )


def tower_flops(tower, lengths: list[int], batch: int, linear_flops: float) -> float:
    """Tower FLOPs: the counted linear layers plus attention by formula over each block's token count."""
    return linear_flops + sum(4.0 * batch * tower.hidden_size * n * n for n in lengths)


def tower_merge(args) -> dict:
    """In-tower merging: tower latency and FLOPs with ToMe / PiToMe merging r tokens per block, against no merging."""
    from torch.utils.flop_counter import FlopCounterMode

    from mmtok.mllm.pruning.tower_merge import TowerMergeConfig, tower_hidden_states

    torch.set_num_threads(args.threads)
    model = model_from_args(args)
    tower = model.tower
    t0 = tower.num_patches + tower.num_prefix_tokens
    depth = tower.num_layers
    # r: about half of the tokens gone after the last block, merged evenly over the blocks (ToMe's constant
    # schedule) or all in the first block (a front-loaded schedule: the later blocks run on half the tokens)
    r = args.tower_r if args.tower_r else -(-(t0 - 1) // (2 * depth))
    first = [(t0 - 1) // 2]
    configs = [("plain", None)]
    for m in ("tome", "pitome"):
        configs += [(m, TowerMergeConfig(method=m, r=r)), (f"{m}_first", TowerMergeConfig(method=m, r=first))]
    rows = []
    print(f"\nin-tower merging: {t0} tokens, {depth} blocks, r = {r} per block (*_first: r = {first[0]} in block 0)")
    print(f"{'method':12s} {'B':>2s} {'tokens':>12s} {'tower ms':>9s} {'x':>5s} {'cpu ms':>8s} {'x':>5s} {'FLOPx':>6s}")
    for batch in args.batches:
        px = tower.preprocess(torch.rand(batch, 3, 96, 96, generator=torch.Generator().manual_seed(0)).to(model.device))
        times = {c[0]: ([], []) for c in configs}
        lengths, flops = {}, {}
        with torch.no_grad(), autocast(args.device, args.torch_dtype):
            for name, cfg in configs:  # warm-up, token counts and FLOPs
                with FlopCounterMode(display=False) as fc:
                    if cfg is None:
                        tower.hidden_states(px)
                        lengths[name] = [t0] * (depth + 1)
                    else:
                        lengths[name] = [h.shape[1] for h in tower_hidden_states(tower, px, cfg).hidden_states]
                flops[name] = tower_flops(tower, lengths[name][:-1], batch, float(fc.get_total_flops()))
            for _ in range(args.repeats):
                for name, cfg in configs:  # interleaved
                    t, c = _wall(model.device), time.process_time()
                    tower.hidden_states(px) if cfg is None else tower_hidden_states(tower, px, cfg)
                    times[name][0].append(_wall(model.device) - t)
                    times[name][1].append(time.process_time() - c)
        base = None
        for name, cfg in configs:
            row = {
                "method": name,
                "batch": batch,
                "r": 0 if cfg is None else cfg.r,
                "tokens": lengths[name],
                "tower_ms": 1e3 * statistics.median(times[name][0]),
                "tower_cpu_ms": 1e3 * statistics.median(times[name][1]),
                "gflops": flops[name] / 1e9,
            }
            base = base or row
            row["speedup"] = base["tower_ms"] / row["tower_ms"]
            row["cpu_speedup"] = base["tower_cpu_ms"] / row["tower_cpu_ms"]
            row["flop_ratio"] = base["gflops"] / row["gflops"]
            rows.append(row)
            span = f"{t0}->{lengths[name][-1]}"
            print(
                f"{name:12s} {batch:2d} {span:>12s} {row['tower_ms']:9.1f} {row['speedup']:5.2f} "
                f"{row['tower_cpu_ms']:8.1f} {row['cpu_speedup']:5.2f} {row['flop_ratio']:6.2f}",
                flush=True,
            )
    return {"tower_tokens": t0, "depth": depth, "r": r, "rows": rows}


def accuracy(args) -> dict:
    """Held-out answer accuracy of a trained MLLM for every method at 192/128/64 kept, as a fraction of unpruned.

    Also the blind baseline (the unpruned model shown black canvases): ``table["blind"]``, and per row
    ``above_blind`` = (acc - blind) / (unpruned - blind), the share of what the image adds that a method keeps.
    """
    from mmtok.mllm.evaluate import DEFAULT_METHODS, load_eval_set, retention_table
    from mmtok.mllm.modeling import MLLM

    torch.set_num_threads(args.threads)
    model = MLLM.from_pretrained(args.accuracy_model).eval()
    samples = load_eval_set(args.accuracy_data, args.accuracy_limit)
    keeps = [k for k in args.keeps if k < model.num_image_tokens] or [64]
    print(f"\naccuracy retention: {len(samples)} held-out samples, {model.num_image_tokens} image tokens")
    table = retention_table(model, samples, DEFAULT_METHODS, keeps, tower_rs=tuple(args.accuracy_tower_r), blind=True)
    table["model"] = args.accuracy_model
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small LLM, batch 1 and 2, keep 576/64, 2 repeats")
    p.add_argument("--json", default="", help="write the results here")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--tower-width", type=int, default=128)
    p.add_argument("--tower-depth", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--keeps", type=int, nargs="+", default=[576, 192, 128, 64])
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--accuracy-model", default="", help="also measure accuracy retention of this trained MLLM folder")
    p.add_argument("--accuracy-data", default="data/fashion-vqa/test-*.tar", help="held-out VQA shards")
    p.add_argument("--accuracy-limit", type=int, default=0, help="first N held-out samples (0 = all)")
    p.add_argument("--skip-speed", action="store_true", help="only the accuracy-retention table")
    p.add_argument("--tower-merge", action="store_true", help="also the in-tower merging table (ToMe, PiToMe)")
    p.add_argument("--tower-r", type=int, default=0, help="tokens merged per tower block (0 = halve the tokens)")
    p.add_argument(
        "--accuracy-tower-r", type=int, nargs="*", default=[], help="in-tower merging r values for the accuracy table"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps CPU-time figures free of spin-waits)")
    p.add_argument("--intermediate", type=int, default=0, help="LLM MLP width (0 = 2.75 x width)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a published model's shape (random weights)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="weights (auto: bf16 on CUDA)")
    args = p.parse_args(argv)
    if args.quick:
        args.width, args.layers, args.tower_width, args.tower_depth = 256, 4, 64, 2
        args.batches, args.keeps, args.repeats, args.new_tokens = [1, 2], [576, 64], 2, 8
    resolve_model_args(p, args)
    report: dict = {}
    if not args.skip_speed:
        print(HEADER)
        report = run(args)
    if args.tower_merge:
        report["tower_merge"] = tower_merge(args)
    if args.accuracy_model:
        report["accuracy"] = accuracy(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
