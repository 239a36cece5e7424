"""Segmentation heads: time to a mask (text-as-mask vs all-mask vs [SEG]) and the all-mask head's extra memory.

Speed: the same MLLM (a trained one with ``--model DIR``, else a random-init ``llava_fashion_seg``) segments a
batch of fashion scenes with each head; the text head generates its descriptor with the KV cache (with a random
model it is made to write exactly ``--text-tokens`` tokens, the mean R-RLE length on fashion-scenes with the
built-in tokenizer from ``tools/bench/seg_formats.py``), the all-mask head runs one prefill plus one chunk of mask
tokens, the [SEG] head one prefill. Medians of ``--repeats`` interleaved runs per batch size, one thread by
default (``--threads``), wall and process CPU time.

Memory: bytes autograd saves in a training forward (activation memory) with and without the all-mask head's
``N`` mask tokens, at 576 (96 px / patch 4) and 2,304 (192 px / patch 4) image tokens, batch 1, plus the extra
KV-cache bytes of the mask chunk at inference.

    python tools/bench/seg.py --json runs/bench/seg.json
    python tools/bench/seg.py --model MODEL --json runs/bench/seg_trained.json   # a model with all three heads
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

HEADS = ("allmask", "segtoken", "text")


def build(image_size: int = 64, heads: dict | None = None):
    """A random-init ``llava_fashion_seg`` (the seg_scenes_cpu model) at ``image_size`` px, patch 4."""
    import copy

    from mmtok import registries

    torch.manual_seed(0)
    reg = registries.get("mllm")
    spec = copy.deepcopy(dict(reg.get("llava_fashion_seg").defaults))
    spec["tower"]["kwargs"]["img_size"] = image_size
    spec["llm"]["max_position_embeddings"] = 8192  # 2,304 image tokens + as many mask tokens
    spec["seg_heads"] = heads or {"allmask": {}, "segtoken": {}, "text": {}}
    return reg.create("llava_fashion_seg", **spec).eval()


def scenes(n: int, canvas: int) -> tuple[torch.Tensor, list[str]]:
    import numpy as np

    from mmtok.data.sources.scenes import make_scene, split_source

    images, labels, idx = split_source("test")
    out, exprs = [], []
    for i in range(n):
        rgb, _, items = make_scene(np.random.default_rng([5, i]), images, labels, canvas, indices=idx)
        out.append(torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
        exprs.append(items[0]["expression"])
    return torch.stack(out), exprs


def time_heads(model, batch_sizes, repeats: int, text_tokens: int, trained: bool) -> list[dict]:
    size = int(model.tower.image_size)
    if not trained:  # a random model never writes EOS: make it write exactly the typical descriptor length
        model.seg_heads["text"].config.max_new_tokens = text_tokens
    rows = []
    for bs in batch_sizes:
        images, exprs = scenes(bs, size)
        images = images.to(model.device)
        with torch.no_grad():
            for h in HEADS:  # warm-up
                model.segment(images, exprs, head=h)
            samples: dict[str, list[tuple[float, float, int]]] = {h: [] for h in HEADS}
            for _ in range(repeats):
                for h in HEADS:  # interleaved: outside load hits every head alike
                    c0, t0 = time.process_time(), time.perf_counter()
                    res = model.segment(images, exprs, head=h)
                    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                    toks = int(sum(res.tokens) / max(len(res.tokens), 1)) if res.tokens else 0
                    samples[h].append((wall, cpu, toks))
        text_wall = statistics.median(s[0] for s in samples["text"])
        text_cpu = statistics.median(s[1] for s in samples["text"])
        for h in HEADS:
            wall = statistics.median(s[0] for s in samples[h])
            cpu = statistics.median(s[1] for s in samples[h])
            rows.append(
                {
                    "batch": bs,
                    "head": h,
                    "ms_per_mask_wall": wall / bs * 1e3,
                    "ms_per_mask_cpu": cpu / bs * 1e3,
                    "speedup_vs_text_wall": text_wall / wall,
                    "speedup_vs_text_cpu": text_cpu / cpu,
                    "text_tokens": statistics.median(s[2] for s in samples[h]) if h == "text" else 0,
                }
            )
            r = rows[-1]
            print(
                f"batch {bs:2d} {h:9s} {r['ms_per_mask_wall']:8.1f} ms/mask wall {r['ms_per_mask_cpu']:8.1f} cpu "
                f"{r['speedup_vs_text_wall']:6.1f}x vs text (wall) {r['speedup_vs_text_cpu']:6.1f}x (cpu)",
                flush=True,
            )
    return rows


def saved_bytes(fn) -> int:
    """Bytes of distinct storages autograd saves during ``fn()`` (the step's activation memory)."""
    seen: dict[int, int] = {}

    def pack(t):
        try:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def memory_rows() -> list[dict]:
    return [_memory_row(size) for size in (96, 192)]


def _memory_row(size: int) -> dict:
    """Activation and KV-cache memory of the all-mask head at ``size`` px (patch 4)."""
    from mmtok.mllm import decoder as dec
    from mmtok.mllm.seg import heads as H
    from mmtok.mllm.text import chat_prompt, encode_prompts

    model = build(size, {"allmask": {}})
    model.train()
    tok = model.tokenizer
    n = model.num_image_tokens
    images = torch.rand(1, 3, size, size)
    text = chat_prompt(tok, H.question_for("the red bag"), model.seg_heads["allmask"].answer_text("the red bag"))
    ids, att = encode_prompts(tok, [text], "cpu")
    mid = H.token_id(model, "<mask>")
    ids_tail = torch.cat([ids, torch.full((1, n), mid)], 1)

    def plain():
        prep = model.prepare(ids, att, images)
        out, _ = model._run(prep, None, use_cache=False)
        model.lm_outputs(prep, out)

    def with_tail():
        prep = model.prepare(ids_tail, torch.ones_like(ids_tail), images)
        feats = prep.ctx.image_features
        prep.embeds = torch.cat([prep.embeds[:, :-n], prep.embeds[:, -n:] + feats], 1)
        out, _ = model._run(prep, None, use_cache=False, bidirectional_tail=n)
        model.lm_outputs(prep, out, tail=n)
        model.seg_heads["allmask"].logits(out.hidden[:, -n:])

    base, tail = saved_bytes(plain), saved_bytes(with_tail)
    model.eval()
    with torch.no_grad():  # inference: the KV cache grows by the mask chunk
        prep = model.prepare(ids, att, images)
        out, _ = model._run(prep, None, use_cache=True)

        def cache_bytes():
            return sum((ly.keys.numel() + ly.values.numel()) * ly.keys.element_size() for ly in out.state.cache.layers)

        before = cache_bytes()
        emb = model.llm.get_input_embeddings()(torch.full((1, n), mid)) + prep.ctx.image_features
        dec.decode_chunk(model.llm, emb, out.state, bidirectional=True)
        after = cache_bytes()
    row = {
        "image_tokens": n,
        "train_saved_mib_plain": base / 2**20,
        "train_saved_mib_allmask": tail / 2**20,
        "train_extra_ratio": tail / base,
        "kv_cache_mib_prefill": before / 2**20,
        "kv_cache_mib_with_masks": after / 2**20,
    }
    r = row
    print(
        f"{n:5d} image tokens: training activations {r['train_saved_mib_plain']:.1f} -> "
        f"{r['train_saved_mib_allmask']:.1f} MiB ({r['train_extra_ratio']:.2f}x); KV cache "
        f"{r['kv_cache_mib_prefill']:.2f} -> {r['kv_cache_mib_with_masks']:.2f} MiB",
        flush=True,
    )
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="a trained MLLM folder with all three heads (default: random init)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--text-tokens", type=int, default=103, help="descriptor length a random model is made to write")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (the memory rows are measured on the CPU)")
    p.add_argument("--quick", action="store_true", help="batch 1 only, 2 repeats, no memory rows")
    p.add_argument("--json", default="")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        from mmtok.mllm.modeling import MLLM

        model = MLLM.from_pretrained(args.model).eval()
        missing = [h for h in HEADS if h not in model.seg_heads]
        if missing:
            print(
                f"{args.model} lacks the heads {missing}: the bench times all three; train a model with "
                "task.heads naming allmask, segtoken and text (seg_scenes_cpu.yaml trains the first two)",
                file=sys.stderr,
            )
            return 2
    else:
        model = build()
    model = model.to(torch.device(args.device))
    if args.quick:
        args.batch_sizes, args.repeats = [1], 2
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} thread(s)")
    speed = time_heads(model, args.batch_sizes, args.repeats, args.text_tokens, trained=bool(args.model))
    memory = [] if args.quick else memory_rows()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        info = {"threads": args.threads, "model": args.model or "random llava_fashion_seg", "cpus": os.cpu_count()}
        info["device"] = torch.cuda.get_device_name() if model.device.type == "cuda" else "cpu"
        Path(args.json).write_text(json.dumps({"info": info, "speed": speed, "memory": memory}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
