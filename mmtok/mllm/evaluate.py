"""``mmtok eval mllm``: answer accuracy of an MLLM on a held-out VQA split, under every pruner.

Greedy answers are compared with the reference answers after normalisation (lower case, single spaces);
accuracy is reported overall and per question type, and for each (method, keep) as a fraction of the
unpruned accuracy (retention).

    mmtok eval mllm --model runs/mllm_fashion_vqa/export --data 'data/fashion-vqa/test-*.tar' --keeps 192 128 64
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

DEFAULT_METHODS = ["random", "pool", "cls_attention", "vtc_cls", "fastv", "dart"]


def load_eval_set(pattern: str, limit: int = 0) -> list[dict[str, Any]]:
    """Decoded samples with ``image``, ``question``, ``answer``, ``qtype`` from shards."""
    from mmtok.data import ShardDataset

    out = []
    for s in ShardDataset(pattern, on_error="raise"):
        meta = s["json"]
        out.append(
            {
                "image": s["image"],
                "question": meta["question"],
                "answer": meta["answer"],
                "qtype": meta.get("qtype", ""),
            }
        )
        if limit and len(out) >= limit:
            break
    if not out:
        raise ValueError(f"no samples in {pattern!r}")
    return out


@torch.no_grad()
def answer_accuracy(
    model, samples: list[dict[str, Any]], pruner=None, batch_size: int = 16, max_new_tokens: int = 6
) -> dict[str, Any]:
    """Exact-match accuracy of greedy answers: ``{"acc": float, "by_type": {...}, "n": int, "seconds": float}``."""
    from mmtok.mllm.data import normalise_answer
    from mmtok.mllm.text import chat_prompt, decode_answers, encode_prompts

    tok = model.tokenizer
    if tok is None:
        raise ValueError("the model has no tokenizer; it cannot answer text questions")
    right: dict[str, list[int]] = {}
    t0 = time.perf_counter()
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        ids, att = encode_prompts(tok, [chat_prompt(tok, s["question"]) for s in chunk], model.device)
        images = torch.stack([s["image"] for s in chunk])
        gen = model.generate(
            ids, images, att, pruner=pruner, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id
        )
        for s, a in zip(chunk, decode_answers(tok, gen.sequences)):
            right.setdefault(s["qtype"], []).append(int(normalise_answer(a) == normalise_answer(s["answer"])))
    flat = [x for v in right.values() for x in v]
    return {
        "acc": sum(flat) / len(flat),
        "n": len(flat),
        "seconds": time.perf_counter() - t0,
        "by_type": {k: sum(v) / len(v) for k, v in sorted(right.items())},
    }


def retention_table(model, samples, methods: list[str], keeps: list[int], batch_size: int = 16) -> dict[str, Any]:
    """Accuracy for every (method, keep) plus the unpruned reference, and retention = acc / unpruned acc."""
    from mmtok import registries

    base = answer_accuracy(model, samples, None, batch_size)
    rows = [{"method": "none", "keep": model.num_image_tokens, **base, "retention": 1.0}]
    print_row(rows[0])
    for keep in keeps:
        for m in methods:
            res = answer_accuracy(model, samples, registries.get("pruner").create(m, num_keep=keep), batch_size)
            row = {"method": m, "keep": keep, **res, "retention": res["acc"] / max(base["acc"], 1e-9)}
            rows.append(row)
            print_row(row)
    return {"unpruned_acc": base["acc"], "n": base["n"], "rows": rows}


def print_row(r: dict[str, Any]) -> None:
    types = " ".join(f"{k}={v:.2f}" for k, v in r["by_type"].items())
    print(
        f"{r['method']:14s} {r['keep']:5d} acc={r['acc']:.3f} retention={r['retention']:.3f} "
        f"({r['seconds']:.1f}s) {types}",
        flush=True,
    )


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="mmtok eval mllm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="mmtok MLLM folder or HF llava folder")
    p.add_argument("--data", required=True, help="shard pattern of the held-out split (json: question, answer)")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--keeps", type=int, nargs="+", default=[192, 128, 64])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N samples only")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default="", help="write the table here")
    args = p.parse_args(argv)
    from mmtok.mllm.modeling import MLLM

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    try:
        model = MLLM.from_pretrained(args.model).to(device).eval()
        samples = load_eval_set(args.data, args.limit)
    except (OSError, ValueError) as e:
        print(f"mmtok eval mllm: {e}", file=sys.stderr)
        return 2
    print(f"{len(samples)} samples, {model.num_image_tokens} image tokens per image")
    table = retention_table(model, samples, args.methods, args.keeps, args.batch_size)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(table, indent=2))
    return 0
