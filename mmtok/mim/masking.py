"""Token maskers for masked image / video modeling, all with one call shape.

``masker(batch_size, context) -> MaskOutput(mask [B, N] bool (True = hidden), ids_keep [B, K],
ids_restore [B, N], log_probs)``, with the same number ``K`` of visible tokens in every sample, given by
``masker.visible_count(grid)``:

- ``random``, ``attention``, ``adaptive``, ``hard_patch``: ``K = int(N * (1 - mask_ratio))`` (the MAE formula,
  float quirks included, so counts match the reference);
- ``tube``: VideoMAE's per-frame rule, ``int(mask_ratio * h * w)`` hidden in every frame, so
  ``K = t * (h * w - int(mask_ratio * h * w))`` (the visible count is per frame; on VideoMAE's (8, 14, 14) at
  0.9 that is 8 * 20 = 160, where the MAE formula would give 156);
- ``block``: one spatial mask repeated over the ``t`` frames with ``int(h * w * (1 - mask_ratio))`` visible per
  frame, so ``K = t * int(h * w * (1 - mask_ratio))`` (on images, ``t = 1``, the MAE formula).

Both per-frame rules work on any grid. A trainer switches strategy by config:
``registries.MASKERS.create("tube", mask_ratio=0.9)``; code that needs ``K`` asks the masker, not the formula.

Strategies and sources:
- ``random``: MAE (arXiv:2111.06377, facebookresearch/mae): per-sample argsort of uniform noise.
- ``block``: BEiT (arXiv:2106.08254, microsoft/unilm ``beit/masking_generator.py``) / iBOT: rectangles of
  random area and log-uniform aspect until the target count is met. Two styles:

  * ``style="exact"`` (default): the count is always exact. After ``max_tries`` failed placements in a row it
    places 1x1 blocks, and near the end it draws areas no larger than what is left. That makes about ten times
    more 1x1 blocks than BEiT's generator: on 14x14 with 75 hidden and ``min_block=16`` (BEiT's setting),
    0.51 vs 0.05 per mask over 1,000 masks, with about as many blocks in all (4.5 vs 4.1); see
    ``tests/test_mim_masking.py``.
  * ``style="beit"``: BEiT's ``MaskingGenerator`` as written: areas uniform in ``[min_block, left]`` (capped by
    ``max_block``), aspect log-uniform in ``[min_aspect, 1 / min_aspect]``, blocks strictly smaller than the
    grid, at most 10 attempts per block, and it stops when an attempt round places nothing, so a draw may end
    below the target (on 14x14 with 75 hidden, 32% of draws, by up to 9 tokens; 21% at 147 of 196).
    :func:`beit_block_mask` is that generator for one mask. Because every sample of a batch must hide the same
    number of tokens (the MAE encoder drops the hidden ones), the masker redraws a sample whose draw ended
    short (up to ``max_redraws`` times): the masks are BEiT's blocks conditioned on reaching the count.

  On video grids the spatial block mask is repeated over time, with the per-frame count above.
- ``tube``: VideoMAE (arXiv:2203.12602, MCG-NJU/VideoMAE ``masking_generator.py`` ``TubeMaskingGenerator``):
  one spatial random mask with ``int(mask_ratio * h * w)`` hidden tokens, repeated over every time slice.
- ``attention``: AttMask (arXiv:2203.12719, gkakogeorgiou/attmask): hide the tokens a teacher's [CLS]
  attends to most (``context.scores``), on a fraction ``apply_prob`` of the images (the rest get
  random masks); ``hint_ratio`` reveals that share of them at random and hides the next-ranked
  tokens instead (AttMask-Hint), keeping the count exact.
- ``adaptive``: AdaMAE (arXiv:2211.09120, wgcban/adamae): a one-block sampling network gives p over
  tokens; visible tokens are drawn by multinomial sampling without replacement. The sampling loss
  ``-mean_hidden(log p * stopgrad(recon error))`` (weight 1e-4 in the paper) is
  :func:`adaptive_sampling_loss`. We detach the tokens fed to the sampling network so that loss only
  trains the sampler.
- ``hard_patch``: HPM (arXiv:2304.05919, Haochen-Wang409/HPM): a teacher predicts per-patch loss
  (``context.scores``); the predicted-hardest patches fill a share of the mask that ramps linearly
  from 0 to ``max_hard`` (50%) over ``ramp`` of training (``context.progress``), the rest is random.
  The predictor's pairwise ranking loss is :func:`ranking_loss`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from mmtok.registries import MASKERS

__all__ = [
    "MaskContext",
    "MaskOutput",
    "Masker",
    "adaptive_sampling_loss",
    "beit_block_mask",
    "mask_to_output",
    "num_visible",
    "per_frame_visible",
    "ranking_loss",
]


@dataclass
class MaskContext:
    """What a masker may look at besides the batch size.

    Attributes:
        grid: Token grid ``(t, h, w)``; ``N = t * h * w`` (``t == 1`` for images).
        tokens: ``[B, N, D]`` patch tokens (``adaptive`` reads them).
        scores: ``[B, N]`` per-token teacher scores: [CLS] attention (``attention``) or predicted
            loss (``hard_patch``).
        progress: Fraction of training done, in [0, 1] (``hard_patch`` ramp).
        device: Where the outputs live (defaults to the tokens'/scores' device, else CPU).
        generator: Optional RNG for reproducible masks.
    """

    grid: tuple[int, int, int]
    tokens: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    progress: float = 0.0
    device: torch.device | str | None = None
    generator: torch.Generator | None = None

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w

    def resolve_device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        for t in (self.tokens, self.scores):
            if t is not None:
                return t.device
        return torch.device("cpu")


@dataclass
class MaskOutput:
    """A batch of masks.

    Attributes:
        mask: ``[B, N]`` bool, True = hidden.
        ids_keep: ``[B, K]`` visible token indices (what the encoder sees, in this order).
        ids_restore: ``[B, N]``; ``cat(kept, hidden)[ids_restore]`` is raster order again.
        log_probs: ``[B, N]`` log-probabilities of the sampling network (``adaptive`` only).
    """

    mask: torch.Tensor
    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    log_probs: torch.Tensor | None = None


def num_visible(num_tokens: int, mask_ratio: float) -> int:
    """``int(N * (1 - ratio))`` visible tokens, checked to leave at least one visible and one hidden."""
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
    k = int(num_tokens * (1 - mask_ratio))
    if k < 1 or k >= num_tokens:
        raise ValueError(
            f"mask_ratio {mask_ratio} on {num_tokens} tokens leaves {k} visible; pick a ratio that keeps "
            "between 1 and N-1 tokens visible (or use smaller patches)"
        )
    return k


def per_frame_visible(frame_tokens: int, mask_ratio: float, rule: str) -> int:
    """Visible tokens per frame for maskers that repeat one spatial mask over time.

    Args:
        frame_tokens: ``h * w`` tokens of one frame.
        mask_ratio: Share hidden, in (0, 1).
        rule: ``"videomae"``: ``h*w - int(ratio * h*w)`` (VideoMAE hides ``int(ratio * h*w)`` per frame);
            ``"mae"``: ``int(h*w * (1 - ratio))`` (the MAE formula applied to one frame).
    """
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
    k = frame_tokens - int(mask_ratio * frame_tokens) if rule == "videomae" else int(frame_tokens * (1 - mask_ratio))
    if k < 1 or k >= frame_tokens:
        raise ValueError(
            f"mask_ratio {mask_ratio} on {frame_tokens} tokens per frame leaves {k} visible per frame; pick a ratio "
            "that keeps between 1 and h*w-1 tokens of each frame visible (or use smaller patches)"
        )
    return k


def ids_from_order(order: torch.Tensor, num_keep: int) -> MaskOutput:
    """``order [B, N]`` (token indices, visible first) -> :class:`MaskOutput`."""
    ids_restore = torch.argsort(order, dim=1)
    mask = torch.ones_like(order, dtype=torch.bool)
    mask.scatter_(1, order[:, :num_keep], False)
    return MaskOutput(mask=mask, ids_keep=order[:, :num_keep], ids_restore=ids_restore)


def mask_to_output(mask: torch.Tensor) -> MaskOutput:
    """A bool mask ``[B, N]`` with the same hidden count per row -> :class:`MaskOutput`.

    Visible tokens keep raster order (stable sort), which also keeps tube masks aligned across time.
    """
    counts = (~mask).sum(1)
    if not bool((counts == counts[0]).all()):
        raise ValueError("every row of the mask must hide the same number of tokens")
    order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)
    return ids_from_order(order, int(counts[0]))


def _rand(shape: tuple[int, ...], ctx: MaskContext, device: torch.device) -> torch.Tensor:
    return torch.rand(shape, generator=ctx.generator, device="cpu" if ctx.generator is not None else device).to(device)


class Masker(nn.Module):
    """Base class: ``forward(batch_size, context) -> MaskOutput``."""

    config: object

    @property
    def mask_ratio(self) -> float:
        return float(self.config.mask_ratio)

    def visible_count(self, grid: tuple[int, int, int]) -> int:
        """``K``: visible tokens per sample on the token grid ``(t, h, w)`` (MAE's formula unless overridden)."""
        t, h, w = grid
        return num_visible(t * h * w, self.mask_ratio)

    def forward(self, batch_size: int, context: MaskContext) -> MaskOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def _need(self, context: MaskContext, field: str, why: str) -> torch.Tensor:
        value = getattr(context, field)
        if value is None:
            raise ValueError(f"the {type(self).__name__} needs context.{field} ({why})")
        if field == "scores" and tuple(value.shape[1:]) != (context.num_tokens,):
            raise ValueError(f"context.scores must be [B, {context.num_tokens}], got {tuple(value.shape)}")
        return value


# -- random (MAE) --------------------------------------------------------------------------------
@dataclass
class RandomMaskConfig:
    mask_ratio: float = 0.75


class RandomMasker(Masker):
    """MAE: hide a uniformly random subset per sample (argsort of noise)."""

    def __init__(self, config: RandomMaskConfig):
        super().__init__()
        self.config = config

    def forward(self, batch_size: int, context: MaskContext) -> MaskOutput:
        n = context.num_tokens
        k = num_visible(n, self.mask_ratio)
        noise = _rand((batch_size, n), context, context.resolve_device())
        return ids_from_order(torch.argsort(noise, dim=1), k)  # small noise = kept


# -- block (BEiT / iBOT) -------------------------------------------------------------------------
@dataclass
class BlockMaskConfig:
    mask_ratio: float = 0.75
    min_block: int = 4  # smallest rectangle area in tokens (BEiT's min_num_patches: 16 on 14x14)
    min_aspect: float = 0.3  # aspect ratio drawn log-uniform in [min_aspect, 1 / min_aspect]
    max_tries: int = 10  # exact style: failed placements in a row before placing 1x1 blocks
    style: str = "exact"  # "exact" (always the target count) | "beit" (BEiT's generator, short draws redrawn)
    max_block: int = 0  # beit style: largest rectangle area (BEiT's max_num_patches; 0 = the target count)
    max_redraws: int = 100  # beit style: draws per sample before giving up on reaching the count


def beit_block_mask(
    h: int,
    w: int,
    num_hidden: int,
    rng: random.Random,
    min_block: int = 16,
    min_aspect: float = 0.3,
    max_block: int = 0,
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """BEiT's ``MaskingGenerator`` for one ``h x w`` mask: ``(mask [h, w] bool, (height, width) of each block)``.

    Blocks of area uniform in ``[min_block, left]`` (``left`` = tokens still to hide, capped by ``max_block``),
    log-uniform aspect in ``[min_aspect, 1 / min_aspect]``, strictly smaller than the grid, 10 attempts per block;
    it stops when an attempt round hides nothing, so the mask may hide fewer than ``num_hidden`` tokens.
    """
    m = torch.zeros(h, w, dtype=torch.bool)
    log_aspect = (math.log(min_aspect), -math.log(min_aspect))
    count, shapes = 0, []
    while count < num_hidden:
        left = num_hidden - count
        if max_block > 0:
            left = min(left, max_block)
        added = 0
        for _ in range(10):  # BEiT's attempts per block
            area = rng.uniform(min_block, left)  # min_block > left is allowed: uniform() swaps the ends
            aspect = math.exp(rng.uniform(*log_aspect))
            bh, bw = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if bw < w and bh < h:  # strictly smaller than the grid, as BEiT
                top, lft = rng.randint(0, h - bh), rng.randint(0, w - bw)
                new = bh * bw - int(m[top : top + bh, lft : lft + bw].sum())
                if 0 < new <= left:
                    m[top : top + bh, lft : lft + bw] = True
                    added = new
                    shapes.append((bh, bw))
                    break
        if added == 0:  # nothing fits any more: BEiT stops short of the target here
            break
        count += added
    return m, shapes


class BlockMasker(Masker):
    """BEiT/iBOT: random rectangles until ``h*w - int(h*w * (1 - ratio))`` tokens of a frame are hidden."""

    def __init__(self, config: BlockMaskConfig):
        super().__init__()
        if config.style not in ("exact", "beit"):
            raise ValueError(f"block masking style must be 'exact' or 'beit', not {config.style!r}")
        if config.min_block < 1 or not 0.0 < config.min_aspect <= 1.0 or config.max_redraws < 1:
            raise ValueError("block masking needs min_block >= 1, min_aspect in (0, 1] and max_redraws >= 1")
        self.config = config

    def visible_count(self, grid: tuple[int, int, int]) -> int:
        t, h, w = grid
        return t * per_frame_visible(h * w, self.mask_ratio, "mae")

    def _exact(self, h: int, w: int, hidden: int, rng: random.Random) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Exactly ``hidden`` tokens of an ``h x w`` frame: ``(mask [h*w], (height, width) of each block)``."""
        c = self.config
        m = torch.zeros(h, w, dtype=torch.bool)
        count, fails, shapes = 0, 0, []
        log_aspect = (math.log(c.min_aspect), -math.log(c.min_aspect))
        while count < hidden:
            left = hidden - count
            if fails < c.max_tries:
                area = rng.uniform(min(c.min_block, left), left)
                aspect = math.exp(rng.uniform(*log_aspect))
                bh = max(1, round(math.sqrt(area * aspect)))
                bw = max(1, round(math.sqrt(area / aspect)))
            else:  # no rectangle fits the remainder: single tokens finish the job exactly
                bh = bw = 1
            if bh > h or bw > w:
                fails += 1
                continue
            top, lft = rng.randint(0, h - bh), rng.randint(0, w - bw)
            new = int((~m[top : top + bh, lft : lft + bw]).sum())
            if 0 < new <= left:
                m[top : top + bh, lft : lft + bw] = True
                count += new
                fails = 0
                shapes.append((bh, bw))
            else:
                fails += 1
        return m.reshape(-1), shapes

    def _beit(self, h: int, w: int, hidden: int, rng: random.Random) -> torch.Tensor:
        """BEiT's generator, redrawn until a draw hides exactly ``hidden`` tokens -> ``[h*w]``."""
        c = self.config
        for _ in range(c.max_redraws):
            m, _ = beit_block_mask(h, w, hidden, rng, c.min_block, c.min_aspect, c.max_block)
            if int(m.sum()) == hidden:
                return m.reshape(-1)
        raise ValueError(
            f"BEiT's block generator never hid {hidden} of {h}x{w} tokens in {c.max_redraws} draws "
            f"(min_block={c.min_block}, max_block={c.max_block}); lower min_block, raise max_redraws or use "
            "style='exact'"
        )

    def forward(self, batch_size: int, context: MaskContext) -> MaskOutput:
        t, h, w = context.grid
        hidden = h * w - per_frame_visible(h * w, self.mask_ratio, "mae")  # per frame
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=context.generator))
        rng = random.Random(seed)
        if self.config.style == "beit":
            rows = [self._beit(h, w, hidden, rng) for _ in range(batch_size)]
        else:
            rows = [self._exact(h, w, hidden, rng)[0] for _ in range(batch_size)]
        spatial = torch.stack(rows)  # [B, h*w]
        mask = spatial.repeat(1, t).to(context.resolve_device())  # same block mask in every time slice
        return mask_to_output(mask)


# -- tube (VideoMAE) -----------------------------------------------------------------------------
@dataclass
class TubeMaskConfig:
    mask_ratio: float = 0.9


class TubeMasker(Masker):
    """VideoMAE: one random spatial mask hiding ``int(ratio * h*w)`` tokens, repeated over every time slice."""

    def __init__(self, config: TubeMaskConfig):
        super().__init__()
        self.config = config

    def visible_count(self, grid: tuple[int, int, int]) -> int:
        t, h, w = grid
        return t * per_frame_visible(h * w, self.mask_ratio, "videomae")

    def forward(self, batch_size: int, context: MaskContext) -> MaskOutput:
        t, h, w = context.grid
        ks = per_frame_visible(h * w, self.mask_ratio, "videomae")  # visible per frame
        noise = _rand((batch_size, h * w), context, context.resolve_device())
        keep = torch.argsort(noise, dim=1)[:, :ks]
        spatial = torch.ones(batch_size, h * w, dtype=torch.bool, device=noise.device)
        spatial.scatter_(1, keep, False)
        return mask_to_output(spatial.repeat(1, t))  # [B, t*h*w], raster order is (t, h, w)


# -- attention-guided (AttMask) ------------------------------------------------------------------
@dataclass
class AttentionMaskConfig:
    mask_ratio: float = 0.75
    apply_prob: float = 1.0  # share of images masked by attention; the rest get random masks
    hint_ratio: float = 0.0  # AttMask-Hint: share of the most-attended tokens revealed anyway


class AttentionMasker(Masker):
    """AttMask: hide the tokens the teacher's [CLS] attends to most (``context.scores``)."""

    def __init__(self, config: AttentionMaskConfig):
        super().__init__()
        if not 0.0 <= config.hint_ratio < 1.0 or not 0.0 <= config.apply_prob <= 1.0:
            raise ValueError("hint_ratio must be in [0, 1) and apply_prob in [0, 1]")
        self.config = config

    def forward(self, batch_size: int, context: MaskContext) -> MaskOutput:
        scores = self._need(context, "scores", "the teacher's head-averaged [CLS] attention, e.g. cls_attention()")
        n = context.num_tokens
        k = num_visible(n, self.mask_ratio)
        hidden = n - k
        dev = scores.device
        order = torch.argsort(scores.float(), dim=1, descending=True)  # most attended first
        by_rank = torch.arange(n, device=dev)[None].expand(batch_size, n) < hidden  # [B, N] over ranks
        n_hint = min(int(self.config.hint_ratio * hidden), k)
        if n_hint:
            by_rank = by_rank.clone()
            reveal = torch.argsort(_rand((batch_size, hidden), context, dev), dim=1)[:, :n_hint]
            by_rank.scatter_(1, reveal, False)  # reveal random hints among the most attended ...
            by_rank[:, hidden : hidden + n_hint] = True  # ... and hide the next-ranked tokens instead
        guided = torch.zeros_like(by_rank).scatter_(1, order, by_rank)  # back to token positions
        random_mask = RandomMasker(RandomMaskConfig(self.mask_ratio))(batch_size, context).mask
        use = _rand((batch_size, 1), context, dev) < self.config.apply_prob
        return mask_to_output(torch.where(use, guided, random_mask))


# -- adaptive (AdaMAE) ---------------------------------------------------------------------------
@dataclass
class AdaptiveMaskConfig:
    mask_ratio: float = 0.95
    embed_dim: int = 192  # width of the tokens in context.tokens (the task sets it from the model)
    num_heads: int = 3
    mlp_ratio: float = 4.0


class AdaptiveMasker(Masker):
    """AdaMAE: a sampling network draws the visible tokens from a learned categorical distribution."""

    def __init__(self, config: AdaptiveMaskConfig):
        super().__init__()
        self.config = config
        self.block = Block(config.embed_dim, config.num_heads, config.mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm)
        self.norm = nn.LayerNorm(config.embed_dim)
        self.head = nn.Linear(config.embed_dim, 1)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, N, D]`` -> ``[B, N]`` sampling logits."""
        return self.head(self.norm(self.block(tokens))).squeeze(-1)

    def forward(self, batch_size: int, context: MaskContext) -> MaskOutput:
        tokens = self._need(context, "tokens", "the patch tokens with position embeddings, [B, N, D]")
        if tokens.shape[-1] != self.config.embed_dim:
            raise ValueError(f"adaptive masker built for width {self.config.embed_dim}, tokens are {tokens.shape[-1]}")
        n = context.num_tokens
        k = num_visible(n, self.mask_ratio)
        log_p = F.log_softmax(self.logits(tokens.detach()).float(), dim=-1)  # [B, N]
        with torch.no_grad():
            probs = log_p.exp() + 1e-12  # keeps >= K non-zero entries for sampling without replacement
            gen = context.generator
            if gen is not None and probs.device.type != "cpu":
                keep = torch.multinomial(probs.cpu(), k, replacement=False, generator=gen).to(probs.device)
            else:
                keep = torch.multinomial(probs, k, replacement=False, generator=gen)  # [B, K]
            hidden = torch.ones(batch_size, n, dtype=torch.bool, device=tokens.device)
            hidden.scatter_(1, keep, False)
            rest = torch.argsort(hidden.to(torch.int8), dim=1, stable=True)[:, k:]  # hidden tokens, raster order
            out = ids_from_order(torch.cat([keep, rest], dim=1), k)
        out.log_probs = log_p
        return out


def adaptive_sampling_loss(log_probs: torch.Tensor, mask: torch.Tensor, token_loss: torch.Tensor) -> torch.Tensor:
    """AdaMAE sampling loss: ``-mean over hidden tokens of log p * stopgrad(per-token recon error)``.

    Args:
        log_probs: ``[B, N]`` from :class:`AdaptiveMasker`.
        mask: ``[B, N]`` bool, True = hidden.
        token_loss: ``[B, N]`` per-token reconstruction error (detached here).
    """
    m = mask.float()
    return -(log_probs * token_loss.detach() * m).sum() / m.sum().clamp_min(1.0)


# -- hard patches mining (HPM) -------------------------------------------------------------------
@dataclass
class HardPatchMaskConfig:
    mask_ratio: float = 0.75
    max_hard: float = 0.5  # share of the hidden tokens chosen as predicted-hardest at the end of the ramp
    ramp: float = 1.0  # fraction of training over which the share grows linearly from 0 to max_hard


class HardPatchMasker(Masker):
    """HPM: hide the patches a teacher predicts to be hardest (share ramps 0 -> ``max_hard``), rest random."""

    def __init__(self, config: HardPatchMaskConfig):
        super().__init__()
        if not 0.0 <= config.max_hard <= 1.0 or config.ramp <= 0:
            raise ValueError("max_hard must be in [0, 1] and ramp > 0")
        self.config = config

    def hard_share(self, progress: float) -> float:
        """Share of hidden tokens that are predicted-hardest at training ``progress`` in [0, 1]."""
        return self.config.max_hard * min(max(progress, 0.0) / self.config.ramp, 1.0)

    def forward(self, batch_size: int, context: MaskContext) -> MaskOutput:
        n = context.num_tokens
        k = num_visible(n, self.mask_ratio)
        hidden = n - k
        n_hard = int(hidden * self.hard_share(context.progress))
        dev = context.resolve_device()
        noise = _rand((batch_size, n), context, dev)  # in [0, 1)
        if n_hard:
            scores = self._need(context, "scores", "the teacher's predicted per-patch loss")
            top = torch.argsort(scores.float(), dim=1, descending=True)[:, :n_hard]
            noise = noise.scatter(1, top, 2.0)  # predicted-hardest always rank first for hiding
        order = torch.argsort(noise, dim=1)  # ascending: visible first, hardest last
        return ids_from_order(order, k)


def ranking_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """HPM's pairwise ranking loss for the loss predictor, over hidden tokens of each sample.

    For every ordered pair (i, j) of hidden tokens with ``target_i != target_j``:
    ``BCE(sigmoid(pred_i - pred_j), 1[target_i > target_j])``. Only the order matters, so the
    predictor is free of the loss scale that drifts during training.

    Args:
        pred: ``[B, N]`` predicted per-token loss.
        target: ``[B, N]`` actual per-token reconstruction loss (detached here).
        mask: ``[B, N]`` bool, True = hidden (only those have a target).
    """
    target = target.detach()
    diff = pred[:, :, None] - pred[:, None, :]  # [B, N, N]
    label = (target[:, :, None] > target[:, None, :]).float()
    valid = mask[:, :, None] & mask[:, None, :] & (target[:, :, None] != target[:, None, :])
    loss = F.binary_cross_entropy_with_logits(diff, label, reduction="none")
    return (loss * valid).sum() / valid.sum().clamp_min(1)


MASKERS.add("random", RandomMasker, config=RandomMaskConfig)
MASKERS.add("block", BlockMasker, config=BlockMaskConfig)
MASKERS.add("tube", TubeMasker, config=TubeMaskConfig)
MASKERS.add("attention", AttentionMasker, config=AttentionMaskConfig)
MASKERS.add("adaptive", AdaptiveMasker, config=AdaptiveMaskConfig)
MASKERS.add("hard_patch", HardPatchMasker, config=HardPatchMaskConfig)
