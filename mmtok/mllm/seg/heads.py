"""Three ways to get a mask out of the MLLM, behind one call: ``segment(model, images, expressions, head=...)``.

* ``text`` -- Text4Seg (Lan et al., "Text4Seg: Reimagining Image Segmentation as Text Generation",
  arXiv:2410.09855; reference code mc-lan/Text4Seg): the LLM writes the mask as semantic descriptors
  (row-wise RLE by default, any format of :mod:`mmtok.mllm.seg.formats`) after a short answer sentence; the
  text is decoded (totally: bad text gives a well-formed mask and a repair count).
* ``allmask`` -- STAMP ("all-mask prediction"): after the answer, one ``<mask>`` token per image patch whose input
  embedding is ``embed(<mask>)`` + that patch's projected visual feature; one forward pass in which the mask tokens
  see the whole history causally and each other both ways; a linear head gives one logit per patch. Loss = LM
  cross-entropy + 0.3 BCE + 0.7 Dice. The attention pattern is built in mmtok's own decoder loop
  (``bidirectional_tail`` / :func:`mmtok.mllm.decoder.decode_chunk`), SDPA stays on.
* ``segtoken`` -- LISA (Lai et al., arXiv:2308.00692) / READ (arXiv:2412.17741) baseline: the answer contains a
  ``[SEG]`` token; its last hidden state, projected, is compared (scaled dot product) with the projected patch
  features, giving one logit per patch. LISA decodes with SAM; we have no SAM, so the patch logits are the mask
  (READ's similarity map is exactly this map). Loss = LM cross-entropy + 2.0 BCE + 0.5 Dice (LISA's weights).

What mmtok does differently, on purpose:

* The answer sentence is the training template and is fed (teacher-forced) at inference, not generated: referring
  segmentation has one fixed answer, and in a model that carries several heads (which share the question
  templates) the sentence is what selects the head. ``allmask`` / ``segtoken`` then cost one prefill (+ one chunk
  of mask tokens) and no decoding loop; ``text`` generates the ``<seg>`` block after the sentence.
* Mask tokens get the positions that follow the answer (``last + 1 ..``). STAMP's reference code
  (HKUST-LongGroup/STAMP, ``model/qwen_changes.py``) places the mask block after the text like a second image in
  Qwen2-VL's M-RoPE (the image's t/h/w grid, offset past the text); in a 1-D RoPE LLM (LLaVA-style, image tokens
  numbered in sequence) the same rule is consecutive positions after the text, which is what we do. STAMP runs the
  mask tokens in a second forward over the sequence cut after its ``<|seg|>`` token; we append them after the
  answer in the LM-loss forward (causal attention keeps the answer's loss unchanged by the tail). Under
  visual-token pruning or merging (ToMe, PiToMe) the prefill (prompt + answer) is reduced as in generation and
  the mask tokens are appended after it through the KV cache, so they still carry every patch's feature and produce
  a full grid.
* Targets of the per-patch heads are, by default, the share of each patch covered by the object (area-average
  pooling), so bilinear upsampling of the sigmoid scores recovers sub-patch boundaries (STAMP refines with SAM,
  which we do not have); a mask is ``score > 0.5``. ``target="reference"`` uses STAMP's rule instead: the mask
  resized bilinearly to the grid (``align_corners=False``), truncated to an integer, so a cell is foreground only
  where the interpolated value reaches 1.
* ``cells`` (default 1, the published heads): a per-patch head may predict a ``cells x cells`` sub-grid per patch
  (the all-mask head's linear layer gives ``cells**2`` logits per mask token; the ``[SEG]`` head projects
  ``cells**2`` keys per patch), so a tower with coarse patches (cheap: fewer tokens in the LLM) still gives a fine
  mask grid: 8 x 8 patches with ``cells: 2`` score a 16 x 16 grid, Text4Seg's. An extension of ours.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import einops
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmtok.registries import SEG_HEADS

logger = logging.getLogger(__name__)

HEAD_ORDER = ("allmask", "segtoken", "text")  # also the default head: the first a model has

# Question templates (varied, as Text4Seg's conversation data); {} is the referring expression.
QUESTIONS = (
    "segment {} .",
    "please segment {} .",
    "can you segment {} in this image ?",
    "where is {} ? answer with a mask .",
    "show me {} .",
    "find {} and give the mask .",
)
SEMANTIC_QUESTIONS = ("segment every item .", "please segment all items in this image .")
SEMANTIC_PHRASE = "every item"  # what the answer sentence names for a semantic ("every item") mask


@dataclass
class TextHeadConfig:
    """``text``: the LLM writes the mask in a text format."""

    format: str = "rrle"  # a SEG_FORMATS name: descriptors | rrle | bricks
    grid: int = 16  # the format's grid side
    label: str = "phrase"  # foreground label: "phrase" (the expression, Text4Seg) | "class" | any fixed word
    answer: str = "sure , here is the mask of {} :"  # sentence before the <seg> block
    max_new_tokens: int = 0  # 0 = enough for the worst case of the grid, capped at 1024
    # the format's own options beyond ``grid``, e.g. bricks' ``{box_bins: 16, brick_grid: 8}``
    format_options: dict = field(default_factory=dict)


@dataclass
class AllMaskHeadConfig:
    """``allmask``: one mask token per image patch, one linear logit each (STAMP)."""

    answer: str = "sure , here is the mask of {} ."
    bce_weight: float = 0.3
    dice_weight: float = 0.7
    target: str = "area"  # patch targets: "area" (covered share, soft) | "reference" (STAMP's hard rule)
    cells: int = 1  # mask cells per patch side (1 = STAMP: one logit per patch; 2 = a 2 x 2 sub-grid per token)
    width: int = 0  # LLM hidden size (0 = filled in from the model)
    presence_weight: float = 0.0  # image-level "anything there" BCE on the largest logit (for no-target data)


@dataclass
class SegTokenHeadConfig:
    """``segtoken``: the ``[SEG]`` hidden state against the patch features (LISA / READ)."""

    answer: str = "sure , [SEG] ."
    dim: int = 64  # shared embedding width of the [SEG] and patch projections
    bce_weight: float = 2.0
    dice_weight: float = 0.5
    target: str = "area"  # patch targets: "area" (covered share, soft) | "reference" (hard, as STAMP's)
    presence_weight: float = 0.0  # image-level "anything there" BCE on the largest logit (for no-target data)
    cells: int = 1  # mask cells per patch side (1 = one score per patch, as LISA's / READ's similarity map)
    width: int = 0  # LLM hidden size (0 = filled in from the model)


class SegHead(nn.Module):
    """Base of the registered heads: what the answer text is, which tokens it needs, how it scores patches."""

    kind: str = ""
    tokens: tuple[str, ...] = ()  # extra tokens the tokenizer must know

    def __init__(self, config: Any):
        super().__init__()
        self.config = config

    def answer_text(self, phrase: str, target: np.ndarray | None = None, names: list[str] | None = None) -> str:
        return self.config.answer.format(phrase)

    def tail_length(self, n_image: int) -> int:
        """Tokens appended after the answer (the all-mask head's mask tokens)."""
        return 0

    def mask_grid(self, g: int) -> int:
        """Side of the head's score grid for a ``g x g`` patch grid (``g * cells`` for the per-patch heads)."""
        return g * getattr(self.config, "cells", 1)


class TextHead(SegHead):
    kind = "text"

    def __init__(self, config: TextHeadConfig):
        super().__init__(config)
        from mmtok import registries

        self.format = registries.get("seg format").create(config.format, grid=config.grid, **config.format_options)

    def fg_label(self, phrase: str, class_name: str = "") -> str:
        lab = self.config.label
        return phrase if lab == "phrase" else (class_name or phrase) if lab == "class" else lab

    def answer_text(self, phrase: str, target: np.ndarray | None = None, names: list[str] | None = None) -> str:
        """The sentence, a newline, then the ``<seg>`` block of ``target [H, W]`` (0 bg, k -> names[k-1])."""
        if target is None or names is None:
            raise ValueError("the text head's answer needs the target mask and its label names")
        return f"{self.config.answer.format(phrase)}\n{self.format.encode(target, names)}"

    def max_new_tokens(self) -> int:
        if self.config.max_new_tokens:
            return self.config.max_new_tokens
        rows = self.format.grid_shape[0]  # rows of text: the grid's, or bricks' in-box grid's (after its box)
        return min(1024, 64 + 12 * rows * 2)  # two runs per row of a typical object, ~6 tokens each, + sentence


class AllMaskHead(SegHead):
    kind = "allmask"
    tokens = ("<mask>",)

    def __init__(self, config: AllMaskHeadConfig):
        super().__init__(config)
        if config.cells < 1:
            raise ValueError(f"allmask cells must be >= 1 (mask cells per patch side), got {config.cells}")
        self.proj = nn.Linear(config.width or 64, config.cells**2)

    def tail_length(self, n_image: int) -> int:
        return n_image

    def forward(self, hidden_tail: torch.Tensor) -> torch.Tensor:
        """``hidden_tail [B, N, D]`` (final-norm states of the mask tokens, ``N = g * g``) -> logits
        ``[B, N * cells**2]`` in raster order of the ``(g * cells)``-side grid."""
        return cells_to_grid(self.proj(hidden_tail.to(self.proj.weight.dtype)), self.config.cells)

    logits = nn.Module.__call__  # through __call__, so ZeRO-3 gathers the parameters


class SegTokenHead(SegHead):
    kind = "segtoken"
    tokens = ("[SEG]",)

    def __init__(self, config: SegTokenHeadConfig):
        super().__init__(config)
        d, width = config.dim, config.width or 64
        if config.cells < 1:
            raise ValueError(f"segtoken cells must be >= 1 (mask cells per patch side), got {config.cells}")
        # LISA's text_hidden_fcs: Linear -> ReLU -> Linear on the [SEG] state
        self.text_proj = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, d))
        # one key per mask cell: cells**2 keys per patch (one, as in LISA / READ, by default)
        self.patch_proj = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, d * config.cells**2))
        self.bias = nn.Parameter(torch.zeros(1))  # 1-D: DeepSpeed broadcasts parameters as bytes

    def answer_text(self, phrase: str, target: np.ndarray | None = None, names: list[str] | None = None) -> str:
        return self.config.answer.format(phrase) if "{}" in self.config.answer else self.config.answer

    logits = nn.Module.__call__  # through __call__, so ZeRO-3 gathers the parameters (bias included)

    def forward(self, seg_hidden: torch.Tensor, patch_feats: torch.Tensor) -> torch.Tensor:
        """``seg_hidden [B, D]``, ``patch_feats [B, N, D]`` -> ``[B, N * cells**2]`` scaled dot products (raster
        order of the ``(g * cells)``-side grid)."""
        dt = self.bias.dtype
        q = self.text_proj(seg_hidden.to(dt))  # [B, d]
        k = self.patch_proj(patch_feats.to(dt)).unflatten(-1, (-1, q.shape[-1]))  # [B, N, cells**2, d]
        logits = torch.einsum("bd,bncd->bnc", q, k) / math.sqrt(q.shape[-1]) + self.bias
        return cells_to_grid(logits, self.config.cells)


SEG_HEADS.add("text", TextHead, config=TextHeadConfig, help="Text4Seg: the LLM writes the mask as text (R-RLE)")
SEG_HEADS.add("allmask", AllMaskHead, config=AllMaskHeadConfig, help="STAMP: one mask token per patch, one pass")
SEG_HEADS.add("segtoken", SegTokenHead, config=SegTokenHeadConfig, help="LISA/READ: [SEG] state x patch features")


def build_seg_heads(model: Any, specs: dict[str, dict[str, Any]]) -> nn.ModuleDict:
    """Heads named in ``specs`` for ``model`` (adds their tokens to its tokenizer and embedding table)."""
    from mmtok import registries

    reg = registries.get("seg head")
    width = model.llm.config.hidden_size
    heads = nn.ModuleDict()
    unknown = [n for n in specs if n not in HEAD_ORDER]
    if unknown:
        raise ValueError(f"unknown segmentation heads {unknown}; choose from {list(HEAD_ORDER)}")
    for name in sorted(specs, key=HEAD_ORDER.index):  # a canonical order: saved configs may sort their keys
        kwargs = dict(specs[name] or {})
        if "width" in {f.name for f in dataclasses.fields(reg.get(name).config)}:
            kwargs["width"] = width
        head = reg.create(name, **kwargs)
        if getattr(head.config, "target", "area") not in TARGETS:
            raise ValueError(f"{name} head: unknown target {head.config.target!r}; choose from {list(TARGETS)}")
        heads[name] = head
        if head.tokens:
            _ensure_tokens(model, head.tokens)
        if head.kind != "text" and model.config.feature_select != "patch":
            raise ValueError(f"the {name} head needs one image token per patch: set feature_select='patch'")
    # the heads config is saved with their resolved fields so a reload rebuilds the same heads
    model.config.seg_heads = {n: dataclasses.asdict(h.config) for n, h in heads.items()}
    return heads


def _ensure_tokens(model: Any, tokens: tuple[str, ...]) -> None:
    tok = model.tokenizer
    if tok is None:
        raise ValueError("segmentation heads need the MLLM's tokenizer (set MLLMConfig.tokenizer)")
    missing = [t for t in tokens if tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id)]
    if missing:
        tok.add_tokens(missing, special_tokens=True)  # kept whole by the pre-tokenizer, any tokenizer class
    if len(tok) > model.llm.get_input_embeddings().num_embeddings:
        from mmtok.mllm.modeling import _llm_dict

        model.llm.resize_token_embeddings(len(tok))
        model.config.llm = _llm_dict(model.llm.config)


def token_id(model: Any, token: str) -> int:
    tid = model.tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == model.tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {token!r} token: build the model with that head")
    return int(tid)


def patch_grid(model: Any) -> int:
    n = model.num_image_tokens
    g = int(round(math.sqrt(n)))
    if g * g != n:
        raise ValueError(f"per-patch heads need a square grid of image tokens, got {n}")
    return g


def cells_to_grid(logits: torch.Tensor, cells: int) -> torch.Tensor:
    """Per-patch cell logits ``[B, g*g, cells**2]`` (cells in raster order inside each patch) -> ``[B, (g*cells)**2]``
    in raster order of the whole ``(g * cells)``-side grid (a pixel shuffle)."""
    b, n, _ = logits.shape
    if cells == 1:
        return logits[..., 0]
    g = int(round(math.sqrt(n)))
    if g * g != n:  # patch grids are square (`patch_grid` checks); `touch` runs a single patch, a 1 x 1 grid
        raise ValueError(f"per-patch cells need a square grid of patches, got {n}")
    return einops.rearrange(logits, "b (gh gw) (ch cw) -> b (gh ch gw cw)", gh=g, ch=cells)


def touch(head: SegHead, like: torch.Tensor) -> torch.Tensor:
    """A cheap scalar that runs ``head`` once on zeros (keeps its parameters in the graph on every rank)."""
    if head.kind == "text":  # no parameters
        return like.new_zeros(())
    zeros = like.new_zeros(1, 1, head.config.width or 64)
    if head.kind == "allmask":
        return head(zeros).sum()
    return head(zeros[:, 0], zeros).sum()


# ----------------------------------------------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------------------------------------------
def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss per sample, averaged: ``logits, target [B, N]`` (target in [0, 1])."""
    p = logits.float().sigmoid()
    inter = (p * target).sum(-1)
    return (1 - (2 * inter + smooth) / (p.sum(-1) + target.sum(-1) + smooth)).mean()


def mask_losses(logits: torch.Tensor, target: torch.Tensor, head: Any) -> dict[str, torch.Tensor]:
    """BCE + Dice of ``logits, target [B, N]``, plus with ``presence_weight`` an image-level "is anything there" term.

    The presence term (for no-target expressions, as GRES's no-target classifier) is the BCE of each row's largest
    logit against whether its target has any foreground: on an empty target Dice's gradient vanishes once the
    predicted mask is large, so without it only the per-cell BCE pushes such masks to empty.
    """
    bce = F.binary_cross_entropy_with_logits(logits.float(), target.float())
    dice = dice_loss(logits, target.float())
    out = {"bce": bce, "dice": dice, "mask_loss": head.config.bce_weight * bce + head.config.dice_weight * dice}
    weight = getattr(head.config, "presence_weight", 0.0)
    if weight:
        present = (target.amax(-1) > 0).float()  # [B]
        out["presence"] = F.binary_cross_entropy_with_logits(logits.float().amax(-1), present)
        out["mask_loss"] = out["mask_loss"] + weight * out["presence"]
    return out


TARGETS = ("area", "reference")


def grid_targets(masks: torch.Tensor, g: int, rule: str = "area") -> torch.Tensor:
    """``masks [B, H, W]`` (0/1) -> per-patch targets ``[B, g*g]`` in [0, 1].

    ``rule="area"``: the share of each of the ``g x g`` patches the object covers. ``rule="reference"``: STAMP's
    target, the mask resized bilinearly (``align_corners=False``, no antialiasing) and truncated to an integer, so
    a cell is 1 only where the interpolated value is exactly 1 (its sample point lies inside the object).
    """
    x = masks[:, None].float()
    if rule == "area":
        return F.adaptive_avg_pool2d(x, g).flatten(1)
    if rule == "reference":
        return F.interpolate(x, size=(g, g), mode="bilinear", align_corners=False).long().float().flatten(1)
    raise ValueError(f"unknown patch target rule {rule!r}; choose from {list(TARGETS)}")


# ----------------------------------------------------------------------------------------------------------------
# training forward (one head per call; the task groups a batch by head)
# ----------------------------------------------------------------------------------------------------------------
def seg_forward(model: Any, head_name: str, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Loss terms of one head on a batch built by :class:`mmtok.mllm.seg.tasks.SegTask`.

    ``batch``: ``images [B, 3, H, W]``, ``input_ids / attention_mask / labels [B, L]`` (prompt + answer, and for
    ``allmask`` the ``N`` mask tokens at the end), ``masks [B, H, W]``.
    """
    head = model.seg_heads[head_name] if head_name in model.seg_heads else None
    prep = model.prepare(batch["input_ids"], batch["attention_mask"], batch["images"], labels=batch["labels"])
    if head is None or head.kind == "text":  # plain next-token loss (text-as-mask, VQA)
        out, _ = model._run(prep, None, use_cache=False)
        res = model.lm_outputs(prep, out, loss_only=True)
        return {"loss": res.loss, "lm_loss": res.loss.detach()}
    target = grid_targets(batch["masks"].to(model.device), head.mask_grid(patch_grid(model)), head.config.target)
    feats = prep.ctx.image_features  # [B, N, D] projected patch features
    if head.kind == "allmask":
        n = feats.shape[1]
        prep.embeds = torch.cat([prep.embeds[:, :-n], prep.embeds[:, -n:] + feats.to(prep.embeds)], dim=1)
        out, _ = model._run(prep, None, use_cache=False, bidirectional_tail=n)
        res = model.lm_outputs(prep, out, tail=n, loss_only=True)
        logits = head.logits(out.hidden[:, -n:])
    else:
        out, _ = model._run(prep, None, use_cache=False)
        res = model.lm_outputs(prep, out, loss_only=True)
        logits = head.logits(_seg_state(model, prep.input_ids, out), feats)
    terms = mask_losses(logits, target, head)
    loss = res.loss + terms["mask_loss"]
    return {"loss": loss, "lm_loss": res.loss.detach(), **{k: v.detach() for k, v in terms.items()}}


def _seg_state(model: Any, input_ids: torch.Tensor, out: Any) -> torch.Tensor:
    """Final hidden state at the (last) ``[SEG]`` token of each row ``[B, D]``."""
    seg_id = token_id(model, "[SEG]")
    ids = input_ids if out.keep_index is None else input_ids.gather(1, out.keep_index)
    is_seg = ids == seg_id
    if not bool(is_seg.any(1).all()):
        raise ValueError("a row has no [SEG] token: the segtoken answer template must contain [SEG]")
    last = (is_seg.long() * torch.arange(ids.shape[1], device=ids.device)).argmax(1)  # [B]
    return out.hidden[torch.arange(ids.shape[0], device=ids.device), last]


# ----------------------------------------------------------------------------------------------------------------
# inference
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class SegOutput:
    masks: torch.Tensor  # [B, H, W] bool at the input image resolution
    scores: torch.Tensor  # [B, gh, gw] float in [0, 1] on the head's grid
    text: list[str] | None  # the generated answers (text head), else None
    repairs: list[int]  # decode repairs per sample (text head; 0 for the others)
    seconds: float  # wall time of the whole call
    image_keep: torch.Tensor | None = None  # [B, K] image tokens kept by the pruner (None = all)
    tokens: list[int] = field(default_factory=list)  # generated tokens per sample (text head)


def question_for(expression: str, semantic: bool = False) -> str:
    """The default inference question (the first template)."""
    return SEMANTIC_QUESTIONS[0] if semantic else QUESTIONS[0].format(expression)


@torch.no_grad()
def segment(
    model: Any,
    images: torch.Tensor,
    expressions: list[str],
    head: str = "",
    prune: str | None = None,
    keep: int = 0,
    refine: str = "bilinear",
    pruner: Any = None,
    questions: list[str] | None = None,
    threshold: float = 0.5,
) -> SegOutput:
    """Masks of the referred objects.

    Args:
        model: An :class:`~mmtok.mllm.modeling.MLLM` with segmentation heads.
        images: ``[B, 3, H, W]`` in [0, 1].
        expressions: One referring expression per image.
        head: ``text`` | ``allmask`` | ``segtoken`` ("" = the model's first head).
        prune, keep: A registered pruner name and its token budget (or pass ``pruner``).
        refine: Coarse grid -> full resolution: ``none`` | ``bilinear`` | ``guided`` (see ``seg.refine``).
        questions: Override the prompt per sample (default: the first question template).
        threshold: A pixel is in the mask where its refined score is ``> threshold`` (0.5 = LISA's sigmoid > 0.5;
            the best cIoU threshold is usually lower, choose it on a validation split with ``mmtok eval seg
            --thresholds``).
    """
    from mmtok.mllm.seg.refine import refine_decoded
    from mmtok.mllm.text import chat_prompt, encode_prompts

    t0 = time.perf_counter()
    if not model.seg_heads:
        raise ValueError("this MLLM has no segmentation heads; train one with `mmtok train --config seg_*.yaml`")
    head = head or next(iter(model.seg_heads))
    if head not in model.seg_heads:
        raise ValueError(f"the model has no {head!r} head; it has {list(model.seg_heads)}")
    if len(expressions) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(expressions)} expressions")
    if any(not e.strip() for e in expressions):
        raise ValueError("an expression is empty: say what to segment")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    h = model.seg_heads[head]
    if pruner is None and prune and prune != "none":
        from mmtok import registries

        pruner = registries.get("pruner").create(prune, num_keep=keep)
    tok = model.tokenizer
    qs = questions or [question_for(e) for e in expressions]
    if h.kind == "text":
        # The answer sentence is fed, the descriptors generated: one model may carry several heads that share
        # the question templates, and the fixed sentence is what tells it to write descriptors.
        prompts = [f"{chat_prompt(tok, q)} {h.config.answer.format(e)}" for q, e in zip(qs, expressions)]
        ids, att = encode_prompts(tok, prompts, model.device)
        gen = model.generate(
            ids, images, att, pruner=pruner, max_new_tokens=h.max_new_tokens(), eos_token_id=tok.eos_token_id
        )
        image_keep = gen.image_keep
        rows = gen.sequences.tolist()
        text_out = [_decode_text(tok, row) for row in rows]
        n_tokens = [_length(tok, row) for row in rows]
        # referring: every non-background label is the object (a model may misspell its label)
        decoded = [h.format.decode(t) for t in text_out]
        fg = [dataclasses.replace(d, labels=(d.labels > 0).astype(np.int64)) for d in decoded]
        repairs = [d.repairs for d in decoded]
        scores = torch.stack([torch.from_numpy(d.labels.astype(np.float32)) for d in fg])
        masks = torch.stack(
            [torch.from_numpy(refine_decoded(d, _rgb(img), refine) > threshold) for d, img in zip(fg, images)]
        )
        return SegOutput(masks, scores, text_out, repairs, time.perf_counter() - t0, image_keep, n_tokens)
    answers = [chat_prompt(tok, q, h.answer_text(e)) for q, e in zip(qs, expressions)]
    from mmtok.mllm.modeling import inference_safe

    # no autograd bookkeeping per operator (see MLLM.generate); the results are copied out of inference mode
    with torch.inference_mode(inference_safe(model)):
        scores, image_keep = _patch_scores(model, h, answers, images, pruner)
    scores = scores.clone()
    image_keep = image_keep.clone() if image_keep is not None else None
    opts = {"radius": guided_radius(images, patch_grid(model))} if refine == "guided" else {}
    masks = refine_masks(scores, images, refine, threshold, **opts)
    return SegOutput(masks, scores, None, [0] * len(qs), time.perf_counter() - t0, image_keep)


def _patch_scores(model: Any, head: Any, texts: list[str], images: torch.Tensor, pruner: Any):
    """Sigmoid scores ``[B, g, g]`` of a per-patch head on prompt+answer ``texts`` (teacher-forced)."""
    from mmtok.mllm import decoder as dec
    from mmtok.mllm.text import encode_prompts

    g = head.mask_grid(patch_grid(model))
    ids, att = encode_prompts(model.tokenizer, texts, model.device)
    prep = model.prepare(ids, att, images)
    feats = prep.ctx.image_features  # [B, N, D] (all patches, also under pruning)
    if head.kind == "allmask":
        out, keep = model._run(prep, pruner, use_cache=True)
        mask_emb = model.llm.get_input_embeddings()(
            torch.full(feats.shape[:2], token_id(model, "<mask>"), dtype=torch.long, device=model.device)
        )
        hidden = dec.decode_chunk(model.llm, mask_emb + feats.to(mask_emb), out.state, bidirectional=True)
        logits = head.logits(hidden)
    else:
        out, keep = model._run(prep, pruner, use_cache=False)
        logits = head.logits(_seg_state(model, prep.input_ids, out), feats)
    return logits.float().sigmoid().view(-1, g, g).cpu(), keep


def refine_masks(
    scores: torch.Tensor, images: torch.Tensor, method: str = "bilinear", threshold: float = 0.5, **kw: Any
) -> torch.Tensor:
    """Grid scores ``[B, gh, gw]`` in [0, 1] -> boolean masks ``[B, H, W]`` (refined score > threshold;
    ``kw``: the method's options, e.g. the guided filter's ``radius``)."""
    from mmtok.mllm.seg.refine import refine

    out = [refine(s.numpy().astype(np.float32), _rgb(img), method, **kw) > threshold for s, img in zip(scores, images)]
    return torch.from_numpy(np.stack(out))


def guided_radius(images: torch.Tensor, patches: int) -> int:
    """The guided filter's radius for a per-patch head: one tower patch, in pixels of the image being segmented.

    A per-patch head's scores are uncertain over about one patch whatever the image size (the tower sees the
    image resized to its input), so the window follows the image: 8 px for the 64 px scenes recipe (8 x 8 patches;
    its validation split scored 4 / 6 / 8 / 10 / 12 px at 0.695 / 0.725 / 0.738 / 0.742 / 0.742 cIoU at > 0.3),
    16 px on 128 px scenes, where a fixed 8 px lost 0.06 cIoU (0.681 vs 0.742; README, Segmentation).
    """
    return max(1, round(max(images.shape[-2:]) / patches))


def _rgb(image: torch.Tensor) -> np.ndarray:
    """``[3, H, W]`` in [0, 1] -> ``[H, W, 3]`` uint8 (the guide image of refinement)."""
    return (image.detach().cpu().float().clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def _decode_text(tok: Any, row: list[int]) -> str:
    """Generated ids -> text up to EOS, keeping the format's markers (``<seg>``...)."""
    eos = tok.eos_token_id
    if eos is not None and eos in row:
        row = row[: row.index(eos)]
    pad = tok.pad_token_id
    row = [t for t in row if t != pad]
    return tok.decode(row, skip_special_tokens=False)


def _length(tok: Any, row: list[int]) -> int:
    eos = tok.eos_token_id
    return row.index(eos) + 1 if eos is not None and eos in row else len(row)
