"""``mllm_seg``: fine-tune an MLLM to segment, with any mix of the three heads (and VQA samples).

Samples are referring-segmentation shards (fashion-scenes, refcoco, folder: image + ``mask.png`` + json with
``expression``); each sample is given one head, drawn from ``head_mix`` with a generator seeded by its key (so a
resumed run draws the same), and becomes a conversation turn: a question from varied templates, then the head's
answer (Text4Seg: a sentence and the ``<seg>`` block; STAMP: a sentence and one mask token per patch; LISA: a
sentence with ``[SEG]``). With ``semantic_share > 0`` a share of the text-head samples asks for every item
("segment every item .") and its answer labels each cell with the item's class name (from ``instances.png``).
Samples whose json has ``question``/``answer`` and no ``expression`` (fashion-vqa) train the plain LM loss, so
VQA and segmentation can share batches; with ``qa_share > 0`` a share of the referring samples is asked a grounded
question about its own scene instead (:func:`scene_question`: an item's colour, place or class, or the count).

No-target samples (json ``no_target: true``: fashion-scenes built with ``absent_share``; GRES, Liu et al.,
arXiv:2306.00968) train every head on their all-zero mask: the text head writes a ``<seg>`` block of background
only, the per-patch heads get all-zero patch targets (BCE and the smoothed Dice stay finite: Dice is
``sum(p) / (sum(p) + 1)`` there, whose gradient vanishes once the mask is large). GRES's ReLA adds a separate
no-target classifier; the per-patch heads' ``presence_weight`` plays its part (a BCE on each row's largest logit).
``no_target_answer`` (off by default) also replaces the answer sentence of heads whose template
names the phrase ("sure , here is the mask of {} ." -> "there is no red bag in this image ."). It is off because
:func:`mmtok.mllm.seg.heads.segment` feeds the head's own sentence at inference (teacher-forced, see heads.py): a
model trained to say "there is no ..." before its empty masks would never see that sentence at test time, and its
mask tokens would learn that the fed sentence means "present". Turn it on only with an inference path that lets the
model choose its sentence.

A batch is grouped by head and each group runs its own forward (the all-mask group's sequences end in ``N``
mask tokens, the others do not); the loss is the sample-weighted mean of the groups' losses.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mmtok.data.transforms import key_seed
from mmtok.mllm.modeling import IGNORE_INDEX
from mmtok.mllm.seg import heads as H
from mmtok.mllm.tasks import MLLMTask, MLLMTaskConfig, _left_pad
from mmtok.registries import TASKS

logger = logging.getLogger(__name__)


def _default_heads() -> dict[str, dict[str, Any]]:
    return {"allmask": {}, "text": {}, "segtoken": {}}


@dataclass
class SegTaskConfig(MLLMTaskConfig):
    """``MLLMTaskConfig`` (model, init, stage, LoRA, train_tower) plus what segmentation adds."""

    model: str = "llava_fashion_seg"
    stage: int = 2
    heads: dict[str, dict[str, Any]] = field(default_factory=_default_heads)  # head -> config overrides
    head_mix: dict[str, float] = field(default_factory=dict)  # head -> sampling weight ({} = uniform)
    semantic_share: float = 0.0  # share of text-head samples asking for every item (needs instances.png)
    # share of referring samples asked a grounded question about their scene instead (answer from the json's
    # ``items``: an item's class, colour, place, or the item count), trained with the plain LM loss like VQA
    qa_share: float = 0.0
    eval_heads: list[str] = field(default_factory=list)  # heads scored by segment() in evaluate ([] = all)
    # also train the LLM's input/output embeddings: the new <mask> / [SEG] rows start random (LISA trains
    # embed_tokens and lm_head beside its LoRA adapters); needed with lora_rank > 0
    train_embeddings: bool = False
    eval_refine: str = "bilinear"
    # answer sentence of no-target samples for heads whose template names the phrase ("" = the head's own sentence,
    # which is what segment() feeds at inference; e.g. "there is no {} in this image ." -- {} is the expression
    # without its leading "the"; every word is in builtin:fashion-seg). See the module docstring before setting it.
    no_target_answer: str = ""


class SegTask(MLLMTask):
    """LM loss + each head's mask loss on referring (and semantic) segmentation samples."""

    def __init__(self, config: SegTaskConfig):
        if not config.heads:
            raise ValueError("task.heads is empty: name at least one of text, allmask, segtoken")
        unknown = set(config.head_mix) - set(config.heads)
        if unknown:
            raise ValueError(f"head_mix names heads that are not in task.heads: {sorted(unknown)}")
        for name in ("semantic_share", "qa_share"):
            if not 0.0 <= getattr(config, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(config, name)}")
        if config.token_drop or config.extra_turns:
            raise ValueError(
                "task.token_drop and task.extra_turns are answer-task options, not supported by segmentation tasks "
                "(every mask head reads every image token; a sample is one expression): leave them at 0"
            )
        config.model_overrides = {**config.model_overrides, "seg_heads": dict(config.heads)}
        super().__init__(config)
        self.model.seg_heads.requires_grad_(True)
        if config.train_embeddings:
            self.model.llm.get_input_embeddings().requires_grad_(True)
            self.model.llm.get_output_embeddings().requires_grad_(True)
        names = list(config.heads)
        w = np.array([float(config.head_mix.get(n, 1.0 if not config.head_mix else 0.0)) for n in names])
        if w.sum() <= 0:
            raise ValueError(f"head_mix gives every head weight 0: {config.head_mix}")
        self._head_names, self._head_p = names, w / w.sum()

    # -- data -----------------------------------------------------------------------------------------------
    def sample_transform(self, split: str):
        """Decoded sample -> the pieces every head needs (the head itself is chosen in :meth:`collate`)."""
        cfg = self.config

        def transform(sample: dict[str, Any]) -> dict[str, Any]:
            meta = sample["json"]
            key = str(sample.get("__key__", ""))
            rng = np.random.default_rng(key_seed(key))  # same choices for a sample on every read
            image = sample["image"]
            if image.shape[0] == 1:
                image = image.expand(3, -1, -1)
            out = {
                "image": image,
                "mask": None,
                "semantic": None,
                "class_name": meta.get("class_name", ""),
                "no_target": bool(meta.get("no_target", False)),  # the expression names nothing: an empty mask
            }
            if "expression" not in meta:  # a VQA sample: plain LM loss
                if "question" not in meta or "answer" not in meta:
                    raise ValueError(f"sample {key}: json needs an expression (segmentation) or question/answer")
                return {**out, "question": meta["question"], "phrase": meta["answer"], "vqa": True}
            if "mask" not in sample:
                raise ValueError(f"sample {key} has an expression but no mask.png")
            if out["no_target"] and bool(sample["mask"].any()):
                raise ValueError(f"sample {key} says no_target but its mask.png is not empty; rebuild the shards")
            if split == "train" and cfg.qa_share and rng.random() < cfg.qa_share:
                qa = scene_question(meta.get("items", []), rng)
                if qa is not None:
                    return {**out, "question": qa[0], "phrase": qa[1], "vqa": True}
            phrase = meta["expression"]
            out.update(
                vqa=False,
                phrase=phrase,
                mask=torch.from_numpy(sample["mask"].numpy().astype(np.int64).clip(0, 1)),
                question=H.QUESTIONS[int(rng.integers(len(H.QUESTIONS)))].format(phrase),
            )
            if cfg.semantic_share and "instances" in sample and rng.random() < cfg.semantic_share:
                out["semantic"] = semantic_target(sample["instances"].numpy(), meta.get("items", []))
                out["semantic_question"] = H.SEMANTIC_QUESTIONS[int(rng.integers(len(H.SEMANTIC_QUESTIONS)))]
            return out

        return transform

    def assign_heads(self, n: int) -> list[str]:
        """Heads for the ``n`` segmentation samples of a batch, by position, in ``head_mix`` proportions.

        Every head gets its share of every batch (largest remainder, at least one sample while the batch has
        room), so each process runs every head at each step: DDP and ZeRO-3 see the same parameters used on
        every rank, and the logged keys are the same everywhere.
        """
        quota = self._head_p * n
        counts = np.floor(quota).astype(int)
        for i in np.argsort(-(quota - counts), kind="stable")[: n - counts.sum()]:
            counts[i] += 1
        for i in range(len(counts)):  # a head with weight keeps at least one sample while another has two
            if counts[i] == 0 and self._head_p[i] > 0 and counts.max() > 1:
                counts[int(counts.argmax())] -= 1
                counts[i] = 1
        return [name for name, c in zip(self._head_names, counts) for _ in range(c)]

    def encode(self, s: dict[str, Any], head_name: str) -> dict[str, Any]:
        """Token ids and labels of one sample answered by ``head_name`` (or its VQA answer)."""
        from mmtok.mllm.text import encode_training_pair

        tok = self.model.tokenizer
        if s["vqa"]:
            ids, labels = encode_training_pair(tok, s["question"], s["phrase"])
            return {**s, "head": "vqa", "input_ids": ids, "labels": labels}
        head = self.model.seg_heads[head_name]
        question, target, names = s["question"], s["mask"].numpy(), [s["phrase"]]
        if head.kind == "text":
            names = [head.fg_label(s["phrase"], s["class_name"])]
            if s["semantic"] is not None:
                (target, names), question = s["semantic"], s["semantic_question"]
        semantic = head.kind == "text" and s["semantic"] is not None  # asks for every item: there is a target
        # the sentence names what the mask shows, as inference feeds it (evaluate.semantic_miou: "every item")
        answer = head.answer_text(H.SEMANTIC_PHRASE if semantic else s["phrase"], target, names)
        if s.get("no_target") and not semantic and self.config.no_target_answer and "{}" in head.config.answer:
            sentence = head.config.answer.format(s["phrase"])
            answer = no_target_answer(answer, sentence, self.config.no_target_answer, s["phrase"])
        ids, labels = encode_training_pair(tok, question, answer)
        tail = head.tail_length(self.model.num_image_tokens)
        if tail:
            ids = ids + [H.token_id(self.model, "<mask>")] * tail
            labels = labels + [IGNORE_INDEX] * tail
        return {**s, "head": head_name, "input_ids": ids, "labels": labels, "question": question}

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        seg = [i for i, s in enumerate(samples) if not s["vqa"]]
        heads = dict(zip(seg, self.assign_heads(len(seg))))
        samples = [self.encode(s, heads.get(i, "vqa")) for i, s in enumerate(samples)]
        pad = self.model.tokenizer.pad_token_id or 0
        groups: dict[str, dict[str, Any]] = {}
        for name in [*self._head_names, "vqa"]:
            idx = [i for i, s in enumerate(samples) if s["head"] == name]
            if not idx:
                continue
            sub = [samples[i] for i in idx]
            ids, att, labels = _left_pad([s["input_ids"] for s in sub], pad, [s["labels"] for s in sub])
            g = {"index": torch.tensor(idx), "input_ids": ids, "attention_mask": att, "labels": labels}
            g["phrases"] = [s["phrase"] for s in sub]
            g["questions"] = [s["question"] for s in sub]
            if name != "vqa":
                g["masks"] = torch.stack([s["mask"] for s in sub])
                g["no_target"] = [bool(s.get("no_target")) for s in sub]
            groups[name] = g
        return {"images": torch.stack([s["image"] for s in samples]), "groups": groups}

    # -- training -------------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        total = batch["images"].shape[0]
        out: dict[str, torch.Tensor] = {}
        loss = None
        for name, g in batch["groups"].items():
            sub = {**g, "images": batch["images"][g["index"]]}
            terms = H.seg_forward(self.model, name if name != "vqa" else "", sub)
            share = g["index"].numel() / total
            loss = terms["loss"] * share if loss is None else loss + terms["loss"] * share
            out.update({f"{name}/{k}": v.detach() for k, v in terms.items()})
        # A head without samples in this batch (only in batches smaller than the number of heads) still runs
        # once with weight 0, so every process uses the same parameters (DDP buckets, ZeRO-3 gathers).
        for name, head in self.model.seg_heads.items():
            if name not in batch["groups"]:
                loss = loss + 0.0 * H.touch(head, loss)
        out["loss"] = loss
        return out

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Any]) -> dict[str, float]:
        """Mean loss terms, and per head gIoU / cIoU of ``segment()`` masks on the referring samples (and N-acc /
        T-acc where the samples include no-target ones)."""
        from mmtok.mllm.seg.metrics import SegMeter

        heads = self.config.eval_heads or list(self.model.seg_heads)
        meters = {h: SegMeter() for h in heads}
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for batch in batches:
            for k, v in self(batch).items():
                sums[k] = sums.get(k, 0.0) + float(v)
                counts[k] = counts.get(k, 0) + 1
            for g in batch["groups"].values():
                if "masks" not in g:
                    continue
                images = batch["images"][g["index"]]
                for h in heads:
                    res = self.model.segment(
                        images, g["phrases"], head=h, refine=self.config.eval_refine, questions=g["questions"]
                    )
                    flags = g.get("no_target") or [False] * len(res.repairs)
                    for pred, gt, rep, nt in zip(res.masks, g["masks"], res.repairs, flags):
                        meters[h].update(pred.cpu().numpy(), gt.cpu().numpy(), repairs=rep, no_target=nt or None)
        out = {k: v / counts[k] for k, v in sums.items()}
        for h, m in meters.items():
            if len(m):
                s = m.summary()
                out[f"{h}/giou"], out[f"{h}/ciou"] = s["giou"], s["ciou"]
                # only where the set has no-target samples (today's logs keep their keys); T-acc needs targets
                if s["n_acc"] is not None:
                    out[f"{h}/n_acc"] = s["n_acc"]
                    if s["t_acc"] is not None:
                        out[f"{h}/t_acc"] = s["t_acc"]
        return out

    def synthetic_batch(self, batch_size: int, shift: int = 0) -> dict[str, Any]:
        """Scenes of one red square on a dark noisy canvas, the square as the mask (benchmarks, smoke tests).

        The square moves with the sample index, so a head must read the image (not a fixed prior) to fit it.
        ``shift`` pixels move every square down and right off the 4 x 4 cell lattice (``side // 8`` puts its edges
        in the middle of the cells; the canvas edge may then cut a square).
        """
        side = int(self.model.tower.image_size)
        gen = torch.Generator().manual_seed(0)
        samples = []
        transform = self.sample_transform("train")
        for i in range(batch_size):
            mask = torch.zeros(side, side, dtype=torch.long)
            y, x = (side // 4) * (i % 3) + shift, (side // 4) * ((i // 3) % 3) + shift  # 4 x 4 cell lattice + shift
            mask[y : y + side // 2, x : x + side // 2] = 1
            image = torch.rand(3, side, side, generator=gen) * 0.15
            image[0] = torch.where(mask.bool(), 0.9, image[0])
            meta = {"expression": "the red bag", "class_name": "bag"}
            samples.append(transform({"__key__": f"synthetic_{i}", "image": image, "mask": mask, "json": meta}))
        return self.collate(samples)


def no_target_answer(answer: str, sentence: str, template: str, phrase: str) -> str:
    """``answer`` with its leading ``sentence`` replaced by ``template`` filled with ``phrase``.

    The phrase loses its leading article ("the red bag" -> "there is no red bag in this image ."); what follows the
    sentence (the text head's ``<seg>`` block of background only) is kept as the head wrote it.
    """
    if not answer.startswith(sentence):
        raise ValueError(f"the head's answer {answer[:40]!r} does not start with its sentence {sentence!r}")
    bare = phrase[4:] if phrase.lower().startswith("the ") else phrase
    return template.format(bare) + answer[len(sentence) :]


_COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def scene_question(items: list[dict[str, Any]], rng: np.random.Generator) -> tuple[str, str] | None:
    """A question about one item of a scene whose answer the scene's metadata fixes, or None (no items).

    Kinds, drawn uniformly among those with a unique answer: the colour or the place of an item named by its
    (unique) referring expression, the class of the only item of a colour or at a place, the number of items.
    Every word is in the ``builtin:fashion-seg`` vocabulary. These teach the LLM which words name what it sees,
    the binding a referring-segmentation head needs (LISA and Text4Seg mix VQA data for the same reason).
    """
    from mmtok.data.sources.scenes import position_phrase

    items = [it for it in items if it.get("expression") and it.get("class_name")]
    if not items:
        return None
    it = items[int(rng.integers(len(items)))]
    colours = [o.get("colour") for o in items]
    places = [o.get("position") for o in items]
    kinds = [("how many items are there ?", _COUNT_WORDS[min(len(items), 10)])]
    if it.get("colour"):
        kinds.append((f"what colour is {it['expression']} ?", it["colour"]))
        if colours.count(it["colour"]) == 1:
            kinds.append((f"what is the {it['colour']} item ?", it["class_name"]))
    if it.get("position"):
        kinds.append((f"where is {it['expression']} ?", it["position"]))
        if places.count(it["position"]) == 1:
            kinds.append((f"what is {position_phrase(it['position'])} ?", it["class_name"]))
    q, a = kinds[int(rng.integers(len(kinds)))]
    return q, a.lower()


def semantic_target(instances: np.ndarray, items: list[dict[str, Any]]) -> tuple[np.ndarray, list[str]]:
    """``instances [H, W]`` (0 bg, i = items[i-1]) -> class-id mask and its names (classes in first-seen order)."""
    names: list[str] = []
    lut = np.zeros(max(len(items), int(instances.max(initial=0))) + 1, np.int64)
    for i, it in enumerate(items, start=1):
        name = it.get("class_name", f"item {i}")
        if name not in names:
            names.append(name)
        lut[i] = names.index(name) + 1
    return lut[instances.astype(np.int64)], names or ["item"]


TASKS.add(
    "mllm_seg",
    SegTask,
    config=SegTaskConfig,
    help="MLLM segmentation: text-as-mask (Text4Seg), all-mask head (STAMP), [SEG] token (LISA); VQA mixable",
)
