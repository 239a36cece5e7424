"""``mmtok eval clip``: retrieval on held-out scenes and zero-shot Fashion-MNIST of an exported CLIP folder.

    mmtok eval clip --model runs/clip_fashion_scenes/export --data 'data/scenes/test-*.tar' \\
        [--limit N] [--fmnist-limit 2000] [--json clip.json]

* Retrieval (as in the CLIP paper's Flickr30k/COCO tables, arXiv:2103.00020): every test scene against every test
  caption (captions by the rule of :mod:`mmtok.clip.captions`, item order seeded by the sample key). Image->text
  recall@k: the share of scenes whose k most similar captions include a right one; text->image the other way.
  A caption is right for a scene when it names the same set of (colour, class, position) items, so two scenes
  with the same content (frequent among one-item scenes) do not count against the model. The chance level of each
  figure (a random ranking, from the same match counts) is printed beside it.
* Zero-shot Fashion-MNIST (CLIP's zero-shot classification with prompt ensembling): the first ``--fmnist-limit``
  test images (never seen in training: training scenes use Fashion-MNIST train images), each drawn as a white item
  in the center of a dark canvas at 40% of its side (the scenes' item size), classified by the nearest class
  embedding. Class embedding = the normalised mean of the embeddings of "a <colour> <class> in the center" over
  the 8 palette colours (``acc``); ``acc_white`` uses the single prompt "a white <class> in the center",
  ``acc_plain`` "a <class> in the center" (the form of the grey training captions). Chance is 0.10. The prompts
  use only caption words: the word-level tokenizer has no "photo".
* Attribute probe (``--attr-limit`` one-item test scenes): the right caption among the captions that differ from
  it in the class (10 options), the colour (8) or the position (9) only: which words the model has learnt to read.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

PROMPT = "{article} {words} in the center"  # words = "<colour> <class>" or "<class>"
ITEM_SHARE = 0.4  # item side / canvas side in the zero-shot canvases (scenes draw 30-50%)
BACKGROUND = 25.0 / 255  # the scenes' dark backgrounds have a base value of 5..45 per channel
WHITE = 240.0 / 255  # the "white" palette entry


def prompt(class_name: str, colour: str = "") -> str:
    """The zero-shot prompt: "a white sneaker in the center", "an ankle boot in the center" (``colour=""``)."""
    words = f"{colour} {class_name}".strip()
    return PROMPT.format(article="an" if words[:1] in "aeiou" else "a", words=words)


def _match_matrix(signatures: list[str]) -> torch.Tensor:
    ids: dict[str, int] = {}
    idx = torch.tensor([ids.setdefault(s, len(ids)) for s in signatures])
    return idx[:, None] == idx[None, :]  # [N, N] same scene content


def retrieval_metrics(
    image_features: torch.Tensor, text_features: torch.Tensor, signatures: list[str], ks: tuple[int, ...] = (1, 5)
) -> dict[str, float]:
    """Recall@k both ways among ``N`` pairs (row i of each is one scene and its caption).

    Args:
        image_features, text_features: ``[N, D]`` unit-norm embeddings.
        signatures: ``N`` strings; a caption is a right answer for a scene when their signatures are equal.

    Returns:
        ``{"i2t_r1": ..., "i2t_r5": ..., "t2i_r1": ..., "t2i_r5": ...}`` in [0, 1] (k capped at N).
    """
    n = image_features.shape[0]
    if n == 0 or text_features.shape[0] != n or len(signatures) != n:
        raise ValueError(
            f"need as many images, texts and signatures (> 0), got {n}, {len(text_features)}, {len(signatures)}"
        )
    sim = image_features.float() @ text_features.float().T  # [N images, N texts]
    match = _match_matrix(signatures)
    out: dict[str, float] = {}
    for k in ks:
        kk = min(k, n)
        top_t = sim.topk(kk, dim=1).indices  # [N, k] texts per image
        top_i = sim.topk(kk, dim=0).indices.T  # [N, k] images per text
        out[f"i2t_r{k}"] = float(match.gather(1, top_t).any(1).float().mean())
        out[f"t2i_r{k}"] = float(match.gather(1, top_i).any(1).float().mean())
    return out


def retrieval_chance(signatures: list[str], ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Expected recall@k of a random ranking: mean over queries of ``1 - C(N - m, k) / C(N, k)`` (m right ones).

    The match relation is symmetric, so image->text and text->image share one chance level per k.
    """
    n = len(signatures)
    counts = _match_matrix(signatures).sum(1).tolist()
    out = {}
    for k in ks:
        kk = min(k, n)
        miss = [math.comb(n - m, kk) / math.comb(n, kk) for m in counts]
        out[f"r{k}"] = 1.0 - sum(miss) / n
    return out


def fmnist_canvases(images: np.ndarray, canvas: int) -> torch.Tensor:
    """uint8 ``[N, 28, 28]`` items -> float ``[N, 3, canvas, canvas]`` in [0, 1]: white items centred on dark grey.

    The item is shaded as the scenes shade theirs (brighter where the source is brighter), see
    :func:`mmtok.data.sources.scenes.make_scene`.
    """
    side = round(canvas * ITEM_SHARE)
    a = torch.tensor(np.asarray(images), dtype=torch.float32)[:, None] / 255.0  # [N, 1, 28, 28] (a copy)
    a = F.interpolate(a, size=(side, side), mode="bilinear", antialias=True).clamp(0, 1)
    item = WHITE * (0.55 + 0.45 * a) * a + BACKGROUND * (1 - a)
    out = torch.full((len(images), 1, canvas, canvas), BACKGROUND)
    o = (canvas - side) // 2
    out[:, :, o : o + side, o : o + side] = item
    return out.expand(-1, 3, -1, -1).contiguous()


@torch.no_grad()
def class_embeddings(model, tokenizer, class_names: list[str], colours: list[str], device) -> torch.Tensor:
    """``[C, D]`` unit-norm class embeddings: the mean over ``colours`` of each prompt's text embedding (a colour
    ``""`` gives the colour-free prompt)."""
    rows = []
    for cls in class_names:
        texts = [prompt(cls, c) for c in colours]
        emb = model.encode_text(tokenizer(texts).to(device), normalize=True)  # [len(colours), D]
        rows.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(rows)


@torch.no_grad()
def _encode_images(model, images: torch.Tensor, mean, std, size: int, batch_size: int, device) -> torch.Tensor:
    mean_t = torch.tensor(mean).view(1, -1, 1, 1)
    std_t = torch.tensor(std).view(1, -1, 1, 1)
    feats = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size]
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        x = (x.clamp(0, 1) - mean_t) / std_t
        feats.append(model.encode_image(x.to(device), normalize=True).float().cpu())
    return torch.cat(feats)


@torch.no_grad()
def zero_shot_fmnist(
    model, tokenizer, meta: dict[str, Any], root: str, limit: int = 2000, batch_size: int = 128, device="cpu"
) -> dict[str, float]:
    """Zero-shot accuracy on the first ``limit`` Fashion-MNIST test images (see the module docstring)."""
    from mmtok.data.sources.fashion_mnist import CLASS_NAMES, load_fashion_mnist
    from mmtok.data.sources.scenes import PALETTE

    images, labels = load_fashion_mnist("test", root)
    if limit:
        images, labels = images[:limit], labels[:limit]
    size = int(meta["model_cfg"]["vision_cfg"]["image_size"])
    pre = meta.get("preprocess_cfg", {})
    canv = fmnist_canvases(np.asarray(images), size)
    feats = _encode_images(model, canv, pre.get("mean", [0.5] * 3), pre.get("std", [0.5] * 3), size, batch_size, device)
    y = torch.tensor(np.asarray(labels), dtype=torch.long)
    out = {"n": float(len(y)), "chance": 1.0 / len(CLASS_NAMES)}
    for name, colours in (("acc", list(PALETTE)), ("acc_white", ["white"]), ("acc_plain", [""])):
        w = class_embeddings(model, tokenizer, list(CLASS_NAMES), colours, device).cpu()
        pred = (feats @ w.T).argmax(1)
        out[name] = float((pred == y).float().mean())
    return out


@torch.no_grad()
def attribute_accuracy(
    model, tokenizer, meta: dict[str, Any], pattern: str, limit: int = 300, device="cpu"
) -> dict[str, float]:
    """Which words the model reads: on one-item scenes, pick the right caption among those that differ from it in
    one attribute only (10 classes, 8 colours or 9 positions). Accuracy per attribute and its chance level."""
    from mmtok.clip.captions import POSITIONS, item_phrase
    from mmtok.clip.tasks import ClipSampleTransform
    from mmtok.data import ShardDataset
    from mmtok.data.sources.fashion_mnist import CLASS_NAMES
    from mmtok.data.sources.scenes import PALETTE

    size = int(meta["model_cfg"]["vision_cfg"]["image_size"])
    pre = meta.get("preprocess_cfg", {})
    tf = ClipSampleTransform(
        tokenizer, size, pre.get("mean", [0.5] * 3), pre.get("std", [0.5] * 3), False, False, False, 0
    )
    options = {"class_name": list(CLASS_NAMES), "colour": list(PALETTE), "position": list(POSITIONS)}
    right = dict.fromkeys(options, 0)
    n = 0
    for s in ShardDataset(pattern, on_error="raise"):
        items = (s.get("json") or {}).get("items") or []
        if len(items) != 1:
            continue
        item = items[0]
        feat = model.encode_image(tf(dict(s))["image"][None].to(device), normalize=True)  # [1, D]
        for key, values in options.items():
            texts = [item_phrase({**item, key: v}) for v in values]
            emb = model.encode_text(tokenizer(texts).to(device), normalize=True)  # [V, D]
            right[key] += values[int((feat @ emb.T).argmax())] == item[key]
        n += 1
        if n >= limit:
            break
    if not n:
        return {}
    out = {"n": float(n)}
    for key, values in options.items():
        name = key.replace("_name", "")
        out[name] = right[key] / n
        out[f"chance_{name}"] = 1.0 / len(values)
    return out


@torch.no_grad()
def evaluate_retrieval(
    model, tokenizer, meta: dict[str, Any], pattern: str, limit: int = 0, batch_size: int = 128, device="cpu"
) -> dict[str, float]:
    """Recall@1/5 both ways over the scenes of ``pattern`` and the chance levels (``chance_r1``, ``chance_r5``)."""
    from mmtok.clip.tasks import ClipSampleTransform
    from mmtok.data import ShardDataset

    size = int(meta["model_cfg"]["vision_cfg"]["image_size"])
    pre = meta.get("preprocess_cfg", {})
    tf = ClipSampleTransform(
        tokenizer, size, pre.get("mean", [0.5] * 3), pre.get("std", [0.5] * 3), False, False, False, 0
    )
    imgs, txts, sigs, batch = [], [], [], []

    def flush() -> None:
        x = torch.stack([s["image"] for s in batch]).to(device)
        t = torch.stack([s["text"] for s in batch]).to(device)
        imgs.append(model.encode_image(x, normalize=True).float().cpu())
        txts.append(model.encode_text(t, normalize=True).float().cpu())
        sigs.extend(s["signature"] for s in batch)
        batch.clear()

    for i, s in enumerate(ShardDataset(pattern, transform=tf, on_error="raise")):
        if limit and i >= limit:
            break
        batch.append(s)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not sigs:
        raise ValueError(f"no samples in {pattern!r}")
    out = {"n": float(len(sigs)), "distinct_captions": float(len(set(sigs)))}
    out.update(retrieval_metrics(torch.cat(imgs), torch.cat(txts), sigs))
    out.update({f"chance_{k}": v for k, v in retrieval_chance(sigs).items()})
    return out


def main(argv: list[str]) -> int:
    from mmtok.data.sources.fashion_mnist import DEFAULT_ROOT

    p = argparse.ArgumentParser(
        prog="mmtok eval clip", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="exported CLIP folder (open_clip_config.json + safetensors)")
    p.add_argument("--data", required=True, help="shard pattern of held-out scenes (json items)")
    p.add_argument("--limit", type=int, default=0, help="retrieval among the first N scenes only (0 = all)")
    p.add_argument("--fmnist-root", default=DEFAULT_ROOT, help="Fashion-MNIST IDX folder")
    p.add_argument("--fmnist-limit", type=int, default=2000, help="zero-shot on the first N test images (0 = all)")
    p.add_argument("--no-zero-shot", action="store_true", help="skip the zero-shot Fashion-MNIST figure")
    p.add_argument("--attr-limit", type=int, default=300, help="one-item scenes of the attribute probe (0 = skip)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default="", help="write the figures here")
    args = p.parse_args(argv)
    if args.batch_size < 1 or min(args.limit, args.fmnist_limit, args.attr_limit) < 0:
        print("mmtok eval clip: --batch-size must be >= 1, the limits >= 0", file=sys.stderr)
        return 2
    from mmtok.clip.captions import CaptionError
    from mmtok.clip.tasks import load_clip_folder

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    try:
        model, tok, meta = load_clip_folder(args.model, device)
        ret = evaluate_retrieval(model, tok, meta, args.data, args.limit, args.batch_size, device)
        attrs = attribute_accuracy(model, tok, meta, args.data, args.attr_limit, device) if args.attr_limit else {}
        zs = {}
        if not args.no_zero_shot:
            zs = zero_shot_fmnist(model, tok, meta, args.fmnist_root, args.fmnist_limit, args.batch_size, device)
    except (OSError, ValueError, KeyError, CaptionError) as e:
        print(f"mmtok eval clip: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    n = int(ret["n"])
    print(f"retrieval among {n} samples ({int(ret['distinct_captions'])} distinct scene contents)")
    print(f"{'':14s} {'R@1':>7s} {'R@5':>7s}")
    print(f"{'image->text':14s} {ret['i2t_r1']:7.3f} {ret['i2t_r5']:7.3f}")
    print(f"{'text->image':14s} {ret['t2i_r1']:7.3f} {ret['t2i_r5']:7.3f}")
    print(f"{'chance':14s} {ret['chance_r1']:7.3f} {ret['chance_r5']:7.3f}")
    if attrs:
        print(
            f"one-item scenes ({int(attrs['n'])}), right caption among one-word variants: class {attrs['class']:.3f} "
            f"(chance {attrs['chance_class']:.2f}), colour {attrs['colour']:.3f} ({attrs['chance_colour']:.2f}), "
            f"position {attrs['position']:.3f} ({attrs['chance_position']:.2f})"
        )
    if zs:
        print(
            f"zero-shot Fashion-MNIST ({int(zs['n'])} test images): acc {zs['acc']:.3f} (8-colour prompt ensemble), "
            f"{zs['acc_white']:.3f} ('a white <class> in the center'), {zs['acc_plain']:.3f} ('a <class> in the "
            f"center'); chance {zs['chance']:.2f}"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        res = {"model": args.model, "retrieval": ret, "attributes": attrs, "zero_shot": zs}
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0
