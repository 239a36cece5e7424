"""DART: "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More"
(Wen et al., arXiv:2502.11494; reference code ZichenWen1/DART ``get_retained_image_token`` and its port in
ModelTC/llmc ``token_reduction/dart.py``).

At the input of LLM layer K (default 2; layers < K see every token):

1. Pivots: the ``pivot_image`` image tokens and the ``pivot_text`` text tokens *after the image* (the question
   and the chat template's tail, never the system prompt or BOS before the image) with the largest L1 norm of
   their layer-(K-1) keys (post-RoPE, all heads concatenated).
2. Features: layer K-1's output hidden states passed through the LLM's final norm; similarity is cosine.
3. For each pivot in turn, keep the image tokens least similar to it (the least duplicated) among those not
   kept yet, removing them from the pool before the next pivot picks.
4. Image pivots are kept; text pivots are text and stay anyway. Original position ids are kept.

Two modes (``reference`` flag):

* ``reference=True`` reproduces the reference selection exactly on the same keys and features:
  every pivot keeps ``floor(budget / (pivot_image + pivot_text))`` tokens (``budget`` = ``num_keep``, or
  ``N * keep_ratio`` for a ratio, as the reference's ``N * (1 - reduction_ratio)``), so
  ``pivot_image + (pivot_image + pivot_text) * floor(budget / (pivot_image + pivot_text))`` image tokens are
  kept (4 + 8 * floor(budget / 8) by default: 64 -> 68, 100 -> 100); pivots are visited in the iteration order of
  a Python ``set`` of their sequence positions (what the reference iterates), counted in the unpadded sequence;
  keys are the KV heads repeated to the query heads (llmc reads them after ``repeat_kv``); norms and cosine
  similarities are computed in the model's dtype with ``torch.norm(p=1)`` and ``F.cosine_similarity``, as there.
  Where the reference fails, mmtok stops cleanly: when the pool runs out the count is capped at ``N`` (the
  reference's out-of-range error), and fewer than ``pivot_text`` text tokens after the image raise
  :class:`PruningError` (the reference's ``topk`` error).
  ``reference_count=True`` is the older name of this mode and turns it on.
* The default is a budget-exact variant of the same idea. It differs from the reference in three ways:
  (i) exactly ``budget`` image tokens are kept: the image pivots count toward the budget, and the
  ``budget - pivot_image`` others are split evenly over the pivots (the remainder goes to the first ones),
  where the reference keeps ``pivot_image - budget mod (pivot_image + pivot_text)`` more (4 more for 64, 3 fewer
  for 63);
  (ii) pivots are visited image pivots first, then text pivots, each group by decreasing key norm (the
  reference's set order depends on where the image sits in the prompt);
  (iii) keys are the KV heads without repetition (a rescaling of every norm by the group size) and norms and
  similarities are computed in float32, which can only reorder near-ties.
  It also degrades gracefully: fewer text tokens after the image than ``pivot_text`` uses those there are;
  ``budget < pivot_image`` keeps ``budget`` image pivots and nothing else; budget >= N keeps everything.

Both modes choose text pivots only from the tokens after the image, as the reference does. (mmtok used to choose
them among all text tokens, the system prompt and BOS before the image too; BOS, an attention sink, often has the
largest key norm of the prompt and then became a pivot.)
No attention matrix is needed, so every layer runs with SDPA. The reference supports batch size 1 only; here
each sample of a left-padded batch is handled on its own, and a batch gives the same keep sets as single runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmtok.mllm.pruning.base import PruneContext, Pruner, PrunerConfig, PruningError, check_layer
from mmtok.registries import PRUNERS

logger = logging.getLogger(__name__)


@dataclass
class DartConfig(PrunerConfig):
    layer: int = 2  # prune at the input of this LLM layer
    pivot_image: int = 4
    pivot_text: int = 4
    reference: bool = False  # True: the reference code's exact selection and count (see the module docstring)
    reference_count: bool = False  # older name of `reference` (kept working: turns the reference mode on)


@PRUNERS.register("dart", config=DartConfig, help="DART: least-duplicated tokens w.r.t. key-norm pivots (in-LLM)")
class DartPruner(Pruner):
    stage = "in_llm"

    def __init__(self, config: DartConfig):
        super().__init__(config)
        check_layer(config.layer, "dart")
        for key in ("pivot_image", "pivot_text"):
            v = getattr(config, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise PruningError(f"dart: {key} must be an integer >= 0, got {v!r}")
        if config.pivot_image + config.pivot_text < 1:
            raise PruningError(
                "dart: pivot_image + pivot_text must be >= 1 (DART keeps the tokens least similar to its pivots; "
                "with no pivot there is nothing to compare with). The paper uses pivot_image=4, pivot_text=4."
            )
        if config.reference_count and not config.reference:
            logger.info("dart: reference_count=True is the older name of reference=True; using the reference mode")
        self.reference = bool(config.reference or config.reference_count)
        self.layer = config.layer

    # -- budgets -----------------------------------------------------------------------------------------------
    def per_pivot(self, n: int) -> int:
        """Reference mode: image tokens each pivot keeps, ``floor(budget / (pivot_image + pivot_text))``."""
        c = self.config
        target = c.num_keep if c.num_keep is not None else n * c.keep_ratio  # the reference's float for a ratio
        return int(target // (c.pivot_image + c.pivot_text))

    def budget(self, n: int) -> int:
        if not self.reference:
            return super().budget(n)
        c = self.config
        return min(n, min(c.pivot_image, n) + (c.pivot_image + c.pivot_text) * self.per_pivot(n))

    # -- selection ---------------------------------------------------------------------------------------------
    def select(self, ctx: PruneContext) -> torch.Tensor:
        n = ctx.num_image_tokens
        keys = ctx.get("prev_keys")  # [B, H_kv, L, d]
        normed = ctx.llm.model.norm(ctx.hidden)  # [B, L, D]
        valid = ctx.key_valid.bool()  # [B, L]
        out = []
        for b in range(keys.shape[0]):
            img_pos = ctx.image_positions[b]  # [N] sequence indices
            if self.reference:
                out.append(self._select_reference(keys[b], normed[b], valid[b], img_pos, n, ctx.llm))
            else:
                out.append(self._select_default(keys[b], normed[b], valid[b], img_pos, self.budget(n)))
        return torch.stack(out)

    def _text_after_image(self, valid: torch.Tensor, img_pos: torch.Tensor) -> torch.Tensor:
        """Sequence indices of the real tokens after the last image token ``[T]``."""
        after = torch.arange(valid.shape[0], device=valid.device) > img_pos.max()
        return (after & valid).nonzero()[:, 0]

    def _select_default(
        self, keys: torch.Tensor, normed: torch.Tensor, valid: torch.Tensor, img_pos: torch.Tensor, k: int
    ) -> torch.Tensor:
        """Budget-exact keep indices ``[k]`` into this sample's ``N`` image tokens (sorted)."""
        n = img_pos.shape[0]
        dev = img_pos.device
        if k >= n:
            return torch.arange(n, device=dev)
        l1 = keys.float().abs().sum(dim=-1).sum(dim=0)  # [L] == L1 norm of the concatenated KV heads
        feats = F.normalize(normed.float(), dim=-1)  # [L, D] unit vectors
        n_img_piv = min(self.config.pivot_image, k)
        img_piv = torch.topk(l1[img_pos], n_img_piv).indices  # into the N image tokens, by decreasing norm
        text_idx = self._text_after_image(valid, img_pos)
        n_txt_piv = min(self.config.pivot_text, text_idx.numel())
        txt_piv = text_idx[torch.topk(l1[text_idx], n_txt_piv).indices] if n_txt_piv else text_idx[:0]
        img_feats = feats[img_pos]  # [N, D]
        pivots = torch.cat([img_feats[img_piv], feats[txt_piv]])  # [P, D], image pivots first
        p = pivots.shape[0]
        remaining = k - n_img_piv
        if remaining and p == 0:
            raise PruningError(
                "dart: no pivot to compare with: pivot_image=0 and the prompt has no text after the image; "
                "set pivot_image >= 1 or put the question after the <image> placeholder"
            )
        selected = torch.zeros(n, dtype=torch.bool, device=dev)
        selected[img_piv] = True
        sims = img_feats @ pivots.T  # [N, P] cosine similarities
        for j in range(p):
            quota = remaining // p + (1 if j < remaining % p else 0)
            if quota == 0:
                continue
            s = sims[:, j].masked_fill(selected, float("inf"))  # kept tokens are out of the pool
            selected[torch.topk(s, quota, largest=False).indices] = True
        return selected.nonzero()[:, 0]

    def _select_reference(
        self,
        keys: torch.Tensor,
        normed: torch.Tensor,
        valid: torch.Tensor,
        img_pos: torch.Tensor,
        n: int,
        llm,
    ) -> torch.Tensor:
        """The reference selection for one sample: keep indices ``[budget(n)]`` into its ``N`` image tokens."""
        c = self.config
        dev = img_pos.device
        # The reference runs one unpadded sequence: drop the left padding so positions (and hence the set
        # order of the pivots) are those of the prompt alone.
        seq = valid.nonzero()[:, 0]  # [L'] real tokens
        rel = torch.cumsum(valid.long(), 0) - 1  # index of each token in the unpadded sequence
        start = int(rel[img_pos[0]])
        if not torch.equal(rel[img_pos], torch.arange(start, start + n, device=dev)):
            raise PruningError("dart reference mode needs the N image tokens to be contiguous in the prompt")
        # keys as the reference reads them: KV heads repeated to the query heads, then heads concatenated
        h_q = getattr(getattr(llm, "config", None), "num_attention_heads", keys.shape[0])
        k_rep = keys.repeat_interleave(max(1, h_q // keys.shape[0]), dim=0)  # [H, L, d]
        flat = k_rep.permute(1, 0, 2).reshape(keys.shape[1], -1)[seq]  # [L', H * d]
        states = normed[seq]  # [L', D]
        img_norm = torch.norm(flat[start : start + n], p=1, dim=-1)
        txt_norm = torch.norm(flat[start + n :], p=1, dim=-1)
        if txt_norm.numel() < c.pivot_text:
            raise PruningError(
                f"dart reference mode needs at least pivot_text={c.pivot_text} text tokens after the image, the "
                f"prompt has {txt_norm.numel()} (the reference code fails there); use the default mode or a "
                "smaller pivot_text"
            )
        n_img_piv = min(c.pivot_image, n)
        image_piv = (img_norm.topk(n_img_piv).indices + start).tolist()
        text_piv = (txt_norm.topk(c.pivot_text).indices + start + n).tolist()
        quota = self.per_pivot(n)
        kept = set(image_piv + text_piv)
        pool = set(range(start, start + n))
        pool.difference_update(image_piv)
        for pivot in list(kept):  # the reference's visiting order: iteration order of this set
            candidates = list(pool)
            take = min(quota, len(candidates))  # the reference fails when the pool runs out; we stop there
            if take == 0:
                continue
            sim = F.cosine_similarity(states[pivot], states[candidates], dim=-1)  # [|pool|]
            picked = [candidates[i] for i in (-sim).topk(take).indices.tolist()]
            kept.update(picked)
            pool.difference_update(picked)
        kept.difference_update(text_piv)
        return torch.tensor(sorted(kept), device=dev, dtype=torch.long) - start
