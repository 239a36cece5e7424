"""``mmtok eval tokenizer``: reconstruction quality and token statistics on held-out images.

Reports PSNR and SSIM (torchmetrics, images in [0, 1]), codebook health with the training logs'
definition (:func:`~mmtok.tokenizers.quantizers.codebook_stats`: over the last 65,536 assignments,
``usage`` = distinct codes / codebook size, ``usage_ge4`` = share of codes hit at least 4 times,
``perplexity``; ``usage_assignments`` says how many assignments they saw), tokens per image before
and after BPE (merges learned on *training* codes, measured on the held-out codes), a Frechet distance
between MobileNetV2 features of originals and reconstructions (``fid_mobilenetv2``: FID's formula on the
offline ImageNet MobileNetV2's pooled features; it is *not* Inception FID and its values are not
comparable with published FIDs), the EV(k) curve for ordered 1D tokenizers, and a PNG grid (odd rows
originals, even rows reconstructions).

Held-out data: ``fmnist`` = the Fashion-MNIST test split; ``photos`` = random crops of bundled
photographs kept out of training (the ``photos`` shard builder's ``val_photos``), alternating between
them; ``shards`` = any shard pattern (``--shards``). From a split, ``--n`` images are taken at evenly
spaced positions over the whole split (:func:`spread_positions`), never the first ``n``: shards are often
written one source after another (a photo's crops, a class), and a prefix would then measure one of them.

    mmtok eval tokenizer --tokenizer runs/vq_f4/export --data fmnist --n 1000 --out runs/vq_f4/eval
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from mmtok import hub
from mmtok.tokenizers.base import to_model_range, to_unit_range
from mmtok.tokenizers.quantizers import USAGE_WINDOW, codebook_stats
from mmtok.tokenizers.tasks import check_upsampling, prepare_images

logger = logging.getLogger(__name__)


def spread_positions(total: int, n: int) -> np.ndarray:
    """``min(n, total)`` sorted, distinct positions evenly spaced over ``[0, total)`` (``i * total // n``).

    Deterministic (the same set for every run and machine) and spread over the whole split, so an
    evaluation set drawn from a split written source by source still covers every source in proportion.
    """
    if n < 1:
        raise ValueError(f"need at least one evaluation image, got n={n}")
    if n >= total:
        return np.arange(total)
    return (np.arange(n, dtype=np.int64) * total) // n


def load_eval_images(
    data: str, n: int, *, shards: str = "", photos: str = "astronaut,chelsea", seed: int = 0, split: str = "test"
) -> torch.Tensor:
    """Held-out images ``[N, C, H, W]`` in [0, 1] (native size and channels), spread over the split.

    ``fmnist`` and ``shards`` take the images at :func:`spread_positions` of the split (``split`` is
    the Fashion-MNIST split); ``photos`` draws ``n`` seeded crops alternating between the named photos.
    """
    if data == "fmnist":
        from mmtok.data.sources.fashion_mnist import load_fashion_mnist

        imgs, _ = load_fashion_mnist(split)
        pick = spread_positions(len(imgs), n)
        return torch.from_numpy(imgs[pick].copy()).float().div(255)[:, None]
    if data == "photos":
        from PIL import Image

        from mmtok.data.sources.photos import load_photo, photo_paths, random_crop_box

        paths = photo_paths()
        names = [p.strip() for p in photos.split(",") if p.strip()]
        missing = [p for p in names if p not in paths]
        if missing or not names:
            raise ValueError(f"photos {missing or names} not available; choose from {sorted(paths)}")
        rng = np.random.default_rng(seed)
        out = []
        for i in range(n):
            img = Image.fromarray(load_photo(paths[names[i % len(names)]]))
            box = random_crop_box(rng, *img.size, (0.02, 0.5))
            out.append(np.asarray(img.resize((256, 256), Image.BICUBIC, box=box)))
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float().div(255)
    if data == "shards":
        from mmtok.data import ShardDataset

        if not shards:
            raise ValueError("--data shards needs --shards PATTERN")
        ds = ShardDataset(shards)  # stream order: shards in order, samples in file order
        pick = spread_positions(sum(ds.counts), n)
        wanted, last = set(pick.tolist()), int(pick[-1])
        out = []
        for pos, s in enumerate(ds):
            if pos in wanted and "image" in s:
                out.append(s["image"])
            if pos >= last:  # no need to decode the rest of the split
                break
        if not out:
            raise ValueError(f"no images in {shards}")
        size = max(x.shape[-1] for x in out)
        return torch.stack([prepare_images(x[None], size, x.shape[0])[0] for x in out])
    raise ValueError(f"unknown --data {data!r}: fmnist, photos or shards")


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets ``[N, D]`` (FID's formula)."""
    import warnings

    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # few images vs 1280 dims: singular covariances are expected
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # near-singular covariances: regularise like pytorch-fid
        eps = np.eye(s1.shape[0]) * 1e-6
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def save_grid(originals: torch.Tensor, recons: torch.Tensor, path: str | Path, per_row: int = 8) -> Path:
    """PNG with rows of originals and reconstructions interleaved (images in [0, 1])."""
    from PIL import Image

    k = min(originals.shape[0], 2 * per_row)
    rows = []
    for start in range(0, k, per_row):
        o = originals[start : start + per_row]
        r = recons[start : start + per_row]
        rows += [torch.cat(list(o), dim=-1), torch.cat(list(r), dim=-1)]
    width = max(row.shape[-1] for row in rows)
    rows = [torch.nn.functional.pad(row, (0, width - row.shape[-1])) for row in rows]
    grid = torch.cat(rows, dim=-2)  # [C, H, W]
    arr = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(path)
    return path


@torch.no_grad()
def evaluate_tokenizer(
    model,
    images: torch.Tensor,
    *,
    batch_size: int = 64,
    fid: bool = True,
    bpe_train_codes: np.ndarray | None = None,
    bpe_merges: int = 0,
    bpe_vocab=None,
    grid_path: str | Path | None = None,
    usage_window: int = USAGE_WINDOW,
) -> dict:
    """All metrics of one tokenizer on ``images`` ``[N, C, H, W]`` in [0, 1].

    Codebook statistics are :func:`codebook_stats` over the last ``usage_window`` assignments of the
    evaluation (all residual levels), the definition of the training logs.
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    model.eval()
    dev = next(model.parameters()).device
    c, s = model.config.in_channels, model.config.image_size
    check_upsampling(*images.shape[-2:], s, where="mmtok eval tokenizer")
    x01 = prepare_images(images, s, c)
    recons, ids, psnr, ssim = [], [], 0.0, 0.0
    for i in range(0, x01.shape[0], batch_size):
        xb = x01[i : i + batch_size].to(dev)
        enc = model.encode(to_model_range(xb))
        rb = to_unit_range(model.decode(enc.latents).float())
        psnr += float(peak_signal_noise_ratio(rb, xb, data_range=1.0, reduction="none", dim=(1, 2, 3)).sum())
        ssim += float(structural_similarity_index_measure(rb, xb, data_range=1.0)) * xb.shape[0]
        recons.append(rb.cpu())
        ids.append(enc.indices.cpu())
    n = x01.shape[0]
    recon = torch.cat(recons)
    codes = torch.cat(ids)
    first_level = codes[..., 0] if codes.ndim == len(model.tokens_shape) + 2 else codes  # residual: level 0 grid
    res: dict = {"n_images": n, "image_size": s, "channels": c, "psnr": psnr / n, "ssim": ssim / n}
    levels = model.quantizer.levels_per_token
    health = codebook_stats(codes, model.codebook_size, levels=levels, window=usage_window)
    res.update(
        usage=health["usage"],
        usage_ge4=health["usage_ge4"],
        perplexity=health["perplexity"],
        usage_assignments=int(health["assignments"]),
        usage_window=usage_window,
    )
    res["codebook_size"] = model.codebook_size
    res["tokens_per_image"] = int(np.prod(codes.shape[1:]))
    if bpe_vocab is None and bpe_merges > 0 and bpe_train_codes is not None:
        from mmtok.tokenizers.bpe import train_bpe

        mode = "2d" if len(model.tokens_shape) == 2 else "1d"
        bpe_vocab = train_bpe(bpe_train_codes, bpe_merges, num_codes=model.codebook_size, mode=mode)
    if bpe_vocab is not None:
        seqs = bpe_vocab.encode(first_level.numpy().reshape(n, *model.tokens_shape))
        res["bpe"] = {
            "merges": bpe_vocab.num_merges,
            "mode": bpe_vocab.mode,
            "tokens_per_image": float(np.mean([len(q) for q in seqs])),
        }
    if fid and n >= 2:
        from mmtok.tokenizers.losses import MobileNetFeatures

        net = MobileNetFeatures().to(dev)
        fa = torch.cat([net.pooled(to_model_range(x01[i : i + 64]).to(dev)).cpu() for i in range(0, n, 64)])
        fb = torch.cat([net.pooled(to_model_range(recon[i : i + 64]).to(dev)).cpu() for i in range(0, n, 64)])
        res["fid_mobilenetv2"] = frechet_distance(fa.double().numpy(), fb.double().numpy())
    if hasattr(model, "decode_prefix"):
        from mmtok.tokenizers.pca1d import explained_variance, pca_property

        ev = explained_variance(model, to_model_range(x01[: min(n, 512)]).to(dev), batch_size=batch_size)
        res["ev"] = ev
        res["ev_check"] = {k: v for k, v in pca_property(ev).items() if k != "increments"}
    if grid_path:
        res["grid_png"] = str(save_grid(x01[:16], recon[:16], grid_path))
    return res


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mmtok eval tokenizer", description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", required=True, help="tokenizer folder (save_pretrained / a run's export/)")
    p.add_argument("--data", default="fmnist", choices=["fmnist", "photos", "shards"])
    p.add_argument("--shards", default="", help="shard pattern for --data shards")
    p.add_argument("--photos", default="astronaut,chelsea", help="held-out photo names for --data photos")
    p.add_argument("--n", type=int, default=1000, help="held-out images")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--bpe", default="", help="BPE vocabulary file to measure tokens per image after BPE")
    p.add_argument("--bpe-merges", type=int, default=256, help="else learn this many merges on training codes")
    p.add_argument("--bpe-train-n", type=int, default=2000, help="Fashion-MNIST train images for those merges")
    p.add_argument("--no-fid", action="store_true", help="skip the MobileNetV2 Frechet distance")
    p.add_argument("--out", default="", help="folder for metrics.json and recon_grid.png")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    try:
        model = hub.from_pretrained(args.tokenizer, kind="tokenizer")
        images = load_eval_images(args.data, args.n, shards=args.shards, photos=args.photos)
    except (hub.CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"mmtok eval tokenizer: {e}", file=sys.stderr)
        return 2
    dev = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    model.to(dev)
    bpe_vocab, train_codes = None, None
    if args.bpe:
        from mmtok.tokenizers.bpe import BPEVocab

        bpe_vocab = BPEVocab.load(args.bpe)
    elif args.bpe_merges > 0 and args.data == "fmnist":
        train = load_eval_images("fmnist", args.bpe_train_n, split="train")
        c, s = model.config.in_channels, model.config.image_size
        x = to_model_range(prepare_images(train, s, c))
        codes = torch.cat([model.tokenize(x[i : i + 256].to(dev)).cpu() for i in range(0, len(x), 256)])
        codes = codes[..., 0] if codes.ndim == len(model.tokens_shape) + 2 else codes
        train_codes = codes.numpy()
    out = Path(args.out) if args.out else None
    res = evaluate_tokenizer(
        model,
        images,
        batch_size=args.batch_size,
        fid=not args.no_fid,
        bpe_train_codes=train_codes,
        bpe_merges=args.bpe_merges,
        bpe_vocab=bpe_vocab,
        grid_path=out / "recon_grid.png" if out else None,
    )
    res.update(tokenizer=args.tokenizer, data=args.data)
    text = json.dumps(res, indent=2)
    print(text)
    if out:
        hub.atomic_write_text(out / "metrics.json", text)
    return 0
