"""Captions of fashion scenes from their item metadata, and the word-level text tokenizer of the CLIP model.

The caption rule (the text side of ``mmtok train`` task ``clip`` and of ``mmtok eval clip``):

* every item of the scene (shard ``json["items"]``: ``class_name``, ``colour``, ``position``) becomes the phrase
  ``"<a|an> <colour> <class name> <position phrase>"``, e.g. "a red sneaker on the left", "an orange bag at the
  top right", "a white dress in the center" (position phrases as in the referring expressions of
  :mod:`mmtok.data.sources.scenes`);
* the phrases are joined with " and " in a shuffled order: "a red sneaker on the left and a blue bag at the top".
  Items are stored in paint order; shuffling keeps the text model from learning anything from that order. The
  permutation comes from a generator seeded by the sample key (CRC-32 of ``__key__``) and the caption seed, so a
  validation or test caption is the same on every read; training mixes one draw of the torch RNG into that seed
  (the engine seeds it per rank and worker), so a training scene is read with a new order each epoch and a
  resumed run repeats its orders.

Training-only variants (task ``clip``): a share of the scenes (``grey_share``) is turned to grey levels and captioned
without colour words ("a sneaker on the left and a bag at the top"), and every training caption comes with a hard
negative, the same caption with one item's class or position changed (:func:`hard_negative`). Both exist because
colour alone tells most captions of a batch apart: without them a short run learns colour words perfectly and
classes and positions hardly at all (measured: 1.00 / 0.17 / 0.13 on one-item test scenes, chance 0.13 / 0.10 / 0.11).

Two captions describe the same scene content exactly when their items agree as a set of (colour, class,
position) triples (:func:`items_signature`); retrieval counts a hit on any such caption or image.

The tokenizer is mmtok's word-level ``builtin:fashion`` (:mod:`mmtok.mllm.text`, 87 words: every class name,
colour and position word is one token); a caption becomes its word ids, then ``</s>`` (the token open_clip's text
tower pools, ``pool_type="eos"``), right-padded with ``<pad>`` (id 0) to the model's context length.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mmtok.data import transforms
from mmtok.data.sources.fashion_mnist import CLASS_NAMES
from mmtok.data.sources.scenes import position_phrase, position_word

ITEM_FIELDS = ("class_name", "colour", "position")
# every value of scenes.position_word: the 3 x 3 grid of the canvas
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")


class CaptionError(ValueError):
    """A caption that the tokenizer or the model cannot take (unknown word, too long)."""


def item_phrase(item: dict[str, Any], colour: bool = True) -> str:
    """``{"class_name": "bag", "colour": "orange", "position": "top right"}`` -> "an orange bag at the top right".

    ``colour=False`` leaves the colour word out ("a bag at the top right"): the caption of a greyscale scene.
    """
    missing = [k for k in ITEM_FIELDS if k not in item]
    if missing:
        raise KeyError(
            f"scene item {item} lacks {missing}; captions need class_name, colour and position "
            "(shards built by `mmtok shards fashion-scenes` or `mmtok shards fashion-vqa`)"
        )
    words = f"{item['colour']} {item['class_name']}" if colour else str(item["class_name"])
    article = "an" if words[:1] in "aeiou" else "a"
    return f"{article} {words} {position_phrase(str(item['position']))}"


def key_seed(key: str, seed: int = 0) -> int:
    """:func:`mmtok.data.transforms.key_seed` of the key under caption seed ``seed``."""
    return transforms.key_seed(key, salt=f"{seed}:")


def caption(items: list[dict[str, Any]], order_seed: Any = None, colour: bool = True) -> str:
    """The caption of a scene: item phrases joined with " and ", shuffled by ``order_seed`` (None: stored order).

    ``order_seed`` is anything ``numpy.random.default_rng`` takes (an int, a list of ints); ``colour=False`` drops
    the colour words (greyscale scenes).

    Raises:
        ValueError: the scene has no items.
    """
    if not items:
        raise ValueError("a scene without items has no caption")
    phrases = [item_phrase(it, colour) for it in items]
    if order_seed is not None:
        order = np.random.default_rng(order_seed).permutation(len(phrases))
        phrases = [phrases[i] for i in order]
    return " and ".join(phrases)


def items_signature(items: list[dict[str, Any]], colour: bool = True) -> str:
    """What a caption says, without its order: the sorted item phrases (equal for equal scene descriptions)."""
    return " | ".join(sorted(item_phrase(it, colour) for it in items))


def hard_negative(items: list[dict[str, Any]], rng: np.random.Generator) -> list[dict[str, Any]]:
    """The items with one detail wrong: one item's class or its position (even odds) replaced by another value.

    The caption of the result differs from the scene's in one or two words, so telling them apart needs the class
    or the place of an item, not only its colour (NegCLIP's hard negatives, Yuksekgonul et al., arXiv:2210.01936).
    Items of one scene differ in (colour, class, position), so the result never describes the scene.
    """
    out = [dict(it) for it in items]
    target = out[int(rng.integers(len(out)))]
    key, values = ("class_name", CLASS_NAMES) if rng.random() < 0.5 else ("position", POSITIONS)
    target[key] = str(rng.choice([v for v in values if v != target[key]]))
    return out


def flip_items(items: list[dict[str, Any]], canvas: int) -> list[dict[str, Any]]:
    """Items of the horizontally mirrored scene: boxes mirrored, positions recomputed from the mirrored boxes.

    Recomputing (rather than swapping "left" and "right") keeps the rule of :func:`position_word` exact even for a
    centre that lies on a third of the canvas.
    """
    out = []
    for it in items:
        if "bbox" not in it:
            raise KeyError(f"scene item {it} has no bbox; horizontal flips need it (set task.hflip=false)")
        x0, y0, x1, y1 = it["bbox"]
        box = [canvas - x1, y0, canvas - x0, y1]
        pos = position_word((box[0] + box[2]) / 2, (y0 + y1) / 2, canvas)
        out.append({**it, "bbox": box, "position": pos})
    return out


class CaptionTokenizer:
    """Captions -> ``[B, context_length]`` long ids: words, then ``</s>``, then ``<pad>`` (id 0).

    Args:
        spec: ``builtin:fashion`` (default), or a folder holding the tokenizer (an exported CLIP folder).
        context_length: Length of every encoded caption (the text tower's positional table).

    A plain class holding a transformers fast tokenizer: DataLoader workers can pickle it.
    """

    def __init__(self, spec: str = "builtin:fashion", context_length: int = 40):
        from mmtok.mllm.text import load_tokenizer

        self.spec = spec
        self.tokenizer = load_tokenizer(spec)
        self.context_length = int(context_length)
        tok = self.tokenizer
        if tok.eos_token_id is None or tok.pad_token_id is None:
            raise CaptionError(f"tokenizer {spec!r} needs an eos and a pad token to encode captions")
        self.eos_id, self.pad_id, self.unk_id = tok.eos_token_id, tok.pad_token_id, tok.unk_token_id
        self.vocab_size = len(tok)

    def encode(self, text: str) -> torch.Tensor:
        """One caption -> long ``[context_length]``.

        Raises:
            CaptionError: a word outside the vocabulary, or a caption longer than the context.
        """
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.unk_id is not None and self.unk_id in ids:
            vocab = self.tokenizer.get_vocab()
            pieces = self.tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text.lower())
            words = [w for w, _ in pieces if w not in vocab]
            raise CaptionError(
                f"caption {text!r} has words outside the {self.spec} vocabulary ({', '.join(words)}); "
                "use the words of the scene captions (class names, colours, positions, 'a', 'and', 'the', ...)"
            )
        ids = ids + [self.eos_id]
        if len(ids) > self.context_length:
            raise CaptionError(
                f"caption {text!r} is {len(ids)} tokens with </s>, more than the context length "
                f"{self.context_length}; raise task.text.context_length"
            )
        out = torch.full((self.context_length,), self.pad_id, dtype=torch.long)
        out[: len(ids)] = torch.tensor(ids)
        return out

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """Captions -> long ``[B, context_length]``."""
        return torch.stack([self.encode(t) for t in texts])
