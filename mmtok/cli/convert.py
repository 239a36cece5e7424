"""``mmtok convert``: turn checkpoints from elsewhere into mmtok folders (config.json + model.safetensors).

    mmtok convert mae --input mae_pretrain_vit_base.pth --out checkpoints/mae_vit_base
    mmtok convert vitmae --input checkpoints/vit-mae-base --out checkpoints/mae_vit_base_hf
    mmtok convert videomae --input checkpoints/videomae-base --out checkpoints/videomae_base_hf
    mmtok convert clip-hf --src runs/fashion_clip/export --out checkpoints/fashion_clip_hf

``mae`` reads an official MAE file (facebookresearch/mae) with ``torch.load(weights_only=True)``: tensors and plain
containers only, never pickled code. ``vitmae`` reads a transformers ``ViTMAEForPreTraining`` folder (safetensors),
``videomae`` a transformers ``VideoMAEForPreTraining`` (or ``VideoMAEModel``) folder. The output folder loads with
``mmtok.hub.from_pretrained(out)``; image encoders also with ``mmtok.api.load_encoder(out)`` and as an MLLM tower
``{"name": "mmtok_vit", "path": out}``. Mistakes get one line and exit status 2.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str]) -> int:
    if argv[:1] == ["clip-hf"]:  # an open_clip CLIP folder -> a transformers CLIPModel folder (its own options)
        from mmtok.clip.hf_export import main as clip_hf

        return clip_hf(argv[1:])
    p = argparse.ArgumentParser(
        prog="mmtok convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "source",
        choices=["mae", "vitmae", "videomae", "clip-hf"],
        help="mae: official MAE .pth; vitmae / videomae: transformers ViTMAE / VideoMAE folder; clip-hf: the clip "
        "task's open_clip export to a transformers CLIPModel (`mmtok convert clip-hf --help`)",
    )
    p.add_argument("--input", required=True, help="checkpoint file (mae) or folder (vitmae, videomae)")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--num-heads", type=int, default=0, help="mae: encoder heads (default width // 64)")
    p.add_argument("--decoder-heads", type=int, default=0, help="mae: decoder heads (default width // 32)")
    p.add_argument(
        "--mean", type=float, nargs="+", default=None, help="mae: image mean per channel (default ImageNet's)"
    )
    p.add_argument("--std", type=float, nargs="+", default=None, help="mae: image std per channel (default ImageNet's)")
    p.add_argument(
        "--no-norm-pix-loss", action="store_true", help="mae: targets are raw pixels (MAE's 'visualize' files)"
    )
    args = p.parse_args(argv)

    from mmtok.hub import CheckpointError
    from mmtok.mim import convert

    try:
        if args.source == "mae":
            kwargs = {"num_heads": args.num_heads, "decoder_heads": args.decoder_heads}
            kwargs["norm_pix_loss"] = not args.no_norm_pix_loss
            if args.mean:
                kwargs["mean"] = args.mean
            if args.std:
                kwargs["std"] = args.std
            model, out = convert.convert_mae_checkpoint(args.input, args.out, **kwargs)
        else:
            load = convert.load_hf_videomae if args.source == "videomae" else convert.load_hf_vitmae
            model = load(args.input)
            out = model.save_pretrained(args.out)
    except (CheckpointError, OSError, ValueError, KeyError) as e:
        msg = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        print(f"mmtok convert {args.source}: {msg}", file=sys.stderr)
        return 2
    c = model.config
    kind = "MAE (encoder + decoder)" if hasattr(model, "decoder_blocks") else "ViT encoder"
    clips = f", {c.num_frames} frames, tubelet {c.tubelet_size}" if c.num_frames > 1 or c.tubelet_size > 1 else ""
    print(
        f"wrote {out}: {kind}, width {c.embed_dim}, depth {c.depth}, heads {c.num_heads}, "
        f"{c.img_size} px, patch {c.patch_size}{clips}"
    )
    return 0
