"""[CLS]-attention pruning before the LLM: FasterVLM and VTC-CLS.

* FasterVLM: "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM Inference
  Faster" (arXiv:2412.01818, reference code Theia-4869/FasterVLM). Score each patch by the [CLS] -> patch
  attention of the vision-encoder layer whose output feeds the LLM (LLaVA-1.5: the penultimate CLIP layer),
  mean over heads, not renormalised; keep the top K in raster order; the LLM is untouched.
* VTC-CLS: "[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs" (arXiv:2412.05819,
  reference code THU-MIG/VTC-CLS): the same score summed over a range of encoder layers.

What we do differently: the reference turns on ``output_attentions`` (eager attention in the whole tower).
We recompute only the [CLS] row from the block's q/k (one query per head, ``O(N d)``), so the tower keeps
SDPA. Towers without a [CLS] token (SigLIP) score each patch by the mean attention it receives from all
patches (column mean of the attention map) instead. When the image tokens include [CLS]
(``feature_select="cls_patch"``), [CLS] itself is always kept; when the MLLM drops leading patches (transformers'
LLaVA "default" strategy on SigLIP drops patch 0), their scores are dropped too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmtok.mllm.pruning.base import PruneContext, Pruner, PrunerConfig, PruningError, topk_sorted
from mmtok.registries import PRUNERS


@dataclass
class ClsAttentionConfig(PrunerConfig):
    num_layers: int = 1  # blocks summed, ending at the feature block (1 = FasterVLM; 0 = from the first block)


class ClsAttentionPruner(Pruner):
    """Top-K image tokens by [CLS] attention in the tower (summed over ``num_layers`` blocks)."""

    stage = "pre_llm"

    def scores(self, ctx: PruneContext) -> torch.Tensor:
        """``[B, N]`` scores of the image tokens (higher = keep)."""
        end = ctx.feature_block
        if end < 0:
            raise PruningError("cls_attention needs features taken after a tower block (feature_layer != 0)")
        start = 0 if self.config.num_layers <= 0 else max(0, end - self.config.num_layers + 1)
        s = ctx.get(f"cls_attention:{start}:{end}")  # [B, num_patches]
        extra = ctx.num_image_tokens - s.shape[1]
        if extra > 0:  # [CLS] is among the image tokens: always keep it
            s = torch.cat([s.new_full((s.shape[0], extra), float("inf")), s], dim=1)
        elif extra < 0:  # the MLLM dropped leading patches (LLaVA's "default" on a tower without [CLS]): so do we
            s = s[:, -extra:]
        return s

    def select(self, ctx: PruneContext) -> torch.Tensor:
        return topk_sorted(self.scores(ctx), self.budget(ctx.num_image_tokens))


PRUNERS.add(
    "cls_attention",
    ClsAttentionPruner,
    config=ClsAttentionConfig,
    help="FasterVLM: [CLS] attention of the feature layer (pre-LLM)",
)
PRUNERS.add(
    "vtc_cls",
    ClsAttentionPruner,
    config=ClsAttentionConfig,
    defaults={"num_layers": 0},
    help="VTC-CLS: [CLS] attention summed over the tower's blocks up to the feature layer",
)
