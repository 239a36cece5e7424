"""Token maskers for masked image / video modeling, all with one call shape.

``masker(batch_size, context) -> MaskOutput(mask [B, N] bool (True = hidden), ids_keep [B, K],
ids_restore [B, N], log_probs)``, with exactly ``K = int(N * (1 - mask_ratio))`` visible tokens for every
strategy (the MAE formula, float quirks included, so counts match the reference). A trainer switches
strategy by config: ``registries.MASKERS.create("tube", mask_ratio=0.9)``.

Strategies and sources:
- ``random``: MAE (arXiv:2111.06377, facebookresearch/mae): per-sample argsort of uniform noise.
- ``block``: BEiT (arXiv:2106.08254, microsoft/unilm ``masking_generator.py``) / iBOT: rectangles of
  random area and log-uniform aspect until the target count is met. BEiT can stop short of the ratio
  when no rectangle fits; we finish with 1x1 blocks so the count is exact. On video grids the spatial
  block mask is repeated over time.
- ``tube``: VideoMAE (arXiv:2203.12602): one spatial random mask repeated over every time slice.
  Needs ``K`` divisible by the number of time slices (the only way both rules can hold).
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
    "mask_to_output",
    "num_visible",
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
    min_block: int = 4  # smallest rectangle area in tokens (BEiT: 16 on 14x14)
    min_aspect: float = 0.3  # aspect ratio drawn log-uniform in [min_aspect, 1 / min_aspect]
    max_tries: int = 10  # failed placements before falling back to 1x1 blocks


class BlockMasker(Masker):
    """BEiT/iBOT: random rectangles until exactly ``N - K`` tokens are hidden."""

    def __init__(self, config: BlockMaskConfig):
        super().__init__()
        self.config = config

    def _one(self, h: int, w: int, hidden: int, rng: random.Random) -> torch.Tensor:
        c = self.config
        m = torch.zeros(h, w, dtype=torch.bool)
        count, fails = 0, 0
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
            else:
                fails += 1
        return m.reshape(-1)

    def forward(self, batch_size: int, context: MaskContext) -> MaskOutput:
        t, h, w = context.grid
        n = context.num_tokens
        k = num_visible(n, self.mask_ratio)
        ks = _per_slice_keep(k, t, "block", n)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=context.generator))
        rng = random.Random(seed)
        spatial = torch.stack([self._one(h, w, h * w - ks, rng) for _ in range(batch_size)])  # [B, h*w]
        mask = spatial.repeat(1, t).to(context.resolve_device())  # same block mask in every time slice
        return mask_to_output(mask)


def _per_slice_keep(k: int, t: int, name: str, n: int | None = None) -> int:
    if k % t:
        hint = ""
        if n:
            ok = [
                r for r in (x / 1000 for x in range(500, 1000)) if int(n * (1 - r)) % t == 0 and int(n * (1 - r)) >= t
            ]
            near = sorted(ok, key=lambda r: abs(r - (1 - k / n)))[:2]
            hint = f" (on this grid e.g. mask_ratio={' or '.join(f'{r:g}' for r in sorted(near))})" if near else ""
        raise ValueError(
            f"{name} masking repeats one spatial mask over {t} time slices, so the {k} visible tokens must "
            f"be divisible by {t}; change mask_ratio slightly{hint}"
        )
    return k // t


# -- tube (VideoMAE) -----------------------------------------------------------------------------
@dataclass
class TubeMaskConfig:
    mask_ratio: float = 0.9


class TubeMasker(Masker):
    """VideoMAE: one random spatial mask repeated over every time slice."""

    def __init__(self, config: TubeMaskConfig):
        super().__init__()
        self.config = config

    def forward(self, batch_size: int, context: MaskContext) -> MaskOutput:
        t, h, w = context.grid
        k = num_visible(context.num_tokens, self.mask_ratio)
        ks = _per_slice_keep(k, t, "tube", context.num_tokens)
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
