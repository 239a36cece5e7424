"""FastV: "An Image is Worth 1/2 Tokens After Layer 2" (Chen et al., arXiv:2403.06764, reference code
pkunlp-icler/FastV).

At LLM layer K (default 2) the image tokens are ranked by the head-averaged attention they receive from the
last prompt token at layer K-1, and the top ``round(N * (1 - R))`` are kept (default R = 50%).

What we do differently: the reference runs layer K-1 with ``output_attentions=True`` (a full ``L x L``
eager attention map). We recompute only the last token's query row of layer K-1 from that layer's input and
take the post-RoPE keys from the KV cache (or recompute them), so every layer keeps SDPA and the extra cost is
``O(L d)``. Kept tokens keep their original position ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmtok.mllm.pruning.base import PruneContext, Pruner, PrunerConfig, check_layer, topk_sorted
from mmtok.registries import PRUNERS


@dataclass
class FastVConfig(PrunerConfig):
    layer: int = 2  # prune at the input of this LLM layer (scores from layer K-1)

    def __post_init__(self) -> None:
        if self.num_keep is None and self.keep_ratio is None:  # no budget given: FastV's R = 50%
            self.keep_ratio = 0.5


@PRUNERS.register("fastv", config=FastVConfig, help="FastV: last-token attention at LLM layer K-1 (in-LLM)")
class FastVPruner(Pruner):
    stage = "in_llm"

    def __init__(self, config: FastVConfig):
        super().__init__(config)
        check_layer(config.layer, "fastv")
        self.layer = config.layer

    def scores(self, ctx: PruneContext) -> torch.Tensor:
        att = ctx.get("last_attention").mean(dim=1)  # [B, L], head mean
        return att.gather(1, ctx.image_positions)  # [B, N]

    def select(self, ctx: PruneContext) -> torch.Tensor:
        return topk_sorted(self.scores(ctx), self.budget(ctx.num_image_tokens))
