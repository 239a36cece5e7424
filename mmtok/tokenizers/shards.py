"""``mmtok shards tokens``: token shards (``codes.npy``) from image shards with a trained tokenizer.

Masked token modeling on stored tokens (SeiT / SeiT++, arXiv:2303.11114 / arXiv:2312.10105) reads
codes instead of pixels: a 32x32 grayscale image becomes an 8x8 int16 grid (128 bytes). Every output
sample keeps the input key and label and adds ``codes.npy`` (int16 when the codebook fits, else int32;
``[h, w]`` grids, ``[K]`` for 1D tokenizers, a trailing ``Q`` axis for residual VQ) and a ``json`` with the
tokenizer's name, folder and format version (DESIGN.md sample schema).

    mmtok shards tokens --out data/fmnist-tokens tokenizer=runs/vq_f4/export shards='data/fmnist/train-*.tar'
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmtok.registries import SHARD_BUILDERS

logger = logging.getLogger(__name__)

TOKENS_FORMAT_VERSION = 1


@dataclass
class TokensConfig:
    """Options of ``mmtok shards tokens``."""

    out: str = "data/tokens"
    tokenizer: str = ""  # tokenizer folder (save_pretrained / a training run's export/)
    shards: str = ""  # input image shard pattern (braces, globs, '::'-joined)
    prefix: str = "tokens"  # output shard name prefix (e.g. train / val)
    split: str = "train"  # recorded in every sample's json
    batch_size: int = 64
    device: str = "auto"
    on_error: str = "skip"  # policy for undecodable input samples
    maxcount: int = 10000
    maxsize: int = 256 << 20


@SHARD_BUILDERS.register("tokens", config=TokensConfig)
def build_tokens(cfg: TokensConfig) -> dict[str, Any]:
    """Tokenize every image of ``cfg.shards`` and write ``codes.npy`` shards to ``cfg.out``."""
    from mmtok import hub
    from mmtok.data import ShardDataset, write_shards
    from mmtok.tokenizers.base import to_model_range
    from mmtok.tokenizers.tasks import prepare_images

    if not cfg.tokenizer:
        raise ValueError("tokens builder needs tokenizer=DIR (a folder written by save_pretrained)")
    if not cfg.shards:
        raise ValueError("tokens builder needs shards=PATTERN (the image shards to tokenize)")
    dev = torch.device(
        "cuda"
        if cfg.device == "auto" and torch.cuda.is_available()
        else ("cpu" if cfg.device == "auto" else cfg.device)
    )
    model = hub.from_pretrained(cfg.tokenizer, kind="tokenizer").to(dev).eval()
    c, s = model.config.in_channels, model.config.image_size
    dtype = np.int16 if model.codebook_size <= np.iinfo(np.int16).max + 1 else np.int32
    meta = {
        "tokenizer": model.hub_name,
        "tokenizer_path": str(Path(cfg.tokenizer).resolve()),
        "codebook_size": model.codebook_size,
        "tokens_version": TOKENS_FORMAT_VERSION,
    }
    dataset = ShardDataset(cfg.shards, on_error=cfg.on_error)
    t0 = time.perf_counter()
    counts = {"samples": 0, "skipped_no_image": 0}

    def batches():
        buf: list[dict] = []
        for sample in dataset:
            if "image" not in sample:
                counts["skipped_no_image"] += 1
                logger.warning("sample %s has no image; skipped", sample.get("__key__"))
                continue
            buf.append(sample)
            if len(buf) == cfg.batch_size:
                yield buf
                buf = []
        if buf:
            yield buf

    def samples():
        for buf in batches():
            x = torch.cat([prepare_images(b["image"][None], s, c) for b in buf])
            with torch.no_grad():
                ids = model.encode(to_model_range(x).to(dev)).indices.cpu().numpy().astype(dtype)
            for b, code in zip(buf, ids):
                src = b.get("json", {}) or {}
                out = {
                    "__key__": b["__key__"],
                    "codes.npy": code,
                    "json": {
                        **meta,
                        "source": src.get("source", "tokens"),
                        "split": src.get("split", cfg.split),
                        "orig": src,
                    },
                }
                if "label" in b:
                    out["cls"] = int(b["label"])
                counts["samples"] += 1
                yield out

    paths = write_shards(samples(), cfg.out, prefix=cfg.prefix, maxcount=cfg.maxcount, maxsize=cfg.maxsize)
    summary = {
        "builder": "tokens",
        "out": str(cfg.out),
        "shards": [str(p) for p in paths],
        **counts,
        **meta,
        "tokens_shape": list(model.tokens_shape),
        "dtype": np.dtype(dtype).name,
        "input_stats": dict(getattr(dataset, "stats", {}) or {}),
        "seconds": time.perf_counter() - t0,
    }
    logger.info("wrote %d token samples to %s", counts["samples"], cfg.out)
    return summary
