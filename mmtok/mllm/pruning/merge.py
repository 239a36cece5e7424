"""Token merging before the LLM: ToMe and PiToMe behind the pruning interface.

* ToMe: "Token Merging: Your ViT But Faster" (Bolya et al., arXiv:2210.09461; reference code
  facebookresearch/ToMe, ``tome/merge.py`` ``bipartite_soft_matching`` + ``merge_wavg``). Bipartite soft matching:
  split the tokens alternately into sets A (even indices) and B (odd), link each A token to its most similar B
  token (cosine), merge the ``r`` A tokens with the strongest links into their B partners by size-weighted average.
* PiToMe: "Accelerating Transformers with Spectrum-Preserving Token Merging" (Tran et al., NeurIPS 2024,
  arXiv:2405.16148; reference code hchautran/PiToMe, ``algo/pitome/merge.py`` ``pitome_vision``). An energy score
  ``E_i = mean_j ELU(cos(x_i, x_j) - margin)`` marks tokens in dense, redundant regions; the ``2r`` tokens of highest
  energy are mergeable (split alternately into A and B in energy order), the rest are protected, and every A token
  merges into its most similar B token.

Merged tokens carry a size (how many original tokens they cover). ``proportional_attention=True`` adds
``log(size)`` to the LLM's attention logits of the merged keys (ToMe's proportional attention, on SDPA through the
additive mask: :func:`mmtok.mllm.decoder.run_layers` ``key_bias``), so a merged token weighs as much as the tokens
it stands for. The MLLM's pre-LLM path (``MLLM._run``) passes that bias to every layer and keeps it in the KV
cache; a caller that cannot apply it gets an error, never a silent no-op. :func:`prefill_logits` is the same path
written out by hand (the test's independent check).

Before the LLM mmtok merges the projected image features ``[B, N, D]`` to exactly ``K`` tokens (the budget) in
successive bipartite steps: each step merges ``r = min(t - K, t // 2)`` of the ``t`` current tokens (a bipartite step
can merge at most half of them), so 576 -> 64 runs 576 -> 288 -> 144 -> 72 -> 64. The similarity metric is the
features themselves (ToMe and PiToMe use the tower's keys inside a ViT; before the LLM the features are what there
is). PiToMe uses one ``margin`` for every step (default 0.5, the reference function's default).

Placement and position ids: the merged tokens are ordered by the size-weighted mean index of the original tokens
they cover (ties: the smallest original index first) and each sits at the slot ``floor(mean + 0.5)`` of the image
tokens, so its position id is the rounded size-weighted mean position; when two merged tokens round to the same
slot the later one moves to the next free slot (and never so far that the remaining ones would not fit), see
:func:`mmtok.mllm.pruning.base.merge_slots`. This keeps the pruning interface's promise (``K`` sorted, distinct
slots) and the original, never re-indexed, positions.

Two modes (``reference`` flag):

* ``reference=True`` does in each step exactly what the reference code does on the same metric: the same
  normalisation, the same unstable ``argsort`` (ties broken as torch breaks them there), ``max`` for the partners,
  and the reference's output order (ToMe: unmerged A tokens by decreasing link strength, then B; PiToMe: protected
  tokens by decreasing energy, then B), which decides the A/B split of the next step.
* The default differs in two ways: (i) ties are broken deterministically towards the earlier token (stable sort);
  (ii) after each step the tokens are put back in raster order (by their first original token), so the alternating
  A/B split of the next step stays a spatial checkerboard of neighbours instead of the reference's score order.
  Both modes compute in float32 (the reference computes in the model's dtype).

The reference modules apply ToMe/PiToMe inside a ViT (see :mod:`mmtok.mllm.pruning.tower_merge` for that); there
is no reference for merging the LLM's image tokens to a budget: the multi-step schedule above is mmtok's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mmtok.mllm import decoder as dec
from mmtok.mllm.pruning.base import Merger, MergeResult, PruneContext, PrunerConfig, PruningError
from mmtok.registries import PRUNERS

# A bipartite step: (metric [B, T, C], r, protected prefix tokens) -> (assign [B, T] into 0..T'-1, T').
Step = Callable[[torch.Tensor, int, int], tuple[torch.Tensor, int]]


# --------------------------------------------------------------------------------------------------------------
# one merging step, as an assignment of every token to an output token
# --------------------------------------------------------------------------------------------------------------
def tome_step(metric: torch.Tensor, r: int, protected: int = 0, stable: bool = True) -> tuple[torch.Tensor, int]:
    """One ToMe bipartite soft matching step.

    Args:
        metric: ``[B, T, C]`` similarity features (ToMe: the keys averaged over heads).
        r: Tokens to remove, capped at ``(T - protected) // 2``.
        protected: 1 if token 0 is a class token that never merges (ToMe allows 0 or 1), else 0.
        stable: Break ties towards the earlier token (mmtok's default); False = the reference's plain argsort.

    Returns:
        ``assign [B, T]``: the output token (``0..T'-1``) each token goes to, in the reference's output order
        (unmerged A tokens by decreasing link strength, sorted by index when there is a class token, then every B
        token in order), and ``T' = T - r``.
    """
    b, t, _ = metric.shape
    r = min(r, (t - protected) // 2)
    dev = metric.device
    if r <= 0:
        return torch.arange(t, device=dev).expand(b, -1).clone(), t
    m = metric / metric.norm(dim=-1, keepdim=True)
    a, bb = m[:, ::2], m[:, 1::2]
    scores = a @ bb.transpose(-1, -2)  # [B, Ta, Tb] cosine similarities
    if protected:
        scores[:, 0, :] = -math.inf  # the class token (first of A) is never a source
    node_max, node_idx = scores.max(dim=-1)  # best partner in B of every A token
    edge = node_max.argsort(dim=-1, descending=True, stable=stable)  # [B, Ta] strongest links first
    ta, tb = a.shape[1], bb.shape[1]
    unm, src = edge[:, r:], edge[:, :r]
    if protected:  # the reference sorts the survivors so the class token stays first
        unm = unm.sort(dim=1).values
    out_a = torch.empty(b, ta, dtype=torch.long, device=dev)
    out_a.scatter_(1, unm, torch.arange(ta - r, device=dev).expand(b, -1))
    out_a.scatter_(1, src, (ta - r) + node_idx.gather(1, src))
    assign = torch.empty(b, t, dtype=torch.long, device=dev)
    assign[:, ::2] = out_a
    assign[:, 1::2] = (ta - r) + torch.arange(tb, device=dev)
    return assign, t - r


def pitome_energy(metric: torch.Tensor, margin: float, alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """PiToMe's energy score ``[B, T]`` and the cosine similarity matrix ``[B, T, T]`` of ``metric [B, T, C]``.

    ``E_i = mean_j ELU(cos(x_i, x_j) - margin, alpha)`` over every token j (itself included, as the reference): high
    for tokens with many near-duplicates (dense, redundant regions), low for isolated, informative ones.
    """
    m = F.normalize(metric, p=2, dim=-1)
    sim = m @ m.transpose(-1, -2)
    return F.elu(sim - margin, alpha=alpha).mean(dim=-1), sim


def pitome_step(
    metric: torch.Tensor, r: int, protected: int = 0, margin: float = 0.5, alpha: float = 1.0, stable: bool = True
) -> tuple[torch.Tensor, int]:
    """One PiToMe step: the ``2r`` highest-energy tokens split alternately into A and B; A merges into B.

    Args:
        metric: ``[B, T, C]`` similarity features.
        r: Tokens to remove, capped at ``(T - protected) // 2``.
        protected: Prefix tokens (class token) that are neither scored nor merged.
        margin: Cosine similarity above which a neighbour raises a token's energy (0.5 = the reference default).
        alpha: ELU's alpha (reference: 1).
        stable: Break ties towards the earlier token; False = the reference's plain argsort.

    Returns:
        ``assign [B, T]`` in the reference's output order (prefix, protected tokens by decreasing energy, then the B
        tokens), and ``T' = T - r``.
    """
    b, t_all, _ = metric.shape
    c = protected
    t = t_all - c
    r = min(r, t // 2)
    dev = metric.device
    if r <= 0:
        return torch.arange(t_all, device=dev).expand(b, -1).clone(), t_all
    energy, sim = pitome_energy(metric[:, c:], margin, alpha)
    order = energy.argsort(dim=-1, descending=True, stable=stable)  # [B, T] densest first
    merge_idx, keep_idx = order[:, : 2 * r], order[:, 2 * r :]
    a_idx, b_idx = merge_idx[:, ::2], merge_idx[:, 1::2]  # [B, r] each
    scores = sim.gather(1, a_idx[..., None].expand(-1, -1, t)).gather(2, b_idx[:, None, :].expand(-1, r, -1))
    dst = scores.max(dim=-1).indices  # [B, r] partner of every A token among the B tokens
    assign = torch.empty(b, t, dtype=torch.long, device=dev)
    base = c + t - 2 * r  # first output index of the B tokens
    assign.scatter_(1, keep_idx, c + torch.arange(t - 2 * r, device=dev).expand(b, -1))
    assign.scatter_(1, b_idx, base + torch.arange(r, device=dev).expand(b, -1))
    assign.scatter_(1, a_idx, base + dst)
    prefix = torch.arange(c, device=dev).expand(b, -1)
    return torch.cat([prefix, assign], dim=1), t_all - r


# --------------------------------------------------------------------------------------------------------------
# applying assignments: size-weighted averages and source maps
# --------------------------------------------------------------------------------------------------------------
def merge_wavg(
    x: torch.Tensor, sizes: torch.Tensor, assign: torch.Tensor, t_out: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average of ``x [B, T, C]`` into ``t_out`` tokens; returns ``(x' [B, T', C], sizes' [B, T'])``."""
    b, _, c = x.shape
    w = sizes.to(x.dtype)[..., None]
    total = x.new_zeros(b, t_out, c).scatter_add_(1, assign[..., None].expand(-1, -1, c), x * w)
    new_sizes = sizes.new_zeros(b, t_out).scatter_add_(1, assign, sizes)
    return total / new_sizes.to(x.dtype)[..., None], new_sizes


def first_sources(source_map: torch.Tensor, t: int) -> torch.Tensor:
    """``[B, t]``: the smallest original index each of ``t`` merged tokens covers (``source_map [B, N]``)."""
    b, n = source_map.shape
    idx = torch.arange(n, device=source_map.device).expand(b, -1)
    return torch.full((b, t), n, dtype=torch.long, device=source_map.device).scatter_reduce(
        1, source_map, idx, reduce="amin"
    )


def reorder(x: torch.Tensor, sizes: torch.Tensor, source_map: torch.Tensor, perm: torch.Tensor):
    """Put merged tokens in the order ``perm [B, T]`` (new position -> old index)."""
    inv = torch.empty_like(perm).scatter_(1, perm, torch.arange(perm.shape[1], device=perm.device).expand_as(perm))
    return (
        x.gather(1, perm[..., None].expand(-1, -1, x.shape[-1])),
        sizes.gather(1, perm),
        inv.gather(1, source_map),
    )


def merge_to_budget(features: torch.Tensor, k: int, step: Step, raster: bool = True) -> MergeResult:
    """Merge ``features [B, N, D]`` to exactly ``k`` tokens by repeated bipartite steps (see the module docstring).

    Args:
        features: ``[B, N, D]``; also the similarity metric.
        k: Tokens left, in ``1..N``.
        step: One bipartite step (:func:`tome_step` / :func:`pitome_step` with their options bound).
        raster: Put the tokens back in raster order after every step (mmtok's default); False = keep the reference's
            output order between steps.

    Returns:
        :class:`MergeResult` with the merged tokens ordered by mean position (ties: smallest original index).
    """
    b, n, _ = features.shape
    if not 1 <= k <= n:
        raise PruningError(f"cannot merge {n} tokens to {k}: the budget must be in 1..{n}")
    x = features.float()
    sizes = torch.ones(b, n, dtype=torch.float32, device=x.device)
    source = torch.arange(n, device=x.device).expand(b, -1).clone()
    t = n
    while t > k:
        r = min(t - k, t // 2)
        assign, t_new = step(x, r, 0)
        assert t_new == t - r, (t, r, t_new)  # noqa: S101 - internal invariant of the step functions
        x, sizes = merge_wavg(x, sizes, assign, t_new)
        source = assign.gather(1, source)
        t = t_new
        if raster and t > k:
            x, sizes, source = reorder(x, sizes, source, first_sources(source, t).argsort(dim=1))
    # final order: by mean position, ties by first original token (two stable sorts)
    x, sizes, source = reorder(x, sizes, source, first_sources(source, t).argsort(dim=1, stable=True))
    perm = MergeResult(x, sizes, source).mean_positions().argsort(dim=1, stable=True)
    x, sizes, source = reorder(x, sizes, source, perm)
    return MergeResult(x.to(features.dtype), sizes, source)


def merge_key_bias(
    result: MergeResult, slots: torch.Tensor, image_positions: torch.Tensor, seq_len: int
) -> torch.Tensor:
    """Proportional-attention bias ``[B, L]`` for :func:`mmtok.mllm.decoder.run_layers` ``key_bias``.

    ``log(size)`` at the sequence position of every merged image token (``image_positions [B, N]`` gathered at its
    slot ``slots [B, K]``), 0 at every other token; it is given in the unpruned sequence's coordinates (the decoder
    gathers it with the keep index).
    """
    b = slots.shape[0]
    bias = torch.zeros(b, seq_len, dtype=torch.float32, device=slots.device)
    return bias.scatter_(1, image_positions.gather(1, slots), result.sizes.float().log())


@torch.no_grad()
def prefill_logits(
    model: Any,
    input_ids: torch.Tensor,
    images: torch.Tensor,
    merger: Merger,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token logits ``[B, V]`` after a prefill with ``merger`` before the LLM, with proportional attention.

    The MLLM's pre-LLM path written out by hand (prepare, merge, scatter the merged features into their slots,
    drop the other image tokens at the input of layer 0, add the ``log(size)`` key bias): the independent check
    that ``MLLM._run`` applies proportional attention (tested equal, with and without the bias).
    """
    from mmtok.mllm.modeling import sequence_keep

    prep = model.prepare(input_ids, attention_mask, images)
    if prep.ctx is None:
        raise PruningError("prefill_logits merges image tokens: give images")
    prep.ctx.accepts_key_bias = True
    keep = merger.select(prep.ctx)
    feats = merger.gather_features(prep.ctx.image_features, keep)
    slots = prep.image_positions.gather(1, keep)  # sequence positions of the merged tokens
    embeds = prep.embeds.scatter(1, slots[..., None].expand(-1, -1, feats.shape[-1]), feats.to(prep.embeds))
    seq_len = prep.embeds.shape[1]
    seq_keep = sequence_keep(keep, prep.image_positions, seq_len)
    bias = None
    if merger.proportional_attention:
        bias = merge_key_bias(merger.last_result, keep, prep.image_positions, seq_len)
    out = dec.run_layers(
        model.llm,
        embeds,
        prep.key_valid,
        prep.position_ids,
        prune_layer=0,
        prune_hook=lambda *_: seq_keep,
        key_bias=bias,
    )
    return model.lm_logits(out.hidden[:, -1])


# --------------------------------------------------------------------------------------------------------------
# registered mergers
# --------------------------------------------------------------------------------------------------------------
@dataclass
class TomeConfig(PrunerConfig):
    reference: bool = False  # True: the reference's tie-breaking and token order in every step (module docstring)
    # add log(size) to the LLM's attention logits of merged keys (the MLLM applies it; other callers must say so)
    proportional_attention: bool = False


@dataclass
class PitomeConfig(TomeConfig):
    margin: float = 0.5  # energy margin: cosine similarity above which a neighbour counts as a duplicate
    alpha: float = 1.0  # ELU alpha of the energy score


class _BudgetMerger(Merger):
    """Merges the projected image features to exactly the budget ``K`` with a bipartite step."""

    def __init__(self, config: TomeConfig):
        super().__init__(config)
        self.reference = bool(config.reference)
        self.proportional_attention = bool(config.proportional_attention)

    def step(self, metric: torch.Tensor, r: int, protected: int) -> tuple[torch.Tensor, int]:  # pragma: no cover
        raise NotImplementedError

    def merge(self, ctx: PruneContext) -> MergeResult:
        feats = ctx.image_features
        if feats is None:
            raise PruningError(f"{type(self).__name__} merges the projected image features: it is a pre_llm reducer")
        return merge_to_budget(feats, self.budget(ctx.num_image_tokens), self.step, raster=not self.reference)


@PRUNERS.register("tome", config=TomeConfig, help="ToMe bipartite soft matching to exactly K tokens (pre-LLM)")
class TomeMerger(_BudgetMerger):
    """ToMe before the LLM: repeated bipartite soft matching steps down to ``K`` merged tokens."""

    def step(self, metric: torch.Tensor, r: int, protected: int) -> tuple[torch.Tensor, int]:
        return tome_step(metric, r, protected, stable=not self.reference)


@PRUNERS.register("pitome", config=PitomeConfig, help="PiToMe energy-guided merging to exactly K (pre-LLM)")
class PitomeMerger(_BudgetMerger):
    """PiToMe before the LLM: energy-protected bipartite merging steps down to ``K`` merged tokens."""

    def __init__(self, config: PitomeConfig):
        super().__init__(config)
        if not -1.0 <= float(config.margin) <= 1.0:
            raise PruningError(f"pitome: margin is a cosine similarity in [-1, 1], got {config.margin!r}")
        if float(config.alpha) <= 0:
            raise PruningError(f"pitome: alpha must be > 0 (ELU's negative slope), got {config.alpha!r}")
        self.margin, self.alpha = float(config.margin), float(config.alpha)

    def step(self, metric: torch.Tensor, r: int, protected: int) -> tuple[torch.Tensor, int]:
        return pitome_step(metric, r, protected, self.margin, self.alpha, stable=not self.reference)
