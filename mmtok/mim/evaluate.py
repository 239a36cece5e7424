"""``mmtok eval mim``: evaluate a masked-modeling model.

- Image encoders (a saved ``vit``/MAE folder or a run's ``export/``): linear probe on Fashion-MNIST
  (frozen mean-pooled final-norm features, standardised, a converged logistic regression with C tuned on
  a held-out part of train from a grid that brackets the optimum: :func:`mmtok.mim.probe.linear_probe`),
  optional short fine-tune, and for MAEs a reconstruction figure
  (rows: original / masked / reconstructed) as PNG.
- Video encoders: the same probe on moving-fashion clip labels from shards (``--video-train`` /
  ``--video-test``).
- MTM models: accuracy of hidden-code reconstruction at several mask ratios on token shards, and a
  grid of MaskGIT samples decoded to pixels with a tokenizer (``--tokenizer DIR``).

Results are printed as JSON and written with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmtok import hub, registries
from mmtok.mim.mae import MAE
from mmtok.mim.masking import MaskContext
from mmtok.mim.mtm import MTM
from mmtok.mim.probe import DEFAULT_CS, add_finetune_args
from mmtok.mim.vit import ViTEncoder

logger = logging.getLogger(__name__)


def load_model(path: str | Path) -> torch.nn.Module:
    """A MIM model folder, or a run folder / ``export`` folder holding ``mae``/``encoder``/``mtm``."""
    path = Path(path)
    for candidate in (path, path / "export" / "mae", path / "mae", path / "export" / "mtm", path / "mtm"):
        if (candidate / hub.CONFIG_NAME).is_file():
            return hub.from_pretrained(candidate, kind="mim model").eval()
    raise FileNotFoundError(
        f"{path} holds no MIM model: pass a folder written by save_pretrained (config.json + model.safetensors) "
        "or a run folder whose export/ has mae/ or mtm/"
    )


def _image_grid(rows: list[torch.Tensor], pad: int = 2) -> np.ndarray:
    """Rows of images ``[n, C, H, W]`` in [0, 1] -> uint8 HWC grid."""
    n, c, h, w = rows[0].shape
    out = np.ones(((h + pad) * len(rows) + pad, (w + pad) * n + pad, 3), dtype=np.uint8) * 255
    for r, imgs in enumerate(rows):
        for i, img in enumerate(imgs):
            arr = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            if arr.shape[2] == 1:
                arr = np.repeat(arr, 3, axis=2)
            y, x = pad + r * (h + pad), pad + i * (w + pad)
            out[y : y + h, x : x + w] = arr
    return out


def save_png(grid: np.ndarray, path: str | Path, scale: int = 1) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)
    return path


@torch.no_grad()
def recon_figure(
    mae: MAE, images: torch.Tensor, path: str | Path, masker: str = "random", mask_ratio: float = 0.75, seed: int = 0
) -> Path:
    """Save original / masked (hidden patches grey) / reconstructed rows for ``images [n, C, H, W]`` in [0, 1].

    Videos ``[n, C, T, H, W]`` show the first frame of each clip.
    """
    mk = registries.get("masker").create(masker, mask_ratio=mask_ratio)
    masks = mk(images.shape[0], MaskContext(grid=mae.grid_size, generator=torch.Generator().manual_seed(seed)))
    rec = mae.reconstruct(images, masks)
    patches = mae.patchify(images)
    grey = torch.zeros_like(patches)  # 0 in model scale = mid-grey
    masked = mae.unpatchify(torch.where(masks.mask[..., None], grey, patches)).clamp(0, 1)
    rows = [images, masked, rec]
    if mae.is_video:
        rows = [r[:, :, 0] for r in rows]
    scale = max(1, 96 // images.shape[-1])
    return save_png(_image_grid(rows), path, scale=scale)


def fmnist_probe(encoder: ViTEncoder, args: argparse.Namespace) -> dict[str, Any]:
    from mmtok.data.sources.fashion_mnist import load_fashion_mnist
    from mmtok.mim.probe import extract_features, linear_probe

    xtr, ytr = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    if args.limit_train:
        xtr, ytr = xtr[: args.limit_train], ytr[: args.limit_train]
    if args.limit_test:
        xte, yte = xte[: args.limit_test], yte[: args.limit_test]
    ftr = extract_features(_fit_images(encoder), xtr, pool=args.pool, layers=args.probe_layers)
    fte = extract_features(_fit_images(encoder), xte, pool=args.pool, layers=args.probe_layers)
    r = linear_probe(ftr, ytr, fte, yte, Cs=tuple(args.probe_c))
    out = {
        "probe_accuracy": r.accuracy,
        "probe_C": r.C,
        "probe_val_accuracy": r.val_accuracy,
        "probe_converged": r.all_converged,
        "probe_C_at_edge": r.C_at_edge,
        "features": ftr.shape[1],
    }
    if getattr(args, "attentive", False):
        out.update(_attentive(encoder, xtr, ytr, xte, yte, args, prefix="attentive_probe"))
    return out


def _attentive(
    encoder: ViTEncoder, xtr: Any, ytr: np.ndarray, xte: Any, yte: np.ndarray, args: argparse.Namespace, prefix: str
) -> dict[str, Any]:
    """The attentive probe's figures (``--attentive``, ``--attentive-layer``, ``--attentive-epochs``)."""
    from mmtok.mim.probe import attentive_probe, extract_tokens

    layer = args.attentive_layer
    r = attentive_probe(
        extract_tokens(encoder, xtr, layer=layer),
        ytr,
        extract_tokens(encoder, xte, layer=layer),
        yte,
        epochs=args.attentive_epochs,
    )
    return {
        f"{prefix}_accuracy": r.accuracy,
        f"{prefix}_val_accuracy": r.val_accuracy,
        f"{prefix}_train_accuracy": r.train_accuracy,
        f"{prefix}_layer": layer,
        f"{prefix}_epochs": r.epochs,
    }


def _fit_images(encoder: ViTEncoder) -> ViTEncoder:
    if encoder.config.img_size != 28 or encoder.num_frames != 1:
        raise ValueError(
            f"the Fashion-MNIST probe needs a 28x28 image encoder; this one takes {encoder.config.img_size}px "
            f"{'clips' if encoder.num_frames > 1 else 'images'}. Use --video-train/--video-test for video encoders."
        )
    return encoder


def video_probe(
    encoder: ViTEncoder,
    train: str,
    test: str,
    limit: int = 0,
    pool: str = "mean",
    attentive: argparse.Namespace | None = None,
) -> dict[str, Any]:
    """Linear probe on clip labels from two shard patterns (``video`` [C, T, H, W] + ``label``); with
    ``attentive`` (the CLI's arguments) also the attentive probe on the same clips. The decoded clips are held in
    memory for both probes (float32: 4,000 clips of 8 x 64 x 64 take 1.6 GB; ``limit`` caps them)."""
    from mmtok.data import ShardDataset
    from mmtok.mim.probe import extract_features, linear_probe
    from mmtok.mim.tasks import MIMSampleTransform

    c = encoder.config
    tf = MIMSampleTransform(True, c.in_chans, c.img_size, c.num_frames, hflip=False)

    def clips(pattern: str) -> tuple[torch.Tensor, np.ndarray]:
        xs, ys = [], []
        for i, s in enumerate(ShardDataset(pattern, transform=tf, on_error="raise")):
            if limit and i >= limit:
                break
            if s["label"] < 0:
                raise ValueError(f"clip {s.get('__key__')!r} has no label; the video probe needs labelled clips")
            xs.append(s["x"])
            ys.append(s["label"])
        if not xs:
            raise ValueError(f"no samples in {pattern}")
        return torch.stack(xs), np.asarray(ys)

    xtr, ytr = clips(train)
    xte, yte = clips(test)
    ftr = extract_features(encoder, xtr, batch_size=64, pool=pool)
    fte = extract_features(encoder, xte, batch_size=64, pool=pool)
    r = linear_probe(ftr, ytr, fte, yte)
    out = {
        "video_probe_accuracy": r.accuracy,
        "video_probe_C": r.C,
        "video_probe_converged": r.all_converged,
        "video_probe_C_at_edge": r.C_at_edge,
        "train_clips": len(ytr),
        "test_clips": len(yte),
    }
    if attentive is not None:
        out.update(_attentive(encoder, xtr, ytr, xte, yte, attentive, prefix="video_attentive_probe"))
    return out


@torch.no_grad()
def mtm_accuracy(model: MTM, codes: torch.Tensor, ratios=(0.25, 0.5, 0.75), seed: int = 0) -> dict[str, float]:
    """Hidden-code top-1 accuracy at fixed mask ratios (exact hidden count ``N - int(N (1 - r))``)."""
    g = torch.Generator().manual_seed(seed)
    codes = model.check_codes(codes)
    out = {}
    for r in ratios:
        mk = registries.get("masker").create("random", mask_ratio=r)
        correct = total = 0
        for i in range(0, len(codes), 256):
            c = codes[i : i + 256]
            m = mk(len(c), MaskContext(grid=(1, model.config.grid_h, model.config.grid_w), generator=g)).mask
            o = model(c, m)
            correct += float(o.accuracy) * int(m.sum())
            total += int(m.sum())
        out[f"mtm_accuracy@{r}"] = correct / max(total, 1)
    return out


def _load_codes(pattern: str, limit: int) -> torch.Tensor:
    from mmtok.data import ShardDataset

    codes = []
    for i, s in enumerate(ShardDataset(pattern, on_error="raise")):
        if limit and i >= limit:
            break
        if "codes" not in s:
            raise ValueError(
                f"sample {s.get('__key__')!r} has no codes.npy; build token shards with `mmtok shards tokens`"
            )
        codes.append(torch.as_tensor(s["codes"]).long())
    if not codes:
        raise ValueError(f"no samples in {pattern}")
    return torch.stack(codes)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mmtok eval mim", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="MIM model folder (vit/MAE/MTM) or a run folder with export/")
    p.add_argument("--out", help="write the metrics JSON here")
    p.add_argument("--no-probe", action="store_true", help="skip the Fashion-MNIST linear probe")
    p.add_argument("--pool", default="mean", choices=["mean", "cls", "mean+cls"])
    p.add_argument("--probe-layers", type=int, default=1, help="concatenate pooled features of the last L blocks")
    p.add_argument(
        "--probe-c",
        type=float,
        nargs="+",
        default=list(DEFAULT_CS),
        help="starting C grid of the probe, extended while the best C sits at an edge; one value = no tuning",
    )
    p.add_argument(
        "--attentive",
        action="store_true",
        help="also an attentive probe (a learned query over one block's tokens, then linear) beside the linear one",
    )
    p.add_argument("--attentive-layer", type=int, default=-1, help="the attentive probe's block (-1 = the last)")
    p.add_argument("--attentive-epochs", type=int, default=30, help="the attentive probe's training epochs")
    p.add_argument("--limit-train", type=int, default=0)
    p.add_argument("--limit-test", type=int, default=0)
    p.add_argument("--finetune", action="store_true", help="also fine-tune on Fashion-MNIST (options: --finetune-*)")
    add_finetune_args(p)
    p.add_argument("--figure", help="PNG path for the reconstruction (MAE) or sample grid (MTM)")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--video-train", help="shard pattern of labelled clips to fit the video probe")
    p.add_argument("--video-test", help="shard pattern of labelled clips to test the video probe")
    p.add_argument("--codes", help="MTM: token shard pattern (codes.npy) for hidden-code accuracy")
    p.add_argument("--tokenizer", help="MTM: tokenizer folder to decode MaskGIT samples for --figure")
    p.add_argument("--steps", type=int, default=8, help="MTM: MaskGIT decoding steps")
    p.add_argument("--limit", type=int, default=0, help="max samples read from shards")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    try:
        model = load_model(args.model)
    except (FileNotFoundError, hub.CheckpointError) as e:
        print(f"mmtok eval mim: {e}", file=sys.stderr)
        return 2
    metrics: dict[str, Any] = {"model": str(args.model), "type": type(model).__name__}
    try:
        if isinstance(model, MTM):
            metrics.update(_eval_mtm(model, args))
        else:
            metrics.update(_eval_encoder(model, args))
    except ValueError as e:
        print(f"mmtok eval mim: {e}", file=sys.stderr)
        return 2
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.out:
        hub.atomic_write_text(args.out, text + "\n")
    return 0


def _eval_encoder(model: torch.nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    encoder = model.encoder if isinstance(model, MAE) else model
    out: dict[str, Any] = {}
    video = encoder.num_frames > 1
    if args.figure and isinstance(model, MAE):
        if video:
            if not args.video_test:
                raise ValueError("a video reconstruction figure needs --video-test clips")
            from mmtok.data import ShardDataset
            from mmtok.mim.tasks import MIMSampleTransform

            c = model.config
            tf = MIMSampleTransform(True, c.in_chans, c.img_size, c.num_frames, hflip=False)
            clips = [s["x"] for _, s in zip(range(8), ShardDataset(args.video_test, transform=tf))]
            imgs = torch.stack(clips)
            masker = "tube"
        else:
            from mmtok.data.sources.fashion_mnist import load_fashion_mnist
            from mmtok.mim.probe import to_input

            imgs = to_input(load_fashion_mnist("test")[0][:8], model.config.in_chans)
            masker = "random"
        out["figure"] = str(recon_figure(model, imgs, args.figure, masker=masker, mask_ratio=args.mask_ratio))
    if video:
        if args.video_train and args.video_test:
            attentive = args if args.attentive else None
            out.update(
                video_probe(encoder, args.video_train, args.video_test, args.limit, args.pool, attentive=attentive)
            )
        return out
    if not args.no_probe:
        out.update(fmnist_probe(encoder, args))
    if args.finetune:
        import copy

        from mmtok.data.sources.fashion_mnist import load_fashion_mnist
        from mmtok.mim.probe import finetune, finetune_kwargs

        xtr, ytr = load_fashion_mnist("train")
        xte, yte = load_fashion_mnist("test")
        if args.limit_train:
            xtr, ytr = xtr[: args.limit_train], ytr[: args.limit_train]
        if args.limit_test:
            xte, yte = xte[: args.limit_test], yte[: args.limit_test]
        ft = finetune(
            copy.deepcopy(_fit_images(encoder)),
            xtr,
            ytr,
            xte,
            yte,
            **finetune_kwargs(args),
        )
        out.update({f"finetune_{k}": v for k, v in ft.items()})
    return out


def _eval_mtm(model: MTM, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.codes:
        out.update(mtm_accuracy(model, _load_codes(args.codes, args.limit)))
    if args.figure:
        if not args.tokenizer:
            raise ValueError("an MTM sample grid needs --tokenizer DIR to decode codes to pixels")
        tok = hub.from_pretrained(args.tokenizer, kind="tokenizer").eval()
        ids = model.generate(16, steps=args.steps, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            imgs = MTM.decode_pixels(tok, ids, (model.config.grid_h, model.config.grid_w))
        out["figure"] = str(
            save_png(_image_grid([imgs[:8], imgs[8:]]), args.figure, scale=max(1, 96 // imgs.shape[-1]))
        )
    return out
