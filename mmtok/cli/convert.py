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
        return _clip_hf(argv[1:])
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


def _clip_hf(argv: list[str]) -> int:
    """``mmtok convert clip-hf --src OPEN_CLIP_FOLDER --out FOLDER``; mistakes get one line and exit status 2."""
    import json

    from mmtok.clip.hf_export import export_clip_hf
    from mmtok.clip.tasks import ClipConfigError

    p = argparse.ArgumentParser(
        prog="mmtok convert clip-hf",
        description="Write an exported open_clip CLIP folder (the clip task's export/) as a transformers CLIPModel "
        "folder (config.json + model.safetensors, vision_model/ for the MLLM's hf_clip tower, tokenizer, "
        "preprocessor_config.json).",
    )
    p.add_argument(
        "--src", required=True, help="open_clip folder (open_clip_config.json + open_clip_model.safetensors)"
    )
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    args = p.parse_args(argv)
    try:
        res = export_clip_hf(args.src, args.out)
    except (ClipConfigError, OSError, KeyError) as e:
        print(f"mmtok convert clip-hf: {e}", file=sys.stderr)
        return 2
    v, t = res.config.vision_config, res.config.text_config
    print(
        f"wrote {res.out}: CLIPModel, vision {v.num_hidden_layers}x{v.hidden_size} ({v.image_size} px, patch "
        f"{v.patch_size}), text {t.num_hidden_layers}x{t.hidden_size} (context {t.max_position_embeddings}), "
        f"embed {res.config.projection_dim}; max abs diff to open_clip: image {res.image_max_abs:.2e}, text "
        f"{res.text_max_abs:.2e}; tokenizer {'written' if res.tokenizer else 'not written'}"
    )
    # the tower reads the whole folder (its vision half) and the mean/std of its preprocessor_config.json
    print("MLLM tower: " + json.dumps({"name": "hf_clip", "path": str(res.out)}))
    return 0
