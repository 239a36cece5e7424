"""``mmtok segment``: segment the object an expression refers to, with any head, optionally under pruning.

    mmtok segment --model runs/quickstart/seg/export --image runs/quickstart/scene64.png --expression "the pullover" \\
        [--head text|allmask|segtoken] [--prune dart --keep 64] [--refine bilinear] --out mask.png

Writes the mask PNG (0/255) and an overlay PNG beside it (``mask.overlay.png``), and prints the descriptor text
(text head), the time to the mask and the decode repairs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

MAX_EXPRESSION_CHARS = 500


def overlay(image, mask, colour=(255, 60, 40), alpha: float = 0.5):
    """``image [H, W, 3]`` uint8 with ``mask [H, W]`` bool tinted -> PIL image (the demo and eval grids use it)."""
    import numpy as np
    from PIL import Image

    img = np.asarray(image, dtype=np.float32)
    m = np.asarray(mask, dtype=bool)[..., None]
    out = np.where(m, img * (1 - alpha) + np.asarray(colour, np.float32) * alpha, img)
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="mmtok segment", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="an MLLM folder with segmentation heads (mmtok train mllm_seg)")
    p.add_argument("--image", required=True, help="image file (PNG/JPEG)")
    p.add_argument("--expression", required=True, help='what to segment, e.g. "the red sneaker on the left"')
    p.add_argument("--head", default="", help="text | allmask | segtoken (default: the model's first head)")
    p.add_argument("--prune", default="", help="a pruner name (mmtok list pruners), e.g. dart")
    p.add_argument("--keep", type=int, default=64, help="image tokens kept when --prune is set")
    p.add_argument("--refine", default="bilinear", help="none | bilinear | guided")
    p.add_argument("--threshold", type=float, default=0.5, help="mask = refined score > threshold, in (0, 1)")
    p.add_argument("--out", default="mask.png", help="mask PNG to write (the overlay goes beside it)")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    expr = " ".join(args.expression.split())
    if not expr:
        print("mmtok segment: --expression is empty: say what to segment", file=sys.stderr)
        return 2
    if len(expr) > MAX_EXPRESSION_CHARS:
        print(
            f"mmtok segment: --expression is {len(expr)} characters; the limit is {MAX_EXPRESSION_CHARS}",
            file=sys.stderr,
        )
        return 2
    if args.prune and args.keep <= 0:
        print("mmtok segment: --keep must be > 0 image tokens", file=sys.stderr)
        return 2

    import numpy as np
    import torch

    from mmtok.mllm.modeling import MLLM
    from mmtok.mllm.pruning.cli import load_image

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    try:
        image = load_image(args.image)
    except (OSError, ValueError) as e:
        print(f"mmtok segment: cannot read image {args.image}: {e}", file=sys.stderr)
        return 2
    try:
        model = MLLM.from_pretrained(args.model).to(device).eval()
    except (OSError, ValueError, KeyError) as e:
        print(f"mmtok segment: cannot load model {args.model}: {e}", file=sys.stderr)
        return 2
    if not model.seg_heads:
        print(f"mmtok segment: {args.model} has no segmentation heads; train one with mllm_seg", file=sys.stderr)
        return 2
    try:
        res = model.segment(
            image,
            [expr],
            head=args.head,
            prune=args.prune or None,
            keep=args.keep,
            refine=args.refine,
            threshold=args.threshold,
        )
    except ValueError as e:
        print(f"mmtok segment: {e}", file=sys.stderr)
        return 2
    from PIL import Image

    mask = res.masks[0].numpy()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((mask * 255).astype(np.uint8)).save(out)
    rgb = (image[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    ov = out.with_name(out.stem + ".overlay.png")
    overlay(rgb, mask).save(ov)
    head = args.head or next(iter(model.seg_heads))
    if res.text is not None:
        print(res.text[0])
    kept = (
        f", {res.image_keep.shape[1]} of {model.num_image_tokens} image tokens kept"
        if res.image_keep is not None
        else ""
    )
    print(f"head: {head}{kept}; mask area {int(mask.sum())} px of {mask.size}")
    print(f"time to mask: {res.seconds * 1e3:.1f} ms; decode repairs: {res.repairs[0]}")
    print(f"wrote {out} and {ov}")
    return 0
