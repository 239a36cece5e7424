"""Host (Python) overhead of mmtok's MLLM decoder loop: cached decode step, prefill and a segmentation training step.

mmtok runs the LLM's decoder layers in its own loop (:mod:`mmtok.mllm.decoder`), so every layer costs the host a
fixed amount of Python and operator dispatch whatever the number of tokens. On a thin, many-layer LLM that cost is
most of the time, which is what this benchmark exposes:

* ``decode step``: one cached generation step of ``MLLM.generate`` at batch 1 (decoder layers through the KV cache,
  logits, token choice, end-of-sequence bookkeeping): ``(total - prefill) / (new_tokens - 1)`` of a greedy run
  that never stops early;
* ``prefill``: ``generate(max_new_tokens=1)`` at batch 1 (prompt preparation, vision tower, every LLM layer,
  last-token logits), ``llm prefill``: the decoder layers and last-token logits alone on the prepared sequence (636
  tokens: 576 image tokens inside 60 text tokens), and ``llm prefill 16``: the same on its last 16 tokens, where
  the layers' fixed cost is nearly all of it;
* ``seg train step``: one step of the ``configs/mllm/seg_scenes_cpu.yaml`` recipe (task built through the registry
  as ``mmtok train`` builds it): forward, backward, gradient clipping and the AdamW step on a synthetic batch of 16.

Per-layer figures divide by the number of LLM layers. Repeats are interleaved (one of each measurement per round,
so outside load hits all alike) and medians are reported, as wall time and (CPU) as process CPU time. On CUDA the
device is synchronised before every clock read, weights are bf16 under bf16 autocast as in ``tools/bench/prune.py``
(``--preset llava7b``: LLaVA-1.5-7B's shape, random weights). To compare two versions of the code, run this
twice back to back on the same machine (``source`` in the output says which ``mmtok`` was measured).

    OMP_NUM_THREADS=1 python tools/bench/decode.py --json runs/bench/decode.json
    python tools/bench/decode.py --device cuda --preset llava7b --skip-train --json runs/bench/decode_cuda.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # prune.py's model builder and inputs
from prune import PRESETS, autocast, machine, make_inputs, model_from_args, resolve_model_args  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SEG_RECIPE = REPO / "configs" / "mllm" / "seg_scenes_cpu.yaml"


def _clock(device: torch.device) -> tuple[float, float]:
    """(wall, process CPU) time, after the device's queued work on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter(), time.process_time()


class Timer:
    """Collects (wall, CPU) durations of repeated calls under one name."""

    def __init__(self, device: torch.device):
        self.device = device
        self.wall: dict[str, list[float]] = {}
        self.cpu: dict[str, list[float]] = {}

    def add(self, name: str, wall: float, cpu: float) -> None:
        self.wall.setdefault(name, []).append(wall)
        self.cpu.setdefault(name, []).append(cpu)

    @contextlib.contextmanager
    def time(self, name: str):
        w, c = _clock(self.device)
        yield
        w2, c2 = _clock(self.device)
        self.add(name, w2 - w, c2 - c)

    def medians_ms(self) -> dict[str, dict[str, float]]:
        return {
            k: {"wall_ms": 1e3 * statistics.median(v), "cpu_ms": 1e3 * statistics.median(self.cpu[k]), "n": len(v)}
            for k, v in self.wall.items()
        }


def build_seg_task(args):
    """The seg_scenes_cpu recipe's task, optimizer and a synthetic batch of ``--train-batch`` scenes."""
    from mmtok.train.config import load_run_config
    from mmtok.train.engine import create_task, seed_everything
    from mmtok.train.optim import build_optimizer

    cfg = load_run_config([str(SEG_RECIPE)], [])
    seed_everything(0)
    task = create_task(cfg).to(args.device)
    task.train()
    opt = build_optimizer(task.param_groups(cfg.optim.weight_decay), cfg.optim)
    return task, opt, task.synthetic_batch(args.train_batch), cfg.train.grad_clip


def train_step(task, opt, batch, clip: float, device: torch.device) -> None:
    opt.zero_grad(set_to_none=True)
    with autocast(device, torch.bfloat16 if device.type == "cuda" else torch.float32):
        loss = task(batch)["loss"]
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in task.parameters() if p.grad is not None], clip)
    opt.step()


def run(args) -> dict:

    from mmtok.mllm import decoder as dec

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    timer = Timer(device)
    model = model_from_args(args)
    layers = model.llm.config.num_hidden_layers
    ids, images = make_inputs(model, 1)
    seg = None if args.skip_train else build_seg_task(args)
    amp = autocast(device, args.torch_dtype)

    def gen(n: int):
        # eos_token_id=[]: no row ever stops early, so every run takes exactly n steps
        return model.generate(ids, images, max_new_tokens=n, eos_token_id=[], min_new_tokens=n)

    short = args.short_prefill
    with torch.no_grad(), amp:
        prep = model.prepare(ids, None, images)
        prefill_inputs = (prep.embeds, prep.key_valid, prep.position_ids)
        for _ in range(args.warmup):  # kernels, allocator, autotuned paths
            gen(args.new_tokens)
            dec.run_layers(model.llm, prep.embeds, prep.key_valid, prep.position_ids, use_cache=True)
    for _ in range(args.warmup if seg else 0):
        train_step(*seg, device)

    for _ in range(args.repeats):  # interleaved rounds
        with torch.no_grad(), amp:
            _, c = _clock(device)
            out = gen(args.new_tokens)
            _, c2 = _clock(device)
            with timer.time("prefill"):
                gen(1)
            steps = args.new_tokens - 1
            # wall: generate's own clock after the prefill; CPU: the run minus a one-token run, per step
            timer.add(
                "decode step",
                (out.total_seconds - out.prefill_seconds) / steps,
                (c2 - c - timer.cpu["prefill"][-1]) / steps,
            )
            with timer.time("llm prefill"):
                r = dec.run_layers(model.llm, prep.embeds, prep.key_valid, prep.position_ids, use_cache=True)
                model.lm_logits(r.hidden[:, -1])
            with timer.time(f"llm prefill {short}"):  # few tokens: the layers' fixed cost shows
                r = dec.run_layers(model.llm, *(x[:, -short:] for x in prefill_inputs), use_cache=True)
                model.lm_logits(r.hidden[:, -1])
        if seg:
            with timer.time("seg train step"):
                train_step(*seg, device)

    rows = timer.medians_ms()
    for name in ("decode step", "llm prefill", f"llm prefill {short}"):
        rows[name]["per_layer_us"] = 1e3 * rows[name]["wall_ms"] / layers
    import mmtok

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load": os.getloadavg(),
        "machine": machine(args),
        "source": str(Path(mmtok.__file__).resolve().parent),
        "git": _git_rev(),
        "model": {
            "preset": args.preset or "",
            "width": model.llm.config.hidden_size,
            "layers": layers,
            "prompt_tokens": int(prep.embeds.shape[1]),
            "dtype": args.dtype,
        },
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "results": rows,
    }


def _git_rev() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip()
    except OSError:
        return ""


def table(res: dict) -> str:
    m = res["model"]
    lines = [
        f"{res['machine']}; load {', '.join(f'{x:.2f}' for x in res['load'])}; {res['date']}",
        f"LLM {m['layers']} layers x {m['width']} wide ({m['preset'] or 'thin'}, {m['dtype']}), "
        f"prompt {m['prompt_tokens']} tokens, batch 1; medians of {res['repeats']} interleaved rounds",
        f"{'measurement':<16} {'wall ms':>9} {'cpu ms':>9} {'per layer us':>13}",
    ]
    for name, r in res["results"].items():
        per = f"{r['per_layer_us']:.1f}" if "per_layer_us" in r else ""
        lines.append(f"{name:<16} {r['wall_ms']:>9.2f} {r['cpu_ms']:>9.2f} {per:>13}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps the figures free of spin-waits)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="weights (auto: bf16 on CUDA)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a published model's shape (random weights)")
    p.add_argument("--width", type=int, default=64, help="LLM width of the thin model")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--tower-width", type=int, default=64)
    p.add_argument("--tower-depth", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=0, help="LLM MLP width (0 = 2.75 x width)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated per decode measurement")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--short-prefill", type=int, default=16, help="tokens of the second, short LLM prefill")
    p.add_argument("--train-batch", type=int, default=16)
    p.add_argument("--skip-train", action="store_true", help="no seg_scenes_cpu training step")
    p.add_argument("--json", default="", help="write the results here")
    args = p.parse_args(argv)
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (one decode step)")
    resolve_model_args(p, args)
    res = run(args)
    print(table(res))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
