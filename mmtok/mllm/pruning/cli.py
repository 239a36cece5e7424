"""``mmtok prune``: answer a prompt about an image with visual-token pruning, and time it against no pruning.

    mmtok prune --model runs/mllm_fashion_vqa/export --method dart --keep 64 --image scene.png \\
        --prompt "how many items are there ?"

Prints the pruned and unpruned answers, the image tokens kept, and the prefill time of both (median of
``--repeats`` interleaved runs).
"""

from __future__ import annotations

import argparse
import statistics
import sys


def load_image(path: str):
    """An image file -> float ``[1, 3, H, W]`` in [0, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def main(argv: list[str]) -> int:
    from mmtok import registries

    methods = registries.get("pruner").list()
    p = argparse.ArgumentParser(
        prog="mmtok prune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="mmtok MLLM folder or HF llava folder")
    p.add_argument("--method", default="dart", choices=methods)
    p.add_argument("--keep", type=int, default=64, help="image tokens kept")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--prompt", required=True, help="question about the image")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per setting (median reported)")
    p.add_argument("--layer", type=int, default=0, help="LLM layer K for in-LLM methods (0 = the method's default)")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)

    import torch

    from mmtok.mllm.modeling import MLLM
    from mmtok.mllm.text import chat_prompt, decode_answers, encode_prompts

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    try:
        model = MLLM.from_pretrained(args.model).to(device).eval()
        image = load_image(args.image)
    except (OSError, ValueError) as e:
        print(f"mmtok prune: {e}", file=sys.stderr)
        return 2
    if model.tokenizer is None:
        print("mmtok prune: the model folder has no tokenizer", file=sys.stderr)
        return 2
    overrides = {"num_keep": args.keep}
    if args.layer:
        overrides["layer"] = args.layer
    try:
        pruner = registries.get("pruner").create(args.method, **overrides)
    except Exception as e:  # unknown key (e.g. --layer for a pre-LLM method) -> say so
        print(f"mmtok prune: {e}", file=sys.stderr)
        return 2
    tok = model.tokenizer
    ids, att = encode_prompts(tok, [chat_prompt(tok, args.prompt)], device)
    runs: dict[str, list] = {"pruned": [], "unpruned": []}
    outs = {}
    for _ in range(max(1, args.repeats)):
        for name, pr in (("unpruned", None), ("pruned", pruner)):  # interleaved timing
            out = model.generate(
                ids, image, att, pruner=pr, max_new_tokens=args.max_new_tokens, eos_token_id=tok.eos_token_id
            )
            runs[name].append(out)
            outs[name] = out
    ans = {k: decode_answers(tok, v.sequences)[0] for k, v in outs.items()}
    pre = {k: statistics.median(o.prefill_seconds for o in v) * 1e3 for k, v in runs.items()}
    tot = {k: statistics.median(o.total_seconds for o in v) * 1e3 for k, v in runs.items()}
    n = model.num_image_tokens
    print(f"method: {args.method} ({pruner.stage}{', layer ' + str(pruner.layer) if pruner.stage == 'in_llm' else ''})")
    print(f"answer (pruned):   {ans['pruned']}")
    print(f"answer (unpruned): {ans['unpruned']}")
    print(f"image tokens kept: {outs['pruned'].image_tokens_kept} of {n}")
    print(
        f"prefill: {pre['pruned']:.1f} ms pruned vs {pre['unpruned']:.1f} ms unpruned "
        f"({pre['unpruned'] / pre['pruned']:.2f}x)"
    )
    print(
        f"total ({args.max_new_tokens} new tokens max): {tot['pruned']:.1f} ms vs {tot['unpruned']:.1f} ms "
        f"({tot['unpruned'] / tot['pruned']:.2f}x)"
    )
    return 0
