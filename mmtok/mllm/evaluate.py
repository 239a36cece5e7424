"""``mmtok eval mllm``: answer accuracy of an MLLM on a held-out VQA split, under every pruner.

Greedy answers are compared with the reference answers after normalisation (lower case, single spaces);
accuracy is reported overall and per question type, and for each (method, keep) as a fraction of the
unpruned accuracy (retention).

    mmtok eval mllm --model runs/mllm_fashion_vqa/export --data 'data/fashion-vqa/test-*.tar' --keeps 192 128 64

Every (method, keep) builds a fresh pruner and runs the whole split; nothing is cached between rows. Two methods
can still print the same accuracy: the table therefore also gives ``changed`` (share of answers that differ from
the unpruned ones) and, below it, how much the kept token sets of each pair of methods overlap and whether their
answers were identical. Identical answers from keep sets that differ mean the model's answers do not depend on
*which* of those tokens are kept (e.g. a pruner at the input of the last layer of a 3-layer LLM leaves the answer
to the two layers that saw every token); identical keep sets mean the methods agree on this model.

Merging methods (``tome``, ``pitome``: kind ``merge``) are rows like the others; their "keep set" is the slots of
their merged tokens. ``--tower-r R`` adds rows ``tower_tome_rR`` / ``tower_pitome_rR``: every image token reaches the
LLM, but the vision tower merges ``R`` tokens in each block (:mod:`mmtok.mllm.pruning.tower_merge`).

``--blind`` adds the blind baseline: the same model, unpruned, shown an all-black canvas instead of each scene (the
question alone). It is what a model answers from the question's prior (e.g. "yes" to every "is there" question), per
question type; each row then also gets ``above_blind`` = (acc - blind) / (unpruned - blind), the share of what the
image adds that survives pruning. ``--methods`` with no name evaluates the unpruned model (and blind) only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

DEFAULT_METHODS = ["random", "pool", "cls_attention", "vtc_cls", "fastv", "dart", "tome", "pitome"]


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
    """Exact-match accuracy of greedy answers.

    Returns:
        ``{"acc", "n", "seconds", "by_type": {qtype: acc}, "answers": [str] * n, "keeps": [[int] * K] * n | None}``;
        ``keeps`` are the sorted image-token indices each sample kept (None without a pruner).
    """
    from mmtok.mllm.data import normalise_answer
    from mmtok.mllm.text import chat_prompt, decode_answers, encode_prompts

    tok = model.tokenizer
    if tok is None:
        raise ValueError("the model has no tokenizer; it cannot answer text questions")
    right: dict[str, list[int]] = {}
    answers: list[str] = []
    keeps: list[list[int]] = []
    t0 = time.perf_counter()
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        ids, att = encode_prompts(tok, [chat_prompt(tok, s["question"]) for s in chunk], model.device)
        images = torch.stack([s["image"] for s in chunk])
        gen = model.generate(
            ids, images, att, pruner=pruner, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id
        )
        if gen.image_keep is not None:
            keeps.extend(gen.image_keep.tolist())
        for s, a in zip(chunk, decode_answers(tok, gen.sequences)):
            answers.append(normalise_answer(a))
            right.setdefault(s["qtype"], []).append(int(answers[-1] == normalise_answer(s["answer"])))
    flat = [x for v in right.values() for x in v]
    return {
        "acc": sum(flat) / len(flat),
        "n": len(flat),
        "seconds": time.perf_counter() - t0,
        "by_type": {k: sum(v) / len(v) for k, v in sorted(right.items())},
        "answers": answers,
        "keeps": keeps or None,
    }


def blind_samples(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same samples with every image replaced by an all-black one (same shape): the blind baseline's input."""
    return [{**s, "image": torch.zeros_like(s["image"])} for s in samples]


def keep_overlap(a: list[list[int]] | None, b: list[list[int]] | None) -> float:
    """Mean Jaccard overlap of two methods' per-sample keep sets (1.0 = identical; None = all kept)."""
    if a is None or b is None:
        return 1.0 if a is b else float("nan")
    scores = [len(set(x) & set(y)) / max(len(set(x) | set(y)), 1) for x, y in zip(a, b)]
    return sum(scores) / max(len(scores), 1)


def retention_table(
    model,
    samples,
    methods: list[str],
    keeps: list[int],
    batch_size: int = 16,
    tower_rs: tuple[int, ...] = (),
    blind: bool = False,
) -> dict[str, Any]:
    """Accuracy for every (method, keep) plus the unpruned reference, and retention = acc / unpruned acc.

    Each row also has ``changed`` (share of answers that differ from the unpruned answers); ``pairs`` compares the
    methods of each budget two by two (keep-set overlap, identical answers). ``tower_rs``: also one row per in-tower
    merging method (ToMe, PiToMe) and tokens merged per tower block ``r``, with no pruning before the LLM.
    ``blind``: also the blind baseline (see :func:`blind_samples`), as ``table["blind"]`` (``acc``, ``by_type``,
    ``answers``; printed as a row with keep 0 that is not in ``rows``), and ``above_blind`` in every row.
    """
    from mmtok import registries

    base = answer_accuracy(model, samples, None, batch_size)
    types = list(base["by_type"])
    print_header(types)
    rows = [{"method": "none", "keep": model.num_image_tokens, **base, "retention": 1.0, "changed": 0.0}]
    print_row(rows[0], types)
    blind_res = None
    if blind:
        blind_res = answer_accuracy(model, blind_samples(samples), None, batch_size)
        changed = sum(a != b for a, b in zip(blind_res["answers"], base["answers"])) / len(base["answers"])
        blind_res = {**blind_res, "retention": blind_res["acc"] / max(base["acc"], 1e-9), "changed": changed}
        print_row({"method": "blind", "keep": 0, **blind_res}, types)
    pairs = []
    for keep in keeps:
        at_budget = []
        for m in methods:
            pruner = registries.get("pruner").create(m, num_keep=keep)  # a fresh pruner for every row
            res = answer_accuracy(model, samples, pruner, batch_size)
            changed = sum(a != b for a, b in zip(res["answers"], base["answers"])) / len(res["answers"])
            row = {
                "method": m,
                "keep": keep,
                "stage": pruner.stage,
                "kind": pruner.kind,
                "layer": pruner.layer if pruner.stage == "in_llm" else None,
                **res,
                "retention": res["acc"] / max(base["acc"], 1e-9),
                "changed": changed,
            }
            rows.append(row)
            at_budget.append(row)
            print_row(row, types)
        for a, b in itertools.combinations(at_budget, 2):
            pairs.append(
                {
                    "keep": keep,
                    "methods": [a["method"], b["method"]],
                    "keep_overlap": keep_overlap(a["keeps"], b["keeps"]),
                    "same_answers": a["answers"] == b["answers"],
                }
            )
    for r in tower_rs:
        from mmtok.mllm.pruning.tower_merge import TowerMergeConfig, merging_tower

        for method in ("tome", "pitome"):
            with merging_tower(model.tower, TowerMergeConfig(method=method, r=r)) as info:
                res = answer_accuracy(model, samples, None, batch_size)
            changed = sum(a != b for a, b in zip(res["answers"], base["answers"])) / len(res["answers"])
            row = {
                "method": f"tower_{method}_r{r}",
                "keep": model.num_image_tokens,
                "stage": "tower",
                "kind": "merge",
                "layer": None,
                "tower_tokens": [h.shape[1] for h in info["last"].hidden_states],
                **res,
                "retention": res["acc"] / max(base["acc"], 1e-9),
                "changed": changed,
            }
            rows.append(row)
            print_row(row, types)
    table = {"unpruned_acc": base["acc"], "n": base["n"], "question_types": types, "rows": rows, "pairs": pairs}
    if blind_res is not None:
        table["blind"] = {k: blind_res[k] for k in ("acc", "by_type", "answers", "seconds", "changed")}
        for r in rows:
            r["above_blind"] = above_blind(r["acc"], base["acc"], blind_res["acc"])
    return table


def above_blind(acc: float, unpruned: float, blind: float) -> float:
    """(acc - blind) / (unpruned - blind): the share of the image's contribution a pruned row keeps (nan if none)."""
    return (acc - blind) / (unpruned - blind) if unpruned > blind else float("nan")


def print_header(types: list[str]) -> None:
    cols = " ".join(f"{t[:10]:>10s}" for t in types)
    print(
        f"{'method':14s} {'keep':>5s} {'acc':>6s} {'retention':>9s} {'changed':>8s} {'seconds':>8s} | "
        f"accuracy per question type: {cols}",
        flush=True,
    )


def print_row(r: dict[str, Any], types: list[str]) -> None:
    cols = " ".join(f"{r['by_type'].get(t, float('nan')):10.2f}" for t in types)
    print(
        f"{r['method']:14s} {r['keep']:5d} {r['acc']:6.3f} {r['retention']:9.3f} {r['changed']:8.2f} "
        f"{r['seconds']:8.1f} | {'':28s}{cols}",
        flush=True,
    )


def explain_ties(model, table: dict[str, Any]) -> list[str]:
    """One line per pair of methods whose answers were identical, saying whether their keep sets were too."""
    lines = []
    n_layers = int(model.llm.config.num_hidden_layers)
    rows = {(r["method"], r["keep"]): r for r in table["rows"]}
    for p in table["pairs"]:
        if not p["same_answers"]:
            continue
        a, b = p["methods"]
        why = ""
        late = [m for m in (a, b) if rows[(m, p["keep"])]["layer"] and n_layers - rows[(m, p["keep"])]["layer"] <= 1]
        if late:
            why = f"; {', '.join(late)} prune(s) only the last of the LLM's {n_layers} layers"
        if p["keep_overlap"] >= 0.999:
            lines.append(f"{a} and {b} at keep {p['keep']}: the same tokens kept for every sample, so the same answers")
        else:
            lines.append(
                f"{a} and {b} at keep {p['keep']}: identical answers although their keep sets overlap only "
                f"{p['keep_overlap']:.0%} on average: the answers do not depend on which of these tokens are kept{why}"
            )
    return lines


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="mmtok eval mllm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="mmtok MLLM folder or HF llava folder")
    p.add_argument("--data", required=True, help="shard pattern of the held-out split (json: question, answer)")
    p.add_argument("--methods", nargs="*", default=DEFAULT_METHODS, help="pruners (none given: unpruned only)")
    p.add_argument("--keeps", type=int, nargs="+", default=[192, 128, 64])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N samples only")
    p.add_argument(
        "--tower-r",
        type=int,
        nargs="*",
        default=[],
        help="also evaluate in-tower ToMe/PiToMe merging with these tokens merged per tower block",
    )
    p.add_argument(
        "--blind", action="store_true", help="also the blind baseline: the unpruned model shown a black canvas"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default="", help="write the table here")
    args = p.parse_args(argv)
    from mmtok import registries
    from mmtok.api import InputError, load_mllm

    known = registries.get("pruner").list()
    unknown = [m for m in args.methods if m not in known]
    if unknown:
        print(
            f"mmtok eval mllm: unknown method(s) {', '.join(unknown)}; choose from {', '.join(known)}", file=sys.stderr
        )
        return 2
    if any(k < 1 for k in args.keeps) or args.batch_size < 1:
        print("mmtok eval mllm: --keeps and --batch-size must be integers >= 1", file=sys.stderr)
        return 2
    if any(r < 1 for r in args.tower_r):
        print(
            "mmtok eval mllm: --tower-r values must be integers >= 1 (tokens merged per tower block)", file=sys.stderr
        )
        return 2
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    try:
        model = load_mllm(args.model, device).model
        samples = load_eval_set(args.data, args.limit)
    except (InputError, OSError, ValueError, KeyError) as e:
        print(f"mmtok eval mllm: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    n = model.num_image_tokens
    keeps = sorted({min(k, n) for k in args.keeps}, reverse=True)
    for k in args.keeps:
        if k > n:
            print(f"note: --keeps {k} is more than the {n} image tokens: evaluated as {n}")
    print(f"{len(samples)} samples, {n} image tokens per image; 'changed' = share of answers unlike the unpruned ones")
    if not args.methods:
        keeps = []
    table = retention_table(model, samples, args.methods, keeps, args.batch_size, tuple(args.tower_r), args.blind)
    if "blind" in table:
        types = table["question_types"]
        gap = ", ".join(
            f"{t} {table['rows'][0]['by_type'][t]:.3f} vs {table['blind']['by_type'][t]:.3f}" for t in types
        )
        print(f"unpruned vs blind per question type: {gap}")
    for line in explain_ties(model, table):
        print(f"note: {line}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        # per-sample keep sets stay out of the file (576 indices x samples x rows); answers and overlaps stay in
        rows = [{k: v for k, v in r.items() if k != "keeps"} for r in table["rows"]]
        Path(args.json).write_text(json.dumps({**table, "rows": rows}, indent=2))
    return 0
