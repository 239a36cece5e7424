"""DART: "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More"
(Wen et al., arXiv:2502.11494, reference code ZichenWen1/DART).

At the input of LLM layer K (default 2; layers < K see every token):

1. Pivots: the ``pivot_image`` image tokens and ``pivot_text`` text tokens with the largest L1 norm of their
   layer-(K-1) keys (post-RoPE, all KV heads concatenated).
2. Features: layer K-1's output hidden states passed through the LLM's final norm, L2-normalised.
3. For each pivot in turn, keep the ``quota`` remaining image tokens with the *lowest* cosine similarity to
   it (the least duplicated), removing them from the pool; the budget is split evenly across pivots
   (remainder to the first pivots).
4. Image pivots are kept; text pivots are text and stay anyway. Original position ids are kept.

What we do differently: the reference keeps ``budget + 4`` image tokens (its image pivots come on top, so
64 -> 68). mmtok honours the budget exactly (image pivots count toward it); ``reference_count=True``
reproduces the reference count. No attention matrix is needed, so every layer runs with SDPA. Guards: budget
>= N keeps everything; fewer text tokens than ``pivot_text`` uses those there are; budget < pivots uses
``budget`` image pivots and nothing else; the reference's out-of-range failure when budget + pivots > N
cannot happen (the total is capped at N).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmtok.mllm.pruning.base import PruneContext, Pruner, PrunerConfig
from mmtok.registries import PRUNERS


@dataclass
class DartConfig(PrunerConfig):
    layer: int = 2  # prune at the input of this LLM layer
    pivot_image: int = 4
    pivot_text: int = 4
    reference_count: bool = False  # True: keep budget + image pivots, as the reference code does


@PRUNERS.register("dart", config=DartConfig, help="DART: least-duplicated tokens w.r.t. key-norm pivots (in-LLM)")
class DartPruner(Pruner):
    stage = "in_llm"

    def __init__(self, config: DartConfig):
        super().__init__(config)
        self.layer = config.layer

    def budget(self, n: int) -> int:
        k = super().budget(n)
        if self.config.reference_count:
            k = min(n, k + min(self.config.pivot_image, k))
        return k

    def select(self, ctx: PruneContext) -> torch.Tensor:
        n = ctx.num_image_tokens
        k = self.budget(n)
        keys = ctx.get("prev_keys")  # [B, H_kv, L, d]
        l1 = keys.float().abs().sum(dim=-1).sum(dim=1)  # [B, L] == L1 norm of the concatenated heads
        feats = F.normalize(ctx.llm.model.norm(ctx.hidden).float(), dim=-1)  # [B, L, D]
        image_mask = torch.zeros_like(ctx.key_valid, dtype=torch.bool).scatter_(1, ctx.image_positions, True)
        text_mask = ctx.key_valid.bool() & ~image_mask
        out = [self._select_one(l1[b], feats[b], ctx.image_positions[b], text_mask[b], k) for b in range(l1.shape[0])]
        return torch.stack(out)

    def _select_one(
        self, l1: torch.Tensor, feats: torch.Tensor, img_pos: torch.Tensor, text_mask: torch.Tensor, k: int
    ) -> torch.Tensor:
        """Keep indices ``[k]`` into this sample's ``N`` image tokens (sorted)."""
        n = img_pos.shape[0]
        dev = img_pos.device
        if k >= n:
            return torch.arange(n, device=dev)
        img_l1 = l1[img_pos]  # [N]
        n_img_piv = min(self.config.pivot_image, k)
        img_piv = torch.topk(img_l1, n_img_piv).indices  # into the N image tokens
        text_idx = text_mask.nonzero()[:, 0]
        n_txt_piv = min(self.config.pivot_text, text_idx.numel())
        txt_piv = text_idx[torch.topk(l1[text_idx], n_txt_piv).indices] if n_txt_piv else text_idx[:0]
        img_feats = feats[img_pos]  # [N, D]
        pivots = torch.cat([img_feats[img_piv], feats[txt_piv]])  # [P, D]
        selected = torch.zeros(n, dtype=torch.bool, device=dev)
        selected[img_piv] = True
        remaining = k - n_img_piv
        p = pivots.shape[0]
        sims = img_feats @ pivots.T  # [N, P] cosine similarities (features are unit vectors)
        for j in range(p):
            quota = remaining // p + (1 if j < remaining % p else 0)
            if quota == 0:
                continue
            s = sims[:, j].masked_fill(selected, float("inf"))
            quota = min(quota, int((~selected).sum()))
            selected[torch.topk(s, quota, largest=False).indices] = True
        return selected.nonzero()[:, 0]
