"""``mmtok prune``: answer a prompt about an image with visual-token pruning, and time it against no pruning.

    mmtok prune --model runs/mllm_fashion_vqa/export --method dart --keep 64 --image scene.png \\
        --prompt "how many items are there ?"

Prints the pruned and unpruned answers, the image tokens kept, the prefill and total times of both (median of
``--repeats`` interleaved runs after one untimed warm-up, with the spread of the per-run ratios) and the FLOP
ratio of the two prefills beside the wall-clock ratio. The FLOP ratio does not depend on the machine's load; the
wall-clock ratio does, and on a tiny model fixed per-call costs (Python, kernel launches) hide the FLOPs saved.
Notes say why a speed-up is bounded: pruning at a layer near the end of a shallow LLM, or a vision tower that
dominates the prefill (pruning the LLM's input never shortens the tower; ``--tower-r`` merging does).

Merging methods (``--method tome`` or ``pitome``, kind ``merge`` in ``mmtok list pruners``) merge the image tokens
into ``--keep`` groups instead of dropping the rest; the output says how many patches the largest group covers.
``--tower-r R`` also merges ``R`` tokens in every block of the vision tower (ToMe, or PiToMe with
``--method pitome``; timm and mmtok ViT towers), which shortens the tower too:

    mmtok prune --model runs/mllm_fashion_vqa/export --method pitome --keep 64 --tower-r 48 --image scene.png \
        --prompt "how many items are there ?"

Input the model adapts (words its tokenizer does not know, a ``--keep`` above the image-token count, an image
resized to the tower's size) is reported with one ``note:`` line each; input it cannot take (an unknown method, a
damaged model folder, an unreadable or oversized image, a prompt with ``<image>`` or over the length cap, a
``--layer`` outside the LLM) is one ``mmtok prune:`` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any


def load_image(path: str):
    """An image file -> float ``[1, 3, H, W]`` in [0, 1] (16-bit PNGs scaled, oversized images refused)."""
    from mmtok.api import load_image as load

    return load(path)[None]


def _attention_counted() -> bool:
    """Does FlopCounterMode see SDPA here (many CPU kernels are invisible to it)?"""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    q = torch.randn(1, 2, 16, 8)
    with FlopCounterMode(display=False) as fc:
        torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=torch.zeros(1, 1, 16, 16))
    return fc.get_total_flops() > 0


def prefill_flops(
    model: Any, ids: Any, att: Any, image: Any, pruner: Any, tower_info: dict | None = None
) -> dict[str, float]:
    """FLOPs of one prefill (tower + projector + LLM + last-token logits): ``{"total", "tower"}``.

    Counted with ``torch.utils.flop_counter``; attention products (``QK^T`` and ``AV``: ``4 B D L_q L_k`` per
    layer) are added by formula where the counter cannot see the fused kernel; ``tower_info`` (from
    :func:`~mmtok.mllm.pruning.tower_merge.merging_tower`) gives the tower's merged lengths per block for it.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, torch.no_grad():
        out = model.generate(ids, image, att, pruner=pruner, max_new_tokens=1)
    total = float(fc.get_total_flops())
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model.encode_images(image)
    tower = float(fc.get_total_flops())
    if not _attention_counted():
        b, full = ids.shape[0], ids.shape[1] - 1 + model.num_image_tokens
        cfg = model.llm.config
        k_layer = pruner.layer if pruner is not None and pruner.stage == "in_llm" else 0
        lens = [full if i < k_layer else out.prefill_length for i in range(cfg.num_hidden_layers)]
        total += sum(4.0 * b * cfg.hidden_size * n * n for n in lens)
        t = model.tower.num_patches + model.tower.num_prefix_tokens
        lengths = [t] * model.tower.num_layers  # tokens each block's attention runs on
        if tower_info and "last" in tower_info:  # a merging tower: block i attends over the input of block i
            lengths = [h.shape[1] for h in tower_info["last"].hidden_states[:-1]]
        tower_attn = sum(4.0 * b * model.tower.hidden_size * n * n for n in lengths)
        total += tower_attn
        tower += tower_attn
    return {"total": total, "tower": tower}


def speed_notes(model: Any, pruner: Any, flops: dict[str, dict[str, float]], prefill_ms: float, ratios: list[float]):
    """One-line explanations of a speed-up that is bounded or noisy (see the module docstring)."""
    notes = []
    n_layers = int(model.llm.config.num_hidden_layers)
    if pruner is not None and pruner.stage == "in_llm":
        after = n_layers - pruner.layer
        if after / n_layers < 0.5:
            notes.append(
                f"pruning at layer {pruner.layer} of this {n_layers}-layer LLM: only the last {after} layer(s) run on "
                f"fewer tokens, so at most {after / n_layers:.0%} of the LLM's work can be saved"
            )
    base = flops["unpruned"]
    share = base["tower"] / max(base["total"], 1.0)
    if share >= 0.3:
        notes.append(
            f"the vision tower is {share:.0%} of the unpruned prefill FLOPs and pruning the LLM's input never "
            f"shortens it: the prefill speed-up cannot exceed {1 / share:.2f}x (merging in the tower, --tower-r, does)"
        )
    if prefill_ms < 20:
        notes.append(
            f"the prefill takes only {prefill_ms:.1f} ms: fixed per-call costs (Python, kernel launches) weigh as much "
            "as the FLOPs saved, so the wall-clock ratio trails the FLOP ratio; on a large model they converge"
        )
    if len(ratios) > 1 and max(ratios) / max(min(ratios), 1e-9) > 1.25:
        notes.append(
            f"per-run prefill ratios range {min(ratios):.2f}x..{max(ratios):.2f}x (machine load); the median is shown, "
            "raise --repeats for a steadier figure"
        )
    return notes


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="mmtok prune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="mmtok MLLM folder or HF llava folder")
    p.add_argument(
        "--method",
        default="dart",
        help="pruner: dart, fastv, cls_attention, vtc_cls, random, pool (select) or tome, pitome (merge)",
    )
    p.add_argument("--keep", type=int, default=64, help="image tokens kept")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--prompt", required=True, help="question about the image (without <image>)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per setting after a warm-up (median reported)")
    p.add_argument("--layer", type=int, default=0, help="LLM layer K for in-LLM methods (0 = the method's default)")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    p.add_argument(
        "--tower-r", type=int, default=0, help="also merge this many tokens in every vision-tower block (0 = off)"
    )
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)

    import contextlib

    import torch

    from mmtok.api import InputError, load_mllm
    from mmtok.mllm.pruning import PruningError
    from mmtok.mllm.pruning.tower_merge import TowerMergeConfig, merging_tower
    from mmtok.mllm.text import decode_answers

    try:
        if args.max_new_tokens < 1 or args.repeats < 1:
            raise InputError("--max-new-tokens and --repeats must be at least 1")
        if args.tower_r < 0:
            raise InputError("--tower-r must be >= 0 (tokens merged in every vision-tower block)")
        device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        )
        pipe = load_mllm(args.model, device)
        notes = pipe.check_text(args.prompt, "prompt")
        pruner, more = pipe.make_pruner(args.method, args.keep, args.layer)
        if pruner is None:
            raise InputError("--method none prunes nothing; pick a method to compare against no pruning")
        image, resized = pipe.prepare_image(args.image)
        ids, att = pipe.encode(args.prompt)
    except InputError as e:
        print(f"mmtok prune: {e}", file=sys.stderr)
        return 2
    notes = notes + [m.replace("keep ", "--keep ", 1) for m in more] + resized
    for line in notes:
        print(f"note: {line}")
    model, tok = pipe.model, pipe.model.tokenizer
    image = image.to(device)
    tower_cfg = TowerMergeConfig(method="pitome" if args.method == "pitome" else "tome", r=args.tower_r)
    tower_info: dict[str, Any] = {}

    def tower_merging(pr):
        """In-tower merging around the pruned runs only (the unpruned reference runs the plain tower)."""
        if pr is None or not args.tower_r:
            return contextlib.nullcontext({})
        return merging_tower(model.tower, tower_cfg)

    def run(pr):
        with tower_merging(pr) as info:
            out = model.generate(
                ids, image, att, pruner=pr, max_new_tokens=args.max_new_tokens, eos_token_id=tok.eos_token_id
            )
        tower_info.update(info)
        return out

    try:
        run(pruner)  # fails here, with one line, on a tower the in-tower merging cannot run
    except PruningError as e:
        print(f"mmtok prune: {e}", file=sys.stderr)
        return 2

    run(None), run(pruner)  # warm-up: first calls pay for allocations and lazy initialisation
    runs: dict[str, list] = {"pruned": [], "unpruned": []}
    for _ in range(args.repeats):
        for name, pr in (("unpruned", None), ("pruned", pruner)):  # interleaved, so load drifts hit both
            runs[name].append(run(pr))
    outs = {k: v[-1] for k, v in runs.items()}
    ans = {k: decode_answers(tok, v.sequences)[0] for k, v in outs.items()}
    pre = {k: statistics.median(o.prefill_seconds for o in v) * 1e3 for k, v in runs.items()}
    tot = {k: statistics.median(o.total_seconds for o in v) * 1e3 for k, v in runs.items()}
    ratios = [u.prefill_seconds / max(q.prefill_seconds, 1e-12) for u, q in zip(runs["unpruned"], runs["pruned"])]
    n = model.num_image_tokens
    where = f", layer {pruner.layer} of {model.llm.config.num_hidden_layers}" if pruner.stage == "in_llm" else ""
    print(f"method: {args.method} ({pruner.stage}{where})")
    print(f"answer (pruned):   {ans['pruned']}")
    print(f"answer (unpruned): {ans['unpruned']}")
    print(f"image tokens kept: {outs['pruned'].image_tokens_kept} of {n}")
    merged = getattr(pruner, "last_result", None)
    if merged is not None:
        print(
            f"merged groups: {merged.sizes.shape[1]}; the largest covers {int(merged.sizes.max())} of {n} patches, "
            f"{int((merged.sizes == 1).sum())} tokens were left alone"
        )
    if "last" in tower_info:
        t_out = tower_info["last"].hidden_states[-1].shape[1]
        t_in = tower_info["last"].hidden_states[0].shape[1]
        print(f"vision tower: {t_in} -> {t_out} tokens ({args.tower_r} merged per block, {tower_cfg.method})")
    print(
        f"prefill: {pre['pruned']:.1f} ms pruned vs {pre['unpruned']:.1f} ms unpruned "
        f"(median of {args.repeats} interleaved runs after a warm-up)"
    )
    speed = (
        f"prefill speed-up: {pre['unpruned'] / pre['pruned']:.2f}x wall clock "
        f"(runs {min(ratios):.2f}x..{max(ratios):.2f}x)"
    )
    flops = None
    if not args.no_flops:
        flops = {}
        for k, pr in (("unpruned", None), ("pruned", pruner)):
            with tower_merging(pr) as info:
                flops[k] = prefill_flops(model, ids, att, image, pr, info)
        f_pru, f_unp = flops["pruned"]["total"], flops["unpruned"]["total"]
        speed += (
            f" | {f_unp / f_pru:.2f}x by FLOPs ({f_pru / 1e9:.3f} vs {f_unp / 1e9:.3f} GFLOP; vision tower "
            f"{flops['unpruned']['tower'] / f_unp:.0%} of the unpruned prefill)"
        )
    print(speed)
    print(
        f"total ({args.max_new_tokens} new tokens max): {tot['pruned']:.1f} ms vs {tot['unpruned']:.1f} ms "
        f"({tot['unpruned'] / tot['pruned']:.2f}x; decoding steps gain little once the KV cache is built)"
    )
    if flops is not None:
        for line in speed_notes(model, pruner, flops, pre["unpruned"], ratios):
            print(f"note: {line}")
    return 0
